# Included by loop.pyx. PUBLISH and the QoS acknowledgement flows.

cdef int handle_publish(Worker w, Conn* c, uint8_t first, const uint8_t* body, uint32_t n):
    cdef PublishPacket pkt
    cdef int reason = 0
    cdef uint8_t* out
    if decode_publish(first, body, n, &pkt, &reason) < 0:
        w.malformed(c, reason)
        return -1
    w.counters[MSGS_IN] += 1
    # Routing to subscribers is the router's job (not built yet); the
    # acknowledgement flow is the protocol's and complete here.
    if pkt.qos == 1:
        return w.send_ack(c, PUBACK, pkt.packet_id)
    if pkt.qos == 2:
        return w.send_ack(c, PUBREC, pkt.packet_id)
    return 0

cdef int handle_ack(Worker w, Conn* c, uint8_t ptype, const uint8_t* body, uint32_t n):
    cdef uint16_t pid
    if decode_packet_id(body, n, &pid) < 0:
        w.malformed(c, MAL_PACKET_ID)
        return -1
    if ptype == PUBREL:
        return w.send_ack(c, PUBCOMP, pid)
    if ptype == PUBREC:
        return w.send_ack(c, PUBREL, pid)
    return 0
