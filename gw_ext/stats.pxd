# Counters every worker keeps in its own row of the shared-memory stats block.
# One writer per row (its worker), so increments are plain stores: no locks,
# no atomics. Readers (master, `gw stats`, /metrics) sum the rows, except the
# per-worker gauge WORKER_HEARTBEAT_MS, which is read per row.

from libc.stdint cimport uint64_t

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
    SESSIONS_LATE = 87        # sessions from another worker dropped: their CONNECT had settled without them
    # Rate limits (worker/rate_limits.pyx): enforced by not reading, never by dropping what was read.
    CONN_RATE_PAUSES = 88     # a listener stopped accepting: its max_conn_rate bucket was empty (the backlog holds the rest)
    MSG_RATE_PAUSES = 89      # a client's reads paused: its max_messages_rate bucket was empty
    BYTE_RATE_PAUSES = 90     # a client's reads paused: its max_bytes_rate bucket was empty
    PER_IP_REFUSED = 91       # connections closed right after accept: max_connections_per_ip open from their address
    RATE_PAUSED = 92          # gauge: clients not read now because of a rate limit
    # 93..95 free.
    CHANNEL_MSGS_OUT = 80     # PUBLISH forwarded to other workers
    CHANNEL_MSGS_IN = 81      # PUBLISH received from other workers
    CHANNEL_BYTES_OUT = 82
    CHANNEL_BYTES_IN = 83
    CHANNEL_DROPS = 84        # frames to a worker that stopped reading
    PKT_IN = 32               # + packet type (1..14): packets received by type
    PKT_OUT = 48              # + packet type: packets sent by type
    MALFORMED_BY_REASON = 64  # + codec MAL_* reason
    # HTTP listener and telemetry ingest.
    HTTP_REQUESTS = 96        # + http_status_index(status) (16 slots): HTTP requests answered, by status
    INGEST_REQUESTS = 112     # + http_status_index(status): /v1/ingest requests answered, by status
    INGEST_RECORDS_ACCEPTED = 128   # telemetry records accepted (HTTP and MQTT)
    INGEST_RECORDS_DUPLICATE = 129  # acknowledged but not stored again: (device_id, seq) seen within the window
    INGEST_RECORDS_REJECTED = 130   # records failing the schema (HTTP and MQTT)
    TELEMETRY_MQTT_ACCEPTED = 131   # MQTT publishes on telemetry topics that passed the schema
    TELEMETRY_MQTT_REJECTED = 132   # ... that failed it (not routed)
    HTTP_MALFORMED = 133      # requests refused by the framing (bad request line/headers, too large) and closed
    HTTP_TIMEOUTS = 134       # HTTP connections closed: request not complete within http_timeout, or idle keep-alive expired
    DEDUP_FULL = 135          # (device_id, seq) not remembered: the idempotency table was full
    WORKER_HEARTBEAT_MS = 136  # gauge, per worker (never summed): CLOCK_MONOTONIC ms of the worker's last tick
    HTTP_REQUESTS_SHED = 137  # HTTP requests answered 503 (draining, queue full)
    # Write-ahead log and acknowledgement after durability, per worker.
    WAL_RECORDS = 138         # readings appended to this worker's log
    WAL_BYTES = 139           # bytes appended, framing included
    WAL_FSYNCS = 140          # fdatasync calls (each one group commit)
    WAL_DURABLE_OFFSET = 141  # gauge, per worker (never summed): log offset known durable; sinks read up to it
    WAL_APPENDED_OFFSET = 142  # gauge, per worker (never summed): log offset appended
    WAL_TRUNCATED = 143       # bytes of a torn or corrupt tail cut when the log was recovered
    WAL_ERRORS = 144          # failed writes or fsyncs (disk full, I/O error): nothing more becomes durable
    WAL_REFUSED = 145         # readings the log could not take: HTTP 503, MQTT publisher disconnected
    ACKS_HELD = 146           # gauge: PUBACKs and HTTP answers waiting for the log (ack mode sink)
    # Damage in the middle of a worker's log, written by the pipeline process (one
    # writer per word: the worker never writes these two).
    WAL_CORRUPT = 147         # bytes of damaged log records the pipeline skipped: those readings are lost
    WAL_CORRUPT_OFFSET = 148  # per worker (never summed): log offset up to which damage was counted
    INGEST_RECORDS_PENDING = 149  # records answered 503: the same (device_id, seq) is being written by another worker
    CHANNEL_MALFORMED = 150   # frames, datagrams or session states from another worker (or the data dir) dropped: truncated, malformed, over a bound
    CHANNEL_FRAGMENTED = 151  # frames larger than one channel datagram, sent in continuation datagrams
    # Containment and bounds.
    CLOSED_INTERNAL = 152     # connections closed because handling their input raised (a bug, logged)
    CLOSED_LIMIT = 153        # connections closed for going past a per-client bound (LIMITS)
    INTERNAL_ERRORS = 154     # exceptions contained by the loop (a connection's, a channel's, a timer's)
    # HTTP's lingering close and the query API's threads.
    HTTP_LINGER_CUT = 155     # lingering closes ended by http_linger_bytes or http_linger_timeout (the client was still sending)
    QUERIES_PENDING = 156     # gauge: store queries waiting for or running in the query threads
    QUERIES_REFUSED = 157     # store queries answered 503: query_max_pending were already waiting
    # Persistence of retained messages and sessions in data_dir (gw/persistence.py).
    PERSIST_WRITES = 158      # files written and made durable by the worker's writer thread
    PERSIST_ERRORS = 159      # ... that failed (disk full, I/O error); the next snapshot retries
    LIMITS = 160              # + LIM_* (16 slots): a bound on what a client can make the server hold was hit
    SUBSCRIPTION_INDEX_BYTES = 176  # gauge: memory of this worker's subscription index (local and peer filters)
    # Who may connect (gw_ext/worker/auth.pyx, gw/auth.py).
    AUTH_REFUSED_ANONYMOUS = 177  # CONNECTs without a user name refused (CONNACK 0x05; JSON-lines Connects: Error), anonymous access off
    AUTH_REFUSED_PASSWORD = 178   # CONNECTs refused for their user name and password (CONNACK 0x04): unknown user, wrong or missing password
    AUTH_REFUSED_TAKEOVER = 179   # CONNECTs refused (CONNACK 0x05) for a client id whose session another user holds
    AUTH_REFUSED_BUSY = 180       # CONNECTs refused (CONNACK 0x03): auth_max_pending were already waiting for their check, or its check not done within connect_timeout
    # The ACL (acl_file; gw_ext/worker/access.pyx).
    ACL_PUBLISH_DENIED = 181  # PUBLISHes (and wills) the ACL does not let their client write: dropped (QoS 1/2 still acknowledged)
    ACL_SUBSCRIBE_DENIED = 182  # SUBSCRIBE filters the ACL lets its client read nothing of: SUBACK 0x80
    ACL_DELIVERY_DENIED = 183 # messages not delivered: the subscriber may not read their topic (also from a queue, after a reload)
    ACL_SYS_PUBLISH_REFUSED = 184  # PUBLISHes (and wills) on $SYS topics from clients: dropped, whatever the ACL says
    # Client certificates (require_certificate): handshakes refused, by why.
    TLS_REFUSED_NO_CERT = 185     # TLS handshakes refused: the client presented no certificate
    TLS_REFUSED_BAD_CERT = 186    # ... its certificate did not verify against client_cafile (unknown CA, bad signature, expired); also CONNECTs refused (CONNACK 4) for a certificate whose CN is no user name (use_identity_as_username)
    TLS_REFUSED_REVOKED = 187     # ... its certificate is revoked by crlfile
    # The HTTP API's tokens (gw/tokens.py, checked by gw/http_api.py before any body is parsed).
    HTTP_UNAUTHORIZED = 188   # HTTP requests answered 401: no bearer token, or one not in the tokens file
    HTTP_FORBIDDEN = 189      # HTTP requests answered 403: a valid token without the route's scope, or an ingest of a device outside its pattern
    # 190..191 free.
    HIST_INGEST = 192         # histogram (HIST_WORDS words): ingest request latency
    HIST_DELIVER = 224        # histogram (HIST_WORDS words): MQTT publish-to-deliver latency
    HIST_LOOP_TURN = 256      # histogram (HIST_WORDS words): the loop's turns, from epoll_wait's return to the turn's end
    # The store's lag bound (max_sink_lag_bytes; worker/backpressure.pyx): ingest held, nothing dropped unsaid.
    STORE_BEHIND = 288        # gauge: 1 while this worker holds ingest for the store (max_sink_lag_bytes); summed: workers holding
    STORE_BEHIND_HOLDS = 289  # times this worker began holding ingest: the store's lag on its log passed max_sink_lag_bytes
    STORE_BEHIND_HTTP = 290   # ingest requests answered 503 store_behind while it held ingest
    STORE_BEHIND_JSON = 291   # JSON-lines Data messages answered with an Error (store_behind): not taken
    STORE_BEHIND_QOS0 = 292   # QoS 0 MQTT telemetry publishes shed while it held ingest (QoS 0 has no acknowledgement)
    STORE_CHECKPOINT = 293    # per worker (never summed), written by the pipeline process: the store sink's next
                              # offset in this worker's log, plus one (0: not published yet)
    # MQTT over WebSocket (ws, wss listeners; gw_ext/worker/websocket.pyx).
    WS_UPGRADES = 294         # WebSocket upgrades accepted (101 Switching Protocols)
    WS_REFUSED = 295          # + WS_REFUSED_* (5 slots): upgrade requests refused, by the HTTP status answered
    WS_CLOSES = 300           # + WS_CLOSE_SLOT_* (8 slots): Close frames the server sent, by code
    # 308..319 free: the store.
    # MQTT 5.0 connections (gw_ext/worker/mqtt5.pyx): 320..351.
    MQTT5_CONNECTED = 320     # MQTT 5.0 CONNECTs accepted (a CONNACK 0x00 sent)
    MQTT5_MALFORMED = 321     # MQTT 5.0 packets refused as Malformed Packets (DISCONNECT or CONNACK 0x81)
    MQTT5_PROTOCOL_ERRORS = 322   # ... as Protocol Errors (0x82, and 0x94, 0xA1 for what is not supported)
    MQTT5_DISCONNECTS = 323   # + DISC5_* (10 slots): DISCONNECTs the server sent, by reason code
    MQTT5_BAD_PACKETS = 333   # + R5_* - 1 (19 slots, 333..351): packets the MQTT 5.0 codec refused, by rule
    # MQTT 5.0 messages (gw_ext/worker/router.pyx, sessions.pyx, retained.pyx): 352..383.
    MQTT5_EXPIRED = 352       # messages not delivered: their Message Expiry Interval had passed (live, queued, retained)
    MQTT5_TOPIC_ALIASES_SET = 353   # Topic Aliases a v5 client set (or set again) for its connection (topic_alias_maximum)
    MQTT5_TOPIC_ALIAS_INVALID = 354 # PUBLISHes with a Topic Alias of 0 or over topic_alias_maximum (DISCONNECT 0x94), or never set (0x82)
    # MQTT 5.0 subscription options and identifiers (gw_ext/worker/subopts.pyx): 355..363.
    MQTT5_SUBSCRIPTION_IDS = 355    # subscriptions made (or replaced) with a Subscription Identifier
    MQTT5_SUBID_PUBLISHES = 356     # PUBLISHes written with Subscription Identifiers
    MQTT5_SUBIDS_CUT = 357          # PUBLISHes whose subscriber had more matching identifiers than one carries (32)
    MQTT5_NO_LOCAL_SKIPPED = 358    # deliveries left out: No Local, the publisher's own subscription
    MQTT5_RETAIN_HANDLING_SKIPPED = 359   # subscriptions sent no retained messages (Retain Handling 2, or 1 and existing)
    # MQTT 5.0 enhanced authentication (gw_ext/worker/enhanced_auth.pyx): 360..363 and 383.
    AUTH_SCRAM_OK = 360       # CONNECTs authenticated by SCRAM-SHA-512 (the proof held)
    AUTH_SCRAM_FAILED = 361   # SCRAM-SHA-512 CONNECTs refused (bad proof, unknown or non-$7$ user: 0x86; bad SCRAM message: 0x87)
    AUTH_REAUTH_OK = 362      # re-authentications (AUTH 0x19) that succeeded (AUTH 0x00)
    AUTH_REAUTH_FAILED = 363  # re-authentications that failed (DISCONNECT 0x87)
    # MQTT 5.0 server->client flow (router.pyx, sessions.pyx, mqtt5.pyx: alias_out_*): 364..375.
    MQTT5_RECEIVE_MAX_HELD = 364    # QoS 1/2 messages held back (queued) by a client's Receive Maximum below max_inflight
    MQTT5_TOO_LARGE_DROPPED = 365   # PUBLISHes not sent to a client: larger than its Maximum Packet Size (discarded as sent)
    MQTT5_TOPIC_ALIASES_OUT = 366   # Topic Aliases the server gave its clients (a PUBLISH with the topic and a new alias)
    MQTT5_TOPIC_ALIAS_OUT_HITS = 367  # PUBLISHes sent with an empty topic and an alias the client holds
    MQTT5_PAYLOAD_FORMAT_INVALID = 368  # PUBLISHes and wills with Payload Format Indicator 1, payload not UTF-8:
                                        # PUBACK/PUBREC 0x99, DISCONNECT 0x99 (QoS 0), CONNACK 0x99 (a will)
    # 369..375 free: MQTT 5.0 messages.
    # MQTT 5.0 wills held for their Will Delay Interval (gw_ext/worker/will_delay.pyx): 376..383.
    WILLS_DELAYED = 376       # wills held for their Will Delay Interval (the connection ended without DISCONNECT 0x00)
    WILLS_DELAY_PENDING = 377 # gauge: wills this worker holds now (at most max_delayed_wills)
    WILLS_DELAY_ELAPSED = 378 # held wills published when their delay passed
    WILLS_DELAY_SESSION_END = 379   # held wills published early: their session ended first (expired, or Clean Start 1 took the id)
    WILLS_DELAY_CANCELLED = 380     # held wills not published: their client connected again to its session within the delay
    WILLS_DELAY_SHUTDOWN = 381      # held wills published when the server drained (SIGTERM)
    WILLS_DELAY_OVER_LIMIT = 382    # wills published at once, without their delay: max_delayed_wills were held
    AUTH_METHOD_UNSUPPORTED = 383   # CONNECTs with an Authentication Method not supported here (CONNACK 0x8C)
    # Shared subscriptions ($share/{name}/{filter}; gw_ext/worker/shared.pyx).
    SHARED_DELIVERED = 384    # messages given to one member of a shared group on this worker
    SHARED_FORWARDED = 385    # messages sent to another worker for one of its members of a group
    SHARED_REDELIVERED = 386  # QoS 1/2 messages of a member that left (unacknowledged) given to the group again
    SHARED_DROPPED = 387      # messages for a group that had no member left anywhere to take them
    SHARED_REFUSED = 388      # SUBSCRIBE filters $share/... refused as malformed (empty or wildcard share name, no filter): SUBACK 0x80
    SHARED_GROUPS = 389       # gauge: shared groups this worker knows (its own members or a peer's)
    SHARED_MEMBERS = 390      # gauge: members of shared groups among this worker's sessions
    # 391..399 free: shared subscriptions.
    # 400..415 free: the QoS 1 path and connection set-up (408..415: connection set-up).
    CONNECTS_AT_ONCE = 408    # CONNECTs (clean session, no authentication) settled in their turn though their id's
                              # home is another worker: the claim follows, unanswered (registry.pyx)
    EVICTS_STALE = 409        # EVICTs that named a connection a CONNECT settled at once here had already taken over
    TLS_RESUMED = 416         # of TLS_HANDSHAKES: resumed from a session ticket (abbreviated handshakes)
    TLS_OWN_RECORDS = 417     # TLS 1.3 connections whose records gw took over after the handshake (tls_record_layer = gw)
    TLS_OPENSSL_RECORDS = 418 # ... that stayed on OpenSSL's though gw was asked (TLS 1.2, another suite, a CN as user name)
    TLS_RECORDS_REFUSED = 419 # connections closed over a record gw's layer refused (tag, length, header, content)
    TLS_KEY_UPDATES_IN = 420  # KeyUpdates received by gw's record layer
    TLS_KEY_UPDATES_OUT = 421 # KeyUpdates sent by it (asked by the client, or 2^24 records under one key)
    # 422..447 free: TLS.
    N_COUNTERS = 448          # rows are 3,584 bytes: a multiple of the cache line

cpdef enum:
    # WS_REFUSED + one of these: the status a refused upgrade was answered with.
    WS_REFUSED_400 = 0        # not a valid upgrade request (method, version, headers, key, no MQTT subprotocol)
    WS_REFUSED_403 = 1        # its Origin is not in ws_allowed_origins
    WS_REFUSED_404 = 2        # another path than ws_path
    WS_REFUSED_426 = 3        # a Sec-WebSocket-Version other than 13
    WS_REFUSED_431 = 4        # a head over 16 KiB
    N_WS_REFUSED = 5

cpdef enum:
    # WS_CLOSES + one of these: the code of a Close frame the server sent.
    WS_CLOSE_SLOT_1000 = 0    # normal (an answer to the client's Close, or the MQTT connection ended)
    WS_CLOSE_SLOT_1001 = 1    # going away (the server drains)
    WS_CLOSE_SLOT_1002 = 2    # protocol error (unmasked, RSV bits, bad opcode or fragmentation, bad control frame)
    WS_CLOSE_SLOT_1003 = 3    # unsupported data (a text frame)
    WS_CLOSE_SLOT_1007 = 4    # invalid data (a Close reason not UTF-8)
    WS_CLOSE_SLOT_1008 = 5    # policy (the MQTT connection was refused or went past a bound)
    WS_CLOSE_SLOT_1009 = 6    # too big (a frame or message over max_packet_size)
    WS_CLOSE_SLOT_OTHER = 7   # another code (echoing the client's)
    N_WS_CLOSE_SLOTS = 8

cpdef enum:
    # MQTT5_DISCONNECTS + one of these: the reason code of a DISCONNECT the server sent.
    DISC5_MALFORMED = 0       # 0x81 Malformed Packet
    DISC5_PROTOCOL_ERROR = 1  # 0x82 Protocol Error
    DISC5_SHUTTING_DOWN = 2   # 0x8B Server shutting down (gw drains)
    DISC5_KEEP_ALIVE_TIMEOUT = 3  # 0x8D Keep Alive timeout
    DISC5_TAKEN_OVER = 4      # 0x8E Session taken over
    DISC5_PACKET_TOO_LARGE = 5    # 0x95 Packet too large (max_packet_size)
    DISC5_QUOTA_EXCEEDED = 6  # 0x97 Quota exceeded (a bound, the log full)
    DISC5_ADMINISTRATIVE = 7  # 0x98 Administrative action
    DISC5_RECEIVE_MAXIMUM = 8 # 0x93 Receive Maximum exceeded (max_awaiting_rel)
    DISC5_OTHER = 9           # another code (0x83, 0x94, 0xA1, ...)
    N_DISC5 = 10

cpdef enum:
    # Which bound (LIMITS + LIM_*): each a setting of the same name.
    LIM_AWAITING_REL = 0      # max_awaiting_rel: inbound QoS 2 awaiting PUBREL (disconnect)
    LIM_SUBSCRIPTIONS = 1     # max_subscriptions: per client (SUBACK 0x80)
    LIM_TOPIC_LEVELS = 2      # max_topic_levels: in a topic filter (SUBACK 0x80)
    LIM_TOPIC_LENGTH = 3      # max_topic_length: of a topic filter (SUBACK 0x80)
    LIM_QUEUED_BYTES = 4      # max_queued_bytes: a session's queue (message dropped)
    LIM_RETAINED_BYTES = 5    # max_retained_bytes: the retained store (not retained)
    N_LIMITS = 6

# Layout of the block: a header of HEADER_WORDS int64s, then one row of
# N_COUNTERS uint64s per worker slot.
cpdef enum:
    # Layout words (gw_ext.stats.Layout in Python).
    STATS_MAGIC = 0x67775354        # "gwST"
    STATS_VERSION = 5               # 2: 256 counters, HTTP/ingest counters, histograms; 3: deaths in the
                                    # header; 4: 288 counters (bounds, containment, the loop-turn histogram);
                                    # 5: 320 counters, the store's lag bound (STORE_*, H_SINK_LAG_AGE_MS)
    HEADER_WORDS = 96
    MAX_WORKERS = 64
    H_MAGIC = 0
    H_VERSION = 1
    H_WORKERS = 2
    H_COUNTERS = 3
    H_MASTER_PID = 4
    H_STARTED = 5             # unix time the master started
    H_PEAK = 6                # peak of CONNS_CURRENT summed, kept by the master
    H_PIPELINE_PID = 7        # the pipeline process's pid (0: none)
    # Written by the pipeline process about twice a second (gw/pipeline/core.py):
    H_SINK_WRITTEN = 8        # + sink index (0 store, 1 file, 2 bridge): readings written
    H_SINK_LAG = 11           # + sink index: log bytes durable and not yet read by the sink
    H_SINK_RETRIES = 14       # failed attempts of every sink, retried
    H_ALERTS = 15             # alerts published
    H_WORKER_PIDS = 16        # MAX_WORKERS words: each worker slot's pid (0: none)
    # Kept by the master (gw/master.py): exits other than its own orderly stop
    # (a signal, a non-zero exit code), respawned or not.
    H_WORKER_DEATHS = 80      # of worker processes
    H_PIPELINE_DEATHS = 81    # of the pipeline process
    # Written by the pipeline process with H_SINK_*:
    H_SINK_LAG_AGE_MS = 82    # + sink index: ms the oldest log byte a sink has not taken has been durable (max over logs)
    # 85..95 free.

# Histograms: HIST_WORDS consecutive words of a row, starting at a HIST_* index.
# Word i (0 <= i < HIST_BUCKETS) counts the observations v with
# bound[i-1] < v <= bound[i] (per bucket, not cumulative; readers accumulate);
# the last bucket (HIST_BUCKETS - 1) is +Inf. Word HIST_SUM is the sum of the
# observed values in nanoseconds, word HIST_COUNT their number.
# The HTTP status index: HTTP_REQUESTS/INGEST_REQUESTS + http_status_index(code);
# the codes are gw_http_status_codes below, HTTP_STATUS_OTHER is any other code.
cpdef enum:
    # Layout words (gw_ext.stats.Layout in Python), not counters.
    HIST_WORDS = 32
    HIST_BUCKETS = 30         # 29 finite bounds and +Inf
    HIST_SUM = 30             # word offset in a histogram: sum of the values, ns
    HIST_COUNT = 31           # word offset in a histogram: number of observations
    HTTP_STATUS_SLOTS = 16
    HTTP_STATUS_OTHER = 15

cdef extern from *:
    """
    /* Upper bounds (inclusive) of the finite histogram buckets, in nanoseconds:
       25 us to 10 s in 1-2-2.5-5-7.5 steps, a superset of the Prometheus client
       libraries' default buckets (5 ms ... 10 s). */
    static const unsigned long long gw_hist_bounds_ns[29] = {
        25000ULL, 50000ULL, 75000ULL,
        100000ULL, 200000ULL, 250000ULL, 500000ULL, 750000ULL,
        1000000ULL, 2000000ULL, 2500000ULL, 5000000ULL, 7500000ULL,
        10000000ULL, 20000000ULL, 25000000ULL, 50000000ULL, 75000000ULL,
        100000000ULL, 200000000ULL, 250000000ULL, 500000000ULL, 750000000ULL,
        1000000000ULL, 2000000000ULL, 2500000000ULL, 5000000000ULL, 7500000000ULL,
        10000000000ULL};
    /* The status codes with their own slot, in slot order. */
    static const int gw_http_status_codes[15] = {
        200, 202, 204, 400, 404, 405, 408, 411, 413, 415, 431, 500, 501, 503, 505};
    """
    const unsigned long long gw_hist_bounds_ns[29]
    const int gw_http_status_codes[15]


cdef inline void hist_observe(uint64_t* row, int hist, uint64_t ns) noexcept nogil:
    """Counts one observation of `ns` nanoseconds in the histogram at row[hist]
    (a binary search over the bounds: five comparisons)."""
    cdef int lo = 0, hi = HIST_BUCKETS - 1, mid
    while lo < hi:                  # the first bucket whose bound is >= ns; HIST_BUCKETS - 1: +Inf
        mid = (lo + hi) >> 1
        if ns <= gw_hist_bounds_ns[mid]:
            hi = mid
        else:
            lo = mid + 1
    row[hist + lo] += 1
    row[hist + HIST_SUM] += ns
    row[hist + HIST_COUNT] += 1


cdef inline int http_status_index(int code) noexcept nogil:
    """The slot of an HTTP status in HTTP_REQUESTS/INGEST_REQUESTS (HTTP_STATUS_OTHER: not listed)."""
    if code == 200: return 0
    if code == 202: return 1
    if code == 204: return 2
    if code == 400: return 3
    if code == 404: return 4
    if code == 405: return 5
    if code == 408: return 6
    if code == 411: return 7
    if code == 413: return 8
    if code == 415: return 9
    if code == 431: return 10
    if code == 500: return 11
    if code == 501: return 12
    if code == 503: return 13
    if code == 505: return 14
    return HTTP_STATUS_OTHER
