# Included by loop.pyx. Client ids across workers: who holds which session.
#
# Every client id has a home worker (crc32(id) % workers) that records which
# worker owns its session. A CONNECT claims the id at its home; the home
# answers the claimant (GRANT, naming the previous owner) and, when another
# worker owned it, tells that one to give it up (EVICT): it closes the old
# connection (MQTT-3.1.4-2) and sends the session (subscriptions, messages in
# flight with their packet ids, the queue, QoS 2 ids awaiting PUBREL) to the
# claimant (SESSION). The claimant's connection reads nothing meanwhile; the
# CONNACK goes out when its session is settled.
#
# A worker that (re)starts says HELLO: peers drop the entries they hold for
# it (its sessions died with it) and re-register their own clients whose home
# it is (its registry died with it).

from zlib import crc32

cdef enum:
    FR_CLAIM = 6              # body: token u32, clean u8, client id
    FR_GRANT = 7              # body: token u32, previous owner i8 (-1: none), client id
    FR_EVICT = 8              # body: new owner u8, token u32, new clean u8, client id
    FR_SESSION = 9            # body: token u32, present u8, id length u16, client id, session state
    FR_RELEASE = 10           # body: owner u8, client id
    FR_REGISTER = 11          # body: owner u8, client id
    SETTLE_TIMEOUT_MS = 3000  # a claim unanswered this long (a peer died) settles as a new session


cdef class PendingConnect:
    """A CONNECT waiting for its session to be settled."""
    cdef int fd
    cdef uint32_t gen
    cdef bytes client_id
    cdef uint8_t clean
    cdef uint16_t keepalive
    cdef bytes will_topic
    cdef bytes will_message
    cdef uint8_t will_flag, will_qos, will_retain
    cdef int prev_owner          # from GRANT: -2 not yet granted, -1 none


cdef inline int home_of(Worker w, bytes client_id):
    return crc32(client_id) % w.npeers


cdef void send_small(Worker w, int p, uint8_t ftype, bytes head, bytes client_id):
    cdef uint8_t* body = channel_frame(w, p, ftype, 0, 0, len(head) + len(client_id))
    if body != NULL:
        memcpy(body, PyBytes_AS_STRING(head), len(head))
        memcpy(body + len(head), PyBytes_AS_STRING(client_id), len(client_id))


cdef int connect_claim(Worker w, Conn* c, PendingConnect pc):
    """Starts settling c's session; the connection stops reading until then."""
    cdef int home = home_of(w, pc.client_id)
    w.settle_token += 1
    token = w.settle_token
    w.pending[token] = pc
    c.state = ST_SETTLING
    c.pending_token = token
    w.update_events(c)       # ST_SETTLING: not read until settled
    wheel_schedule(&w.wheel, &c.timer, w.now_ms + SETTLE_TIMEOUT_MS)
    if home == w.worker_index or w.peers[home].fd < 0:
        registry_claim(w, w.worker_index, token, pc.clean, pc.client_id)
    else:
        send_small(w, home, FR_CLAIM, struct_pack("<IB", token, pc.clean), pc.client_id)
    return 0


cdef void registry_claim(Worker w, int claimant, uint32_t token, uint8_t clean, bytes client_id):
    """At the id's home: record the new owner, answer, evict the old one."""
    cdef int prev = w.registry.get(client_id, -1)
    w.registry[client_id] = claimant
    if prev >= 0 and prev != claimant and prev != w.worker_index and w.peers[prev].fd < 0:
        prev = -1           # no such worker any more
    deliver_grant(w, claimant, token, prev, client_id)
    if prev >= 0 and prev != claimant:
        if prev == w.worker_index:
            registry_evict(w, claimant, token, clean, client_id)
        else:
            send_small(w, prev, FR_EVICT, struct_pack("<BIB", claimant, token, clean), client_id)


cdef void deliver_grant(Worker w, int claimant, uint32_t token, int prev, bytes client_id):
    if claimant == w.worker_index:
        on_grant(w, token, prev)
    else:
        send_small(w, claimant, FR_GRANT, struct_pack("<Ib", token, prev), client_id)


cdef void on_grant(Worker w, uint32_t token, int prev):
    cdef PendingConnect pc = w.pending.get(token)
    if pc is None:
        return
    if prev == -1 or prev == w.worker_index:
        # No other worker had it: settle here (a local session may exist).
        connect_settle(w, token, None)
    else:
        pc.prev_owner = prev      # the SESSION frame from `prev` settles it


cdef void registry_evict(Worker w, int claimant, uint32_t token, uint8_t clean, bytes client_id):
    """We owned client_id; it connected elsewhere. Close ours and hand over."""
    cdef int slot = w.client_sessions.get(client_id, -1)
    cdef bytes state = b""
    cdef uint8_t present = 0
    if slot >= 0 and w.sessions[slot].fd >= 0:
        w.counters[TAKEOVERS] += 1
        w.close_conn(&w.conns[w.sessions[slot].fd], CR_TAKEOVER)
        slot = w.client_sessions.get(client_id, -1)
    if slot >= 0:
        if not clean and not w.sessions[slot].clean:
            state = session_serialize(w, slot)
            present = 1
        session_free(w, slot, False)
    if claimant == w.worker_index:
        on_session(w, token, present, state)
        return
    head = struct_pack("<IBH", token, present, len(client_id))
    cdef uint8_t* body = channel_frame(w, claimant, FR_SESSION, 0, 0, len(head) + len(client_id) + len(state))
    if body != NULL:
        memcpy(body, PyBytes_AS_STRING(head), len(head))
        memcpy(body + len(head), PyBytes_AS_STRING(client_id), len(client_id))
        memcpy(body + len(head) + len(client_id), PyBytes_AS_STRING(state), len(state))


cdef void on_session(Worker w, uint32_t token, uint8_t present, bytes state):
    cdef PendingConnect pc = w.pending.get(token)
    if pc is None:
        return
    connect_settle(w, token, state if present else None)


cdef void registry_release(Worker w, bytes client_id):
    """A session of ours ended: its home forgets us (unless someone else has it now)."""
    cdef int home = home_of(w, client_id)
    if home == w.worker_index or w.peers[home].fd < 0:
        if w.registry.get(client_id) == w.worker_index:
            del w.registry[client_id]
    else:
        send_small(w, home, FR_RELEASE, struct_pack("<B", w.worker_index), client_id)


cdef void registry_register(Worker w, bytes client_id):
    """Tells client_id's home that this worker holds its session."""
    cdef int home = home_of(w, client_id)
    if home == w.worker_index or w.peers[home].fd < 0:
        w.registry[client_id] = w.worker_index
    else:
        send_small(w, home, FR_REGISTER, struct_pack("<B", w.worker_index), client_id)


cdef void registry_peer_restarted(Worker w, int p):
    """Worker p (re)started: its sessions are gone; our clients homed there re-register."""
    cdef bytes cid
    for cid in [k for k, v in w.registry.items() if v == p]:
        del w.registry[cid]
    for cid in w.client_sessions:
        if home_of(w, cid) == p:
            send_small(w, p, FR_REGISTER, struct_pack("<B", w.worker_index), cid)


cdef inline bint is_worker(Worker w, int p) noexcept:
    """Whether p names a worker: this one, or a peer with a channel."""
    return 0 <= p < w.npeers and (p == w.worker_index or w.peers[p].fd >= 0)


cdef void registry_frame(Worker w, int p, uint8_t ftype, const uint8_t* body, uint32_t n):
    cdef bytes data = PyBytes_FromStringAndSize(<char*>body, n)
    cdef uint32_t token
    cdef int prev, owner, claimant, clean, present, idlen
    if ftype == FR_CLAIM and n >= 5:
        token, clean = struct_unpack_from("<IB", data)
        registry_claim(w, p, token, clean, data[5:])
    elif ftype == FR_GRANT and n >= 5:
        token, prev = struct_unpack_from("<Ib", data)
        on_grant(w, token, prev)
    elif ftype == FR_EVICT and n >= 6:
        claimant, token, clean = struct_unpack_from("<BIB", data)
        if not is_worker(w, claimant):
            # Worker numbers index the peer table: one that names no worker is dropped.
            w.log_limited(CR_CHANNEL, "channel from worker %d: EVICT for unknown worker %d dropped" % (p, claimant))
            return
        registry_evict(w, claimant, token, clean, data[6:])
    elif ftype == FR_SESSION and n >= 7:
        token, present, idlen = struct_unpack_from("<IBH", data)
        on_session(w, token, present, data[7 + idlen:])
    elif ftype == FR_RELEASE and n >= 1:
        owner = data[0]
        if w.registry.get(data[1:]) == owner:
            del w.registry[data[1:]]
    elif ftype == FR_REGISTER and n >= 1:
        if not is_worker(w, data[0]):
            w.log_limited(CR_CHANNEL, "channel from worker %d: REGISTER for unknown worker %d dropped"
                          % (p, data[0]))
            return
        w.registry[data[1:]] = data[0]


# --- settling a CONNECT ----------------------------------------------------------

cdef void connect_settle(Worker w, uint32_t token, object state):
    """The session question is answered: build or resume the session, CONNACK,
    and go on with whatever the client sent after its CONNECT."""
    cdef PendingConnect pc = w.pending.pop(token, None)
    cdef Conn* c
    cdef int slot
    cdef Session* s
    cdef uint8_t present = 0
    cdef uint8_t* out
    if pc is None:
        return
    c = &w.conns[pc.fd]
    if c.state != ST_SETTLING or c.gen != pc.gen:
        # The client left while we waited. A transferred persistent session
        # stays here, waiting for it.
        if state is not None:
            slot = session_new(w, <const uint8_t*>PyBytes_AS_STRING(pc.client_id), len(pc.client_id), 0)
            if slot >= 0:
                session_restore(w, slot, state)
                w.counters[SESSIONS_AWAY] += 1
                w.sessions[slot].away_since_ms = w.now_ms
        else:
            registry_release(w, pc.client_id)
        return
    slot = w.client_sessions.get(pc.client_id, -1)
    if slot >= 0 and w.sessions[slot].fd >= 0:
        # The same client id connected twice on this worker: the first goes (MQTT-3.1.4-2).
        w.counters[TAKEOVERS] += 1
        w.close_conn(&w.conns[w.sessions[slot].fd], CR_TAKEOVER)
        slot = w.client_sessions.get(pc.client_id, -1)
    if slot >= 0:
        if pc.clean or w.sessions[slot].clean:
            session_free(w, slot, False)            # MQTT-3.1.2-6
            slot = -1
        else:
            present = 1                             # MQTT-3.2.2-2
            w.counters[SESSIONS_AWAY] -= 1
    if slot < 0:
        slot = session_new(w, <const uint8_t*>PyBytes_AS_STRING(pc.client_id), len(pc.client_id), pc.clean)
        if slot < 0:
            w.close_conn(c, CR_SERVER)
            return
        if state is not None and not pc.clean:
            session_restore(w, slot, state)
            present = 1
    s = &w.sessions[slot]
    s.clean = pc.clean
    s.fd = c.fd
    if not pc.clean:
        w.sessions_changed = True
    c.session = slot
    if pc.will_flag:
        s.will = msg_new(<const uint8_t*>PyBytes_AS_STRING(pc.will_topic), len(pc.will_topic),
                         <const uint8_t*>PyBytes_AS_STRING(pc.will_message), len(pc.will_message),
                         pc.will_qos, pc.will_retain)
        s.will_qos = pc.will_qos
        s.will_retain = pc.will_retain
    c.keepalive = pc.keepalive
    w.become_connected(c, <uint32_t>pc.keepalive * 1500)
    w.counters[MQTT_CONNECTED] += 1
    out = w.reserve(c, 4)
    if out == NULL:
        return
    encode_connack(out, present, CONNACK_ACCEPTED)
    w.counters[PKT_OUT + CONNACK] += 1
    if present:
        session_resume(w, s)
    w.update_events(c)
    if w.publishers_paused and c.flags & F_PUBLISHER:
        pause_conn(w, c)
    if c.inlen:
        # Packets the client sent right after CONNECT, held while we settled.
        w.resume_input(c)


# --- moving a session between workers ---------------------------------------------
# Layout: u16 nsubs, (u16 len, filter, u8 qos)*; u16 next packet id;
# u32 nmsgs, (u16 packet id (0: queued), u8 qos, u8 state, u16 topic len,
# u32 payload len, topic, payload)*; u16 nqos2, (u16 packet id)*.

cdef void collect_sub(void* ctx, const uint8_t* topic_filter, uint32_t n, uint8_t qos) noexcept nogil:
    with gil:
        (<list>ctx).append((PyBytes_FromStringAndSize(<char*>topic_filter, n), qos))


cdef bytes session_serialize(Worker w, int slot):
    cdef Session* s = &w.sessions[slot]
    cdef list subs = []
    cdef list parts = []
    cdef uint32_t i
    cdef Msg* m
    cdef Queued* q
    topics_subscriptions(w.index, slot, collect_sub, <void*>subs)
    parts.append(struct_pack("<H", len(subs)))
    for f, qos in subs:
        parts.append(struct_pack("<H", len(f)) + f + struct_pack("<B", qos))
    parts.append(struct_pack("<HI", s.next_packet_id, s.ninflight + s.qlen))
    for i in range(s.ninflight):
        m = s.inflight[i].msg
        parts.append(struct_pack("<HBBHI", s.inflight[i].packet_id, s.inflight[i].qos, s.inflight[i].state,
                                 m.topic_len, m.payload_len))
        parts.append(PyBytes_FromStringAndSize(<char*>m.data, m.topic_len + m.payload_len))
    for i in range(s.qlen):
        q = &s.queue[(s.qhead + i) % s.qcap]
        m = q.msg
        parts.append(struct_pack("<HBBHI", 0, q.qos, 0, m.topic_len, m.payload_len))
        parts.append(PyBytes_FromStringAndSize(<char*>m.data, m.topic_len + m.payload_len))
    parts.append(struct_pack("<H", s.nqos2_in))
    for i in range(s.nqos2_in):
        parts.append(struct_pack("<H", s.qos2_in[i]))
    return b"".join(parts)


cdef int restore_inflight(Session* s, Msg* m, uint16_t pid, uint8_t qos, uint8_t state) noexcept nogil:
    """Appends one in-flight message of a restored session (at most 65535, one
    per packet id); -1 when there is no room."""
    cdef uint32_t cap
    cdef Inflight* grown
    if s.ninflight == s.inflight_cap:
        if s.inflight_cap >= 65535:
            return -1
        cap = <uint32_t>s.inflight_cap * 2 if s.inflight_cap else 8
        if cap > 65535:
            cap = 65535
        grown = <Inflight*>realloc(s.inflight, cap * sizeof(Inflight))
        if grown == NULL:
            return -1
        s.inflight = grown
        s.inflight_cap = <uint16_t>cap
    s.inflight[s.ninflight].msg = m
    s.inflight[s.ninflight].packet_id = pid
    s.inflight[s.ninflight].qos = qos
    s.inflight[s.ninflight].state = state
    s.ninflight += 1
    return 0


cdef void session_restore(Worker w, int slot, bytes state):
    """Brings back a session from session_serialize's bytes: from a peer's
    SESSION frame or the data dir, so every count and length is checked
    against what is there. A state cut short or inconsistent restores what
    came before the fault, and is logged."""
    cdef Session* s = &w.sessions[slot]
    cdef Py_ssize_t pos = 0, size = PyBytes_GET_SIZE(state)
    cdef uint32_t nsubs, nmsgs, nq2, i
    cdef uint32_t flen, tlen, plen
    cdef uint16_t pid
    cdef uint8_t qos, st
    cdef int r
    cdef Msg* m
    cdef Queued* slotq
    cdef const uint8_t* raw = <const uint8_t*>PyBytes_AS_STRING(state)
    # Little-endian fields, read only after checking they are there.
    if size < 2:
        session_restore_cut(w)
        return
    nsubs = raw[0] | (<uint32_t>raw[1] << 8)
    pos = 2
    for i in range(nsubs):
        if size - pos < 2:
            session_restore_cut(w)
            return
        flen = raw[pos] | (<uint32_t>raw[pos + 1] << 8)
        if size - pos < 3 + <Py_ssize_t>flen:
            session_restore_cut(w)
            return
        qos = raw[pos + 2 + flen]
        if qos <= 2 and valid_utf8(raw + pos + 2, flen) and valid_topic_filter(raw + pos + 2, flen):
            r = topics_subscribe(w.index, raw + pos + 2, flen, slot, qos)
            if r == 1:
                channel_broadcast(w, FR_SUB_ADD, 0, raw + pos + 2, flen, NULL, 0)
        pos += 3 + flen
    if size - pos < 6:
        session_restore_cut(w)
        return
    s.next_packet_id = raw[pos] | (<uint16_t>raw[pos + 1] << 8)
    if s.next_packet_id == 0:
        s.next_packet_id = 1
    memcpy(&nmsgs, raw + pos + 2, 4)
    pos += 6
    for i in range(nmsgs):
        if size - pos < 10:
            session_restore_cut(w)
            return
        pid = raw[pos] | (<uint16_t>raw[pos + 1] << 8)
        qos = raw[pos + 2]
        st = raw[pos + 3]
        tlen = raw[pos + 4] | (<uint32_t>raw[pos + 5] << 8)
        memcpy(&plen, raw + pos + 6, 4)
        pos += 10
        if <uint64_t>(size - pos) < <uint64_t>tlen + plen:
            session_restore_cut(w)
            return
        # Queued entries carry the retain flag in bit 2 (deliver_msg); a message
        # goes out at QoS 1 or 2 only.
        if not 1 <= (qos & 3) <= 2 or st > IF_RELEASED or (pid and qos > 2):
            pos += tlen + plen
            continue
        m = msg_new(raw + pos, tlen, raw + pos + tlen, plen, qos & 3, 0)
        pos += tlen + plen
        if m == NULL:
            w.counters[DROPPED_NOMEM] += 1
            continue
        if pid:
            if restore_inflight(s, m, pid, qos, st) < 0:
                msg_release(m)
                w.counters[DROPPED_NOMEM] += 1
        else:
            if session_queue_grow(s) < 0:
                msg_release(m)
                w.counters[DROPPED_NOMEM] += 1
                continue
            slotq = &s.queue[(s.qhead + s.qlen) % s.qcap]
            slotq.msg = m
            slotq.qos = qos
            s.qlen += 1
    if size - pos < 2:
        session_restore_cut(w)
        return
    nq2 = raw[pos] | (<uint32_t>raw[pos + 1] << 8)
    pos += 2
    for i in range(nq2):
        if size - pos < 2:
            session_restore_cut(w)
            return
        pid = raw[pos] | (<uint16_t>raw[pos + 1] << 8)
        pos += 2
        if pid and not qos2_seen(s, pid) and qos2_remember(s, pid) < 0:
            break


cdef void session_restore_cut(Worker w):
    w.log_limited(CR_CHANNEL, "a transferred session was cut short; restored what arrived")
