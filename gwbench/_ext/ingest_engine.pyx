# The hot loop of `gw bench ingest`: keep-alive clients that send telemetry
# records to an HTTP ingest endpoint (POST /v1/ingest/{device_id}) or, with
# the MQTT transport, as QoS 1 PUBLISH to telemetry/{device_id}.
#
# One epoll loop over non-blocking sockets. Every request is a copy of one
# precomputed template (built by gwbench/ingest_scenario.py) with the fixed-width
# fields patched in place: device id, seq, readings, timestamp (and for MQTT
# the packet id). HTTP/1.1 responses are read with a minimal parser: status
# line, Content-Length or chunked body, Connection: close, Retry-After;
# responses come back in request order, so a ring per connection gives each
# response its request. MQTT PUBACKs are matched by packet id.
#
# Pacing. Open loop (--rate R): request n of the run (over every client of
# every process) is due at t0 + n / R; client g sends requests g, g + C,
# g + 2C, ... so the total is exactly R/s and no two clients fire together.
# Latency is measured from that due time, not from the send: a request that
# waited because the server (or the tool) fell behind counts the wait, so
# coordinated omission is not hidden. At most `pipeline` requests are
# outstanding per connection; due requests past that wait their turn (and
# their latency grows). Closed loop (rate 0): every connection keeps
# `pipeline` requests outstanding; the due time is the moment it was issued.
#
# Readings are a pure function of (seed, device, seq): each device has a
# normal temperature (15.00..29.99 C) and humidity, a reading is that +- a
# little noise, and with --anomalies a fraction of readings is 40 C off. A
# checker can recompute which (device, seq) were anomalous from the seed;
# the engine also counts them and keeps a (capped) list.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memmove, memset
from libc.math cimport log
from gwbench._ext.engine_io cimport (
    RECV_CLOSED, RECV_EMPTY, mono_ns, out_reserve, out_sent, recv_some, send_some, watch_events)
from gwbench._ext.latency_hist cimport Hist, HistScale, hist_scale, hist_alloc, hist_clear, hist_dict, hist_free, hist_record
from libc.errno cimport errno, ENOSYS
from libc.time cimport tm, time_t
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

from gw_ext.netio cimport (
    EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT,
    MSG_NOSIGNAL, SHUT_WR, epoll_create1, epoll_ctl, epoll_event, epoll_wait, socklen_t,
)
from gw_ext.netio cimport close as c_close, shutdown as c_shutdown

cdef extern from "<sys/epoll.h>" nogil:
    int epoll_pwait2(int epfd, epoll_event* events, int maxevents, const timespec* timeout, const void* sigmask)

cdef extern from "<sys/socket.h>" nogil:
    int getsockopt(int fd, int level, int optname, void* optval, socklen_t* optlen)
    int SOL_SOCKET, SO_ERROR

cdef extern from "<string.h>" nogil:
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen)

cdef extern from "<time.h>" nogil:
    tm* gmtime_r(const time_t* t, tm* out)

cdef extern from "<sys/prctl.h>" nogil:
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5)
    int PR_SET_TIMERSLACK

DEF MAXEV = 1024
DEF MAX_HEAD = 65536        # response header block larger than this: malformed
DEF IN_CAP = 16384
DEF HOUSE_NS = 20000000     # connect timeouts, reconnects, MQTT keepalive: every 20 ms
DEF MAX_ANOMALY_LIST = 100000

cdef enum:
    T_HTTP = 0
    T_MQTT = 1

# connection states
cdef enum:
    S_IDLE = 0          # no socket: before open_all, or waiting to reconnect
    S_CONNECTING = 1    # non-blocking connect in progress
    S_HELLO = 2         # MQTT: CONNECT sent, waiting for CONNACK
    S_READY = 3
    S_DONE = 4          # closed at the end of the run

# HTTP response parser states
cdef enum:
    P_HEAD = 0
    P_BODY = 1
    P_CHUNK_SIZE = 2
    P_CHUNK_DATA = 3
    P_TRAILER = 4
    P_UNTIL_CLOSE = 5

# error kinds (indices into IngestEngine.err)
cdef enum:
    E_CONNECT = 0           # connect() failed: refused, unreachable
    E_CONNECT_TIMEOUT = 1   # no connection (or CONNACK) within --connect-timeout
    E_CLOSED = 2            # the server closed the connection without saying so first
    E_RESET = 3             # recv/send error (errno kept in last_errno)
    E_MALFORMED = 4         # not an HTTP/1.x response (or MQTT packet) we can read
    E_CONNACK = 5           # MQTT: CONNACK with a refusal
    E_UNEXPECTED = 6        # a response with no request outstanding, an unknown PUBACK, ...
    E_COUNT = 7

ERROR_NAMES = ("connect_failed", "connect_timeout", "closed_by_server", "connection_reset",
               "malformed_response", "connack_refused", "unexpected_response")

cdef struct HConn:
    int fd
    int state
    uint32_t events
    uint32_t g              # global client index (0..C-1 over every process)
    uint32_t ndev           # devices g, g + C, g + 2C, ... < N
    uint64_t issued         # requests put on this connection: request i goes to device i % ndev, seq i / ndev
    uint64_t sched_n        # open loop: requests of this connection that are due
    # outstanding requests, oldest first
    int64_t* ring_sched
    int64_t* ring_issue
    uint16_t* ring_pid      # MQTT packet id (0: answered out of order, waiting to be popped)
    uint32_t head
    uint32_t count
    uint16_t next_pid
    uint8_t* outb
    size_t out_len
    size_t out_cap
    uint8_t* inb
    size_t in_len
    size_t in_cap
    # response being parsed
    int pstate
    int64_t body_left
    int status
    int close_after
    int retry_after
    # timers
    int64_t t_state
    int64_t retry_at
    int64_t last_tx
    int ever_ready
    int dirty
    uint8_t* hello
    uint32_t hello_len


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    """splitmix64's finalizer: a well-spread 64-bit hash."""
    x += <uint64_t>0x9E3779B97F4A7C15ULL
    x = (x ^ (x >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * <uint64_t>0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef inline int put_digits(uint8_t* p, int k, uint64_t v) noexcept nogil:
    """v's decimal digits (at least one) ending at p[k], written right to left
    while k >= 0: the index left of the first digit written."""
    while k >= 0:
        p[k] = <uint8_t>(48 + v % 10)
        v //= 10
        k -= 1
        if v == 0:
            break
    return k


cdef inline void pad_left(uint8_t* p, int k, uint8_t pad) noexcept nogil:
    """p[0..k] filled with pad."""
    while k >= 0:
        p[k] = pad
        k -= 1


cdef inline void put_uint(uint8_t* p, int width, uint64_t v, uint8_t pad) noexcept nogil:
    """v right-aligned in width bytes, padded with pad ('0' or ' ')."""
    pad_left(p, put_digits(p, width - 1, v), pad)


cdef inline void put_fixed(uint8_t* p, int width, int64_t v, int decimals) noexcept nogil:
    """v / 10**decimals as a JSON number right-aligned in width bytes (leading
    spaces are JSON whitespace, so every record has the same length)."""
    cdef int k = width - 1
    cdef int d
    cdef int neg = v < 0
    cdef uint64_t a = <uint64_t>(-v if neg else v)
    for d in range(decimals):
        p[k] = <uint8_t>(48 + a % 10)
        a //= 10
        k -= 1
    if decimals:
        p[k] = 46  # '.'
        k -= 1
    k = put_digits(p, k, a)
    if neg and k >= 0:
        p[k] = 45  # '-'
        k -= 1
    pad_left(p, k, 32)


cdef inline int memcmp_prefix(const uint8_t* p, const char* s, size_t n) noexcept nogil:
    cdef size_t k
    for k in range(n):
        if p[k] != <uint8_t>s[k]:
            return 0
    return 1


cdef const char* SITES = b"AALCPHOSLSTO"   # tags.site: 3 letters by device % 4


cdef inline int lower(int ch) noexcept nogil:
    if 65 <= ch <= 90:
        return ch + 32
    return ch


cdef int name_is(const uint8_t* p, size_t n, const char* name) noexcept nogil:
    """Case-insensitive header name comparison (name in lower case)."""
    cdef size_t k = 0
    while k < n:
        if name[k] == 0 or lower(p[k]) != name[k]:
            return 0
        k += 1
    return name[k] == 0


cdef int value_has(const uint8_t* p, size_t n, const char* word) noexcept nogil:
    """Case-insensitive substring test (word in lower case)."""
    cdef size_t wl = 0, k, j
    while word[wl] != 0:
        wl += 1
    if wl > n:
        return 0
    for k in range(n - wl + 1):
        j = 0
        while j < wl and lower(p[k + j]) == word[j]:
            j += 1
        if j == wl:
            return 1
    return 0


cdef class IngestEngine:
    cdef HConn* conns
    cdef int n
    cdef int cap
    cdef int epfd
    cdef int transport
    cdef uint32_t pipeline
    cdef uint32_t clients_total
    cdef uint32_t devices
    # template and the fields patched into it (offsets < 0: absent)
    cdef uint8_t* tpl
    cdef size_t tpl_len
    cdef int off_dev, w_dev, off_seq, w_seq, off_temp, w_temp, off_hum, w_hum, off_ts, off_site, off_pid
    cdef uint64_t seed
    cdef int anomalies
    cdef double anomaly_frac
    cdef int64_t wall_off           # CLOCK_REALTIME - CLOCK_MONOTONIC, ns
    cdef int64_t ts_sec
    cdef uint8_t ts_buf[24]
    # pacing
    cdef int started
    cdef int kicked
    cdef int64_t t0
    cdef int64_t t_stop
    cdef double ns_per_req          # open loop: 1e9 / total rate; 0: closed loop
    cdef uint32_t cur_j
    cdef uint64_t cur_round
    cdef int sched_done
    cdef int64_t next_due
    cdef int reconnect
    cdef int64_t connect_timeout_ns
    cdef int64_t keepalive_ns
    cdef object opener              # callable(g) -> fd (>= 0) or -errno
    cdef int use_pwait2
    cdef int* dirty
    cdef int ndirty
    # histograms
    cdef Hist lat
    cdef Hist svc
    cdef Hist win
    cdef Hist lag
    cdef HistScale scale
    cdef epoll_event evs[MAXEV]
    # counters
    cdef public uint64_t sent, answered, ok, lost, bytes_out, bytes_in, retry_after, injected
    cdef public uint64_t connects, connected_ok, server_closes, live, pingreqs
    cdef public int last_errno
    cdef uint64_t status[600]
    cdef uint64_t err[E_COUNT]
    cdef uint32_t* an_dev
    cdef uint32_t* an_seq
    cdef uint32_t an_n

    def __cinit__(self, int transport, int capacity, uint32_t pipeline, uint32_t clients_total,
                  uint32_t devices, double hist_min_ns, double hist_growth, int hist_nbuckets):
        self.cap = max(capacity, 1)
        self.conns = <HConn*>calloc(self.cap, sizeof(HConn))
        self.dirty = <int*>calloc(self.cap, sizeof(int))
        self.n = 0
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.conns == NULL or self.dirty == NULL or self.epfd < 0:
            raise MemoryError()
        if transport not in (T_HTTP, T_MQTT):
            raise ValueError("transport: 0 (HTTP) or 1 (MQTT)")
        self.transport = transport
        self.pipeline = max(1, min(pipeline, 65000))
        self.clients_total = max(clients_total, 1)
        self.devices = devices
        hist_scale(&self.scale, hist_min_ns, hist_growth, hist_nbuckets)
        if (hist_alloc(&self.lat, hist_nbuckets) or hist_alloc(&self.svc, hist_nbuckets)
                or hist_alloc(&self.win, hist_nbuckets) or hist_alloc(&self.lag, hist_nbuckets)):
            raise MemoryError()
        self.an_dev = <uint32_t*>malloc(MAX_ANOMALY_LIST * sizeof(uint32_t))
        self.an_seq = <uint32_t*>malloc(MAX_ANOMALY_LIST * sizeof(uint32_t))
        memset(self.status, 0, sizeof(self.status))
        memset(self.err, 0, sizeof(self.err))
        self.off_dev = self.off_seq = self.off_temp = self.off_hum = self.off_ts = self.off_site = self.off_pid = -1
        self.ts_sec = -1
        self.reconnect = 1
        self.connect_timeout_ns = 10000000000
        self.use_pwait2 = 1

    def __dealloc__(self):
        cdef int i
        cdef HConn* c
        if self.conns != NULL:
            for i in range(self.n):
                c = &self.conns[i]
                if c.fd >= 0:
                    c_close(c.fd)
                free(c.ring_sched)
                free(c.ring_issue)
                free(c.ring_pid)
                free(c.outb)
                free(c.inb)
                free(c.hello)
            free(self.conns)
        free(self.dirty)
        free(self.tpl)
        hist_free(&self.lat)
        hist_free(&self.svc)
        hist_free(&self.win)
        hist_free(&self.lag)
        free(self.an_dev)
        free(self.an_seq)
        if self.epfd >= 0:
            c_close(self.epfd)

    # -- setup ------------------------------------------------------------------
    def set_template(self, bytes tpl, dict off, uint64_t seed, bint anomalies, double anomaly_fraction,
                     int64_t wall_offset_ns):
        """The request template and where its fields are: off maps dev, seq,
        temp, hum, ts, site, pid to (offset, width) (offset -1: absent)."""
        free(self.tpl)
        self.tpl_len = len(tpl)
        self.tpl = <uint8_t*>malloc(self.tpl_len)
        if self.tpl == NULL:
            raise MemoryError()
        memcpy(self.tpl, PyBytes_AS_STRING(tpl), self.tpl_len)
        self.off_dev, self.w_dev = off.get("dev", (-1, 0))
        self.off_seq, self.w_seq = off.get("seq", (-1, 0))
        self.off_temp, self.w_temp = off.get("temp", (-1, 0))
        self.off_hum, self.w_hum = off.get("hum", (-1, 0))
        self.off_ts = off.get("ts", (-1, 0))[0]
        self.off_site = off.get("site", (-1, 0))[0]
        self.off_pid = off.get("pid", (-1, 0))[0]
        for name, (o, w) in off.items():
            if o >= 0 and <size_t>(o + max(w, 1)) > self.tpl_len:
                raise ValueError(f"field {name} outside the template")
        self.seed = seed
        self.anomalies = anomalies
        self.anomaly_frac = anomaly_fraction
        self.wall_off = wall_offset_ns
        self.ts_sec = -1

    def configure(self, double connect_timeout_s, int keepalive_s, object opener):
        self.connect_timeout_ns = <int64_t>(connect_timeout_s * 1e9)
        self.keepalive_ns = <int64_t>keepalive_s * 1000000000
        self.opener = opener

    def add(self, uint32_t g, uint32_t ndev, bytes hello):
        """A client: global index g, owning ndev devices (g, g + C, ...).
        hello: what to send once connected (MQTT CONNECT), or b""."""
        if self.n >= self.cap:
            raise ValueError("engine capacity exceeded")
        if ndev == 0:
            raise ValueError("a client needs at least one device")
        cdef HConn* c = &self.conns[self.n]
        memset(c, 0, sizeof(HConn))
        c.fd = -1
        c.g = g
        c.ndev = ndev
        c.next_pid = 1
        c.ring_sched = <int64_t*>calloc(self.pipeline, sizeof(int64_t))
        c.ring_issue = <int64_t*>calloc(self.pipeline, sizeof(int64_t))
        c.ring_pid = <uint16_t*>calloc(self.pipeline, sizeof(uint16_t))
        c.in_cap = IN_CAP
        c.inb = <uint8_t*>malloc(c.in_cap)
        c.out_cap = max(<size_t>4096, self.tpl_len * min(self.pipeline, 16) + len(hello) + 64)
        c.outb = <uint8_t*>malloc(c.out_cap)
        c.hello_len = len(hello)
        if c.hello_len:
            c.hello = <uint8_t*>malloc(c.hello_len)
            if c.hello != NULL:
                memcpy(c.hello, PyBytes_AS_STRING(hello), c.hello_len)
        if (c.ring_sched == NULL or c.ring_issue == NULL or c.ring_pid == NULL or c.inb == NULL
                or c.outb == NULL or (c.hello_len and c.hello == NULL)):
            raise MemoryError()
        self.n += 1

    # -- helpers ----------------------------------------------------------------
    cdef inline void hrec(self, Hist* h, double v) noexcept nogil:
        hist_record(h, v, &self.scale)

    cdef void set_events(self, int i, uint32_t events) noexcept:
        cdef HConn* c = &self.conns[i]
        if not c.fd < 0:
            watch_events(self.epfd, c.fd, <uint32_t>i, &c.events, events)

    cdef int ensure_out(self, HConn* c, size_t extra) noexcept:
        return out_reserve(&c.outb, &c.out_cap, c.out_len, extra)

    cdef void put_ts(self, uint8_t* p, int64_t mono) noexcept:
        """RFC 3339 UTC with milliseconds: 2025-01-31T12:34:56.789Z (24 bytes)."""
        cdef int64_t t = mono + self.wall_off
        cdef int64_t sec = t // 1000000000
        cdef int64_t ms = (t % 1000000000) // 1000000
        cdef time_t tt
        cdef tm parts
        if sec != self.ts_sec:
            tt = <time_t>sec
            gmtime_r(&tt, &parts)
            put_uint(self.ts_buf, 4, parts.tm_year + 1900, 48)
            self.ts_buf[4] = 45
            put_uint(self.ts_buf + 5, 2, parts.tm_mon + 1, 48)
            self.ts_buf[7] = 45
            put_uint(self.ts_buf + 8, 2, parts.tm_mday, 48)
            self.ts_buf[10] = 84  # T
            put_uint(self.ts_buf + 11, 2, parts.tm_hour, 48)
            self.ts_buf[13] = 58
            put_uint(self.ts_buf + 14, 2, parts.tm_min, 48)
            self.ts_buf[16] = 58
            put_uint(self.ts_buf + 17, 2, parts.tm_sec, 48)
            self.ts_buf[19] = 46
            self.ts_buf[23] = 90  # Z
            self.ts_sec = sec
        put_uint(self.ts_buf + 20, 3, <uint64_t>ms, 48)
        memcpy(p, self.ts_buf, 24)

    cdef int render(self, uint8_t* p, uint32_t dev, uint32_t seq, int64_t sched, uint16_t pid) noexcept:
        """Writes one request into p (tpl_len bytes); returns 1 when its
        reading is an anomaly."""
        cdef uint64_t h, h2, hd
        cdef int64_t temp, hum
        cdef int anomaly = 0
        memcpy(p, self.tpl, self.tpl_len)
        if self.off_dev >= 0:
            put_uint(p + self.off_dev, self.w_dev, dev, 48)
        if self.off_seq >= 0:
            put_uint(p + self.off_seq, self.w_seq, seq, 32)
        hd = mix64(self.seed ^ (<uint64_t>dev * <uint64_t>0x100000001B3ULL))
        h = mix64(self.seed + mix64((<uint64_t>dev << 32) | seq))
        h2 = mix64(h)
        temp = 1500 + <int64_t>(hd % 1500) + <int64_t>((h2 & 0xFFFF) % 101) - 50
        hum = 300 + <int64_t>((hd >> 20) % 400) + <int64_t>(((h2 >> 16) & 0xFFFF) % 41) - 20
        if self.anomalies and <double>(h >> 11) * (1.0 / 9007199254740992.0) < self.anomaly_frac:
            anomaly = 1
            temp += 4000 if (h2 >> 40) & 1 else -4000
        if self.off_temp >= 0:
            put_fixed(p + self.off_temp, self.w_temp, temp, 2)
        if self.off_hum >= 0:
            put_fixed(p + self.off_hum, self.w_hum, hum, 1)
        if self.off_site >= 0:
            memcpy(p + self.off_site, SITES + 3 * (dev % 4), 3)
        if self.off_ts >= 0:
            self.put_ts(p + self.off_ts, sched)
        if self.off_pid >= 0:
            p[self.off_pid] = <uint8_t>(pid >> 8)
            p[self.off_pid + 1] = <uint8_t>(pid & 0xFF)
        return anomaly

    cdef int issue(self, int i, int64_t sched, int64_t now) noexcept:
        """Puts the connection's next request in its output buffer."""
        cdef HConn* c = &self.conns[i]
        cdef uint64_t k = c.issued
        cdef uint32_t local = <uint32_t>(k % c.ndev)
        cdef uint32_t seq = <uint32_t>(k // c.ndev)
        cdef uint32_t dev = c.g + local * self.clients_total
        cdef uint32_t slot
        cdef uint16_t pid = 0
        if self.ensure_out(c, self.tpl_len) < 0:
            return -1
        if self.transport == T_MQTT:
            pid = c.next_pid
            c.next_pid = <uint16_t>(c.next_pid % 65535 + 1)
        if self.render(c.outb + c.out_len, dev, seq, sched, pid):
            if self.an_n < MAX_ANOMALY_LIST and self.an_dev != NULL and self.an_seq != NULL:
                self.an_dev[self.an_n] = dev
                self.an_seq[self.an_n] = seq
                self.an_n += 1
            self.injected += 1
        c.out_len += self.tpl_len
        if self.ns_per_req > 0:
            self.hrec(&self.lag, <double>(now - sched) if now > sched else 0.0)
        slot = (c.head + c.count) % self.pipeline
        c.ring_sched[slot] = sched
        c.ring_issue[slot] = now
        c.ring_pid[slot] = pid if pid else 1
        c.count += 1
        c.issued += 1
        self.sent += 1
        return 0

    cdef inline int64_t due_at(self, HConn* c, uint64_t i) noexcept:
        return self.t0 + <int64_t>((<double>i * self.clients_total + c.g) * self.ns_per_req)

    cdef void pump(self, int i, int64_t now) noexcept:
        """Issues what this connection may send now, then writes it."""
        cdef HConn* c = &self.conns[i]
        if c.state != S_READY:
            return
        if self.started:
            if self.ns_per_req > 0:
                while c.issued < c.sched_n and c.count < self.pipeline:
                    if self.issue(i, self.due_at(c, c.issued), now) < 0:
                        break
            elif now < self.t_stop:
                while c.count < self.pipeline:
                    if self.issue(i, now, now) < 0:
                        break
        if c.out_len:
            self.flush(i, now)

    cdef void advance_schedule(self, int64_t now) noexcept:
        """Open loop: marks every request due by now; the connections that
        got one go on the dirty list."""
        cdef int64_t s
        cdef HConn* c
        while not self.sched_done:
            c = &self.conns[self.cur_j]
            s = self.due_at(c, self.cur_round)
            if s >= self.t_stop:
                self.sched_done = 1
                self.next_due = 0
                break
            if s > now:
                self.next_due = s
                break
            c.sched_n += 1
            if not c.dirty:
                c.dirty = 1
                self.dirty[self.ndirty] = self.cur_j
                self.ndirty += 1
            self.cur_j += 1
            if self.cur_j >= <uint32_t>self.n:
                self.cur_j = 0
                self.cur_round += 1

    # -- connections -----------------------------------------------------------
    cdef void drop(self, int i, int kind, int64_t now, int64_t backoff_ns) noexcept:
        """Closes a connection: its outstanding requests are lost; it is
        reopened after backoff_ns while the run goes on."""
        cdef HConn* c = &self.conns[i]
        if c.fd < 0:
            return
        if kind >= 0:
            self.err[kind] += 1
        self.lost += c.count
        c.count = 0
        c.head = 0
        c.out_len = 0
        c.in_len = 0
        c.pstate = P_HEAD
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fd, NULL)
        c_close(c.fd)
        c.fd = -1
        c.events = 0
        if c.state == S_READY:
            self.live -= 1
        c.state = S_IDLE
        c.retry_at = now + backoff_ns
        if backoff_ns == 0 and self.reconnect:
            self.open(i, now)

    cdef void open(self, int i, int64_t now):
        cdef HConn* c = &self.conns[i]
        cdef epoll_event ev
        cdef int fd
        try:
            fd = self.opener(c.g)
        except Exception:
            fd = -1
        self.connects += 1
        c.t_state = now
        if fd < 0:
            self.last_errno = -fd if fd < -1 else 0
            self.err[E_CONNECT] += 1
            c.retry_at = now + 200000000
            return
        c.fd = fd
        c.state = S_CONNECTING
        c.out_len = 0
        c.in_len = 0
        c.pstate = P_HEAD
        ev.events = EPOLLOUT
        ev.data.u64 = 0
        ev.data.u32 = <uint32_t>i
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            self.last_errno = errno
            c_close(fd)
            c.fd = -1
            c.state = S_IDLE
            self.err[E_CONNECT] += 1
            c.retry_at = now + 200000000
            return
        c.events = EPOLLOUT

    cdef void became_ready(self, int i, int64_t now) noexcept:
        cdef HConn* c = &self.conns[i]
        c.state = S_READY
        c.t_state = now
        self.live += 1
        self.connected_ok += 1
        c.ever_ready = 1
        self.set_events(i, EPOLLIN | (EPOLLOUT if c.out_len else 0))
        self.pump(i, now)

    cdef void on_connected(self, int i, int64_t now) noexcept:
        cdef HConn* c = &self.conns[i]
        cdef int soerr = 0
        cdef socklen_t sl = sizeof(int)
        if getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0:
            soerr = errno
        if soerr:
            self.last_errno = soerr
            self.drop(i, E_CONNECT, now, 200000000)
            return
        c.last_tx = now
        if self.transport == T_MQTT and c.hello_len:
            memcpy(c.outb, c.hello, c.hello_len)
            c.out_len = c.hello_len
            c.state = S_HELLO
            c.t_state = now
            self.set_events(i, EPOLLIN)
            self.flush(i, now)
        else:
            self.became_ready(i, now)

    cdef int flush(self, int i, int64_t now) noexcept:
        cdef HConn* c = &self.conns[i]
        cdef ssize_t r
        if c.fd < 0 or c.out_len == 0:
            return 0
        r = send_some(c.fd, c.outb, c.out_len)
        if r < 0:
            self.last_errno = errno
            self.drop(i, E_RESET, now, 100000000)
            return -1
        if r > 0:
            self.bytes_out += r
            c.last_tx = now
        out_sent(self.epfd, c.fd, <uint32_t>i, &c.events, c.outb, &c.out_len, <size_t>r)
        return <int>r

    # -- responses --------------------------------------------------------------
    cdef void answered_slot(self, HConn* c, uint32_t slot, int64_t now) noexcept:
        cdef double lat = <double>(now - c.ring_sched[slot])
        if lat < 0:
            lat = 0
        self.hrec(&self.lat, lat)
        self.hrec(&self.win, lat)
        self.hrec(&self.svc, <double>(now - c.ring_issue[slot]))
        self.answered += 1

    cdef int on_http_response(self, int i, int64_t now) noexcept:
        cdef HConn* c = &self.conns[i]
        if c.count == 0:
            self.drop(i, E_UNEXPECTED, now, 100000000)
            return -1
        self.answered_slot(c, c.head, now)
        c.head = (c.head + 1) % self.pipeline
        c.count -= 1
        self.status[c.status] += 1
        if 200 <= c.status < 300:
            self.ok += 1
        if c.retry_after:
            self.retry_after += 1
        if c.close_after:
            # The server said it closes: what is still outstanding is lost.
            self.server_closes += 1
            self.drop(i, E_CLOSED if c.count else -1, now, 0)
            return -1
        return 0

    cdef int parse_head(self, int i, const uint8_t* p, size_t n) noexcept:
        """Status line and headers (p: the block without the final CRLF CRLF)."""
        cdef HConn* c = &self.conns[i]
        cdef size_t pos, eol, colon, vs, ve, k
        cdef int64_t cl = -1
        cdef int chunked = 0, status
        if n < 12 or memcmp_prefix(p, b"HTTP/1.", 7) == 0 or not (48 <= p[7] <= 57) or p[8] != 32:
            return -1
        if not (48 <= p[9] <= 57 and 48 <= p[10] <= 57 and 48 <= p[11] <= 57):
            return -1
        status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
        if status < 100 or status > 599:
            return -1
        c.status = status
        c.close_after = p[7] == 48   # HTTP/1.0: closes unless it says keep-alive
        c.retry_after = 0
        pos = 0
        while pos < n and p[pos] != 10:
            pos += 1
        pos += 1
        while pos < n:
            eol = pos
            while eol < n and p[eol] != 10:
                eol += 1
            ve = eol
            if ve > pos and p[ve - 1] == 13:
                ve -= 1
            colon = pos
            while colon < ve and p[colon] != 58:
                colon += 1
            if colon < ve:
                vs = colon + 1
                while vs < ve and (p[vs] == 32 or p[vs] == 9):
                    vs += 1
                if name_is(p + pos, colon - pos, b"content-length"):
                    cl = 0
                    k = vs
                    while k < ve and 48 <= p[k] <= 57:
                        cl = cl * 10 + (p[k] - 48)
                        k += 1
                    if k == vs or cl > (<int64_t>1 << 40):
                        return -1
                elif name_is(p + pos, colon - pos, b"transfer-encoding"):
                    chunked = value_has(p + vs, ve - vs, b"chunked")
                elif name_is(p + pos, colon - pos, b"connection"):
                    if value_has(p + vs, ve - vs, b"close"):
                        c.close_after = 1
                    elif value_has(p + vs, ve - vs, b"keep-alive"):
                        c.close_after = 0
                elif name_is(p + pos, colon - pos, b"retry-after"):
                    c.retry_after = 1
            pos = eol + 1
        if status < 200 or status == 204 or status == 304:
            c.pstate = P_BODY
            c.body_left = 0
        elif chunked:
            c.pstate = P_CHUNK_SIZE
        elif cl >= 0:
            c.pstate = P_BODY
            c.body_left = cl
        else:
            c.pstate = P_UNTIL_CLOSE
        return 0

    cdef int parse_http(self, int i, int64_t now) noexcept:
        cdef HConn* c = &self.conns[i]
        cdef size_t pos = 0, avail, take, k
        cdef const uint8_t* hit
        cdef int64_t size
        cdef int informational
        cdef int done
        while True:
            avail = c.in_len - pos
            done = 0
            if c.pstate == P_HEAD:
                if avail == 0:
                    break
                hit = <const uint8_t*>memmem(c.inb + pos, avail, b"\r\n\r\n", 4)
                if hit == NULL:
                    if avail > MAX_HEAD:
                        self.drop(i, E_MALFORMED, now, 100000000)
                        return -1
                    break
                if self.parse_head(i, c.inb + pos, <size_t>(hit - (c.inb + pos))) < 0:
                    self.drop(i, E_MALFORMED, now, 100000000)
                    return -1
                pos = <size_t>(hit - c.inb) + 4
                if c.status < 200 and c.status != 101:
                    c.pstate = P_HEAD    # 1xx: an interim response, the real one follows
                    continue
                if c.status == 101:
                    self.drop(i, E_MALFORMED, now, 100000000)   # we never ask to switch protocols
                    return -1
                if c.pstate == P_BODY and c.body_left == 0:
                    done = 1
            elif c.pstate == P_BODY or c.pstate == P_CHUNK_DATA:
                if avail == 0:
                    break
                take = avail if <int64_t>avail < c.body_left else <size_t>c.body_left
                pos += take
                c.body_left -= take
                if c.body_left:
                    break
                if c.pstate == P_BODY:
                    done = 1
                else:
                    c.pstate = P_CHUNK_SIZE
            elif c.pstate == P_CHUNK_SIZE:
                hit = <const uint8_t*>memmem(c.inb + pos, avail, b"\r\n", 2)
                if hit == NULL:
                    if avail > 1024:
                        self.drop(i, E_MALFORMED, now, 100000000)
                        return -1
                    break
                size = 0
                k = pos
                while c.inb + k < hit:
                    if 48 <= c.inb[k] <= 57:
                        size = size * 16 + (c.inb[k] - 48)
                    elif 97 <= lower(c.inb[k]) <= 102:
                        size = size * 16 + (lower(c.inb[k]) - 87)
                    else:
                        break   # chunk extension
                    k += 1
                    if size > (<int64_t>1 << 40):
                        self.drop(i, E_MALFORMED, now, 100000000)
                        return -1
                if k == pos:
                    self.drop(i, E_MALFORMED, now, 100000000)
                    return -1
                pos = <size_t>(hit - c.inb) + 2
                if size == 0:
                    c.pstate = P_TRAILER
                else:
                    c.pstate = P_CHUNK_DATA
                    c.body_left = size + 2   # the data and its CRLF
            elif c.pstate == P_TRAILER:
                hit = <const uint8_t*>memmem(c.inb + pos, avail, b"\r\n", 2)
                if hit == NULL:
                    if avail > MAX_HEAD:
                        self.drop(i, E_MALFORMED, now, 100000000)
                        return -1
                    break
                if hit == c.inb + pos:
                    done = 1
                pos = <size_t>(hit - c.inb) + 2
            else:  # P_UNTIL_CLOSE: the body ends with the connection
                pos = c.in_len
                break
            if done:
                c.pstate = P_HEAD
                if self.on_http_response(i, now) < 0:
                    return -1
        if pos:
            if pos < c.in_len:
                memmove(c.inb, c.inb + pos, c.in_len - pos)
            c.in_len -= pos
        if c.in_len == c.in_cap:
            if self.grow_in(c) < 0:
                self.drop(i, E_MALFORMED, now, 100000000)
                return -1
        return 0

    cdef int grow_in(self, HConn* c) noexcept:
        cdef uint8_t* p
        if c.in_cap >= 4 * MAX_HEAD:
            return -1
        p = <uint8_t*>realloc(c.inb, c.in_cap * 2)
        if p == NULL:
            return -1
        c.inb = p
        c.in_cap *= 2
        return 0

    cdef int on_puback(self, int i, uint16_t pid, int64_t now) noexcept:
        cdef HConn* c = &self.conns[i]
        cdef uint32_t k, slot
        for k in range(c.count):
            slot = (c.head + k) % self.pipeline
            if c.ring_pid[slot] == pid:
                self.answered_slot(c, slot, now)
                self.ok += 1
                self.status[0] += 1    # index 0: PUBACK
                c.ring_pid[slot] = 0
                while c.count and c.ring_pid[c.head] == 0:
                    c.head = (c.head + 1) % self.pipeline
                    c.count -= 1
                return 0
        self.err[E_UNEXPECTED] += 1
        return 0

    cdef int parse_mqtt(self, int i, int64_t now) noexcept:
        cdef HConn* c = &self.conns[i]
        cdef size_t pos = 0, hl
        cdef uint32_t rem, mult
        cdef uint8_t first, b
        cdef int t, complete
        cdef const uint8_t* body
        while c.in_len - pos >= 2:
            first = c.inb[pos]
            rem = 0
            mult = 1
            hl = 1
            complete = 0
            while hl <= 4 and pos + hl < c.in_len:
                b = c.inb[pos + hl]
                rem += (b & 127) * mult
                mult *= 128
                hl += 1
                if not (b & 128):
                    complete = 1
                    break
            if not complete:
                if hl > 4:
                    self.drop(i, E_MALFORMED, now, 100000000)
                    return -1
                break
            if rem > 4 * MAX_HEAD:
                self.drop(i, E_MALFORMED, now, 100000000)
                return -1
            if pos + hl + rem > c.in_len:
                if hl + rem > c.in_cap:
                    if self.grow_in(c) < 0:
                        self.drop(i, E_MALFORMED, now, 100000000)
                        return -1
                break
            body = c.inb + pos + hl
            t = first >> 4
            if t == 2:   # CONNACK
                if c.state != S_HELLO or rem != 2:
                    self.err[E_UNEXPECTED] += 1
                elif body[1] != 0:
                    self.last_errno = 0
                    self.drop(i, E_CONNACK, now, 1000000000)
                    return -1
                else:
                    pos += hl + rem
                    self.became_ready(i, now)
                    if c.fd < 0:
                        return -1
                    continue
            elif t == 4 and rem == 2:   # PUBACK
                self.on_puback(i, <uint16_t>((body[0] << 8) | body[1]), now)
            elif t == 13:   # PINGRESP
                pass
            else:
                self.err[E_UNEXPECTED] += 1
            pos += hl + rem
        if pos:
            if pos < c.in_len:
                memmove(c.inb, c.inb + pos, c.in_len - pos)
            c.in_len -= pos
        return 0

    cdef void do_read(self, int i, int64_t now) noexcept:
        cdef HConn* c = &self.conns[i]
        cdef ssize_t r
        cdef size_t space
        cdef int turns = 0, rc
        while c.fd >= 0 and turns < 8:
            space = c.in_cap - c.in_len
            r = recv_some(c.fd, c.inb + c.in_len, space)
            if r > 0:
                c.in_len += r
                self.bytes_in += r
                if self.transport == T_HTTP:
                    rc = self.parse_http(i, now)
                else:
                    rc = self.parse_mqtt(i, now)
                if rc < 0:
                    return
                if <size_t>r < space:
                    return
            elif r == RECV_CLOSED:
                if self.transport == T_HTTP and c.pstate == P_UNTIL_CLOSE:
                    # a response delimited by the end of the connection
                    c.pstate = P_HEAD
                    c.close_after = 1
                    self.on_http_response(i, now)
                    return
                if c.count == 0 and c.in_len == 0 and c.state == S_READY:
                    self.server_closes += 1     # an idle keep-alive connection closed: reopen it
                    self.drop(i, -1, now, 0)
                else:
                    self.drop(i, E_CLOSED, now, 100000000)
                return
            else:
                if r != RECV_EMPTY:
                    self.last_errno = errno
                    self.drop(i, E_RESET, now, 100000000)
                return
            turns += 1

    cdef void housekeeping(self, int64_t now):
        cdef int i
        cdef HConn* c
        for i in range(self.n):
            c = &self.conns[i]
            if c.state == S_CONNECTING or c.state == S_HELLO:
                if now - c.t_state > self.connect_timeout_ns:
                    self.drop(i, E_CONNECT_TIMEOUT, now, 0)
            elif c.state == S_IDLE:
                if self.reconnect and c.fd < 0 and now >= c.retry_at:
                    self.open(i, now)
            elif c.state == S_READY and self.transport == T_MQTT and self.keepalive_ns > 0:
                if now - c.last_tx >= self.keepalive_ns // 2 and self.ensure_out(c, 2) == 0:
                    c.outb[c.out_len] = 0xC0
                    c.outb[c.out_len + 1] = 0
                    c.out_len += 2
                    self.pingreqs += 1
                    self.flush(i, now)

    # -- the run ----------------------------------------------------------------
    def open_all(self):
        cdef int64_t now = mono_ns()
        cdef int i
        self.reconnect = 1
        for i in range(self.n):
            if self.conns[i].state == S_IDLE and self.conns[i].fd < 0:
                self.open(i, now)

    def start(self, int64_t t0_ns, int64_t t_stop_ns, double total_rate):
        """Requests from t0 to t_stop: total_rate/s over all C clients (open
        loop), or 0: every connection keeps `pipeline` outstanding."""
        if total_rate > 0:
            # Wake on time: the default 50 us timer slack would show in every
            # request's latency from its due time.
            prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
        self.t0 = t0_ns
        self.t_stop = t_stop_ns
        self.ns_per_req = 1e9 / total_rate if total_rate > 0 else 0.0
        self.cur_j = 0
        self.cur_round = 0
        self.sched_done = 0 if (total_rate > 0 and self.n > 0) else 1
        self.next_due = t0_ns
        self.started = 1
        self.kicked = 0

    cdef int wait(self, int64_t now, int64_t wake) noexcept:
        cdef timespec ts
        cdef int64_t dt = wake - now
        cdef int nev, ms
        if dt < 0:
            dt = 0
        if self.use_pwait2:
            ts.tv_sec = dt // 1000000000
            ts.tv_nsec = dt % 1000000000
            nev = epoll_pwait2(self.epfd, self.evs, MAXEV, &ts, NULL)
            if nev < 0 and errno == ENOSYS:
                self.use_pwait2 = 0
            else:
                return nev
        ms = <int>((dt + 999999) // 1000000)
        return epoll_wait(self.epfd, self.evs, MAXEV, ms)

    def run(self, int64_t until_ns):
        """Runs the loop until CLOCK_MONOTONIC reaches until_ns."""
        cdef int64_t now, wake, last_house = 0
        cdef int i, k, nev
        cdef uint32_t ev
        cdef HConn* c
        while True:
            now = mono_ns()
            if now >= until_ns:
                break
            if now - last_house >= HOUSE_NS:
                last_house = now
                self.housekeeping(now)
            if self.started and now >= self.t0:
                if self.ns_per_req > 0:
                    self.advance_schedule(now)
                    for k in range(self.ndirty):
                        i = self.dirty[k]
                        self.conns[i].dirty = 0
                        self.pump(i, now)
                    self.ndirty = 0
                elif not self.kicked:
                    self.kicked = 1
                    for i in range(self.n):
                        self.pump(i, now)
            wake = min(until_ns, last_house + HOUSE_NS)
            if self.started:
                if now < self.t0:
                    wake = min(wake, self.t0)
                elif self.ns_per_req > 0 and not self.sched_done:
                    wake = min(wake, self.next_due)
            nev = self.wait(now, wake)
            if nev <= 0:
                continue
            now = mono_ns()
            for k in range(nev):
                i = <int>self.evs[k].data.u32
                ev = self.evs[k].events
                c = &self.conns[i]
                if c.fd < 0:
                    continue
                if c.state == S_CONNECTING:
                    if ev & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                        self.on_connected(i, now)
                    continue
                if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
                    self.do_read(i, now)
                    if c.fd < 0:
                        continue
                    if c.state == S_READY:
                        self.pump(i, now)   # refill the pipeline, write at once
                        continue
                if c.out_len and ev & EPOLLOUT:
                    self.flush(i, now)

    # -- state for the worker -----------------------------------------------------
    def ready_count(self):
        cdef int i, t = 0
        for i in range(self.n):
            t += self.conns[i].state == S_READY
        return t

    def connecting_count(self):
        cdef int i, t = 0
        for i in range(self.n):
            t += self.conns[i].state == S_CONNECTING or self.conns[i].state == S_HELLO
        return t

    def ever_ready_count(self):
        cdef int i, t = 0
        for i in range(self.n):
            t += self.conns[i].ever_ready != 0
        return t

    def outstanding(self):
        cdef int i
        cdef uint64_t t = 0
        for i in range(self.n):
            t += self.conns[i].count
        return t

    def backlog(self):
        """Open loop: requests that were due but not sent (yet)."""
        cdef int i
        cdef uint64_t t = 0
        for i in range(self.n):
            if self.conns[i].sched_n > self.conns[i].issued:
                t += self.conns[i].sched_n - self.conns[i].issued
        return t

    def drained(self):
        """True when the schedule is over and nothing is due or outstanding."""
        if not self.started or not self.sched_done:
            return False
        return self.outstanding() == 0 and self.backlog() == 0

    def scheduled(self):
        """Open loop: requests that came due over the whole run."""
        cdef int i
        cdef uint64_t t = 0
        for i in range(self.n):
            t += self.conns[i].sched_n
        return t

    def close_all(self, double budget_s=1.0):
        """Stops reconnecting; MQTT: DISCONNECT; then closes every socket."""
        cdef int i, pending
        cdef HConn* c
        cdef int64_t now = mono_ns()
        cdef int64_t deadline = now + <int64_t>(budget_s * 1e9)
        self.reconnect = 0
        if self.transport == T_MQTT:
            for i in range(self.n):
                c = &self.conns[i]
                if c.state == S_READY and self.ensure_out(c, 2) == 0:
                    c.outb[c.out_len] = 0xE0
                    c.outb[c.out_len + 1] = 0
                    c.out_len += 2
            while True:
                pending = 0
                now = mono_ns()
                for i in range(self.n):
                    c = &self.conns[i]
                    if c.fd >= 0 and c.out_len:
                        self.flush(i, now)
                        if c.fd >= 0 and c.out_len:
                            pending += 1
                if not pending or now >= deadline:
                    break
                epoll_wait(self.epfd, self.evs, MAXEV, 10)
        for i in range(self.n):
            c = &self.conns[i]
            if c.fd < 0:
                c.state = S_DONE
                continue
            c_shutdown(c.fd, SHUT_WR)
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fd, NULL)
            c_close(c.fd)
            c.fd = -1
            if c.state == S_READY:
                self.live -= 1
            c.state = S_DONE

    def status_counts(self):
        """{status code: responses} ('puback' for MQTT acknowledgements)."""
        cdef int k
        out = {}
        if self.status[0]:
            out["puback"] = self.status[0]
        for k in range(100, 600):
            if self.status[k]:
                out[str(k)] = self.status[k]
        return out

    def errors(self):
        cdef int k
        return {ERROR_NAMES[k]: self.err[k] for k in range(E_COUNT) if self.err[k]}

    def error_total(self):
        cdef int k
        cdef uint64_t t = 0
        for k in range(E_COUNT):
            t += self.err[k]
        return t

    def anomaly_list(self):
        """[(device index, seq)] of the anomalies injected (the first 100,000)."""
        cdef uint32_t k
        return [(self.an_dev[k], self.an_seq[k]) for k in range(self.an_n)]

    cdef dict _hist(self, Hist* h):
        return hist_dict(h, self.scale.nb)

    def latency_hist(self):
        """From each request's due time to its response (open loop: includes
        any wait behind the schedule)."""
        return self._hist(&self.lat)

    def service_hist(self):
        """From the moment a request was written to its connection's buffer."""
        return self._hist(&self.svc)

    def lag_hist(self):
        """Open loop: from each request's due time to the moment it was
        written to its connection's buffer (the tool's or the server's delay)."""
        return self._hist(&self.lag)

    def take_window(self):
        """The latency histogram since the previous call, then cleared."""
        d = self._hist(&self.win)
        hist_clear(&self.win, self.scale.nb)
        return d

    def record_latency(self, values):
        """Records values (ns) as responses are (tests of bucket agreement)."""
        for v in values:
            self.hrec(&self.lat, <double>v)

    def sample(self, uint32_t dev, uint32_t seq, int64_t sched_ns=0, uint16_t pid=1):
        """(request bytes, is_anomaly) for a device and seq, as the run would
        send it (for tests and for checking a detector)."""
        if self.tpl == NULL:
            raise ValueError("no template")
        buf = PyBytes_FromStringAndSize(NULL, self.tpl_len)
        a = self.render(<uint8_t*>PyBytes_AS_STRING(buf), dev, seq, sched_ns, pid)
        return buf, bool(a)

