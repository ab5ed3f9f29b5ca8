# Included by loop.pyx. MQTT 5.0 connections: a connection whose CONNECT says
# protocol level 5 (Conn.version) is framed and decoded by the MQTT 5.0 codec
# (gw_ext/codec5.pxd) from then on: Worker.process_mqtt hands each of its reads
# to process_mqtt5 (one test per read, none per packet of a 3.1.1 connection),
# whose packets go to handle_packet5. Most of the work after decoding is the
# 3.1.1 handlers' (a v5 PUBLISH becomes a PublishPacket for publish_decoded, a
# SUBSCRIBE or UNSUBSCRIBE a 3.1.1 body for handle_subscribe/unsubscribe); what
# differs is here: the CONNECT and its CONNACK, reason codes in the answers,
# DISCONNECT both ways, Session Expiry Interval, and the DISCONNECT with a
# reason code the server sends before it closes a v5 connection (v5_goodbye,
# called by Worker.close_conn and close_after_flush for every close path).

from libc.string cimport strlen
from gw_ext.codec5 cimport (
    AUTH, ERR_PROTOCOL, Ack5Packet, Connect5Packet, Entry5Iter, Props5, Publish5Packet,
    P_AUTH_METHOD, P_ASSIGNED_CLIENT_ID, P_MAXIMUM_PACKET_SIZE, P_REASON_STRING, P_RECEIVE_MAXIMUM,
    P_SESSION_EXPIRY, P_SHARED_AVAILABLE, P_SUBSCRIPTION_ID, P_SUBSCRIPTION_ID_AVAILABLE, P_TOPIC_ALIAS,
    P_TOPIC_ALIAS_MAXIMUM, P_USER_PROPERTY, R5_NONE, R5_REASON_CODE, R5_TOPIC_ALIAS,
    RC_BAD_AUTH_METHOD, RC_KEEP_ALIVE_TIMEOUT, RC_MALFORMED, RC_NOT_AUTHORIZED, RC_PACKET_TOO_LARGE,
    RC_PROTOCOL_ERROR, RC_QUOTA_EXCEEDED, RC_SERVER_SHUTTING_DOWN, RC_SESSION_TAKEN_OVER, RC_SUCCESS,
    RC_UNSPECIFIED, ack5_size, codes5_size, connack5_size, connect_protocol_level, decode_ack5,
    decode_connect5, decode_disconnect5, decode_header5, decode_publish5, disconnect5_size, encode_ack5,
    encode_codes5, encode_connack5, encode_disconnect5, encode_publish5, entries5_begin, is_shared_filter,
    publish5_size, put_prop_bytes, put_prop_u8, put_prop_u16, put_prop_u32, subscribe5_next,
    unsubscribe5_next,
)

cdef enum:
    # Conn.v5 flags.
    V5_NO_PROBLEM_INFO = 1    # Request Problem Information 0: no Reason String or User Property but on
                              # PUBLISH, CONNACK, DISCONNECT (MQTT-3.1.2-29)
    V5_GOODBYE = 2            # a DISCONNECT went out: nothing more is written
    V5_EXPIRY_ZERO = 4        # its CONNECT's Session Expiry Interval was 0 (MQTT-3.14.2-2)
                              # 8, 16, 32: enhanced authentication's (worker/enhanced_auth.pyx)

cdef enum:
    # More reason codes (section 2.4) than codec5.pxd names.
    RC_DISCONNECT_WITH_WILL = 0x04
    RC_NO_SUBSCRIPTION_EXISTED = 0x11
    RC_IMPLEMENTATION_ERROR = 0x83
    RC_ID_REJECTED = 0x85
    RC_BAD_USER_OR_PASSWORD = 0x86
    RC_SERVER_UNAVAILABLE = 0x88
    RC_SERVER_BUSY = 0x89
    RC_PACKET_ID_NOT_FOUND = 0x92
    RC_RECEIVE_MAXIMUM_EXCEEDED = 0x93
    RC_TOPIC_ALIAS_INVALID = 0x94
    RC_ADMINISTRATIVE_ACTION = 0x98
    RC_PAYLOAD_FORMAT_INVALID = 0x99
    RC_SHARED_NOT_SUPPORTED = 0x9E

# What this server supports of MQTT 5.0, as announced in every CONNACK (section
# 3.2.2.3): Subscription Identifiers are (worker/subopts.pyx), so their
# property is left out; shared subscriptions would otherwise be refused with
# 0x9E in the SUBACK.
cdef enum:
    V5_SHARED_AVAILABLE = 1       # $share/{name}/{filter}: worker/shared.pyx
    V5_TOPIC_ALIAS_MAXIMUM = 0    # aliases from clients: none accepted (a Topic Alias is 0x94)


# --- framing and dispatch ------------------------------------------------------------

cdef Py_ssize_t process_mqtt5(Worker w, Conn* c, uint8_t* buf, Py_ssize_t n):
    """Worker.process_mqtt for an MQTT 5.0 connection: the same framing, MQTT
    5.0's fixed header (AUTH, a minimal Remaining Length)."""
    cdef Py_ssize_t pos = 0
    cdef int hl, reason = 0
    cdef uint8_t first
    cdef uint32_t remaining
    cdef Py_ssize_t total
    cdef bint any_packet = False
    c.need = 0
    while pos < n:
        if c.state == ST_CLOSING:
            return n
        if c.state == ST_CLOSED:
            return -1
        if c.state == ST_SETTLING:
            break
        hl = decode_header5(buf + pos, n - pos, w.max_packet_size, &first, &remaining, &reason)
        if hl < 0:
            if hl == ERR_INCOMPLETE:
                break
            if hl == ERR_TOO_LARGE:
                w.counters[PACKETS_TOO_LARGE] += 1
                w.close_conn(c, CR_TOO_LARGE)       # DISCONNECT 0x95 (v5_goodbye)
                return -1
            v5_error(w, c, hl, reason)
            return -1
        total = hl + remaining
        if total > w.max_packet_size:
            w.counters[PACKETS_TOO_LARGE] += 1
            w.close_conn(c, CR_TOO_LARGE)
            return -1
        if n - pos < total:
            c.need = <uint32_t>total
            break
        if (first & 0xF0) == 0x30 and (w.batch_messages >= w.msg_allowance
                                       or w.batch_bytes >= w.byte_allowance):
            w.rate_stopped = True
            break
        if handle_packet5(w, c, first, buf + pos + hl, remaining) < 0:
            return -1
        if (first & 0xF0) == 0x30:
            w.batch_messages += 1
            w.batch_bytes += <uint64_t>total
        any_packet = True
        pos += total
    if any_packet:
        c.last_rx_ms = w.now_ms
    return pos


cdef int handle_packet5(Worker w, Conn* c, uint8_t first, const uint8_t* body, uint32_t n):
    """One complete packet of an MQTT 5.0 connection (its CONNECT was read by
    handle_connect). Returns 0, or -1 if the connection was closed."""
    cdef uint8_t ptype = first >> 4
    w.counters[PKT_IN + ptype] += 1
    if c.state != ST_CONNECTED:
        if c.v5 & V5_AUTHING:
            return enhanced_auth_pending(w, c, ptype, body, n)     # worker/enhanced_auth.pyx
        v5_error(w, c, ERR_PROTOCOL, R5_NONE)
        return -1
    cdef uint16_t pid
    if ptype == PUBLISH:
        return handle_publish5(w, c, first, body, n)
    if ptype == PINGREQ:
        return handle_ping(w, c)        # PINGRESP: the same two bytes in both versions
    if ptype == PUBACK or ptype == PUBREC or ptype == PUBREL or ptype == PUBCOMP:
        if n == 2 and ptype != PUBREL and (body[0] or body[1]):
            # The short form (reason code 0 Success, no properties: 3.4.2.1):
            # the 3.1.1 acknowledgement, without the codec's walk. decode_ack5
            # takes every other form, and packet id 0 (a Protocol Error).
            pid = <uint16_t>((body[0] << 8) | body[1])
            return session_acked(w, &w.sessions[c.session], ptype, pid)     # handle_acks.pyx
        return handle_ack5(w, c, ptype, body, n)
    if ptype == SUBSCRIBE:
        return handle_subscribe5(w, c, body, n)
    if ptype == UNSUBSCRIBE:
        return handle_unsubscribe5(w, c, body, n)
    if ptype == DISCONNECT:
        return handle_disconnect5(w, c, body, n)
    if ptype == AUTH:
        return handle_auth5(w, c, body, n)      # re-authentication (worker/enhanced_auth.pyx)
    # A second CONNECT (MQTT-3.1.0-2) and packets only servers send (CONNACK,
    # SUBACK, UNSUBACK, PINGRESP): Protocol Errors.
    v5_error(w, c, ERR_PROTOCOL, R5_NONE)
    return -1


R5_LOG_NAMES = ["a rule of the handlers", "fixed header", "length", "variable byte integer", "invalid UTF-8",
                "control character", "protocol name or flags", "QoS 3", "invalid topic or filter",
                "property not allowed", "subscription options reserved bits", "duplicate property",
                "property value", "packet id 0", "no entries", "reason code not allowed",
                "subscription options", "empty topic without alias", "session present", "authentication"]


cdef str r5_close_text(int detail):
    cdef int r = detail & 0x1F
    return "%s (%s)" % ("protocol error" if detail & DETAIL_PROTOCOL else "malformed packet",
                        R5_LOG_NAMES[r] if r < len(R5_LOG_NAMES) else "?")


cdef void v5_error(Worker w, Conn* c, int rc, int reason):
    """A Malformed Packet (rc ERR_MALFORMED) or Protocol Error (ERR_PROTOCOL):
    counted by its reason, DISCONNECT 0x81 or 0x82 once the CONNACK went out
    (MQTT-4.13.1-1), then closed."""
    cdef uint8_t code = RC_MALFORMED if rc == ERR_MALFORMED else RC_PROTOCOL_ERROR
    cdef int detail
    if 1 <= reason <= 19:
        w.counters[MQTT5_BAD_PACKETS + reason - 1] += 1
    if code == RC_PROTOCOL_ERROR:
        w.counters[MQTT5_PROTOCOL_ERRORS] += 1
    else:
        w.counters[MQTT5_MALFORMED] += 1
    detail = DETAIL_R5 | (DETAIL_PROTOCOL if code == RC_PROTOCOL_ERROR else 0) | (reason if 0 <= reason < 20 else 0)
    if c.state == ST_CONNECTED and not (c.v5 & V5_GOODBYE):
        send_disconnect5(w, c, code)
        w.close_after_flush(c, CR_MALFORMED, detail)
    else:
        w.close_conn(c, CR_MALFORMED, detail)


# --- CONNECT -------------------------------------------------------------------------

cdef int handle_connect5(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    cdef Connect5Packet pkt
    cdef int reason = 0
    cdef int rc
    cdef PendingConnect pc
    cdef bytes username = None
    cdef int why = CN_OK
    c.version = 5
    rc = decode_connect5(body, n, &pkt, &reason)
    if rc < 0:
        # Malformed or a Protocol Error: the CONNACK may say which (MQTT-3.1.4-1,
        # -3.2.2-8), then the connection closes.
        if 1 <= reason <= 19:
            w.counters[MQTT5_BAD_PACKETS + reason - 1] += 1
        w.counters[MQTT5_MALFORMED if rc == ERR_MALFORMED else MQTT5_PROTOCOL_ERRORS] += 1
        return refuse_connect5(w, c, RC_MALFORMED if rc == ERR_MALFORMED else RC_PROTOCOL_ERROR, reason)
    cdef bint enhanced = False
    if (pkt.will_flag and pkt.will_props.present & (1ULL << P_PAYLOAD_FORMAT) and pkt.will_props.payload_format
            and not valid_utf8(pkt.will_message.ptr, pkt.will_message.len)):
        # A will that says UTF-8 and is not (3.1.3.2.3 lets the server check): CONNACK 0x99.
        w.counters[MQTT5_PAYLOAD_FORMAT_INVALID] += 1
        return refuse_connect5(w, c, RC_PAYLOAD_FORMAT_INVALID, -1)
    if pkt.props.present & (1ULL << P_AUTH_METHOD):
        # Enhanced authentication (section 4.12): SCRAM-SHA-512 only (worker/enhanced_auth.pyx).
        if not enhanced_auth_supported(w, c, &pkt.props):
            return refuse_connect5(w, c, RC_BAD_AUTH_METHOD, -1)
        enhanced = True
    if w.listeners[c.listener].identity_username and c.ssl != NULL:
        username = peer_common_name(c.ssl, &why)
        if username is None:
            w.counters[TLS_REFUSED_BAD_CERT] += 1
            w.log_client(CR_TLS_BAD_CERT, c.fd, "CONNECT refused (use_identity_as_username): "
                         + CN_REASONS[why])
            return refuse_connect(w, c, CONNACK_BAD_AUTH)
    elif pkt.has_username:
        username = PyBytes_FromStringAndSize(<char*>pkt.username.ptr, pkt.username.len)
    pc = PendingConnect.__new__(PendingConnect)
    pc.username = username
    pc.fd = c.fd
    pc.gen = c.gen
    pc.prev_owner = -2
    pc.version = 5
    pc.request_problem = 1
    if pkt.props.present & (1ULL << 0x17):      # Request Problem Information
        pc.request_problem = pkt.props.request_problem
        if not pkt.props.request_problem:
            c.v5 |= V5_NO_PROBLEM_INFO
    pc.session_expiry = pkt.props.session_expiry if pkt.props.present & (1ULL << P_SESSION_EXPIRY) else 0
    if pc.session_expiry == 0:
        c.v5 |= V5_EXPIRY_ZERO
    pc.clean_start = pkt.clean_start
    if pkt.props.present & (1ULL << P_MAXIMUM_PACKET_SIZE):
        c.max_packet_out = pkt.props.maximum_packet_size
        pc.max_packet_out = pkt.props.maximum_packet_size
    # What the server may send this connection (section 4.9, 3.3.2.3.4): its QoS
    # 1/2 window (sessions.pyx, session_window) and the aliases it takes (alias_out_*).
    if pkt.props.present & (1ULL << P_RECEIVE_MAXIMUM):
        c.recv_max_out = pkt.props.receive_maximum
    if pkt.props.present & (1ULL << P_TOPIC_ALIAS_MAXIMUM):
        c.alias_max_out = (pkt.props.topic_alias_maximum if pkt.props.topic_alias_maximum < w.topic_alias_maximum_out
                           else w.topic_alias_maximum_out)
    if pkt.client_id.len > 0:
        pc.client_id = PyBytes_FromStringAndSize(<char*>pkt.client_id.ptr, pkt.client_id.len)
    else:
        # An empty client id: one is assigned and told in the CONNACK (MQTT-3.1.3-6/-7),
        # whatever Clean Start says (a new id has no session to resume).
        w.auto_id += 1
        pc.client_id = b"auto-%d-%x" % (w.worker_index, w.auto_id)
        pc.assigned_id = True
    # `clean` is what the registry and the settling read: discard any session of
    # the id. Whether the session outlives the connection is Session Expiry's
    # (s.clean set from it when settled, registry.pyx).
    pc.clean = pkt.clean_start
    pc.keepalive = pkt.keepalive
    pc.will_flag = pkt.will_flag
    if pkt.will_flag:
        pc.will_topic = PyBytes_FromStringAndSize(<char*>pkt.will_topic.ptr, pkt.will_topic.len)
        pc.will_message = PyBytes_FromStringAndSize(<char*>pkt.will_message.ptr, pkt.will_message.len)
        pc.will_qos = pkt.will_qos
        pc.will_retain = pkt.will_retain
        if pkt.will_props.present & (1ULL << P_WILL_DELAY):
            pc.will_delay = pkt.will_props.will_delay       # worker/will_delay.pyx
        if pkt.will_props.raw.len:
            # Its properties go with it; its Message Expiry Interval counts from
            # when it is published (session_detach), so from 1 until then.
            pc.will_ext = ext_from_props(pkt.will_props.raw.ptr, pkt.will_props.raw.len,
                                         pkt.will_props.message_expiry,
                                         (pkt.will_props.present & (1ULL << P_MESSAGE_EXPIRY)) != 0, 1)
    if enhanced:
        return enhanced_auth_start(w, c, pc, &pkt.props)     # AUTH 0x18; the CONNECT held
    rc = auth_connect(w, c, pc, pkt.password.ptr, pkt.password.len, pkt.has_password)
    if rc < 0:
        return -1
    if rc > 0:
        return 0
    return connect_claim(w, c, pc)


cdef uint8_t connack_code5(uint8_t code311) noexcept nogil:
    """A 3.1.1 CONNACK return code's MQTT 5.0 reason code (section 3.2.2.2)."""
    if code311 == CONNACK_BAD_PROTOCOL:
        return 0x84
    if code311 == CONNACK_ID_REJECTED:
        return RC_ID_REJECTED
    if code311 == CONNACK_UNAVAILABLE:
        return RC_SERVER_UNAVAILABLE
    if code311 == CONNACK_BAD_AUTH:
        return RC_BAD_USER_OR_PASSWORD
    if code311 == CONNACK_NOT_AUTHORIZED:
        return RC_NOT_AUTHORIZED
    return RC_UNSPECIFIED


cdef int refuse_connect5(Worker w, Conn* c, uint8_t reason_code, int bad_reason):
    """A CONNACK with a reason code of 0x80 or more, then the connection
    closes (MQTT-3.2.2-7)."""
    cdef uint8_t* out
    w.counters[CONNACK_REFUSED] += 1
    out = w.reserve(c, connack5_size(0))
    if out == NULL:
        return -1
    encode_connack5(out, 0, reason_code, NULL, 0)
    w.counters[PKT_OUT + CONNACK] += 1
    if bad_reason >= 0:
        w.close_after_flush(c, CR_MALFORMED, DETAIL_R5 | (DETAIL_PROTOCOL if reason_code == RC_PROTOCOL_ERROR else 0)
                            | (bad_reason if bad_reason < 20 else 0))
    else:
        w.close_after_flush(c, CR_REFUSED)
    return -1


cdef inline uint32_t receive_maximum_in(Worker w) noexcept:
    """The Receive Maximum the server announces in an MQTT 5.0 CONNACK and holds
    each connection to (handle_publish.pyx): max_awaiting_rel, at least 1;
    65,535 (the default, left out of the CONNACK) at 65,535 or more."""
    if w.max_awaiting_rel >= 65535:
        return 65535
    return w.max_awaiting_rel if w.max_awaiting_rel else 1


cdef int send_connack5(Worker w, Conn* c, PendingConnect pc, uint8_t present):
    """The accepting CONNACK of an MQTT 5.0 connection, with what the server
    announces (section 3.2.2.3): only what differs from the standard's
    defaults."""
    cdef uint8_t[1600] props
    cdef uint32_t k = 0
    cdef uint8_t* out
    cdef uint32_t receive_max = receive_maximum_in(w)
    if pc.session_expiry == 0xFFFFFFFF or pc.session_expiry == 0:
        pass        # what the client asked for is used as it is
    if receive_max < 65535:
        k += put_prop_u16(props + k, P_RECEIVE_MAXIMUM, <uint16_t>receive_max)
    # Maximum QoS 2 and Retain Available 1 are the defaults: left out.
    k += put_prop_u32(props + k, P_MAXIMUM_PACKET_SIZE, w.max_packet_size)
    if pc.assigned_id and len(pc.client_id) <= 200:
        k += put_prop_bytes(props + k, P_ASSIGNED_CLIENT_ID, <const uint8_t*>PyBytes_AS_STRING(pc.client_id),
                            <uint32_t>len(pc.client_id))
    c.alias_max_in = w.topic_alias_maximum      # in force for this connection, whatever a reload sets later
    if w.topic_alias_maximum:
        k += put_prop_u16(props + k, P_TOPIC_ALIAS_MAXIMUM, w.topic_alias_maximum)
    # Wildcard Subscription Available and Subscription Identifiers Available: absent is 1.
    if not V5_SHARED_AVAILABLE:
        k += put_prop_u8(props + k, P_SHARED_AVAILABLE, 0)
    if c.v5 & V5_SCRAM:
        k += enhanced_auth_connack_props(w, c, props + k)     # method, server-final (worker/enhanced_auth.pyx)
    out = w.reserve(c, connack5_size(k))
    if out == NULL:
        return -1
    encode_connack5(out, present, RC_SUCCESS, props, k)
    w.counters[PKT_OUT + CONNACK] += 1
    w.counters[MQTT5_CONNECTED] += 1
    return 0


# --- PUBLISH and the acknowledgements ------------------------------------------------

# The topic of the alias the connection w.alias_fd last used (topic_alias_in):
# a publisher that sends one topic under its alias finds it without the table.
cdef uint16_t alias_last = 0           # 0: none
cdef const uint8_t* alias_last_ptr = NULL
cdef uint32_t alias_last_len = 0


cdef int handle_publish5(Worker w, Conn* c, uint8_t first, const uint8_t* body, uint32_t n):
    cdef Publish5Packet p5
    cdef PublishPacket pkt
    cdef int reason = 0
    cdef int rc = decode_publish5(first, body, n, &p5, &reason)
    if rc < 0:
        v5_error(w, c, rc, reason)
        return -1
    if p5.props.present == (1ULL << P_TOPIC_ALIAS) and p5.topic.len == 0 and c.fd == w.alias_fd \
            and p5.props.topic_alias == alias_last and alias_last != 0:
        # The common PUBLISH of a publisher with an alias: the alias alone,
        # the one this connection used last (checked when it was set:
        # topic_alias_in), nothing else: its topic, and a 3.1.1 message.
        pkt.qos = p5.qos
        pkt.retain = p5.retain
        pkt.dup = p5.dup
        pkt.packet_id = p5.packet_id
        pkt.topic.ptr = alias_last_ptr
        pkt.topic.len = alias_last_len
        pkt.payload = p5.payload
        return publish_decoded(w, c, &pkt, NULL, 0)
    return publish5_props(w, c, &p5)


cdef int publish5_props(Worker w, Conn* c, Publish5Packet* pp):
    """handle_publish5 for every PUBLISH but an alias-only one of the
    connection's last alias: a Topic Alias set or looked up, the checks of
    its properties, its properties as the message's extras."""
    cdef Publish5Packet p5 = pp[0]
    cdef PublishPacket pkt
    cdef bytes ext
    if p5.props.present & (1ULL << P_TOPIC_ALIAS) or p5.topic.len == 0:
        if topic_alias_in(w, c, &p5) < 0:
            return -1
    if p5.props.present & (1ULL << P_SUBSCRIPTION_ID):
        # A client's PUBLISH carries no Subscription Identifier (MQTT-3.3.4-6).
        v5_error(w, c, ERR_PROTOCOL, R5_NONE)
        return -1
    if p5.props.present & (1ULL << P_PAYLOAD_FORMAT) and p5.props.payload_format:
        if not valid_utf8(p5.payload.ptr, p5.payload.len):
            return payload_format_invalid(w, c, &p5)
    pkt.qos = p5.qos
    pkt.retain = p5.retain
    pkt.dup = p5.dup
    pkt.packet_id = p5.packet_id
    pkt.topic = p5.topic
    pkt.payload = p5.payload
    if p5.props.raw.len == 0 or p5.props.present == (1ULL << P_TOPIC_ALIAS):
        # Nothing the message carries on (a Topic Alias is one hop's): as a 3.1.1 message.
        return publish_decoded(w, c, &pkt, NULL, 0)
    # Its properties become the message's extras (router.pyx): kept with it wherever it goes.
    ext = ext_from_props(p5.props.raw.ptr, p5.props.raw.len, p5.props.message_expiry,
                         (p5.props.present & (1ULL << P_MESSAGE_EXPIRY)) != 0, 0)
    return publish_decoded(w, c, &pkt, <const uint8_t*>PyBytes_AS_STRING(ext), PyBytes_GET_SIZE(ext))


cdef int payload_format_invalid(Worker w, Conn* c, Publish5Packet* p5):
    """A PUBLISH whose Payload Format Indicator says UTF-8 and whose payload is
    not (section 3.3.2.3.2 lets the receiver check, and say 0x99 Payload format
    invalid): not routed, not retained; a QoS 1/2 one is answered PUBACK or
    PUBREC 0x99 (which ends its flow: MQTT-4.3.3-4) and the connection stays, a
    QoS 0 one, which has no answer, is DISCONNECT 0x99. Counted."""
    w.counters[MQTT5_PAYLOAD_FORMAT_INVALID] += 1
    if p5.qos:
        if p5.qos == 2:
            qos2_forget(&w.sessions[c.session], p5.packet_id)   # a resent one it had taken before
        send_ack5(w, c, PUBACK if p5.qos == 1 else PUBREC, p5.packet_id, RC_PAYLOAD_FORMAT_INVALID)
        return 0 if c.state == ST_CONNECTED else -1
    send_disconnect5(w, c, RC_PAYLOAD_FORMAT_INVALID)
    w.close_after_flush(c, CR_MALFORMED, DETAIL_R5 | DETAIL_PROTOCOL)
    return -1


cdef int topic_alias_in(Worker w, Conn* c, Publish5Packet* p5) except -2:
    """A client's Topic Alias (section 3.3.2.3.4): with a topic, it is set (or
    set again) for the connection; without one, the topic it stands for is
    used (p5.topic then points into the connection's table, which holds it
    while the PUBLISH is handled). An alias of 0 or above the Topic Alias
    Maximum we announced is DISCONNECT 0x94 (MQTT-3.3.2-9); one never set is
    a Protocol Error (0x82). The maximum is the one this connection's CONNACK
    announced (Conn.alias_max_in), which a reload does not change; the table
    is sized by it. 0, or -1 when the connection goes."""
    cdef uint16_t alias = p5.props.topic_alias
    cdef list table
    cdef bytes topic
    global alias_last, alias_last_ptr, alias_last_len
    if not (p5.props.present & (1ULL << P_TOPIC_ALIAS)) or alias == 0 or alias > c.alias_max_in:
        w.counters[MQTT5_PROTOCOL_ERRORS] += 1
        w.counters[MQTT5_TOPIC_ALIAS_INVALID] += 1
        send_disconnect5(w, c, RC_TOPIC_ALIAS_INVALID)
        w.close_after_flush(c, CR_MALFORMED, DETAIL_R5 | DETAIL_PROTOCOL | R5_TOPIC_ALIAS)
        return -1
    if c.fd == w.alias_fd:
        if p5.topic.len == 0 and alias == alias_last:
            # The alias the last PUBLISH of this connection used: its topic is
            # still the table's (a new one for the alias, or another
            # connection's table, clears alias_last).
            p5.topic.ptr = alias_last_ptr
            p5.topic.len = alias_last_len
            return 0
        table = w.alias_table       # the last connection's: most PUBLISHes of a read are one client's
    else:
        table = w.topic_aliases.get(c.fd)
        w.alias_fd = c.fd           # (Worker.release sets it to -1 when this connection goes)
        w.alias_table = table
        alias_last = 0
    if p5.topic.len:
        if table is None:
            table = [None] * (c.alias_max_in + 1)
            w.topic_aliases[c.fd] = table
            w.alias_table = table
        table[alias] = PyBytes_FromStringAndSize(<const char*>p5.topic.ptr, p5.topic.len)
        alias_last = 0
        w.counters[MQTT5_TOPIC_ALIASES_SET] += 1
        return 0
    topic = <bytes>table[alias] if table is not None and alias < len(table) else None
    if topic is None:
        w.counters[MQTT5_TOPIC_ALIAS_INVALID] += 1
        v5_error(w, c, ERR_PROTOCOL, R5_TOPIC_ALIAS)
        return -1
    p5.topic.ptr = <const uint8_t*>PyBytes_AS_STRING(topic)
    p5.topic.len = <uint32_t>PyBytes_GET_SIZE(topic)
    alias_last = alias          # the table holds topic: the pointer stays valid until the entry is set again
    alias_last_ptr = p5.topic.ptr
    alias_last_len = p5.topic.len
    return 0


cdef const char* reason_text5(uint8_t reason_code) noexcept nogil:
    """The Reason String the server gives with a reason code (NULL: none)."""
    if reason_code == RC_MALFORMED:
        return "malformed packet"
    if reason_code == RC_PROTOCOL_ERROR:
        return "protocol error"
    if reason_code == RC_IMPLEMENTATION_ERROR:
        return "server error"
    if reason_code == RC_NOT_AUTHORIZED:
        return "not authorized by the ACL"
    if reason_code == RC_SERVER_SHUTTING_DOWN:
        return "server shutting down"
    if reason_code == RC_KEEP_ALIVE_TIMEOUT:
        return "keep alive timeout"
    if reason_code == RC_SESSION_TAKEN_OVER:
        return "session taken over by another connection"
    if reason_code == RC_RECEIVE_MAXIMUM_EXCEEDED:
        return "max_awaiting_rel QoS 2 messages await PUBREL"
    if reason_code == RC_TOPIC_ALIAS_INVALID:
        return "topic alias 0 or over the maximum announced"
    if reason_code == RC_PACKET_TOO_LARGE:
        return "packet larger than max_packet_size"
    if reason_code == RC_QUOTA_EXCEEDED:
        return "quota exceeded"
    if reason_code == RC_ADMINISTRATIVE_ACTION:
        return "administrative action"
    if reason_code == RC_PAYLOAD_FORMAT_INVALID:
        return "payload not UTF-8 as its Payload Format Indicator says"
    return NULL


cdef uint32_t put_reason5(Conn* c, uint8_t* props, uint8_t reason_code, uint32_t packet_size,
                          bint any_packet) noexcept nogil:
    """Writes the Reason String for reason_code into props (room: 64 bytes)
    when the client may get it: on a packet other than PUBLISH, CONNACK and
    DISCONNECT (any_packet) only if it did not set Request Problem Information
    to 0 (MQTT-3.1.2-29), and never past its Maximum Packet Size with it
    (MQTT-3.2.2-19 and the like: packet_size is the packet without it)."""
    cdef const char* text = reason_text5(reason_code)
    cdef uint32_t n
    if text == NULL or (any_packet and c.v5 & V5_NO_PROBLEM_INFO):
        return 0
    n = <uint32_t>strlen(text)
    if c.max_packet_out and packet_size + n + 5 > c.max_packet_out:
        return 0
    return put_prop_bytes(props, P_REASON_STRING, <const uint8_t*>text, n)


cdef int send_ack5(Worker w, Conn* c, uint8_t ptype, uint16_t pid, uint8_t reason_code):
    """PUBACK, PUBREC, PUBREL or PUBCOMP with a reason code (a Reason String
    with it when the client may get one)."""
    cdef uint8_t[64] props
    cdef uint32_t k = put_reason5(c, props, reason_code, ack5_size(reason_code, 0) + 1, True)
    cdef uint8_t* out = w.reserve(c, ack5_size(reason_code, k))
    if out == NULL:
        return -1
    encode_ack5(out, ptype, pid, reason_code, props, k)
    w.counters[PKT_OUT + ptype] += 1
    return 0


cdef int handle_ack5(Worker w, Conn* c, uint8_t ptype, const uint8_t* body, uint32_t n):
    cdef Ack5Packet a
    cdef int reason = 0
    cdef int rc = decode_ack5(ptype, body, n, &a, &reason)
    cdef Session* s = &w.sessions[c.session]
    cdef uint32_t i
    cdef Inflight* e
    if rc < 0:
        v5_error(w, c, rc, reason)
        return -1
    if ptype == PUBREL:
        if not qos2_forget(s, a.packet_id):
            # Not a QoS 2 message this session holds (3.7.2.1: 0x92 Packet
            # Identifier not found; no error, the client's state differs).
            return send_ack5(w, c, PUBCOMP, a.packet_id, RC_PACKET_ID_NOT_FOUND)
        session_changed(w, s)
        return w.send_ack(c, PUBCOMP, a.packet_id)
    if ptype == PUBREC and a.reason_code >= 0x80:
        # The subscriber refused the message: its QoS 2 flow ends here, no PUBREL
        # (MQTT-4.3.3-4, section 4.9).
        session_changed(w, s)
        s.last_ack_ms = w.now_ms
        s.stalled = 0
        for i in range(s.ninflight):
            e = &s.inflight[i]
            if e.packet_id == a.packet_id and e.qos == 2 and e.state == IF_PUBLISHED:
                if e.held:
                    s.nheld -= 1
                msg_release(e.msg)
                memmove(e, e + 1, (s.ninflight - i - 1) * sizeof(Inflight))
                s.ninflight -= 1
                session_pump(w, s)
                break
        return 0 if c.state == ST_CONNECTED else -1
    return session_acked(w, s, ptype, a.packet_id)


# --- SUBSCRIBE, UNSUBSCRIBE ----------------------------------------------------------

cdef bytes body311(const uint8_t* body, uint32_t n, bint subscribe, Entry5Iter* it, int* rc, int* reason,
                   bytearray options_out=None, uint32_t* subid=NULL):
    """The entries of a valid MQTT 5.0 SUBSCRIBE or UNSUBSCRIBE as a 3.1.1 body
    (packet id, then each filter with its QoS), what handle_subscribe and
    handle_unsubscribe read. None with *rc set when the packet is refused.
    A SUBSCRIBE's whole options byte of each entry is appended to
    options_out, its Subscription Identifier put in *subid (0: none)."""
    cdef Props5 props
    cdef Slice filt
    cdef uint8_t options
    cdef int r
    cdef bytearray out
    rc[0] = entries5_begin(SUBSCRIBE if subscribe else UNSUBSCRIBE, body, n, it, &props, reason)
    if rc[0] < 0:
        return None
    if subscribe and props.present & (1ULL << P_SUBSCRIPTION_ID):
        # 1..268,435,455 (0 is the codec's Protocol Error): kept with each of
        # the packet's subscriptions (handle_subscribe, subopts.pyx).
        if subid != NULL:
            subid[0] = props.subscription_id
    out = bytearray(2)
    out[0] = it.packet_id >> 8
    out[1] = it.packet_id & 0xFF
    while True:
        if subscribe:
            r = subscribe5_next(it, &filt, &options, reason)
        else:
            r = unsubscribe5_next(it, &filt, reason)
        if r == 0:
            break
        if r < 0:
            rc[0] = r
            return None
        out.append(filt.len >> 8)
        out.append(filt.len & 0xFF)
        out += PyBytes_FromStringAndSize(<char*>filt.ptr, filt.len)
        if subscribe:
            out.append(options & 3)
            if options_out is not None:
                options_out.append(options)     # No Local, Retain As Published, Retain Handling
    return bytes(out)


cdef int handle_subscribe5(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    cdef Entry5Iter it
    cdef int rc = 0, reason = 0
    cdef bytearray options = bytearray()
    cdef uint32_t subid = 0
    cdef bytes b = body311(body, n, True, &it, &rc, &reason, options, &subid)
    if b is None:
        v5_error(w, c, rc, reason)
        return -1
    # handle_subscribe reads each entry's options and the identifier here (subopts.pyx).
    w.sub5_options = bytes(options)
    w.sub5_subid = subid
    try:
        return handle_subscribe(w, c, <const uint8_t*>PyBytes_AS_STRING(b), <uint32_t>len(b))
    finally:
        w.sub5_options = None
        w.sub5_subid = 0


cdef int handle_unsubscribe5(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    cdef Entry5Iter it
    cdef int rc = 0, reason = 0
    cdef bytes b = body311(body, n, False, &it, &rc, &reason)
    if b is None:
        v5_error(w, c, rc, reason)
        return -1
    return handle_unsubscribe(w, c, <const uint8_t*>PyBytes_AS_STRING(b), <uint32_t>len(b))


cdef int unsubscribe5_answer(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    """handle_unsubscribe for an MQTT 5.0 connection (body: the 3.1.1 form,
    validated): each filter removed, the UNSUBACK with 0x00, or 0x11 No
    subscription existed."""
    cdef EntryIter it
    cdef Slice filt
    cdef int reason = 0, r
    cdef uint32_t count = 0, before
    cdef bytearray codes = bytearray()
    unsubscribe_begin(body, n, &it, &reason)
    while unsubscribe_next(&it, &filt, &reason) == 1:
        before = subscriber_count(w, c.session)
        r = topics_unsubscribe(w.index, filt.ptr, filt.len, c.session)
        if r == 1:
            channel_broadcast(w, FR_SUB_DEL, 0, filt.ptr, filt.len, NULL, 0)
        codes.append(RC_SUCCESS if subscriber_count(w, c.session) < before else RC_NO_SUBSCRIPTION_EXISTED)
        count += 1
    return send_codes5(w, c, UNSUBACK, it.packet_id, <const uint8_t*><char*>codes, count)


cdef int send_codes5(Worker w, Conn* c, uint8_t ptype, uint16_t pid, const uint8_t* codes, uint32_t count):
    """SUBACK or UNSUBACK of an MQTT 5.0 connection: a reason code per filter."""
    cdef uint8_t* out = w.reserve(c, codes5_size(count, 0))
    if out == NULL:
        return -1
    encode_codes5(out, ptype, pid, NULL, 0, codes, count)
    w.counters[PKT_OUT + ptype] += 1
    return 0


cdef bytes suback5_bytes(uint16_t pid, const uint8_t* codes, uint32_t count):
    cdef bytes b = PyBytes_FromStringAndSize(NULL, codes5_size(count, 0))
    encode_codes5(<uint8_t*>PyBytes_AS_STRING(b), SUBACK, pid, NULL, 0, codes, count)
    return b


# --- DISCONNECT both ways --------------------------------------------------------------

cdef inline bint client_disconnect_code(uint8_t code) noexcept nogil:
    """A DISCONNECT reason code of 0x80 or more a client may send (3.14.2.1:
    those "Sent by" the Client, or Client or Server); the codec has checked
    the code is a DISCONNECT's at all."""
    return (0x80 <= code <= 0x83) or code == 0x90 or (0x93 <= code <= 0x99)


cdef int handle_disconnect5(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    cdef Ack5Packet a
    cdef int reason = 0
    cdef int rc = decode_disconnect5(DISCONNECT, body, n, &a, &reason)
    cdef Session* s
    cdef uint32_t expiry
    if rc < 0:
        v5_error(w, c, rc, reason)
        return -1
    if a.reason_code >= 0x80 and not client_disconnect_code(a.reason_code):
        # A code only the server sends (3.14.2.1's table, "Sent by": 0x87,
        # 0x89, 0x8B..0x8F, 0x9A..0xA2): the client broke MQTT-3.14.2-1.
        v5_error(w, c, ERR_PROTOCOL, R5_REASON_CODE)
        return -1
    if a.props.present & (1ULL << P_SESSION_EXPIRY):
        expiry = a.props.session_expiry
        if expiry != 0 and c.v5 & V5_EXPIRY_ZERO:
            # From 0 in the CONNECT to non-zero: a Protocol Error (MQTT-3.14.2-2).
            v5_error(w, c, ERR_PROTOCOL, R5_NONE)
            return -1
        if c.session >= 0:
            s = &w.sessions[c.session]
            s.expiry_s = expiry
            # Marked before it may become clean: from non-zero to 0, the session
            # saved in data_dir must go (session_changed skips clean ones).
            s.dirty = 1
            w.sessions_changed = True
            s.clean = expiry == 0
    # 0x04 Disconnect with Will Message: the will goes out as if the connection
    # had dropped (section 3.14.2.1); any other code discards it (MQTT-3.14.4-3).
    w.close_conn(c, CR_CLIENT if a.reason_code == RC_DISCONNECT_WITH_WILL else CR_DISCONNECT)
    return -1


cdef int send_disconnect5(Worker w, Conn* c, uint8_t reason_code):
    """A DISCONNECT from the server, the last packet written to c (V5_GOODBYE),
    counted by reason code."""
    cdef uint8_t* out
    cdef int slot
    cdef uint8_t[64] props
    cdef uint32_t k
    if c.v5 & V5_GOODBYE:
        return -1
    k = put_reason5(c, props, reason_code, disconnect5_size(reason_code, 0) + 1, False)
    c.v5 |= V5_GOODBYE
    out = w.reserve(c, disconnect5_size(reason_code, k))
    if out == NULL:
        return -1
    encode_disconnect5(out, DISCONNECT, reason_code, props, k)
    w.counters[PKT_OUT + DISCONNECT] += 1
    if reason_code == RC_MALFORMED:
        slot = DISC5_MALFORMED
    elif reason_code == RC_PROTOCOL_ERROR:
        slot = DISC5_PROTOCOL_ERROR
    elif reason_code == RC_SERVER_SHUTTING_DOWN:
        slot = DISC5_SHUTTING_DOWN
    elif reason_code == RC_KEEP_ALIVE_TIMEOUT:
        slot = DISC5_KEEP_ALIVE_TIMEOUT
    elif reason_code == RC_SESSION_TAKEN_OVER:
        slot = DISC5_TAKEN_OVER
    elif reason_code == RC_PACKET_TOO_LARGE:
        slot = DISC5_PACKET_TOO_LARGE
    elif reason_code == RC_QUOTA_EXCEEDED:
        slot = DISC5_QUOTA_EXCEEDED
    elif reason_code == RC_ADMINISTRATIVE_ACTION:
        slot = DISC5_ADMINISTRATIVE
    elif reason_code == RC_RECEIVE_MAXIMUM_EXCEEDED:
        slot = DISC5_RECEIVE_MAXIMUM
    else:
        slot = DISC5_OTHER
    w.counters[MQTT5_DISCONNECTS + slot] += 1
    return 0


cdef bint v5_goodbye(Worker w, Conn* c, int reason, int detail):
    """Worker.close_conn and close_after_flush, for a connected MQTT 5.0 client:
    the DISCONNECT saying why the server closes (section 3.14, MQTT-4.13.2-1),
    when the close is the server's. True when one was written (the caller then
    closes after the flush)."""
    cdef uint8_t code
    if c.v5 & V5_GOODBYE or c.state != ST_CONNECTED:
        return False
    if w.draining:
        code = RC_SERVER_SHUTTING_DOWN
    elif reason == CR_TIMEOUT:
        code = RC_KEEP_ALIVE_TIMEOUT
    elif reason == CR_TAKEOVER:
        code = RC_SESSION_TAKEN_OVER
    elif reason == CR_TOO_LARGE:
        code = RC_PACKET_TOO_LARGE
    elif reason == CR_MALFORMED:
        # The 3.1.1 handlers' findings on a v5 connection: a wrong kind of
        # acknowledgement, a server's packet, a protocol violation (MQTT-4.8.0-1).
        code = (RC_PROTOCOL_ERROR if detail == MAL_ACK or detail == MAL_SERVER_PACKET or detail == MAL_PROTOCOL
                else RC_MALFORMED)
    elif reason == CR_LIMIT:
        code = RC_RECEIVE_MAXIMUM_EXCEEDED if detail == LIM_AWAITING_REL else RC_QUOTA_EXCEEDED
    elif reason == CR_WAL:
        code = RC_QUOTA_EXCEEDED        # the log takes no more: the publisher sends again later
    elif reason == CR_ACL or reason == CR_REFUSED:
        code = RC_ADMINISTRATIVE_ACTION
    elif reason == CR_SERVER or reason == CR_INTERNAL:
        code = RC_IMPLEMENTATION_ERROR
    else:
        # The client's own close (CR_CLIENT, CR_DISCONNECT), a socket or TLS
        # error, an outbound buffer past max_outbound: nothing is sent.
        return False
    return send_disconnect5(w, c, code) == 0


# --- PUBLISH to a subscriber, in its version ----------------------------------------

cdef inline uint32_t encoded_publish_size(Conn* c, uint32_t topic_len, uint32_t payload_len,
                                          uint8_t qos) noexcept nogil:
    if c.version == 5:
        return publish5_size(topic_len, 0, payload_len, qos)
    return publish_size(topic_len, payload_len, qos)


cdef inline void encode_publish_for(Conn* c, uint8_t* out, const uint8_t* topic, uint32_t topic_len,
                                    const uint8_t* payload, uint32_t payload_len, uint8_t qos, uint8_t retain,
                                    uint8_t dup, uint16_t packet_id) noexcept nogil:
    """A PUBLISH for c: MQTT 5.0 (no properties yet) or 3.1.1."""
    if c.version == 5:
        encode_publish5(out, topic, topic_len, NULL, 0, payload, payload_len, qos, retain, dup, packet_id)
    else:
        encode_publish(out, topic, topic_len, payload, payload_len, qos, retain, dup, packet_id)


# --- Topic Aliases toward a client (section 3.3.2.3.4) --------------------------------
#
# A client whose CONNECT gives a Topic Alias Maximum gets aliases for the topics
# the server sends it, at most min(its maximum, topic_alias_maximum_out)
# (Conn.alias_max_out). The first distinct topics sent to the connection (up to
# ALIAS_OUT_TOPIC_MAX bytes each) get one, in order, and keep it for the
# connection's life: its first PUBLISH carries the topic and the alias, later
# ones an empty topic and the alias. No alias is ever given again to another
# topic, so a full table costs nothing more and a stream of ever new topics
# never rewrites it. Aliases belong to the network connection (MQTT-3.3.2-7):
# the table goes with the Conn (release), a resumed session's messages sent
# again with DUP start a new one.
#
# Writing a PUBLISH takes three steps around the encoder: alias_out_pick
# chooses (Conn.alias_pick), publish_out_size and publish_out_encode read the
# choice (alias_topic_len, alias_prop_len, alias_prop_put), and alias_out_sent,
# once the bytes are written, records a new alias and counts. A PUBLISH not
# written (too large for the client, no room) only clears the choice: the
# client never learns an alias the table does not hold.

cdef inline uint64_t alias_hash(const uint8_t* topic, uint32_t n) noexcept nogil:
    """FNV-1a, 64 bits: a quick filter before the bytes are compared."""
    cdef uint64_t h = 14695981039346656037ULL
    cdef uint32_t i
    for i in range(n):
        h = (h ^ topic[i]) * 1099511628211ULL
    return h


cdef void alias_out_pick(Conn* c, const uint8_t* topic, uint32_t topic_len) noexcept nogil:
    """The alias for a PUBLISH of `topic` to c (Conn.alias_pick): the one it
    has, a new one with ALIAS_PICK_NEW while the table has room, else 0."""
    cdef uint64_t h
    cdef uint32_t i
    cdef AliasOut* a
    c.alias_pick = 0
    if c.alias_max_out == 0 or topic_len == 0 or topic_len > ALIAS_OUT_TOPIC_MAX:
        return
    h = alias_hash(topic, topic_len)
    for i in range(c.alias_used):
        a = &c.alias_out[i]
        if a.hash == h and a.topic_len == topic_len and memcmp(a.topic, topic, topic_len) == 0:
            c.alias_pick = i + 1
            return
    if c.alias_used < c.alias_max_out:
        c.alias_pick = (<uint32_t>c.alias_used + 1) | ALIAS_PICK_NEW


cdef inline uint32_t alias_topic_len(Conn* c, uint32_t topic_len) noexcept nogil:
    """The topic's length in the PUBLISH: 0 when the client holds the alias."""
    if c.alias_pick and not (c.alias_pick & ALIAS_PICK_NEW):
        return 0
    return topic_len


cdef inline uint32_t alias_prop_len(Conn* c) noexcept nogil:
    """The Topic Alias property's bytes in the PUBLISH (0 or 3)."""
    return 3 if c.alias_pick else 0


cdef inline uint32_t alias_prop_put(Conn* c, uint8_t* out) noexcept nogil:
    """Writes the Topic Alias property of the choice; its length."""
    if c.alias_pick == 0:
        return 0
    return put_prop_u16(out, P_TOPIC_ALIAS, <uint16_t>(c.alias_pick & 0xFFFF))


cdef void alias_out_sent(Worker w, Conn* c, const uint8_t* topic, uint32_t topic_len) noexcept:
    """The PUBLISH of the choice is written: a new alias joins the table (a
    copy of its topic), counted; the choice is cleared. Out of memory the
    alias is not recorded: the topic is sent in full again, the same alias
    number given to the next topic (the client takes the new mapping)."""
    cdef uint32_t pick = c.alias_pick
    cdef AliasOut* a
    cdef uint8_t* copy
    c.alias_pick = 0
    if pick == 0:
        return
    if not (pick & ALIAS_PICK_NEW):
        w.counters[MQTT5_TOPIC_ALIAS_OUT_HITS] += 1
        return
    if c.alias_out == NULL:
        c.alias_out = <AliasOut*>calloc(c.alias_max_out, sizeof(AliasOut))
        if c.alias_out == NULL:
            return
    copy = <uint8_t*>malloc(topic_len)
    if copy == NULL:
        return
    memcpy(copy, topic, topic_len)
    a = &c.alias_out[c.alias_used]
    a.hash = alias_hash(topic, topic_len)
    a.topic = copy
    a.topic_len = topic_len
    c.alias_used += 1
    w.counters[MQTT5_TOPIC_ALIASES_OUT] += 1


cdef void alias_out_free(Conn* c) noexcept nogil:
    """The connection's aliases end with it (Worker.release)."""
    cdef uint32_t i
    if c.alias_out != NULL:
        for i in range(c.alias_used):
            free(c.alias_out[i].topic)
        free(c.alias_out)
    c.alias_out = NULL
    c.alias_used = 0
    c.alias_pick = 0
