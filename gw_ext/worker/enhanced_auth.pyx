# Included by loop.pyx. MQTT 5.0 enhanced authentication (section 4.12): the
# AUTH packet exchange, with one method, SCRAM-SHA-512 (gw/scram.py), run
# against the password file's `$7$` entries, and re-authentication.
#
# - CONNECT with Authentication Method "SCRAM-SHA-512" and the client-first
#   message as Authentication Data (handle_connect5, worker/mqtt5.pyx, calls
#   enhanced_auth_start instead of auth_connect): the server answers AUTH 0x18
#   (Continue authentication) with the server-first message, and holds the
#   CONNECT (its PendingConnect) in Worker.scram_states, the connection
#   ST_AWAIT_CONNECT with V5_AUTHING. Its connect timeout still runs: it
#   covers the whole exchange. Read meanwhile: AUTH 0x18 with the same method
#   and the client-final message (enhanced_auth_pending), or DISCONNECT (the
#   client gives up); anything else is a Protocol Error (CONNACK 0x82).
# - The proof holds: the CONNECT goes on as a password login's would
#   (connect_claim, the ACL and the session owner are the SCRAM user name),
#   and the accepting CONNACK carries the method and the server-final message
#   (send_connack5 asks enhanced_auth_connack_props). It does not: CONNACK
#   0x86 (auth_refuse, counted as a bad password), for an unknown user and a
#   user whose entry is not `$7$` alike; a SCRAM message that does not parse
#   or does not belong to the exchange: CONNACK 0x87.
# - Another method, or SCRAM without a password file (or on a listener whose
#   certificate's CN is the user name): CONNACK 0x8C.
# - Re-authentication (section 4.12.1), once connected by SCRAM (V5_SCRAM):
#   AUTH 0x19 with a new client-first message, against the password file in
#   force now (a reload that failed left the previous one in force), for the
#   connection's user only; AUTH 0x18 with the server-first; AUTH 0x18 with
#   the client-final; AUTH 0x00 with the server-final, or DISCONNECT 0x87 and
#   close. Other packets go on being handled meanwhile (V5_REAUTHING).
# - AUTH from a client that did not authenticate with a method in its
#   CONNECT, with another method than its CONNECT's, a reason code out of
#   turn (0x19 during an exchange, 0x18 outside one, 0x00 ever from a
#   client): Protocol Error (DISCONNECT 0x82, or CONNACK 0x82 before the
#   CONNACK).
# - Sizes: the codec checks every property's length; gw/scram.py refuses a
#   SCRAM message over scram.MAX_MESSAGE (1,024) bytes. A Python exception in
#   here closes that connection only (Worker.contained, as for any handler).

from gw_ext.codec5 cimport P_AUTH_DATA, R5_AUTHENTICATION
from gw.scram import ScramError, start as scram_start

cdef enum:
    # More Conn.v5 flags (worker/mqtt5.pyx has 1, 2, 4).
    V5_AUTHING = 8            # its CONNECT is held for the AUTH exchange (before CONNACK)
    V5_SCRAM = 16             # authenticated by SCRAM-SHA-512: may re-authenticate
    V5_REAUTHING = 32         # a re-authentication's exchange is under way

cdef enum:
    AUTH_PROPS_ROOM = 4096    # an AUTH's properties: the method, a server-first (its client's nonce is
                              # within a client-first of at most gw/scram.py's MAX_MESSAGE, 1,024 bytes)
    RC_CONTINUE_AUTHENTICATION = 0x18
    RC_REAUTHENTICATE = 0x19

cdef bytes SCRAM_METHOD = b"SCRAM-SHA-512"


cdef class ScramState:
    """A connection's SCRAM state (Worker.scram_states, by fd)."""
    cdef uint32_t gen
    cdef object exchange            # gw.scram.ScramExchange under way, or None
    cdef PendingConnect pc          # the CONNECT held (before CONNACK), or None
    cdef bytes final                # server-final for the CONNACK to carry, or None
    cdef bytes user                 # who it authenticated as


cdef ScramState scram_state(Worker w, Conn* c):
    cdef ScramState st = w.scram_states.get(c.fd)
    if st is not None and st.gen != c.gen:
        return None
    return st


cdef void enhanced_auth_forget(Worker w, Conn* c):
    """release: the connection's SCRAM state goes with it."""
    if c.v5 & (V5_AUTHING | V5_SCRAM | V5_REAUTHING):
        w.scram_states.pop(c.fd, None)


cdef bint method_is_scram(Props5* props) noexcept:
    return (props.auth_method.len == 13
            and memcmp(props.auth_method.ptr, <const char*>SCRAM_METHOD, 13) == 0)


cdef bint enhanced_auth_supported(Worker w, Conn* c, Props5* props):
    """Whether the CONNECT's Authentication Method is one this server runs
    here; if not, counted (the caller answers CONNACK 0x8C)."""
    if (method_is_scram(props) and w.authenticator is not None
            and not (w.listeners[c.listener].identity_username and c.ssl != NULL)):
        return True
    w.counters[AUTH_METHOD_UNSUPPORTED] += 1
    return False


cdef bytes auth_data(Props5* props):
    if not (props.present & (1ULL << P_AUTH_DATA)):
        return b""
    return PyBytes_FromStringAndSize(<char*>props.auth_data.ptr, props.auth_data.len)


cdef int send_auth5(Worker w, Conn* c, uint8_t reason_code, bytes data):
    """An AUTH with the method and `data` as Authentication Data. 0, or -1
    if the connection was closed."""
    cdef uint8_t[AUTH_PROPS_ROOM] props
    cdef uint32_t k = 0
    cdef uint8_t* out
    if len(data) > AUTH_PROPS_ROOM - 32:
        # A server-first past the room: a client nonce near the message limit
        # and a password file's salt that long. Not this client's to get.
        w.log_client(CR_AUTH_PASSWORD, c.fd, "closed a connection: its SCRAM answer would be too long")
        w.close_conn(c, CR_SERVER)
        return -1
    k += put_prop_bytes(props + k, P_AUTH_METHOD, <const uint8_t*>PyBytes_AS_STRING(SCRAM_METHOD), 13)
    k += put_prop_bytes(props + k, P_AUTH_DATA, <const uint8_t*>PyBytes_AS_STRING(data), <uint32_t>len(data))
    if c.max_packet_out and disconnect5_size(reason_code, k) > c.max_packet_out:
        # The client's Maximum Packet Size cannot take the exchange (MQTT-3.1.2-24).
        w.close_conn(c, CR_TOO_LARGE)
        return -1
    out = w.reserve(c, disconnect5_size(reason_code, k))
    if out == NULL:
        return -1
    encode_disconnect5(out, AUTH, reason_code, props, k)
    w.counters[PKT_OUT + AUTH] += 1
    return 0


cdef int enhanced_auth_start(Worker w, Conn* c, PendingConnect pc, Props5* props):
    """The CONNECT's SCRAM client-first: AUTH 0x18 with the server-first, the
    CONNECT held. 0: held; -1: refused (answered, closing)."""
    cdef ScramState st
    try:
        exchange = scram_start(w.authenticator, auth_data(props))
    except ScramError as exc:
        return enhanced_auth_fail(w, c, RC_NOT_AUTHORIZED, str(exc))
    if pc.username is not None and pc.username != exchange.user:
        # The CONNECT's User Name names someone else than the SCRAM user name.
        return enhanced_auth_fail(w, c, RC_BAD_USER_OR_PASSWORD, "")
    pc.username = exchange.user
    st = ScramState.__new__(ScramState)
    st.gen = c.gen
    st.exchange = exchange
    st.pc = pc
    st.user = exchange.user
    if send_auth5(w, c, RC_CONTINUE_AUTHENTICATION, exchange.server_first_message()) < 0:
        return -1
    w.scram_states[c.fd] = st
    c.v5 |= V5_AUTHING
    return 0


cdef int enhanced_auth_fail(Worker w, Conn* c, uint8_t code, str why):
    """A SCRAM login refused: CONNACK `code` (0x86 as for a bad password,
    0x87 for a SCRAM message out of place), counted; -1."""
    w.counters[AUTH_SCRAM_FAILED] += 1
    c.v5 &= ~V5_AUTHING
    w.scram_states.pop(c.fd, None)
    if code == RC_BAD_USER_OR_PASSWORD:
        auth_refuse(w, c, CONNACK_BAD_AUTH, AUTH_LOG_PASSWORD)      # auth.pyx: counted, logged, 0x86
        return -1
    w.log_client(CR_AUTH_PASSWORD, c.fd, "refused a SCRAM-SHA-512 CONNECT: " + why)
    return refuse_connect5(w, c, code, -1)


cdef int auth_protocol_error(Worker w, Conn* c, int rc, int reason):
    """A Malformed Packet or Protocol Error in the exchange: before the
    CONNACK a CONNACK 0x81/0x82, after it DISCONNECT (v5_error); -1."""
    if c.state != ST_CONNECTED:
        if 1 <= reason <= 19:
            w.counters[MQTT5_BAD_PACKETS + reason - 1] += 1
        w.counters[MQTT5_MALFORMED if rc == ERR_MALFORMED else MQTT5_PROTOCOL_ERRORS] += 1
        c.v5 &= ~V5_AUTHING
        w.scram_states.pop(c.fd, None)
        return refuse_connect5(w, c, RC_MALFORMED if rc == ERR_MALFORMED else RC_PROTOCOL_ERROR,
                               reason if reason > 0 else R5_NONE)
    v5_error(w, c, rc, reason)
    return -1


cdef int enhanced_auth_pending(Worker w, Conn* c, uint8_t ptype, const uint8_t* body, uint32_t n):
    """A packet of a connection whose CONNECT is held for its exchange
    (V5_AUTHING): AUTH 0x18 with the client-final, or DISCONNECT."""
    cdef Ack5Packet pkt
    cdef int reason = 0
    cdef int rc
    cdef ScramState st
    if ptype == DISCONNECT:
        c.v5 &= ~V5_AUTHING
        w.scram_states.pop(c.fd, None)
        w.close_conn(c, CR_DISCONNECT)
        return -1
    if ptype != AUTH:
        return auth_protocol_error(w, c, ERR_PROTOCOL, R5_NONE)     # MQTT-4.12.0-... only AUTH until CONNACK
    rc = decode_disconnect5(AUTH, body, n, &pkt, &reason)
    if rc < 0:
        return auth_protocol_error(w, c, rc, reason)
    if (pkt.reason_code != RC_CONTINUE_AUTHENTICATION or not (pkt.props.present & (1ULL << P_AUTH_METHOD))
            or not method_is_scram(&pkt.props)):
        # Another method than the CONNECT's (MQTT-4.12.0-5), or a reason code out of turn.
        return auth_protocol_error(w, c, ERR_PROTOCOL, R5_AUTHENTICATION)
    st = scram_state(w, c)
    if st is None or st.exchange is None or st.pc is None:
        return auth_protocol_error(w, c, ERR_PROTOCOL, R5_AUTHENTICATION)
    try:
        final = st.exchange.finish(auth_data(&pkt.props))
    except ScramError as exc:
        return enhanced_auth_fail(w, c, RC_NOT_AUTHORIZED, str(exc))
    if final is None:
        if st.exchange.other_kind:
            # The operator's hint (the client is told 0x86 as for any bad password).
            w.log_client(CR_AUTH_PASSWORD, c.fd, "refused a SCRAM-SHA-512 CONNECT: user %r has a $%s$ entry, "
                         "not $7$: it logs in with its password" % (st.user, st.exchange.other_kind))
        return enhanced_auth_fail(w, c, RC_BAD_USER_OR_PASSWORD, "")
    w.counters[AUTH_SCRAM_OK] += 1
    c.v5 = (c.v5 & ~V5_AUTHING) | V5_SCRAM
    pc = st.pc
    st.pc = None
    st.exchange = None
    st.final = final
    return connect_claim(w, c, pc)      # registry.pyx; the CONNACK carries st.final


cdef uint32_t enhanced_auth_connack_props(Worker w, Conn* c, uint8_t* props) except? 0:
    """The accepting CONNACK's Authentication Method and Data (server-final)
    for a SCRAM login (at most 13 + 3 + 2 + 1,024 + 3 bytes); 0 for others."""
    cdef ScramState st
    cdef uint32_t k = 0
    if not (c.v5 & V5_SCRAM):
        return 0
    st = scram_state(w, c)
    if st is None or st.final is None:
        return 0
    final = st.final
    st.final = None
    k += put_prop_bytes(props + k, P_AUTH_METHOD, <const uint8_t*>PyBytes_AS_STRING(SCRAM_METHOD), 13)
    k += put_prop_bytes(props + k, P_AUTH_DATA, <const uint8_t*>PyBytes_AS_STRING(final), <uint32_t>len(final))
    return k


cdef int handle_auth5(Worker w, Conn* c, const uint8_t* body, uint32_t n):
    """AUTH from a connected client: re-authentication (section 4.12.1)."""
    cdef Ack5Packet pkt
    cdef int reason = 0
    cdef int rc
    cdef ScramState st
    rc = decode_disconnect5(AUTH, body, n, &pkt, &reason)
    if rc < 0:
        v5_error(w, c, rc, reason)
        return -1
    st = scram_state(w, c) if c.v5 & V5_SCRAM else None
    if (st is None or not (pkt.props.present & (1ULL << P_AUTH_METHOD)) or not method_is_scram(&pkt.props)):
        # No method in its CONNECT (MQTT-4.12.0-7 for the server's side, 4.12.1: the
        # same method as the CONNECT's), or another one.
        v5_error(w, c, ERR_PROTOCOL, R5_AUTHENTICATION)
        return -1
    if pkt.reason_code == RC_REAUTHENTICATE and not (c.v5 & V5_REAUTHING):
        try:
            exchange = scram_start(w.authenticator, auth_data(&pkt.props))
        except ScramError as exc:
            return reauth_fail(w, c, str(exc))
        if exchange.user != st.user:
            return reauth_fail(w, c, "another user name than the connection's")
        if send_auth5(w, c, RC_CONTINUE_AUTHENTICATION, exchange.server_first_message()) < 0:
            return -1
        st.exchange = exchange
        c.v5 |= V5_REAUTHING
        return 0
    if pkt.reason_code == RC_CONTINUE_AUTHENTICATION and (c.v5 & V5_REAUTHING):
        exchange = st.exchange
        st.exchange = None
        c.v5 &= ~V5_REAUTHING
        try:
            final = exchange.finish(auth_data(&pkt.props))
        except ScramError as exc:
            return reauth_fail(w, c, str(exc))
        if final is None:
            return reauth_fail(w, c, "bad proof (wrong password, or the user is gone or not $7$)")
        if send_auth5(w, c, RC_SUCCESS, final) < 0:
            return -1
        w.counters[AUTH_REAUTH_OK] += 1
        return 0
    # 0x19 during an exchange, 0x18 outside one, 0x00 (only a server sends it).
    v5_error(w, c, ERR_PROTOCOL, R5_AUTHENTICATION)
    return -1


cdef int reauth_fail(Worker w, Conn* c, str why):
    """A re-authentication that failed: DISCONNECT 0x87, closed (MQTT-4.12.1-2)."""
    w.counters[AUTH_REAUTH_FAILED] += 1
    w.counters[AUTH_REFUSED_PASSWORD] += 1
    c.v5 &= ~V5_REAUTHING
    w.log_client(CR_AUTH_PASSWORD, c.fd, "closed a connection: its SCRAM-SHA-512 re-authentication failed: " + why)
    send_disconnect5(w, c, RC_NOT_AUTHORIZED)
    w.close_after_flush(c, CR_AUTH_PASSWORD)
    return -1
