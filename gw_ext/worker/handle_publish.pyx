# Included by loop.pyx. PUBLISH from a client: QoS 2 duplicates caught
# (max_awaiting_rel), telemetry topics through the ingest schema and the log
# (telemetry.pyx), everything else routed (router.pyx); then its PUBACK or
# PUBREC, at once or once the log is durable (durable_ack.pyx). While the store
# is behind (max_sink_lag_bytes, backpressure.pyx) a telemetry publisher at
# QoS 1/2 is no longer read and QoS 0 telemetry is shed.

cdef int handle_publish(Worker w, Conn* c, uint8_t first, const uint8_t* body, uint32_t n):
    cdef PublishPacket pkt
    cdef int reason = 0
    if decode_publish(first, body, n, &pkt, &reason) < 0:
        w.malformed(c, reason)
        return -1
    return publish_decoded(w, c, &pkt, NULL, 0)


cdef inline int publish_decoded(Worker w, Conn* c, PublishPacket* p, const uint8_t* ext, uint32_t ext_len):
    """A valid PUBLISH, whichever version decoded it (MQTT 5.0's: mqtt5.pyx,
    with its properties as the message's extras, router.pyx)."""
    cdef PublishPacket pkt = p[0]
    cdef int64_t needed = 0
    cdef Session* s = &w.sessions[c.session]
    cdef bint telemetry
    cdef bytes reading = None
    w.counters[MSGS_IN] += 1
    if pkt.qos and not (c.flags & F_PUBLISHER):
        c.flags |= F_PUBLISHER
        publisher_add(w, c)        # backpressure.pyx
        if w.publishers_paused:
            pause_conn(w, c)       # this packet is handled; the next wait
    if (pkt.qos and c.version == 5 and w.held_pubacks != NULL
            and s.nqos2_in + w.held_pubacks[c.fd] >= receive_maximum_in(w)
            and not (pkt.qos == 2 and qos2_seen(s, pkt.packet_id))):
        # MQTT 5.0: more QoS 1/2 PUBLISHes unanswered than the Receive Maximum
        # our CONNACK announced (MQTT-3.3.4-7 broken; 3.3.4: DISCONNECT 0x93).
        # Unanswered: QoS 2 ones before their PUBCOMP, and, in ack mode sink,
        # QoS 1 ones whose PUBACK waits for the log (durable_ack.pyx); without
        # held PUBACKs the QoS 2 check below is the same test.
        w.counters[LIMITS + LIM_AWAITING_REL] += 1
        w.close_after_flush(c, CR_LIMIT, LIM_AWAITING_REL)
        return -1
    if pkt.qos == 2:
        if qos2_seen(s, pkt.packet_id):
            # A resent QoS 2 PUBLISH (its PUBREL not yet seen): routed once only.
            # Its PUBREC promises what the first one's does: in ack mode sink, a
            # reading durable. The first copy is in the log, so its end now covers it.
            if (w.wal is not None and w.listeners[c.listener].ack_sink and w.ingest is not None
                    and is_telemetry_topic(w, pkt.topic.ptr, pkt.topic.len)):
                needed = w.wal.appended_c()
            return ack_after_durable(w, c, PUBREC, pkt.packet_id, needed)
        if s.nqos2_in >= w.max_awaiting_rel:
            # More QoS 2 messages awaiting PUBREL than allowed: the publisher goes
            # (3.1.1 has no way to refuse one and keep the connection), once the
            # answers it is owed are out.
            w.counters[LIMITS + LIM_AWAITING_REL] += 1
            w.close_after_flush(c, CR_LIMIT, LIM_AWAITING_REL)
            return -1
        if qos2_remember(s, pkt.packet_id) < 0:
            w.close_conn(c, CR_SERVER)
            return -1
        session_changed(w, s)
    if publish_refused(w, c, s, pkt.topic.ptr, pkt.topic.len):
        # Acknowledged all the same (3.1.1 has no negative acknowledgement; MQTT
        # 5.0 says 0x87 Not authorized), then dropped: not routed, not retained,
        # not taken as a reading.
        if pkt.qos and c.version == 5:
            if pkt.qos == 2:
                qos2_forget(s, pkt.packet_id)       # an error PUBREC ends the flow (MQTT-4.3.3-4)
            send_ack5(w, c, PUBACK if pkt.qos == 1 else PUBREC, pkt.packet_id, RC_NOT_AUTHORIZED)
        elif pkt.qos == 1:
            w.send_ack(c, PUBACK, pkt.packet_id)
        elif pkt.qos == 2:
            w.send_ack(c, PUBREC, pkt.packet_id)
        return 0 if c.state == ST_CONNECTED else -1
    telemetry = w.ingest is not None and is_telemetry_topic(w, pkt.topic.ptr, pkt.topic.len)
    if telemetry:
        if pkt.qos:
            c.store_flags |= SF_TELEMETRY
            if w.store_behind:
                store_hold(w, c)    # this PUBLISH is taken (it was read); the next ones wait
        elif w.store_behind:
            # QoS 0 has no acknowledgement to hold: shed, counted (backpressure.pyx).
            w.counters[STORE_BEHIND_QOS0] += 1
            w.log_limited(CR_STORE_BEHIND, "the store is behind this worker's log (max_sink_lag_bytes): "
                          "QoS 0 telemetry shed until it catches up")
            return 0
        reading = telemetry_accept(w, pkt.topic.ptr, pkt.topic.len, pkt.payload.ptr, pkt.payload.len, &needed)
        if needed == TELEMETRY_REFUSED:
            if pkt.qos == 0:
                return 0        # dropped, counted (WAL_REFUSED)
            # Not taken: no acknowledgement, ever. Closing is how MQTT 3.1.1 says
            # so: the client keeps the reading and sends it again when it returns.
            if pkt.qos == 2:
                qos2_forget(s, pkt.packet_id)
            w.close_conn(c, CR_WAL)
            return -1
        if needed < 0 or not w.listeners[c.listener].ack_sink:
            needed = 0          # refused by the schema, or ack mode enqueue: acknowledged now
    # The answer goes before any copy of the message, so a client subscribed to
    # its own topic gets its PUBACK/PUBREC first (but in ack mode sink a
    # reading's answer waits for the log, its copies do not). Routed even if
    # answering closed the connection (its buffer full): its QoS 2 packet id is
    # remembered already, so a re-send would not be routed.
    if pkt.qos == 1:
        ack_after_durable(w, c, PUBACK, pkt.packet_id, needed)
    elif pkt.qos == 2:
        ack_after_durable(w, c, PUBREC, pkt.packet_id, needed)
    w.route_nolocal = <uint32_t>c.session + 1     # No Local (subopts.pyx): read by the route's match
    try:
        if not telemetry:
            route_publish(w, pkt.topic.ptr, pkt.topic.len, pkt.payload.ptr, pkt.payload.len, pkt.qos, pkt.retain,
                          True, w.now_ns, ext, ext_len)
        elif reading is not None:   # in its normalised form; an invalid reading is not routed
            route_publish(w, pkt.topic.ptr, pkt.topic.len, <const uint8_t*>PyBytes_AS_STRING(reading),
                          PyBytes_GET_SIZE(reading), pkt.qos, pkt.retain, True, w.now_ns, ext, ext_len)
    finally:
        w.route_nolocal = 0     # (a failure closes this connection: a peer's message must not inherit it)
    return 0 if c.state == ST_CONNECTED else -1     # -1: its own buffer overflowed

