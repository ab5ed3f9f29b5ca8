# Included by loop.pyx. CONNECT: validation, who may connect (auth.pyx), then
# the session is settled across workers (registry.pyx), which sends the CONNACK.

cdef int handle_connect(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    cdef ConnectPacket pkt
    cdef int reason = 0
    cdef int rc
    cdef PendingConnect pc
    if connect_protocol_level(body, n) == 5:
        return handle_connect5(w, c, body, n)       # MQTT 5.0 from here on (worker/mqtt5.pyx)
    rc = decode_connect(body, n, &pkt, &reason)
    if rc < 0:
        w.malformed(c, reason)
        return -1
    if rc > 0:
        # Unacceptable protocol level (0x01) or identifier rejected (0x02).
        return refuse_connect(w, c, <uint8_t>rc)
    cdef bytes username = None
    cdef int why = CN_OK
    if w.listeners[c.listener].identity_username and c.ssl != NULL:
        # use_identity_as_username: the certificate's CN replaces any user name in
        # CONNECT (as Mosquitto does); a certificate without a usable one is
        # refused as a bad user name (CONNACK 4).
        username = peer_common_name(c.ssl, &why)
        if username is None:
            w.counters[TLS_REFUSED_BAD_CERT] += 1
            w.log_client(CR_TLS_BAD_CERT, c.fd, "CONNECT refused (use_identity_as_username): "
                         + CN_REASONS[why])
            return refuse_connect(w, c, CONNACK_BAD_AUTH)
    elif pkt.has_username:
        username = PyBytes_FromStringAndSize(<char*>pkt.username.ptr, pkt.username.len)
    pc = PendingConnect.__new__(PendingConnect)
    # The user name it acts as (the ACL's identity, the owner of its session);
    # auth_connect checks that it is who it says.
    pc.username = username
    pc.fd = c.fd
    pc.gen = c.gen
    pc.prev_owner = -2
    pc.version = pkt.protocol_level
    c.version = pkt.protocol_level
    if pkt.client_id.len > 0:
        pc.client_id = PyBytes_FromStringAndSize(<char*>pkt.client_id.ptr, pkt.client_id.len)
    else:
        # Empty client id with clean session 1: the server assigns one (MQTT-3.1.3-6).
        w.auto_id += 1
        pc.client_id = b"auto-%d-%x" % (w.worker_index, w.auto_id)
    pc.clean = pkt.clean_session
    pc.keepalive = pkt.keepalive
    pc.will_flag = pkt.will_flag
    if pkt.will_flag:
        pc.will_topic = PyBytes_FromStringAndSize(<char*>pkt.will_topic.ptr, pkt.will_topic.len)
        pc.will_message = PyBytes_FromStringAndSize(<char*>pkt.will_message.ptr, pkt.will_message.len)
        pc.will_qos = pkt.will_qos
        pc.will_retain = pkt.will_retain
    rc = auth_connect(w, c, pc, pkt.password.ptr, pkt.password.len, pkt.has_password)   # who may connect (auth.pyx)
    if rc < 0:
        return -1
    if rc > 0:
        return 0                            # held for its password check; auth_readable claims it
    return connect_claim(w, c, pc)


cdef int refuse_connect(Worker w, Conn* c, uint8_t return_code):
    """Answers a CONNECT with a refusing CONNACK, then closes (MQTT-3.2.2-5)."""
    cdef uint8_t* out
    if c.version == 5:
        return refuse_connect5(w, c, connack_code5(return_code), -1)
    w.counters[CONNACK_REFUSED] += 1
    out = w.reserve(c, 4)
    if out == NULL:
        return -1
    encode_connack(out, 0, return_code)
    w.counters[PKT_OUT + CONNACK] += 1
    w.close_after_flush(c)
    return -1
