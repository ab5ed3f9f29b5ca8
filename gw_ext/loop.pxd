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

cdef enum Proto:
    PROTO_MQTT = 1
    PROTO_JSON = 2            # seed 000's newline-delimited JSON

cdef enum ConnFlag:
    F_TLS = 1
    F_DIRTY = 2               # on the flush list for this loop turn
    F_POLLOUT = 4             # EPOLLOUT registered (a write would block)
    F_SSL_WRITE_WANTS_READ = 8

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
    uint16_t keepalive        # seconds, from CONNECT
    uint16_t client_id_len
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

cdef struct Listener:
    int fd
    uint8_t proto
    SSL_CTX* ctx              # NULL for plain listeners
