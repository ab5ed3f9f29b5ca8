# The worker, declared: its types, every field and cdef method of the Worker
# class, and every module-level cdef function, each group under a heading
# naming the file that implements it. The worker is one extension module,
# gw_ext.loop: loop.pyx holds the loop itself and includes one file per concern
# from gw_ext/worker/ (a handler per MQTT packet, keepalive, the router, the
# retained store, sessions, the registry, the channel, HTTP, the log...), so
# every call between them is a direct C call the compiler may inline. Those
# files are not modules, so they have no .pxd of their own: their
# declarations are here, one map of the whole worker (ARCHITECTURE.md, "Files
# and their concerns", says why).
#
# Functions marked inline in their file are declared here without the word
# (Cython keeps them inline); concern-private constants stay in their file.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.time cimport time_t
from gw_ext.acl cimport AclRules, AclView
from gw_ext.addrlimit cimport AddressCounts
from gw_ext.codec cimport ConnectPacket, PublishPacket
from gw_ext.codec5 cimport Publish5Packet
from gw_ext.dedup cimport DedupTable
from gw_ext.openssl cimport SSL, SSL_CTX
from gw_ext.topics cimport MatchResult, TopicTrie
from gw_ext.wal cimport Wal
from gw_ext.wheel cimport TimerNode, Wheel
from gw_ext.wsframe cimport WsDecoder


# gw's own TLS 1.3 record layer (worker/tls_records.pyx over gw_ext/tls_records.c).
cdef extern from "tls_records.h" nogil:
    ctypedef struct gw_tlsrec:
        pass
    void gw_tlsrec_counters(int refused, int key_updates_in, int key_updates_out)
    gw_tlsrec* gw_tlsrec_attach(SSL* ssl)
    int gw_tlsrec_handshake_flush(gw_tlsrec* r, SSL* ssl, int fd)
    int gw_tlsrec_takeover(gw_tlsrec* r, SSL* ssl)
    void gw_tlsrec_free(gw_tlsrec* r)
    ssize_t gw_tlsrec_read(gw_tlsrec* r, int fd, uint8_t* out, size_t cap, uint64_t* counters)
    int gw_tlsrec_pending(const gw_tlsrec* r)
    int gw_tlsrec_wants_write(const gw_tlsrec* r)
    int gw_tlsrec_flush(gw_tlsrec* r, int fd, const uint8_t* plain, size_t len, size_t* consumed,
                        uint64_t* counters)
    void gw_tlsrec_close_notify(gw_tlsrec* r, int fd)
    ssize_t gw_tlsrec_parse(int suite, const uint8_t* secret, size_t hash_len, const uint8_t* inp, size_t len,
                            uint8_t* out, size_t cap, size_t* used)
    ssize_t gw_tlsrec_seal(int suite, const uint8_t* secret, size_t hash_len, uint64_t seq, int type,
                           const uint8_t* plain, size_t len, uint8_t* out, size_t cap)
    size_t gw_tlsrec_state_size()

# --- the connection table (loop.pyx) -------------------------------------------------

cdef enum ConnState:
    ST_FREE = 0
    ST_LISTENER = 1
    ST_TLS_HANDSHAKE = 2
    ST_AWAIT_CONNECT = 3      # socket (and TLS) up, no CONNECT yet
    ST_CONNECTED = 4          # CONNECT accepted
    ST_CLOSING = 5            # flushing its last bytes, input ignored
    ST_CHANNEL = 6            # a socket to another worker (see worker/channel.pyx)
    ST_SETTLING = 7           # CONNECT read; its session is being settled (worker/registry.pyx)
    ST_WAL = 8                # the write-ahead log's eventfd: more of it is durable (worker/durable_ack.pyx)
    ST_CLOSED = 9             # closed by close_conn(): ignored until the end of the turn frees it
    ST_QUERY = 10             # the query threads' eventfd: store queries answered (worker/http.pyx)
    ST_AUTH = 11              # the auth threads' eventfd: password checks answered (worker/auth.pyx)

cdef enum Proto:
    PROTO_MQTT = 1
    PROTO_JSON = 2            # JSON lines: one JSON object per line (worker/jsonlines.pyx)
    PROTO_HTTP = 3            # HTTP/1.1: ingest API, health, metrics (worker/http.pyx)

cdef enum ConnFlag:
    F_TLS = 1
    F_DIRTY = 2               # on the flush list for this loop turn
    F_POLLOUT = 4             # EPOLLOUT registered (a write would block)
    F_SSL_WRITE_WANTS_READ = 8
    F_PUBLISHER = 16          # has sent QoS 1/2 PUBLISH: paused under backpressure
    F_PAUSED = 32             # not read, for backpressure (worker/backpressure.pyx)
    F_HELD_FULL = 64          # not read: HELD_MAX_PER_CONN answers wait for the log (worker/durable_ack.pyx)
    F_RATE_PAUSED = 128       # not read: a rate limit's bucket is empty (worker/rate_limits.pyx)

cdef enum StoreFlag:
    SF_TELEMETRY = 1          # has sent a QoS 1/2 PUBLISH on a telemetry topic: held while the store is behind
    SF_HELD = 2               # not read: the store is max_sink_lag_bytes behind this worker's log (worker/backpressure.pyx)

cdef enum:
    MAX_LISTENERS = 16
    MAX_PEERS = 64            # workers, and a peer bit in a uint64_t mask each
    SPARE_OUT = 16            # emptied outbound buffers a worker keeps for reuse (Worker.spare_out)
    SPARE_OUT_MAX = 65536     # ... each at most this large; larger ones are freed

# Why a connection was closed; indexes the CLOSED_* counters (CLOSE_COUNTER,
# loop.pyx) and the log limiter (Worker.log_limited).
cdef enum CloseReason:
    CR_CLIENT = 0
    CR_TIMEOUT = 1
    CR_CONNECT_TIMEOUT = 2
    CR_MALFORMED = 3
    CR_SERVER = 4
    CR_ERROR = 5
    CR_TOO_LARGE = 6
    CR_OVERFLOW = 7
    CR_TLS = 8
    CR_REFUSED = 9
    CR_DISCONNECT = 10        # the client sent DISCONNECT: no will
    CR_TAKEOVER = 11          # another CONNECT with the same client id
    CR_CHANNEL = 12           # (log only) inter-worker channel trouble
    CR_QUEUE = 13             # (log only) a bound dropped a message
    CR_PYTHON = 14            # (log only) a Python callback failed
    CR_HTTP = 15              # (log only) an HTTP request refused by the framing
    CR_TELEMETRY = 16         # (log only) an MQTT reading refused by the telemetry schema
    CR_WAL = 17               # the write-ahead log refused a QoS 1/2 reading: its publisher is closed
    CR_INTERNAL = 18          # handling its input raised: the connection goes, not the worker
    CR_LIMIT = 19             # it went past a per-client bound (max_awaiting_rel, ...)
    CR_ACL = 20               # (log only) the ACL refused a publish, subscription, will or delivery
    CR_TLS_NO_CERT = 21       # (log only) a handshake refused: no client certificate
    CR_TLS_BAD_CERT = 22      # (log only) ... a client certificate not valid, or its CN no user name
    CR_TLS_REVOKED = 23       # (log only) ... a client certificate revoked
    CR_AUTH_ANONYMOUS = 24    # (log only) a CONNECT refused: no user name, anonymous access off
    CR_AUTH_PASSWORD = 25     # (log only) ... bad user name or password
    CR_AUTH_TAKEOVER = 26     # (log only) ... its client id held by another user's session
    CR_AUTH_BUSY = 27         # (log only) ... too many password checks waiting
    CR_RATE_MESSAGES = 28     # (log only) a client paused: max_messages_rate (worker/rate_limits.pyx)
    CR_RATE_BYTES = 29        # (log only) ... max_bytes_rate
    CR_RATE_CONN = 30         # (log only) a listener paused: max_conn_rate
    CR_STORE_BEHIND = 31      # (log only) ingest held: the store is max_sink_lag_bytes behind the log
    CR_WS_REFUSED = 32        # a WebSocket upgrade refused with an HTTP answer (worker/websocket.pyx)
    CR_WS_PROTOCOL = 33       # a WebSocket protocol error: a Close with its code sent (worker/websocket.pyx)
    N_CLOSE_REASONS = 34

cdef inline bint is_client_state(uint8_t state) noexcept nogil:
    """A live connection to a client: not a listener, channel or an eventfd
    (the log's, the query threads'), and not already closed (ST_CLOSED waits
    to be freed)."""
    return (state != ST_FREE and state != ST_LISTENER and state != ST_CHANNEL and state != ST_WAL
            and state != ST_QUERY and state != ST_AUTH and state != ST_CLOSED)

# MQTT 5.0 Topic Aliases toward a client (worker/mqtt5.pyx, alias_out_*): one per
# alias given on this connection, alias number = index + 1.
cdef struct AliasOut:
    uint64_t hash             # of the topic (alias_hash)
    uint8_t* topic            # its copy (malloc'ed, at most ALIAS_OUT_TOPIC_MAX bytes)
    uint32_t topic_len

# One per file descriptor, in a table indexed by fd: the whole state of an
# idle connection is this struct (about 130 bytes), plus its client id and,
# for TLS, gw's record state (about 300 bytes, worker/tls_records.pyx) or
# OpenSSL's SSL object. Buffers exist only while bytes are pending.
cdef struct Conn:
    TimerNode timer           # first member: a TimerNode* is its Conn*
    int fd
    uint8_t state
    uint8_t proto
    uint8_t flags
    uint8_t listener          # index into Worker.listeners
    uint8_t closed_from       # ST_CLOSED: the state it was closed in
    uint8_t close_reason      # ST_CLOSED: a CloseReason (loop.pyx)
    uint8_t close_detail      # ST_CLOSED: e.g. the malformed reason
    uint8_t store_flags       # SF_* (worker/backpressure.pyx): telemetry publisher, held for the store
    uint8_t events            # what the epoll set has for it (EPOLLIN, EPOLLOUT): update_events skips an unchanged MOD
    uint16_t keepalive        # seconds, from CONNECT
    uint16_t client_id_len    # JSON-lines clients (MQTT ids live in the Session)
    uint16_t username_len     # JSON-lines clients: the user name they act as (MQTT's live in the Session)
    uint8_t json_acl          # JSON-lines clients: may publish on {telemetry_topic}/{client id} (1/0), under...
    uint8_t ws                # MQTT over WebSocket: a WsPhase (worker/websocket.pyx); 0: not WebSocket
    uint8_t version           # MQTT: the CONNECT's protocol level (3, 4, 5; 0 before it): 5 reads and
                              # writes MQTT 5.0 (worker/mqtt5.pyx)
    uint8_t v5                # MQTT 5.0: V5_* flags (worker/mqtt5.pyx)
    uint32_t max_packet_out   # MQTT 5.0: the client's Maximum Packet Size (0: none given), what
                              # the server may send it (MQTT-3.1.2-24)
    uint16_t recv_max_out     # MQTT 5.0: the client's Receive Maximum (0: none given, 65,535): its
                              # QoS 1/2 window is min(this, max_inflight) (worker/sessions.pyx)
    uint16_t alias_max_out    # MQTT 5.0: Topic Aliases the server may give it: min(its Topic Alias
                              # Maximum, topic_alias_maximum_out) at CONNECT (worker/mqtt5.pyx, alias_out_*)
    uint16_t alias_used       # ... aliases 1..alias_used given (alias_out[0..alias_used-1])
    uint16_t alias_max_in     # MQTT 5.0: the Topic Alias Maximum its CONNACK announced (topic_alias_in)
    uint32_t alias_pick       # ... the choice for the PUBLISH being written (ALIAS_PICK_*), 0: none
    AliasOut* alias_out       # ... alias_max_out slots, made on the first alias, freed by release
    uint32_t json_acl_gen     # ... this ACL generation (0: not decided yet)
    int session               # MQTT session slot, -1 before CONNECT
    uint32_t gen              # which connection this is (fds are reused)
    uint32_t pending_token    # ST_SETTLING: the claim it waits for
    uint32_t timeout_ms       # idle limit after CONNECT (0: none)
    uint32_t need             # size of the partial packet in inbuf, when known
    uint64_t last_rx_ms       # when the last complete packet arrived
    uint32_t addr_slot        # max_connections_per_ip: its address's slot + 1 in the shared counts (0: not counted)
    SSL* ssl                  # OpenSSL's, for the handshake (and after it with tls_record_layer = openssl)
    gw_tlsrec* tls            # gw's record layer after a TLS 1.3 handshake (ssl then NULL) (worker/tls_records.pyx)
    char* client_id
    char* username            # JSON-lines clients: NULL for anonymous
    uint8_t* inbuf            # partial packet carried over to the next read
    uint32_t inlen
    uint32_t incap
    uint8_t* outbuf           # bytes waiting for the socket
    uint32_t outoff
    uint32_t outlen
    uint32_t outcap

# HTTP connections' framing state (worker/http.pyx), in a table indexed by fd beside
# the Conn table, so MQTT connections pay nothing for it.
cdef struct HttpState:
    uint32_t scan             # where to resume looking for the end of the head
    uint32_t chunk_off        # chunked body: offset of the next chunk-size line
    uint32_t chunk_total      # chunked body: data bytes so far
    uint32_t trailer_scan     # chunked body: where to resume looking for the end of the trailer section
    uint32_t linger_left      # lingering close: bytes still read and discarded before a reset
    uint16_t flags            # HF_* (worker/http.pyx)
    uint8_t query_minor       # a request in the query threads: its HTTP minor version

cdef struct Listener:
    int fd
    uint8_t proto
    uint8_t ack_sink          # readings acknowledged once durable (worker/durable_ack.pyx)
    SSL_CTX* ctx              # NULL for plain listeners
    uint8_t identity_username # use_identity_as_username: the client certificate's CN is the user name
    uint8_t client_certificate # require_certificate: every client proved who it is in the handshake
    double accept_tokens      # max_conn_rate: connections it may accept now (worker/rate_limits.pyx)
    uint64_t accept_refilled_ms   # when accept_tokens was last refilled (0: never: full)
    uint64_t accept_resume_ms     # accept_paused: when it accepts again
    uint8_t accept_paused     # out of tokens: not in the epoll set for input
    uint8_t ws                # MQTT over WebSocket (ws, wss): an HTTP upgrade first (worker/websocket.pyx)

# MQTT over WebSocket (worker/websocket.pyx): where a connection is, Conn.ws.
cdef enum WsPhase:
    WS_NONE = 0               # not a WebSocket connection
    WS_HANDSHAKE = 1          # waiting for the HTTP upgrade request
    WS_OPEN = 2               # upgraded: MQTT in binary frames both ways
    WS_CLOSED = 3             # a Close frame was sent: nothing more goes out, input is read away

cdef enum:
    WS_HEADER_ROOM = 10       # reserved in the outbound buffer before a binary frame, for its header
    WSF_FRAME_OPEN = 1        # WsState.flags: the outbound buffer ends with a binary frame being filled
    WSF_LINGER = 2            # ... its Close is written, our side shut: input read away until the client closes

# WebSocket connections' state (worker/websocket.pyx), in a table indexed by fd
# beside the Conn table (allocated with the first ws/wss listener): 28 bytes.
cdef struct WsState:
    WsDecoder dec             # the frame decoder between reads (gw_ext/wsframe.pxd)
    uint32_t decoded          # decoded (unmasked) MQTT bytes at the start of the carry-over buffer
    uint32_t frame_at         # WSF_FRAME_OPEN: offset in outbuf of the open frame's header room
    uint16_t scan             # the handshake: where to resume looking for the end of the head
    uint8_t flags             # WSF_*

# A client's rate-limit buckets (worker/rate_limits.pyx), in a table indexed by fd
# beside the Conn table, allocated with the first per-client rate limit.
cdef struct RateBucket:
    double messages           # messages it may still send (negative: owed, it waits longer)
    double bytes              # ... and bytes
    uint64_t refilled_ms      # when they were last refilled (0: never: full)
    uint64_t resume_ms        # F_RATE_PAUSED: when it is read again



# --- messages and sessions (worker/router.pyx, worker/sessions.pyx) ------------------

# A message kept for QoS 1/2 delivery: one allocation per message per worker,
# shared (refcounted) by every session it is in flight or queued for.
# QoS 0 deliveries never make one: they are encoded straight from the
# publisher's read buffer into the subscribers' outbound buffers.
#
# An MQTT 5.0 message's properties travel with it as its "extras" (ext):
# EXT_HEADER bytes (the wall-clock ms its Message Expiry Interval ends at, u64
# LE, 0: never), then the PUBLISH property block as the publisher sent it,
# less what belongs to one hop (Message Expiry Interval, Topic Alias,
# Subscription Identifiers): Payload Format Indicator, Content Type, Response
# Topic, Correlation Data, User Properties, in their order (worker/router.pyx).
# A 3.1.1 message has none (ext_len 0): its path pays one compare.
cdef enum:
    EXT_HEADER = 8            # a message's extras begin with its expiry (u64 wall-clock ms, 0: none)

cdef struct Msg:
    uint32_t refs
    uint32_t topic_len
    uint32_t payload_len
    uint8_t qos               # as published
    uint8_t retain
    uint64_t origin_ns        # CLOCK_MONOTONIC of the loop turn that read the PUBLISH (0: unknown)
    uint8_t* data             # topic, then payload, then the extras (same allocation)
    uint32_t ext_len          # the extras' bytes after the payload (0: a 3.1.1 message, no properties)
    uint32_t share_slot       # a shared group's delivery (worker/shared.pyx): the group's slot here,
    uint32_t share_gen        # ... and its generation (0: not a shared delivery)

cdef struct Inflight:         # an outbound QoS 1/2 message awaiting its ack
    Msg* msg
    uint16_t packet_id
    uint8_t qos               # the QoS it was sent with (after downgrade)
    uint8_t state             # IF_PUBLISHED, IF_RELEASED
    uint8_t retain            # sent with RETAIN=1 (for a new subscription): so it is re-sent (MQTT-3.3.1-8)
    uint8_t held              # not sent again yet on this connection: past the client's window at
                              # resume (Session.nheld; worker/sessions.pyx, session_resume)

cdef enum:
    IF_PUBLISHED = 0          # PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2)
    IF_RELEASED = 1           # PUBREL sent; waiting for PUBCOMP

cdef struct Queued:           # waiting for a free in-flight slot (or for the client to return)
    Msg* msg
    uint8_t qos

# An MQTT 5.0 will held for its Will Delay Interval (worker/will_delay.pyx): its
# own allocation, so the node stays put when the session table grows.
cdef struct WillTimer:
    TimerNode node            # first member: a TimerNode* of the will wheel is its WillTimer*
    int slot                  # the session holding the will

# An MQTT session: subscriptions (in the worker's TopicTrie under this slot
# number), QoS 1/2 state both ways, the will. Lives while its connection does,
# and for clean_session=0 also while the client is away.
cdef struct Session:
    int fd                    # its connection, -1 while the client is away
    uint8_t in_use
    uint8_t clean
    uint8_t will_qos
    uint8_t will_retain
    uint16_t next_packet_id
    uint16_t client_id_len
    uint16_t username_len
    uint16_t pid_clear        # ids from next_packet_id on known not in flight (0: scan; session_packet_id)
    char* client_id
    char* username            # the user it acts as (malloc'ed; NULL: anonymous), freed with client_id
    AclView* acl              # its view of the ACL and its verdict cache (worker/access.pyx); NULL until checked
    Msg* will                 # NULL: no will
    Inflight* inflight        # ninflight entries, in send order
    uint32_t ninflight        # at most max_inflight (<= 65535 packet ids)
    uint32_t inflight_cap
    Queued* queue             # ring
    uint32_t qhead
    uint32_t qlen
    uint32_t qcap
    uint64_t qbytes           # topic and payload bytes of the queued messages (max_queued_bytes)
    uint16_t* qos2_in         # QoS 2 packet ids received, awaiting PUBREL (at most max_awaiting_rel)
    uint32_t nqos2_in
    uint32_t qos2_cap
    uint64_t away_since_ms
    uint64_t last_ack_ms      # last PUBACK/PUBREC/PUBCOMP from its client
    uint8_t congested         # its queue is past the high watermark (worker/backpressure.pyx)
    uint8_t stalled           # stopped acknowledging: holds nobody back until it acks again
    uint8_t dirty             # its saved state (persistence) is out of date, or the slot was freed
    uint8_t version           # the protocol level of its last CONNECT (5: MQTT 5.0)
    uint32_t expiry_s         # MQTT 5.0: Session Expiry Interval, seconds (0xFFFFFFFF: never);
                              # kept while away when not clean (worker/mqtt5.pyx)
    uint32_t nshared          # its shared subscriptions ($share/..., worker/shared.pyx)
    uint32_t nheld            # in-flight entries held (Inflight.held): sent again as the window frees
    uint8_t subids            # one of its subscriptions has had a Subscription Identifier (worker/subopts.pyx)
    uint32_t will_delay_s     # MQTT 5.0: its will's Will Delay Interval, seconds (worker/will_delay.pyx)
    WillTimer* will_timer     # its will held for that delay while the client is away; NULL: none


# --- shared subscriptions (worker/shared.pyx) ------------------------------------------

cdef struct ShareMember:      # a session of this worker in a group
    int slot
    uint8_t qos               # the QoS it was granted
    uint8_t opts              # its subscription options (SUBOPT_RAP: the published RETAIN flag goes out)

# A group ($share/{name}/{filter}) as one worker knows it: its own members, and
# how many every worker has (told by FR_SHARED_COUNT), so the worker a message
# is published on picks one member for it among all of them.
cdef struct ShareGroup:
    uint32_t gen              # 0: the slot is free
    uint32_t rr               # this worker's pick among the workers, weighted by their members
    uint32_t lrr              # its pick among its own members
    uint32_t nlocal
    uint32_t cap
    ShareMember* local
    uint32_t[MAX_PEERS] online    # per worker: members whose client is connected (our own entry: ours)
    uint32_t[MAX_PEERS] total     # per worker: members
    uint32_t[MAX_PEERS] peer_slot # per worker: the group's slot and generation there (FR_SHARED_PUBLISH names it)
    uint32_t[MAX_PEERS] peer_gen


# --- the links between workers (worker/channel.pyx) ----------------------------------

# The link to one other worker: a SOCK_SEQPACKET socket made by the master
# before forking. Frames for it are batched in `out` and sent once per loop
# turn; each send is one datagram of whole frames, so a worker that dies
# mid-write never leaves half a frame for its respawned successor.
cdef struct Peer:
    int fd                    # -1: no such peer
    uint8_t* out
    uint32_t outlen
    uint32_t outcap
    uint8_t blocked           # the socket was full; EPOLLOUT armed
    uint32_t dgram            # largest datagram sent on this link (from its SO_SNDBUF)
    uint32_t piece_sent       # bytes of the frame at the head of `out` already sent in pieces
    uint8_t* asm              # a frame from this peer arriving in pieces (NULL: none)
    uint32_t asm_len
    uint32_t asm_total


# --- answers held until the log is durable (worker/durable_ack.pyx) ------------------

# One request's readings being taken (worker/ingest.pyx).
cdef struct IngestBatch:
    int64_t end               # the log's end offset past them: what an answer in ack mode sink waits for
    int duplicates            # readings seen before: acknowledged, not taken again
    bint pending_here         # one of them is a duplicate of a reading in this worker's log, maybe not durable


cdef struct HeldAck:
    uint64_t needed           # durable offset this answer waits for
    int fd
    uint32_t gen
    uint32_t http_id          # HELD_HTTP: key in Worker.held_http
    uint16_t packet_id
    uint8_t kind              # PUBACK, PUBREC, or HELD_HTTP (a whole HTTP response)


# --- a CONNECT whose session is being settled across workers (worker/registry.pyx) ---

cdef class PendingConnect:
    cdef int fd
    cdef uint32_t gen
    cdef bytes client_id
    cdef bytes username          # the user name it acts as (CONNECT's, or a certificate's), None: anonymous
    cdef uint8_t clean
    cdef uint16_t keepalive
    cdef bytes will_topic
    cdef bytes will_message
    cdef uint8_t will_flag, will_qos, will_retain
    cdef bytes will_ext              # an MQTT 5.0 will's properties as a message's extras (router.pyx); None: none
    cdef uint32_t will_delay         # an MQTT 5.0 will's Will Delay Interval, seconds (worker/will_delay.pyx)
    cdef int prev_owner          # from GRANT: -2 not yet granted, -1 none
    cdef list evictions          # EVICTs that came while it waited: [(claimant, token, clean)], or None
    cdef bytes json_reply        # a JSON-lines Connect (no session): its Connected answer; None: MQTT
    # MQTT 5.0 (worker/mqtt5.pyx); version 3 or 4: 3.1.1 and 3.1, the rest unused.
    cdef uint8_t version
    cdef uint8_t clean_start     # version 5: Clean Start (clean: the session ends with the connection)
    cdef uint32_t session_expiry # version 5: Session Expiry Interval, seconds
    cdef bint assigned_id        # version 5: the server made up its client id (Assigned Client Identifier)
    cdef uint8_t request_problem # version 5: Request Problem Information (1 unless the client said 0)
    cdef uint32_t max_packet_out # version 5: the client's Maximum Packet Size (0: none)


# --- a claim by another user, waiting for the id's owner to say what it holds -------

@cython.final
cdef class ClaimCheck:
    cdef uint32_t check          # the FR_CHECK's number (an answer to an older one is dropped)
    cdef int owner               # the worker asked
    cdef uint64_t deadline_ms    # unanswered by then (the owner hung): refused (3/4 connect_settle_timeout)
    cdef list claims             # (claimant, token, clean, user name): the asking one first, then the
                                 # claims of the id that came meanwhile, in the order they came


# --- a SUBACK waiting for the other workers (worker/handle_subscribe.pyx) ------------

@cython.final
cdef class PendingSuback:
    cdef int fd
    cdef uint32_t gen
    cdef bytes suback                 # the encoded SUBACK
    cdef list retained                # [(filter, granted QoS)] to deliver retained messages for
    cdef uint64_t waiting             # peers that have not answered
    cdef uint64_t deadline_ms


# === the Worker ======================================================================
# Its Python API (set-up, limits, persistence, drain) is defined in loop.pyx;
# `public` fields are the limits gw/worker.py sets and reloads.

@cython.final
cdef class Worker:
    # --- the loop (loop.pyx): epoll, the connection table, the turn --------------------
    cdef int epfd
    cdef Conn* conns
    cdef int nconns                  # size of the table (the process's fd limit)
    cdef Listener[MAX_LISTENERS] listeners
    cdef object listener_contexts    # TLSContext objects kept alive per listener
    cdef int nlisteners
    cdef uint8_t* rbuf               # the read buffer, shared by all connections
    cdef int* dirty                  # fds to flush at the end of this turn
    cdef uint8_t* spare_out[SPARE_OUT]       # emptied outbound buffers (flush), taken by reserve_bytes:
    cdef uint32_t spare_out_cap[SPARE_OUT]   # a busy connection does not malloc and grow one each turn
    cdef int nspare_out
    cdef int ndirty
    cdef int* closed                 # fds closed this turn (ST_CLOSED), freed by reap_closed()
    cdef int nclosed
    cdef int* resume_fds             # connections settled this turn with input waiting (resume_settled)
    cdef uint32_t* resume_gens
    cdef int nresume
    cdef int fresh_fds[256]          # connections accepted this turn, read after the events (read_fresh)
    cdef uint32_t fresh_gens[256]
    cdef int nfresh
    cdef int current_fd              # the connection being handled (-1: none), for containment
    cdef uint64_t now_ms
    cdef uint64_t now_ns             # when this loop turn began (publish-to-deliver latency)
    cdef uint64_t* counters          # this worker's row of the shared stats block
    cdef uint64_t* all_counters      # every row, to enforce the server-wide limit
    cdef int nworkers
    cdef object counters_owner
    cdef int reserve_fd              # spare fd released to shed a connection on EMFILE
    cdef uint32_t conn_gen           # which connection an fd holds (Conn.gen; fds are reused)
    cdef uint64_t[N_CLOSE_REASONS] last_log_ms
    cdef uint64_t[N_CLOSE_REASONS] suppressed
    cdef bint draining
    cdef uint64_t drain_deadline_ms
    cdef bint drain_started
    cdef bint reload_requested
    cdef bint begun                  # begin() ran: HELLO sent to the peers
    cdef public bint stopped
    cdef public bint tls_own_records # tls_record_layer = "gw": new TLS 1.3 connections leave OpenSSL after the handshake
    cdef public object on_reload     # called (no arguments) after SIGHUP
    cdef public object on_tick       # called (no arguments) every tick_ms, when set
    cdef public uint32_t tick_ms
    cdef uint64_t next_tick_ms
    cdef public int worker_index
    cdef public uint64_t max_connections
    cdef public uint32_t max_packet_size
    cdef public uint32_t max_outbound
    cdef public uint32_t soft_outbound   # past this, QoS 0 to that client is dropped

    # set-up and the turn
    cdef void begin(self)
    cdef bint turn(self, int timeout_ms)
    cdef void on_event(self, int fd, uint32_t ev)
    cdef void run_timers(self)
    cdef void flush_all(self)
    cdef void resume_settled(self)
    cdef void resume_later(self, Conn* c)
    cdef void read_fresh(self)
    cdef void call_python(self, object fn)
    cdef void start_drain(self)
    cdef void close_all(self, int reason)
    # accepting
    cdef uint64_t total_connections(self) noexcept
    cdef void accept_from(self, int index)
    # reading and framing (MQTT here; JSON lines and HTTP in their files)
    cdef Py_ssize_t sock_read(self, Conn* c, uint8_t* buf, size_t cap) noexcept
    cdef void on_readable(self, Conn* c)
    cdef int resume_input(self, Conn* c)
    cdef Py_ssize_t process(self, Conn* c, uint8_t* buf, Py_ssize_t n)
    cdef Py_ssize_t process_mqtt(self, Conn* c, uint8_t* buf, Py_ssize_t n)
    cdef void malformed(self, Conn* c, int reason)
    cdef int tls_handshake(self, Conn* c)
    # writing
    cdef uint8_t* reserve(self, Conn* c, uint32_t n)
    cdef uint8_t* reserve_bytes(self, Conn* c, uint32_t n)
    cdef int send_ack(self, Conn* c, uint8_t ptype, uint16_t pid)
    cdef int send_empty(self, Conn* c, uint8_t ptype)
    cdef void flush_dirty(self)
    cdef int flush(self, Conn* c)
    cdef void on_writable(self, Conn* c)
    cdef void set_pollout(self, Conn* c, bint on)
    cdef void update_events(self, Conn* c)
    # closing (ARCHITECTURE.md, "Closing a connection, and when memory is freed")
    cdef void close_after_flush(self, Conn* c, int reason=*, int detail=*)
    cdef void close_conn(self, Conn* c, int reason, int detail=*)
    cdef void close_taken_over(self, Conn* old)
    cdef void reap_closed(self)
    cdef void finish_close(self, Conn* c)
    cdef void release(self, Conn* c)
    cdef void contained(self, int fd, str where)
    cdef void log_limited(self, int reason, str message)
    cdef void log_client(self, int reason, int fd, str message)

    # --- keepalive (worker/keepalive.pyx) ----------------------------------------------
    cdef Wheel wheel                 # every connection's deadline
    cdef Wheel will_wheel            # MQTT 5.0 wills held for their Will Delay Interval (worker/will_delay.pyx)
    cdef public uint32_t max_delayed_wills   # how many this worker holds at most (more go out at once)
    cdef uint32_t ndelayed_wills
    cdef public uint32_t connect_timeout_ms
    cdef public uint32_t settle_timeout_ms   # connect_settle_timeout (worker/registry.pyx)
    cdef public bint connect_at_once         # connect_at_once (worker/registry.pyx)
    cdef public uint32_t json_timeout_ms

    # --- MQTT packets (worker/handle_*.pyx) ---------------------------------------------
    cdef uint64_t auto_id            # server-assigned client ids (handle_connect.pyx)
    cdef public uint32_t max_awaiting_rel    # QoS 2 awaiting PUBREL (handle_publish.pyx)
    cdef public uint32_t max_subscriptions   # (handle_subscribe.pyx)
    cdef public uint32_t max_topic_levels
    cdef public uint32_t max_topic_length
    cdef AclRules acl                # the ACL file in force (worker/access.pyx); None: no ACL, all allowed
    cdef dict pending_subacks        # token -> PendingSuback (handle_subscribe.pyx)
    cdef uint32_t suback_token

    # --- the router (worker/router.pyx) -------------------------------------------------
    cdef TopicTrie* index            # the subscription index, a subscriber id per session slot
    cdef MatchResult match
    cdef int route_depth             # route_publish nesting
    cdef uint32_t route_nolocal      # the publishing session's slot + 1 for the next route_local (No Local), 0: none
    cdef bytes sub5_options          # an MQTT 5.0 SUBSCRIBE's options byte per entry, while handle_subscribe runs
    cdef uint32_t sub5_subid         # ... and its Subscription Identifier (0: none) (worker/subopts.pyx)

    # --- shared subscriptions (worker/shared.pyx) ---------------------------------------
    cdef TopicTrie* share_index      # every group's filter known here; subscriber id: its group slot
    cdef MatchResult share_match
    cdef ShareGroup* groups
    cdef uint32_t ngroups            # slots ever used
    cdef uint32_t groups_cap
    cdef uint32_t group_gen
    cdef dict share_ids              # b"$share/{name}/{filter}" -> group slot
    cdef list share_keys             # group slot -> that key (None: free)
    cdef list free_groups

    # --- retained messages (worker/retained.pyx) ----------------------------------------
    cdef public uint16_t topic_alias_maximum  # MQTT 5.0 Topic Alias Maximum announced in CONNACK (worker/mqtt5.pyx)
    cdef public uint16_t topic_alias_maximum_out  # MQTT 5.0 aliases the server gives a client at most (alias_out_*)
    cdef dict topic_aliases          # fd -> [topic bytes or None] * (maximum + 1): a v5 client's aliases, made on its first
    cdef int alias_fd                # the connection whose table alias_table is (-1: none): a PUBLISH after
    cdef list alias_table            # another of the same read finds it without a dict lookup (topic_alias_in)
    cdef dict retained               # topic (bytes) -> (qos, payload bytes), or (qos, payload, extras) for MQTT 5.0
    cdef uint64_t retained_bytes     # their topics and payloads (max_retained_bytes)
    cdef bint publishing_as_server   # Worker.publish: $SYS retained messages are always kept
    cdef bint retained_changed
    cdef public uint32_t max_retained
    cdef public uint64_t max_retained_bytes

    # --- sessions (worker/sessions.pyx, session_state.pyx) ------------------------------
    cdef Session* sessions
    cdef uint32_t nsessions          # slots ever used
    cdef uint32_t sessions_cap
    cdef int* free_sessions
    cdef uint32_t nfree_sessions
    cdef dict client_sessions        # client id (bytes) -> session slot
    cdef public bint sessions_changed
    cdef list restored               # client ids loaded from disk, to register after HELLO
    cdef public uint32_t max_inflight
    cdef public uint32_t max_queued
    cdef public uint64_t max_queued_bytes

    # --- who may connect (worker/auth.pyx; the policy and the password file: gw/auth.py) --
    cdef public bint allow_anonymous    # a CONNECT without a user name is accepted
    cdef public bint certificate_anonymous  # ... on a listener requiring a client certificate (unless allow_anonymous = false)
    cdef public bint auth_required      # authentication is on: an id held by another user is not taken over
    cdef object authenticator           # gw.auth.Authenticator; None: no password file
    cdef object auth_pool               # gw.query_pool.QueryPool: password checks off the loop
    cdef dict auth_waiting              # auth token -> PendingConnect whose password is being checked
    cdef dict scram_states              # fd -> ScramState: MQTT 5.0 enhanced authentication (worker/enhanced_auth.pyx)
    cdef uint32_t auth_token

    # --- the client-id registry (worker/registry.pyx) -----------------------------------
    cdef dict registry               # at the id's home: client id -> owning worker
    cdef dict registry_users         # ... and the user its session acts as (None: anonymous)
    cdef dict pending                # token -> PendingConnect, waiting to settle
    cdef list settle_orphans         # (token, deadline ms) of those whose connection closed meanwhile
    cdef dict unconfirmed            # client id -> token of our latest CONNECT of it settled at once, its
                                     # home's GRANT not yet back (registry.pyx: an EVICT meanwhile is stale)
    cdef uint32_t settle_token
    cdef dict claim_checks           # at the id's home: client id -> ClaimCheck (its owner asked first)
    cdef list held_checks            # at an owner: FR_CHECKs answered once its connection of the id ended:
                                     # (home, check, claimant, token, client id, deadline ms)
    cdef uint32_t check_number

    # --- the links between workers (worker/channel.pyx) ---------------------------------
    cdef Peer[MAX_PEERS] peers
    cdef int npeers
    cdef uint64_t peers_dirty        # bit p: peer p has frames to send this turn
    cdef uint8_t* chan_buf           # receives datagrams from peers
    cdef size_t chan_buf_size

    # --- backpressure (worker/backpressure.pyx) -----------------------------------------
    cdef set congested               # session slots past the high watermark
    cdef uint64_t peers_congested    # bit p: worker p asked us to hold publishers
    cdef bint publishers_paused
    cdef int* pub_fds                # connections that sent QoS 1/2 (F_PUBLISHER), with their gen: what
    cdef uint32_t* pub_gens          # update_pause walks (stale entries dropped then), not the fd table
    cdef int npub
    cdef int pub_cap
    cdef bint pub_list_lost          # out of memory once: update_pause walks the whole table
    cdef public uint32_t queue_high  # watermarks
    cdef public uint32_t queue_low
    cdef public uint64_t max_sink_lag        # max_sink_lag_bytes: the store's lag on this log that holds ingest (0: none)
    cdef bint store_behind                   # past it, not yet back under 3/4 of it: ingest held
    cdef uint64_t store_check_ms             # when the lag is looked at next

    # --- HTTP (worker/http.pyx, http_queries.pyx) ---------------------------------------
    cdef HttpState* http             # per fd; allocated with the first HTTP listener
    cdef char[40] http_date
    cdef time_t http_date_s
    cdef public object http_app      # gw.http_api.HttpApp: requests
    cdef public uint32_t http_max_body
    cdef public uint32_t http_timeout_ms
    cdef public uint32_t http_keepalive_ms
    cdef public uint32_t http_linger_bytes   # lingering close: bytes read and discarded at most
    cdef public uint32_t http_linger_ms      # ... and for how long
    cdef public int http_current_fd          # the connection whose request HttpApp.handle is answering (its
                                             # refusal log names the client's address); -1 between requests
    cdef object query_pool           # gw.query_pool.QueryPool: store queries off the loop

    # --- JSON lines (worker/jsonlines.pyx) and MQTT telemetry (worker/telemetry.pyx) ---
    cdef object json_protocol        # gw.jsonproto.JsonProtocol
    cdef bytes telemetry_prefix      # b"telemetry/": readings are routed there; MQTT publishes there are validated
    cdef public object ingest        # gw.ingest.Ingest: the schema for MQTT readings (worker/ingest.pyx)

    # --- the write-ahead log, answers held for it (worker/durable_ack.pyx) -------------
    cdef Wal wal
    cdef uint64_t wal_durable
    cdef bint wal_congested          # over half of wal_max_pending waits: publishers held
    cdef HeldAck* held               # ring, in append order
    cdef uint32_t held_head
    cdef uint32_t held_len
    cdef uint32_t held_cap
    cdef uint64_t held_last_needed
    cdef uint32_t* held_per_fd       # answers waiting, per connection
    cdef uint32_t* held_pubacks      # ... of them PUBACKs: QoS 1 PUBLISHes not yet acknowledged (an MQTT 5.0
                                     # client's Receive Maximum quota: handle_publish.pyx)
    cdef dict held_http              # id -> response bytes
    cdef uint32_t held_http_next
    cdef DedupTable dedup            # the idempotency table: its pending records commit when durable

    # --- MQTT over WebSocket (worker/websocket.pyx) -------------------------------------
    cdef WsState* ws_states          # per fd; allocated with the first ws/wss listener
    cdef public bytes ws_path        # the request-target path of the upgrade (ws_path)
    cdef public frozenset ws_allowed_origins   # lowercased Origin values allowed (empty: any)

    # --- rate limits (worker/rate_limits.pyx) -------------------------------------------
    cdef double conn_rate            # max_conn_rate / workers: this worker's share, per listener
    cdef double conn_burst           # max_conn_burst / workers (at least 1)
    cdef int accept_paused           # listeners paused now
    cdef uint64_t accept_next_ms     # the earliest of their resume times
    cdef double msg_rate             # max_messages_rate (0: none)
    cdef double msg_burst
    cdef double byte_rate            # max_bytes_rate (0: none)
    cdef double byte_burst
    cdef RateBucket* rates           # per fd; NULL until a per-client rate is set
    cdef uint32_t batch_messages     # counted by the framing during one process() call, charged after it
    cdef uint64_t batch_bytes
    cdef uint32_t msg_allowance      # what the buckets allow this batch: the framing stops there
    cdef uint64_t byte_allowance
    cdef bint rate_stopped           # ... and it did: the rest waits in the carry-over buffer
    cdef int* rate_paused_fds        # connections paused by a rate (stale entries dropped when seen)
    cdef uint32_t* rate_paused_gens
    cdef int nrate_paused
    cdef uint64_t rate_next_ms       # the earliest resume time among them
    cdef AddressCounts addr_counts   # max_connections_per_ip: the shared counts (None: not counted)
    cdef uint32_t max_per_ip         # 0: unlimited
    cdef uint64_t[256] addr_log_ms   # per address slot (mod 256): when a refusal was last logged


# === module-level functions, by file ==================================================

# --- loop.pyx ------------------------------------------------------------------------
cdef uint64_t monotonic_ms() noexcept nogil
cdef uint64_t monotonic_ns() noexcept nogil


cdef inline void mark_dirty(Worker w, Conn* c) noexcept:
    """c is flushed at the end of this turn (Worker.flush_dirty): put on the
    flush list once."""
    if not (c.flags & F_DIRTY):
        c.flags |= F_DIRTY
        w.dirty[w.ndirty] = c.fd
        w.ndirty += 1

# --- worker/tls_records.pyx: gw's TLS 1.3 record layer after OpenSSL's handshake -------
cdef void tls_attach(Worker w, Conn* c) noexcept
cdef int tls_handshake_flush(Conn* c) noexcept
cdef void tls_handshake_failed(Conn* c) noexcept
cdef int tls_take_over(Worker w, Conn* c) noexcept
cdef Py_ssize_t tls_read(Worker w, Conn* c, uint8_t* buf, size_t cap) noexcept
cdef bint tls_pending(Conn* c) noexcept
cdef int tls_flush(Worker w, Conn* c) noexcept
cdef void tls_close_notify(Conn* c) noexcept
cdef void tls_release(Conn* c) noexcept

# --- worker/keepalive.pyx: every deadline of a connection ------------------------------
cdef uint32_t mqtt_idle_limit_ms(uint16_t keepalive) noexcept nogil     # 1.5 x keepalive
cdef void become_connected(Worker w, Conn* c, uint32_t timeout_ms)
cdef void schedule_connect_timeout(Worker w, Conn* c) noexcept
cdef void schedule_settle_timeout(Worker w, Conn* c) noexcept
cdef void schedule_close_grace(Worker w, Conn* c) noexcept
cdef void on_timer(Worker w, Conn* c)

# --- worker/rate_limits.pyx: connection, message and byte rates; connections per address -
cdef uint64_t refill_wait_ms(double deficit, double rate) noexcept nogil
cdef bint accept_allowed(Worker w, Listener* l)
cdef void accept_resume_due(Worker w)
cdef int address_admit(Worker w, const void* sa, unsigned salen, uint32_t* counted)
cdef str peer_address_text(const uint8_t* sa, unsigned salen)
cdef void address_release(Worker w, Conn* c) noexcept
cdef void rate_bucket_reset(Worker w, int fd) noexcept
cdef void rate_refill(Worker w, RateBucket* b) noexcept
cdef uint64_t rate_wait_ms(Worker w, RateBucket* b) noexcept
cdef void rate_allowance(Worker w, Conn* c) noexcept
cdef void rate_charge(Worker w, Conn* c)
cdef void rate_pause_log(Worker w, Conn* c, int reason) except *
cdef void listener_pause_log(Worker w, Listener* l) except *
cdef str listener_text(Listener* l)
cdef void rate_paused_compact(Worker w) noexcept
cdef void rate_resume_due(Worker w)
cdef void rate_forget(Worker w, Conn* c) noexcept
cdef bint rate_hold_timer(Worker w, Conn* c) noexcept

# --- worker/read_handle.pyx: one complete MQTT packet to its handler -------------------
cdef int handle_packet(Worker w, Conn* c, uint8_t first, const uint8_t* body, uint32_t n)

# --- worker/handle_connect.pyx ----------------------------------------------------------
cdef int handle_connect(Worker w, Conn* c, const uint8_t* body, uint32_t n)
cdef int refuse_connect(Worker w, Conn* c, uint8_t return_code)

# --- worker/mqtt5.pyx: MQTT 5.0 connections (framing, dispatch, answers, DISCONNECT) ----
cdef enum:
    # Conn.close_detail of a v5 connection closed by v5_error: DETAIL_R5 + the
    # R5_* reason (DETAIL_R5 alone: found by the handlers), + DETAIL_PROTOCOL
    # for a Protocol Error; below DETAIL_R5 the details are codec.pxd's MAL_*.
    DETAIL_R5 = 0x40
    DETAIL_PROTOCOL = 0x20
cdef str r5_close_text(int detail)
cdef Py_ssize_t process_mqtt5(Worker w, Conn* c, uint8_t* buf, Py_ssize_t n)
cdef int handle_packet5(Worker w, Conn* c, uint8_t first, const uint8_t* body, uint32_t n)
cdef int handle_connect5(Worker w, Conn* c, const uint8_t* body, uint32_t n)
cdef int refuse_connect5(Worker w, Conn* c, uint8_t reason_code, int bad_reason)
cdef uint8_t connack_code5(uint8_t code311) noexcept nogil
cdef int send_connack5(Worker w, Conn* c, PendingConnect pc, uint8_t present)
cdef void v5_error(Worker w, Conn* c, int rc, int reason)
cdef bint v5_goodbye(Worker w, Conn* c, int reason, int detail)
cdef int send_disconnect5(Worker w, Conn* c, uint8_t reason_code)
cdef int send_ack5(Worker w, Conn* c, uint8_t ptype, uint16_t pid, uint8_t reason_code)
cdef const char* reason_text5(uint8_t reason_code) noexcept nogil
cdef uint32_t put_reason5(Conn* c, uint8_t* props, uint8_t reason_code, uint32_t packet_size, bint any_packet) noexcept nogil
cdef int handle_publish5(Worker w, Conn* c, uint8_t first, const uint8_t* body, uint32_t n)
cdef int topic_alias_in(Worker w, Conn* c, Publish5Packet* p5) except -2
cdef int handle_ack5(Worker w, Conn* c, uint8_t ptype, const uint8_t* body, uint32_t n)
cdef int handle_subscribe5(Worker w, Conn* c, const uint8_t* body, uint32_t n)
cdef int handle_unsubscribe5(Worker w, Conn* c, const uint8_t* body, uint32_t n)
cdef int unsubscribe5_answer(Worker w, Conn* c, const uint8_t* body, uint32_t n)
cdef int handle_disconnect5(Worker w, Conn* c, const uint8_t* body, uint32_t n)
cdef bytes suback5_bytes(uint16_t pid, const uint8_t* codes, uint32_t count)
cdef int send_codes5(Worker w, Conn* c, uint8_t ptype, uint16_t pid, const uint8_t* codes, uint32_t count)
cdef uint32_t encoded_publish_size(Conn* c, uint32_t topic_len, uint32_t payload_len, uint8_t qos) noexcept nogil
cdef enum:
    ALIAS_PICK_NEW = 0x10000  # Conn.alias_pick: the alias is given now (the topic goes with it)
    ALIAS_OUT_TOPIC_MAX = 512 # a longer topic gets no alias (bounds a connection's table: alias_max_out x this)
cdef uint64_t alias_hash(const uint8_t* topic, uint32_t n) noexcept nogil
cdef void alias_out_pick(Conn* c, const uint8_t* topic, uint32_t topic_len) noexcept nogil
cdef uint32_t alias_topic_len(Conn* c, uint32_t topic_len) noexcept nogil
cdef uint32_t alias_prop_len(Conn* c) noexcept nogil
cdef uint32_t alias_prop_put(Conn* c, uint8_t* out) noexcept nogil
cdef void alias_out_sent(Worker w, Conn* c, const uint8_t* topic, uint32_t topic_len) noexcept
cdef void alias_out_free(Conn* c) noexcept nogil
cdef void encode_publish_for(Conn* c, uint8_t* out, const uint8_t* topic, uint32_t topic_len,
                             const uint8_t* payload, uint32_t payload_len, uint8_t qos, uint8_t retain,
                             uint8_t dup, uint16_t packet_id) noexcept nogil

# --- worker/handle_publish.pyx ----------------------------------------------------------
cdef int handle_publish(Worker w, Conn* c, uint8_t first, const uint8_t* body, uint32_t n)
cdef int publish_decoded(Worker w, Conn* c, PublishPacket* pkt, const uint8_t* ext, uint32_t ext_len)

# --- worker/handle_acks.pyx: PUBACK, PUBREC, PUBREL, PUBCOMP ---------------------------
cdef int handle_ack(Worker w, Conn* c, uint8_t ptype, const uint8_t* body, uint32_t n)
cdef int session_acked(Worker w, Session* s, uint8_t ptype, uint16_t pid)

# --- worker/handle_subscribe.pyx: SUBSCRIBE, the SUBACK after every peer confirmed ------
cdef uint32_t subscriber_count(Worker w, int slot) noexcept
cdef bint filter_within_bounds(Worker w, const uint8_t* f, uint32_t n)
cdef int handle_subscribe(Worker w, Conn* c, const uint8_t* body, uint32_t n)
cdef bint subsync_start(Worker w, Conn* c, const uint8_t* body, uint32_t n, uint8_t* codes, uint32_t count,
                        uint16_t packet_id, bint new_interest, const uint8_t* noret)
cdef void subsync_answer(Worker w, int p, const uint8_t* body, uint32_t n)          # FR_SUB_SYNC
cdef void subsync_confirmed(Worker w, int p, const uint8_t* body, uint32_t n)       # FR_SUB_SYNCED
cdef void subsync_peer_restarted(Worker w, int p)
cdef bint subsync_earlier_waiting(Worker w, PendingSuback pending, uint32_t token)
cdef void subsync_release(Worker w)

# --- worker/access.pyx: the ACL enforced (publish, subscribe, delivery, wills, $SYS) ---------
cdef bint is_sys_topic(const uint8_t* topic, uint32_t n) noexcept nogil
cdef bint session_may(Worker w, Session* s, const uint8_t* topic, uint32_t n, uint8_t access) except -1
cdef bint may_deliver(Worker w, Session* s, const uint8_t* topic, uint32_t n) except -1
cdef bint publish_refused(Worker w, Conn* c, Session* s, const uint8_t* topic, uint32_t n) except -1
cdef bint may_subscribe(Worker w, Conn* c, Session* s, const uint8_t* f, uint32_t n) except -1
cdef bint will_allowed(Worker w, Session* s) except -1

# --- worker/handle_unsubscribe.pyx ------------------------------------------------------
cdef int handle_unsubscribe(Worker w, Conn* c, const uint8_t* body, uint32_t n)

# --- worker/handle_ping.pyx -------------------------------------------------------------
cdef int handle_ping(Worker w, Conn* c)

# --- worker/handle_disconnect.pyx -------------------------------------------------------
cdef int handle_disconnect(Worker w, Conn* c)

# --- worker/router.pyx: who gets a PUBLISH; refcounted messages ------------------------
cdef Msg* msg_new(const uint8_t* topic, uint32_t topic_len, const uint8_t* payload, uint32_t payload_len,
                  uint8_t qos, uint8_t retain) noexcept nogil
cdef Msg* msg_new_ext(const uint8_t* topic, uint32_t topic_len, const uint8_t* payload, uint32_t payload_len,
                      const uint8_t* ext, uint32_t ext_len, uint8_t qos, uint8_t retain) noexcept nogil
cdef void msg_release(Msg* m) noexcept nogil
cdef uint64_t realtime_ms() noexcept nogil
cdef uint64_t ext_expire_ms(const uint8_t* ext, uint32_t ext_len) noexcept nogil
cdef bint ext_expired(Worker w, const uint8_t* ext, uint32_t ext_len) noexcept
cdef int ext_props_size(const uint8_t* ext, uint32_t ext_len, uint64_t now_ms, uint32_t* expiry) noexcept nogil
cdef bytes ext_from_props(const uint8_t* props, uint32_t props_len, uint32_t message_expiry, bint has_expiry,
                          uint64_t now_ms)
cdef bint conn_v5(Conn* c) noexcept nogil
cdef void too_large_for(Worker w, Conn* c) noexcept
cdef uint32_t publish_out_size(Conn* c, uint32_t topic_len, uint32_t payload_len, const uint8_t* ext,
                               uint32_t ext_len, uint8_t qos, uint64_t now_ms) noexcept nogil
cdef void publish_out_encode(Conn* c, uint8_t* out, const uint8_t* topic, uint32_t topic_len,
                             const uint8_t* payload, uint32_t payload_len, const uint8_t* ext, uint32_t ext_len,
                             uint8_t qos, uint8_t retain, uint8_t dup, uint16_t packet_id,
                             uint64_t now_ms) noexcept nogil
cdef void route_publish(Worker w, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                        uint32_t payload_len, uint8_t qos, uint8_t retain, bint forward, uint64_t origin_ns,
                        const uint8_t* ext, uint32_t ext_len)
cdef uint64_t route_local(Worker w, MatchResult* match, const uint8_t* topic, uint32_t topic_len,
                          const uint8_t* payload, uint32_t payload_len, uint8_t qos, uint8_t retain,
                          bint forward, uint64_t origin_ns, const uint8_t* ext, uint32_t ext_len) except? 0
cdef void route_forward(Worker w, uint64_t peers, const uint8_t* topic, uint32_t topic_len,
                        const uint8_t* payload, uint32_t payload_len, uint8_t qos, uint8_t retain,
                        uint64_t origin_ns, const uint8_t* ext, uint32_t ext_len)
cdef void deliver_qos0(Worker w, Session* s, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                       uint32_t payload_len, uint8_t retain, const uint8_t* ext, uint32_t ext_len)
cdef void deliver_msg(Worker w, Session* s, Msg* msg, uint8_t qos, uint8_t retain)

# --- worker/subopts.pyx: MQTT 5.0 subscription options, Subscription Identifiers -------
cdef void subids_prepare(Worker w, Conn* c, const uint8_t* topic, uint32_t topic_len) noexcept
cdef int subids_compute(Worker w, Conn* c, const uint8_t* topic, uint32_t topic_len) noexcept
cdef void subids_clear() noexcept nogil
cdef uint32_t subid_props_size() noexcept nogil
cdef uint32_t subid_props_put(uint8_t* out) noexcept nogil
cdef uint8_t subopts_of(uint8_t options) noexcept nogil

# --- worker/retained.pyx: keep, clear, bounds, deliver on subscribe, sync to a peer ----
cdef void retain_publish(Worker w, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                         uint32_t payload_len, uint8_t qos, bint forward, const uint8_t* ext, uint32_t ext_len)
cdef bint retain_loaded(Worker w, bytes topic, int qos, bytes payload, bytes ext) except? False
cdef bint retain_store(Worker w, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                       uint32_t payload_len, uint8_t qos, bint enforce, const uint8_t* ext,
                       uint32_t ext_len) except? False
cdef void retain_frame_to(Worker w, int p, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                          uint32_t payload_len, uint8_t qos, const uint8_t* ext, uint32_t ext_len)
cdef void retain_sync_to(Worker w, int p)
cdef void retain_deliver(Worker w, Session* s, const uint8_t* filt, uint32_t flen, uint8_t granted)

# --- worker/sessions.pyx: slots, in-flight windows, queues, resume, wills --------------
cdef int session_new(Worker w, const uint8_t* client_id, uint32_t n, uint8_t clean)
cdef void session_changed(Worker w, Session* s)
cdef int session_set_username(Session* s, bytes username) except -1
cdef object session_username(Session* s)
cdef void forget_filter(void* ctx, const uint8_t* topic_filter, uint32_t n, uint8_t qos) noexcept nogil
cdef void session_free(Worker w, int slot, bint release_id, bint redeliver=*)
cdef void session_detach(Worker w, Conn* c, bint graceful, bint release_id=*)
cdef void will_expiry_starts(Msg* will) noexcept nogil
cdef uint16_t session_packet_id(Session* s) noexcept nogil
cdef int inflight_grow(Session* s) noexcept nogil
cdef int session_queue_grow(Session* s) noexcept nogil
cdef bint session_online(Worker w, Session* s) noexcept
cdef void session_send(Worker w, Session* s, Msg* msg, uint8_t qos, uint8_t retain)
cdef uint32_t session_window(Worker w, Session* s) noexcept
cdef bint msg_too_large(Worker w, Conn* c, Msg* msg, uint8_t qos) noexcept
cdef void session_send_held(Worker w, Session* s)
cdef uint8_t* msg_out(Worker w, Conn* c, Msg* msg, uint8_t qos, uint8_t retain, uint8_t dup, uint16_t packet_id)
cdef void session_pump(Worker w, Session* s)
cdef void session_resume(Worker w, Session* s)
cdef bint qos2_seen(Session* s, uint16_t pid) noexcept nogil
cdef int qos2_remember(Session* s, uint16_t pid) noexcept nogil
cdef bint qos2_forget(Session* s, uint16_t pid) noexcept nogil
cdef int sessions_expire(Worker w, uint64_t limit_ms)

# --- worker/shared.pyx: shared subscriptions, one member per message across workers -----
cdef bint is_share(const uint8_t* f, uint32_t n) noexcept nogil
cdef int share_split(const uint8_t* f, uint32_t n) noexcept nogil
cdef int shared_group(Worker w, bytes key, uint32_t off, bint create) except -2
cdef void shared_maybe_free(Worker w, int gid)
cdef bint shared_refresh(Worker w, int gid) except -1
cdef void shared_count_to(Worker w, int p, int gid)
cdef int shared_join(Worker w, int slot, const uint8_t* f, uint32_t n, uint32_t off, uint8_t qos,
                     uint8_t opts) except -3
cdef bint shared_leave(Worker w, int slot, const uint8_t* f, uint32_t n) except -1
cdef list shared_filters(Worker w, int slot)
cdef void shared_session_changed(Worker w, int slot) except *
cdef void shared_session_end(Worker w, int slot, bint redeliver) except *
cdef int shared_pick_worker(Worker w, ShareGroup* g, int exclude) noexcept
cdef bint shared_deliver_local(Worker w, int gid, const uint8_t* topic, uint32_t tlen, const uint8_t* payload,
                               uint32_t plen, uint8_t qos, uint8_t retain, uint64_t origin_ns, Msg* msg,
                               bint online_only, const uint8_t* ext, uint32_t ext_len) except -1
cdef void shared_forward(Worker w, int gid, int p, const uint8_t* topic, uint32_t tlen, const uint8_t* payload,
                         uint32_t plen, uint8_t qos, uint8_t retain, uint64_t origin_ns, uint32_t hops,
                         const uint8_t* ext, uint32_t ext_len)
cdef void shared_dispatch(Worker w, int gid, const uint8_t* topic, uint32_t tlen, const uint8_t* payload,
                          uint32_t plen, uint8_t qos, uint8_t retain, uint64_t origin_ns, Msg* msg,
                          uint32_t hops, bint pick_worker, const uint8_t* ext, uint32_t ext_len) except *
cdef void route_shared(Worker w, const uint8_t* topic, uint32_t tlen, const uint8_t* payload, uint32_t plen,
                       uint8_t qos, uint8_t retain, uint64_t origin_ns, const uint8_t* ext,
                       uint32_t ext_len) except *
cdef void shared_frame(Worker w, int p, uint8_t ftype, uint8_t flags, const uint8_t* body, uint32_t n,
                       uint32_t topic_len) except *
cdef void shared_peer_restarted(Worker w, int p) except *
cdef void shared_hello(Worker w, int p)
cdef void shared_free_all(Worker w)

# --- worker/will_delay.pyx: MQTT 5.0 wills held for their Will Delay Interval ---------
cdef void will_publish(Worker w, Session* s)
cdef bint will_delay_start(Worker w, int slot) except -1
cdef void will_delay_cancel(Worker w, Session* s)
cdef void will_delay_end(Worker w, int slot, int counter)
cdef void wills_delayed_due(Worker w)
cdef void wills_delayed_flush(Worker w)

# --- worker/session_state.pyx: a session as bytes (moving it, the data dir) -----------
cdef void collect_sub(void* ctx, const uint8_t* topic_filter, uint32_t n, uint8_t qos) noexcept nogil
cdef bytes session_serialize(Worker w, int slot)
cdef uint32_t rd16(const uint8_t* p) noexcept nogil
cdef uint32_t rd32(const uint8_t* p) noexcept nogil
cdef int session_restore(Worker w, int slot, bytes state) except -2
cdef int session_restore_fault(Worker w, str what) except -2
cdef list sessions_snapshot(Worker w, bint changed_only)
cdef void sessions_load(Worker w, list saved) except *

# --- worker/auth.pyx: anonymous access, passwords checked off the loop, refusals -------
cdef int auth_connect(Worker w, Conn* c, PendingConnect pc, const uint8_t* password, uint32_t password_len,
                      bint has_password)
cdef void auth_readable(Worker w)
cdef void auth_refuse(Worker w, Conn* c, uint8_t code, int why)
cdef void auth_log(Worker w, int why, int fd, str message)

# --- worker/registry.pyx: client ids across workers, claims, takeover, CONNACK ---------
cdef int home_of(Worker w, bytes client_id)
cdef void send_small(Worker w, int p, uint8_t ftype, bytes head, bytes client_id)
cdef int connect_claim(Worker w, Conn* c, PendingConnect pc)
cdef bytes user_field(bytes username)
cdef object read_user_field(bytes data, Py_ssize_t at)
cdef void registry_claim(Worker w, int claimant, uint32_t token, uint8_t clean, bytes client_id,
                         object username)
cdef void registry_decide(Worker w, int claimant, uint32_t token, uint8_t clean, bytes client_id,
                          object username, int held)
cdef void registry_recheck(Worker w, bytes client_id, int held)
cdef int hold_state(Worker w, bytes client_id, int claimant, uint32_t token)
cdef void registry_check(Worker w, int home, uint32_t check, int claimant, uint32_t token, bytes client_id)
cdef void check_answer(Worker w, int home, uint32_t check, int held, bytes client_id)
cdef void on_checked(Worker w, uint32_t check, int held, bytes client_id)
cdef void registry_checks_due(Worker w)
cdef void deliver_grant(Worker w, int claimant, uint32_t token, int prev, bytes client_id)
cdef void on_grant(Worker w, uint32_t token, int prev)
cdef PendingConnect granted_pending(Worker w, bytes client_id, PendingConnect exclude)
cdef void registry_evict(Worker w, int claimant, uint32_t token, uint8_t clean, bytes client_id)
cdef void registry_hand_over(Worker w, int claimant, uint32_t token, uint8_t clean, bytes client_id)
cdef void on_session(Worker w, uint32_t token, uint8_t present, bytes state)
cdef bint settling_here(Worker w, bytes client_id)
cdef void session_came_late(Worker w)
cdef void settle_orphans_due(Worker w)
cdef void registry_release(Worker w, bytes client_id)
cdef void registry_register(Worker w, bytes client_id)
cdef void registry_register_restored(Worker w)
cdef void registry_peer_restarted(Worker w, int p)
cdef bint is_worker(Worker w, int p) noexcept
cdef void registry_frame(Worker w, int p, uint8_t ftype, const uint8_t* body, uint32_t n)
cdef void connect_settle(Worker w, uint32_t token, object state)
cdef void connect_settle_here(Worker w, uint32_t token, object state)

# --- worker/channel.pyx: frames to and from the other workers (gw_ext/frames.pxd) -----
cdef uint32_t channel_datagram_size(int fd) noexcept
cdef uint8_t* channel_frame(Worker w, int p, uint8_t ftype, uint8_t flags, uint32_t topic_len,
                            uint32_t body_len)
cdef void channel_broadcast(Worker w, uint8_t ftype, uint8_t flags, const uint8_t* topic, uint32_t topic_len,
                            const uint8_t* rest, uint32_t rest_len)
cdef void channels_flush(Worker w)
cdef void channel_send(Worker w, int p)
cdef int channel_send_pieces(Worker w, int p, uint32_t pos, uint32_t flen)
cdef void channel_pollout(Worker w, int p, bint on)
cdef void channel_writable(Worker w, int p)
cdef void channel_readable(Worker w, int p)
cdef void channel_malformed(Worker w, int p, str why)
cdef void channel_drop_pieces(Worker w, int p)
cdef void channel_datagram(Worker w, int p, const uint8_t* buf, ssize_t n)
cdef void channel_piece(Worker w, int p, uint8_t flags, const uint8_t* piece, uint32_t k)
cdef int frame_ext(const uint8_t* body, uint32_t body_len, uint64_t fixed, uint8_t flags,
                   uint32_t* ext_len) noexcept nogil
cdef void channel_frames(Worker w, int p, const uint8_t* buf, ssize_t n)   # dispatch to each type's owner
cdef void announce_filter(void* ctx, const uint8_t* topic_filter, uint32_t n, uint8_t qos) noexcept nogil
cdef void channels_hello(Worker w)
cdef void peer_restarted(Worker w, int p)

# --- worker/backpressure.pyx: holding QoS 1/2 publishers while a subscriber catches up --
cdef void congest(Worker w, Session* s)
cdef void uncongest(Worker w, Session* s)
cdef void peer_congestion(Worker w, int p, bint on)
cdef void congestion_check(Worker w)
cdef void update_pause(Worker w)
cdef void pause_conn(Worker w, Conn* c)
cdef void store_lag_check(Worker w)
cdef void store_hold(Worker w, Conn* c)
cdef void store_hold_all(Worker w)
cdef void store_release(Worker w)
cdef bint store_hold_timer(Worker w, Conn* c) noexcept

# --- worker/jsonlines.pyx: newline framing, one call per line into gw/jsonproto.py -----
cdef Py_ssize_t process_json_lines(Worker w, Conn* c, uint8_t* buf, Py_ssize_t n)
cdef int json_reading(Worker w, bytes client_id, bytes reading)
cdef int handle_json_line(Worker w, Conn* c, const uint8_t* line, Py_ssize_t n)
cdef int json_write(Worker w, Conn* c, bytes reply)
cdef int json_connect(Worker w, Conn* c, bytes client_id, bytes reply, object credentials)
cdef int json_connected(Worker w, Conn* c, PendingConnect pc)
cdef void json_auth_refuse(Worker w, Conn* c, int why)
cdef bint json_may_publish(Worker w, Conn* c) except -1
cdef void json_publish_refused(Worker w, Conn* c)

# --- worker/http.pyx: HTTP/1.1 framing, answers, timers, lingering close ---------------
cdef bint is_tchar(uint8_t ch) noexcept nogil
cdef bint name_is(const uint8_t* p, Py_ssize_t n, const char* lower, Py_ssize_t ln) noexcept nogil
cdef bint has_token(const uint8_t* p, Py_ssize_t n, const char* lower, Py_ssize_t ln) noexcept nogil
cdef const char* http_reason(int status) noexcept nogil
cdef Py_ssize_t process_http(Worker w, Conn* c, uint8_t* buf, Py_ssize_t n)
cdef Py_ssize_t http_request(Worker w, Conn* c, uint8_t* p, Py_ssize_t avail)
cdef Py_ssize_t http_chunked(Worker w, Conn* c, const uint8_t* b, Py_ssize_t avail, Py_ssize_t head_len,
                             Py_ssize_t* body_len)
cdef Py_ssize_t http_chunked_limit(Worker w) noexcept
cdef bytes http_dechunk(const uint8_t* b, Py_ssize_t total, Py_ssize_t body_len)
cdef void http_continue(Worker w, Conn* c)
cdef Py_ssize_t http_dispatch(Worker w, Conn* c, const uint8_t* p, Py_ssize_t method_len,
                              Py_ssize_t target_start, Py_ssize_t target_len, int minor,
                              bint conn_close, bint conn_keep, const uint8_t* ctype, Py_ssize_t ctype_len,
                              const uint8_t* auth, Py_ssize_t auth_len,
                              const uint8_t* body, Py_ssize_t total, Py_ssize_t body_len, bint chunked,
                              Py_ssize_t request_len, bint accept_gzip)
cdef int http_check_early(Worker w, Conn* c, const uint8_t* p, Py_ssize_t target_start, Py_ssize_t target_len,
                          const uint8_t* auth, Py_ssize_t auth_len)
cdef object http_handler_failed(Worker w)
cdef int http_answer(Worker w, Conn* c, object answer, int64_t needed, bint keep, int minor, bint head_only)
cdef int http_write(Worker w, Conn* c, int status, bytes ctype, bytes body, bytes extra, bint keep,
                    int minor, bint head_only)
cdef bytes http_response_bytes(Worker w, int status, bytes ctype, bytes body, bytes extra, bint keep, int minor,
                               bint head_only)
cdef void http_update_date(Worker w)
cdef int http_fail(Worker w, Conn* c, int status, str code, str message)
cdef void http_on_timer(Worker w, Conn* c)
cdef bint http_linger_start(Worker w, Conn* c)
cdef Py_ssize_t http_linger_input(Worker w, Conn* c, Py_ssize_t n)
cdef void http_start_drain(Worker w, Conn* c)

# --- worker/http_queries.pyx: store queries answered by the query threads --------------
cdef object http_query_token(Conn* c)
cdef void query_readable(Worker w)
cdef void query_answered(Worker w, object token, object answer) except *

# --- worker/ingest.pyx: an accepted reading, whatever the transport -------------------
cdef int ingest_reading(Worker w, bytes device, object seq, bytes reading, bint idempotent, bint sink,
                        bint room_checked, int route_qos, IngestBatch* b) except -3
cdef void ingest_route(Worker w, bytes device, bytes reading, uint8_t qos) except *
cdef int ingest_records(Worker w, list records, bint sink, IngestBatch* b) except -3
cdef object http_ingest(Worker w, object accepted, bint sink, int64_t* needed)

# --- worker/telemetry.pyx: MQTT readings through the ingest schema ---------------------
cdef bint is_telemetry_topic(Worker w, const uint8_t* topic, uint32_t n) noexcept
cdef bytes telemetry_accept(Worker w, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                           uint32_t payload_len, int64_t* end)

# --- worker/durable_ack.pyx: readings into the log, answers held until it is durable ---
cdef int held_push(Worker w, Conn* c, uint8_t kind, uint16_t pid, uint64_t needed, bytes http)
cdef bint must_hold(Worker w, Conn* c, uint64_t needed) noexcept
cdef int ack_after_durable(Worker w, Conn* c, uint8_t ptype, uint16_t pid, uint64_t needed)
cdef void held_release(Worker w)
cdef void wal_readable(Worker w)
cdef void wal_drain(Worker w)
cdef bint wal_room(Worker w, int nbytes) except? False
cdef int64_t wal_append(Worker w, const uint8_t* p, uint32_t n, bint room_checked=*)

# --- worker/websocket.pyx: MQTT over WebSocket (the upgrade, frames both ways) ---------
cdef Py_ssize_t process_ws(Worker w, Conn* c, uint8_t* buf, Py_ssize_t n)
cdef Py_ssize_t ws_handshake(Worker w, Conn* c, uint8_t* p, Py_ssize_t avail)
cdef Py_ssize_t ws_refuse(Worker w, Conn* c, int status, str why)
cdef uint8_t* ws_reserve(Worker w, Conn* c, uint32_t n)
cdef void ws_seal(Worker w, Conn* c) noexcept
cdef bint ws_linger_start(Worker w, Conn* c)
cdef int ws_control(Worker w, Conn* c, uint8_t opcode, const uint8_t* payload, uint32_t n)
cdef void ws_send_close(Worker w, Conn* c, uint16_t code)
cdef void ws_terminal(Worker w, Conn* c, uint8_t event, uint16_t code, bint has_code)
