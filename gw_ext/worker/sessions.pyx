# Included by loop.pyx. MQTT sessions: their slots, QoS 1/2 state both ways,
# queues, wills.
#
# A session's slot number is its subscriber id in the worker's TopicTrie.
# Outbound QoS 1/2 messages go into an in-flight window of max_inflight
# (sent, awaiting the ack, in send order); more wait in a bounded queue
# (max_queued; beyond it a message is dropped, counted and logged). On the
# reconnect of a clean_session=0 client the window is sent again with DUP=1
# (MQTT-4.4.0-1), PUBRELs for those already PUBRECed.
#
# MQTT 5.0 (section 4.9): a client's Receive Maximum narrows its window to
# min(Receive Maximum, max_inflight) (session_window); what does not fit waits
# in the queue as for max_inflight. Entries of a resumed session past the new
# connection's window are held (Inflight.held, Session.nheld) and sent again,
# in order, as acknowledgements free the window, before anything queued. A
# PUBLISH larger than the client's Maximum Packet Size is not sent and not put
# in flight (MQTT-3.1.2-25: as if sent); one already in flight that no longer
# fits a resumed connection leaves the window.


cdef int session_new(Worker w, const uint8_t* client_id, uint32_t n, uint8_t clean):
    """A fresh session; its slot, or -1 when memory runs out."""
    cdef int slot
    cdef Session* grown
    cdef int* free_grown
    cdef uint32_t cap
    cdef Session* s
    if w.nfree_sessions > 0:
        w.nfree_sessions -= 1
        slot = w.free_sessions[w.nfree_sessions]
    else:
        if w.nsessions == w.sessions_cap:
            if w.sessions_cap >= TOPICS_MAX_SUBSCRIBER // 2:
                return -1           # a slot is a subscriber id in the index: it must stay below its bound
            cap = w.sessions_cap * 2 if w.sessions_cap else 1024
            # The free list first: it must hold every slot before the table grows.
            free_grown = <int*>realloc(w.free_sessions, cap * sizeof(int))
            if free_grown == NULL:
                return -1
            w.free_sessions = free_grown
            grown = <Session*>realloc(w.sessions, cap * sizeof(Session))
            if grown == NULL:
                return -1
            memset(grown + w.sessions_cap, 0, (cap - w.sessions_cap) * sizeof(Session))
            w.sessions = grown
            w.sessions_cap = cap
        slot = w.nsessions
        w.nsessions += 1
    s = &w.sessions[slot]
    memset(s, 0, sizeof(Session))
    s.client_id = <char*>malloc(n if n else 1)
    if s.client_id == NULL:
        w.free_sessions[w.nfree_sessions] = slot
        w.nfree_sessions += 1
        return -1
    memcpy(s.client_id, client_id, n)
    s.client_id_len = <uint16_t>n
    s.in_use = 1
    s.clean = clean
    s.fd = -1
    s.next_packet_id = 1
    s.dirty = 1             # whatever was saved for this slot before is not this session
    w.client_sessions[PyBytes_FromStringAndSize(s.client_id, n)] = slot
    return slot


cdef int session_set_username(Session* s, bytes username) except -1:
    """Records the user the session acts as (None: anonymous); -1: no memory."""
    cdef Py_ssize_t n
    free(s.username)
    s.username = NULL
    s.username_len = 0
    if s.acl != NULL:
        s.acl.gen = 0       # another identity: its ACL view is rebuilt at the next check
    if username is None:
        return 0
    n = PyBytes_GET_SIZE(username)
    if n > 65535:
        return -1
    s.username = <char*>malloc(n if n else 1)
    if s.username == NULL:
        return -1
    memcpy(s.username, PyBytes_AS_STRING(username), n)
    s.username_len = <uint16_t>n
    return 0


cdef object session_username(Session* s):
    if s.username == NULL:
        return None
    return PyBytes_FromStringAndSize(s.username, s.username_len)


cdef inline void session_changed(Worker w, Session* s):
    """What persistence saves of a clean_session=0 session changed: the next
    snapshot serializes this one again (and only the changed ones)."""
    if not s.clean:
        s.dirty = 1
        w.sessions_changed = True


cdef void forget_filter(void* ctx, const uint8_t* topic_filter, uint32_t n, uint8_t qos) noexcept nogil:
    """topics_remove_subscriber callback: a filter lost its last local subscriber."""
    if is_share(topic_filter, n):
        return          # never announced (shared.pyx)
    with gil:
        channel_broadcast(<Worker>ctx, FR_SUB_DEL, 0, topic_filter, n, NULL, 0)


cdef void session_free(Worker w, int slot, bint release_id, bint redeliver=True):
    """Ends a session: subscriptions, messages held, will, its id (and, with
    release_id, this worker's claim on it at the id's home). With redeliver,
    the messages of shared subscriptions it had not acknowledged go to another
    member of their group (not when the session moves on with them)."""
    cdef Session* s = &w.sessions[slot]
    cdef uint32_t i
    if not s.in_use:
        return
    if s.will_timer != NULL:
        # A will held for its Will Delay Interval (will_delay.pyx): the session
        # ends first, so it goes out now; a session moving on cancels it.
        if redeliver:
            will_delay_end(w, slot, WILLS_DELAY_SESSION_END)
        else:
            will_delay_cancel(w, s)
        s = &w.sessions[slot]
    if s.nshared:
        shared_session_end(w, slot, redeliver)      # shared.pyx
    if s.congested:
        uncongest(w, s)
    topics_remove_subscriber(w.index, slot, forget_filter, <void*>w)
    for i in range(s.ninflight):
        msg_release(s.inflight[i].msg)
    for i in range(s.qlen):
        msg_release(s.queue[(s.qhead + i) % s.qcap].msg)
    if s.fd < 0 and not s.clean:
        w.counters[SESSIONS_AWAY] -= 1
    if not s.clean:
        w.sessions_changed = True
    msg_release(s.will)
    key = PyBytes_FromStringAndSize(s.client_id, s.client_id_len)
    if w.client_sessions is not None and w.client_sessions.get(key) == slot:
        del w.client_sessions[key]
        if release_id:
            registry_release(w, key)
    free(s.client_id)
    free(s.username)
    acl_view_free(s.acl)
    free(s.inflight)
    free(s.queue)
    free(s.qos2_in)
    memset(s, 0, sizeof(Session))
    s.fd = -1
    s.dirty = 1             # a saved session in this slot is gone
    w.free_sessions[w.nfree_sessions] = slot
    w.nfree_sessions += 1


cdef void session_detach(Worker w, Conn* c, bint graceful, bint release_id=True):
    """The connection of c's session is closing. The will goes out unless the
    client said DISCONNECT (MQTT-3.1.2-8, -10), an MQTT 5.0 one after its Will
    Delay Interval while its session lasts (will_delay.pyx); a clean session
    ends, a persistent one waits for its client. release_id False: the id
    stays registered to this worker (a connection here is taking it over)."""
    cdef int slot = c.session
    cdef Session* s
    c.session = -1
    if slot < 0:
        return
    s = &w.sessions[slot]
    s.fd = -1
    if s.congested:
        uncongest(w, s)     # an absent client's queue holds no publisher back
    if s.will != NULL:
        if graceful:
            msg_release(s.will)
            s.will = NULL
        elif not will_delay_start(w, slot):
            will_publish(w, s)      # will_delay.pyx: the ACL asked again (a reload may have revoked it)
        s = &w.sessions[slot]
    if s.clean:
        session_free(w, slot, release_id)
    else:
        s.away_since_ms = w.now_ms
        w.counters[SESSIONS_AWAY] += 1
        session_changed(w, s)
        if s.nshared:
            shared_session_changed(w, slot)     # its groups count one connected member less


cdef void will_expiry_starts(Msg* will) noexcept nogil:
    """An MQTT 5.0 will's Message Expiry Interval counts from its publication:
    its extras held the interval in ms plus 1 (ext_from_props from 1) until now."""
    cdef uint8_t* ext = will.data + will.topic_len + will.payload_len
    cdef uint64_t at = ext_expire_ms(ext, will.ext_len)
    if at:
        at = realtime_ms() + (at - 1)
        memcpy(ext, &at, 8)


cdef uint16_t session_packet_id(Session* s) noexcept nogil:
    """The next packet id not in flight (1..65535).

    Ids go out in sequence, so one scan of the in-flight window tells how many
    ids from the one it returns on are free: up to the nearest one in flight
    ahead in the sequence. The next that many are handed out without a scan
    (s.pid_clear); an id that gets in flight another way (a saved session
    restored) sets it back to 0."""
    cdef uint16_t pid
    cdef uint32_t i, d, nearest
    if s.pid_clear:
        s.pid_clear -= 1
        pid = s.next_packet_id
        s.next_packet_id = 1 if pid == 65535 else pid + 1
        return pid
    while True:
        pid = s.next_packet_id
        s.next_packet_id = 1 if pid == 65535 else pid + 1
        # Distances in the sequence 1..65535 (65535 ids, then 1 again).
        nearest = 65535
        for i in range(s.ninflight):
            d = (<uint32_t>s.inflight[i].packet_id + 65535 - pid) % 65535
            if d < nearest:
                nearest = d
                if d == 0:
                    break
        if nearest:
            s.pid_clear = <uint16_t>(nearest - 1)       # pid + 1 .. pid + nearest - 1
            return pid


cdef int _grow_by_packet_id(void** items, uint32_t* cap, size_t item_size) noexcept nogil:
    # An array with at most one entry per packet id grown: its capacity doubled
    # from 8, never past 0xFFFF (as many as there are packet ids). -1 when it is
    # that full already or out of memory (the array kept).
    cdef uint32_t grown_cap
    cdef void* grown
    if cap[0] >= 0xFFFF:
        return -1
    grown_cap = cap[0] * 2 if cap[0] else 8
    if grown_cap > 0xFFFF:
        grown_cap = 0xFFFF
    grown = realloc(items[0], grown_cap * item_size)
    if grown == NULL:
        return -1
    items[0] = grown
    cap[0] = grown_cap
    return 0


cdef int inflight_grow(Session* s) noexcept nogil:
    """Room for one more in-flight message; its 16-bit count and capacity stop
    at 0xFFFF (as many as there are packet ids). -1: no room."""
    if s.ninflight < s.inflight_cap:
        return 0
    return _grow_by_packet_id(<void**>&s.inflight, &s.inflight_cap, sizeof(Inflight))


cdef int session_queue_grow(Session* s) noexcept nogil:
    cdef uint32_t cap, i
    cdef Queued* q
    if s.qlen < s.qcap:
        return 0
    cap = s.qcap * 2 if s.qcap else 16
    q = <Queued*>malloc(cap * sizeof(Queued))
    if q == NULL:
        return -1
    for i in range(s.qlen):
        q[i] = s.queue[(s.qhead + i) % s.qcap]
    free(s.queue)
    s.queue = q
    s.qcap = cap
    s.qhead = 0
    return 0


cdef int session_enqueue(Session* s, Msg* msg, uint8_t qos_flags, uint64_t size) noexcept nogil:
    """Appends msg to the session's queue (the queue takes the reference the
    caller gives it): qos_flags is its QoS | retain << 2, size its topic and
    payload bytes. -1 when out of memory (nothing queued)."""
    cdef Queued* slot
    if session_queue_grow(s) < 0:
        return -1
    slot = &s.queue[(s.qhead + s.qlen) % s.qcap]
    slot.msg = msg
    slot.qos = qos_flags
    s.qlen += 1
    s.qbytes += size
    return 0


cdef inline bint session_online(Worker w, Session* s) noexcept:
    """Its client is connected (not away, not closed this turn)."""
    return s.fd >= 0 and w.conns[s.fd].state == ST_CONNECTED


cdef inline uint32_t session_window(Worker w, Session* s) noexcept:
    """The in-flight window toward the session's connected client:
    max_inflight, or its MQTT 5.0 Receive Maximum when lower."""
    cdef uint32_t r = w.conns[s.fd].recv_max_out
    return r if r and r < w.max_inflight else w.max_inflight


cdef bint msg_too_large(Worker w, Conn* c, Msg* msg, uint8_t qos) noexcept:
    """The message's PUBLISH is larger than the MQTT 5.0 client's Maximum
    Packet Size (with the Topic Alias it would get): counted, not to be sent."""
    cdef const uint8_t* ext
    if c.max_packet_out == 0 or not conn_v5(c):
        return False
    if msg.ext_len == 0 and v5_bare(w, c):
        if publish_plain_size(msg.topic_len, msg.payload_len, qos, True) <= c.max_packet_out:
            return False
        too_large_for(w, c)
        return True
    ext = msg.data + msg.topic_len + msg.payload_len
    subids_compute(w, c, msg.data, msg.topic_len)      # worker/subopts.pyx: its identifiers count too
    alias_out_pick(c, msg.data, msg.topic_len)
    if publish_out_size(c, msg.topic_len, msg.payload_len, ext, msg.ext_len, qos, 0) <= c.max_packet_out:
        c.alias_pick = 0
        subids_clear()
        return False
    too_large_for(w, c)
    return True


cdef void session_send(Worker w, Session* s, Msg* msg, uint8_t qos, uint8_t retain):
    """Puts msg in flight (the window has room and the client is here)."""
    cdef Inflight* e
    cdef Conn* c = &w.conns[s.fd]
    cdef uint8_t* out
    if c.max_packet_out and msg_too_large(w, c, msg, qos):
        return
    if inflight_grow(s) < 0:
        w.counters[DROPPED_NOMEM] += 1
        return
    e = &s.inflight[s.ninflight]
    e.msg = msg
    e.packet_id = session_packet_id(s)
    e.qos = qos
    e.state = IF_PUBLISHED
    e.retain = retain
    e.held = 0
    msg.refs += 1
    s.ninflight += 1
    session_changed(w, s)
    if msg.ext_len == 0 and (not conn_v5(c) or v5_bare(w, c)):
        # Nothing but the message (router.pyx): 3.1.1, or MQTT 5.0 with an empty property block.
        out = w.reserve(c, publish_plain_size(msg.topic_len, msg.payload_len, qos, conn_v5(c)))
        if out != NULL:
            encode_publish_plain(out, msg.data, msg.topic_len, msg.data + msg.topic_len, msg.payload_len,
                                 qos, retain, 0, e.packet_id, conn_v5(c))
    else:
        out = msg_out(w, c, msg, qos, retain, 0, e.packet_id)
    if out != NULL:
        w.counters[PKT_OUT + PUBLISH] += 1
        w.counters[MSGS_OUT] += 1


cdef uint8_t* msg_out(Worker w, Conn* c, Msg* msg, uint8_t qos, uint8_t retain, uint8_t dup, uint16_t packet_id):
    """A QoS 1/2 message's PUBLISH written for c's protocol (with its
    properties for MQTT 5.0); NULL when the buffer refused it."""
    cdef const uint8_t* ext = msg.data + msg.topic_len + msg.payload_len
    cdef uint64_t now
    cdef uint8_t* out
    if msg.ext_len == 0 and (not conn_v5(c) or v5_bare(w, c)):
        out = w.reserve(c, publish_plain_size(msg.topic_len, msg.payload_len, qos, conn_v5(c)))     # router.pyx
        if out != NULL:
            encode_publish_plain(out, msg.data, msg.topic_len, msg.data + msg.topic_len, msg.payload_len,
                                 qos, retain, dup, packet_id, conn_v5(c))
        return out
    now = realtime_ms() if ext_expire_ms(ext, msg.ext_len) else 0
    subids_prepare(w, c, msg.data, msg.topic_len)
    alias_out_pick(c, msg.data, msg.topic_len)          # worker/mqtt5.pyx (none for 3.1.1)
    out = w.reserve(c, publish_out_size(c, msg.topic_len, msg.payload_len, ext, msg.ext_len, qos, now))
    if out != NULL:
        publish_out_encode(c, out, msg.data, msg.topic_len, msg.data + msg.topic_len, msg.payload_len, ext,
                           msg.ext_len, qos, retain, dup, packet_id, now)
        alias_out_sent(w, c, msg.data, msg.topic_len)
    else:
        c.alias_pick = 0
        subids_clear()
    return out


cdef void session_pump(Worker w, Session* s):
    """Moves queued messages into the window while it has room (held
    in-flight entries of a resumed session first)."""
    cdef Queued q
    if s.congested and s.qlen <= w.queue_low:
        uncongest(w, s)
    if s.nheld and session_online(w, s):
        session_send_held(w, s)
        if s.nheld:
            return
    while s.qlen and s.fd >= 0 and s.ninflight < w.max_inflight:
        if w.conns[s.fd].state != ST_CONNECTED:
            return
        if w.conns[s.fd].recv_max_out and s.ninflight >= w.conns[s.fd].recv_max_out:
            return          # its Receive Maximum (MQTT 5.0)
        q = s.queue[s.qhead]
        s.qhead = (s.qhead + 1) % s.qcap
        s.qlen -= 1
        s.qbytes -= <uint64_t>q.msg.topic_len + q.msg.payload_len + q.msg.ext_len
        if q.msg.ext_len and ext_expired(w, q.msg.data + q.msg.topic_len + q.msg.payload_len, q.msg.ext_len):
            msg_release(q.msg)      # its Message Expiry Interval passed while it waited (MQTT-3.3.2-5)
            session_changed(w, s)
            continue
        if not may_deliver(w, s, q.msg.data, q.msg.topic_len):
            msg_release(q.msg)      # the grant was revoked (a reload) while it waited
            session_changed(w, s)
            continue
        session_send(w, s, q.msg, q.qos & 3, q.qos >> 2)
        if q.msg.origin_ns and w.now_ns > q.msg.origin_ns:
            hist_observe(w.counters, HIST_DELIVER, w.now_ns - q.msg.origin_ns)
        msg_release(q.msg)          # the queue's reference; the window holds its own


cdef void session_resume(Worker w, Session* s):
    """A persistent session's client is back: what was in flight goes again,
    PUBLISH with DUP=1 or PUBREL (MQTT-4.4.0-1), then the queue. Only as many
    as the connection's window (session_window): the rest are held, sent as
    it frees (session_send_held)."""
    cdef uint32_t i
    s.nheld = s.ninflight
    for i in range(s.ninflight):
        s.inflight[i].held = 1
    session_pump(w, s)


cdef void session_send_held(Worker w, Session* s):
    """Sends held in-flight entries again, in order, while the window
    (session_window) counts fewer sent ones than it allows. An entry whose
    PUBLISH no longer fits the client's Maximum Packet Size leaves the window
    (as if delivered, MQTT-3.1.2-25)."""
    cdef uint32_t i = 0
    cdef Inflight* e
    cdef Conn* c = &w.conns[s.fd]
    cdef uint32_t window = session_window(w, s)
    cdef uint8_t* out
    while i < s.ninflight and s.nheld and s.ninflight - s.nheld < window:
        e = &s.inflight[i]
        if not e.held:
            i += 1
            continue
        if e.state == IF_RELEASED:
            e.held = 0
            s.nheld -= 1
            if w.send_ack(c, PUBREL, e.packet_id) < 0:
                return
            i += 1
            continue
        if c.max_packet_out and msg_too_large(w, c, e.msg, e.qos):
            s.nheld -= 1
            msg_release(e.msg)
            memmove(e, e + 1, (s.ninflight - i - 1) * sizeof(Inflight))
            s.ninflight -= 1
            session_changed(w, s)
            continue
        e.held = 0
        s.nheld -= 1
        out = msg_out(w, c, e.msg, e.qos, e.retain, 1, e.packet_id)
        if out == NULL:
            return
        w.counters[PKT_OUT + PUBLISH] += 1
        w.counters[MSGS_OUT] += 1
        i += 1


cdef bint qos2_seen(Session* s, uint16_t pid) noexcept nogil:
    cdef uint32_t i
    for i in range(s.nqos2_in):
        if s.qos2_in[i] == pid:
            return True
    return False


cdef int qos2_remember(Session* s, uint16_t pid) noexcept nogil:
    # At most 0xFFFF entries (packet ids are 16-bit, and 0 is not one): the
    # 16-bit count and capacity never wrap.
    if s.nqos2_in == s.qos2_cap:
        if _grow_by_packet_id(<void**>&s.qos2_in, &s.qos2_cap, sizeof(uint16_t)) < 0:
            return -1
    s.qos2_in[s.nqos2_in] = pid
    s.nqos2_in += 1
    return 0


cdef bint qos2_forget(Session* s, uint16_t pid) noexcept nogil:
    # False when pid was not there.
    cdef uint32_t i
    for i in range(s.nqos2_in):
        if s.qos2_in[i] == pid:
            s.qos2_in[i] = s.qos2_in[s.nqos2_in - 1]
            s.nqos2_in -= 1
            return True
    return False


cdef int sessions_expire(Worker w, uint64_t limit_ms):
    """Worker.expire_sessions: ends the clean_session=0 sessions whose client
    has been away longer than limit_ms (0: never), and the MQTT 5.0 sessions
    away longer than their Session Expiry Interval; how many."""
    cdef uint32_t slot
    cdef int n = 0
    cdef uint64_t now = monotonic_ms()
    cdef Session* s
    for slot in range(w.nsessions):
        s = &w.sessions[slot]
        if not s.in_use or s.fd >= 0 or s.clean:
            continue
        if s.version == 5:
            # MQTT 5.0: its own Session Expiry Interval (0xFFFFFFFF: never), not session_expiry.
            if s.expiry_s == 0xFFFFFFFF or now - s.away_since_ms <= <uint64_t>s.expiry_s * 1000:
                continue
        elif limit_ms == 0 or now - s.away_since_ms <= limit_ms:
            continue
        session_free(w, slot, True)
        w.counters[SESSIONS_EXPIRED] += 1
        n += 1
    return n
