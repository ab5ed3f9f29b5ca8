# Included by loop.pyx. Backpressure for QoS 1/2: an online subscriber that
# reads more slowly than publishers write makes them wait instead of losing
# messages.
#
# When a connected session's queue passes queue_high (max_queued / 4), it is
# "congested": this worker stops reading from QoS 1/2 publishers (they stop
# getting PUBACKs, so their in-flight windows fill and they wait), and asks
# every other worker to do the same (FR_PAUSE). Under queue_low
# (max_queued / 8) it resumes (FR_RESUME). QoS 0 publishers are never held:
# QoS 0 is shed at the slow subscriber instead (DROPPED_SLOW_QOS0).
#
# The write-ahead log holds publishers back the same way while more than half
# of wal_max_pending waits to be written (durable_ack.pyx): the disk sets the pace.
#
# A subscriber that stops acknowledging for STALL_MS is a slow consumer, not
# a busy one: it stops holding publishers back (and drops past max_queued,
# counted) until it acknowledges again, so one dead client cannot stall
# everyone for more than STALL_MS. A publisher that is also
# a subscriber with messages in flight is not paused (it must read its acks).

cdef enum:
    STALL_MS = 5000


cdef void congest(Worker w, Session* s):
    s.congested = 1
    if s.last_ack_ms == 0:
        s.last_ack_ms = w.now_ms
    w.congested.add(s - w.sessions)
    w.counters[BACKPRESSURE_EVENTS] += 1
    if len(w.congested) == 1:
        channel_broadcast(w, FR_PAUSE, 0, NULL, 0, NULL, 0)
        channels_flush(w)       # now, not at the end of the turn: every message counts
        update_pause(w)


cdef void uncongest(Worker w, Session* s):
    s.congested = 0
    w.congested.discard(s - w.sessions)
    if not w.congested:
        channel_broadcast(w, FR_RESUME, 0, NULL, 0, NULL, 0)
        update_pause(w)


cdef void peer_congestion(Worker w, int p, bint on):
    if on:
        w.peers_congested |= (<uint64_t>1) << p
    else:
        w.peers_congested &= ~((<uint64_t>1) << p)
    update_pause(w)


cdef void congestion_check(Worker w):
    """Subscribers that stopped acknowledging no longer hold publishers."""
    cdef int slot
    cdef Session* s
    for slot in list(w.congested):
        s = &w.sessions[slot]
        if w.now_ms - s.last_ack_ms > STALL_MS:
            w.counters[SLOW_CONSUMERS] += 1
            w.log_limited(CR_QUEUE, "a subscriber stopped acknowledging for %d s: publishers no "
                          "longer wait for it" % (STALL_MS // 1000))
            uncongest(w, s)
            s.stalled = 1       # until it acknowledges something again


cdef void publisher_add(Worker w, Conn* c) noexcept:
    """c just became a publisher (F_PUBLISHER): in the list update_pause walks.
    Entries of closed connections are dropped as update_pause meets them, or
    here once they are half the list, so churn cannot grow it."""
    cdef int k, kept
    cdef int cap
    cdef void* grown
    if w.pub_list_lost:
        return
    if w.npub == w.pub_cap:
        kept = 0
        for k in range(w.npub):
            if (w.conns[w.pub_fds[k]].gen == w.pub_gens[k] and is_client_state(w.conns[w.pub_fds[k]].state)
                    and w.conns[w.pub_fds[k]].flags & F_PUBLISHER):
                w.pub_fds[kept] = w.pub_fds[k]
                w.pub_gens[kept] = w.pub_gens[k]
                kept += 1
        w.npub = kept
        if w.npub * 2 >= w.pub_cap:     # (also the first time: cap 0)
            cap = w.pub_cap * 2 if w.pub_cap else 64
            grown = realloc(w.pub_fds, cap * sizeof(int))
            if grown == NULL:
                w.pub_list_lost = True
                return
            w.pub_fds = <int*>grown
            grown = realloc(w.pub_gens, cap * sizeof(uint32_t))
            if grown == NULL:
                w.pub_list_lost = True
                return
            w.pub_gens = <uint32_t*>grown
            w.pub_cap = cap
    w.pub_fds[w.npub] = c.fd
    w.pub_gens[w.npub] = c.gen
    w.npub += 1


cdef inline void _pause_or_resume(Worker w, Conn* c, bint want):
    if want:
        pause_conn(w, c)
    elif c.flags & F_PAUSED:
        c.flags &= ~F_PAUSED
        w.update_events(c)


cdef void update_pause(Worker w):
    cdef bint want = bool(w.congested) or w.peers_congested != 0 or w.wal_congested
    cdef int fd, k, kept
    cdef Conn* c
    if want == w.publishers_paused:
        return
    w.publishers_paused = want
    if w.pub_list_lost:
        for fd in range(w.nconns):
            c = &w.conns[fd]
            if c.state == ST_CONNECTED and c.flags & F_PUBLISHER:
                _pause_or_resume(w, c, want)
        return
    # The publishers only (publisher_add), not the whole fd table: this runs
    # at every turn of the backpressure (hundreds a second in a fan-in flat out).
    kept = 0
    for k in range(w.npub):
        fd = w.pub_fds[k]
        c = &w.conns[fd]
        if c.gen != w.pub_gens[k] or not is_client_state(c.state) or not (c.flags & F_PUBLISHER):
            continue        # closed (its fd perhaps reused): dropped from the list
        w.pub_fds[kept] = fd
        w.pub_gens[kept] = w.pub_gens[k]
        kept += 1
        if c.state == ST_CONNECTED:
            _pause_or_resume(w, c, want)
    w.npub = kept


cdef void pause_conn(Worker w, Conn* c):
    if c.flags & F_PAUSED:
        return
    if c.session >= 0 and (w.sessions[c.session].ninflight or w.sessions[c.session].congested):
        return      # it must keep reading its own acknowledgements
    c.flags |= F_PAUSED
    w.update_events(c)


# --- the store's lag bound (max_sink_lag_bytes) ----------------------------------------
#
# The pipeline publishes, in this worker's stats row, how far the store sink
# has taken this worker's log (STORE_CHECKPOINT: its next offset plus one; 0
# before it first did). Every STORE_CHECK_MS the loop compares it with the
# log's durable offset (never per message). Past max_sink_lag_bytes the worker
# holds ingest until the lag is back under three quarters of it (hysteresis,
# so it does not flap): HTTP ingest is answered 503 `store_behind` with
# Retry-After (http.pyx), a JSON-lines Data message an Error (jsonlines.pyx),
# telemetry publishers at QoS 1/2 are not read (their PUBACKs stop because
# their PUBLISHes wait in their sockets, in order, unacknowledged), and QoS 0
# telemetry is shed (handle_publish.pyx); all counted. Nothing already taken
# is dropped: what was read before the hold is in the log and acknowledged as
# usual. Other MQTT traffic is not held. The log on disk grows by at most the
# bound (plus what was in flight) while the store catches up.

cdef void store_lag_check(Worker w):
    cdef uint64_t published = w.counters[STORE_CHECKPOINT]
    cdef uint64_t taken, lag
    if (published == 0 or w.wal is None) and w.max_sink_lag:
        return                  # the pipeline has not said where the store is yet
    taken = published - 1 if published else 0
    lag = w.wal_durable - taken if w.wal_durable > taken else 0
    if not w.store_behind and w.max_sink_lag and lag > w.max_sink_lag:
        w.store_behind = True
        w.counters[STORE_BEHIND] = 1
        w.counters[STORE_BEHIND_HOLDS] += 1
        w.log_limited(CR_STORE_BEHIND, "the store is %d bytes behind this worker's log (max_sink_lag_bytes "
                      "%d): ingest held (HTTP 503, JSON-lines Error, MQTT telemetry publishers not read, "
                      "QoS 0 telemetry shed) until it is under %d" % (lag, w.max_sink_lag,
                                                                      w.max_sink_lag // 4 * 3))
        store_hold_all(w)
    elif w.store_behind and (lag <= w.max_sink_lag // 4 * 3 or w.max_sink_lag == 0):
        w.store_behind = False
        w.counters[STORE_BEHIND] = 0
        log.info("worker %d: the store caught up (%d bytes behind this worker's log): ingest resumed",
                 w.worker_index, lag)
        store_release(w)


cdef void store_hold(Worker w, Conn* c):
    """Stops reading a telemetry publisher while the store is behind (what it
    sent meanwhile waits in its socket, unacknowledged)."""
    if c.store_flags & SF_HELD or not is_client_state(c.state):
        return
    c.store_flags |= SF_HELD
    w.update_events(c)


cdef void store_hold_all(Worker w):
    cdef int fd
    cdef Conn* c
    for fd in range(w.nconns):
        c = &w.conns[fd]
        if c.state == ST_CONNECTED and c.store_flags & SF_TELEMETRY:
            store_hold(w, c)


cdef void store_release(Worker w):
    """Reads the held publishers again. Called between phases of the turn with
    nothing of any connection on the stack; bytes OpenSSL already decrypted
    (epoll cannot see them) are handled now."""
    cdef int fd
    cdef Conn* c
    for fd in range(w.nconns):
        c = &w.conns[fd]
        if not (c.store_flags & SF_HELD):
            continue
        c.store_flags &= ~SF_HELD
        if not is_client_state(c.state):
            continue
        c.last_rx_ms = w.now_ms     # the server's hold is not the client's silence
        w.update_events(c)
        if not (c.flags & (F_PAUSED | F_HELD_FULL | F_RATE_PAUSED)) and tls_pending(c):
            w.current_fd = fd
            w.on_readable(c)
            w.current_fd = -1


cdef bint store_hold_timer(Worker w, Conn* c) noexcept:
    """c's keepalive deadline passed while it is held for the store: it starts
    again once c is read again. False: not held, the deadline stands."""
    if not (c.store_flags & SF_HELD) or c.state != ST_CONNECTED or c.timeout_ms == 0:
        return False
    wheel_schedule(&w.wheel, &c.timer, w.now_ms + c.timeout_ms)
    return True
