# Included by loop.pyx. UNSUBSCRIBE: validated whole first (a malformed packet
# changes nothing), then each filter leaves the worker's TopicTrie; a filter
# losing its last local subscriber is withdrawn from the other workers
# (FR_SUB_DEL). UNSUBACK at once: no peer needs to confirm a withdrawal.

cdef int handle_unsubscribe(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    cdef EntryIter it
    cdef Slice filt
    cdef int r, reason = 0
    if unsubscribe_begin(body, n, &it, &reason) < 0:
        w.malformed(c, reason)
        return -1
    while True:
        r = unsubscribe_next(&it, &filt, &reason)
        if r == 0:
            break
        if r < 0:
            w.malformed(c, reason)
            return -1
    session_changed(w, &w.sessions[c.session])
    unsubscribe_begin(body, n, &it, &reason)
    if c.version == 5:
        return unsubscribe5_answer(w, c, body, n)       # a reason code per filter (worker/mqtt5.pyx)
    while unsubscribe_next(&it, &filt, &reason) == 1:
        if is_share(filt.ptr, filt.len):
            shared_leave(w, c.session, filt.ptr, filt.len)     # shared.pyx: the member leaves its group
        elif topics_unsubscribe(w.index, filt.ptr, filt.len, c.session) == 1:
            channel_broadcast(w, FR_SUB_DEL, 0, filt.ptr, filt.len, NULL, 0)
    return w.send_ack(c, UNSUBACK, it.packet_id)
