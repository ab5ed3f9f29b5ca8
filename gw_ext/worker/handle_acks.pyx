# Included by loop.pyx. The acknowledgements of the QoS 1/2 flows, both ways:
# PUBREL from a publisher (its QoS 2 message released: PUBCOMP), and PUBACK,
# PUBREC (answered with PUBREL) and PUBCOMP from a subscriber for what we sent
# it (its in-flight window, sessions.pyx). Any of them means the subscriber is
# reading: it no longer counts as stalled (backpressure.pyx).

cdef int handle_ack(Worker w, Conn* c, uint8_t ptype, const uint8_t* body, uint32_t n):
    cdef uint16_t pid
    cdef Session* s = &w.sessions[c.session]
    if decode_packet_id(body, n, &pid) < 0:
        w.malformed(c, MAL_PACKET_ID)
        return -1
    if ptype == PUBREL:
        # The publisher's QoS 2 release; PUBCOMP also for an id we do not know
        # (it may have been completed before a reconnect), as Mosquitto does.
        qos2_forget(s, pid)
        session_changed(w, s)
        return w.send_ack(c, PUBCOMP, pid)
    return session_acked(w, s, ptype, pid)


cdef int session_acked(Worker w, Session* s, uint8_t ptype, uint16_t pid):
    """PUBACK, PUBREC or PUBCOMP from the client for one of our messages.
    Returns 0, or -1 when the connection was closed: an acknowledgement of the
    wrong kind for its flow (PUBREC or PUBCOMP answering QoS 1, PUBACK
    answering QoS 2, PUBCOMP before the PUBREL) is a protocol violation
    (MQTT-4.3.2/4.3.3, MQTT-4.8.0-1). One for a packet id not in flight is
    ignored (it may answer a message completed before a reconnect)."""
    cdef uint32_t i
    cdef Inflight* e
    cdef uint8_t* out
    session_changed(w, s)
    s.last_ack_ms = w.now_ms
    s.stalled = 0
    for i in range(s.ninflight):
        e = &s.inflight[i]
        if e.packet_id != pid:
            continue
        if ptype == PUBREC and e.qos == 2:
            e.state = IF_RELEASED
            if e.held:          # answered before it went again: the PUBREL below sends it
                e.held = 0
                s.nheld -= 1
            break       # PUBREL below, also for a repeated PUBREC
        if (ptype == PUBACK and e.qos == 1) or (ptype == PUBCOMP and e.qos == 2 and e.state == IF_RELEASED):
            if e.held:
                s.nheld -= 1
            msg_release(e.msg)
            memmove(e, e + 1, (s.ninflight - i - 1) * sizeof(Inflight))
            s.ninflight -= 1
            session_pump(w, s)
            return 0
        w.malformed(&w.conns[s.fd], MAL_ACK)
        return -1
    if ptype == PUBREC:
        return w.send_ack(&w.conns[s.fd], PUBREL, pid)
    return 0
