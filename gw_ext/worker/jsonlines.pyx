# Included by loop.pyx. The JSON-lines protocol (one JSON object per line:
# Connect, Data, Heartbeat, Disconnect): framing by newline, one call per
# line into gw/jsonproto.py (msgspec).
#
# A Connect is who may connect as an MQTT CONNECT is (auth.pyx: the same
# rules, auth threads, cache, counters and log lines): its `username` and
# `password`, or with use_identity_as_username the client certificate's CN.
# While its password is checked the connection is ST_SETTLING and reads
# nothing; the lines after the Connect wait in its carry-over buffer until
# json_connected. A refusal is an Error line saying why, then the close. The
# user name is the ACL's identity for the client's readings, published on
# {telemetry_topic}/{client id} (write, as an MQTT PUBLISH there).

# JSON-lines handler results (see gw/jsonproto.py).
JSON_OK = 0
JSON_CONNECTED = 1
JSON_CLOSE = 2
JSON_ERROR = 3

cdef Py_ssize_t process_json_lines(Worker w, Conn* c, uint8_t* buf, Py_ssize_t n):
    cdef Py_ssize_t pos = 0, end
    cdef uint8_t* nl
    cdef bint any_line = False
    c.need = 0
    while pos < n:
        if c.state == ST_CLOSING:
            return n
        nl = <uint8_t*>memchr(buf + pos, 10, n - pos)
        if nl == NULL:
            if n - pos > w.max_packet_size:
                w.counters[PACKETS_TOO_LARGE] += 1
                w.close_conn(c, CR_TOO_LARGE)
                return -1
            break
        end = nl - buf
        if end - pos > w.max_packet_size:
            w.counters[PACKETS_TOO_LARGE] += 1
            w.close_conn(c, CR_TOO_LARGE)
            return -1
        if end > pos and buf[end - 1] == 13:     # tolerate CRLF
            end -= 1
        if c.state == ST_SETTLING:
            break                           # its Connect's password is being checked: the rest waits
        if end > pos:
            if w.batch_messages >= w.msg_allowance or w.batch_bytes >= w.byte_allowance:
                w.rate_stopped = True       # a rate's bucket is spent: the rest waits (rate_limits.pyx)
                break
            if handle_json_line(w, c, buf + pos, end - pos) < 0:
                return -1
            w.batch_messages += 1           # the message and byte rates (rate_limits.pyx)
            w.batch_bytes += <uint64_t>(end - pos)
            any_line = True
        pos = (nl - buf) + 1
    if any_line:
        c.last_rx_ms = w.now_ms
    return pos

cdef int json_reading(Worker w, bytes client_id, bytes reading):
    """A Data message's reading (ingest.pyx): into the log, then on
    {telemetry_topic}/{client id}. -1 if the log refused it (the client is told
    with an Error message)."""
    cdef IngestBatch b
    b.end = 0
    b.duplicates = 0
    b.pending_here = False
    if ingest_reading(w, client_id, None, reading, False, False, False, 0, &b) < 0:
        return -1
    return 0


# Why a Connect was refused (the client's Error line), by AUTH_LOG_* (auth.pyx).
JSON_AUTH_REPLIES = ("not authorised: anonymous access is off",
                     "not authorised: bad username or password",
                     "not authorised: the client id is held by another user",
                     "server busy: the password checks are behind; connect again later")
JSON_AUTH_LOGS = ("refused a JSON-lines Connect: no username while anonymous access is off (allow_anonymous)",
                  "refused a JSON-lines Connect: bad user name or password",
                  "refused a JSON-lines Connect: its client id is held by another user",
                  "refused a JSON-lines Connect: the password checks are behind (auth_max_pending "
                  "waiting, or its own not done within connect_timeout)")


cdef int handle_json_line(Worker w, Conn* c, const uint8_t* line, Py_ssize_t n):
    cdef bytes reply
    cdef bint connected = c.state == ST_CONNECTED
    w.counters[JSON_MESSAGES_IN] += 1
    client_id = None
    if c.client_id != NULL:
        client_id = PyBytes_FromStringAndSize(c.client_id, c.client_id_len)
    action, reply, new_id, is_data, credentials = w.json_protocol.handle(
        PyBytes_FromStringAndSize(<char*>line, n), connected, client_id,
        not connected or json_may_publish(w, c))
    if is_data is not False:
        w.counters[MSGS_IN] += 1        # a Data message, refused or not (as an MQTT PUBLISH)
    if is_data is None:
        json_publish_refused(w, c)      # the ACL: Error answered, not stored
    elif type(is_data) is bytes:
        if w.store_behind:
            # Not taken: the store is max_sink_lag_bytes behind this log (backpressure.pyx).
            w.counters[STORE_BEHIND_JSON] += 1
            w.log_limited(CR_STORE_BEHIND, "the store is behind this worker's log (max_sink_lag_bytes): "
                          "JSON-lines Data answered with an Error until it catches up")
            reply = w.json_protocol.store_behind_reply(client_id)
        elif json_reading(w, client_id, <bytes>is_data) < 0:
            reply = w.json_protocol.log_full_reply(client_id)
    if action == JSON_CONNECTED and not connected:
        return json_connect(w, c, new_id, reply, credentials)
    if reply is not None and json_write(w, c, reply) < 0:
        return -1
    if action == JSON_ERROR:
        w.counters[JSON_ERRORS] += 1
        if not connected:
            # Nothing valid yet: answer and hang up, as for a bad CONNECT.
            w.close_after_flush(c)
            return -1
    elif action == JSON_CLOSE:
        # The client's Disconnect: counted as closed_client, like MQTT's DISCONNECT.
        if c.outlen == c.outoff:
            w.close_conn(c, CR_CLIENT)
        else:
            w.close_after_flush(c, CR_CLIENT)
        return -1
    return 0


cdef int json_write(Worker w, Conn* c, bytes reply):
    cdef Py_ssize_t rlen = PyBytes_GET_SIZE(reply)
    cdef uint8_t* out = w.reserve(c, <uint32_t>rlen)
    if out == NULL:
        return -1
    memcpy(out, PyBytes_AS_STRING(reply), rlen)
    return 0


cdef int json_connect(Worker w, Conn* c, bytes client_id, bytes reply, object credentials):
    """A Connect: who it is (with use_identity_as_username the certificate's
    CN, else its username), checked as an MQTT CONNECT is (auth.pyx). 0:
    connected, or held for its password check; -1: refused (closing)."""
    cdef PendingConnect pc = PendingConnect.__new__(PendingConnect)
    cdef bytes password = None
    cdef int why = CN_OK
    cdef int rc
    pc.fd = c.fd
    pc.gen = c.gen
    pc.prev_owner = -2
    pc.client_id = client_id
    pc.json_reply = reply               # answered once accepted
    if credentials is not None:
        pc.username = credentials[0]
        password = credentials[1]
    if w.listeners[c.listener].identity_username and c.ssl != NULL:
        # As for MQTT (handle_connect.pyx): the CN replaces any username given.
        pc.username = peer_common_name(c.ssl, &why)
        if pc.username is None:
            w.counters[TLS_REFUSED_BAD_CERT] += 1
            w.counters[JSON_ERRORS] += 1
            w.log_client(CR_TLS_BAD_CERT, c.fd, "JSON-lines Connect refused (use_identity_as_username): "
                         + CN_REASONS[why])
            json_write(w, c, w.json_protocol.refused_reply(client_id, JSON_AUTH_REPLIES[AUTH_LOG_PASSWORD]))
            w.close_after_flush(c)
            return -1
    if password is not None:
        rc = auth_connect(w, c, pc, <const uint8_t*>PyBytes_AS_STRING(password),
                          <uint32_t>PyBytes_GET_SIZE(password), True)
    else:
        rc = auth_connect(w, c, pc, NULL, 0, False)
    if rc < 0:
        return -1
    if rc > 0:
        return 0                        # held: auth_readable calls json_connected
    return json_connected(w, c, pc)


cdef int json_connected(Worker w, Conn* c, PendingConnect pc):
    """The Connect accepted: its answer, its client id and user name kept.
    After a password check (the connection held), the lines that came after
    the Connect go on (resume_settled). -1 if the connection was closed."""
    cdef bint held = c.state == ST_SETTLING
    cdef Py_ssize_t ulen
    if json_write(w, c, pc.json_reply) < 0:
        return -1
    c.client_id_len = <uint16_t>PyBytes_GET_SIZE(pc.client_id)      # at most MAX_CLIENT_ID characters
    c.client_id = <char*>malloc(c.client_id_len)
    if c.client_id == NULL:
        w.close_conn(c, CR_SERVER)
        return -1
    memcpy(c.client_id, PyBytes_AS_STRING(pc.client_id), c.client_id_len)
    if pc.username is not None:
        ulen = PyBytes_GET_SIZE(pc.username)        # <= 65,535: jsonproto.py, peer_common_name
        c.username = <char*>malloc(ulen if ulen > 0 else 1)
        if c.username == NULL:
            w.close_conn(c, CR_SERVER)
            return -1
        memcpy(c.username, PyBytes_AS_STRING(pc.username), ulen)
        c.username_len = <uint16_t>ulen
    become_connected(w, c, w.json_timeout_ms)
    if held:
        w.update_events(c)              # read again
        if c.inlen:
            w.resume_later(c)
    return 0


cdef void json_auth_refuse(Worker w, Conn* c, int why):
    """auth_refuse (auth.pyx) for a JSON-lines Connect: an Error line saying
    why, then the close."""
    w.counters[JSON_ERRORS] += 1
    auth_log(w, why, c.fd, JSON_AUTH_LOGS[why])
    if json_write(w, c, w.json_protocol.refused_reply(None, JSON_AUTH_REPLIES[why])) == 0:
        w.close_after_flush(c)


cdef bint json_may_publish(Worker w, Conn* c) except -1:
    """The client may publish on {telemetry_topic}/{client id}: the ACL's
    write, as for an MQTT PUBLISH there. Decided once per connection and ACL
    version (its topic never changes), so a reading pays a comparison."""
    cdef bytes user = None
    if w.acl is None:
        return True
    if c.json_acl_gen != w.acl.generation:
        if c.username != NULL:
            user = PyBytes_FromStringAndSize(c.username, c.username_len)
        cid = PyBytes_FromStringAndSize(c.client_id, c.client_id_len)
        c.json_acl = 1 if w.acl.check(user, cid, w.telemetry_prefix + cid, ACL_WRITE) else 0
        c.json_acl_gen = w.acl.generation
    return c.json_acl != 0


cdef void json_publish_refused(Worker w, Conn* c):
    """A Data message the ACL refused: counted with MQTT's refused publishes,
    logged at most once per 10 s (its Error answer is jsonproto.py's)."""
    w.counters[ACL_PUBLISH_DENIED] += 1
    if w.last_log_ms[<int>CR_ACL] != 0 and w.now_ms - w.last_log_ms[<int>CR_ACL] < 10000:
        w.suppressed[<int>CR_ACL] += 1
        return
    w.log_limited(CR_ACL, "ACL: JSON-lines client %r (user %s) from %s may not publish on %r: reading not stored" % (
        PyBytes_FromStringAndSize(c.client_id, c.client_id_len).decode("utf-8", "replace"),
        repr(PyBytes_FromStringAndSize(c.username, c.username_len).decode("utf-8", "replace"))
        if c.username != NULL else "none", peer_address(c.fd),
        (w.telemetry_prefix + PyBytes_FromStringAndSize(c.client_id, c.client_id_len)).decode("utf-8", "replace")))
