# Included by loop.pyx. SUBSCRIBE and UNSUBSCRIBE: the worker's TopicTrie,
# interest announced to the other workers, retained messages for new
# subscriptions.

cdef int handle_subscribe(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    cdef EntryIter it
    cdef Slice filt
    cdef uint8_t qos
    cdef int r, reason = 0
    cdef uint32_t count = 0, i
    cdef uint8_t[64] stack_codes
    cdef uint8_t* codes = stack_codes
    cdef uint8_t* out
    cdef int slot = c.session
    if subscribe_begin(body, n, &it, &reason) < 0:
        w.malformed(c, reason)
        return -1
    # Validate every entry first, so a malformed packet changes nothing.
    while True:
        r = subscribe_next(&it, &filt, &qos, &reason)
        if r == 0:
            break
        if r < 0:
            w.malformed(c, reason)
            return -1
        count += 1
    if count > 64:
        codes = <uint8_t*>malloc(count)
        if codes == NULL:
            w.close_conn(c, CR_SERVER)
            return -1
    subscribe_begin(body, n, &it, &reason)
    count = 0
    while subscribe_next(&it, &filt, &qos, &reason) == 1:
        # An invalid filter (a/#/b, a+) is refused with SUBACK 0x80 and the
        # connection stays (MQTT-3.9.3; Mosquitto 2.0 closes it instead).
        codes[count] = SUBACK_FAILURE
        if valid_topic_filter(filt.ptr, filt.len):
            r = topics_subscribe(w.index, filt.ptr, filt.len, slot, qos)
            if r >= 0:
                codes[count] = qos
                if r == 1:
                    channel_broadcast(w, FR_SUB_ADD, 0, filt.ptr, filt.len, NULL, 0)
        count += 1
    if not w.sessions[slot].clean:
        w.sessions_changed = True
    out = w.reserve(c, suback_size(count))
    if out != NULL:
        encode_suback(out, it.packet_id, codes, count)
        w.counters[PKT_OUT + SUBACK] += 1
        # Retained messages follow the SUBACK (MQTT-3.3.1-6).
        if len(w.retained):
            subscribe_begin(body, n, &it, &reason)
            i = 0
            while subscribe_next(&it, &filt, &qos, &reason) == 1:
                if codes[i] != SUBACK_FAILURE:
                    retain_deliver(w, &w.sessions[slot], filt.ptr, filt.len, codes[i])
                i += 1
    if codes != stack_codes:
        free(codes)
    return 0 if c.state == ST_CONNECTED else -1


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
    if not w.sessions[c.session].clean:
        w.sessions_changed = True
    unsubscribe_begin(body, n, &it, &reason)
    while unsubscribe_next(&it, &filt, &reason) == 1:
        if topics_unsubscribe(w.index, filt.ptr, filt.len, c.session) == 1:
            channel_broadcast(w, FR_SUB_DEL, 0, filt.ptr, filt.len, NULL, 0)
    return w.send_ack(c, UNSUBACK, it.packet_id)
