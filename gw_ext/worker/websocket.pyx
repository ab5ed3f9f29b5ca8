# Included by loop.pyx. MQTT over WebSocket (RFC 6455; MQTT 3.1.1 section 6),
# the ws and wss listeners: a layer between the socket (or TLS) and the MQTT
# framing, so everything above it (sessions, routing across workers and
# transports, QoS, retained, wills, authentication, the ACL, limits) is the
# MQTT listener's, unchanged.
#
# A connection (Conn.ws, its WsState in Worker.ws_states beside the Conn
# table) goes through:
#   WS_HANDSHAKE  the HTTP/1.1 upgrade request: GET ws_path, Upgrade:
#                 websocket, Connection: Upgrade, a Sec-WebSocket-Key of 16
#                 bytes, Sec-WebSocket-Version 13, an Origin in
#                 ws_allowed_origins (when set; a request without Origin, not
#                 a browser's, is let in), the subprotocol mqtt or mqttv3.1
#                 among those offered (the first of them in the client's
#                 order is answered). Refused: 400, 403 (Origin), 404 (path),
#                 426 (version, with Sec-WebSocket-Version: 13), 431 (a head
#                 over 16 KiB); then closed. The connect timeout covers the
#                 upgrade and the CONNECT.
#   WS_OPEN       frames both ways. In: ws_decode (gw_ext/wsframe.pyx) unmasks
#                 the binary frames' payloads in place and moves them together,
#                 so the MQTT framing (Worker.process_mqtt) reads one
#                 contiguous stream whatever the frame boundaries; control
#                 frames are answered here (Ping: Pong; Close: Close, echoing
#                 its code); a protocol error gets a Close with its code
#                 (1002, 1003 for a text frame, 1007, 1009 over
#                 max_packet_size), counted and logged once. Out: what the
#                 handlers reserve() in a turn goes in one binary frame,
#                 sealed when the connection is flushed: header room
#                 (WS_HEADER_ROOM) is reserved before the frame's first byte,
#                 the header written into its end, so no payload is copied.
#   WS_CLOSED     a Close frame (or a refused upgrade's answer) was sent:
#                 nothing more goes out (reserve gives NULL); once it is
#                 written the connection lingers (ws_linger_start: our side
#                 shut, input read away until the client closes, at most the
#                 close grace), then closes for the reason it was sent for.
#
# The carry-over buffer (Conn.inbuf) of a WebSocket connection holds, in this
# order, decoded MQTT bytes not consumed yet (a packet cut short, or input
# waiting for a settling CONNECT: WsState.decoded bytes) and the raw bytes not
# decoded yet (an incomplete frame header or control frame; an incomplete
# data frame's payload is decoded as it comes). A Close or an error after
# data that must wait (a settling CONNECT, a rate limit) waits with it,
# undecoded: the decoder's state did not change, so it is found again.

cdef extern from "<string.h>":
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen) nogil

cdef enum:
    WS_KEY_LEN = 24             # a Sec-WebSocket-Key: base64 of 16 bytes
    WS_SUBPROTOCOL_MQTT = 1
    WS_SUBPROTOCOL_MQTTV31 = 2


cdef inline int ws_close_slot(uint16_t code) noexcept nogil:
    if code == 1000: return WS_CLOSE_SLOT_1000
    if code == 1001: return WS_CLOSE_SLOT_1001
    if code == 1002: return WS_CLOSE_SLOT_1002
    if code == 1003: return WS_CLOSE_SLOT_1003
    if code == 1007: return WS_CLOSE_SLOT_1007
    if code == 1008: return WS_CLOSE_SLOT_1008
    if code == 1009: return WS_CLOSE_SLOT_1009
    return WS_CLOSE_SLOT_OTHER


cdef inline bint ws_key_valid(const uint8_t* k, Py_ssize_t n) noexcept nogil:
    """24 base64 characters ending in '==': 16 bytes (RFC 6455 4.1, item 7)."""
    cdef Py_ssize_t i
    cdef uint8_t ch
    if n != WS_KEY_LEN or k[22] != 61 or k[23] != 61:
        return False
    for i in range(22):
        ch = k[i]
        if not ((65 <= ch <= 90) or (97 <= ch <= 122) or (48 <= ch <= 57) or ch == 43 or ch == 47):
            return False
    # The last character before '==' carries 2 bits: the rest must be zero.
    return memchr(b"AQgw", k[21], 4) != NULL


cdef int ws_pick_subprotocol(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """The first of the comma-separated subprotocols offered that we speak (0: none)."""
    cdef Py_ssize_t i = 0, start, end
    while i < n:
        while i < n and (p[i] == 32 or p[i] == 9 or p[i] == 44):
            i += 1
        start = i
        while i < n and p[i] != 44:
            i += 1
        end = i
        while end > start and (p[end - 1] == 32 or p[end - 1] == 9):
            end -= 1
        if end - start == 4 and memcmp(p + start, b"mqtt", 4) == 0:
            return WS_SUBPROTOCOL_MQTT
        if end - start == 8 and memcmp(p + start, b"mqttv3.1", 8) == 0:
            return WS_SUBPROTOCOL_MQTTV31
    return 0


cdef Py_ssize_t process_ws(Worker w, Conn* c, uint8_t* buf, Py_ssize_t n):
    """A WebSocket connection's input buf[0:n] (its carry-over buffer, or the
    read buffer when that was empty): the upgrade, then frames, their data
    through process_mqtt. Returns the bytes consumed (what is kept,
    buf[consumed:n], is the decoded data not used yet followed by the raw
    bytes not decoded yet), or -1 if the connection was closed."""
    cdef WsState* st = &w.ws_states[c.fd]
    cdef Py_ssize_t base = 0, out, raw, used = 0, keep
    cdef WsStep step
    if c.ws == WS_HANDSHAKE:
        base = ws_handshake(w, c, buf, n)
        if base < 0:
            return -1
        if c.ws == WS_HANDSHAKE:
            return 0            # the head is not complete: all kept
        if c.ws != WS_OPEN:
            return n            # refused: closing, the rest read away
    if c.ws != WS_OPEN or c.state == ST_CLOSING:
        return n                # a Close was sent, or the connection is closing: input read away
    out = base + st.decoded
    raw = out
    step.event = WSE_MORE
    while raw < n:
        ws_decode(&st.dec, buf, out, raw, n, w.max_packet_size, &step)
        out = step.out
        raw = step.pos
        if step.event == WSE_PING:
            if ws_control(w, c, WS_OP_PONG, buf + step.ctrl, step.ctrl_len) < 0:
                return -1
            continue
        if step.event == WSE_PONG:
            continue
        break               # WSE_MORE, WSE_CLOSE or WSE_ERROR
    if out > base:
        used = w.process_mqtt(c, buf + base, out - base)
        if used < 0 or c.state == ST_CLOSED:
            return -1
        if c.state == ST_CLOSING:
            return n
    if step.event == WSE_CLOSE or step.event == WSE_ERROR:
        if c.state == ST_SETTLING or w.rate_stopped:
            # The data before it waits (a CONNECT settling, a rate limit): so does
            # the Close or the error, undecoded, found again when it goes on.
            raw = step.frame_at
        else:
            ws_terminal(w, c, step.event, step.code, step.event == WSE_ERROR or step.ctrl_len >= 2)
            return -1 if c.state == ST_CLOSED else n
    # Keep the decoded bytes not used, just before the raw ones not decoded.
    keep = out - base - used
    if keep > 0 and raw - keep != base + used:
        memmove(buf + raw - keep, buf + base + used, keep)
    st.decoded = <uint32_t>keep
    return raw - keep


cdef void ws_terminal(Worker w, Conn* c, uint8_t event, uint16_t code, bint has_code):
    """The client's Close (answered with a Close echoing its code), or a
    protocol error (a Close with the error's code, counted, one log line):
    then the connection closes once that is written."""
    if event == WSE_CLOSE:
        if has_code:
            ws_send_close(w, c, code)
        else:
            ws_control(w, c, WS_OP_CLOSE, NULL, 0)      # no code received: none sent back (5.5.1)
            c.ws = WS_CLOSED
            w.counters[WS_CLOSES + WS_CLOSE_SLOT_1000] += 1
        w.close_after_flush(c, CR_CLIENT)
        return
    ws_send_close(w, c, code)
    w.log_client(CR_WS_PROTOCOL, c.fd, "closed a WebSocket connection: %s (close code %d)" % (
        "a text frame (MQTT goes in binary frames)" if code == WS_CLOSE_UNSUPPORTED else
        "a frame or message over max_packet_size (%d bytes)" % w.max_packet_size if code == WS_CLOSE_TOO_BIG else
        "a Close reason that is not UTF-8" if code == WS_CLOSE_INVALID_DATA else
        "a protocol error (unmasked frame, RSV bits, bad opcode, fragmentation or control frame)", code))
    w.close_after_flush(c, CR_WS_PROTOCOL)


cdef void ws_send_close(Worker w, Conn* c, uint16_t code):
    """A Close frame with `code`; nothing more is sent after it."""
    cdef uint8_t[2] payload
    if c.ws != WS_OPEN:
        return
    payload[0] = <uint8_t>(code >> 8)
    payload[1] = <uint8_t>code
    ws_control(w, c, WS_OP_CLOSE, payload, 2)
    c.ws = WS_CLOSED
    w.counters[WS_CLOSES + ws_close_slot(code)] += 1


cdef int ws_control(Worker w, Conn* c, uint8_t opcode, const uint8_t* payload, uint32_t n):
    """A control frame (Pong, Close), after the binary frame being filled is
    sealed; -1 if the connection was closed (max_outbound)."""
    cdef uint8_t* out
    cdef uint32_t hl
    if c.ws != WS_OPEN:
        return 0
    if w.ws_states[c.fd].flags & WSF_FRAME_OPEN:
        ws_seal(w, c)
    out = w.reserve_bytes(c, 2 + n)
    if out == NULL:
        return -1
    hl = ws_write_header(out, <uint8_t>(0x80 | opcode), n)
    if n:
        memcpy(out + hl, payload, n)
    return 0


cdef uint8_t* ws_reserve(Worker w, Conn* c, uint32_t n):
    """reserve() on a WebSocket connection: room in the binary frame being
    filled, opened (with room for its header before it) by the turn's first
    bytes. NULL once a Close was sent (nothing may follow it)."""
    cdef WsState* st
    cdef uint8_t* out
    if c.ws != WS_OPEN:
        return w.reserve_bytes(c, n) if c.ws == WS_HANDSHAKE else NULL
    st = &w.ws_states[c.fd]
    if st.flags & WSF_FRAME_OPEN:
        return w.reserve_bytes(c, n)
    if n > 0xFFFFFFFF - WS_HEADER_ROOM:
        return NULL
    out = w.reserve_bytes(c, n + WS_HEADER_ROOM)
    if out == NULL:
        return NULL
    st.flags |= WSF_FRAME_OPEN
    st.frame_at = <uint32_t>(out - c.outbuf)
    return out + WS_HEADER_ROOM


cdef void ws_seal(Worker w, Conn* c) noexcept:
    """Closes the binary frame being filled: its header goes at the end of the
    room reserved before it; the unused start of that room is skipped (the
    bytes pending before the frame, if the socket did not take them, move up
    over it)."""
    cdef WsState* st = &w.ws_states[c.fd]
    cdef uint32_t at = st.frame_at, length, hs, gap
    st.flags &= ~WSF_FRAME_OPEN
    length = c.outlen - at - WS_HEADER_ROOM
    hs = ws_header_size(length)
    gap = WS_HEADER_ROOM - hs
    ws_write_header(c.outbuf + at + gap, 0x82, length)
    if gap:
        if at > c.outoff:
            memmove(c.outbuf + c.outoff + gap, c.outbuf + c.outoff, at - c.outoff)
        c.outoff += gap


cdef bint ws_linger_start(Worker w, Conn* c):
    """A closing connection's last bytes (a Close frame, or a refused upgrade's
    answer) are written (Worker.flush): our side is shut (FIN; close_notify
    first on TLS) and what the client still sends is read away until it
    closes, at most CLOSE_GRACE_MS after close_after_flush (keepalive.pyx),
    so the client reads our Close instead of a reset. False: close now."""
    cdef WsState* st = &w.ws_states[c.fd]
    if st.flags & WSF_LINGER:
        return True
    if c.flags & (F_PAUSED | F_HELD_FULL | F_RATE_PAUSED) or c.store_flags & SF_HELD:
        return False        # not read now: nothing to linger for
    st.flags |= WSF_LINGER
    if c.ssl != NULL:
        ERR_clear_error()
        SSL_shutdown(c.ssl)
        ERR_clear_error()
    tls_close_notify(c)             # gw's TLS records (worker/tls_records.pyx)
    shutdown(c.fd, SHUT_WR)
    return True


cdef Py_ssize_t ws_refuse(Worker w, Conn* c, int status, str why):
    """Answers an upgrade request with `status` (counted, logged once) and
    closes once it is written. Returns -1."""
    cdef int slot = (WS_REFUSED_403 if status == 403 else WS_REFUSED_404 if status == 404 else
                     WS_REFUSED_426 if status == 426 else WS_REFUSED_431 if status == 431 else WS_REFUSED_400)
    cdef bytes body = (why + "\n").encode()
    cdef bytes head = ("HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n"
                       % (status, {400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                                   426: "Upgrade Required", 431: "Request Header Fields Too Large"}[status],
                          len(body), "Sec-WebSocket-Version: 13\r\n" if status == 426 else "")).encode()
    cdef bytes answer = head + body
    cdef uint8_t* out
    w.counters[WS_REFUSED + slot] += 1
    w.log_client(CR_WS_REFUSED, c.fd, "WebSocket upgrade refused (%d): %s" % (status, why))
    out = w.reserve_bytes(c, len(answer))
    if out != NULL:
        memcpy(out, PyBytes_AS_STRING(answer), len(answer))
    c.ws = WS_CLOSED
    w.close_after_flush(c, CR_WS_REFUSED)
    return -1 if c.state == ST_CLOSED else 0


cdef Py_ssize_t ws_handshake(Worker w, Conn* c, uint8_t* p, Py_ssize_t avail):
    """The upgrade request at p. Returns its length once complete and answered
    101; 0 while more bytes are needed or when refused (closing: c.ws is no
    longer WS_HANDSHAKE); -1 if the connection was closed."""
    cdef WsState* st = &w.ws_states[c.fd]
    cdef const uint8_t* end
    cdef const uint8_t* line
    cdef Py_ssize_t start, head_len, line_start, line_end, i, colon, vs, ve, k, target_start, target_len, path_len
    cdef int nhost = 0, version = -1, subprotocol = 0
    cdef bint upgrade = False, connection = False, offered = False
    cdef const uint8_t* key = NULL
    cdef Py_ssize_t key_len = 0
    cdef const uint8_t* origin = NULL
    cdef Py_ssize_t origin_len = 0
    cdef char[32] accept
    cdef char[256] answer
    cdef const char* proto_name
    cdef int alen
    cdef uint8_t* out
    start = st.scan
    end = <const uint8_t*>memmem(p + start, avail - start, b"\r\n\r\n", 4)
    if end == NULL:
        if avail > HTTP_MAX_HEAD:
            return ws_refuse(w, c, 431, "the upgrade request's head exceeds %d bytes" % HTTP_MAX_HEAD)
        st.scan = <uint16_t>(avail - 3 if avail > 3 else 0)
        return 0
    head_len = (end - p) + 4
    if head_len > HTTP_MAX_HEAD:
        return ws_refuse(w, c, 431, "the upgrade request's head exceeds %d bytes" % HTTP_MAX_HEAD)
    # Request line: GET SP request-target SP HTTP/1.1
    line_end = <const uint8_t*>memmem(p, head_len, b"\r\n", 2) - p
    if line_end < 4 or memcmp(p, b"GET ", 4) != 0:
        return ws_refuse(w, c, 400, "an upgrade request is a GET")
    target_start = 4
    i = target_start
    while i < line_end and p[i] > 32 and p[i] < 127:
        i += 1
    target_len = i - target_start
    if target_len == 0 or line_end - i != 9 or memcmp(p + i, b" HTTP/1.1", 9) != 0:
        return ws_refuse(w, c, 400, "malformed request line (an upgrade needs HTTP/1.1)")
    path_len = 0
    while path_len < target_len and p[target_start + path_len] != 63:       # '?': the query is not the path's
        path_len += 1
    if (path_len != len(w.ws_path)
            or memcmp(p + target_start, PyBytes_AS_STRING(w.ws_path), path_len) != 0):
        return ws_refuse(w, c, 404, "no WebSocket endpoint at this path (ws_path is %s)" % w.ws_path.decode())
    # Header fields.
    line_start = line_end + 2
    while line_start < head_len - 2:
        line_end = <const uint8_t*>memmem(p + line_start, head_len - line_start, b"\r\n", 2) - p
        line = p + line_start
        colon = 0
        while line_start + colon < line_end and is_tchar(line[colon]):
            colon += 1
        if colon == 0 or line_start + colon >= line_end or line[colon] != 58:
            return ws_refuse(w, c, 400, "malformed header field")
        vs = colon + 1
        ve = line_end - line_start
        while vs < ve and (line[vs] == 32 or line[vs] == 9):
            vs += 1
        while ve > vs and (line[ve - 1] == 32 or line[ve - 1] == 9):
            ve -= 1
        for k in range(vs, ve):
            if (line[k] < 32 and line[k] != 9) or line[k] == 127:
                return ws_refuse(w, c, 400, "control character in a header value")
        if name_is(line, colon, "host", 4):
            nhost += 1
        elif name_is(line, colon, "upgrade", 7):
            upgrade = upgrade or has_token(line + vs, ve - vs, "websocket", 9)
        elif name_is(line, colon, "connection", 10):
            connection = connection or has_token(line + vs, ve - vs, "upgrade", 7)
        elif name_is(line, colon, "sec-websocket-key", 17):
            if key != NULL:
                return ws_refuse(w, c, 400, "more than one Sec-WebSocket-Key")
            key = line + vs
            key_len = ve - vs
        elif name_is(line, colon, "sec-websocket-version", 21):
            version = 13 if (ve - vs == 2 and line[vs] == 49 and line[vs + 1] == 51 and version in (-1, 13)) else 0
        elif name_is(line, colon, "sec-websocket-protocol", 22):
            offered = True
            if subprotocol == 0:
                subprotocol = ws_pick_subprotocol(line + vs, ve - vs)
        elif name_is(line, colon, "origin", 6):
            origin = line + vs
            origin_len = ve - vs
        line_start = line_end + 2
    if nhost != 1:
        return ws_refuse(w, c, 400, "an HTTP/1.1 request needs exactly one Host header")
    if not upgrade or not connection:
        return ws_refuse(w, c, 400, "not a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)")
    if version != 13:
        return ws_refuse(w, c, 426, "only WebSocket version 13 is served")
    if key == NULL or not ws_key_valid(key, key_len):
        return ws_refuse(w, c, 400, "missing or malformed Sec-WebSocket-Key")
    if origin != NULL and w.ws_allowed_origins:
        if PyBytes_FromStringAndSize(<const char*>origin, origin_len).lower() not in w.ws_allowed_origins:
            return ws_refuse(w, c, 403, "Origin %s is not in ws_allowed_origins"
                             % PyBytes_FromStringAndSize(<const char*>origin, origin_len).decode("latin-1"))
    if subprotocol == 0:
        return ws_refuse(w, c, 400, "no MQTT subprotocol offered (Sec-WebSocket-Protocol: mqtt or mqttv3.1)"
                         if offered else "no Sec-WebSocket-Protocol (mqtt or mqttv3.1)")
    ws_accept_key(key, key_len, accept)
    proto_name = "mqtt" if subprotocol == WS_SUBPROTOCOL_MQTT else "mqttv3.1"
    alen = snprintf(answer, sizeof(answer),
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: %s\r\n\r\n",
                    accept, proto_name)
    out = w.reserve_bytes(c, <uint32_t>alen)
    if out == NULL:
        return -1
    memcpy(out, answer, alen)
    c.ws = WS_OPEN
    st.scan = 0
    st.decoded = 0
    w.counters[WS_UPGRADES] += 1
    return head_len
