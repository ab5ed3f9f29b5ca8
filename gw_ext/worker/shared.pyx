# Included by loop.pyx. Shared subscriptions: $share/{ShareName}/{filter}
# (MQTT 5.0 section 4.8.2), for every protocol version the broker speaks: the
# entry points take a filter and a granted QoS, whatever codec decoded them.
#
# A group is (ShareName, filter); each message matching the filter goes to ONE
# of its members, wherever they are connected. The worker a message is
# published on picks (see ARCHITECTURE.md, "Shared subscriptions"):
#
# - A member's session holds its subscription under the whole filter
#   "$share/{name}/{filter}" in the worker's TopicTrie (so max_subscriptions,
#   persistence, moving the session and UNSUBSCRIBE treat it like any other),
#   never announced to the peers: no topic name a client publishes reaches it
#   (route_local ignores topics starting with "$share/").
# - Every worker knows every group (`ShareGroup`): its own members, and how
#   many each peer has, connected and in all (FR_SHARED_COUNT, sent by the
#   worker that holds the members whenever its counts change; a restarted
#   peer's counts are forgotten at its HELLO and it tells them again). The
#   group's filter is in the worker's `share_index` under the group's slot.
# - A message published here matches `share_index` once; for each group the
#   worker picks a worker weighted by its connected members (round-robin over
#   them: every member is picked once per cycle), and that worker one of its
#   connected members, round-robin. Another worker's pick is sent there
#   (FR_SHARED_PUBLISH, naming its slot of the group). Messages from peers
#   (FR_PUBLISH) never go to groups: their publisher's worker did that.
# - Where the pick finds no connected member (it left meanwhile): a message
#   passed on already goes to any member here (an away one's session queues
#   it), never back to a worker whose counts may be as far behind as ours;
#   else to another worker with a connected member (at most one hop per
#   worker), then to a member here whose persistent session is away, then
#   elsewhere; else it is dropped, counted.
# - QoS 1/2 deliveries are Msgs of their own, tagged with the group. A member
#   that leaves (clean session ended, persistent session expired, taken over
#   by a clean session) gives the messages it had not acknowledged back to the
#   group (PUBLISH sent without PUBACK/PUBREC, or queued), after it left it.


cdef inline bint is_share(const uint8_t* f, uint32_t n) noexcept nogil:
    return n >= 7 and f[0] == 36 and memcmp(f, b"$share/", 7) == 0


cdef int share_split(const uint8_t* f, uint32_t n) noexcept nogil:
    """For a filter starting with "$share/": where the group's filter starts,
    or -1 when malformed (MQTT 5.0 4.8.2: a ShareName of at least one
    character, without '/', '+' or '#', then '/' and a filter)."""
    cdef uint32_t i = 7
    while i < n and f[i] != 47:
        if f[i] == 43 or f[i] == 35:
            return -1
        i += 1
    if i == 7 or i + 1 >= n:
        return -1
    if not valid_topic_filter(f + i + 1, n - i - 1):
        return -1
    return <int>(i + 1)


cdef int shared_group(Worker w, bytes key, uint32_t off, bint create) except -2:
    """The slot of the group named by key ("$share/{name}/{filter}", its filter
    at off); with create, made when unknown. -1: unknown, or no memory."""
    cdef object known = w.share_ids.get(key)
    cdef int gid
    cdef uint32_t cap
    cdef ShareGroup* grown
    cdef ShareGroup* g
    cdef const uint8_t* f
    if known is not None:
        return <int>known
    if not create:
        return -1
    if w.free_groups:
        gid = w.free_groups.pop()
    else:
        if w.ngroups == w.groups_cap:
            if w.groups_cap >= TOPICS_MAX_SUBSCRIBER // 2:
                return -1
            cap = w.groups_cap * 2 if w.groups_cap else 16
            grown = <ShareGroup*>realloc(w.groups, cap * sizeof(ShareGroup))
            if grown == NULL:
                return -1
            w.groups = grown
            w.groups_cap = cap
        gid = w.ngroups
        w.ngroups += 1
        w.share_keys.append(None)
    g = &w.groups[gid]
    memset(g, 0, sizeof(ShareGroup))
    f = <const uint8_t*>PyBytes_AS_STRING(key)
    if topics_subscribe(w.share_index, f + off, <uint32_t>len(key) - off, gid, 2) < 0:
        w.free_groups.append(gid)
        return -1
    w.group_gen += 1
    if w.group_gen == 0:
        w.group_gen = 1
    g.gen = w.group_gen
    w.share_ids[key] = gid
    w.share_keys[gid] = key
    return gid


cdef void shared_maybe_free(Worker w, int gid):
    """Forgets a group no worker has a member of any more."""
    cdef ShareGroup* g = &w.groups[gid]
    cdef int p
    cdef bytes key
    cdef int off
    if g.gen == 0 or g.nlocal:
        return
    for p in range(w.npeers):
        if g.total[p]:
            return
    key = w.share_keys[gid]
    off = share_split(<const uint8_t*>PyBytes_AS_STRING(key), len(key))
    topics_unsubscribe(w.share_index, <const uint8_t*>PyBytes_AS_STRING(key) + off, len(key) - off, gid)
    del w.share_ids[key]
    w.share_keys[gid] = None
    free(g.local)
    memset(g, 0, sizeof(ShareGroup))
    w.free_groups.append(gid)


cdef void shared_count_to(Worker w, int p, int gid):
    """FR_SHARED_COUNT of our members of a group, to peer p."""
    cdef ShareGroup* g = &w.groups[gid]
    cdef bytes key = w.share_keys[gid]
    cdef uint32_t[4] head
    cdef uint8_t* body = channel_frame(w, p, FR_SHARED_COUNT, 0, 0, 16 + len(key))
    if body == NULL:
        return
    head[0] = <uint32_t>gid
    head[1] = g.gen
    head[2] = g.online[w.worker_index]
    head[3] = g.total[w.worker_index]
    memcpy(body, head, 16)
    memcpy(body + 16, PyBytes_AS_STRING(key), len(key))


cdef bint shared_refresh(Worker w, int gid) except -1:
    """Counts our members of a group again; when that changed, tells every
    peer (True: something was sent, which a SUBACK waits to be confirmed).
    Forgets the group when nobody has a member left."""
    cdef ShareGroup* g = &w.groups[gid]
    cdef uint32_t i, online = 0
    cdef int p, me = w.worker_index
    cdef bint sent = False
    for i in range(g.nlocal):
        if w.sessions[g.local[i].slot].fd >= 0:
            online += 1
    if online != g.online[me] or g.nlocal != g.total[me]:
        g.online[me] = online
        g.total[me] = g.nlocal
        for p in range(w.npeers):
            if p != me and w.peers[p].fd >= 0:
                shared_count_to(w, p, gid)
                sent = True
    shared_maybe_free(w, gid)
    return sent


cdef int shared_join(Worker w, int slot, const uint8_t* f, uint32_t n, uint32_t off, uint8_t qos,
                     uint8_t opts) except -3:
    """Session slot subscribes to the shared filter f (its group's filter at
    off), or changes its QoS and options (SUBOPT_RAP). 1: the peers were told (wait for them before the
    SUBACK), 0: done, TOPICS_ERR_NOMEM."""
    cdef int r, gid
    cdef uint32_t i, cap
    cdef ShareGroup* g
    cdef ShareMember* grown
    r = topics_subscribe(w.index, f, n, slot, qos)
    if r < 0:
        return r
    gid = shared_group(w, PyBytes_FromStringAndSize(<char*>f, n), off, True)
    if gid < 0:
        topics_unsubscribe(w.index, f, n, slot)
        return TOPICS_ERR_NOMEM
    g = &w.groups[gid]
    for i in range(g.nlocal):
        if g.local[i].slot == slot:
            g.local[i].qos = qos
            g.local[i].opts = opts
            return 0
    if g.nlocal == g.cap:
        cap = g.cap * 2 if g.cap else 4
        grown = <ShareMember*>realloc(g.local, cap * sizeof(ShareMember))
        if grown == NULL:
            topics_unsubscribe(w.index, f, n, slot)
            shared_maybe_free(w, gid)
            return TOPICS_ERR_NOMEM
        g.local = grown
        g.cap = cap
    g.local[g.nlocal].slot = slot
    g.local[g.nlocal].qos = qos
    g.local[g.nlocal].opts = opts
    g.nlocal += 1
    w.sessions[slot].nshared += 1
    w.counters[SHARED_MEMBERS] += 1
    return 1 if shared_refresh(w, gid) else 0


cdef bint _member_remove(Worker w, int gid, int slot):
    cdef ShareGroup* g = &w.groups[gid]
    cdef uint32_t i
    for i in range(g.nlocal):
        if g.local[i].slot == slot:
            g.nlocal -= 1
            g.local[i] = g.local[g.nlocal]
            if w.sessions[slot].nshared:
                w.sessions[slot].nshared -= 1
            w.counters[SHARED_MEMBERS] -= 1
            return True
    return False


cdef bint shared_leave(Worker w, int slot, const uint8_t* f, uint32_t n) except -1:
    """UNSUBSCRIBE of a shared filter: the session leaves the group (its
    messages in flight stay its own: it is still connected). True when it was
    a member."""
    cdef int gid
    topics_unsubscribe(w.index, f, n, slot)
    gid = shared_group(w, PyBytes_FromStringAndSize(<char*>f, n), 0, False)
    if gid < 0 or not _member_remove(w, gid, slot):
        return False
    shared_refresh(w, gid)
    return True


cdef void _collect_share(void* ctx, const uint8_t* topic_filter, uint32_t n, uint8_t qos) noexcept nogil:
    if is_share(topic_filter, n):
        with gil:
            (<list>ctx).append(PyBytes_FromStringAndSize(<char*>topic_filter, n))


cdef list shared_filters(Worker w, int slot):
    """The session's shared filters (walks its subscriptions: not per message)."""
    cdef list out = []
    if w.sessions[slot].nshared:
        topics_subscriptions(w.index, slot, _collect_share, <void*>out)
    return out


cdef void shared_session_changed(Worker w, int slot) except *:
    """The session's client came or went: its groups' connected counts."""
    cdef int gid
    for key in shared_filters(w, slot):
        gid = shared_group(w, key, 0, False)
        if gid >= 0:
            shared_refresh(w, gid)


cdef void shared_session_end(Worker w, int slot, bint redeliver) except *:
    """The session ends (session_free): it leaves its groups and, with
    redeliver, what it had not acknowledged of them goes to another member."""
    cdef Session* s = &w.sessions[slot]
    cdef int gid
    cdef uint32_t i
    cdef Msg* m
    cdef list keys
    if w.groups == NULL:        # the worker is being torn down
        s.nshared = 0
        return
    keys = shared_filters(w, slot)
    for key in keys:
        gid = shared_group(w, key, 0, False)
        if gid >= 0 and _member_remove(w, gid, slot):
            shared_refresh(w, gid)
    s.nshared = 0
    if not redeliver:
        return
    for i in range(s.ninflight):
        m = s.inflight[i].msg
        if m.share_gen and s.inflight[i].state == IF_PUBLISHED:
            _redeliver(w, m)
    for i in range(s.qlen):
        m = s.queue[(s.qhead + i) % s.qcap].msg
        if m.share_gen:
            _redeliver(w, m)


cdef void _redeliver(Worker w, Msg* m) except *:
    if m.share_slot >= w.ngroups or w.groups[m.share_slot].gen != m.share_gen:
        w.counters[SHARED_DROPPED] += 1        # the group is gone: no member anywhere
        return
    w.counters[SHARED_REDELIVERED] += 1
    shared_dispatch(w, m.share_slot, m.data, m.topic_len, m.data + m.topic_len, m.payload_len, m.qos,
                    m.retain, m.origin_ns, m, 0, True, m.data + m.topic_len + m.payload_len, m.ext_len)


cdef int shared_pick_worker(Worker w, ShareGroup* g, int exclude) noexcept:
    """A worker (not exclude) for the group's next message, weighted by its
    connected members, else by its members at all; -1: none."""
    cdef uint64_t sum = 0
    cdef uint32_t k
    cdef uint32_t* counts = g.online
    cdef int p, me = w.worker_index
    for p in range(w.npeers):
        if p != exclude and (p == me or w.peers[p].fd >= 0):
            sum += counts[p]
    if sum == 0:
        counts = g.total
        for p in range(w.npeers):
            if p != exclude and (p == me or w.peers[p].fd >= 0):
                sum += counts[p]
        if sum == 0:
            return -1
    k = <uint32_t>(g.rr % sum)
    g.rr += 1
    for p in range(w.npeers):
        if p != exclude and (p == me or w.peers[p].fd >= 0):
            if k < counts[p]:
                return p
            k -= counts[p]
    return -1


cdef bint shared_deliver_local(Worker w, int gid, const uint8_t* topic, uint32_t tlen, const uint8_t* payload,
                               uint32_t plen, uint8_t qos, uint8_t retain, uint64_t origin_ns, Msg* msg,
                               bint online_only, const uint8_t* ext, uint32_t ext_len) except -1:
    """Gives the message to our next member of the group (round-robin; with
    online_only, only a connected one). msg: the tagged Msg when there is one
    already (a redelivery). retain: the published RETAIN flag, which a member
    subscribed with Retain As Published gets (MQTT-3.3.1-13; only No Local is
    refused on a shared subscription, MQTT-3.8.3-4), every other member 0.
    ext, ext_len: an MQTT 5.0 message's extras (loop.pxd,
    Msg). False: no such member here."""
    cdef ShareGroup* g = &w.groups[gid]
    cdef uint32_t k, i, n = g.nlocal
    cdef Session* s
    cdef uint8_t q, r
    cdef Msg* m
    for k in range(n):
        i = (g.lrr + k) % n
        s = &w.sessions[g.local[i].slot]
        if online_only and not session_online(w, s):
            continue
        if not online_only and s.fd >= 0 and not session_online(w, s):
            continue        # closing this turn: its session ends right after
        g.lrr = i + 1
        q = qos if qos < g.local[i].qos else g.local[i].qos
        r = retain if g.local[i].opts & SUBOPT_RAP else 0
        w.counters[SHARED_DELIVERED] += 1
        if q == 0:
            deliver_qos0(w, s, topic, tlen, payload, plen, r, ext, ext_len)
            return True
        if msg != NULL:
            deliver_msg(w, s, msg, q, r)
            return True
        m = msg_new_ext(topic, tlen, payload, plen, ext, ext_len, qos, retain)   # kept for a redelivery
        if m == NULL:
            w.counters[DROPPED_NOMEM] += 1
            return True
        m.origin_ns = origin_ns
        m.share_slot = <uint32_t>gid
        m.share_gen = g.gen
        deliver_msg(w, s, m, q, r)
        msg_release(m)
        return True
    return False


cdef void shared_forward(Worker w, int gid, int p, const uint8_t* topic, uint32_t tlen, const uint8_t* payload,
                         uint32_t plen, uint8_t qos, uint8_t retain, uint64_t origin_ns, uint32_t hops,
                         const uint8_t* ext, uint32_t ext_len):
    cdef ShareGroup* g = &w.groups[gid]
    cdef uint8_t flags = qos | ((retain & 1) << 2)
    cdef uint32_t tail = 0
    if ext_len:
        flags |= PUB_EXT        # the extras, then their length, last (as FR_PUBLISH)
        tail = ext_len + 4
    cdef uint8_t* body = channel_frame(w, p, FR_SHARED_PUBLISH, flags, tlen, 17 + tlen + plen + tail)
    if body == NULL:
        return
    if ext_len:
        memcpy(body + 17 + tlen + plen, ext, ext_len)
        memcpy(body + 17 + tlen + plen + ext_len, &ext_len, 4)
    memcpy(body, &g.peer_slot[p], 4)
    memcpy(body + 4, &g.peer_gen[p], 4)
    body[8] = <uint8_t>hops
    memcpy(body + 9, &origin_ns, 8)
    memcpy(body + 17, topic, tlen)
    if plen:
        memcpy(body + 17 + tlen, payload, plen)
    w.counters[SHARED_FORWARDED] += 1


cdef void shared_dispatch(Worker w, int gid, const uint8_t* topic, uint32_t tlen, const uint8_t* payload,
                          uint32_t plen, uint8_t qos, uint8_t retain, uint64_t origin_ns, Msg* msg,
                          uint32_t hops, bint pick_worker, const uint8_t* ext, uint32_t ext_len) except *:
    """One member of the group gets the message: with pick_worker, the worker
    is picked first (the publisher's worker, a redelivery); else this worker
    was picked by another. A connected member here, else another worker's
    (hops bound the passing on), else an away member's session here, else
    another worker's; else dropped, counted."""
    cdef ShareGroup* g = &w.groups[gid]
    cdef int p, me = w.worker_index
    if pick_worker:
        p = shared_pick_worker(w, g, -1)
        if p >= 0 and p != me:
            shared_forward(w, gid, p, topic, tlen, payload, plen, qos, retain, origin_ns, hops, ext, ext_len)
            return
    if shared_deliver_local(w, gid, topic, tlen, payload, plen, qos, retain, origin_ns, msg, True,
                                                ext, ext_len):
        return
    if hops and shared_deliver_local(w, gid, topic, tlen, payload, plen, qos, retain, origin_ns, msg, False,
                                                ext, ext_len):
        return      # passed on once already: an away member here rather than back to counts that are behind
    if hops < <uint32_t>w.npeers:
        p = shared_pick_worker(w, g, me)
        if p >= 0 and g.online[p]:
            shared_forward(w, gid, p, topic, tlen, payload, plen, qos, retain, origin_ns, hops + 1, ext, ext_len)
            return
    if shared_deliver_local(w, gid, topic, tlen, payload, plen, qos, retain, origin_ns, msg, False,
                                                ext, ext_len):
        return
    if hops < <uint32_t>w.npeers:
        p = shared_pick_worker(w, g, me)
        if p >= 0:
            shared_forward(w, gid, p, topic, tlen, payload, plen, qos, retain, origin_ns, hops + 1, ext, ext_len)
            return
    w.counters[SHARED_DROPPED] += 1


cdef void route_shared(Worker w, const uint8_t* topic, uint32_t tlen, const uint8_t* payload, uint32_t plen,
                       uint8_t qos, uint8_t retain, uint64_t origin_ns, const uint8_t* ext,
                       uint32_t ext_len) except *:
    """A message published on this worker: one member of each matching group."""
    cdef int n, i
    n = topics_match(w.share_index, topic, tlen, &w.share_match)
    if n < 0:
        w.counters[DROPPED_NOMEM] += 1
        return
    for i in range(n):
        shared_dispatch(w, w.share_match.entries[i].subscriber, topic, tlen, payload, plen, qos, retain,
                        origin_ns, NULL, 0, True, ext, ext_len)


cdef void shared_frame(Worker w, int p, uint8_t ftype, uint8_t flags, const uint8_t* body, uint32_t n,
                       uint32_t topic_len) except *:
    """FR_SHARED_COUNT and FR_SHARED_PUBLISH from peer p (lengths checked here)."""
    cdef uint32_t[4] head
    cdef int gid, off
    cdef uint64_t origin_ns
    cdef bytes key
    cdef ShareGroup* g
    if ftype == FR_SHARED_COUNT:
        if n < 16 + 7:
            channel_malformed(w, p, "a shared group count too short")
            return
        memcpy(head, body, 16)
        off = share_split(body + 16, n - 16)
        if off < 0 or not is_share(body + 16, n - 16) or head[2] > head[3]:
            channel_malformed(w, p, "a shared group count with a malformed group")
            return
        key = PyBytes_FromStringAndSize(<char*>body + 16, n - 16)
        gid = shared_group(w, key, <uint32_t>off, head[3] > 0)
        if gid < 0:
            return
        g = &w.groups[gid]
        g.peer_slot[p] = head[0]
        g.peer_gen[p] = head[1]
        g.online[p] = head[2]
        g.total[p] = head[3]
        shared_maybe_free(w, gid)
        return
    # FR_SHARED_PUBLISH
    cdef uint32_t ext_len = 0
    if (n < 17 or <uint64_t>topic_len + 17 > n or (flags & 3) == 3
            or frame_ext(body, n, 17 + topic_len, flags, &ext_len) < 0):
        channel_malformed(w, p, "a shared PUBLISH frame too short for its topic or properties, or with QoS 3")
        return
    cdef uint32_t plen = n - 17 - topic_len - (ext_len + 4 if ext_len else 0)
    memcpy(head, body, 8)
    memcpy(&origin_ns, body + 9, 8)
    if head[0] >= w.ngroups or w.groups[head[0]].gen != head[1]:
        # The group left this worker meanwhile: another worker gets it.
        gid = -1
        w.counters[SHARED_DROPPED] += 1
        return
    w.counters[CHANNEL_MSGS_IN] += 1
    shared_dispatch(w, <int>head[0], body + 17, topic_len, body + 17 + topic_len, plen, flags & 3,
                    (flags >> 2) & 1, origin_ns, NULL, body[8], False, body + 17 + topic_len + plen, ext_len)


cdef void shared_peer_restarted(Worker w, int p) except *:
    """Peer p (re)started: its members died with it; it learns ours."""
    cdef uint32_t gid
    for gid in range(w.ngroups):
        if w.groups[gid].gen:
            w.groups[gid].online[p] = 0
            w.groups[gid].total[p] = 0
            w.groups[gid].peer_gen[p] = 0
            shared_maybe_free(w, gid)
    shared_hello(w, p)


cdef void shared_hello(Worker w, int p):
    """Our members of every group, to peer p (after a HELLO either way)."""
    cdef uint32_t gid
    for gid in range(w.ngroups):
        if w.groups[gid].gen and w.groups[gid].nlocal:
            shared_count_to(w, p, gid)


cdef void shared_free_all(Worker w):
    cdef uint32_t gid
    if w.groups != NULL:
        for gid in range(w.ngroups):
            free(w.groups[gid].local)
        free(w.groups)
        w.groups = NULL
    if w.share_index != NULL:
        topics_free(w.share_index)
        w.share_index = NULL
    topics_result_free(&w.share_match)
