# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The worker: one epoll loop per process, no asyncio. The loop is the only
thread that touches connections; beside it run the write-ahead log's flusher
thread (C, gw_ext/wal_flusher.c), the persistence writer thread (C,
gw_ext/filewriter_thread.c), the query threads running the store queries
and the auth threads checking passwords (gw/query_pool.py, Python: the loop
lets go of the GIL while it waits in epoll_wait, so they run then). The
flusher, the query and the auth threads signal the loop through an eventfd
in its epoll set; the writer's completions are
collected by the persistence tick, about once a second (gw/persistence.py).

Data flows one way: socket -> framing (this file: one recv_into a shared
buffer, many packets parsed in place, only a cut-off tail copied aside) ->
codec (gw_ext.codec) -> packet handlers (gw_ext/worker/*.pyx, included below)
-> outbound buffers, flushed with one write per connection per loop turn.

An MQTT packet's path touches no Python object, but for retained messages
(the store is a dict, worker/retained.pyx) and publishes on the telemetry
topics (their schema, gw/ingest.py, worker/telemetry.pyx). Python is called
too for each JSON line (gw/jsonproto.py, msgspec), each complete HTTP request
(gw/http_api.py), and for rare events: rate-limited log lines, session
snapshots, signals and reloads.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, ECONNABORTED, EINTR, EMFILE, ENFILE, EPROTO, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.stdio cimport snprintf
from libc.string cimport memchr, memcmp, memcpy, memmove, memset
from libc.time cimport gmtime_r, strftime, time, time_t, tm
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from gw_ext.acl cimport ACL_READ, ACL_WRITE, AclRules, acl_allowed, acl_view_free
from gw_ext.codec cimport *
from gw_ext.codec5 cimport (P_CONTENT_TYPE, P_CORRELATION_DATA, P_MESSAGE_EXPIRY, P_PAYLOAD_FORMAT, P_RESPONSE_TOPIC,
                            P_SUBSCRIPTION_ID, P_TOPIC_ALIAS, P_USER_PROPERTY, P_WILL_DELAY, publish5_size, put_prop_u32,
                            varint_size, write_varint)
from gw_ext.netio cimport *
from gw_ext.openssl cimport *
from gw_ext.stats cimport *
from gw_ext.tls cimport (CN_OK, REFUSED_NONE, TLSContext, client_refusal, peer_common_name)
from gw_ext.tls import CN_REASONS, REFUSAL_REASONS
from gw_ext.wal cimport Wal
from gw_ext.addrlimit cimport AddressCounts, gw_peer_address
from gw_ext.dedup cimport DedupTable, GWD_DUPLICATE, GWD_NEW, GWD_PENDING_ELSEWHERE, GWD_PENDING_HERE
from gw_ext.frames cimport *
from gw_ext.topics cimport *
from gw_ext.wsframe cimport *
from gw_ext.wheel cimport (TimerNode, Wheel, wheel_cancel, wheel_expire, wheel_free, wheel_init, wheel_pop_expired,
                           wheel_schedule)

import logging
import os
import socket
from struct import pack as struct_pack, unpack_from as struct_unpack_from

log = logging.getLogger("gw.worker")


cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1

cdef extern from *:
    """
    #include <errno.h>
    #include <sys/socket.h>
    static inline void clear_errno(void) { errno = 0; }
    /* accept4 with the peer's address (glibc types that argument as a union of sockaddr pointers). */
    static inline int accept_peer(int fd, void* addr, socklen_t* len, int flags) {
        return accept4(fd, (struct sockaddr*)addr, len, flags);
    }
    """
    void clear_errno() nogil
    int accept_peer(int fd, void* addr, socklen_t* len, int flags) nogil

cdef extern from "<string.h>":
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen) nogil


cdef enum:
    MAX_EVENTS = 1024
    READ_BUFFER = 256 * 1024     # shared by all connections of the worker
    ACCEPT_BATCH = 128           # accepts per listener event, for fairness
    FRESH_MAX = 256              # new connections read in their accept's turn (Worker.fresh_fds); more wait for epoll
    TICK_MS = 100                # timing-wheel resolution
    STORE_CHECK_MS = 100         # how often the store's lag on this worker's log is looked at
    WHEEL_SLOTS = 4096           # one revolution = 409.6 s
    WILL_WHEEL_SLOTS = 512       # the held wills' wheel (worker/will_delay.pyx): 51.2 s a revolution

# The counter each CloseReason (loop.pxd) adds to.
cdef uint32_t[N_CLOSE_REASONS] CLOSE_COUNTER = [
    CLOSED_CLIENT, CLOSED_TIMEOUT, CLOSED_CONNECT_TIMEOUT, CLOSED_MALFORMED, CLOSED_SERVER,
    CLOSED_ERROR, CLOSED_MALFORMED, CLOSED_SERVER, CLOSED_ERROR, CLOSED_SERVER,
    CLOSED_CLIENT, CLOSED_SERVER, CLOSED_SERVER, CLOSED_SERVER, CLOSED_SERVER, CLOSED_SERVER,
    CLOSED_SERVER, CLOSED_SERVER, CLOSED_INTERNAL, CLOSED_LIMIT, CLOSED_SERVER, CLOSED_ERROR, CLOSED_ERROR,
    CLOSED_ERROR, CLOSED_SERVER, CLOSED_SERVER, CLOSED_SERVER, CLOSED_SERVER, CLOSED_SERVER, CLOSED_SERVER,
    CLOSED_SERVER,
    CLOSED_SERVER, CLOSED_SERVER, CLOSED_MALFORMED]

# LIMITS + LIM_* (gw_ext/stats.pxd): the setting each bound is.
LIMIT_SETTINGS = ["max_awaiting_rel", "max_subscriptions", "max_topic_levels", "max_topic_length",
                  "max_queued_bytes", "max_retained_bytes"]

MALFORMED_NAMES = ["unknown", "fixed header", "remaining length", "invalid UTF-8",
                   "protocol violation", "invalid topic", "invalid QoS", "packet id 0",
                   "no topic filter", "control character", "a packet only servers send",
                   "acknowledgement of the wrong kind"]


def peer_address(int fd):
    """A connected socket's peer as "host:port", for a log line; "?" if it is gone."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            peer = sock.getpeername()
    except OSError:
        return "?"
    return "[%s]:%d" % peer[:2] if ":" in peer[0] else "%s:%d" % peer[:2]


cdef inline uint64_t monotonic_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>(ts.tv_nsec // 1000000)


cdef inline uint64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


@cython.final
cdef int _watch_readable(int epfd, Conn* c, int fd, uint8_t state) except -1:
    # A descriptor set up once (listener, channel, eventfd) joins the epoll set,
    # readable, as the slot `c` in `state`.
    cdef epoll_event ev
    c.state = state
    c.fd = fd
    ev.events = EPOLLIN
    ev.data.u64 = 0
    ev.data.fd = fd
    if epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0:
        raise OSError(errno, "epoll_ctl")
    return 0


cdef class Worker:
    """One worker process's event loop. Built and configured by gw/worker.py."""

    def __cinit__(self):
        self.epfd = -1
        self.reserve_fd = -1
        self.http_current_fd = -1

    def __init__(self, int worker_index, object counters_row, object all_counters, int nworkers,
                 object json_protocol, int max_fds):
        cdef int i
        cdef uint64_t[::1] row = counters_row
        cdef uint64_t[:, ::1] rows = all_counters
        self.worker_index = worker_index
        self.counters = &row[0]
        self.all_counters = &rows[0, 0]
        self.nworkers = nworkers
        self.counters_owner = (counters_row, all_counters)
        self.json_protocol = json_protocol
        # Its limits (max_connections, max_packet_size, timeouts, ...) are zero
        # until gw/worker.py's apply_limits sets them from the config: the one
        # place they are set, so their defaults are gw/config.py's alone.
        self.telemetry_prefix = b""
        self.ws_path = b"/mqtt"
        self.ws_allowed_origins = frozenset()
        self.held_http = {}
        self.client_sessions = {}
        self.registry = {}
        self.registry_users = {}
        self.restored = []
        self.congested = set()
        self.pending = {}
        self.auth_waiting = {}
        self.scram_states = {}
        self.allow_anonymous = True
        self.certificate_anonymous = True
        self.settle_orphans = []
        self.unconfirmed = {}
        self.claim_checks = {}
        self.held_checks = []
        self.pending_subacks = {}
        self.retained = {}
        self.topic_aliases = {}
        self.alias_fd = -1
        self.alias_table = None
        self.index = topics_new()
        topics_result_init(&self.match)
        self.share_index = topics_new()
        topics_result_init(&self.share_match)
        self.share_ids = {}
        self.share_keys = []
        self.free_groups = []
        self.npeers = nworkers
        for i in range(MAX_PEERS):
            self.peers[i].fd = -1
        self.listener_contexts = [None] * MAX_LISTENERS
        self.nconns = max_fds
        self.conns = <Conn*>calloc(max_fds, sizeof(Conn))
        self.rbuf = <uint8_t*>malloc(READ_BUFFER)
        self.dirty = <int*>malloc(max_fds * sizeof(int))
        self.closed = <int*>malloc(max_fds * sizeof(int))
        self.resume_fds = <int*>malloc(max_fds * sizeof(int))
        self.resume_gens = <uint32_t*>malloc(max_fds * sizeof(uint32_t))
        self.current_fd = -1
        if (self.conns == NULL or self.rbuf == NULL or self.dirty == NULL or self.index == NULL
                or self.share_index == NULL
                or self.closed == NULL or self.resume_fds == NULL or self.resume_gens == NULL):
            raise MemoryError()
        self.now_ms = monotonic_ms()
        if wheel_init(&self.wheel, WHEEL_SLOTS, TICK_MS, self.now_ms) != 0:
            raise MemoryError()
        if wheel_init(&self.will_wheel, WILL_WHEEL_SLOTS, TICK_MS, self.now_ms) != 0:
            raise MemoryError()
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1")
        self.reserve_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)

    def __dealloc__(self):
        cdef int fd
        cdef uint32_t slot
        if self.conns != NULL:
            for fd in range(self.nconns):
                if is_client_state(self.conns[fd].state) or self.conns[fd].state == ST_CLOSED:
                    self.release(&self.conns[fd])
            free(self.conns)
        free(self.closed)
        free(self.resume_fds)
        free(self.resume_gens)
        shared_free_all(self)
        for slot in range(self.nsessions):
            if self.sessions[slot].in_use:
                session_free(self, slot, False, False)
        free(self.sessions)
        free(self.free_sessions)
        for fd in range(MAX_PEERS):
            free(self.peers[fd].out)
            free(self.peers[fd].asm)
        if self.index != NULL:
            topics_free(self.index)
        topics_result_free(&self.match)
        free(self.chan_buf)
        free(self.http)
        free(self.held)
        free(self.held_per_fd)
        free(self.held_pubacks)
        free(self.rates)
        free(self.rate_paused_fds)
        free(self.rate_paused_gens)
        free(self.rbuf)
        free(self.dirty)
        free(self.pub_fds)
        free(self.pub_gens)
        for fd in range(self.nspare_out):
            free(self.spare_out[fd])
        self.nspare_out = 0
        free(self.ws_states)
        wheel_free(&self.wheel)
        wheel_free(&self.will_wheel)        # after the sessions: session_free unschedules their wills
        if self.epfd >= 0:
            close(self.epfd)
        if self.reserve_fd >= 0:
            close(self.reserve_fd)

    # --- set-up (Python) -----------------------------------------------------

    def add_listener(self, int fd, str proto, TLSContext tls=None, bint ack_sink=False):
        """Registers a listening socket (already bound, listening, non-blocking)."""
        cdef Listener* l
        if self.nlisteners >= MAX_LISTENERS:
            raise ValueError("too many listeners")
        if fd >= self.nconns:
            raise ValueError("listener fd above the fd limit")
        if proto not in ("mqtt", "json", "http", "ws"):
            raise ValueError("unknown listener protocol %r" % proto)
        if proto == "ws" and self.ws_states == NULL:
            self.ws_states = <WsState*>calloc(self.nconns, sizeof(WsState))
            if self.ws_states == NULL:
                raise MemoryError()
        if proto == "http" and self.http == NULL:
            self.http = <HttpState*>calloc(self.nconns, sizeof(HttpState))
            if self.http == NULL:
                raise MemoryError()
        l = &self.listeners[self.nlisteners]
        l.fd = fd
        l.proto = PROTO_MQTT if proto in ("mqtt", "ws") else PROTO_JSON if proto == "json" else PROTO_HTTP
        l.ws = proto == "ws"        # MQTT in WebSocket frames, after an HTTP upgrade (worker/websocket.pyx)
        l.ack_sink = ack_sink
        l.ctx = NULL
        l.identity_username = 0
        l.client_certificate = 0
        if tls is not None:
            SSL_CTX_up_ref(tls.ctx)
            l.ctx = tls.ctx
            l.identity_username = tls.use_identity_as_username
            l.client_certificate = tls.require_certificate
            self.listener_contexts[self.nlisteners] = tls
        self.conns[fd].listener = self.nlisteners
        _watch_readable(self.epfd, &self.conns[fd], fd, ST_LISTENER)
        self.nlisteners += 1
        return self.nlisteners - 1

    def add_peer(self, int peer, int fd):
        """Registers the channel (a non-blocking SOCK_SEQPACKET socket) to worker `peer`."""
        if not 0 <= peer < MAX_PEERS or peer == self.worker_index or fd >= self.nconns:
            raise ValueError("bad peer %d / fd %d" % (peer, fd))
        self.peers[peer].fd = fd
        self.peers[peer].dgram = channel_datagram_size(fd)
        if self.peers[peer].dgram > self.chan_buf_size:
            # The receive buffer holds the largest datagram a link sends (allocated at the first read).
            self.chan_buf_size = self.peers[peer].dgram
            free(self.chan_buf)
            self.chan_buf = NULL
        self.conns[fd].listener = peer
        _watch_readable(self.epfd, &self.conns[fd], fd, ST_CHANNEL)

    def set_wal(self, Wal wal):
        """The worker's write-ahead log (recovered): readings go to it; its eventfd
        joins the epoll set, so answers held for durability go out as soon as it is."""
        cdef int fd = wal.fileno()
        if fd >= self.nconns:
            raise ValueError("the log's eventfd is above the fd limit")
        self.held_per_fd = <uint32_t*>calloc(self.nconns, sizeof(uint32_t))
        self.held_pubacks = <uint32_t*>calloc(self.nconns, sizeof(uint32_t))
        if self.held_per_fd == NULL or self.held_pubacks == NULL:
            raise MemoryError()
        self.wal = wal
        self.wal_durable = wal.durable_offset
        self.counters[WAL_DURABLE_OFFSET] = self.wal_durable
        _watch_readable(self.epfd, &self.conns[fd], fd, ST_WAL)

    def set_dedup(self, DedupTable dedup):
        """The idempotency table, attached as this worker: the readings it records
        as pending are committed as the log becomes durable past them."""
        self.dedup = dedup

    def set_acl(self, AclRules rules):
        """The ACL in force (gw_ext/acl.pyx; None: no acl_file, everything
        allowed). A new version takes effect at each session's next check:
        its view and cached verdicts belong to the version they were made
        for (worker/access.pyx)."""
        self.acl = rules

    @property
    def acl_rules(self):
        return self.acl
    def set_rate_limits(self, double conn_rate=0, double conn_burst=0, double messages_rate=0,
                        double messages_burst=0, double bytes_rate=0, double bytes_burst=0,
                        int per_ip=0):
        """The rate limits (worker/rate_limits.pyx), at start and on SIGHUP; 0:
        unlimited. conn_rate and conn_burst are the server's, per listener: this
        worker takes its share (1 / workers; a burst of at least 1). A burst of
        0 is one second's worth of its rate (bytes: at least max_packet_size,
        set before). per_ip counts from now on: connections accepted while it
        was 0 are not counted."""
        if min(conn_rate, conn_burst, messages_rate, messages_burst, bytes_rate, bytes_burst, per_ip) < 0:
            raise ValueError("rate limits cannot be negative")
        if per_ip > 65535:
            raise ValueError("per_ip is at most 65535")
        self.conn_rate = conn_rate / self.nworkers
        self.conn_burst = max(1.0, (conn_burst or conn_rate) / self.nworkers)
        self.msg_rate = messages_rate
        self.msg_burst = max(1.0, messages_burst or messages_rate)
        self.byte_rate = bytes_rate
        self.byte_burst = max(<double>self.max_packet_size, bytes_burst or bytes_rate)
        self.max_per_ip = per_ip
        if (messages_rate > 0 or bytes_rate > 0) and self.rates == NULL:
            # Allocated with the first per-client rate (kept: a reload may set one again);
            # calloc: every bucket starts "never refilled", which is full.
            self.rates = <RateBucket*>calloc(self.nconns, sizeof(RateBucket))
            self.rate_paused_fds = <int*>malloc(self.nconns * sizeof(int))
            self.rate_paused_gens = <uint32_t*>malloc(self.nconns * sizeof(uint32_t))
            if self.rates == NULL or self.rate_paused_fds == NULL or self.rate_paused_gens == NULL:
                free(self.rates)
                free(self.rate_paused_fds)
                free(self.rate_paused_gens)
                self.rates = NULL
                self.rate_paused_fds = NULL
                self.rate_paused_gens = NULL
                raise MemoryError()

    def set_address_counts(self, AddressCounts counts):
        """The shared counts of connections per address (gw_ext/addrlimit.pyx),
        made by the master, for max_connections_per_ip."""
        if counts is not None and self.worker_index >= counts.nworkers:
            raise ValueError("the address counts have no row for worker %d" % self.worker_index)
        self.addr_counts = counts

    @property
    def rate_paused(self):
        """Connections of this worker not read now because of a rate limit."""
        return self.counters[RATE_PAUSED]

    def set_query_pool(self, object pool):
        """The query threads (gw/query_pool.py): their eventfd joins the epoll set,
        so an answered query goes out on its connection in the next loop turn."""
        cdef int fd = pool.fileno()
        if fd >= self.nconns:
            raise ValueError("the query threads' eventfd is above the fd limit")
        self.query_pool = pool
        _watch_readable(self.epfd, &self.conns[fd], fd, ST_QUERY)

    def set_auth(self, object authenticator, object pool):
        """Password checks (gw/auth.py): the Authenticator in force (None: no
        password file) and the auth threads, whose eventfd joins the epoll set
        (None: auth_threads = 0, the checks run in the loop)."""
        cdef int fd
        if pool is not None and self.auth_pool is None:
            fd = pool.fileno()
            if fd >= self.nconns:
                raise ValueError("the auth threads' eventfd is above the fd limit")
            _watch_readable(self.epfd, &self.conns[fd], fd, ST_AUTH)
            self.auth_pool = pool
        self.authenticator = authenticator

    @property
    def telemetry_topic(self):
        return self.telemetry_prefix.rstrip(b"/").decode()

    @telemetry_topic.setter
    def telemetry_topic(self, str prefix):
        """MQTT publishes on PREFIX/{device_id} go through the ingest schema ('' : none)."""
        self.telemetry_prefix = (prefix + "/").encode() if prefix else b""

    def publish(self, bytes topic, bytes payload, int qos=0, bint retain=False):
        """Publishes as the server itself ($SYS topics): to every worker."""
        self.publishing_as_server = True
        try:
            route_publish(self, <const uint8_t*>PyBytes_AS_STRING(topic), len(topic),
                          <const uint8_t*>PyBytes_AS_STRING(payload), len(payload), qos, retain, True,
                          self.now_ns, NULL, 0)
        finally:
            self.publishing_as_server = False

    def snapshot_sessions(self, bint changed_only=False):
        """[(slot, client id, state)] of every clean_session=0 session, for the
        data dir. With changed_only, of the slots changed since the last call
        only (serializing only those), with (slot, None, None) for a slot that
        no longer holds such a session."""
        return sessions_snapshot(self, changed_only)

    def restore_sessions(self, list saved):
        """Brings back saved sessions (at start-up), their clients away, and
        registers them at their ids' homes."""
        sessions_load(self, saved)

    @property
    def changed(self):
        """(sessions changed, retained changed) since the last snapshot."""
        return self.sessions_changed, self.retained_changed

    def expire_sessions(self, double seconds):
        """Ends clean_session=0 sessions whose client has been away longer than
        `seconds`; returns how many."""
        return sessions_expire(self, <uint64_t>(seconds * 1000))

    def retained_saved(self):
        self.retained_changed = False

    def retain(self, bytes topic, int qos, bytes payload, bytes ext=None):
        """Keeps a retained message loaded from the data dir (not routed), within
        the retained store's bounds; False when refused (a bad topic or QoS).
        `ext`: an MQTT 5.0 message's extras (loop.pxd, Msg), None: none."""
        return retain_loaded(self, topic, qos, payload, ext)

    @property
    def retained_messages(self):
        """The retained store (topic -> (qos, payload), or (qos, payload, extras)
        for an MQTT 5.0 message with properties); for persistence and tests."""
        return self.retained

    def set_tls_context(self, int index, TLSContext tls):
        """Swaps a TLS listener's context (SIGHUP): new handshakes use it, established
        connections keep theirs (each SSL holds a reference to its SSL_CTX)."""
        cdef Listener* l = &self.listeners[index]
        if l.ctx == NULL:
            raise ValueError("listener %d is not TLS" % index)
        SSL_CTX_up_ref(tls.ctx)
        SSL_CTX_free(l.ctx)
        l.ctx = tls.ctx
        l.identity_username = tls.use_identity_as_username
        l.client_certificate = tls.require_certificate
        self.listener_contexts[index] = tls

    def request_drain(self, double seconds):
        """Stops accepting, flushes and closes every connection; run() returns when
        all are closed or after `seconds`."""
        if not self.draining:
            self.draining = True
            self.drain_deadline_ms = monotonic_ms() + <uint64_t>(seconds * 1000)

    def request_reload(self):
        self.reload_requested = True

    @property
    def connections(self):
        return self.counters[CONNS_CURRENT]

    # --- the loop ------------------------------------------------------------

    def run(self):
        """Serves until a drain completes (SIGTERM) or its deadline passes."""
        self.begin()
        while not self.turn(TICK_MS):
            pass
        self.close_all(CR_SERVER)
        self.reap_closed()
        self.stopped = True

    def run_once(self, int timeout_ms=0):
        """One loop turn, waiting at most timeout_ms for events (tests and
        fuzzers drive the loop with it). True once a drain has completed."""
        if not self.begun:
            self.begin()
        return self.turn(timeout_ms)

    cdef void begin(self):
        """Tells the other workers we (re)started: they forget our old interests
        and send theirs, and the retained store; the sessions loaded from the
        data dir are registered at their ids' homes."""
        self.begun = True
        channels_hello(self)
        registry_register_restored(self)
        channels_flush(self)

    cdef bint turn(self, int timeout_ms):
        """One turn of the loop. True when the worker has drained and should stop.

        Phases: the events (input, accepts, channel frames, the log's eventfd);
        connections whose CONNECT settled meanwhile go on with their input;
        timers; closed connections are freed (reap_closed: the only place);
        then each peer's frames and each client's output leave, one write each.
        An exception while handling one connection closes that connection
        (contained), never the worker."""
        cdef epoll_event[MAX_EVENTS] events
        cdef int n, i
        with nogil:     # the query threads (Python) run while the loop waits
            n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms)
        self.now_ns = monotonic_ns()
        self.now_ms = self.now_ns // 1000000
        if n < 0:
            if errno != EINTR:
                raise OSError(errno, "epoll_wait")
            n = 0
        self.counters[LOOP_TURNS] += 1
        self.counters[WORKER_HEARTBEAT_MS] = self.now_ms     # /healthz: this loop is turning
        i = 0
        while i < n:
            # One try per batch, not per event: entering it is not free. After an
            # exception the rest of the batch goes on.
            try:
                while i < n:
                    self.current_fd = events[i].data.fd
                    i += 1
                    self.on_event(self.current_fd, events[i - 1].events)
            except Exception:
                self.contained(self.current_fd, "handling a connection's events")
        self.current_fd = -1
        if self.nfresh:
            self.read_fresh()
        if (self.accept_paused and self.now_ms >= self.accept_next_ms) or (
                self.nrate_paused and self.now_ms >= self.rate_next_ms):
            try:
                if self.accept_paused and self.now_ms >= self.accept_next_ms:
                    accept_resume_due(self)         # worker/rate_limits.pyx
                if self.nrate_paused and self.now_ms >= self.rate_next_ms:
                    rate_resume_due(self)
            except Exception:
                self.contained(self.current_fd, "resuming connections paused by a rate limit")
            self.current_fd = -1
        if self.nresume:
            self.resume_settled()
        self.run_timers()
        if self.will_wheel.count:
            wills_delayed_due(self)         # worker/will_delay.pyx: MQTT 5.0 wills held for their delay
        if self.settle_orphans:
            try:
                settle_orphans_due(self)        # worker/registry.pyx
            except Exception:
                self.contained(-1, "settling CONNECTs whose client left")
        if self.held_checks or self.claim_checks:
            try:
                registry_checks_due(self)       # worker/registry.pyx
            except Exception:
                self.contained(-1, "answering claims by another user")
        if self.nresume:
            self.resume_settled()
        self.reap_closed()
        try:
            if (self.max_sink_lag or self.store_behind) and self.now_ms >= self.store_check_ms:
                self.store_check_ms = self.now_ms + STORE_CHECK_MS
                store_lag_check(self)       # worker/backpressure.pyx
        except Exception:
            self.contained(self.current_fd, "checking the store's lag")
        self.current_fd = -1
        try:
            if self.congested:
                congestion_check(self)
            if self.pending_subacks:
                subsync_release(self)       # those that waited too long
        except Exception:
            self.contained(-1, "releasing held subscriptions")
        self.counters[SUBSCRIPTIONS_CURRENT] = self.index.subscriptions
        self.counters[SUBSCRIPTION_INDEX_BYTES] = self.index.bytes
        self.counters[SHARED_GROUPS] = self.ngroups - len(self.free_groups)
        # Python signal handlers (SIGTERM, SIGHUP) run here, between turns.
        PyErr_CheckSignals()
        if self.on_tick is not None and self.tick_ms and self.now_ms >= self.next_tick_ms:
            self.next_tick_ms = self.now_ms + self.tick_ms
            self.call_python(self.on_tick)
        if self.reload_requested:
            self.reload_requested = False
            if self.on_reload is not None:
                self.call_python(self.on_reload)
        self.reap_closed()
        self.flush_all()
        hist_observe(self.counters, HIST_LOOP_TURN, monotonic_ns() - self.now_ns)
        if self.draining:
            if not self.drain_started:
                self.drain_started = True
                self.start_drain()
                self.flush_all()
            if self.counters[CONNS_CURRENT] == 0 or self.now_ms >= self.drain_deadline_ms:
                return True
        return False

    cdef void on_event(self, int fd, uint32_t ev):
        cdef Conn* c = &self.conns[fd]
        if c.state == ST_LISTENER:
            self.accept_from(c.listener)
        elif c.state == ST_WAL:
            wal_readable(self)
        elif c.state == ST_QUERY:
            query_readable(self)
        elif c.state == ST_AUTH:
            auth_readable(self)
        elif c.state == ST_CHANNEL:
            if ev & EPOLLOUT:
                channel_writable(self, c.listener)
            if ev & (EPOLLIN | EPOLLHUP | EPOLLERR):
                channel_readable(self, c.listener)
        elif is_client_state(c.state):
            if ev & (EPOLLIN | EPOLLHUP | EPOLLERR):
                if c.state != ST_SETTLING:
                    self.on_readable(c)
                elif ev & (EPOLLHUP | EPOLLERR):
                    # Reset while its CONNECT settles: nothing is read meanwhile, but
                    # epoll reports a hang-up whatever it was asked, every turn (the
                    # loop spun). The client is gone; its settle finds it so (registry.pyx).
                    self.close_conn(c, CR_ERROR)
            if ev & EPOLLOUT and is_client_state(c.state):
                self.on_writable(c)

    cdef void run_timers(self):
        """Fires the expired timers, one at a time off the wheel's expired list,
        so a timer's handler may cancel or reschedule any other (wheel.pxd)."""
        cdef TimerNode* node
        wheel_expire(&self.wheel, self.now_ms)
        while True:
            try:
                while True:
                    node = wheel_pop_expired(&self.wheel)
                    if node == NULL:
                        return
                    self.current_fd = (<Conn*>node).fd
                    on_timer(self, <Conn*>node)         # keepalive.pyx
            except Exception:
                self.contained(self.current_fd, "handling a timer")
            finally:
                self.current_fd = -1

    cdef void flush_all(self):
        """End of the turn: the peers' frames first, then the clients' output.
        Freeing closed connections may publish wills (output for others): those
        go out in the same turn."""
        while True:
            # Peers first, then clients: the frames telling other workers of new
            # interest or forwarding a message leave before the acknowledgements
            # (SUBACK, PUBACK) that let a client act on them. (Not a guarantee on
            # its own: a peer may read a client's socket before its channel.)
            try:
                if self.peers_dirty:
                    channels_flush(self)
                self.flush_dirty()
            except Exception:
                self.contained(-1, "flushing output")
            if self.nclosed == 0:
                return
            self.reap_closed()
            if self.ndirty == 0 and self.peers_dirty == 0:
                return

    cdef void resume_settled(self):
        """Connections whose CONNECT was settled (worker/registry.pyx) go on with the
        bytes they sent after it, read meanwhile into their carry-over buffer.
        Never done inside the settle itself: the connection's own input may be
        on the stack there."""
        cdef int k, fd
        cdef uint32_t gen
        cdef Conn* c
        while self.nresume:
            self.nresume -= 1
            fd = self.resume_fds[self.nresume]
            gen = self.resume_gens[self.nresume]
            c = &self.conns[fd]
            if c.gen != gen or c.state != ST_CONNECTED or (c.inlen == 0 and not tls_pending(c)):
                continue
            self.current_fd = fd
            try:
                if c.inlen == 0 or self.resume_input(c) == 0:
                    # TLS records held past the CONNECT (read before it settled):
                    # epoll cannot see them (worker/tls_records.pyx)
                    if (c.state == ST_CONNECTED and tls_pending(c) and not (c.store_flags & SF_HELD)
                            and not (c.flags & (F_PAUSED | F_HELD_FULL | F_RATE_PAUSED))):
                        self.on_readable(c)
            except Exception:
                self.contained(fd, "handling a connection's input")
        self.current_fd = -1

    cdef void read_fresh(self):
        """The connections accepted in this turn's events are read now, as if
        epoll had reported them: a client sends its CONNECT (or ClientHello) as
        soon as its connect() returns, so by the accept it has mostly arrived
        (always, with the defer_accept setting), and its answer goes out in
        this turn. Nothing there: one recv() that finds nothing; epoll reports
        it later."""
        cdef int k = 0, fd
        cdef Conn* c
        while k < self.nfresh:
            try:
                while k < self.nfresh:
                    fd = self.fresh_fds[k]
                    k += 1
                    c = &self.conns[fd]
                    if c.gen != self.fresh_gens[k - 1] or not is_client_state(c.state) or c.state == ST_SETTLING:
                        continue
                    self.current_fd = fd
                    self.on_readable(c)
            except Exception:
                self.contained(self.current_fd, "handling a new connection's first bytes")
        self.nfresh = 0
        self.current_fd = -1

    cdef void resume_later(self, Conn* c):
        """Queues c for resume_settled() (once per settle)."""
        if self.nresume < self.nconns:
            self.resume_fds[self.nresume] = c.fd
            self.resume_gens[self.nresume] = c.gen
            self.nresume += 1

    cdef void call_python(self, object fn):
        """Runs a Python callback; its failure is logged, never the worker's end."""
        try:
            fn()
        except Exception:
            if self.now_ms - self.last_log_ms[<int>CR_PYTHON] >= 10000 or self.last_log_ms[<int>CR_PYTHON] == 0:
                self.last_log_ms[<int>CR_PYTHON] = self.now_ms
                log.exception("worker %d: %s failed (logged at most every 10 s)", self.worker_index,
                              getattr(fn, "__name__", fn))

    cdef void start_drain(self):
        """Closes the listeners for every process (shutdown(SHUT_RD) on a listening
        socket ends listening on all its duplicates, so new clients are refused
        at once rather than queued), then closes every connection after flushing."""
        cdef int i, fd
        cdef Conn* c
        for i in range(self.nlisteners):
            fd = self.listeners[i].fd
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
            shutdown(fd, SHUT_RD)
            close(fd)
            self.conns[fd].state = ST_FREE
            if self.listeners[i].ctx != NULL:
                SSL_CTX_free(self.listeners[i].ctx)
                self.listeners[i].ctx = NULL
        self.nlisteners = 0
        if self.http_app is not None:
            self.http_app.draining = True      # /readyz and ingest answer 503 from now on
        if self.wal is not None:
            wal_drain(self)         # durable_ack.pyx: held answers go out before the connections close
        try:
            wills_delayed_flush(self)       # worker/will_delay.pyx: held wills go out while subscribers are here
        except Exception:
            self.contained(-1, "publishing the held wills at the drain")
        for fd in range(self.nconns):
            c = &self.conns[fd]
            if c.state == ST_AWAIT_CONNECT and c.proto == PROTO_HTTP:
                http_start_drain(self, c)
            elif is_client_state(c.state):
                self.close_after_flush(c)

    cdef void close_all(self, int reason):
        cdef int fd
        for fd in range(self.nconns):
            if is_client_state(self.conns[fd].state):
                self.close_conn(&self.conns[fd], reason)

    # --- accepting -----------------------------------------------------------

    cdef uint64_t total_connections(self) noexcept:
        cdef uint64_t total = 0
        cdef int w
        for w in range(self.nworkers):
            total += self.all_counters[w * N_COUNTERS + CONNS_CURRENT]
        return total

    cdef void accept_from(self, int index):
        cdef Listener* l = &self.listeners[index]
        cdef int fd, k, one = 1
        cdef Conn* c
        cdef epoll_event ev
        cdef uint64_t[16] peer          # a sockaddr_storage (128 bytes), aligned
        cdef socklen_t peer_len
        cdef uint32_t addr_slot
        for k in range(ACCEPT_BATCH):
            if not accept_allowed(self, l):     # max_conn_rate (worker/rate_limits.pyx)
                return
            peer_len = sizeof(peer)
            fd = accept_peer(l.fd, &peer[0], &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EINTR or errno == ECONNABORTED or errno == EPROTO:
                    continue
                if errno == EMFILE or errno == ENFILE:
                    # Out of descriptors: use the spare one to accept and drop the
                    # client, so it is told at once instead of waiting in the backlog.
                    self.counters[CONNS_REJECTED] += 1
                    if self.reserve_fd >= 0:
                        close(self.reserve_fd)
                        fd = accept4(l.fd, NULL, NULL, SOCK_CLOEXEC)
                        if fd >= 0:
                            close(fd)
                        self.reserve_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)
                    self.log_limited(CR_REFUSED, "out of file descriptors: connection refused")
                return
            if (fd >= self.nconns or self.draining
                    or self.total_connections() >= self.max_connections):
                # Count before closing: the close is what the client (or a test) sees.
                self.counters[CONNS_REJECTED] += 1
                close(fd)
                self.log_limited(CR_REFUSED, "connection refused: max_connections reached")
                continue
            if self.conn_rate > 0:
                l.accept_tokens -= 1.0
            if address_admit(self, &peer[0], peer_len, &addr_slot) < 0:
                close(fd)       # max_connections_per_ip: before TLS or CONNECT (counted, logged)
                continue
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            c = &self.conns[fd]
            memset(c, 0, sizeof(Conn))
            c.fd = fd
            c.addr_slot = addr_slot
            rate_bucket_reset(self, fd)
            c.session = -1
            self.conn_gen += 1
            c.gen = self.conn_gen
            c.proto = l.proto
            c.listener = index
            if l.proto == PROTO_HTTP:
                memset(&self.http[fd], 0, sizeof(HttpState))
            if l.ws:
                c.ws = WS_HANDSHAKE
                memset(&self.ws_states[fd], 0, sizeof(WsState))
            c.last_rx_ms = self.now_ms
            if l.ctx != NULL:
                c.ssl = SSL_new(l.ctx)
                if c.ssl == NULL or SSL_set_fd(c.ssl, fd) != 1:
                    ERR_clear_error()
                    if c.ssl != NULL:
                        SSL_free(c.ssl)
                        c.ssl = NULL
                    address_release(self, c)        # its count, taken above
                    self.counters[CONNS_REJECTED] += 1
                    close(fd)
                    continue
                SSL_set_accept_state(c.ssl)
                tls_attach(self, c)     # tls_record_layer = gw (worker/tls_records.pyx)
                c.flags = F_TLS
                c.state = ST_TLS_HANDSHAKE
            else:
                c.state = ST_AWAIT_CONNECT
            ev.events = EPOLLIN
            ev.data.u64 = 0
            ev.data.fd = fd
            epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev)
            c.events = EPOLLIN
            self.counters[CONNS_ACCEPTED] += 1
            self.counters[CONNS_CURRENT] += 1
            schedule_connect_timeout(self, c)   # keepalive.pyx
            if self.nfresh < FRESH_MAX:
                # Its first bytes are most likely here already (and surely with
                # the listeners' TCP_DEFER_ACCEPT, the defer_accept setting):
                # read in this turn (read_fresh), so the CONNACK leaves with it,
                # not after another epoll_wait.
                self.fresh_fds[self.nfresh] = fd
                self.fresh_gens[self.nfresh] = c.gen
                self.nfresh += 1

    # --- reading and framing -------------------------------------------------

    cdef Py_ssize_t sock_read(self, Conn* c, uint8_t* buf, size_t cap) noexcept:
        """> 0: bytes read; 0: nothing now; -1: peer closed; -2: error."""
        cdef ssize_t n
        cdef size_t got = 0
        cdef int err
        if c.ssl == NULL:
            if c.tls != NULL:
                return tls_read(self, c, buf, cap)  # gw's TLS records (worker/tls_records.pyx)
            n = recv(c.fd, buf, cap, 0)
            if n > 0:
                return n
            if n == 0:
                return -1
            if errno == EAGAIN or errno == EINTR:
                return 0
            return -2
        ERR_clear_error()
        clear_errno()       # read below to tell an EOF from a socket error
        if SSL_read_ex(c.ssl, buf, cap, &got) == 1:
            return <Py_ssize_t>got
        err = SSL_get_error(c.ssl, 0)
        if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
            return 0
        if err == SSL_ERROR_ZERO_RETURN:
            return -1
        if err == SSL_ERROR_SYSCALL and ERR_peek_error() == 0 and errno == 0:
            return -1     # EOF without close_notify: how most devices hang up
        ERR_clear_error()
        return -2

    cdef void on_readable(self, Conn* c):
        cdef Py_ssize_t n, used
        cdef uint32_t want
        cdef uint8_t* grown
        if c.state == ST_TLS_HANDSHAKE:
            if self.tls_handshake(c) <= 0:
                return
        if c.flags & F_SSL_WRITE_WANTS_READ:
            c.flags &= ~F_SSL_WRITE_WANTS_READ
            if self.flush(c) < 0:
                return
        while True:
            if c.state == ST_CLOSING:
                # Input is no longer wanted; read it away so the socket can close.
                n = self.sock_read(c, self.rbuf, READ_BUFFER)
                if n < 0:
                    if c.ws == WS_CLOSED:   # after our Close: closed for the reason it was sent
                        self.close_conn(c, c.close_reason, c.close_detail)
                    else:
                        self.close_conn(c, CR_CLIENT if n == -1 else CR_ERROR)
                return
            if not is_client_state(c.state) or c.state == ST_SETTLING:
                return
            if c.inlen == 0:
                n = self.sock_read(c, self.rbuf, READ_BUFFER)
                if n <= 0:
                    if n < 0:
                        self.close_conn(c, CR_CLIENT if n == -1 else CR_ERROR)
                    return
                self.counters[BYTES_IN] += n
                used = self.process(c, self.rbuf, n)
                if used < 0:
                    return            # closed while processing
                if used < n:
                    # Keep the cut-off tail, sized for the whole packet when known.
                    want = <uint32_t>(n - used)
                    if c.need > want:
                        want = c.need
                    c.inbuf = <uint8_t*>malloc(want)
                    if c.inbuf == NULL:
                        self.close_conn(c, CR_SERVER)
                        return
                    c.incap = want
                    c.inlen = <uint32_t>(n - used)
                    memcpy(c.inbuf, self.rbuf + used, c.inlen)
            else:
                want = c.inlen + 4096
                if c.need > want:
                    want = c.need
                if want > c.incap:
                    grown = <uint8_t*>realloc(c.inbuf, want)
                    if grown == NULL:
                        self.close_conn(c, CR_SERVER)
                        return
                    c.inbuf = grown
                    c.incap = want
                n = self.sock_read(c, c.inbuf + c.inlen, c.incap - c.inlen)
                if n <= 0:
                    if n < 0:
                        self.close_conn(c, CR_CLIENT if n == -1 else CR_ERROR)
                    return
                self.counters[BYTES_IN] += n
                c.inlen += <uint32_t>n
                if self.resume_input(c) < 0:
                    return
            # Plain sockets: one read per readiness event (level-triggered epoll
            # brings us back). TLS: drain what OpenSSL already decrypted, which
            # epoll cannot see (unless a rate limit paused it: rate_resume_due
            # reads that when it resumes).
            if not tls_pending(c) or c.flags & F_RATE_PAUSED:
                return

    cdef int resume_input(self, Conn* c):
        """Handles what is in c's carry-over buffer; -1 if c was closed. Called
        only with nothing of c's on the stack (on_readable, resume_settled):
        it may free or move c.inbuf."""
        cdef Py_ssize_t used = self.process(c, c.inbuf, c.inlen)
        if used < 0:
            return -1
        if used == c.inlen:
            free(c.inbuf)
            c.inbuf = NULL
            c.inlen = c.incap = c.need = 0
        elif used > 0:
            memmove(c.inbuf, c.inbuf + used, c.inlen - used)
            c.inlen -= <uint32_t>used
        return 0

    cdef Py_ssize_t process(self, Conn* c, uint8_t* buf, Py_ssize_t n):
        """Handles every complete packet in buf[0:n]. Returns the bytes consumed,
        or -1 if the connection was closed. Handlers never free buf: a close
        only marks the connection (close_conn), so buf stays valid here."""
        cdef Py_ssize_t pos
        self.batch_messages = 0     # what the framing counts for the rate limits
        self.batch_bytes = 0
        self.rate_stopped = False
        if self.rates != NULL:
            rate_allowance(self, c)     # worker/rate_limits.pyx
        else:
            self.msg_allowance = 0xFFFFFFFF
            self.byte_allowance = 0xFFFFFFFFFFFFFFFF
        if c.proto == PROTO_HTTP:
            pos = process_http(self, c, buf, n)
        elif c.ws:
            pos = process_ws(self, c, buf, n)       # worker/websocket.pyx, then process_mqtt
        elif c.proto == PROTO_JSON:
            pos = process_json_lines(self, c, buf, n)
        else:
            pos = self.process_mqtt(c, buf, n)
        if pos >= 0 and c.state == ST_CLOSED:
            return -1
        if self.rates != NULL and (self.batch_messages or self.batch_bytes or self.rate_stopped):
            rate_charge(self, c)    # once per batch (worker/rate_limits.pyx)
        return pos

    cdef Py_ssize_t process_mqtt(self, Conn* c, uint8_t* buf, Py_ssize_t n):
        cdef Py_ssize_t pos = 0
        cdef int hl, reason = 0
        cdef uint8_t first
        cdef uint32_t remaining
        cdef Py_ssize_t total
        cdef bint any_packet = False
        cdef Py_ssize_t more
        if c.version == 5:
            return process_mqtt5(self, c, buf, n)     # worker/mqtt5.pyx: one test per read
        c.need = 0
        while pos < n:
            if c.state == ST_CLOSING:
                return n
            if c.state == ST_CLOSED:
                return -1
            if c.state == ST_SETTLING:
                break       # the rest waits until the CONNECT is settled (resume_settled)
            hl = decode_header(buf + pos, n - pos, self.max_packet_size, &first, &remaining, &reason)
            if hl < 0:
                if hl == ERR_INCOMPLETE:
                    break
                if hl == ERR_TOO_LARGE:
                    self.counters[PACKETS_TOO_LARGE] += 1
                    self.close_conn(c, CR_TOO_LARGE)
                    return -1
                self.malformed(c, reason)
                return -1
            total = hl + remaining
            if total > self.max_packet_size:
                self.counters[PACKETS_TOO_LARGE] += 1
                self.close_conn(c, CR_TOO_LARGE)
                return -1
            if n - pos < total:
                c.need = <uint32_t>total
                break
            if (first & 0xF0) == 0x30 and (self.batch_messages >= self.msg_allowance
                                           or self.batch_bytes >= self.byte_allowance):
                self.rate_stopped = True    # a rate's bucket is spent: the rest waits (rate_limits.pyx)
                break
            if handle_packet(self, c, first, buf + pos + hl, remaining) < 0:
                return -1
            if (first & 0xF0) == 0x30:      # PUBLISH: what the message and byte rates count
                self.batch_messages += 1
                self.batch_bytes += <uint64_t>total
            elif c.version == 5:
                # Its CONNECT said MQTT 5.0 (and settled at once): the rest is read
                # by the MQTT 5.0 framing.
                pos += total
                c.last_rx_ms = self.now_ms
                if pos >= n or c.state == ST_SETTLING:
                    return pos
                more = process_mqtt5(self, c, buf + pos, n - pos)
                if more < 0:
                    return -1
                return pos + more
            any_packet = True
            pos += total
        if any_packet:
            c.last_rx_ms = self.now_ms
        return pos

    cdef void malformed(self, Conn* c, int reason):
        if 0 <= reason < 16:       # MALFORMED_BY_REASON has 16 slots
            self.counters[MALFORMED_BY_REASON + reason] += 1
        self.close_conn(c, CR_MALFORMED, reason)

    # --- answers the handlers send --------------------------------------------

    cdef int send_ack(self, Conn* c, uint8_t ptype, uint16_t pid):
        cdef uint8_t* out = self.reserve(c, 4)
        if out == NULL:
            return -1
        encode_ack(out, ptype, pid)
        self.counters[PKT_OUT + ptype] += 1
        return 0

    cdef int send_empty(self, Conn* c, uint8_t ptype):
        cdef uint8_t* out = self.reserve(c, 2)
        if out == NULL:
            return -1
        encode_empty(out, ptype)
        self.counters[PKT_OUT + ptype] += 1
        return 0

    # --- TLS -------------------------------------------------------------------

    cdef int tls_handshake(self, Conn* c):
        """1: done; 0: in progress; -1: failed (connection closed)."""
        cdef int r, err, refusal
        ERR_clear_error()
        r = SSL_do_handshake(c.ssl)
        if r == 1:
            c.state = ST_AWAIT_CONNECT
            self.counters[TLS_HANDSHAKES] += 1
            if SSL_session_reused(c.ssl):
                self.counters[TLS_RESUMED] += 1
            # gw's records from here on (worker/tls_records.pyx)
            if tls_take_over(self, c) < 0:
                self.close_conn(c, CR_ERROR)
                return -1
            self.set_pollout(c, False)
            return 1
        err = SSL_get_error(c.ssl, r)
        if err == SSL_ERROR_WANT_READ:
            r = tls_handshake_flush(c)      # what this step wrote (worker/tls_records.pyx)
            if r < 0:
                self.close_conn(c, CR_ERROR)
                return -1
            self.set_pollout(c, r == 0)
            return 0
        if err == SSL_ERROR_WANT_WRITE:
            self.set_pollout(c, True)
            return 0
        self.counters[TLS_FAILURES] += 1
        tls_handshake_failed(c)         # OpenSSL's alert, written into memory (worker/tls_records.pyx)
        refusal = client_refusal(c.ssl)
        ERR_clear_error()
        if refusal != REFUSED_NONE:
            # The client's certificate was the reason (require_certificate): OpenSSL
            # sent its alert; counted and logged by why, with the address.
            self.counters[TLS_REFUSED_NO_CERT + refusal - 1] += 1
            self.log_client(CR_TLS_NO_CERT + refusal - 1, c.fd,
                            "TLS handshake refused: " + REFUSAL_REASONS[refusal])
        self.close_conn(c, CR_TLS, refusal)
        return -1

    cdef void log_client(self, int reason, int fd, str message):
        """log_limited, naming the client's address (looked up only when the
        line is logged, not when it is suppressed)."""
        if self.now_ms - self.last_log_ms[reason] < 10000 and self.last_log_ms[reason] != 0:
            self.suppressed[reason] += 1
            return
        self.log_limited(reason, "%s (client %s)" % (message, peer_address(fd)))

    # --- writing -------------------------------------------------------------

    cdef uint8_t* reserve(self, Conn* c, uint32_t n):
        """Room for n outbound bytes, flushed at the end of this loop turn.
        NULL (and the connection closed) past --max-outbound. On a WebSocket
        connection the bytes go in the binary frame the flush sends
        (worker/websocket.pyx)."""
        if c.ws:
            return ws_reserve(self, c, n)
        return self.reserve_bytes(c, n)

    cdef uint8_t* reserve_bytes(self, Conn* c, uint32_t n):
        """reserve(), the bytes as they are: no WebSocket framing."""
        cdef uint64_t need = <uint64_t>c.outlen + n
        cdef uint64_t cap
        cdef uint8_t* grown
        cdef uint8_t* out
        if not is_client_state(c.state):
            return NULL         # closed: what it would have been sent is moot
        if need > c.outcap:
            if c.outbuf == NULL and self.nspare_out:
                # A buffer an earlier flush emptied (flush): no malloc, and it
                # has usually grown to a turn's output already.
                self.nspare_out -= 1
                c.outbuf = self.spare_out[self.nspare_out]
                c.outcap = self.spare_out_cap[self.nspare_out]
            if c.outoff > 0:
                # Drop what was sent before growing: the buffer then never holds
                # more than max_outbound (<= 2 GiB), so its uint32 sizes cannot wrap.
                memmove(c.outbuf, c.outbuf + c.outoff, c.outlen - c.outoff)
                if c.ws:
                    self.ws_states[c.fd].frame_at -= c.outoff     # the open frame moved too
                c.outlen -= c.outoff
                c.outoff = 0
                need = <uint64_t>c.outlen + n
            if need > c.outcap:
                if need > self.max_outbound:
                    self.counters[WRITE_OVERFLOWS] += 1
                    self.close_conn(c, CR_OVERFLOW)
                    return NULL
                cap = 256 if c.outcap == 0 else c.outcap
                while cap < need:
                    cap *= 2
                grown = <uint8_t*>realloc(c.outbuf, cap)
                if grown == NULL:
                    self.close_conn(c, CR_SERVER)
                    return NULL
                c.outbuf = grown
                c.outcap = <uint32_t>cap
        out = c.outbuf + c.outlen
        c.outlen += n
        mark_dirty(self, c)
        return out

    cdef void flush_dirty(self):
        """One write per connection with output this turn. The list is read
        live: a flush that closes a connection may add to it."""
        cdef int i = 0, fd
        cdef Conn* c
        while i < self.ndirty:
            fd = self.dirty[i]
            i += 1
            c = &self.conns[fd]
            if c.flags & F_DIRTY:
                c.flags &= ~F_DIRTY
                if is_client_state(c.state) and not (c.flags & F_POLLOUT):
                    self.flush(c)
        self.ndirty = 0

    cdef int flush(self, Conn* c):
        """Writes what is pending. 1: all written; 0: the socket is full (EPOLLOUT
        armed); -1: the connection was closed."""
        cdef ssize_t n
        cdef size_t sent
        cdef int err
        if c.ws and self.ws_states[c.fd].flags & WSF_FRAME_OPEN:
            ws_seal(self, c)        # what this turn wrote: one binary frame (worker/websocket.pyx)
        if c.tls != NULL and c.ssl == NULL:
            n = tls_flush(self, c)  # sealed into gw's TLS records (worker/tls_records.pyx)
            if n <= 0:
                return <int>n
        while c.outoff < c.outlen:
            if c.ssl == NULL:
                n = send(c.fd, c.outbuf + c.outoff, c.outlen - c.outoff, MSG_NOSIGNAL)
                if n < 0:
                    if errno == EAGAIN or errno == EINTR:
                        self.set_pollout(c, True)
                        return 0
                    self.close_conn(c, CR_ERROR)
                    return -1
            else:
                ERR_clear_error()
                sent = 0
                if SSL_write_ex(c.ssl, c.outbuf + c.outoff, c.outlen - c.outoff, &sent) != 1:
                    err = SSL_get_error(c.ssl, 0)
                    if err == SSL_ERROR_WANT_WRITE:
                        self.set_pollout(c, True)
                        return 0
                    if err == SSL_ERROR_WANT_READ:
                        # Only after a TLS 1.3 key update: retry when readable.
                        c.flags |= F_SSL_WRITE_WANTS_READ
                        return 0
                    ERR_clear_error()
                    self.close_conn(c, CR_ERROR)
                    return -1
                n = <ssize_t>sent
            c.outoff += <uint32_t>n
            self.counters[BYTES_OUT] += n
        # Everything is out: give the buffer back, so idle connections hold none
        # (kept for the next connection with output when small enough).
        if c.outbuf != NULL and c.outcap <= SPARE_OUT_MAX and self.nspare_out < SPARE_OUT:
            self.spare_out[self.nspare_out] = c.outbuf
            self.spare_out_cap[self.nspare_out] = c.outcap
            self.nspare_out += 1
        else:
            free(c.outbuf)
        c.outbuf = NULL
        c.outoff = c.outlen = c.outcap = 0
        c.flags &= ~F_SSL_WRITE_WANTS_READ
        self.set_pollout(c, False)
        if c.state == ST_CLOSING:
            if c.proto == PROTO_HTTP and http_linger_start(self, c):
                return 1        # a lingering close: what the client still sends is read away first (worker/http.pyx)
            if c.ws == WS_CLOSED and ws_linger_start(self, c):
                return 1        # the same after a Close frame (worker/websocket.pyx)
            self.close_conn(c, c.close_reason, c.close_detail)
            return -1
        return 1

    cdef void on_writable(self, Conn* c):
        if c.state == ST_TLS_HANDSHAKE:
            self.tls_handshake(c)
            return
        self.flush(c)

    cdef void set_pollout(self, Conn* c, bint on):
        if bool(c.flags & F_POLLOUT) == on:
            return
        if on:
            c.flags |= F_POLLOUT
        else:
            c.flags &= ~F_POLLOUT
        self.update_events(c)

    cdef void update_events(self, Conn* c):
        """Registers what c waits for: input unless it is paused (backpressure,
        too many answers held for the log, a rate limit, the store behind) or its CONNECT is
        settling; output while a write would block. Only a change is a system
        call: a CONNECT settled in its own turn leaves the set as it was (EPOLLIN),
        and its settling no longer costs a MOD per connection."""
        cdef epoll_event ev
        ev.events = 0
        if (not (c.flags & (F_PAUSED | F_HELD_FULL | F_RATE_PAUSED)) and not (c.store_flags & SF_HELD)
                and c.state != ST_SETTLING):
            ev.events |= EPOLLIN
        if c.flags & F_POLLOUT:
            ev.events |= EPOLLOUT
        if ev.events == c.events:
            return
        ev.data.u64 = 0
        ev.data.fd = c.fd
        if epoll_ctl(self.epfd, EPOLL_CTL_MOD, c.fd, &ev) == 0:
            c.events = <uint8_t>ev.events

    # --- closing ---------------------------------------------------------------

    cdef void close_after_flush(self, Conn* c, int reason=CR_SERVER, int detail=0):
        """Stops reading and closes (for `reason`) once the outbound bytes are
        written (or after CLOSE_GRACE_MS, keepalive.pyx)."""
        if not is_client_state(c.state) or c.state == ST_CLOSING:
            return
        if c.version == 5 and c.state == ST_CONNECTED:
            v5_goodbye(self, c, reason, detail)    # the DISCONNECT saying why (worker/mqtt5.pyx)
            if not is_client_state(c.state):
                return
        if c.ws == WS_OPEN:
            # The WebSocket closes properly: a Close frame, then the TCP close.
            ws_send_close(self, c, WS_CLOSE_GOING_AWAY if self.draining else
                          WS_CLOSE_POLICY if reason in (CR_REFUSED, CR_LIMIT, CR_ACL, CR_AUTH_ANONYMOUS,
                                                        CR_AUTH_PASSWORD, CR_AUTH_TAKEOVER, CR_AUTH_BUSY)
                          else WS_CLOSE_NORMAL)
        c.close_reason = <uint8_t>reason
        c.close_detail = <uint8_t>detail
        if c.state == ST_CONNECTED:
            self.counters[SESSIONS_CURRENT] -= 1
        c.state = ST_CLOSING
        schedule_close_grace(self, c)
        if c.outlen == c.outoff:
            # Nothing to write: close at the end of this turn via the flush list.
            mark_dirty(self, c)

    cdef void close_conn(self, Conn* c, int reason, int detail=0):
        """Closes a connection: marks it ST_CLOSED and queues it for reap_closed()
        at the end of the loop turn, which detaches its session (publishing the
        will), counts, logs and frees it. Until then its buffers and its session
        stay as they are, so any caller up the stack (a handler reading from its
        input buffer, route_publish iterating the match result) is safe; it
        takes no more input and gets no more output."""
        if not is_client_state(c.state):
            return
        if c.version == 5 and c.state == ST_CONNECTED and v5_goodbye(self, c, reason, detail):
            # An MQTT 5.0 client is told why in a DISCONNECT (worker/mqtt5.pyx),
            # which goes out before the connection closes.
            if is_client_state(c.state):
                self.close_after_flush(c, reason, detail)
            return
        if c.state == ST_SETTLING:
            # Its claim still settles, by its deadline at the latest (worker/registry.pyx):
            # what waits behind it must not wait forever.
            self.settle_orphans.append((c.pending_token, c.timer.deadline_ms))
        c.closed_from = c.state
        c.close_reason = <uint8_t>reason
        c.close_detail = <uint8_t>detail
        c.state = ST_CLOSED
        wheel_cancel(&self.wheel, &c.timer)
        self.closed[self.nclosed] = c.fd
        self.nclosed += 1

    cdef void close_taken_over(self, Conn* old):
        """A CONNECT with the same client id takes the session over (MQTT-3.1.4-2):
        the old connection closes, and its session is detached now (its will
        published) rather than at the end of the turn, because the caller hands
        the session over or ends it right after. The id's home already names
        the new owner: ending a clean session here must not release the id.
        What the old connection is owed goes out before it closes: its own
        CONNACK when both CONNECTs settled in the same turn (the standard
        answers an accepted CONNECT with a CONNACK, then the next one takes it
        over, MQTT-3.1.4-2/-4), answers to packets it sent before. It reads
        nothing more meanwhile."""
        self.counters[TAKEOVERS] += 1
        if old.state == ST_CONNECTED and old.outlen > old.outoff:
            self.close_after_flush(old, CR_TAKEOVER)
        elif old.state != ST_CLOSING:
            self.close_conn(old, CR_TAKEOVER)
        if old.session >= 0:
            session_detach(self, old, False, False)

    cdef void reap_closed(self):
        """The one place where closed connections are freed (end of a loop turn
        phase, with nothing of theirs on the stack). Detaching a session may
        publish its will, which may close other connections (their buffers
        overflowing): those are reaped in the same call."""
        cdef int fd
        cdef Conn* c
        while self.nclosed:
            self.nclosed -= 1
            fd = self.closed[self.nclosed]
            c = &self.conns[fd]
            if c.state != ST_CLOSED:
                continue
            try:
                self.finish_close(c)
            except Exception:
                self.contained(-1, "freeing a closed connection")
            finally:
                if c.state == ST_CLOSED:
                    self.release(c)

    cdef void finish_close(self, Conn* c):
        cdef int reason = c.close_reason
        cdef int detail = c.close_detail
        if c.session >= 0:
            # A server shutdown or a DISCONNECT is not the client's failure: no will
            # then (MQTT-3.1.2-8, -10).
            session_detach(self, c, reason == CR_DISCONNECT or self.draining)
        if c.closed_from == ST_CONNECTED:
            self.counters[SESSIONS_CURRENT] -= 1
        self.counters[CLOSE_COUNTER[reason]] += 1
        self.counters[CONNS_CURRENT] -= 1
        if reason == CR_MALFORMED and detail >= DETAIL_R5:
            self.log_limited(reason, "closed an MQTT 5.0 connection: %s" % r5_close_text(detail))
        elif reason == CR_MALFORMED:
            self.log_limited(reason, "closed a connection: malformed packet (%s)"
                             % MALFORMED_NAMES[detail if 0 <= detail < len(MALFORMED_NAMES) else 0])
        elif reason == CR_TOO_LARGE:
            self.log_limited(reason, "closed a connection: packet over max_packet_size (%d bytes)"
                             % self.max_packet_size)
        elif reason == CR_OVERFLOW:
            self.log_limited(reason, "closed a connection: outbound queue over max_outbound (%d bytes)"
                             % self.max_outbound)
        elif reason == CR_TLS and detail == REFUSED_NONE:     # a refused certificate was logged then
            self.log_limited(reason, "TLS handshake failed")
        elif reason == CR_LIMIT:
            self.log_limited(reason, "closed a connection: it went past %s" % LIMIT_SETTINGS[detail])

    cdef void release(self, Conn* c):
        """Frees a connection's resources and its table slot (reap_closed only,
        and the worker's teardown)."""
        cdef uint8_t state = c.closed_from if c.state == ST_CLOSED else c.state
        wheel_cancel(&self.wheel, &c.timer)
        address_release(self, c)        # worker/rate_limits.pyx
        rate_forget(self, c)
        if c.version == 5:
            if self.topic_aliases:
                self.topic_aliases.pop(c.fd, None)      # its Topic Aliases end with the connection (MQTT-3.3.2-7)
            alias_out_free(c)                           # and the server's (worker/mqtt5.pyx)
            enhanced_auth_forget(self, c)               # its SCRAM state (worker/enhanced_auth.pyx)
        if c.fd == self.alias_fd:
            self.alias_fd = -1
            self.alias_table = None
        if self.held_per_fd != NULL:
            self.held_per_fd[c.fd] = 0      # its held answers are skipped (worker/durable_ack.pyx)
            self.held_pubacks[c.fd] = 0
        if c.ssl != NULL:
            if state == ST_CONNECTED or state == ST_AWAIT_CONNECT or state == ST_CLOSING:
                ERR_clear_error()
                SSL_shutdown(c.ssl)     # one non-blocking close_notify, best effort
            SSL_free(c.ssl)
            ERR_clear_error()
        elif c.tls != NULL and (state == ST_CONNECTED or state == ST_AWAIT_CONNECT or state == ST_CLOSING):
            tls_close_notify(c)         # the same with gw's records (worker/tls_records.pyx)
        tls_release(c)
        close(c.fd)     # also removes it from the epoll set
        free(c.inbuf)
        free(c.outbuf)
        free(c.client_id)
        free(c.username)
        memset(c, 0, sizeof(Conn))

    cdef void contained(self, int fd, str where):
        """An exception escaped while handling fd (-1: no connection): count it,
        log it with its traceback (at most every 10 s), close that connection.
        A bug, but one connection's, never the worker's end."""
        cdef Conn* c
        self.counters[INTERNAL_ERRORS] += 1
        if self.now_ms - self.last_log_ms[<int>CR_INTERNAL] >= 10000 or self.last_log_ms[<int>CR_INTERNAL] == 0:
            self.last_log_ms[<int>CR_INTERNAL] = self.now_ms
            log.exception("worker %d: internal error while %s; %s (logged at most every 10 s)",
                          self.worker_index, where,
                          "the connection was closed" if fd >= 0 else "the worker goes on")
        if 0 <= fd < self.nconns:
            c = &self.conns[fd]
            if is_client_state(c.state):
                self.close_conn(c, CR_INTERNAL)

    cdef void log_limited(self, int reason, str message):
        """Logs a reason at most once per 10 s, with how many were not logged."""
        if self.now_ms - self.last_log_ms[reason] < 10000 and self.last_log_ms[reason] != 0:
            self.suppressed[reason] += 1
            return
        if self.suppressed[reason]:
            message = "%s (and %d more like it in the last 10 s)" % (message, self.suppressed[reason])
        self.last_log_ms[reason] = self.now_ms
        self.suppressed[reason] = 0
        log.warning("worker %d: %s", self.worker_index, message)


# The worker's concerns, one file each in gw_ext/worker/, all parts of this one
# extension module: module-level functions taking the worker, declared in
# loop.pxd under a heading per file.
include "worker/keepalive.pyx"
include "worker/tls_records.pyx"
# MQTT packets.
include "worker/read_handle.pyx"
include "worker/mqtt5.pyx"
include "worker/handle_connect.pyx"
include "worker/auth.pyx"
include "worker/enhanced_auth.pyx"
include "worker/handle_publish.pyx"
include "worker/handle_acks.pyx"
include "worker/handle_subscribe.pyx"
include "worker/handle_unsubscribe.pyx"
include "worker/handle_ping.pyx"
include "worker/handle_disconnect.pyx"
include "worker/access.pyx"
# The broker across workers.
include "worker/router.pyx"
include "worker/subopts.pyx"
include "worker/shared.pyx"
include "worker/retained.pyx"
include "worker/sessions.pyx"
include "worker/will_delay.pyx"
include "worker/session_state.pyx"
include "worker/registry.pyx"
include "worker/channel.pyx"
include "worker/backpressure.pyx"
# Readings: JSON lines, HTTP, MQTT telemetry, the log.
include "worker/jsonlines.pyx"
include "worker/http.pyx"
include "worker/websocket.pyx"
include "worker/http_queries.pyx"
include "worker/ingest.pyx"
include "worker/telemetry.pyx"
include "worker/durable_ack.pyx"
# Rate limits, connections per address.
include "worker/rate_limits.pyx"
