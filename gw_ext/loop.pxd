# The worker's epoll loop and its per-connection state.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from gw_ext.openssl cimport SSL, SSL_CTX
from gw_ext.wheel cimport TimerNode, Wheel

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

cdef enum Proto:
    PROTO_MQTT = 1
    PROTO_JSON = 2            # seed 000's newline-delimited JSON
    PROTO_HTTP = 3            # HTTP/1.1: ingest API, health, metrics (worker/http.pyx)

cdef enum ConnFlag:
    F_TLS = 1
    F_DIRTY = 2               # on the flush list for this loop turn
    F_POLLOUT = 4             # EPOLLOUT registered (a write would block)
    F_SSL_WRITE_WANTS_READ = 8
    F_PUBLISHER = 16          # has sent QoS 1/2 PUBLISH: paused under backpressure
    F_PAUSED = 32             # not read, for backpressure (worker/backpressure.pyx)
    F_HELD_FULL = 64          # not read: HELD_MAX_PER_CONN answers wait for the log (worker/durable_ack.pyx)

cdef enum:
    MAX_LISTENERS = 16

# One per file descriptor, in a table indexed by fd: the whole state of an
# idle connection is this struct (about 120 bytes), plus its client id and,
# for TLS, OpenSSL's SSL object. Buffers exist only while bytes are pending.
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
    uint16_t keepalive        # seconds, from CONNECT
    uint16_t client_id_len    # JSON-lines clients (MQTT ids live in the Session)
    int session               # MQTT session slot, -1 before CONNECT
    uint32_t gen              # which connection this is (fds are reused)
    uint32_t pending_token    # ST_SETTLING: the claim it waits for
    uint32_t timeout_ms       # idle limit after CONNECT (0: none)
    uint32_t need             # size of the partial packet in inbuf, when known
    uint64_t last_rx_ms       # when the last complete packet arrived
    SSL* ssl
    char* client_id
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


# A message kept for QoS 1/2 delivery: one allocation per message per worker,
# shared (refcounted) by every session it is in flight or queued for.
# QoS 0 deliveries never make one: they are encoded straight from the
# publisher's read buffer into the subscribers' outbound buffers.
cdef struct Msg:
    uint32_t refs
    uint32_t topic_len
    uint32_t payload_len
    uint8_t qos               # as published
    uint8_t retain
    uint64_t origin_ns        # CLOCK_MONOTONIC of the loop turn that read the PUBLISH (0: unknown)
    uint8_t* data             # topic, then payload (same allocation)

cdef struct Inflight:         # an outbound QoS 1/2 message awaiting its ack
    Msg* msg
    uint16_t packet_id
    uint8_t qos               # the QoS it was sent with (after downgrade)
    uint8_t state             # IF_PUBLISHED, IF_RELEASED
    uint8_t retain            # sent with RETAIN=1 (for a new subscription): so it is re-sent (MQTT-3.3.1-8)

cdef enum:
    IF_PUBLISHED = 0          # PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2)
    IF_RELEASED = 1           # PUBREL sent; waiting for PUBCOMP

cdef struct Queued:           # waiting for a free in-flight slot (or for the client to return)
    Msg* msg
    uint8_t qos

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
    char* client_id
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
