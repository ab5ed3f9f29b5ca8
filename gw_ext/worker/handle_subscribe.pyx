# Included by loop.pyx. SUBSCRIBE: the bounds on filters, the worker's
# TopicTrie, interest announced to the other workers, the SUBACK, retained
# messages for new subscriptions (retained.pyx).
#
# A SUBACK means the subscription is in force everywhere: when a SUBSCRIBE
# gives a filter its first subscriber on this worker, the other workers must
# learn the interest before the client learns of its SUBACK, or a message
# published on another worker right after (by a client told "subscribed" by
# this one) would not be forwarded here. So the FR_SUB_ADD frames are followed
# by FR_SUB_SYNC, which each peer answers (FR_SUB_SYNCED) after applying what
# came before it, and the SUBACK, and the retained messages after it, wait for
# every answer (or a restarted peer's HELLO, or SUB_SYNC_TIMEOUT_MS). A
# SUBSCRIBE adding no new interest is answered at once, unless one of the same
# connection is still waiting (SUBACKs keep their order).

cdef enum:
    SUB_SYNC_TIMEOUT_MS = 1000


@cython.final
cdef class PendingSuback:
    """A SUBACK held until every peer confirmed (fields: loop.pxd)."""

cdef inline uint32_t subscriber_count(Worker w, int slot) noexcept:
    """Subscriptions a session holds in this worker's index."""
    return w.index.slots[slot].n if <uint32_t>slot < w.index.nslots else 0


cdef bint filter_within_bounds(Worker w, const uint8_t* f, uint32_t n):
    """max_topic_length and max_topic_levels: what one filter may cost in every
    worker's index (a level is a trie node). Counted and logged when not."""
    cdef uint32_t i, levels = 1
    if n > w.max_topic_length:
        w.counters[LIMITS + LIM_TOPIC_LENGTH] += 1
        w.log_limited(CR_QUEUE, "a topic filter is longer than max_topic_length (%d): refused"
                      % w.max_topic_length)
        return False
    for i in range(n):
        if f[i] == 47:
            levels += 1
    if levels > w.max_topic_levels:
        w.counters[LIMITS + LIM_TOPIC_LEVELS] += 1
        w.log_limited(CR_QUEUE, "a topic filter has more than max_topic_levels (%d): refused"
                      % w.max_topic_levels)
        return False
    return True


cdef int handle_subscribe(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    cdef EntryIter it
    cdef Slice filt
    cdef uint8_t qos
    cdef int r, reason = 0
    cdef uint32_t count = 0, i
    cdef uint8_t[128] stack_codes
    cdef uint8_t* codes = stack_codes
    cdef uint8_t* noret             # per entry: no retained messages (Retain Handling, subopts.pyx)
    cdef uint8_t* out
    cdef int slot = c.session
    cdef int off
    cdef bint new_interest = False
    cdef const uint8_t* options5 = NULL     # MQTT 5.0: each entry's options byte (handle_subscribe5)
    cdef uint8_t opts = 0, rh = 0
    cdef uint32_t subid = 0, before
    if subscribe_begin(body, n, &it, &reason) < 0:
        w.malformed(c, reason)
        return -1
    # Validate every entry first, so a malformed packet changes nothing: an
    # empty or invalid filter (a/#/b, a+) closes the connection (the decoder,
    # MQTT-4.7.3-1, MQTT-4.7.1-2/3, MQTT-4.8.0-1).
    while True:
        r = subscribe_next(&it, &filt, &qos, &reason)
        if r == 0:
            break
        if r < 0:
            w.malformed(c, reason)
            return -1
        count += 1
    if count > 64:
        codes = <uint8_t*>malloc(<size_t>count * 2)
        if codes == NULL:
            w.close_conn(c, CR_SERVER)
            return -1
    noret = codes + (count if count > 64 else 64)
    if c.version == 5 and w.sub5_options is not None and <uint32_t>len(w.sub5_options) == count:
        options5 = <const uint8_t*>PyBytes_AS_STRING(w.sub5_options)
        subid = w.sub5_subid
    subscribe_begin(body, n, &it, &reason)
    count = 0
    while subscribe_next(&it, &filt, &qos, &reason) == 1:
        noret[count] = 0
        if options5 != NULL:
            opts = subopts_of(options5[count])
            rh = (options5[count] >> 4) & 3
        # SUBACK 0x80 (MQTT-3.9.3) is for a valid filter the server refuses:
        # the ACL lets its client read nothing of it, past a bound, out of memory.
        codes[count] = SUBACK_FAILURE
        if c.version == 5 and is_shared_filter(filt.ptr, filt.len) and not V5_SHARED_AVAILABLE:
            codes[count] = RC_SHARED_NOT_SUPPORTED      # MQTT 5.0: 0x9E (worker/mqtt5.pyx)
            count += 1
            continue
        # A shared subscription $share/{name}/{filter} (shared.pyx): the ACL
        # judges the filter after the share name (as Mosquitto does).
        off = 0
        if is_share(filt.ptr, filt.len):
            off = share_split(filt.ptr, filt.len)
            if off < 0:
                w.counters[SHARED_REFUSED] += 1
                count += 1
                continue
        if not may_subscribe(w, c, &w.sessions[slot], filt.ptr + off, filt.len - off):
            if c.version == 5:
                codes[count] = RC_NOT_AUTHORIZED        # MQTT 5.0 can say why: 0x87
        elif filter_within_bounds(w, filt.ptr, filt.len):
            before = subscriber_count(w, slot)
            if off:
                r = shared_join(w, slot, filt.ptr, filt.len, off, qos, opts)
                if r >= 0 and (opts or subid):
                    topics_subscribe_ext(w.index, filt.ptr, filt.len, slot, qos, opts, subid)
            else:
                r = topics_subscribe_ext(w.index, filt.ptr, filt.len, slot, qos, opts, subid)
            if r >= 0 and subscriber_count(w, slot) > w.max_subscriptions:
                # A new filter past max_subscriptions (a replaced one never is): undone.
                if off:
                    shared_leave(w, slot, filt.ptr, filt.len)
                else:
                    topics_unsubscribe(w.index, filt.ptr, filt.len, slot)
                w.counters[LIMITS + LIM_SUBSCRIPTIONS] += 1
                w.log_limited(CR_QUEUE, "a client holds max_subscriptions (%d): subscription refused"
                              % w.max_subscriptions)
            elif r >= 0:
                codes[count] = qos
                if subid:
                    w.sessions[slot].subids = 1
                    w.counters[MQTT5_SUBSCRIPTION_IDS] += 1
                if rh == 2 or (rh == 1 and subscriber_count(w, slot) == before):
                    # Retain Handling 2: never; 1: only for a new subscription (MQTT-3.3.1-10/-11).
                    noret[count] = 1
                    w.counters[MQTT5_RETAIN_HANDLING_SKIPPED] += 1
                if r == 1:
                    if not off:
                        channel_broadcast(w, FR_SUB_ADD, 0, filt.ptr, filt.len, NULL, 0)
                    new_interest = True
            elif r == TOPICS_ERR_NOMEM:
                w.counters[DROPPED_NOMEM] += 1
                w.log_limited(CR_QUEUE, "out of memory for a subscription: refused (SUBACK 0x80)")
        count += 1
    session_changed(w, &w.sessions[slot])
    if (new_interest or w.pending_subacks) and subsync_start(w, c, body, n, codes, count, it.packet_id,
                                                             new_interest, noret):
        if codes != stack_codes:
            free(codes)
        return 0
    if c.version == 5:
        out = w.reserve(c, codes5_size(count, 0))
        if out != NULL:
            encode_codes5(out, SUBACK, it.packet_id, NULL, 0, codes, count)
    else:
        out = w.reserve(c, suback_size(count))
        if out != NULL:
            encode_suback(out, it.packet_id, codes, count)
    if out != NULL:
        w.counters[PKT_OUT + SUBACK] += 1
        # Retained messages follow the SUBACK (MQTT-3.3.1-6); none for a shared
        # subscription (MQTT 5.0 4.8.2: "not sent ... when it is established").
        if len(w.retained):
            subscribe_begin(body, n, &it, &reason)
            i = 0
            while subscribe_next(&it, &filt, &qos, &reason) == 1:
                if codes[i] < 0x80 and not noret[i] and not is_share(filt.ptr, filt.len):
                    retain_deliver(w, &w.sessions[slot], filt.ptr, filt.len, codes[i])
                i += 1
    if codes != stack_codes:
        free(codes)
    return 0 if c.state == ST_CONNECTED else -1


cdef bint subsync_start(Worker w, Conn* c, const uint8_t* body, uint32_t n, uint8_t* codes, uint32_t count,
                        uint16_t packet_id, bint new_interest, const uint8_t* noret):
    """Holds this SUBACK until every peer confirmed what was sent before it
    (new interest), or until the same connection's earlier SUBACK went out.
    False when there is nothing to wait for: answer now."""
    cdef PendingSuback pending, other
    cdef EntryIter it
    cdef Slice filt
    cdef uint8_t qos
    cdef int p, reason = 0
    cdef uint32_t i = 0
    cdef uint64_t waiting = 0
    cdef uint8_t* dst
    cdef uint8_t* frame
    cdef bint chained = False
    for other in w.pending_subacks.values():
        if other.fd == c.fd and other.gen == c.gen:
            chained = True
    if new_interest:
        for p in range(w.npeers):
            if p != w.worker_index and w.peers[p].fd >= 0:
                waiting |= (<uint64_t>1) << p
    if not waiting and not chained:
        return False
    w.suback_token += 1
    pending = PendingSuback()
    pending.fd = c.fd
    pending.gen = c.gen
    pending.waiting = waiting
    pending.deadline_ms = w.now_ms + SUB_SYNC_TIMEOUT_MS
    if c.version == 5:
        pending.suback = suback5_bytes(packet_id, codes, count)
    else:
        pending.suback = PyBytes_FromStringAndSize(NULL, suback_size(count))
        encode_suback(<uint8_t*>PyBytes_AS_STRING(pending.suback), packet_id, codes, count)
    pending.retained = []
    if len(w.retained):
        subscribe_begin(body, n, &it, &reason)
        while subscribe_next(&it, &filt, &qos, &reason) == 1:
            if codes[i] < 0x80 and not noret[i] and not is_share(filt.ptr, filt.len):
                pending.retained.append((PyBytes_FromStringAndSize(<char*>filt.ptr, filt.len), codes[i]))
            i += 1
    w.pending_subacks[w.suback_token] = pending
    for p in range(w.npeers):
        if waiting & ((<uint64_t>1) << p):
            frame = channel_frame(w, p, FR_SUB_SYNC, 0, 0, 4)
            if frame != NULL:
                memcpy(frame, &w.suback_token, 4)
    return True


cdef void subsync_answer(Worker w, int p, const uint8_t* body, uint32_t n):
    """FR_SUB_SYNC from peer p: everything it sent before is applied."""
    cdef uint8_t* frame
    if n != 4:
        return
    frame = channel_frame(w, p, FR_SUB_SYNCED, 0, 0, 4)
    if frame != NULL:
        memcpy(frame, body, 4)


cdef void subsync_confirmed(Worker w, int p, const uint8_t* body, uint32_t n):
    cdef uint32_t token
    cdef PendingSuback pending
    if n != 4:
        return
    memcpy(&token, body, 4)
    pending = w.pending_subacks.get(token)
    if pending is None:
        return
    pending.waiting &= ~((<uint64_t>1) << p)
    subsync_release(w)


cdef void subsync_peer_restarted(Worker w, int p):
    """A restarted peer learns every filter from our answer to its HELLO."""
    cdef PendingSuback pending
    for pending in w.pending_subacks.values():
        pending.waiting &= ~((<uint64_t>1) << p)
    subsync_release(w)


cdef bint subsync_earlier_waiting(Worker w, PendingSuback pending, uint32_t token):
    cdef PendingSuback other
    for t, other in w.pending_subacks.items():
        if <uint32_t>t < token and other.fd == pending.fd and other.gen == pending.gen:
            return True
    return False


cdef void subsync_release(Worker w):
    """Sends, in token order, every held SUBACK whose peers all answered (or
    that waited SUB_SYNC_TIMEOUT_MS), with the retained messages that follow it."""
    cdef PendingSuback pending
    cdef Conn* c
    cdef uint8_t* out
    cdef Py_ssize_t size
    cdef uint32_t token
    for token in sorted(w.pending_subacks):
        pending = w.pending_subacks[token]
        if pending.waiting and w.now_ms < pending.deadline_ms:
            continue
        if pending.waiting:
            w.log_limited(CR_CHANNEL, "a worker did not confirm a subscription within %d ms; SUBACK sent"
                          % SUB_SYNC_TIMEOUT_MS)
        if subsync_earlier_waiting(w, pending, token):
            continue        # the same connection's earlier SUBACK goes first
        del w.pending_subacks[token]
        c = &w.conns[pending.fd]
        if c.state != ST_CONNECTED or c.gen != pending.gen or c.session < 0:
            continue        # the client left meanwhile
        size = PyBytes_GET_SIZE(pending.suback)
        out = w.reserve(c, <uint32_t>size)
        if out == NULL:
            continue
        memcpy(out, PyBytes_AS_STRING(pending.suback), size)
        w.counters[PKT_OUT + SUBACK] += 1
        for filt, granted in pending.retained:
            retain_deliver(w, &w.sessions[c.session], <const uint8_t*>PyBytes_AS_STRING(filt), len(filt), granted)
            if c.state != ST_CONNECTED:
                break
