# Included by loop.pyx. Dispatches one complete MQTT packet (framed by
# Worker.process_mqtt) to its handler, one file each: handle_connect.pyx,
# handle_publish.pyx, handle_acks.pyx (PUBACK, PUBREC, PUBREL, PUBCOMP),
# handle_subscribe.pyx, handle_unsubscribe.pyx, handle_ping.pyx,
# handle_disconnect.pyx.

cdef int handle_packet(Worker w, Conn* c, uint8_t first, const uint8_t* body, uint32_t n):
    """One complete packet. Returns 0, or -1 if the connection was closed."""
    cdef uint8_t ptype = first >> 4
    cdef int reason = 0
    w.counters[PKT_IN + ptype] += 1
    if c.state != ST_CONNECTED:
        if ptype != CONNECT:
            # The first packet from the client MUST be CONNECT (MQTT-3.1.0-1).
            w.malformed(c, MAL_PROTOCOL)
            return -1
        return handle_connect(w, c, body, n)
    if ptype == PUBLISH:
        return handle_publish(w, c, first, body, n)
    if ptype == PINGREQ:
        return handle_ping(w, c)
    if ptype == PUBACK or ptype == PUBREC or ptype == PUBREL or ptype == PUBCOMP:
        return handle_ack(w, c, ptype, body, n)
    if ptype == SUBSCRIBE:
        return handle_subscribe(w, c, body, n)
    if ptype == UNSUBSCRIBE:
        return handle_unsubscribe(w, c, body, n)
    if ptype == DISCONNECT:
        return handle_disconnect(w, c)
    if ptype == CONNECT:
        w.malformed(c, MAL_PROTOCOL)        # a second CONNECT (MQTT-3.1.0-2)
        return -1
    # CONNACK, SUBACK, UNSUBACK, PINGRESP: only servers send them, a protocol
    # violation from a client (MQTT-4.8.0-1), counted apart.
    w.malformed(c, MAL_SERVER_PACKET)
    return -1
