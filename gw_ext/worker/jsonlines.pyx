# Included by loop.pyx. The JSON-lines protocol (one JSON object per line:
# Connect, Data, Heartbeat, Disconnect): framing by newline, one call per
# line into gw/jsonproto.py (msgspec).

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


cdef int handle_json_line(Worker w, Conn* c, const uint8_t* line, Py_ssize_t n):
    cdef bytes reply
    cdef uint8_t* out
    cdef Py_ssize_t rlen
    w.counters[JSON_MESSAGES_IN] += 1
    client_id = None
    if c.client_id != NULL:
        client_id = PyBytes_FromStringAndSize(c.client_id, c.client_id_len)
    action, reply, new_id, is_data = w.json_protocol.handle(
        PyBytes_FromStringAndSize(<char*>line, n), c.state == ST_CONNECTED, client_id)
    if is_data:
        w.counters[MSGS_IN] += 1
    if type(is_data) is bytes:
        if w.store_behind:
            # Not taken: the store is max_sink_lag_bytes behind this log (backpressure.pyx).
            w.counters[STORE_BEHIND_JSON] += 1
            w.log_limited(CR_STORE_BEHIND, "the store is behind this worker's log (max_sink_lag_bytes): "
                          "JSON-lines Data answered with an Error until it catches up")
            reply = w.json_protocol.store_behind_reply(client_id)
        elif json_reading(w, client_id, <bytes>is_data) < 0:
            reply = w.json_protocol.log_full_reply(client_id)
    if action == JSON_CONNECTED and c.state != ST_CONNECTED and not w.allow_anonymous:
        # A Connect carries no credentials: the anonymous rules apply (worker/auth.pyx).
        w.counters[AUTH_REFUSED_ANONYMOUS] += 1
        auth_log(w, AUTH_LOG_ANONYMOUS, c.fd, "refused a JSON-lines Connect: anonymous access is off "
                 "(allow_anonymous)")
        reply = w.json_protocol.not_authorised_reply()
        action = JSON_ERROR
    if reply is not None:
        rlen = PyBytes_GET_SIZE(reply)
        out = w.reserve(c, <uint32_t>rlen)
        if out == NULL:
            return -1
        memcpy(out, PyBytes_AS_STRING(reply), rlen)
    if action == JSON_CONNECTED:
        if c.state != ST_CONNECTED:
            c.client_id_len = <uint16_t>len(new_id)
            c.client_id = <char*>malloc(c.client_id_len)
            if c.client_id == NULL:
                w.close_conn(c, CR_SERVER)
                return -1
            memcpy(c.client_id, PyBytes_AS_STRING(new_id), c.client_id_len)
            become_connected(w, c, w.json_timeout_ms)
    elif action == JSON_ERROR:
        w.counters[JSON_ERRORS] += 1
        if c.state != ST_CONNECTED:
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
