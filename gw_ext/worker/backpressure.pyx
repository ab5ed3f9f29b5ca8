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


cdef void update_pause(Worker w):
    cdef bint want = bool(w.congested) or w.peers_congested != 0 or w.wal_congested
    cdef int fd
    cdef Conn* c
    if want == w.publishers_paused:
        return
    w.publishers_paused = want
    for fd in range(w.nconns):
        c = &w.conns[fd]
        if c.state != ST_CONNECTED or not (c.flags & F_PUBLISHER):
            continue
        if want:
            pause_conn(w, c)
        elif c.flags & F_PAUSED:
            c.flags &= ~F_PAUSED
            w.update_events(c)


cdef void pause_conn(Worker w, Conn* c):
    if c.flags & F_PAUSED:
        return
    if c.session >= 0 and (w.sessions[c.session].ninflight or w.sessions[c.session].congested):
        return      # it must keep reading its own acknowledgements
    c.flags |= F_PAUSED
    w.update_events(c)
