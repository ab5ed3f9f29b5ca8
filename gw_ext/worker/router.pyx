# Included by loop.pyx. The router: who gets a PUBLISH, and how.
#
# One topics_match per message per worker gives the local subscribers (each
# once, with its highest granted QoS) and the peer workers with interest.
# QoS 0 deliveries are encoded from the publisher's bytes straight into each
# subscriber's outbound buffer; QoS 1/2 ones share one refcounted Msg.
# A message that came from a peer is delivered locally only.
# A retained PUBLISH also changes the retained store (retained.pyx).
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
    m.share_slot = 0
    m.share_gen = 0
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
        if w.share_index.subscriptions:
            route_shared(w, topic, topic_len, payload, payload_len, qos, origin_ns)     # shared.pyx


cdef uint64_t route_local(Worker w, MatchResult* match, const uint8_t* topic, uint32_t topic_len,
                          const uint8_t* payload, uint32_t payload_len, uint8_t qos, uint8_t retain,
                          bint forward, uint64_t origin_ns) except? 0:
    """The local deliveries; returns the peers with interest."""
    cdef int n, i
    cdef uint8_t q
    cdef Msg* msg = NULL
    cdef MatchEntry* e
    if retain:
        retain_publish(w, topic, topic_len, payload, payload_len, qos, forward)     # retained.pyx
    if is_share(topic, topic_len):
        return 0        # only a shared subscription's whole filter could match it: it is not a subscriber's
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
    if not may_deliver(w, s, topic, topic_len):
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


cdef void deliver_msg(Worker w, Session* s, Msg* msg, uint8_t qos, uint8_t retain):
    """QoS 1/2: send now if the session's in-flight window has room, else queue."""
    cdef uint64_t size = <uint64_t>msg.topic_len + msg.payload_len
    if not may_deliver(w, s, msg.data, msg.topic_len):
        return      # checked again as it leaves the queue (session_pump): a reload may revoke it meanwhile
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
    if session_enqueue(s, msg, qos | (retain << 2), size) < 0:
        w.counters[DROPPED_NOMEM] += 1
        return
    msg.refs += 1
    session_changed(w, s)
    if s.qlen >= w.queue_high and not s.congested and not s.stalled and session_online(w, s):
        congest(w, s)
