# Included by loop.pyx. Retained messages: every worker keeps the whole store
# (Worker.retained, a dict: topic -> (qos, payload), or (qos, payload, extras)
# for an MQTT 5.0 message with properties: they are kept with it, loop.pxd's
# Msg says how), kept in step by FR_RETAIN frames, so a SUBSCRIBE is answered
# from the local copy. An expired message (Message Expiry Interval) is not
# delivered, and leaves the store when a subscription finds it so.
#
# - A retained PUBLISH is kept or clears its topic where it arrives, within
#   max_retained and max_retained_bytes, and only what was kept goes to the
#   other workers (retain_publish, retain_store).
# - A new subscription gets the retained messages it matches, RETAIN=1
#   (retain_deliver), after its SUBACK (handle_subscribe.pyx).
# - A (re)started worker gets the whole store from each peer after its HELLO
#   (retain_sync_to, from channel.pyx's peer_restarted).
# - Persistence (gw/persistence.py): Worker.retained_messages is what is
#   saved, retained_changed says it changed since (Worker.retained_saved
#   clears it), and the saved messages come back through Worker.retain
#   (retain_loaded).


cdef void retain_publish(Worker w, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                         uint32_t payload_len, uint8_t qos, bint forward, const uint8_t* ext, uint32_t ext_len):
    """A PUBLISH with RETAIN=1 being routed (forward: read here, not from a peer).
    The worker a retained message arrives at applies the store's bounds and
    tells the others only what it kept, so every worker's copy agrees; the
    server's own ($SYS) messages are always kept."""
    cdef int p
    if not forward or retain_store(w, topic, topic_len, payload, payload_len, qos,
                                   not w.publishing_as_server, ext, ext_len):
        if forward:
            for p in range(w.npeers):
                if p != w.worker_index:
                    retain_frame_to(w, p, topic, topic_len, payload, payload_len, qos, ext, ext_len)
        else:
            retain_store(w, topic, topic_len, payload, payload_len, qos, False, ext, ext_len)


cdef void retain_frame_to(Worker w, int p, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                          uint32_t payload_len, uint8_t qos, const uint8_t* ext, uint32_t ext_len):
    """An FR_RETAIN frame to peer p: topic, payload, and an MQTT 5.0
    message's extras with their length."""
    cdef uint8_t* body
    cdef uint32_t tail = ext_len + 4 if ext_len else 0
    body = channel_frame(w, p, FR_RETAIN, qos | (PUB_EXT if ext_len else 0), topic_len,
                         topic_len + payload_len + tail)
    if body != NULL:
        memcpy(body, topic, topic_len)
        if payload_len:
            memcpy(body + topic_len, payload, payload_len)
        if ext_len:
            memcpy(body + topic_len + payload_len, ext, ext_len)
            memcpy(body + topic_len + payload_len + ext_len, &ext_len, 4)


cdef bint retain_loaded(Worker w, bytes topic, int qos, bytes payload, bytes ext) except? False:
    """A retained message loaded from the data dir (not routed), within the
    store's bounds; False when refused (a bad topic or QoS, extras shorter
    than their expiry, or over a bound)."""
    if not 0 <= qos <= 2 or not valid_topic_name(<const uint8_t*>PyBytes_AS_STRING(topic), len(topic)):
        return False
    if ext is None:
        ext = b""
    if 0 < len(ext) < EXT_HEADER:
        return False
    if ext_expire_ms(<const uint8_t*>PyBytes_AS_STRING(ext), len(ext)) and realtime_ms() >= ext_expire_ms(
            <const uint8_t*>PyBytes_AS_STRING(ext), len(ext)):
        return True         # expired while the server was down: gone, as it would have gone
    return retain_store(w, <const uint8_t*>PyBytes_AS_STRING(topic), len(topic),
                        <const uint8_t*>PyBytes_AS_STRING(payload), len(payload), qos, True,
                        <const uint8_t*>PyBytes_AS_STRING(ext), len(ext))


cdef bint retain_store(Worker w, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                       uint32_t payload_len, uint8_t qos, bint enforce, const uint8_t* ext,
                       uint32_t ext_len) except? False:
    """Keeps (or clears) a retained message; with `enforce`, within max_retained
    messages and max_retained_bytes (topics, payloads and properties). False
    if refused."""
    cdef object old
    cdef uint64_t old_size = 0
    key = PyBytes_FromStringAndSize(<char*>topic, topic_len)
    old = w.retained.get(key)
    if old is not None:
        old_size = topic_len + len(<bytes>(<tuple>old)[1])
        if len(<tuple>old) > 2:
            old_size += len(<bytes>(<tuple>old)[2])
    if payload_len == 0:
        # A zero-length retained PUBLISH clears the topic (MQTT-3.3.1-10/11).
        if old is None:
            return True
        del w.retained[key]
        w.retained_bytes -= old_size
    elif enforce and old is None and len(w.retained) >= w.max_retained:
        w.counters[DROPPED_RETAINED_FULL] += 1
        w.log_limited(CR_QUEUE, "retained store full (max_retained %d): not retained" % w.max_retained)
        return False
    elif enforce and w.retained_bytes - old_size + topic_len + payload_len + ext_len > w.max_retained_bytes:
        w.counters[DROPPED_RETAINED_FULL] += 1
        w.counters[LIMITS + LIM_RETAINED_BYTES] += 1
        w.log_limited(CR_QUEUE, "retained store holds max_retained_bytes (%d): not retained"
                      % w.max_retained_bytes)
        return False
    elif ext_len:
        w.retained[key] = (qos, PyBytes_FromStringAndSize(<char*>payload, payload_len),
                           PyBytes_FromStringAndSize(<char*>ext, ext_len))
        w.retained_bytes += <uint64_t>topic_len + payload_len + ext_len - old_size
    else:
        w.retained[key] = (qos, PyBytes_FromStringAndSize(<char*>payload, payload_len))
        w.retained_bytes += <uint64_t>topic_len + payload_len - old_size
    w.retained_changed = True
    return True


cdef void retain_sync_to(Worker w, int p):
    cdef bytes payload, ext
    cdef bytes topic
    cdef tuple entry
    for topic, entry in w.retained.items():
        payload = <bytes>entry[1]
        ext = <bytes>entry[2] if len(entry) > 2 else b""
        retain_frame_to(w, p, <const uint8_t*>PyBytes_AS_STRING(topic), len(topic),
                        <const uint8_t*>PyBytes_AS_STRING(payload), len(payload), <uint8_t>entry[0],
                        <const uint8_t*>PyBytes_AS_STRING(ext), len(ext))


cdef void retain_deliver(Worker w, Session* s, const uint8_t* filt, uint32_t flen, uint8_t granted):
    """A new subscription gets the retained messages it matches, RETAIN=1
    (MQTT-3.3.1-6), but those expired, which leave the store."""
    cdef bytes topic, payload, ext
    cdef tuple entry
    cdef Msg* msg
    cdef uint8_t q, qos
    cdef list expired = None
    for topic, entry in w.retained.items():
        if not topics_filter_matches(filt, flen, <const uint8_t*>PyBytes_AS_STRING(topic), len(topic)):
            continue
        qos = <uint8_t>entry[0]
        payload = <bytes>entry[1]
        ext = <bytes>entry[2] if len(entry) > 2 else b""
        if ext_expired(w, <const uint8_t*>PyBytes_AS_STRING(ext), len(ext)):
            if expired is None:
                expired = []
            expired.append(topic)
            continue
        q = qos if qos < granted else granted
        if q == 0:
            deliver_qos0(w, s, <const uint8_t*>PyBytes_AS_STRING(topic), len(topic),
                         <const uint8_t*>PyBytes_AS_STRING(payload), len(payload), 1,
                         <const uint8_t*>PyBytes_AS_STRING(ext), len(ext))
        else:
            msg = msg_new_ext(<const uint8_t*>PyBytes_AS_STRING(topic), len(topic),
                              <const uint8_t*>PyBytes_AS_STRING(payload), len(payload),
                              <const uint8_t*>PyBytes_AS_STRING(ext), len(ext), qos, 1)
            if msg == NULL:
                w.counters[DROPPED_NOMEM] += 1
                continue
            deliver_msg(w, s, msg, q, 1)
            msg_release(msg)
    if expired is not None:
        # Every worker drops it when it finds it expired: the stores stay alike
        # without a frame (an expired message is as good as gone everywhere).
        for topic in expired:
            entry = w.retained.pop(topic)
            w.retained_bytes -= len(topic) + len(<bytes>entry[1]) + len(<bytes>entry[2])
            w.retained_changed = True
