# Included by loop.pyx. Acknowledgement means durable (ack mode `sink`): the
# telemetry readings a worker accepts are appended to its write-ahead log
# (gw_ext/wal.pyx); in ack mode sink, the PUBACK/PUBREC of a QoS 1/2 reading
# and the HTTP 200 of an ingest wait here until the log's flusher reports the
# reading's end offset durable (its eventfd is in the worker's epoll set).
#
# One FIFO per worker, in append order, so the offsets waited for never
# decrease; an acknowledgement that needs no durability (another topic's
# PUBACK, a /readyz answer) but whose connection already has one waiting is
# queued behind it with the same offset, so a connection's answers keep their
# order (MQTT 4.6, HTTP pipelining). A connection that closes leaves its
# entries to be skipped (generation mismatch).

cdef enum:
    HELD_HTTP = 100           # a whole HTTP response, in held_http (other kinds: PUBACK, PUBREC)
    # A connection with this many answers waiting is not read until half of
    # them went out: a client sending without waiting for its answers (QoS 1
    # without a window, HTTP pipelining) cannot grow the FIFO without bound.
    # What one read already holds may pass it (bounded by the read buffer).
    HELD_MAX_PER_CONN = 4096

# A held answer is a HeldAck (loop.pxd), in the ring Worker.held.


cdef int held_push(Worker w, Conn* c, uint8_t kind, uint16_t pid, uint64_t needed, bytes http):
    """Queues an answer until the log is durable up to `needed`."""
    cdef HeldAck* grown
    cdef HeldAck* e
    cdef uint32_t cap, i
    if needed < w.held_last_needed:
        needed = w.held_last_needed     # behind earlier ones: offsets never decrease
    if w.held_len == w.held_cap:
        cap = 1024 if w.held_cap == 0 else w.held_cap * 2
        grown = <HeldAck*>malloc(cap * sizeof(HeldAck))
        if grown == NULL:
            w.close_conn(c, CR_SERVER)
            return -1
        for i in range(w.held_len):
            grown[i] = w.held[(w.held_head + i) % w.held_cap]
        free(w.held)
        w.held = grown
        w.held_head = 0
        w.held_cap = cap
    e = &w.held[(w.held_head + w.held_len) % w.held_cap]
    e.needed = needed
    e.fd = c.fd
    e.gen = c.gen
    e.kind = kind
    e.packet_id = pid
    e.http_id = 0
    if kind == HELD_HTTP:
        w.held_http_next += 1
        e.http_id = w.held_http_next
        w.held_http[e.http_id] = http
    w.held_len += 1
    w.held_last_needed = needed
    w.held_per_fd[c.fd] += 1
    if kind == PUBACK:
        w.held_pubacks[c.fd] += 1
    w.counters[ACKS_HELD] = w.held_len
    if w.held_per_fd[c.fd] >= HELD_MAX_PER_CONN and not (c.flags & F_HELD_FULL):
        c.flags |= F_HELD_FULL
        w.update_events(c)
    return 0


cdef inline bint must_hold(Worker w, Conn* c, uint64_t needed) noexcept:
    """Whether an answer on c needing `needed` durable must wait (0: needs nothing)."""
    return (needed > w.wal_durable) or (w.held_per_fd != NULL and w.held_per_fd[c.fd] > 0)


cdef int ack_after_durable(Worker w, Conn* c, uint8_t ptype, uint16_t pid, uint64_t needed):
    """A PUBACK/PUBREC now, or when the log reaches `needed` (and the
    connection's earlier answers went out)."""
    if must_hold(w, c, needed):
        return held_push(w, c, ptype, pid, needed, None)
    return w.send_ack(c, ptype, pid)


cdef void held_release(Worker w):
    """Sends every held answer whose offset is durable now, in order."""
    cdef HeldAck e
    cdef Conn* c
    cdef uint8_t* out
    cdef bytes data
    cdef Py_ssize_t size
    while w.held_len:
        e = w.held[w.held_head]
        if e.needed > w.wal_durable:
            break
        w.held_head = (w.held_head + 1) % w.held_cap
        w.held_len -= 1
        if e.kind == HELD_HTTP:
            data = w.held_http.pop(e.http_id)
        c = &w.conns[e.fd]
        if c.gen != e.gen or c.state == ST_FREE:
            continue            # the connection closed meanwhile
        w.held_per_fd[e.fd] -= 1
        if e.kind == PUBACK:
            w.held_pubacks[e.fd] -= 1
        if c.flags & F_HELD_FULL and w.held_per_fd[e.fd] <= HELD_MAX_PER_CONN // 2:
            c.flags &= ~F_HELD_FULL
            if is_client_state(c.state):
                w.update_events(c)
        if e.kind == HELD_HTTP:
            size = PyBytes_GET_SIZE(data)
            if size > HTTP_MAX_RESPONSE:
                w.close_conn(c, CR_SERVER)      # cannot be: held answers are small
                continue
            out = w.reserve(c, <uint32_t>size)
            if out != NULL:
                memcpy(out, PyBytes_AS_STRING(data), size)
                if w.http[e.fd].flags & HF_CLOSE_AFTER_HELD and w.held_per_fd[e.fd] == 0:
                    w.close_after_flush(c)
        elif c.state == ST_CONNECTED:
            w.send_ack(c, e.kind, e.packet_id)
    if w.held_len == 0:
        w.held_head = 0
    w.counters[ACKS_HELD] = w.held_len


cdef void wal_readable(Worker w):
    """The log's flusher made more of it durable."""
    w.wal_durable = w.wal.poll()
    w.counters[WAL_DURABLE_OFFSET] = w.wal_durable
    if w.dedup is not None:
        # Before the answers go out: a repeat sent once the 200 is in hand finds
        # its reading committed (a duplicate), not pending.
        w.dedup.durable_c(w.wal_durable, w.now_ms)
    if w.held_len:
        held_release(w)
    if w.wal_congested and w.wal.pending_c() <= w.wal.max_pending // 4:
        # A quarter of wal_max_pending or less waits again: publishers are read again.
        w.wal_congested = False
        update_pause(w)


cdef void wal_drain(Worker w):
    """Draining: what was accepted becomes durable now, and its held answers
    go out before the connections close."""
    w.wal.flush()
    w.wal_durable = w.wal.durable_offset
    w.counters[WAL_DURABLE_OFFSET] = w.wal_durable
    if w.dedup is not None:
        w.dedup.durable_c(w.wal_durable, w.now_ms)
    held_release(w)


cdef bint wal_room(Worker w, int nbytes) except? False:
    """Whether an append of nbytes would be taken now (HTTP ingest asks before
    the idempotency table records its readings, so a refusal leaves no trace,
    ingest.pyx); a refusal is counted and logged."""
    if w.wal is None or (nbytes > 0 and w.wal.room_c(<uint32_t>nbytes) and not w.wal_congested):
        return True
    w.counters[WAL_REFUSED] += 1
    w.log_limited(CR_WAL, "the write-ahead log cannot take readings (disk full or too slow): "
                  "refusing them until it can")
    return False


cdef int64_t wal_append(Worker w, const uint8_t* p, uint32_t n, bint room_checked=False):
    """Appends a reading; its end offset, or -1 if the log refused it (counted).
    room_checked: the caller saw wal_room() say yes for it just before."""
    cdef int64_t end
    if room_checked or w.wal.room_c(n):
        end = w.wal.append_after_room_c(p, n)   # a refusal here is counted by the log itself
        if end >= 0 and not w.wal_congested and w.wal.pending_c() > w.wal.max_pending // 2:
            # Over half of wal_max_pending waits for the disk: QoS 1/2 publishers
            # wait too (backpressure.pyx) rather than be refused at the limit.
            w.wal_congested = True
            update_pause(w)
    else:
        end = -1
        w.counters[WAL_REFUSED] += 1
    if end < 0:
        w.log_limited(CR_WAL, "the write-ahead log cannot take readings (disk full or too slow): "
                      "refusing them until it can")
    return end
