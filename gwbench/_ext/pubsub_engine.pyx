# The throughput hot path of `gw bench`: one epoll loop over already
# connected (and, for subscribers, subscribed) MQTT client sockets.
#
# Publishers encode PUBLISH packets straight into a C buffer (payload: id,
# sequence, CLOCK_MONOTONIC send time; see gwbench/payload.py) and send once
# per connection per loop turn. Subscribers read many packets per recv, decode
# them with the project codec, count each (publisher, sequence) exactly in a
# growable bitmap (unique, duplicates, out of order), and record end-to-end
# latency in a log-bucketed histogram whose edges match
# gwbench/histogram.py. QoS 1 and 2 flows (PUBACK; PUBREC/PUBREL/PUBCOMP)
# are answered in C; publishers keep at most `inflight` unacknowledged.
#
# With --mqtt-version 5 the connections speak MQTT 5.0 (gw_ext/codec5.pxd):
# fill5 stands beside fill (chosen once per turn), and parse's one framing
# loop hands each packet to packet5 instead of packet. A publisher sends its
# topic with Topic Alias 1 once, then the alias alone, when the server's
# CONNACK announced a Topic Alias Maximum; keeps at most the server's Receive
# Maximum in flight; a PUBACK (PUBREC, PUBCOMP) with a reason code >= 0x80 ends that
# publish as rejected, not acknowledged. A server's DISCONNECT is counted by
# its reason code.
#
# With --transport ws (MQTT over WebSocket) what a turn writes to a connection
# goes in one masked binary frame (header room reserved before its first
# byte, the mask applied when it is sealed, at the flush), and the server's
# frames are unframed in place in the input buffer before the MQTT parse.
#
# Plain TCP sockets are driven with recv/send on the fd. TLS sockets are
# Python ssl.SSLSocket objects (handshaken in the setup phase); their I/O
# goes through the object, once per batch, never per message.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memmove, memset
from libc.math cimport log
from gwbench._ext.engine_io cimport (
    RECV_CLOSED, RECV_EMPTY, mono_ns, out_reserve, out_sent, recv_some, send_some, watch_events)
from gwbench._ext.latency_hist cimport Hist, HistScale, hist_scale, hist_alloc, hist_dict, hist_free, hist_record
from libc.errno cimport errno
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

from gw_ext.codec cimport (
    PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, PINGREQ, PINGRESP, DISCONNECT, CONNACK,
    ERR_INCOMPLETE, PublishPacket,
    decode_header, decode_publish, decode_packet_id,
    publish_size, encode_publish, encode_ack, encode_empty,
)
from gw_ext.codec5 cimport (
    Ack5Packet, Publish5Packet, P_TOPIC_ALIAS,
    decode_ack5, decode_disconnect5, decode_header5, decode_publish5, encode_publish5, publish5_size,
)

import ssl as _ssl

from gw_ext.netio cimport (
    EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT,
    MSG_NOSIGNAL, SHUT_WR, epoll_create1, epoll_ctl, epoll_event, epoll_wait,
)
from gw_ext.netio cimport close as c_close, shutdown as c_shutdown

DEF MAXEV = 1024

cdef enum:
    ROLE_PUB = 0
    ROLE_SUB = 1

# error kinds (indices into Engine.err)
cdef enum:
    E_CLOSED = 0        # EOF from the broker
    E_RESET = 1         # recv/send error (errno kept in last_errno)
    E_MALFORMED = 2     # undecodable packet from the broker
    E_TLS = 3           # TLS error on an established connection
    E_UNEXPECTED = 4    # a packet type the role does not expect
    E_BAD_ACK = 5       # ack for a packet id not in flight
    E_PING_TIMEOUT = 6  # no PINGRESP within the keepalive
    E_DISCONNECTED = 7  # an MQTT 5.0 server's DISCONNECT (counted by reason code: disconnect_0x..)
    E_COUNT = 8

ERROR_NAMES = ("closed_by_server", "connection_reset", "malformed_from_server", "tls_error",
               "unexpected_packet", "ack_for_unknown_packet_id", "ping_timeout", "disconnected_by_server")

cdef const uint32_t MAX_REMAINING = 268435455

cdef enum:
    WS_ROOM = 14            # header room before an outbound frame: 2 + 8 (length) + 4 (mask)
    WS_STASH = 144          # an incomplete server frame header or control frame (10 + 125) carried over

cdef struct Tracker:
    uint8_t* bits
    uint32_t nbytes
    uint32_t next_seq
    uint64_t unique

cdef struct Conn:
    int fd
    int role
    int tls
    int closed
    uint32_t events
    uint8_t* inb
    size_t in_len
    size_t in_cap
    uint8_t* outb
    size_t out_len
    size_t out_cap
    int64_t last_tx
    int64_t ping_sent
    # publisher
    uint32_t pub_id
    uint32_t seq
    uint8_t* topic
    uint32_t topic_len
    uint32_t msg_size
    uint32_t inflight
    uint32_t window         # in flight at most: the engine's, or (MQTT 5.0) the server's Receive Maximum if lower
    uint32_t next_pid
    int64_t* slot_ts
    # MQTT 5.0 publisher: props5 is the PUBLISH's property block (a Topic
    # Alias, or empty), alias_set once the topic went out with it.
    uint8_t props5[3]
    uint8_t props5_len
    uint8_t alias_set
    int64_t blocked_ns      # time it could not publish: broker backpressure or full window
    # subscriber
    Tracker* tr
    # MQTT over WebSocket
    int ws
    int ws_open             # outb ends with a frame being filled, its header room at ws_frame_at
    size_t ws_frame_at
    uint32_t ws_remaining   # payload bytes of the server's current data frame still to come
    uint32_t ws_stash_len
    uint32_t ws_rng         # the masks' generator (xorshift)
    uint8_t ws_stash[WS_STASH]


cdef class Engine:
    cdef Conn* conns
    cdef int n
    cdef int cap
    cdef int epfd
    cdef list socks
    cdef int qos
    cdef uint32_t size
    cdef uint32_t window
    cdef uint32_t pid_max
    cdef uint32_t n_pubs
    cdef int64_t keepalive_ns
    cdef int64_t t0
    cdef double rate_ns          # messages per ns per publisher (0: flat out)
    cdef int publishing
    cdef uint8_t* payload
    cdef Hist lat
    cdef Hist ack
    cdef HistScale scale
    cdef epoll_event evs[MAXEV]
    # counters
    cdef public uint64_t published, acked, received, unique, duplicates, out_of_order, foreign
    cdef public uint64_t bytes_out, bytes_in, pingresp, pings, dropped, disconnected, live
    cdef public uint64_t rejected          # MQTT 5.0: publishes answered with a reason code >= 0x80
    cdef public int v5                     # the connections speak MQTT 5.0
    cdef uint64_t disconnect_reasons[256]  # MQTT 5.0: the server's DISCONNECTs by reason code
    cdef public int64_t first_rx, last_rx, blocked_ns, publish_ns
    cdef int64_t prev_turn
    cdef public int last_errno
    cdef uint64_t err[E_COUNT]

    def __cinit__(self, int qos, uint32_t size, uint32_t n_publishers, uint32_t inflight,
                  int keepalive, double hist_min_ns, double hist_growth, int hist_nbuckets, int capacity,
                  int mqtt_version=4):
        self.conns = <Conn*>calloc(max(capacity, 1), sizeof(Conn))
        self.cap = max(capacity, 1)
        self.n = 0
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.conns == NULL or self.epfd < 0:
            raise MemoryError()
        self.socks = []
        self.qos = qos
        self.size = size
        self.n_pubs = n_publishers
        self.window = max(1, min(inflight, 65535))
        self.pid_max = (65535 // self.window) * self.window
        self.keepalive_ns = <int64_t>keepalive * 1000000000
        self.payload = <uint8_t*>calloc(max(size, 16), 1)
        hist_scale(&self.scale, hist_min_ns, hist_growth, hist_nbuckets)
        if hist_alloc(&self.lat, hist_nbuckets) or hist_alloc(&self.ack, hist_nbuckets):
            raise MemoryError()
        memset(self.err, 0, sizeof(self.err))
        memset(self.disconnect_reasons, 0, sizeof(self.disconnect_reasons))
        self.v5 = mqtt_version == 5
        self.first_rx = 0
        self.last_rx = 0

    def __dealloc__(self):
        cdef int i, k
        cdef Conn* c
        if self.conns != NULL:
            for i in range(self.n):
                c = &self.conns[i]
                free(c.inb)
                free(c.outb)
                free(c.topic)
                free(c.slot_ts)
                if c.tr != NULL:
                    for k in range(self.n_pubs):
                        free(c.tr[k].bits)
                    free(c.tr)
            free(self.conns)
        free(self.payload)
        hist_free(&self.lat)
        hist_free(&self.ack)
        if self.epfd >= 0:
            c_close(self.epfd)

    # -- setup ----------------------------------------------------------------
    def add(self, int fd, object sock, int is_sub, uint32_t pub_id, bytes topic, bytes leftover, bint tls,
            bint ws=False, bytes ws_raw=b"", uint32_t ws_remaining=0, uint32_t topic_alias_maximum=0,
            uint32_t receive_maximum=65535):
        """Adds a connected client. `sock` stays owned by the caller (and is
        used for I/O when tls); `leftover` is what the setup phase had read
        past the last packet it handled (ws: unframed), `ws_raw` and
        `ws_remaining` where it was in the server's frames. MQTT 5.0: what
        the server's CONNACK announced (a publisher uses Topic Alias 1 when
        topic_alias_maximum is not 0, and keeps at most receive_maximum in
        flight)."""
        if self.n >= self.cap:
            raise ValueError("engine capacity exceeded")
        cdef Conn* c = &self.conns[self.n]
        memset(c, 0, sizeof(Conn))
        c.fd = fd
        c.role = ROLE_SUB if is_sub else ROLE_PUB
        c.tls = tls
        c.in_cap = 262144 if is_sub else 16384
        c.inb = <uint8_t*>malloc(c.in_cap)
        if is_sub:
            c.out_cap = 16384
        else:
            c.pub_id = pub_id
            c.topic_len = len(topic)
            c.topic = <uint8_t*>malloc(c.topic_len + 1)
            memcpy(c.topic, PyBytes_AS_STRING(topic), c.topic_len)
            c.window = self.window
            if self.v5:
                if topic_alias_maximum:
                    c.props5[0] = P_TOPIC_ALIAS
                    c.props5[1] = 0
                    c.props5[2] = 1
                    c.props5_len = 3
                if receive_maximum < c.window:
                    c.window = max(receive_maximum, 1)
                c.msg_size = publish5_size(c.topic_len, c.props5_len, self.size, self.qos)  # the first, the largest
            else:
                c.msg_size = publish_size(c.topic_len, self.size, self.qos)
            c.out_cap = max(65536, 2 * c.msg_size)
            c.next_pid = 1
            if self.qos:
                c.slot_ts = <int64_t*>calloc(self.window, sizeof(int64_t))
        c.outb = <uint8_t*>malloc(c.out_cap)
        if is_sub:
            c.tr = <Tracker*>calloc(max(self.n_pubs, 1), sizeof(Tracker))
        if c.inb == NULL or c.outb == NULL or (is_sub and c.tr == NULL):
            raise MemoryError()
        if ws:
            if len(ws_raw) > WS_STASH:
                raise ValueError("an incomplete frame larger than a header and a control frame")
            c.ws = 1
            c.ws_remaining = ws_remaining
            c.ws_stash_len = len(ws_raw)
            memcpy(c.ws_stash, PyBytes_AS_STRING(ws_raw), len(ws_raw))
            c.ws_rng = <uint32_t>(fd * 2654435761u) | 1
        if leftover:
            if <size_t>len(leftover) > c.in_cap:
                raise ValueError("leftover larger than the input buffer")
            memcpy(c.inb, PyBytes_AS_STRING(leftover), len(leftover))
            c.in_len = len(leftover)
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = 0
        ev.data.u32 = <uint32_t>self.n
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")
        c.events = EPOLLIN
        c.last_tx = mono_ns()
        self.socks.append(sock)
        self.n += 1
        self.live += 1

    def start(self, int64_t t0_ns, double rate_per_publisher):
        self.t0 = t0_ns
        self.rate_ns = rate_per_publisher / 1e9
        self.publishing = 1

    def stop_publishing(self):
        self.publishing = 0
        self.prev_turn = 0

    # -- helpers --------------------------------------------------------------
    cdef inline void hrec(self, Hist* h, double v) noexcept nogil:
        hist_record(h, v, &self.scale)

    cdef void set_events(self, int i, uint32_t events) noexcept:
        cdef Conn* c = &self.conns[i]
        if not c.closed:
            watch_events(self.epfd, c.fd, <uint32_t>i, &c.events, events)

    cdef void lose(self, int i, int kind) noexcept:
        cdef Conn* c = &self.conns[i]
        if c.closed:
            return
        c.closed = 1
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fd, NULL)
        self.err[kind] += 1
        self.dropped += 1
        self.live -= 1

    cdef int ensure_out(self, Conn* c, size_t extra) noexcept:
        return out_reserve(&c.outb, &c.out_cap, c.out_len, extra)

    cdef int ws_room(self, Conn* c) noexcept:
        """A WebSocket connection's next bytes go in a frame: room for its header first."""
        if not c.ws or c.ws_open:
            return 0
        if self.ensure_out(c, WS_ROOM) != 0:
            return -1
        c.ws_frame_at = c.out_len
        c.out_len += WS_ROOM
        c.ws_open = 1
        return 0

    cdef void ws_seal(self, Conn* c) noexcept:
        """The frame being filled gets its header (the shortest length form) and
        its mask: the payload is masked as it moves down over the unused room."""
        cdef size_t at = c.ws_frame_at, n = c.out_len - at - WS_ROOM, i = 0
        cdef uint32_t hs, m32
        cdef uint64_t m64, v
        cdef uint8_t* h = c.outb + at
        cdef uint8_t* src = c.outb + at + WS_ROOM
        cdef uint8_t* dst
        cdef uint8_t mask[4]
        cdef int k
        c.ws_open = 0
        c.ws_rng ^= c.ws_rng << 13
        c.ws_rng ^= c.ws_rng >> 17
        c.ws_rng ^= c.ws_rng << 5
        m32 = c.ws_rng
        memcpy(mask, &m32, 4)
        h[0] = 0x82
        if n < 126:
            h[1] = <uint8_t>(0x80 | n)
            hs = 2
        elif n < 65536:
            h[1] = 0x80 | 126
            h[2] = <uint8_t>(n >> 8)
            h[3] = <uint8_t>n
            hs = 4
        else:
            h[1] = 0x80 | 127
            for k in range(8):
                h[2 + k] = <uint8_t>(n >> (56 - 8 * k))
            hs = 10
        memcpy(h + hs, mask, 4)
        dst = h + hs + 4
        m64 = (<uint64_t>m32) | ((<uint64_t>m32) << 32)
        while i + 8 <= n:
            memcpy(&v, src + i, 8)
            v ^= m64
            memcpy(dst + i, &v, 8)
            i += 8
        while i < n:
            dst[i] = src[i] ^ mask[i & 3]
            i += 1
        c.out_len -= WS_ROOM - (hs + 4)

    cdef int ws_unframe(self, int i, size_t start, size_t end) noexcept:
        """The server's frames in c.inb[start:end] (after the decoded bytes, which
        end at start): their data payloads moved down to c.inb[start:], c.in_len
        set past them; an incomplete header or control frame is stashed for
        the next read. -1 when the connection was lost (a Close, bad framing)."""
        cdef Conn* c = &self.conns[i]
        cdef uint8_t* b = c.inb
        cdef size_t out = start, pos = start, k, hl
        cdef uint64_t n
        cdef uint8_t op
        cdef int j
        while pos < end:
            if c.ws_remaining:
                k = end - pos
                if k > c.ws_remaining:
                    k = c.ws_remaining
                if out != pos:
                    memmove(b + out, b + pos, k)
                out += k
                pos += k
                c.ws_remaining -= <uint32_t>k
                continue
            if end - pos < 2:
                break
            if b[pos + 1] & 0x80 or b[pos] & 0x70:
                self.lose(i, E_MALFORMED)
                return -1
            op = b[pos] & 0x0F
            n = b[pos + 1] & 0x7F
            hl = 2
            if n == 126:
                hl = 4
                if end - pos < hl:
                    break
                n = (<uint64_t>b[pos + 2] << 8) | b[pos + 3]
            elif n == 127:
                hl = 10
                if end - pos < hl:
                    break
                n = 0
                for j in range(8):
                    n = (n << 8) | b[pos + 2 + j]
            if op >= 8:
                if n > 125:
                    self.lose(i, E_MALFORMED)
                    return -1
                if end - pos < hl + n:
                    break
                if op == 8:
                    self.lose(i, E_CLOSED)
                    return -1
                pos += hl + n        # a Ping (the server sends none) or a Pong: nothing to do
                continue
            if (op != 0 and op != 2) or n > MAX_REMAINING:
                self.lose(i, E_MALFORMED)
                return -1
            c.ws_remaining = <uint32_t>n
            pos += hl
        c.ws_stash_len = <uint32_t>(end - pos)
        if c.ws_stash_len:
            memcpy(c.ws_stash, b + pos, c.ws_stash_len)
        c.in_len = out
        return 0

    cdef int ws_room_in(self, Conn* c) noexcept:
        """Room to read into after the decoded bytes and the stash (at least a frame header's worth)."""
        cdef size_t want = c.in_len + c.ws_stash_len + 256
        cdef uint8_t* p
        if want > c.in_cap:
            p = <uint8_t*>realloc(c.inb, want + 65536)
            if p == NULL:
                return -1
            c.inb = p
            c.in_cap = want + 65536
        memcpy(c.inb + c.in_len, c.ws_stash, c.ws_stash_len)
        return 0

    cdef void append_ack(self, int i, uint8_t ptype, uint16_t pid) noexcept:
        cdef Conn* c = &self.conns[i]
        if self.ws_room(c) == 0 and self.ensure_out(c, 4) == 0:
            c.out_len += encode_ack(c.outb + c.out_len, ptype, pid)

    # -- output ---------------------------------------------------------------
    cdef int flush(self, int i, int64_t now):
        """One send of the pending output; returns bytes sent (or -1 when
        the connection broke)."""
        cdef Conn* c = &self.conns[i]
        cdef ssize_t r, k
        cdef object sock
        cdef bytes data
        if c.closed or c.out_len == 0:
            return 0
        if c.ws_open:
            self.ws_seal(c)
        if c.tls:
            # SSL_write sends at most one 16 KiB record per call with
            # partial writes on: go on until the socket is full.
            sock = self.socks[i]
            data = PyBytes_FromStringAndSize(<char*>c.outb, c.out_len)
            r = 0
            while r < <ssize_t>c.out_len:
                try:
                    k = sock.send(data[r:] if r else data)
                except (_ssl.SSLWantWriteError, _ssl.SSLWantReadError, BlockingIOError):
                    break
                except _ssl.SSLError:
                    self.lose(i, E_TLS)
                    return -1
                except OSError as e:
                    self.last_errno = e.errno or 0
                    self.lose(i, E_RESET)
                    return -1
                if k <= 0:
                    break
                r += k
        else:
            r = send_some(c.fd, c.outb, c.out_len)
            if r < 0:
                self.last_errno = errno
                self.lose(i, E_RESET)
                return -1
        if r > 0:
            self.bytes_out += r
            c.last_tx = now
        out_sent(self.epfd, c.fd, <uint32_t>i, &c.events, c.outb, &c.out_len, <size_t>r)
        return r

    cdef uint32_t fill(self, int i, int64_t now) noexcept:
        """Encodes the publishes this publisher may send now."""
        cdef Conn* c = &self.conns[i]
        cdef int64_t due
        cdef uint32_t added = 0, slot, pid
        cdef uint64_t ts = <uint64_t>now
        if c.out_len >= 4096:
            return 0
        if self.rate_ns > 0:
            due = <int64_t>((now - self.t0) * self.rate_ns) + 1 - <int64_t>c.seq
            if due <= 0:
                return 0
        else:
            due = 1 << 30
        if self.qos:
            if c.inflight >= self.window:
                return 0
            if due > self.window - c.inflight:
                due = self.window - c.inflight
        memcpy(self.payload, &c.pub_id, 4)
        memcpy(self.payload + 8, &ts, 8)
        if self.ws_room(c) != 0:
            return 0
        while due > 0 and c.out_len + c.msg_size <= c.out_cap:
            pid = 0
            if self.qos:
                pid = c.next_pid
                slot = (pid - 1) % self.window
                if c.slot_ts[slot] != 0:
                    break  # that slot's packet is still unacknowledged
                c.slot_ts[slot] = now
                c.next_pid = pid % self.pid_max + 1
                c.inflight += 1
            memcpy(self.payload + 4, &c.seq, 4)
            c.out_len += encode_publish(c.outb + c.out_len, c.topic, c.topic_len, self.payload, self.size,
                                        <uint8_t>self.qos, 0, 0, <uint16_t>pid)
            c.seq += 1
            added += 1
            due -= 1
        self.published += added
        return added

    cdef uint32_t fill5(self, int i, int64_t now) noexcept:
        """fill for an MQTT 5.0 publisher: the same pacing and window (its
        own: the server's Receive Maximum may be lower), each PUBLISH with
        its property block: Topic Alias 1 with the topic the first time,
        then the alias alone (an empty topic)."""
        cdef Conn* c = &self.conns[i]
        cdef int64_t due
        cdef uint32_t added = 0, slot, pid, tl
        cdef uint64_t ts = <uint64_t>now
        if c.out_len >= 4096:
            return 0
        if self.rate_ns > 0:
            due = <int64_t>((now - self.t0) * self.rate_ns) + 1 - <int64_t>c.seq
            if due <= 0:
                return 0
        else:
            due = 1 << 30
        if self.qos:
            if c.inflight >= c.window:
                return 0
            if due > c.window - c.inflight:
                due = c.window - c.inflight
        memcpy(self.payload, &c.pub_id, 4)
        memcpy(self.payload + 8, &ts, 8)
        if self.ws_room(c) != 0:
            return 0
        while due > 0 and c.out_len + c.msg_size <= c.out_cap:
            pid = 0
            if self.qos:
                pid = c.next_pid
                slot = (pid - 1) % self.window
                if c.slot_ts[slot] != 0:
                    break  # that slot's packet is still unacknowledged
                c.slot_ts[slot] = now
                c.next_pid = pid % self.pid_max + 1
                c.inflight += 1
            memcpy(self.payload + 4, &c.seq, 4)
            tl = c.topic_len
            if c.alias_set:
                tl = 0
            elif c.props5_len:
                c.alias_set = 1
            c.out_len += encode_publish5(c.outb + c.out_len, c.topic, tl, c.props5, c.props5_len,
                                         self.payload, self.size, <uint8_t>self.qos, 0, 0, <uint16_t>pid)
            c.seq += 1
            added += 1
            due -= 1
        self.published += added
        return added

    # -- input ----------------------------------------------------------------
    cdef void on_publish(self, int i, PublishPacket* pp, int64_t now) noexcept:
        cdef Conn* c = &self.conns[i]
        cdef uint32_t pub_id, seq, nb
        cdef uint64_t ts
        cdef Tracker* tr
        cdef uint8_t* bits
        cdef uint8_t mask
        self.received += 1
        if self.first_rx == 0:
            self.first_rx = now
        self.last_rx = now
        if c.role != ROLE_SUB or pp.payload.len < 16:
            self.foreign += 1
            return
        memcpy(&pub_id, pp.payload.ptr, 4)
        memcpy(&seq, pp.payload.ptr + 4, 4)
        memcpy(&ts, pp.payload.ptr + 8, 8)
        if pub_id >= self.n_pubs:
            self.foreign += 1
            return
        if <int64_t>ts <= now:
            self.hrec(&self.lat, <double>(now - <int64_t>ts))
        else:
            self.hrec(&self.lat, 0.0)
        tr = &c.tr[pub_id]
        if (seq >> 3) >= tr.nbytes:
            nb = tr.nbytes * 2 if tr.nbytes else 64
            while nb <= (seq >> 3):
                nb *= 2
            bits = <uint8_t*>realloc(tr.bits, nb)
            if bits == NULL:
                return
            memset(bits + tr.nbytes, 0, nb - tr.nbytes)
            tr.bits = bits
            tr.nbytes = nb
        mask = <uint8_t>(1 << (seq & 7))
        if tr.bits[seq >> 3] & mask:
            self.duplicates += 1
            return
        tr.bits[seq >> 3] |= mask
        tr.unique += 1
        self.unique += 1
        if seq + 1 > tr.next_seq:
            tr.next_seq = seq + 1
        else:
            self.out_of_order += 1

    cdef void complete(self, int i, uint16_t pid, int64_t now) noexcept:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2) for one of our publishes."""
        cdef Conn* c = &self.conns[i]
        cdef uint32_t slot
        if c.role != ROLE_PUB or not self.qos or pid == 0 or pid > self.pid_max:
            self.err[E_BAD_ACK] += 1
            return
        slot = (pid - 1) % self.window
        if c.slot_ts[slot] == 0:
            self.err[E_BAD_ACK] += 1
            return
        self.hrec(&self.ack, <double>(now - c.slot_ts[slot]))
        c.slot_ts[slot] = 0
        c.inflight -= 1
        self.acked += 1

    cdef int parse(self, int i, int64_t now) noexcept:
        """Every whole packet in connection i's input buffer, each answered
        by packet (3.1.1) or packet5 (5.0); what is left of a packet stays,
        and the buffer grows to hold it whole."""
        cdef Conn* c = &self.conns[i]
        cdef size_t pos = 0
        cdef int hl, reason = 0
        cdef uint8_t first
        cdef uint32_t rem
        cdef size_t need = 0
        cdef uint8_t* p
        while pos < c.in_len:
            if self.v5:
                hl = decode_header5(c.inb + pos, c.in_len - pos, MAX_REMAINING, &first, &rem, &reason)
            else:
                hl = decode_header(c.inb + pos, c.in_len - pos, MAX_REMAINING, &first, &rem, &reason)
            if hl == ERR_INCOMPLETE:
                break
            if hl < 0:
                self.lose(i, E_MALFORMED)
                return -1
            if <size_t>hl + rem > c.in_len - pos:
                need = <size_t>hl + rem
                break
            if self.v5:
                if self.packet5(i, first, c.inb + pos + hl, rem, now) < 0:
                    return -1
            elif self.packet(i, first, c.inb + pos + hl, rem, now) < 0:
                return -1
            pos += <size_t>hl + rem
        if pos:
            if pos < c.in_len:
                memmove(c.inb, c.inb + pos, c.in_len - pos)
            c.in_len -= pos
        if need > c.in_cap:
            p = <uint8_t*>realloc(c.inb, need)
            if p == NULL:
                self.lose(i, E_MALFORMED)
                return -1
            c.inb = p
            c.in_cap = need
        return 0

    cdef int packet(self, int i, uint8_t first, const uint8_t* body, uint32_t rem, int64_t now) noexcept:
        """One MQTT 3.1.1 packet from the server; -1: the connection is lost."""
        cdef int reason = 0, t = first >> 4
        cdef uint16_t pid
        cdef PublishPacket pp
        if t == PUBLISH:
            if decode_publish(first, body, rem, &pp, &reason) < 0:
                self.lose(i, E_MALFORMED)
                return -1
            self.on_publish(i, &pp, now)
            if pp.qos == 1:
                self.append_ack(i, PUBACK, pp.packet_id)
            elif pp.qos == 2:
                self.append_ack(i, PUBREC, pp.packet_id)
        elif t == PUBACK or t == PUBCOMP or t == PUBREC or t == PUBREL:
            if decode_packet_id(body, rem, &pid) < 0:
                self.lose(i, E_MALFORMED)
                return -1
            if t == PUBREC:
                self.append_ack(i, PUBREL, pid)   # our QoS 2 publish, step 2
            elif t == PUBREL:
                self.append_ack(i, PUBCOMP, pid)  # a QoS 2 delivery to us, step 2
            else:
                self.complete(i, pid, now)
        elif t == PINGRESP:
            self.pingresp += 1
            self.conns[i].ping_sent = 0
        elif t == SUBACK or t == CONNACK:
            pass  # late answers of the setup phase
        else:
            self.err[E_UNEXPECTED] += 1
        return 0

    cdef void complete5(self, int i, uint8_t ptype, uint16_t pid, uint8_t reason, int64_t now) noexcept:
        """An MQTT 5.0 PUBACK, PUBREC or PUBCOMP for one of our publishes: a
        reason code >= 0x80 ends its flow there (no PUBREL after such a
        PUBREC, section 4.3.3), counted as rejected; a PUBREC below it gets
        its PUBREL."""
        cdef Conn* c = &self.conns[i]
        cdef uint32_t slot
        if reason < 0x80:
            if ptype == PUBREC:
                self.append_ack(i, PUBREL, pid)
            else:
                self.complete(i, pid, now)
            return
        if c.role != ROLE_PUB or not self.qos or pid == 0 or pid > self.pid_max:
            self.err[E_BAD_ACK] += 1
            return
        slot = (pid - 1) % self.window
        if c.slot_ts[slot] == 0:
            self.err[E_BAD_ACK] += 1
            return
        c.slot_ts[slot] = 0
        c.inflight -= 1
        self.rejected += 1

    cdef int packet5(self, int i, uint8_t first, const uint8_t* body, uint32_t rem, int64_t now) noexcept:
        """One MQTT 5.0 packet from the server (gw_ext/codec5.pxd's rules);
        -1: the connection is lost."""
        cdef int reason = 0, t = first >> 4
        cdef Publish5Packet p5
        cdef PublishPacket pp
        cdef Ack5Packet a5
        if t == PUBLISH:
            if decode_publish5(first, body, rem, &p5, &reason) < 0:
                self.lose(i, E_MALFORMED)
                return -1
            pp.qos = p5.qos
            pp.packet_id = p5.packet_id
            pp.payload = p5.payload
            self.on_publish(i, &pp, now)
            if pp.qos == 1:
                self.append_ack(i, PUBACK, pp.packet_id)     # reason 0, no properties: the short form
            elif pp.qos == 2:
                self.append_ack(i, PUBREC, pp.packet_id)
        elif t == PUBACK or t == PUBCOMP or t == PUBREC or t == PUBREL:
            if decode_ack5(<uint8_t>t, body, rem, &a5, &reason) < 0:
                self.lose(i, E_MALFORMED)
                return -1
            if t == PUBREL:
                self.append_ack(i, PUBCOMP, a5.packet_id)   # a QoS 2 delivery to us, step 2
            else:
                self.complete5(i, <uint8_t>t, a5.packet_id, a5.reason_code, now)
        elif t == PINGRESP:
            self.pingresp += 1
            self.conns[i].ping_sent = 0
        elif t == DISCONNECT:
            if decode_disconnect5(DISCONNECT, body, rem, &a5, &reason) < 0:
                self.lose(i, E_MALFORMED)
                return -1
            self.disconnect_reasons[a5.reason_code] += 1
            self.lose(i, E_DISCONNECTED)
            return -1
        elif t == SUBACK or t == CONNACK:
            pass  # late answers of the setup phase
        else:
            self.err[E_UNEXPECTED] += 1
        return 0

    cdef void do_read(self, int i, int64_t now):
        cdef Conn* c = &self.conns[i]
        cdef ssize_t r
        cdef size_t space
        cdef int turns = 0
        cdef object sock
        cdef bytes data
        cdef size_t stash
        if c.tls:
            sock = self.socks[i]
            while not c.closed and turns < 64:
                space = c.in_cap - c.in_len
                if c.ws:
                    if self.ws_room_in(c) < 0:
                        self.lose(i, E_MALFORMED)
                        return
                    space = c.in_cap - c.in_len - c.ws_stash_len
                try:
                    data = sock.recv(space)
                except (_ssl.SSLWantReadError, _ssl.SSLWantWriteError, BlockingIOError):
                    return
                except _ssl.SSLError:
                    self.lose(i, E_TLS)
                    return
                except OSError as e:
                    self.last_errno = e.errno or 0
                    self.lose(i, E_RESET)
                    return
                if not data:
                    self.lose(i, E_CLOSED)
                    return
                if c.ws:
                    # ws_room_in (before the recv) put the stash at in_len and left room for `space`.
                    memcpy(c.inb + c.in_len + c.ws_stash_len, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
                    self.bytes_in += PyBytes_GET_SIZE(data)
                    if self.ws_unframe(i, c.in_len, c.in_len + c.ws_stash_len + PyBytes_GET_SIZE(data)) < 0:
                        return
                else:
                    memcpy(c.inb + c.in_len, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
                    c.in_len += PyBytes_GET_SIZE(data)
                    self.bytes_in += PyBytes_GET_SIZE(data)
                if self.parse(i, now) < 0:
                    return
                turns += 1
            return
        while not c.closed and turns < 8:
            if c.ws:
                if self.ws_room_in(c) < 0:
                    self.lose(i, E_MALFORMED)
                    return
                stash = c.ws_stash_len
                space = c.in_cap - c.in_len - stash
                r = recv_some(c.fd, c.inb + c.in_len + stash, space)
                if r > 0:
                    self.bytes_in += r
                    if self.ws_unframe(i, c.in_len, c.in_len + stash + r) < 0:
                        return
                    if self.parse(i, now) < 0:
                        return
                    if <size_t>r < space:
                        return
                    turns += 1
                    continue
            else:
                space = c.in_cap - c.in_len
                r = recv_some(c.fd, c.inb + c.in_len, space)
            if r > 0:
                c.in_len += r
                self.bytes_in += r
                if self.parse(i, now) < 0:
                    return
                if <size_t>r < space:
                    return
            elif r == RECV_CLOSED:
                self.lose(i, E_CLOSED)
                return
            else:
                if r != RECV_EMPTY:
                    self.last_errno = errno
                    self.lose(i, E_RESET)
                return
            turns += 1

    cdef void housekeeping(self, int64_t now):
        cdef int i
        cdef Conn* c
        if self.keepalive_ns <= 0:
            return
        for i in range(self.n):
            c = &self.conns[i]
            if c.closed:
                continue
            if c.ping_sent and now - c.ping_sent > self.keepalive_ns:
                self.err[E_PING_TIMEOUT] += 1
                c.ping_sent = 0
            if now - c.last_tx >= self.keepalive_ns // 2 and c.ping_sent == 0:
                if self.ws_room(c) == 0 and self.ensure_out(c, 2) == 0:
                    c.out_len += encode_empty(c.outb + c.out_len, PINGREQ)
                    c.ping_sent = now
                    self.pings += 1
                    self.flush(i, now)

    # -- the loop -------------------------------------------------------------
    def run(self, int64_t until_ns):
        """Runs the loop until CLOCK_MONOTONIC reaches until_ns."""
        cdef int64_t now, dt, last_house = 0
        cdef int i, k, nev, timeout
        cdef int busy
        cdef uint32_t ev
        cdef Conn* c
        while True:
            now = mono_ns()
            if now >= until_ns:
                break
            busy = 0
            dt = now - self.prev_turn if self.publishing and self.prev_turn and now > self.t0 else 0
            self.prev_turn = now
            for i in range(self.n):
                c = &self.conns[i]
                if c.closed or c.role != ROLE_PUB:
                    continue
                if dt:
                    self.publish_ns += dt
                    if c.out_len >= 4096 or (self.qos and c.inflight >= c.window):
                        c.blocked_ns += dt
                        self.blocked_ns += dt
                if self.publishing and now >= self.t0 and (self.fill5(i, now) if self.v5 else self.fill(i, now)):
                    if self.flush(i, now) > 0 and c.out_len == 0:
                        busy = 1
                elif c.out_len and not (c.events & EPOLLOUT):
                    self.flush(i, now)
            if now - last_house >= 50000000:
                last_house = now
                self.housekeeping(now)
            if busy:
                timeout = 0
            elif self.publishing and (self.rate_ns > 0 or now < self.t0):
                timeout = 1
            else:
                timeout = 5
            k = <int>((until_ns - now) // 1000000)
            if k < timeout:
                timeout = k if k > 0 else 0
            nev = epoll_wait(self.epfd, self.evs, MAXEV, timeout)
            if nev <= 0:
                continue
            now = mono_ns()
            for k in range(nev):
                i = <int>self.evs[k].data.u32
                ev = self.evs[k].events
                c = &self.conns[i]
                if c.closed:
                    continue
                if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
                    self.do_read(i, now)
                if not c.closed and c.out_len and (ev & EPOLLOUT or c.role == ROLE_SUB):
                    self.flush(i, now)

    # -- state for the coordinator ------------------------------------------
    def publishers_idle(self):
        """True when no publisher has unsent bytes or unacknowledged publishes."""
        cdef int i
        cdef Conn* c
        for i in range(self.n):
            c = &self.conns[i]
            if c.closed or c.role != ROLE_PUB:
                continue
            if c.out_len or c.inflight:
                return False
        return True

    def unacked(self):
        cdef int i
        cdef uint64_t n = 0
        for i in range(self.n):
            if self.conns[i].role == ROLE_PUB:
                n += self.conns[i].inflight
        return n

    def publisher_counts(self):
        """{publisher id: messages encoded (sent or being sent)}"""
        cdef int i
        out = {}
        for i in range(self.n):
            if self.conns[i].role == ROLE_PUB:
                out[self.conns[i].pub_id] = self.conns[i].seq
        return out

    def subscribers_missing(self, expected):
        """Messages still missing over this engine's live subscribers, given
        the final count of every publisher (a sequence of P ints)."""
        cdef int i
        cdef uint32_t p
        cdef int64_t missing = 0
        cdef int64_t e
        for i in range(self.n):
            if self.conns[i].role != ROLE_SUB or self.conns[i].closed:
                continue
            for p in range(self.n_pubs):
                e = <int64_t>expected[p] - <int64_t>self.conns[i].tr[p].unique
                if e > 0:
                    missing += e
        return missing

    def errors(self):
        """{kind: count}; an MQTT 5.0 server's DISCONNECTs as disconnect_0x.. by reason code."""
        cdef int k
        out = {ERROR_NAMES[k]: self.err[k] for k in range(E_COUNT) if self.err[k] and k != E_DISCONNECTED}
        for k in range(256):
            if self.disconnect_reasons[k]:
                out[f"disconnect_0x{k:02x}"] = self.disconnect_reasons[k]
        return out

    def windows(self):
        """{publisher id: its in-flight window} (MQTT 5.0: the server's Receive Maximum may lower it)."""
        cdef int i
        return {self.conns[i].pub_id: self.conns[i].window for i in range(self.n) if self.conns[i].role == ROLE_PUB}

    cdef dict _hist(self, Hist* h):
        return hist_dict(h, self.scale.nb)

    def record_latency(self, values):
        """Records values (ns) in the latency histogram exactly as received
        messages are; for tests of agreement with gwbench/histogram.py."""
        for v in values:
            self.hrec(&self.lat, <double>v)

    def latency_hist(self):
        return self._hist(&self.lat)

    def ack_hist(self):
        return self._hist(&self.ack)

    def n_conns(self):
        return self.n

    def disconnect(self, double budget_s=2.0):
        """DISCONNECT on every open connection, flushed within the budget;
        then shuts the write side. Returns how many were sent completely."""
        cdef int i, pending
        cdef Conn* c
        cdef int64_t now = mono_ns()
        cdef int64_t deadline = now + <int64_t>(budget_s * 1e9)
        cdef uint64_t done = 0
        for i in range(self.n):
            c = &self.conns[i]
            if c.closed:
                continue
            if self.ws_room(c) == 0 and self.ensure_out(c, 2) == 0:
                c.out_len += encode_empty(c.outb + c.out_len, DISCONNECT)
        while True:
            pending = 0
            now = mono_ns()
            for i in range(self.n):
                c = &self.conns[i]
                if not c.closed and c.out_len:
                    self.flush(i, now)
                    if not c.closed and c.out_len:
                        pending += 1
            if not pending or now >= deadline:
                break
            epoll_wait(self.epfd, self.evs, MAXEV, 10)
        for i in range(self.n):
            c = &self.conns[i]
            if c.closed:
                continue
            if c.out_len == 0:
                done += 1
            if not c.tls:
                c_shutdown(c.fd, SHUT_WR)
            c.closed = 1
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fd, NULL)
            self.live -= 1
        self.disconnected = done
        return done
