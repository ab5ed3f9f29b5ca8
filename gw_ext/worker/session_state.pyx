# Included by loop.pyx. A persistent session's state as bytes: what moves to
# another worker when its client connects there (FR_SESSION, registry.pyx)
# and what the data dir keeps (gw/persistence.py, through
# Worker.snapshot_sessions and Worker.restore_sessions). Layout, little-endian:
#   u8 SESSION_STATE_VERSION;
#   u32 nsubs, (u16 len, filter, u8 qos, u8 options (SUBOPT_*), u32 Subscription
#               Identifier (0: none): MQTT 5.0's, worker/subopts.pyx)*;
#   u16 next packet id;
#   u32 nmsgs, (u16 packet id (0: queued), u8 qos | retain << 2, u8 state,
#               u16 topic len, u32 payload len, topic, payload,
#               u32 extras len, extras (an MQTT 5.0 message's properties: loop.pxd, Msg))*;
#   u32 nqos2, (u16 packet id)*;
#   u8 has user name, u16 len, user name (the user the session acts as: the
#     identity the ACL checks and a takeover must match);
#   the expiry tail (session_expiry_tail / restore_expiry_tail): u8 protocol
#     version of its last CONNECT (5: MQTT 5.0), u32 Session Expiry Interval
#     (MQTT 5.0; seconds, 0xFFFFFFFF never), u64 wall-clock ms its client went
#     away (0: connected when serialized), so a restored MQTT 5.0 session
#     keeps its own expiry, counted from when its client left.
# Versions 4 (subscriptions without options nor identifier, no expiry tail:
# restored sessions follow session_expiry from their restart), 3 (nor
# messages' extras) and 2 (nor user name: anonymous) are still read.
# Counts are u32: a session may hold more than 65,535 subscriptions or messages.
# session_restore checks every length against what is left before reading it.

cdef enum:
    SESSION_STATE_VERSION = 5
    SESSION_STATE_V4 = 4              # the version before subscription options, identifiers and the expiry tail
    SESSION_STATE_NO_EXT = 3          # the version before MQTT 5.0 messages' extras
    SESSION_STATE_NO_USER = 2         # the version before user names: read as anonymous


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
    cdef uint8_t sq, opts
    cdef uint32_t subid
    topics_subscriptions(w.index, slot, collect_sub, <void*>subs)
    parts.append(struct_pack("<BI", SESSION_STATE_VERSION, len(subs)))
    for f, qos in subs:
        opts = 0
        subid = 0
        topics_subscription_info(w.index, <const uint8_t*>PyBytes_AS_STRING(f), <uint32_t>len(f), slot,
                                 &sq, &opts, &subid)
        parts.append(struct_pack("<H", len(f)) + f + struct_pack("<BBI", qos, opts, subid))
    parts.append(struct_pack("<HI", s.next_packet_id, s.ninflight + s.qlen))
    for i in range(s.ninflight):
        m = s.inflight[i].msg
        parts.append(struct_pack("<HBBHI", s.inflight[i].packet_id, s.inflight[i].qos | (s.inflight[i].retain << 2),
                                 s.inflight[i].state, m.topic_len, m.payload_len))
        parts.append(PyBytes_FromStringAndSize(<char*>m.data, m.topic_len + m.payload_len))
        parts.append(struct_pack("<I", m.ext_len))
        if m.ext_len:
            parts.append(PyBytes_FromStringAndSize(<char*>m.data + m.topic_len + m.payload_len, m.ext_len))
    for i in range(s.qlen):
        q = &s.queue[(s.qhead + i) % s.qcap]
        m = q.msg
        parts.append(struct_pack("<HBBHI", 0, q.qos, 0, m.topic_len, m.payload_len))
        parts.append(PyBytes_FromStringAndSize(<char*>m.data, m.topic_len + m.payload_len))
        parts.append(struct_pack("<I", m.ext_len))
        if m.ext_len:
            parts.append(PyBytes_FromStringAndSize(<char*>m.data + m.topic_len + m.payload_len, m.ext_len))
    parts.append(struct_pack("<I", s.nqos2_in))
    for i in range(s.nqos2_in):
        parts.append(struct_pack("<H", s.qos2_in[i]))
    if s.username == NULL:
        parts.append(b"\0\0\0")
    else:
        parts.append(struct_pack("<BH", 1, s.username_len))
        parts.append(PyBytes_FromStringAndSize(s.username, s.username_len))
    parts.append(session_expiry_tail(w, s))
    return b"".join(parts)


cdef bytes session_expiry_tail(Worker w, Session* s):
    """The layout's last part: protocol version, Session Expiry Interval, and
    when its client went away as wall-clock ms (0: it is connected)."""
    cdef uint64_t away_wall = 0
    cdef uint64_t now_mono
    if s.fd < 0 and s.away_since_ms:
        now_mono = monotonic_ms()
        away_wall = realtime_ms() - (now_mono - s.away_since_ms if now_mono > s.away_since_ms else 0)
    return struct_pack("<BIQ", s.version, s.expiry_s, away_wall)


cdef int restore_expiry_tail(Worker w, Session* s, const uint8_t* p, const uint8_t* end) except -2:
    """session_expiry_tail's bytes at p: the session's version and expiry; its
    away time (Session.away_since_ms on the monotonic clock, 1 at the least;
    0 when it was connected: its caller counts from now)."""
    cdef uint64_t away_wall, now_wall, now_mono, gone
    if end - p < 13:
        return session_restore_fault(w, "session expiry missing")
    s.version = p[0]
    s.expiry_s = rd32(p + 1)
    memcpy(&away_wall, p + 5, 8)
    s.away_since_ms = 0
    if away_wall:
        now_wall = realtime_ms()
        now_mono = monotonic_ms()
        gone = now_wall - away_wall if now_wall > away_wall else 0
        s.away_since_ms = now_mono - gone if now_mono > gone else 1
    return 0


cdef inline uint32_t rd16(const uint8_t* p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8)


cdef inline uint32_t rd32(const uint8_t* p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef int session_restore(Worker w, int slot, bytes state) except -2:
    """Rebuilds a session from session_serialize's bytes (a peer's or a file's).
    0 when whole; -1 when it was cut short or malformed: what came before the
    fault is kept, the rest dropped, counted and logged."""
    cdef Session* s = &w.sessions[slot]
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(state)
    cdef const uint8_t* end = p + PyBytes_GET_SIZE(state)
    cdef uint32_t nsubs, nmsgs, nq2, i, flen, tlen, plen, xlen
    cdef const uint8_t* ext
    cdef uint16_t pid
    cdef uint8_t qos, st, retain
    cdef int r, off
    cdef Msg* m
    cdef uint8_t version
    cdef uint32_t ulen, subtail, subid
    cdef uint8_t opts
    if end - p < 5 or (p[0] != SESSION_STATE_VERSION and p[0] != SESSION_STATE_V4
                       and p[0] != SESSION_STATE_NO_EXT and p[0] != SESSION_STATE_NO_USER):
        return session_restore_fault(w, "unknown format")
    version = p[0]
    nsubs = rd32(p + 1)
    p += 5
    subtail = 6 if version == SESSION_STATE_VERSION else 1      # qos[, options, identifier]
    for i in range(nsubs):
        if end - p < 2 or end - p - 2 < <Py_ssize_t>(rd16(p) + subtail):
            return session_restore_fault(w, "subscriptions cut short")
        flen = rd16(p)
        qos = p[2 + flen]
        opts = 0
        subid = 0
        if subtail == 6:
            opts = p[3 + flen] & (SUBOPT_NO_LOCAL | SUBOPT_RAP)
            subid = rd32(p + 4 + flen)
            if subid > 268435455:
                subid = 0
            if subid:
                s.subids = 1
        if qos <= 2 and valid_topic_filter(p + 2, flen):
            if is_share(p + 2, flen):
                off = share_split(p + 2, flen)
                if (off > 0 and shared_join(w, slot, p + 2, flen, <uint32_t>off, qos, opts) >= 0    # shared.pyx
                        and (opts or subid)):
                    topics_subscribe_ext(w.index, p + 2, flen, slot, qos, opts, subid)
            else:
                r = topics_subscribe_ext(w.index, p + 2, flen, slot, qos, opts, subid)
                if r == 1:
                    channel_broadcast(w, FR_SUB_ADD, 0, p + 2, flen, NULL, 0)
        p += 2 + flen + subtail
    if end - p < 6:
        return session_restore_fault(w, "message count missing")
    s.next_packet_id = <uint16_t>rd16(p) or 1
    s.pid_clear = 0         # its messages in flight keep their ids: scan before the next
    nmsgs = rd32(p + 2)
    p += 6
    for i in range(nmsgs):
        if end - p < 10:
            return session_restore_fault(w, "message cut short")
        pid = <uint16_t>rd16(p)
        qos = p[2] & 3
        retain = (p[2] >> 2) & 1
        st = p[3]
        tlen = rd16(p + 4)
        plen = rd32(p + 6)
        p += 10
        if <uint64_t>(end - p) < <uint64_t>tlen + plen or qos == 0 or qos == 3 or st > IF_RELEASED:
            return session_restore_fault(w, "message malformed")
        ext = p + tlen + plen
        xlen = 0
        if version >= SESSION_STATE_V4:
            if end - ext < 4:
                return session_restore_fault(w, "message extras missing")
            xlen = rd32(ext)
            ext += 4
            if <uint64_t>(end - ext) < xlen or 0 < xlen < EXT_HEADER:
                return session_restore_fault(w, "message extras malformed")
        m = msg_new_ext(p, tlen, p + tlen, plen, ext, xlen, qos, 0)
        p = ext + xlen
        if m == NULL:
            w.counters[DROPPED_NOMEM] += 1
            continue
        if pid:
            if inflight_grow(s) < 0:
                msg_release(m)
                w.counters[DROPPED_NOMEM] += 1
                continue
            e = &s.inflight[s.ninflight]
            e.msg = m
            e.packet_id = pid
            e.qos = qos
            e.state = st
            e.retain = retain
            e.held = 0
            s.ninflight += 1
        else:
            if session_enqueue(s, m, qos | (retain << 2), <uint64_t>tlen + plen + xlen) < 0:
                msg_release(m)
                w.counters[DROPPED_NOMEM] += 1
                continue
    if end - p < 4:
        return session_restore_fault(w, "QoS 2 ids missing")
    nq2 = rd32(p)
    p += 4
    if <uint64_t>(end - p) < <uint64_t>nq2 * 2:
        return session_restore_fault(w, "QoS 2 ids cut short")
    for i in range(nq2):
        pid = <uint16_t>rd16(p + 2 * i)
        if pid and s.nqos2_in < 65535:
            qos2_remember(s, pid)
    p += <Py_ssize_t>nq2 * 2
    if version == SESSION_STATE_NO_USER:
        return 0
    if end - p < 3:
        return session_restore_fault(w, "user name missing")
    ulen = rd16(p + 1)
    if p[0]:
        if end - p - 3 < <Py_ssize_t>ulen:
            return session_restore_fault(w, "user name cut short")
        if session_set_username(s, PyBytes_FromStringAndSize(<char*>p + 3, ulen)) < 0:
            return session_restore_fault(w, "no memory for the user name")
        p += 3 + ulen
    else:
        p += 3
    if version == SESSION_STATE_VERSION:
        return restore_expiry_tail(w, s, p, end)
    return 0


cdef int session_restore_fault(Worker w, str what) except -2:
    w.counters[CHANNEL_MALFORMED] += 1
    w.log_limited(CR_CHANNEL, "a transferred or saved session was malformed (%s); restored what came before" % what)
    return -1


cdef list sessions_snapshot(Worker w, bint changed_only):
    """Worker.snapshot_sessions: [(slot, client id, state)] of the clean_session=0
    sessions (with changed_only, of the slots marked dirty since the last call,
    (slot, None, None) for one that no longer holds such a session)."""
    cdef uint32_t slot
    cdef Session* s
    out = []
    for slot in range(w.nsessions):
        s = &w.sessions[slot]
        if changed_only and not s.dirty:
            continue
        s.dirty = 0
        if s.in_use and not s.clean:
            out.append((slot, PyBytes_FromStringAndSize(s.client_id, s.client_id_len),
                        session_serialize(w, slot)))
        elif changed_only:
            out.append((slot, None, None))
    w.sessions_changed = False
    return out


cdef void sessions_load(Worker w, list saved) except *:
    """Worker.restore_sessions: saved sessions come back at start-up, their
    clients away; begin() registers them at their ids' homes."""
    cdef int slot
    cdef Session* s
    cdef bytes cid, state
    for cid, state in saved:
        if cid in w.client_sessions:
            continue
        slot = session_new(w, <const uint8_t*>PyBytes_AS_STRING(cid), len(cid), 0)
        if slot < 0:
            raise MemoryError()
        session_restore(w, slot, state)
        s = &w.sessions[slot]
        if s.away_since_ms == 0:
            s.away_since_ms = monotonic_ms()    # away from now (saved connected, or an older layout)
        w.counters[SESSIONS_AWAY] += 1
        if (s.version == 5 and s.expiry_s != 0xFFFFFFFF
                and monotonic_ms() - s.away_since_ms > <uint64_t>s.expiry_s * 1000):
            # Its Session Expiry Interval passed while the server was down.
            session_free(w, slot, False)
            w.counters[SESSIONS_EXPIRED] += 1
            continue
        w.restored.append(cid)
