# Included by loop.pyx. The router: who gets a PUBLISH, and how.
#
# One topics_match per message per worker gives the local subscribers (each
# once, with its highest granted QoS) and the peer workers with interest.
# QoS 0 deliveries are encoded from the publisher's bytes straight into each
# subscriber's outbound buffer; QoS 1/2 ones share one refcounted Msg.
# A message that came from a peer is delivered locally only.
#
# Publish-to-deliver latency (HIST_DELIVER) is observed once per message per
# worker that delivers it, as the loop turn that routes it minus the loop turn
# that read the PUBLISH (carried in FR_PUBLISH frames); a message that waited
# in a session's queue is observed again as it leaves it. Turn timestamps
# cost one clock read per turn, not one per message: a delivery within the
# turn that read it counts as 0.


cdef Msg* msg_new(const uint8_t* topic, uint32_t topic_len, const uint8_t* payload, uint32_t payload_len,
                  uint8_t qos, uint8_t retain) noexcept nogil:
    cdef Msg* m = <Msg*>malloc(sizeof(Msg) + topic_len + payload_len)
    if m == NULL:
        return NULL
    m.refs = 1
    m.topic_len = topic_len
    m.payload_len = payload_len
    m.qos = qos
    m.retain = retain
    m.origin_ns = 0
    m.data = (<uint8_t*>m) + sizeof(Msg)
    memcpy(m.data, topic, topic_len)
    if payload_len:
        memcpy(m.data + topic_len, payload, payload_len)
    return m


cdef inline void msg_release(Msg* m) noexcept nogil:
    if m != NULL:
        m.refs -= 1
        if m.refs == 0:
            free(m)


cdef void route_publish(Worker w, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                        uint32_t payload_len, uint8_t qos, uint8_t retain, bint forward, uint64_t origin_ns):
    """Delivers to every matching local subscriber and, when `forward`, to the
    peers with interest. `retain` only decides whether the retained store
    changes: live deliveries go out with RETAIN=0 (MQTT-3.3.1-9).

    The worker's MatchResult is reused from one message to the next; should a
    delivery ever route another message before this one is done (nothing does
    today: wills wait for reap_closed), that one gets a result of its own
    rather than overwriting the list being walked here."""
    cdef MatchResult nested
    cdef MatchResult* match = &w.match
    cdef uint64_t peers
    if w.route_depth:
        topics_result_init(&nested)
        match = &nested
    w.route_depth += 1
    try:
        peers = route_local(w, match, topic, topic_len, payload, payload_len, qos, retain, forward, origin_ns)
    finally:
        w.route_depth -= 1
        if match == &nested:
            topics_result_free(&nested)
    if forward:
        route_forward(w, peers, topic, topic_len, payload, payload_len, qos, retain, origin_ns)


cdef uint64_t route_local(Worker w, MatchResult* match, const uint8_t* topic, uint32_t topic_len,
                          const uint8_t* payload, uint32_t payload_len, uint8_t qos, uint8_t retain,
                          bint forward, uint64_t origin_ns) except? 0:
    """The local deliveries; returns the peers with interest."""
    cdef int n, i
    cdef uint8_t q
    cdef Msg* msg = NULL
    cdef MatchEntry* e
    if retain:
        # The worker a retained message arrives at applies the store's bounds
        # and tells the others only what it kept, so every worker's copy agrees;
        # the server's own ($SYS) messages are always kept.
        if not forward or retain_store(w, topic, topic_len, payload, payload_len, qos,
                                       not w.publishing_as_server):
            if forward:
                channel_broadcast(w, FR_RETAIN, qos, topic, topic_len, payload, payload_len)
            else:
                retain_store(w, topic, topic_len, payload, payload_len, qos, False)
    n = topics_match(w.index, topic, topic_len, match)
    if n < 0:
        w.counters[DROPPED_NOMEM] += 1
        return 0
    try:
        for i in range(n):
            e = &match.entries[i]
            q = qos if qos < e.qos else e.qos
            if q == 0:
                deliver_qos0(w, &w.sessions[e.subscriber], topic, topic_len, payload, payload_len, 0)
            else:
                if msg == NULL:
                    msg = msg_new(topic, topic_len, payload, payload_len, qos, 0)
                    if msg == NULL:
                        w.counters[DROPPED_NOMEM] += 1
                        continue
                    msg.origin_ns = origin_ns
                deliver_msg(w, &w.sessions[e.subscriber], msg, q, 0)
    finally:
        msg_release(msg)
    if n > 0:
        hist_observe(w.counters, HIST_DELIVER, w.now_ns - origin_ns if w.now_ns > origin_ns else 0)
    return match.peers


cdef void route_forward(Worker w, uint64_t peers, const uint8_t* topic, uint32_t topic_len,
                        const uint8_t* payload, uint32_t payload_len, uint8_t qos, uint8_t retain,
                        uint64_t origin_ns):
    """To the peer workers with a matching filter, as FR_PUBLISH frames."""
    cdef int p
    cdef uint8_t* body
    peers &= ~((<uint64_t>1) << w.worker_index)
    p = 0
    while peers:
        if peers & 1:
            body = channel_frame(w, p, FR_PUBLISH, qos | (retain << 2), topic_len, 8 + topic_len + payload_len)
            if body != NULL:
                memcpy(body, &origin_ns, 8)
                memcpy(body + 8, topic, topic_len)
                memcpy(body + 8 + topic_len, payload, payload_len)
                w.counters[CHANNEL_MSGS_OUT] += 1
        peers >>= 1
        p += 1


cdef void deliver_qos0(Worker w, Session* s, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                       uint32_t payload_len, uint8_t retain):
    cdef Conn* c
    cdef uint8_t* out
    if s.fd < 0:
        return      # QoS 0 is not queued for an absent client (as Mosquitto's default)
    c = &w.conns[s.fd]
    if c.state != ST_CONNECTED:
        return
    if c.outlen - c.outoff > w.soft_outbound:
        # A slow reader: shed QoS 0 rather than grow without bound or slow others.
        w.counters[DROPPED_SLOW_QOS0] += 1
        return
    out = w.reserve(c, publish_size(topic_len, payload_len, 0))
    if out != NULL:
        encode_publish(out, topic, topic_len, payload, payload_len, 0, retain, 0, 0)
        w.counters[PKT_OUT + PUBLISH] += 1
        w.counters[MSGS_OUT] += 1


cdef inline bint session_online(Worker w, Session* s) noexcept:
    """Its client is connected (not away, not closed this turn)."""
    return s.fd >= 0 and w.conns[s.fd].state == ST_CONNECTED


cdef void deliver_msg(Worker w, Session* s, Msg* msg, uint8_t qos, uint8_t retain):
    """QoS 1/2: send now if the session's in-flight window has room, else queue."""
    cdef Queued* slot
    cdef uint64_t size = <uint64_t>msg.topic_len + msg.payload_len
    if s.ninflight < w.max_inflight and s.qlen == 0 and session_online(w, s):
        session_send(w, s, msg, qos, retain)
        return
    # An online subscriber under backpressure (congested, still acknowledging)
    # overshoots queue_high by what publishers on every worker had sent before
    # the pause reached them: a peer's channel holds megabytes in flight. Those
    # messages were acknowledged to their publishers, so no count drops them:
    # max_queued_bytes bounds that queue. An absent or stalled subscriber gets
    # max_queued, then drops (counted): the slow-consumer policy.
    if s.qlen >= w.max_queued and not s.congested:
        w.counters[DROPPED_QUEUE_FULL] += 1
        w.log_limited(CR_QUEUE, "a session's queue is full (max_queued %d): message dropped" % w.max_queued)
        return
    if s.qbytes + size > w.max_queued_bytes:
        w.counters[DROPPED_QUEUE_FULL] += 1
        w.counters[LIMITS + LIM_QUEUED_BYTES] += 1
        w.log_limited(CR_QUEUE, "a session's queue holds max_queued_bytes (%d): message dropped"
                      % w.max_queued_bytes)
        return
    if session_queue_grow(s) < 0:
        w.counters[DROPPED_NOMEM] += 1
        return
    slot = &s.queue[(s.qhead + s.qlen) % s.qcap]
    slot.msg = msg
    slot.qos = qos | (retain << 2)
    msg.refs += 1
    s.qlen += 1
    s.qbytes += size
    session_changed(w, s)
    if s.qlen >= w.queue_high and not s.congested and not s.stalled and session_online(w, s):
        congest(w, s)


# --- retained messages -----------------------------------------------------------
# Every worker keeps the whole retained store (a dict: topic -> (qos, payload)),
# kept in step by FR_RETAIN frames, so a SUBSCRIBE is answered locally.

cdef bint retain_store(Worker w, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                       uint32_t payload_len, uint8_t qos, bint enforce) except? False:
    """Keeps (or clears) a retained message; with `enforce`, within max_retained
    messages and max_retained_bytes (topics and payloads). False if refused."""
    cdef object old
    cdef uint64_t old_size = 0
    key = PyBytes_FromStringAndSize(<char*>topic, topic_len)
    old = w.retained.get(key)
    if old is not None:
        old_size = topic_len + len(<bytes>(<tuple>old)[1])
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
    elif enforce and w.retained_bytes - old_size + topic_len + payload_len > w.max_retained_bytes:
        w.counters[DROPPED_RETAINED_FULL] += 1
        w.counters[LIMITS + LIM_RETAINED_BYTES] += 1
        w.log_limited(CR_QUEUE, "retained store holds max_retained_bytes (%d): not retained"
                      % w.max_retained_bytes)
        return False
    else:
        w.retained[key] = (qos, PyBytes_FromStringAndSize(<char*>payload, payload_len))
        w.retained_bytes += <uint64_t>topic_len + payload_len - old_size
    w.retained_changed = True
    return True


cdef void retain_sync_to(Worker w, int p):
    cdef uint8_t* body
    cdef bytes payload
    cdef bytes topic
    for topic, (qos, payload) in w.retained.items():
        body = channel_frame(w, p, FR_RETAIN, qos, len(topic), len(topic) + len(payload))
        if body != NULL:
            memcpy(body, PyBytes_AS_STRING(topic), len(topic))
            memcpy(body + len(topic), PyBytes_AS_STRING(payload), len(payload))


cdef bint filter_matches(const uint8_t* f, uint32_t flen, const uint8_t* t, uint32_t tlen) noexcept nogil:
    """MQTT 4.7 matching of one filter against one topic name."""
    cdef uint32_t i = 0, j = 0
    if tlen and t[0] == 36 and flen and (f[0] == 35 or f[0] == 43):
        return False        # '$' topics are not matched by leading wildcards (MQTT-4.7.2-1)
    while i < flen:
        if f[i] == 35:      # '#': the rest, including the parent level
            return True
        if f[i] == 43:      # '+': one level
            while j < tlen and t[j] != 47:
                j += 1
            i += 1
        else:
            while i < flen and f[i] != 47:
                if j >= tlen or t[j] != f[i]:
                    return False
                i += 1
                j += 1
            if j < tlen and t[j] != 47:
                return False
        if i == flen:
            return j == tlen
        # f[i] is '/'
        i += 1
        if j == tlen:
            # The topic ended: only a trailing "#" (sport/# matches sport) still matches.
            return i + 1 == flen and f[i] == 35
        j += 1              # past the topic's '/'
    return j == tlen


cdef void retain_deliver(Worker w, Session* s, const uint8_t* filt, uint32_t flen, uint8_t granted):
    """A new subscription gets the retained messages it matches, RETAIN=1 (MQTT-3.3.1-6)."""
    cdef bytes topic, payload
    cdef Msg* msg
    cdef uint8_t q
    for topic, (qos, payload) in w.retained.items():
        if not filter_matches(filt, flen, <const uint8_t*>PyBytes_AS_STRING(topic), len(topic)):
            continue
        q = qos if qos < granted else granted
        if q == 0:
            deliver_qos0(w, s, <const uint8_t*>PyBytes_AS_STRING(topic), len(topic),
                         <const uint8_t*>PyBytes_AS_STRING(payload), len(payload), 1)
        else:
            msg = msg_new(<const uint8_t*>PyBytes_AS_STRING(topic), len(topic),
                          <const uint8_t*>PyBytes_AS_STRING(payload), len(payload), qos, 1)
            if msg == NULL:
                w.counters[DROPPED_NOMEM] += 1
                continue
            deliver_msg(w, s, msg, q, 1)
            msg_release(msg)
