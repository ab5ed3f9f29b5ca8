# Included by loop.pyx. Rate limits as EMQX has them, enforced by backpressure:
# a bucket that runs empty stops reading, and nothing already read is dropped.
#
#   max_conn_rate, max_conn_burst: a token bucket per listener per worker.
#       Each worker accepts on its own SO_REUSEPORT socket, so each takes
#       rate / workers and burst / workers (at least 1): the kernel spreads new
#       connections evenly over the sockets, a bucket shared in memory would
#       cost every accept an atomic on a contended line, and an empty shared
#       bucket could not move a connection to another worker's backlog anyway.
#       Empty: the listener leaves the epoll set's input (accept_allowed) until
#       it has a token again (accept_resume_due, checked every loop turn, at
#       most TICK_MS apart); meanwhile the kernel's backlog holds the rest, and
#       past it SYNs are retried: clients see slowness, never a refusal.
#   max_messages_rate, max_bytes_rate (and their bursts): two buckets per
#       client (RateBucket, per fd), refilled before a read batch and charged
#       once after the framing handled it (Worker.process: the framing counts
#       a batch's MQTT PUBLISH packets and their bytes, JSON lines, HTTP
#       request bodies). The framing stops before the message the buckets
#       cannot pay for (an integer compare per message against the batch's
#       allowance), leaving it and what follows in the carry-over buffer; a
#       message larger than what is left still goes (the byte bucket goes
#       negative: the client waits longer); HTTP stops before the next request
#       (a request is never cut). A bucket that cannot pay for one more message: the connection
#       is not read (F_RATE_PAUSED, no EPOLLIN; its carry-over buffer waits
#       too) until it can (rate_resume_due), then its carry-over is handled.
#       Its keepalive does not run out meanwhile: the server's pause is not the
#       client's silence (rate_hold_timer; on resume it counts as active).
#   max_connections_per_ip: the shared counts of gw_ext/addrlimit.pyx; over
#       it, a connection is closed right after accept, before TLS or CONNECT.
#
# Each pause counts once (CONN_RATE_PAUSES, MSG_RATE_PAUSES, BYTE_RATE_PAUSES),
# not per message, and is logged at most once per 10 s per worker and setting
# (the client's address and id, or the listener; rate_pause_log: a timestamp
# compare when the line is not due); RATE_PAUSED is the clients paused now;
# refusals count in PER_IP_REFUSED and are logged at most every 10 s per
# address.

cdef enum:
    RATE_MAX_WAIT_MS = 3600 * 1000      # a pause is recomputed at least this often


cdef inline uint64_t refill_wait_ms(double deficit, double rate) noexcept nogil:
    """ms until a bucket `deficit` tokens short is back to zero (at least 1)."""
    cdef double ms = deficit * 1000.0 / rate
    if ms >= RATE_MAX_WAIT_MS:
        return RATE_MAX_WAIT_MS
    return <uint64_t>ms + 1


cdef bint accept_allowed(Worker w, Listener* l):
    """Whether listener l may accept one more connection now (its token is
    taken by the caller once a socket came). False: l is paused until its
    bucket has a token, counted."""
    cdef epoll_event ev
    if w.conn_rate <= 0:
        return True
    if l.accept_refilled_ms == 0:
        l.accept_tokens = w.conn_burst
        l.accept_refilled_ms = w.now_ms
    elif w.now_ms > l.accept_refilled_ms:
        l.accept_tokens += w.conn_rate * <double>(w.now_ms - l.accept_refilled_ms) / 1000.0
        if l.accept_tokens > w.conn_burst:
            l.accept_tokens = w.conn_burst
        l.accept_refilled_ms = w.now_ms
    if l.accept_tokens >= 1.0:
        return True
    l.accept_paused = 1
    l.accept_resume_ms = w.now_ms + refill_wait_ms(1.0 - l.accept_tokens, w.conn_rate)
    if w.accept_paused == 0 or l.accept_resume_ms < w.accept_next_ms:
        w.accept_next_ms = l.accept_resume_ms
    w.accept_paused += 1
    ev.events = 0           # still in the set, not reported: the backlog holds the clients
    ev.data.u64 = 0
    ev.data.fd = l.fd
    epoll_ctl(w.epfd, EPOLL_CTL_MOD, l.fd, &ev)
    w.counters[CONN_RATE_PAUSES] += 1
    listener_pause_log(w, l)
    return False


cdef void listener_pause_log(Worker w, Listener* l) except *:
    """A listener paused by max_conn_rate, logged at most once per 10 s;
    formatted only when the line is due."""
    cdef int reason = CR_RATE_CONN
    if w.last_log_ms[reason] != 0 and w.now_ms - w.last_log_ms[reason] < 10000:
        w.suppressed[reason] += 1
        return
    w.log_limited(reason, "listener %s paused: max_conn_rate (%g per second for this worker, burst %g) "
                  "reached; new connections wait in its backlog" % (listener_text(l), w.conn_rate, w.conn_burst))


cdef str listener_text(Listener* l):
    """A listener in a log line: its protocol and address."""
    try:
        with socket.socket(fileno=os.dup(l.fd)) as sock:
            host, port = sock.getsockname()[:2]
    except OSError:
        host, port = "?", 0
    name = {PROTO_MQTT: "mqtt", PROTO_JSON: "json", PROTO_HTTP: "http"}.get(l.proto, "?")
    return "%s%s %s:%d" % (name, "s" if l.ctx != NULL else "", "[%s]" % host if ":" in host else host, port)


cdef void rate_pause_log(Worker w, Conn* c, int reason) except *:
    """A client paused by a rate limit (reason: CR_RATE_MESSAGES or
    CR_RATE_BYTES), logged at most once per 10 s per reason; formatted (its
    address is a syscall) only when the line is due."""
    cdef Session* s
    if w.last_log_ms[reason] != 0 and w.now_ms - w.last_log_ms[reason] < 10000:
        w.suppressed[reason] += 1
        return
    if c.proto == PROTO_MQTT and c.session >= 0:
        s = &w.sessions[c.session]
        who = "client %r" % PyBytes_FromStringAndSize(s.client_id, s.client_id_len).decode("utf-8", "replace")
    elif c.proto == PROTO_JSON and c.client_id != NULL:
        who = "client %r" % PyBytes_FromStringAndSize(c.client_id, c.client_id_len).decode("utf-8", "replace")
    else:
        who = "a client"
    if reason == CR_RATE_MESSAGES:
        why = "max_messages_rate (%g per second, burst %g)" % (w.msg_rate, w.msg_burst)
    else:
        why = "max_bytes_rate (%g bytes per second, burst %g)" % (w.byte_rate, w.byte_burst)
    w.log_client(reason, c.fd, "%s paused: over %s; not read until its bucket refills" % (who, why))


cdef void accept_resume_due(Worker w):
    """Paused listeners whose bucket has a token again accept again (from the
    next turn: epoll reports their backlog)."""
    cdef int i
    cdef Listener* l
    cdef epoll_event ev
    cdef uint64_t next_ms = 0
    w.accept_paused = 0
    for i in range(w.nlisteners):
        l = &w.listeners[i]
        if not l.accept_paused:
            continue
        if l.accept_resume_ms <= w.now_ms or w.conn_rate <= 0:
            l.accept_paused = 0
            ev.events = EPOLLIN
            ev.data.u64 = 0
            ev.data.fd = l.fd
            epoll_ctl(w.epfd, EPOLL_CTL_MOD, l.fd, &ev)
        else:
            w.accept_paused += 1
            if next_ms == 0 or l.accept_resume_ms < next_ms:
                next_ms = l.accept_resume_ms
    w.accept_next_ms = next_ms


cdef int address_admit(Worker w, const void* sa, unsigned salen, uint32_t* counted):
    """max_connections_per_ip for a socket just accepted from `sa`: 0 admitted
    (counted[0]: its slot + 1 to give back on release, 0 when not counted), -1
    over the limit (the caller closes it; counted and logged here)."""
    cdef uint32_t slot = 0
    cdef int r
    counted[0] = 0
    if w.max_per_ip == 0 or w.addr_counts is None:
        return 0
    r = w.addr_counts.acquire_c(w.worker_index, sa, salen, w.max_per_ip, &slot)
    if r == 1:
        counted[0] = slot + 1
        return 0
    if r < 0:
        return 0        # not an IP address: nothing to count it by
    w.counters[PER_IP_REFUSED] += 1
    if w.addr_log_ms[slot & 255] == 0 or w.now_ms - w.addr_log_ms[slot & 255] >= 10000:
        w.addr_log_ms[slot & 255] = w.now_ms
        log.warning("worker %d: connection from %s closed: max_connections_per_ip (%d) are open from that "
                    "address (logged at most every 10 s per address)", w.worker_index,
                    peer_address_text(<const uint8_t*>sa, salen), w.max_per_ip)
    return -1


cdef str peer_address_text(const uint8_t* sa, unsigned salen):
    import socket
    cdef uint8_t[16] a
    cdef int n = gw_peer_address(sa, salen, a)
    if n == 4:
        return socket.inet_ntop(socket.AF_INET, PyBytes_FromStringAndSize(<char*>a, 4))
    if n == 16:
        return socket.inet_ntop(socket.AF_INET6, PyBytes_FromStringAndSize(<char*>a, 16))
    return "?"


cdef void address_release(Worker w, Conn* c) noexcept:
    """A closing connection gives its address's count back."""
    if c.addr_slot and w.addr_counts is not None:
        w.addr_counts.release_c(w.worker_index, c.addr_slot - 1)
    c.addr_slot = 0


cdef inline void rate_bucket_reset(Worker w, int fd) noexcept:
    """A new connection on fd starts with full buckets."""
    if w.rates != NULL:
        w.rates[fd].refilled_ms = 0
        w.rates[fd].resume_ms = 0


cdef inline void rate_refill(Worker w, RateBucket* b) noexcept:
    cdef double seconds
    if b.refilled_ms == 0:
        b.messages = w.msg_burst
        b.bytes = w.byte_burst
    elif w.now_ms > b.refilled_ms:
        seconds = <double>(w.now_ms - b.refilled_ms) / 1000.0
        b.messages += w.msg_rate * seconds
        if b.messages > w.msg_burst:
            b.messages = w.msg_burst
        b.bytes += w.byte_rate * seconds
        if b.bytes > w.byte_burst:
            b.bytes = w.byte_burst
    else:
        return
    b.refilled_ms = w.now_ms


cdef inline uint64_t rate_wait_ms(Worker w, RateBucket* b) noexcept:
    """How long until b's buckets pay for one more message (0: they do)."""
    cdef uint64_t wait = 0, k
    if w.msg_rate > 0 and b.messages < 1.0:
        wait = refill_wait_ms(1.0 - b.messages, w.msg_rate)
    if w.byte_rate > 0 and b.bytes < 1.0:
        k = refill_wait_ms(1.0 - b.bytes, w.byte_rate)
        if k > wait:
            wait = k
    return wait


cdef void rate_allowance(Worker w, Conn* c) noexcept:
    """Before a batch: c's buckets refilled, what they pay for is the batch's
    allowance (nothing while c is paused: a settled CONNECT's carry-over is
    handled then, but not its messages)."""
    cdef RateBucket* b = &w.rates[c.fd]
    cdef bint paused = c.flags & F_RATE_PAUSED
    rate_refill(w, b)
    w.msg_allowance = 0xFFFFFFFF
    w.byte_allowance = 0xFFFFFFFFFFFFFFFF
    if w.msg_rate > 0:
        w.msg_allowance = 0 if paused or b.messages < 1.0 else (
            0xFFFFFFFF if b.messages >= 4294967295.0 else <uint32_t>b.messages)
    if w.byte_rate > 0:
        w.byte_allowance = 0 if paused or b.bytes < 1.0 else <uint64_t>b.bytes


cdef void rate_charge(Worker w, Conn* c):
    """What the framing counted in this batch (Worker.process) comes off c's
    buckets (refilled by rate_allowance); when they cannot pay for one more
    message, c is not read until they can."""
    cdef RateBucket* b = &w.rates[c.fd]
    cdef uint64_t wait, resume
    cdef int k
    b.messages -= w.batch_messages
    b.bytes -= <double>w.batch_bytes
    w.batch_messages = 0
    w.batch_bytes = 0
    wait = rate_wait_ms(w, b)
    if wait == 0:
        return
    resume = w.now_ms + wait
    if c.flags & F_RATE_PAUSED:
        if resume > b.resume_ms:
            b.resume_ms = resume        # read while paused (a settled CONNECT's carry-over): owes more
        return
    if not is_client_state(c.state) or c.state == ST_CLOSING:
        return
    if w.nrate_paused >= w.nconns:
        rate_paused_compact(w)
    if w.nrate_paused >= w.nconns:
        return          # cannot happen: at most one live entry per fd
    if w.msg_rate > 0 and b.messages < 1.0:
        w.counters[MSG_RATE_PAUSES] += 1
        rate_pause_log(w, c, CR_RATE_MESSAGES)
    if w.byte_rate > 0 and b.bytes < 1.0:
        w.counters[BYTE_RATE_PAUSES] += 1
        rate_pause_log(w, c, CR_RATE_BYTES)
    b.resume_ms = resume
    c.flags |= F_RATE_PAUSED
    w.counters[RATE_PAUSED] += 1
    w.update_events(c)
    k = w.nrate_paused
    w.rate_paused_fds[k] = c.fd
    w.rate_paused_gens[k] = c.gen
    w.nrate_paused = k + 1
    if k == 0 or resume < w.rate_next_ms:
        w.rate_next_ms = resume


cdef void rate_paused_compact(Worker w) noexcept:
    """Drops the entries of connections no longer paused (resumed, or closed and freed)."""
    cdef int i, kept = 0, fd
    for i in range(w.nrate_paused):
        fd = w.rate_paused_fds[i]
        if w.conns[fd].gen == w.rate_paused_gens[i] and w.conns[fd].flags & F_RATE_PAUSED:
            w.rate_paused_fds[kept] = fd
            w.rate_paused_gens[kept] = w.rate_paused_gens[i]
            kept += 1
    w.nrate_paused = kept


cdef void rate_resume_due(Worker w):
    """Called at the top of a turn (nothing of any connection on the stack) once
    the earliest resume time passed: connections whose buckets are back are
    read again: what waits in their carry-over buffer is handled now, and so
    are bytes OpenSSL already decrypted (epoll cannot see them)."""
    cdef int i = 0, fd
    cdef Conn* c
    cdef RateBucket* b
    cdef uint64_t wait, next_ms = 0
    while i < w.nrate_paused:
        fd = w.rate_paused_fds[i]
        c = &w.conns[fd]
        if c.gen != w.rate_paused_gens[i] or not (c.flags & F_RATE_PAUSED):
            w.nrate_paused -= 1         # gone or resumed: drop the entry
            w.rate_paused_fds[i] = w.rate_paused_fds[w.nrate_paused]
            w.rate_paused_gens[i] = w.rate_paused_gens[w.nrate_paused]
            continue
        b = &w.rates[fd]
        if b.resume_ms <= w.now_ms and is_client_state(c.state):
            rate_refill(w, b)
            wait = rate_wait_ms(w, b)       # the limits may have changed (SIGHUP)
            if wait:
                b.resume_ms = w.now_ms + wait
            else:
                w.nrate_paused -= 1
                w.rate_paused_fds[i] = w.rate_paused_fds[w.nrate_paused]
                w.rate_paused_gens[i] = w.rate_paused_gens[w.nrate_paused]
                c.flags &= ~F_RATE_PAUSED
                w.counters[RATE_PAUSED] -= 1
                c.last_rx_ms = w.now_ms     # the server's pause is not the client's silence
                w.update_events(c)
                w.current_fd = fd
                if c.inlen and (c.state == ST_CONNECTED or c.state == ST_AWAIT_CONNECT):
                    w.resume_input(c)       # complete messages may wait there (the framing stopped)
                if is_client_state(c.state) and tls_pending(c):
                    w.on_readable(c)
                w.current_fd = -1
                continue
        if next_ms == 0 or b.resume_ms < next_ms:
            next_ms = b.resume_ms
        i += 1
    w.rate_next_ms = next_ms


cdef void rate_forget(Worker w, Conn* c) noexcept:
    """A paused connection is freed: it is no longer counted as paused (its
    entry is dropped when next seen)."""
    if c.flags & F_RATE_PAUSED:
        c.flags &= ~F_RATE_PAUSED
        w.counters[RATE_PAUSED] -= 1


cdef bint rate_hold_timer(Worker w, Conn* c) noexcept:
    """c's deadline passed while a rate limit keeps it unread: its keepalive (or
    request, or CONNECT) timeout starts again once it is read again, so the
    timer moves past the resume time. False: not paused, the deadline stands."""
    cdef uint64_t after
    if not (c.flags & F_RATE_PAUSED) or w.rates == NULL:
        return False
    if c.state == ST_CONNECTED:
        after = c.timeout_ms
    elif c.state == ST_AWAIT_CONNECT:
        if c.proto == PROTO_HTTP:
            if w.http[c.fd].flags & HF_LINGER:
                return False        # a lingering close ends on time
            after = w.http_timeout_ms
        else:
            after = w.connect_timeout_ms
    else:
        return False
    if after < 1000:
        after = 1000
    wheel_schedule(&w.wheel, &c.timer,
                   (w.rates[c.fd].resume_ms if w.rates[c.fd].resume_ms > w.now_ms else w.now_ms) + after)
    return True
