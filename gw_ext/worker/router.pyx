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
#
# MQTT 5.0 messages carry their properties as the Msg's extras (loop.pxd): the
# time their Message Expiry Interval ends and the property block the
# publisher sent, less the properties of one hop. They go with the message
# into FR_PUBLISH frames, the retained store, sessions' queues and the data
# dir. Each delivery checks the expiry (an expired message is not delivered,
# counted: MQTT5_EXPIRED) and writes, to an MQTT 5.0 subscriber, the remaining
# interval (MQTT-3.3.2-6) then the rest of the block as it came (User
# Properties in order, MQTT-3.3.2-18); a 3.1.1 subscriber gets the message
# without them. The clock is read only for a message that expires.


cdef inline uint64_t realtime_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>(ts.tv_nsec // 1000000)


cdef inline uint64_t ext_expire_ms(const uint8_t* ext, uint32_t ext_len) noexcept nogil:
    """When the message's Message Expiry Interval ends (wall-clock ms; 0: never)."""
    cdef uint64_t at = 0
    if ext_len >= EXT_HEADER:
        memcpy(&at, ext, 8)
    return at


cdef inline bint ext_expired(Worker w, const uint8_t* ext, uint32_t ext_len) noexcept:
    """The message's expiry has passed: not delivered, counted."""
    cdef uint64_t at
    if ext_len == 0:
        return False
    at = ext_expire_ms(ext, ext_len)
    if at == 0 or realtime_ms() < at:
        return False
    w.counters[MQTT5_EXPIRED] += 1
    return True


cdef int ext_props_size(const uint8_t* ext, uint32_t ext_len, uint64_t now_ms, uint32_t* expiry) noexcept nogil:
    """The property block's size for a v5 subscriber (without its length):
    the remaining Message Expiry Interval (*expiry, seconds rounded up; 0 once
    passed: a message already in flight is sent again all the same), when the
    message has one, then the rest of the extras. Callers that may still drop
    an expired message ask ext_expired first."""
    cdef uint64_t at = ext_expire_ms(ext, ext_len)
    cdef uint32_t n = ext_len - EXT_HEADER if ext_len >= EXT_HEADER else 0
    expiry[0] = 0
    if at:
        if now_ms == 0:
            now_ms = realtime_ms()
        if now_ms < at:
            expiry[0] = <uint32_t>((at - now_ms + 999) // 1000)
        n += 5
    return <int>n


cdef bytes ext_from_props(const uint8_t* props, uint32_t props_len, uint32_t message_expiry, bint has_expiry,
                          uint64_t now_ms):
    """A PUBLISH's extras from its validated property block: the expiry, then
    every property but those of one hop (Message Expiry Interval, Topic Alias,
    Subscription Identifier; a will's Will Delay Interval), in order. Walked
    with the codec's rules: the block was validated by decode_publish5 (a
    will's by decode_connect5). now_ms: the time the expiry counts from
    (0: now; a will's is counted from 1 until it is published, session_detach)."""
    cdef bytearray out = bytearray(EXT_HEADER + props_len)
    cdef uint8_t* o = <uint8_t*>(<char*>out)
    cdef uint64_t at = 0
    cdef uint32_t i = 0, n = EXT_HEADER, start, ln, shift
    cdef uint8_t ident
    if has_expiry:
        at = (now_ms or realtime_ms()) + <uint64_t>message_expiry * 1000
        if at == 0:
            at = 1
    memcpy(o, &at, 8)
    while i < props_len:
        start = i
        ident = props[i]
        i += 1
        if ident == P_PAYLOAD_FORMAT:
            i += 1
        elif ident == P_MESSAGE_EXPIRY:
            i += 4
            continue
        elif ident == P_TOPIC_ALIAS:
            i += 2
            continue
        elif ident == P_WILL_DELAY:
            i += 4          # a will's: not a message property
            continue
        elif ident == P_SUBSCRIPTION_ID:
            while i < props_len and props[i] & 0x80:
                i += 1
            i += 1
            continue
        elif ident == P_CONTENT_TYPE or ident == P_RESPONSE_TOPIC or ident == P_CORRELATION_DATA:
            if i + 2 > props_len:
                break
            i += 2 + ((<uint32_t>props[i] << 8) | props[i + 1])
        elif ident == P_USER_PROPERTY:
            if i + 2 > props_len:
                break
            i += 2 + ((<uint32_t>props[i] << 8) | props[i + 1])
            if i + 2 > props_len:
                break
            i += 2 + ((<uint32_t>props[i] << 8) | props[i + 1])
        else:
            break           # not a PUBLISH property: the block was not validated; keep what came before
        if i > props_len:
            break
        ln = i - start
        memcpy(o + n, props + start, ln)
        n += ln
    if at == 0 and n == EXT_HEADER:
        return b""          # nothing to carry: handled as a 3.1.1 message
    return bytes(out[:n])


cdef void too_large_for(Worker w, Conn* c) noexcept:
    """A PUBLISH larger than the client's Maximum Packet Size: not sent,
    as if it had been (MQTT-3.1.2-25), counted; its alias choice dropped."""
    c.alias_pick = 0
    subids_clear()                  # worker/subopts.pyx
    w.counters[MQTT5_TOO_LARGE_DROPPED] += 1


cdef inline bint conn_v5(Conn* c) noexcept nogil:
    """The connection speaks MQTT 5.0 (its CONNECT's protocol level)."""
    return c.version == 5


# A message without extras (no properties to carry: every 3.1.1 one, and the
# common MQTT 5.0 one, also from a publisher that sends only a Topic Alias) is
# written here, inline: for a 3.1.1 subscriber the 3.1.1 PUBLISH; for an MQTT
# 5.0 subscriber that gets nothing of its own in a PUBLISH (no Topic Alias
# toward it, no Subscription Identifier in its session: v5_bare) the same
# plus a Property Length of 0, with no property block to size or walk and no
# alias or identifier steps. An MQTT 5.0 subscriber's Maximum Packet Size is
# still checked against that size.

cdef inline bint v5_bare(Worker w, Conn* c) noexcept:
    """An MQTT 5.0 subscriber whose PUBLISH of a message without extras has
    no properties: no Topic Alias toward it (alias_out_pick would choose none)
    and no Subscription Identifier in its session (subids_compute would find
    none)."""
    return c.alias_max_out == 0 and (c.session < 0 or not w.sessions[c.session].subids)


cdef inline uint32_t publish_plain_size(uint32_t topic_len, uint32_t payload_len, uint8_t qos,
                                        bint v5) noexcept nogil:
    """The size of a PUBLISH without properties: 3.1.1's, or MQTT 5.0's (one
    byte more: the Property Length)."""
    cdef uint32_t rem = 2 + topic_len + payload_len + (2 if qos else 0) + (1 if v5 else 0)
    return rem + (2 if rem < 128 else 3 if rem < 16384 else 4 if rem < 2097152 else 5)


cdef inline void encode_publish_plain(uint8_t* out, const uint8_t* topic, uint32_t topic_len,
                                      const uint8_t* payload, uint32_t payload_len, uint8_t qos, uint8_t retain,
                                      uint8_t dup, uint16_t packet_id, bint v5) noexcept nogil:
    """Writes the PUBLISH sized by publish_plain_size (MQTT 5.0: Property Length 0)."""
    cdef uint32_t rem = 2 + topic_len + payload_len + (2 if qos else 0) + (1 if v5 else 0)
    cdef uint32_t i = 1
    out[0] = (PUBLISH << 4) | ((dup & 1) << 3) | ((qos & 3) << 1) | (retain & 1)
    while rem >= 128:
        out[i] = <uint8_t>((rem & 0x7F) | 0x80)
        rem >>= 7
        i += 1
    out[i] = <uint8_t>rem
    out[i + 1] = <uint8_t>(topic_len >> 8)
    out[i + 2] = <uint8_t>(topic_len & 0xFF)
    i += 3
    memcpy(out + i, topic, topic_len)
    i += topic_len
    if qos:
        out[i] = <uint8_t>(packet_id >> 8)
        out[i + 1] = <uint8_t>(packet_id & 0xFF)
        i += 2
    if v5:
        out[i] = 0              # Property Length
        i += 1
    if payload_len:
        memcpy(out + i, payload, payload_len)


cdef uint32_t publish_out_size(Conn* c, uint32_t topic_len, uint32_t payload_len, const uint8_t* ext,
                               uint32_t ext_len, uint8_t qos, uint64_t now_ms) noexcept nogil:
    """The PUBLISH's size for this subscriber (with the Topic Alias chosen by
    alias_out_pick, worker/mqtt5.pyx)."""
    cdef uint32_t expiry
    if not conn_v5(c):
        return publish_size(topic_len, payload_len, qos)
    return publish5_size(alias_topic_len(c, topic_len),                                   # Topic Alias
                         <uint32_t>ext_props_size(ext, ext_len, now_ms, &expiry) + alias_prop_len(c)
                         + subid_props_size(),      # Subscription Identifiers (subopts.pyx)
                         payload_len, qos)


cdef void publish_out_encode(Conn* c, uint8_t* out, const uint8_t* topic, uint32_t topic_len,
                             const uint8_t* payload, uint32_t payload_len, const uint8_t* ext, uint32_t ext_len,
                             uint8_t qos, uint8_t retain, uint8_t dup, uint16_t packet_id,
                             uint64_t now_ms) noexcept nogil:
    """Writes the PUBLISH sized by publish_out_size (same now_ms): 3.1.1, or
    5.0 with the message's properties (and the Topic Alias alias_out_pick
    chose: the topic then empty, or sent with a new alias)."""
    cdef uint32_t expiry, rem, i, np
    cdef int n
    if not conn_v5(c):
        encode_publish(out, topic, topic_len, payload, payload_len, qos, retain, dup, packet_id)
        return
    n = ext_props_size(ext, ext_len, now_ms, &expiry)
    np = <uint32_t>n + alias_prop_len(c) + subid_props_size()   # Topic Alias (mqtt5.pyx), Subscription Identifiers (subopts.pyx)
    topic_len = alias_topic_len(c, topic_len)           # Topic Alias: 0 when the client holds it
    rem = 2 + topic_len + (2 if qos else 0) + varint_size(np) + np + payload_len
    out[0] = (PUBLISH << 4) | ((dup & 1) << 3) | ((qos & 3) << 1) | (retain & 1)
    i = 1 + write_varint(out + 1, rem)
    out[i] = <uint8_t>(topic_len >> 8)
    out[i + 1] = <uint8_t>(topic_len & 0xFF)
    memcpy(out + i + 2, topic, topic_len)
    i += 2 + topic_len
    if qos:
        out[i] = <uint8_t>(packet_id >> 8)
        out[i + 1] = <uint8_t>(packet_id & 0xFF)
        i += 2
    i += write_varint(out + i, np)
    i += alias_prop_put(c, out + i)                     # Topic Alias
    if ext_expire_ms(ext, ext_len):
        i += put_prop_u32(out + i, P_MESSAGE_EXPIRY, expiry)
    i += subid_props_put(out + i)                   # Subscription Identifiers (subopts.pyx)
    if ext_len > EXT_HEADER:
        memcpy(out + i, ext + EXT_HEADER, ext_len - EXT_HEADER)
        i += ext_len - EXT_HEADER
    if payload_len:
        memcpy(out + i, payload, payload_len)


cdef inline Msg* msg_new(const uint8_t* topic, uint32_t topic_len, const uint8_t* payload, uint32_t payload_len,
                         uint8_t qos, uint8_t retain) noexcept nogil:
    return msg_new_ext(topic, topic_len, payload, payload_len, NULL, 0, qos, retain)


cdef Msg* msg_new_ext(const uint8_t* topic, uint32_t topic_len, const uint8_t* payload, uint32_t payload_len,
                      const uint8_t* ext, uint32_t ext_len, uint8_t qos, uint8_t retain) noexcept nogil:
    cdef Msg* m = <Msg*>malloc(sizeof(Msg) + <size_t>topic_len + payload_len + ext_len)
    if m == NULL:
        return NULL
    m.refs = 1
    m.topic_len = topic_len
    m.payload_len = payload_len
    m.ext_len = ext_len
    m.qos = qos
    m.retain = retain
    m.origin_ns = 0
    m.share_slot = 0
    m.share_gen = 0
    m.data = (<uint8_t*>m) + sizeof(Msg)
    memcpy(m.data, topic, topic_len)
    if payload_len:
        memcpy(m.data + topic_len, payload, payload_len)
    if ext_len:
        memcpy(m.data + topic_len + payload_len, ext, ext_len)
    return m


cdef inline void msg_release(Msg* m) noexcept nogil:
    if m != NULL:
        m.refs -= 1
        if m.refs == 0:
            free(m)


cdef void route_publish(Worker w, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                        uint32_t payload_len, uint8_t qos, uint8_t retain, bint forward, uint64_t origin_ns,
                        const uint8_t* ext, uint32_t ext_len):
    """Delivers to every matching local subscriber and, when `forward`, to the
    peers with interest. `retain` only decides whether the retained store
    changes: live deliveries go out with RETAIN=0 (MQTT-3.3.1-9). `ext`: an
    MQTT 5.0 message's extras (loop.pxd, Msg; ext_len 0: none).

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
        peers = route_local(w, match, topic, topic_len, payload, payload_len, qos, retain, forward, origin_ns,
                            ext, ext_len)
    finally:
        w.route_depth -= 1
        if match == &nested:
            topics_result_free(&nested)
    if forward:
        route_forward(w, peers, topic, topic_len, payload, payload_len, qos, retain, origin_ns, ext, ext_len)
        if w.share_index.subscriptions:
            route_shared(w, topic, topic_len, payload, payload_len, qos, retain, origin_ns, ext, ext_len)  # shared.pyx


cdef uint64_t route_local(Worker w, MatchResult* match, const uint8_t* topic, uint32_t topic_len,
                          const uint8_t* payload, uint32_t payload_len, uint8_t qos, uint8_t retain,
                          bint forward, uint64_t origin_ns, const uint8_t* ext, uint32_t ext_len) except? 0:
    """The local deliveries; returns the peers with interest."""
    cdef int n, i
    cdef uint8_t q, r
    cdef Msg* msg = NULL
    cdef MatchEntry* e
    if retain:
        retain_publish(w, topic, topic_len, payload, payload_len, qos, forward, ext, ext_len)    # retained.pyx
    if is_share(topic, topic_len):
        w.route_nolocal = 0
        return 0        # only a shared subscription's whole filter could match it: it is not a subscriber's
    match.nolocal = w.route_nolocal     # No Local: the publisher's own session (subopts.pyx)
    w.route_nolocal = 0
    n = topics_match(w.index, topic, topic_len, match)
    if n < 0:
        w.counters[DROPPED_NOMEM] += 1
        return 0
    try:
        for i in range(n):
            e = &match.entries[i]
            q = qos if qos < e.qos else e.qos
            # RETAIN=0 on live delivery (MQTT-3.3.1-12) but with Retain As Published (MQTT-3.3.1-13).
            r = retain if e.opts & SUBOPT_RAP else 0
            if q == 0:
                deliver_qos0(w, &w.sessions[e.subscriber], topic, topic_len, payload, payload_len, r, ext, ext_len)
            else:
                if msg == NULL:
                    msg = msg_new_ext(topic, topic_len, payload, payload_len, ext, ext_len, qos, 0)
                    if msg == NULL:
                        w.counters[DROPPED_NOMEM] += 1
                        continue
                    msg.origin_ns = origin_ns
                deliver_msg(w, &w.sessions[e.subscriber], msg, q, r)
    finally:
        msg_release(msg)
    if match.nolocal_skipped:
        w.counters[MQTT5_NO_LOCAL_SKIPPED] += match.nolocal_skipped
        match.nolocal_skipped = 0
    if n > 0:
        hist_observe(w.counters, HIST_DELIVER, w.now_ns - origin_ns if w.now_ns > origin_ns else 0)
    return match.peers


cdef void route_forward(Worker w, uint64_t peers, const uint8_t* topic, uint32_t topic_len,
                        const uint8_t* payload, uint32_t payload_len, uint8_t qos, uint8_t retain,
                        uint64_t origin_ns, const uint8_t* ext, uint32_t ext_len):
    """To the peer workers with a matching filter, as FR_PUBLISH frames (an
    MQTT 5.0 message's extras after its payload, their length last)."""
    cdef int p
    cdef uint8_t* body
    cdef uint8_t flags = qos | (retain << 2)
    cdef uint32_t tail = 0
    if ext_len:
        flags |= PUB_EXT
        tail = ext_len + 4
    peers &= ~((<uint64_t>1) << w.worker_index)
    p = 0
    while peers:
        if peers & 1:
            body = channel_frame(w, p, FR_PUBLISH, flags, topic_len, 8 + topic_len + payload_len + tail)
            if body != NULL:
                memcpy(body, &origin_ns, 8)
                memcpy(body + 8, topic, topic_len)
                memcpy(body + 8 + topic_len, payload, payload_len)
                if ext_len:
                    memcpy(body + 8 + topic_len + payload_len, ext, ext_len)
                    memcpy(body + 8 + topic_len + payload_len + ext_len, &ext_len, 4)
                w.counters[CHANNEL_MSGS_OUT] += 1
        peers >>= 1
        p += 1


cdef void deliver_qos0(Worker w, Session* s, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                       uint32_t payload_len, uint8_t retain, const uint8_t* ext, uint32_t ext_len):
    cdef Conn* c
    cdef uint8_t* out
    cdef uint64_t now = 0
    cdef uint32_t size
    cdef bint v5
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
    if ext_len == 0:
        v5 = conn_v5(c)
        if not v5 or v5_bare(w, c):
            size = publish_plain_size(topic_len, payload_len, 0, v5)
            if v5 and c.max_packet_out and size > c.max_packet_out:
                too_large_for(w, c)     # not sent to this client (MQTT-3.1.2-25)
                return
            out = w.reserve(c, size)
            if out != NULL:
                encode_publish_plain(out, topic, topic_len, payload, payload_len, 0, retain, 0, 0, v5)
                w.counters[PKT_OUT + PUBLISH] += 1
                w.counters[MSGS_OUT] += 1
            return
    if ext_expired(w, ext, ext_len):
        return
    if ext_expire_ms(ext, ext_len):
        now = realtime_ms()
    subids_prepare(w, c, topic, topic_len)              # worker/subopts.pyx
    alias_out_pick(c, topic, topic_len)                 # worker/mqtt5.pyx
    size = publish_out_size(c, topic_len, payload_len, ext, ext_len, 0, now)
    if c.max_packet_out and size > c.max_packet_out:
        too_large_for(w, c)         # not sent to this client (MQTT-3.1.2-25), the others still get it
        return
    out = w.reserve(c, size)
    if out != NULL:
        publish_out_encode(c, out, topic, topic_len, payload, payload_len, ext, ext_len, 0, retain, 0, 0, now)
        alias_out_sent(w, c, topic, topic_len)
        w.counters[PKT_OUT + PUBLISH] += 1
        w.counters[MSGS_OUT] += 1
    else:
        c.alias_pick = 0
        subids_clear()


cdef void deliver_msg(Worker w, Session* s, Msg* msg, uint8_t qos, uint8_t retain):
    """QoS 1/2: send now if the session's in-flight window has room, else queue."""
    cdef uint64_t size = <uint64_t>msg.topic_len + msg.payload_len + msg.ext_len
    if msg.ext_len and ext_expired(w, msg.data + msg.topic_len + msg.payload_len, msg.ext_len):
        return
    if not may_deliver(w, s, msg.data, msg.topic_len):
        return      # checked again as it leaves the queue (session_pump): a reload may revoke it meanwhile
    if s.ninflight < w.max_inflight and s.qlen == 0 and session_online(w, s):
        if w.conns[s.fd].recv_max_out == 0 or s.ninflight < w.conns[s.fd].recv_max_out:
            session_send(w, s, msg, qos, retain)
            return
        w.counters[MQTT5_RECEIVE_MAX_HELD] += 1     # its Receive Maximum, below max_inflight: queued
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
