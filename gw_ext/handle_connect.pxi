# Included by loop.pyx. CONNECT: validation, client id, CONNACK.

cdef int handle_connect(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    cdef ConnectPacket pkt
    cdef int reason = 0
    cdef int rc = decode_connect(body, n, &pkt, &reason)
    cdef uint8_t* out
    cdef bytes generated
    if rc < 0:
        w.malformed(c, reason)
        return -1
    if rc > 0:
        # Unacceptable protocol level (0x01) or identifier rejected (0x02):
        # answer with that CONNACK, then close (MQTT-3.2.2-5).
        w.counters[CONNACK_REFUSED] += 1
        out = w.reserve(c, 4)
        if out == NULL:
            return -1
        encode_connack(out, 0, <uint8_t>rc)
        w.counters[PKT_OUT + CONNACK] += 1
        w.close_after_flush(c)
        return -1
    if pkt.client_id.len > 0:
        c.client_id = <char*>malloc(pkt.client_id.len)
        if c.client_id == NULL:
            w.close_conn(c, CR_SERVER)
            return -1
        memcpy(c.client_id, pkt.client_id.ptr, pkt.client_id.len)
        c.client_id_len = <uint16_t>pkt.client_id.len
    else:
        # Empty client id with clean session 1: the server assigns one (MQTT-3.1.3-6).
        w.auto_id += 1
        generated = b"auto-%d-%x" % (w.worker_index, w.auto_id)
        c.client_id_len = <uint16_t>len(generated)
        c.client_id = <char*>malloc(c.client_id_len)
        if c.client_id == NULL:
            w.close_conn(c, CR_SERVER)
            return -1
        memcpy(c.client_id, PyBytes_AS_STRING(generated), c.client_id_len)
    c.keepalive = pkt.keepalive
    w.become_connected(c, <uint32_t>pkt.keepalive * 1500)
    w.counters[MQTT_CONNECTED] += 1
    out = w.reserve(c, 4)
    if out == NULL:
        return -1
    encode_connack(out, 0, CONNACK_ACCEPTED)
    w.counters[PKT_OUT + CONNACK] += 1
    return 0
