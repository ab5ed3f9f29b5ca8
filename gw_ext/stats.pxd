# Counters every worker keeps in its own row of the shared-memory stats block.
# One writer per row (its worker), so increments are plain stores: no locks,
# no atomics. Readers (master, `gw stats`, /metrics) sum the rows.

cpdef enum:
    # Counter indices (gw_ext.stats.Counter in Python).
    CONNS_CURRENT = 0         # gauge: connections open now (any state)
    CONNS_ACCEPTED = 1        # sockets accepted
    CONNS_REJECTED = 2        # refused: over --max-connections or out of fds
    CLOSED_CLIENT = 3         # peer closed the socket or sent DISCONNECT
    CLOSED_TIMEOUT = 4        # keepalive expired (1.5 x keepalive, MQTT-3.1.2-24)
    CLOSED_CONNECT_TIMEOUT = 5  # no CONNECT within --connect-timeout
    CLOSED_MALFORMED = 6      # protocol violation (see MALFORMED_BY_REASON)
    CLOSED_SERVER = 7         # shutdown, outbound overflow, refused CONNECT
    CLOSED_ERROR = 8          # socket error (reset, broken pipe)
    MQTT_CONNECTED = 9        # CONNECTs answered with CONNACK 0
    CONNACK_REFUSED = 10      # CONNECTs answered with a non-zero return code
    SESSIONS_CURRENT = 11     # gauge: MQTT/JSON clients past CONNECT
    BYTES_IN = 12
    BYTES_OUT = 13
    TLS_HANDSHAKES = 14       # completed
    TLS_FAILURES = 15         # failed handshakes
    JSON_MESSAGES_IN = 16     # JSON-lines messages received (all types)
    JSON_ERRORS = 17          # invalid JSON-lines messages answered with Error
    MSGS_IN = 18              # application messages received (PUBLISH, JSON Data)
    MSGS_OUT = 19             # application messages sent (PUBLISH)
    WRITE_OVERFLOWS = 20      # connections closed for exceeding --max-outbound
    PACKETS_TOO_LARGE = 21    # packets over --max-packet-size
    LOOP_TURNS = 22           # epoll_wait returns (activity indicator)
    SUBSCRIPTIONS_CURRENT = 23  # gauge: (filter, session) pairs in this worker's index
    SESSIONS_AWAY = 24        # gauge: clean_session=0 sessions whose client is away
    TAKEOVERS = 25            # connections closed by a CONNECT with the same client id
    WILLS_PUBLISHED = 26
    DROPPED_SLOW_QOS0 = 27    # QoS 0 not sent: the subscriber's buffer was over soft_outbound
    DROPPED_QUEUE_FULL = 28   # QoS 1/2 not queued: the session's queue was at max_queued
    DROPPED_RETAINED_FULL = 29  # retained message not kept: store at max_retained
    DROPPED_NOMEM = 30
    BACKPRESSURE_EVENTS = 31  # a subscriber's queue passed queue_high: publishers held
    SLOW_CONSUMERS = 85       # subscribers that stopped acknowledging while congested
    SESSIONS_EXPIRED = 86     # clean_session=0 sessions ended after session_expiry away
    CHANNEL_MSGS_OUT = 80     # PUBLISH forwarded to other workers
    CHANNEL_MSGS_IN = 81      # PUBLISH received from other workers
    CHANNEL_BYTES_OUT = 82
    CHANNEL_BYTES_IN = 83
    CHANNEL_DROPS = 84        # frames to a worker that stopped reading
    PKT_IN = 32               # + packet type (1..14): packets received by type
    PKT_OUT = 48              # + packet type: packets sent by type
    MALFORMED_BY_REASON = 64  # + codec MAL_* reason
    N_COUNTERS = 96           # rows are 768 bytes: a multiple of the cache line

# Layout of the block: a header of HEADER_WORDS int64s, then one row of
# N_COUNTERS uint64s per worker slot.
cpdef enum:
    # Layout words (gw_ext.stats.Layout in Python).
    STATS_MAGIC = 0x67775354        # "gwST"
    STATS_VERSION = 1
    HEADER_WORDS = 80
    MAX_WORKERS = 64
    H_MAGIC = 0
    H_VERSION = 1
    H_WORKERS = 2
    H_COUNTERS = 3
    H_MASTER_PID = 4
    H_STARTED = 5             # unix time the master started
    H_PEAK = 6                # peak of CONNS_CURRENT summed, kept by the master
    H_WORKER_PIDS = 16        # MAX_WORKERS words: each worker slot's pid (0: none)
