# Included by loop.pyx. HTTP/1.1 (RFC 9112) for the ingest API, health and
# metrics: the framing is here, in the worker's loop; each complete request
# is one call into gw/http_api.py (HttpApp.handle), whose answer is written
# back in order (so pipelined requests get their responses in sequence).
#
# What the framing decides by itself, before Python sees anything, always with
# a JSON error body and `Connection: close` (the request's framing can no
# longer be trusted, RFC 9112 section 9.6):
#   400  malformed request line or header, Content-Length with Transfer-Encoding,
#        a bad chunk, an HTTP/1.1 request without exactly one Host
#   408  a request not complete within http_timeout (slowloris)
#   413  a body over max_body_size (declared, or counted while de-chunking)
#   417  an Expect other than 100-continue
#   431  a head over HTTP_MAX_HEAD bytes or HTTP_MAX_HEADERS fields
#   501  a transfer coding other than chunked
#   505  an HTTP version other than 1.0 and 1.1
# An idle keep-alive connection is closed after http_keepalive_timeout.
#
# Such an answer may go out before the request's body has arrived (a 413 for
# a declared Content-Length): closing at once would make the kernel reset the
# connection on the bytes still coming, and the client would see the reset
# instead of the answer. So the close lingers, as nginx's does: once the
# answer is written, our side is shut down (FIN) and what the client still
# sends is read and discarded until it closes, for at most http_linger_bytes
# and http_linger_timeout (then a reset, counted in HTTP_LINGER_CUT).
#
# The query routes (/v1/devices..., /v1/alerts...) read the store, which may
# take up to its time budget: HttpApp.handle answers None for them and
# HttpApp.defer queues them to the worker's query threads (gw/query_pool.py),
# or answers 503 when query_max_pending wait already. The connection is then
# not read (so its later requests, pipelined, wait, and their answers keep
# their order) until the query's answer comes back through the threads' eventfd
# (query_readable, http_queries.pyx); it is written like any other answer (behind held ones, in
# ack mode sink), then the connection is read again. A connection closed
# meanwhile drops its answer.
#
# Every length here comes from the network and is checked before use: the
# head (HTTP_MAX_HEAD), Content-Length (15 digits, then max_body_size), a
# chunk-size line (HTTP_MAX_CHUNK_LINE, found or not), a chunk's size (its
# significant digits, then max_body_size for the data so far), the encoded
# chunked body (data and framing: max_body_size plus as much framing, at least
# HTTP_MIN_CHUNK_FRAMING), the trailer section (HTTP_MAX_HEAD).

cdef enum:
    HTTP_MAX_HEAD = 16384       # request line and header fields together, bytes
    HTTP_MAX_HEADERS = 100      # header fields per request
    HTTP_MAX_CHUNK_LINE = 1024  # a chunk-size line (with extensions), its CRLF not counted
    HTTP_MAX_CHUNK_DIGITS = 8   # significant hex digits of a chunk size (under 4 GiB, over any max_body_size)
    HTTP_MIN_CHUNK_FRAMING = 65536  # chunk framing always allowed, beyond max_body_size of data, bytes
    HTTP_DRAIN_GRACE_MS = 1000  # on SIGTERM, how long an idle keep-alive connection is kept (readyz says 503)
    HTTP_MAX_RESPONSE = 0x7fffffff  # a response's bytes must fit a reserve() count (the app's bodies are far smaller)

cdef enum HttpFlag:
    HF_IN_REQUEST = 1           # part of a request has arrived: http_timeout runs
    HF_CONTINUE_SENT = 2        # "100 Continue" sent for the current request
    HF_CLOSE = 4                # close after the next response (draining)
    HF_CLOSE_AFTER_HELD = 8     # close once the held responses went out; read nothing more
    HF_LINGER_WANTED = 16       # closing before the client finished sending: linger once the answer is out
    HF_LINGER = 32              # lingering close: our side shut, input read and discarded
    HF_QUERY = 64               # a request is in the query threads: input paused until its answer
    HF_QUERY_KEEP = 128         # ... its connection stays open after the answer
    HF_QUERY_HEAD = 256         # ... it is a HEAD: the answer goes without its body
    HF_AUTH_CHECKED = 512       # the current request's token was checked while its body was still coming


cdef inline bint is_tchar(uint8_t ch) noexcept nogil:
    # RFC 9110 token characters
    if (ch >= 97 and ch <= 122) or (ch >= 65 and ch <= 90) or (ch >= 48 and ch <= 57):
        return True
    return memchr(b"!#$%&'*+-.^_`|~", ch, 15) != NULL


cdef inline bint name_is(const uint8_t* p, Py_ssize_t n, const char* lower, Py_ssize_t ln) noexcept nogil:
    """Case-insensitive comparison of a header name with a lowercase literal."""
    cdef Py_ssize_t i
    if n != ln:
        return False
    for i in range(n):
        if (p[i] | 0x20) != <uint8_t>lower[i]:
            return False
    return True


cdef inline bint has_token(const uint8_t* p, Py_ssize_t n, const char* lower, Py_ssize_t ln) noexcept nogil:
    """Whether a comma-separated header value holds the token `lower` (any case)."""
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
        if name_is(p + start, end - start, lower, ln):
            return True
    return False


cdef const char* http_reason(int status) noexcept nogil:
    if status == 200: return "OK"
    if status == 202: return "Accepted"
    if status == 204: return "No Content"
    if status == 400: return "Bad Request"
    if status == 401: return "Unauthorized"
    if status == 403: return "Forbidden"
    if status == 404: return "Not Found"
    if status == 405: return "Method Not Allowed"
    if status == 408: return "Request Timeout"
    if status == 411: return "Length Required"
    if status == 413: return "Content Too Large"
    if status == 415: return "Unsupported Media Type"
    if status == 417: return "Expectation Failed"
    if status == 431: return "Request Header Fields Too Large"
    if status == 500: return "Internal Server Error"
    if status == 501: return "Not Implemented"
    if status == 503: return "Service Unavailable"
    if status == 505: return "HTTP Version Not Supported"
    if status == 100: return "Continue"
    return "Unknown"


cdef Py_ssize_t process_http(Worker w, Conn* c, uint8_t* buf, Py_ssize_t n):
    """Handles every complete request in buf[0:n]; returns the bytes consumed,
    or -1 if the connection was closed."""
    cdef Py_ssize_t pos = 0, r
    cdef HttpState* st = &w.http[c.fd]
    cdef bint completed = False
    if st.flags & HF_LINGER:
        return http_linger_input(w, c, n)
    if st.flags & HF_QUERY:
        return 0                # paused: read again once the query's answer is out
    if c.need > n and c.state != ST_CLOSING and not (st.flags & HF_CLOSE_AFTER_HELD):
        return 0                # the request's known length has not arrived: nothing to parse again
    c.need = 0
    while pos < n:
        if c.state == ST_CLOSING or st.flags & HF_CLOSE_AFTER_HELD:
            st.flags |= HF_LINGER_WANTED        # the client sent more than we answer
            return n
        if w.batch_messages >= w.msg_allowance or w.batch_bytes >= w.byte_allowance:
            w.rate_stopped = True       # a rate's bucket is spent: the next requests wait (rate_limits.pyx)
            break
        r = http_request(w, c, buf + pos, n - pos)
        if r < 0:
            return -1
        if r == 0:
            break
        pos += r
        completed = True
        if st.flags & HF_QUERY:
            # Its answer comes from the query threads; what follows waits, unread.
            return pos
    if c.state == ST_CLOSING or st.flags & HF_CLOSE_AFTER_HELD:
        if pos < n:
            st.flags |= HF_LINGER_WANTED
        return n
    if pos < n:
        if not (st.flags & HF_IN_REQUEST):
            # A new request has begun: it has http_timeout to arrive in full,
            # however slowly its bytes trickle in.
            st.flags |= HF_IN_REQUEST
            wheel_schedule(&w.wheel, &c.timer, w.now_ms + w.http_timeout_ms)
    elif completed and not (st.flags & HF_CLOSE):
        wheel_schedule(&w.wheel, &c.timer, w.now_ms + w.http_keepalive_ms)
    return pos


cdef Py_ssize_t http_request(Worker w, Conn* c, uint8_t* p, Py_ssize_t avail):
    """One request at p. Returns its length once complete (and answered), 0 if
    more bytes are needed, -1 if the connection was closed."""
    cdef HttpState* st = &w.http[c.fd]
    cdef Py_ssize_t lead = 0, start, head_len, i, line_start, line_end, colon, vs, ve
    cdef Py_ssize_t method_len, target_start, target_len, nfields = 0, nhost = 0
    cdef const uint8_t* end
    cdef const uint8_t* line
    cdef int minor
    cdef int64_t content_length = -1, value
    cdef bint chunked = False, has_te = False, conn_close = False, conn_keep = False
    cdef bint expect_continue = False
    cdef bint accept_gzip = False
    cdef const uint8_t* ctype = NULL
    cdef Py_ssize_t ctype_len = 0
    cdef const uint8_t* auth = NULL
    cdef Py_ssize_t auth_len = 0
    cdef Py_ssize_t total, body_len, k
    # Empty lines before a request line are ignored (RFC 9112 section 2.2).
    while lead < avail and (p[lead] == 13 or p[lead] == 10):
        lead += 1
    if lead == avail:
        return lead
    start = st.scan if st.scan > lead else lead
    end = <const uint8_t*>memmem(p + start, avail - start, b"\r\n\r\n", 4)
    if end == NULL:
        if avail - lead > HTTP_MAX_HEAD:
            return http_fail(w, c, 431, "header_too_large",
                             "the request line and headers exceed %d bytes" % HTTP_MAX_HEAD)
        st.scan = <uint32_t>(avail - 3 if avail > 3 else 0)
        return 0
    head_len = (end - p) + 4
    if head_len - lead > HTTP_MAX_HEAD:
        return http_fail(w, c, 431, "header_too_large",
                         "the request line and headers exceed %d bytes" % HTTP_MAX_HEAD)

    # Request line: method SP request-target SP HTTP-version
    line_start = lead
    line_end = <const uint8_t*>memmem(p + line_start, head_len - line_start, b"\r\n", 2) - p
    i = line_start
    while i < line_end and is_tchar(p[i]):
        i += 1
    method_len = i - line_start
    if method_len == 0 or method_len > 16 or i >= line_end or p[i] != 32:
        return http_fail(w, c, 400, "bad_request_line", "malformed request line")
    target_start = i + 1
    i = target_start
    while i < line_end and p[i] > 32 and p[i] < 127:
        i += 1
    target_len = i - target_start
    if target_len == 0 or i >= line_end or p[i] != 32 or (p[target_start] != 47 and p[target_start] != 42):
        return http_fail(w, c, 400, "bad_request_line", "malformed request line or request-target")
    i += 1
    if line_end - i != 8 or memcmp(p + i, b"HTTP/", 5) != 0 or p[i + 6] != 46 \
            or not (48 <= p[i + 5] <= 57) or not (48 <= p[i + 7] <= 57):
        return http_fail(w, c, 400, "bad_request_line", "malformed HTTP version")
    if p[i + 5] != 49 or (p[i + 7] != 48 and p[i + 7] != 49):
        return http_fail(w, c, 505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
    minor = p[i + 7] - 48

    # Header fields: name ":" OWS value OWS CRLF
    line_start = line_end + 2
    while line_start < head_len - 2:
        line_end = <const uint8_t*>memmem(p + line_start, head_len - line_start, b"\r\n", 2) - p
        line = p + line_start
        nfields += 1
        if nfields > HTTP_MAX_HEADERS:
            return http_fail(w, c, 431, "too_many_headers",
                             "more than %d header fields" % HTTP_MAX_HEADERS)
        colon = 0
        while line_start + colon < line_end and is_tchar(line[colon]):
            colon += 1
        if colon == 0 or line_start + colon >= line_end or line[colon] != 58:
            # Includes whitespace before the colon and obsolete line folding (RFC 9112 5.1, 5.2).
            return http_fail(w, c, 400, "bad_header", "malformed header field")
        vs = colon + 1
        ve = line_end - line_start
        while vs < ve and (line[vs] == 32 or line[vs] == 9):
            vs += 1
        while ve > vs and (line[ve - 1] == 32 or line[ve - 1] == 9):
            ve -= 1
        for k in range(vs, ve):
            if (line[k] < 32 and line[k] != 9) or line[k] == 127:
                return http_fail(w, c, 400, "bad_header", "control character in a header value")
        if name_is(line, colon, "content-length", 14):
            value = 0
            if ve == vs or ve - vs > 15:
                return http_fail(w, c, 400, "bad_content_length", "invalid Content-Length")
            for k in range(vs, ve):
                if not (48 <= line[k] <= 57):
                    return http_fail(w, c, 400, "bad_content_length", "invalid Content-Length")
                value = value * 10 + (line[k] - 48)
            if content_length >= 0 and content_length != value:
                return http_fail(w, c, 400, "bad_content_length", "conflicting Content-Length fields")
            content_length = value
        elif name_is(line, colon, "transfer-encoding", 17):
            if has_te or not name_is(line + vs, ve - vs, "chunked", 7):
                return http_fail(w, c, 501, "unsupported_transfer_coding",
                                 "only Transfer-Encoding: chunked is supported")
            has_te = chunked = True
        elif name_is(line, colon, "connection", 10):
            conn_close = conn_close or has_token(line + vs, ve - vs, "close", 5)
            conn_keep = conn_keep or has_token(line + vs, ve - vs, "keep-alive", 10)
        elif name_is(line, colon, "content-type", 12):
            ctype = line + vs
            ctype_len = ve - vs
        elif name_is(line, colon, "authorization", 13):
            # Passed on as it is: HttpApp checks it (gw/tokens.py) before any body is parsed.
            auth = line + vs
            auth_len = ve - vs
        elif name_is(line, colon, "host", 4):
            nhost += 1
        elif name_is(line, colon, "accept-encoding", 15):
            # Only the bare token: "gzip;q=0" (or any weighted form) gets the identity.
            accept_gzip = accept_gzip or has_token(line + vs, ve - vs, "gzip", 4)
        elif name_is(line, colon, "expect", 6):
            if not name_is(line + vs, ve - vs, "100-continue", 12):
                return http_fail(w, c, 417, "expectation_failed", "only Expect: 100-continue is supported")
            expect_continue = True
        line_start = line_end + 2
    if has_te and content_length >= 0:
        return http_fail(w, c, 400, "bad_framing", "both Content-Length and Transfer-Encoding")
    if has_te and minor == 0:
        return http_fail(w, c, 400, "bad_framing", "Transfer-Encoding in an HTTP/1.0 request")
    if minor == 1 and nhost != 1:
        return http_fail(w, c, 400, "bad_host", "an HTTP/1.1 request needs exactly one Host header")

    # The body.
    if chunked:
        total = http_chunked(w, c, p + head_len, avail - head_len, head_len, &body_len)
        if total < 0:
            return -1
        if total == 0:
            if http_check_early(w, c, p, target_start, target_len, auth, auth_len) < 0:
                return -1
            if st.flags & HF_CLOSE_AFTER_HELD:
                return 0        # refused, behind answers held for the log: nothing more is read
            if expect_continue:
                http_continue(w, c)
            return 0
    else:
        if content_length < 0:
            content_length = 0
        if content_length > w.http_max_body:
            return http_fail(w, c, 413, "body_too_large",
                             "the body exceeds max_body_size (%d bytes)" % w.http_max_body)
        if avail - head_len < content_length:
            if http_check_early(w, c, p, target_start, target_len, auth, auth_len) < 0:
                return -1
            if st.flags & HF_CLOSE_AFTER_HELD:
                return 0        # refused, behind answers held for the log: nothing more is read
            c.need = <uint32_t>(head_len + content_length)
            if expect_continue:
                http_continue(w, c)
            return 0
        total = content_length
        body_len = content_length
    return http_dispatch(w, c, p, method_len, target_start, target_len, minor,
                         conn_close, conn_keep, ctype, ctype_len, auth, auth_len,
                         p + head_len, total, body_len, chunked, head_len + total, accept_gzip)


cdef Py_ssize_t http_chunked(Worker w, Conn* c, const uint8_t* b, Py_ssize_t avail, Py_ssize_t head_len,
                             Py_ssize_t* body_len):
    """Walks a chunked body (at b, after a head of head_len bytes) from where the
    last call stopped. Returns the length of the whole encoded body (with the
    trailer section) once it is complete, 0 if more is needed (c.need set when
    the length is known), -1 if the connection was closed."""
    cdef HttpState* st = &w.http[c.fd]
    cdef Py_ssize_t off = st.chunk_off, i, k, line_end, scan, tstart, chunk_end
    cdef Py_ssize_t limit = http_chunked_limit(w)
    cdef uint64_t size
    cdef int digits, significant
    cdef uint8_t ch, v
    cdef const uint8_t* found
    while True:
        # The chunk-size line: at most HTTP_MAX_CHUNK_LINE bytes before its CRLF,
        # whether that CRLF has arrived or not.
        scan = avail - off
        if scan > HTTP_MAX_CHUNK_LINE + 2:
            scan = HTTP_MAX_CHUNK_LINE + 2
        found = <const uint8_t*>memmem(b + off, scan, b"\r\n", 2) if scan >= 2 else NULL
        if found == NULL:
            if scan >= HTTP_MAX_CHUNK_LINE + 2:
                return http_fail(w, c, 400, "bad_chunk",
                                 "chunk-size line longer than %d bytes" % HTTP_MAX_CHUNK_LINE)
            break
        line_end = found - b
        size = 0
        digits = significant = 0
        i = off
        while i < line_end:
            ch = b[i]
            if 48 <= ch <= 57:
                v = ch - 48
            elif 97 <= (ch | 0x20) <= 102:
                v = (ch | 0x20) - 87
            else:
                break
            digits += 1
            if size or v:
                significant += 1
                if significant > HTTP_MAX_CHUNK_DIGITS:
                    return http_fail(w, c, 413, "body_too_large",
                                     "the body exceeds max_body_size (%d bytes)" % w.http_max_body)
            size = size * 16 + v
            i += 1
        if digits == 0:
            return http_fail(w, c, 400, "bad_chunk", "malformed chunk size")
        # Then optional whitespace and either the end of the line or extensions
        # (";name=value", ignored, without control characters).
        while i < line_end and (b[i] == 32 or b[i] == 9):
            i += 1
        if i < line_end:
            if b[i] != 59:
                return http_fail(w, c, 400, "bad_chunk", "malformed chunk size")
            for k in range(i + 1, line_end):
                if (b[k] < 32 and b[k] != 9) or b[k] == 127:
                    return http_fail(w, c, 400, "bad_chunk", "control character in a chunk extension")
        if size == 0:
            # The last chunk, then trailer fields (ignored) up to an empty line,
            # at most HTTP_MAX_HEAD bytes of them.
            tstart = line_end + 2
            if avail - tstart >= 2 and b[tstart] == 13 and b[tstart + 1] == 10:
                body_len[0] = st.chunk_total
                return tstart + 2
            i = st.trailer_scan if st.trailer_scan > tstart else tstart
            scan = avail - i
            if i + scan > tstart + HTTP_MAX_HEAD + 4:
                scan = tstart + HTTP_MAX_HEAD + 4 - i
            found = <const uint8_t*>memmem(b + i, scan, b"\r\n\r\n", 4) if scan >= 4 else NULL
            if found == NULL:
                if avail - tstart >= HTTP_MAX_HEAD + 4:
                    return http_fail(w, c, 431, "header_too_large",
                                     "trailer section larger than %d bytes" % HTTP_MAX_HEAD)
                st.trailer_scan = <uint32_t>(avail - 3 if avail - 3 > tstart else tstart)
                break
            body_len[0] = st.chunk_total
            return (found - b) + 4
        if st.chunk_total + size > w.http_max_body:
            return http_fail(w, c, 413, "body_too_large",
                             "the body exceeds max_body_size (%d bytes)" % w.http_max_body)
        chunk_end = line_end + 4 + <Py_ssize_t>size
        if chunk_end > limit:
            # Tiny chunks with long extensions: the framing, not the data, would fill memory.
            return http_fail(w, c, 413, "body_too_large",
                             "the chunked body's framing exceeds its allowance (max_body_size, "
                             "at least %d bytes)" % HTTP_MIN_CHUNK_FRAMING)
        if avail < chunk_end:
            c.need = <uint32_t>(head_len + chunk_end)      # under HTTP_MAX_HEAD + limit: fits
            break
        if b[chunk_end - 2] != 13 or b[chunk_end - 1] != 10:
            return http_fail(w, c, 400, "bad_chunk", "chunk data not followed by CRLF")
        st.chunk_total += <uint32_t>size
        off = chunk_end
        st.chunk_off = <uint32_t>off
    return 0


cdef inline Py_ssize_t http_chunked_limit(Worker w) noexcept:
    """The largest encoded chunked body: max_body_size of data, and as much
    again of framing (at least HTTP_MIN_CHUNK_FRAMING)."""
    cdef Py_ssize_t framing = w.http_max_body
    if framing < HTTP_MIN_CHUNK_FRAMING:
        framing = HTTP_MIN_CHUNK_FRAMING
    return <Py_ssize_t>w.http_max_body + framing


cdef bytes http_dechunk(const uint8_t* b, Py_ssize_t total, Py_ssize_t body_len):
    """The data of a complete, already validated chunked body."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, body_len)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t off = 0, got = 0, line_end
    cdef uint64_t size
    cdef uint8_t ch
    while got < body_len:
        line_end = <const uint8_t*>memmem(b + off, total - off, b"\r\n", 2) - b
        size = 0
        while True:
            ch = b[off]
            if 48 <= ch <= 57:
                size = size * 16 + (ch - 48)
            elif 97 <= (ch | 0x20) <= 102:
                size = size * 16 + ((ch | 0x20) - 87)
            else:
                break
            off += 1
        memcpy(dst + got, b + line_end + 2, size)
        got += <Py_ssize_t>size
        off = line_end + 4 + <Py_ssize_t>size
    return out


cdef void http_continue(Worker w, Conn* c):
    cdef HttpState* st = &w.http[c.fd]
    cdef uint8_t* out
    if st.flags & HF_CONTINUE_SENT:
        return
    st.flags |= HF_CONTINUE_SENT
    out = w.reserve(c, 25)
    if out != NULL:
        memcpy(out, b"HTTP/1.1 100 Continue\r\n\r\n", 25)


cdef Py_ssize_t http_dispatch(Worker w, Conn* c, const uint8_t* p, Py_ssize_t method_len,
                              Py_ssize_t target_start, Py_ssize_t target_len, int minor,
                              bint conn_close, bint conn_keep, const uint8_t* ctype, Py_ssize_t ctype_len,
                              const uint8_t* auth, Py_ssize_t auth_len,
                              const uint8_t* body, Py_ssize_t total, Py_ssize_t body_len, bint chunked,
                              Py_ssize_t request_len, bint accept_gzip):
    cdef HttpState* st = &w.http[c.fd]
    cdef bint keep = (not conn_close) if minor == 1 else conn_keep
    cdef bint head_only = method_len == 4 and memcmp(p, b"HEAD", 4) == 0
    cdef uint64_t t0 = monotonic_ns()
    cdef bytes method = PyBytes_FromStringAndSize(<char*>p, method_len)
    cdef bytes target = PyBytes_FromStringAndSize(<char*>p + target_start, target_len)
    cdef bytes payload
    cdef bint ingest = target_len >= 10 and memcmp(p + target_start, b"/v1/ingest", 10) == 0
    if chunked:
        payload = http_dechunk(body, total, body_len)
    else:
        payload = PyBytes_FromStringAndSize(<char*>body, body_len)
    if body_len > 0:
        w.batch_messages += 1           # a request body: the message and byte rates (rate_limits.pyx)
        w.batch_bytes += <uint64_t>body_len
    cdef bint sink = w.wal is not None and w.listeners[c.listener].ack_sink
    cdef int64_t needed = 0
    cdef object answer
    cdef bint deferred = False
    if st.flags & HF_CLOSE or w.draining:
        keep = False
    try:
        w.http_current_fd = c.fd
        answer = w.http_app.handle(
            method, target, PyBytes_FromStringAndSize(<char*>ctype, ctype_len) if ctype != NULL else None,
            payload, PyBytes_FromStringAndSize(<char*>auth, auth_len) if auth != NULL else None, accept_gzip)
        if answer is None and w.query_pool is not None:
            # A store query: into the query threads (or 503 if too many wait).
            answer = w.http_app.defer(http_query_token(c))
            deferred = answer is None
        elif type(answer) is not tuple and answer is not None:
            # Ingest readings that passed the schema: taken here, then answered.
            answer = http_ingest(w, answer, sink, &needed)
    except Exception:
        answer = http_handler_failed(w)
    w.http_current_fd = -1
    st.scan = 0
    st.chunk_off = 0
    st.chunk_total = 0
    st.trailer_scan = 0
    st.flags &= ~(HF_IN_REQUEST | HF_CONTINUE_SENT | HF_AUTH_CHECKED)
    if deferred:
        # In the query threads: this connection is not read until the answer is out.
        st.flags |= HF_QUERY | (HF_QUERY_KEEP if keep else 0) | (HF_QUERY_HEAD if head_only else 0)
        st.query_minor = <uint8_t>minor
        w.counters[QUERIES_PENDING] = w.query_pool.pending
        c.flags |= F_PAUSED
        w.update_events(c)
        # A safety net only: a query ends within its time budget (gw/query.py).
        wheel_schedule(&w.wheel, &c.timer, w.now_ms + w.http_keepalive_ms)
        return request_len
    if http_answer(w, c, answer, needed, keep, minor, head_only) < 0:
        return -1
    if ingest:
        hist_observe(w.counters, HIST_INGEST, monotonic_ns() - t0)
    return request_len


cdef int http_check_early(Worker w, Conn* c, const uint8_t* p, Py_ssize_t target_start, Py_ssize_t target_len,
                          const uint8_t* auth, Py_ssize_t auth_len):
    """A request whose body is still coming: its token is checked now, once
    (HttpApp.check_early), so a client without one is not read a body it may
    not send (nor told 100 Continue). A refusal is answered with the connection
    closing, lingering so the client reads it. -1 if refused and closing; 0
    otherwise (refused behind answers held for the log: HF_CLOSE_AFTER_HELD).
    A request whose body came with its head is checked by HttpApp.handle alone."""
    cdef HttpState* st = &w.http[c.fd]
    cdef object answer
    if st.flags & HF_AUTH_CHECKED:
        return 0
    st.flags |= HF_AUTH_CHECKED
    w.http_current_fd = c.fd
    try:
        answer = w.http_app.check_early(
            PyBytes_FromStringAndSize(<char*>p + target_start, target_len),
            PyBytes_FromStringAndSize(<char*>auth, auth_len) if auth != NULL else None)
    except Exception:
        answer = http_handler_failed(w)
    w.http_current_fd = -1
    if answer is None:
        return 0
    st.flags |= HF_LINGER_WANTED
    if http_answer(w, c, answer, 0, False, 1, False) < 0:
        return -1
    return 0 if st.flags & HF_CLOSE_AFTER_HELD else -1


cdef object http_ingest(Worker w, object accepted, bint sink, int64_t* needed):
    """Takes an ingest request's readings (ingest.pyx) and asks the app for the
    answer; *needed: what it waits for in the log in ack mode sink."""
    cdef IngestBatch b
    cdef int r
    b.end = 0
    b.duplicates = 0
    b.pending_here = False
    if w.store_behind:
        # The store is max_sink_lag_bytes behind this log (backpressure.pyx): nothing
        # taken, the client sends again after Retry-After.
        w.counters[STORE_BEHIND_HTTP] += 1
        w.log_limited(CR_STORE_BEHIND, "the store is behind this worker's log (max_sink_lag_bytes): "
                      "ingest answered 503 until it catches up")
        return w.http_app.store_behind()
    r = ingest_records(w, <list?>accepted.records, sink, &b)
    if sink:
        needed[0] = b.end
    if r == INGEST_LOG_FULL:
        return w.http_app.log_full()
    if r == INGEST_IN_PROGRESS:
        return w.http_app.in_progress()
    return w.http_app.ingest_taken(accepted, b.duplicates, sink)


cdef object http_handler_failed(Worker w):
    """The app raised (a bug): logged at most every 10 s, answered 500."""
    if w.now_ms - w.last_log_ms[<int>CR_PYTHON] >= 10000 or w.last_log_ms[<int>CR_PYTHON] == 0:
        w.last_log_ms[<int>CR_PYTHON] = w.now_ms
        log.exception("worker %d: HTTP handler failed (logged at most every 10 s)", w.worker_index)
    return (500, b"application/json",
            b'{"code":"internal_error","message":"the server failed to handle the request"}', b"")


cdef int http_answer(Worker w, Conn* c, object answer, int64_t needed, bint keep, int minor, bint head_only):
    """Writes an answer of the app (status, content type, body, extra header
    lines) on c, or holds it behind the connection's answers waiting for the
    log (durable_ack.pyx); closes after it unless keep. -1 if c was closed."""
    cdef HttpState* st = &w.http[c.fd]
    cdef int status
    cdef bytes rtype, rbody, extra
    try:
        status = answer[0]
        rtype = <bytes?>answer[1]
        rbody = <bytes?>answer[2]
        extra = <bytes?>answer[3]
        if not 200 <= status <= 599:
            raise ValueError("HTTP status %r" % status)
    except Exception:
        status, rtype, rbody, extra = http_handler_failed(w)
    if w.held_per_fd != NULL and must_hold(w, c, needed):
        # Ack mode sink: this answer, and any after it on this connection, waits
        # for the log (durable_ack.pyx).
        if held_push(w, c, HELD_HTTP, 0, needed, http_response_bytes(
                w, status, rtype, rbody, extra, keep, minor, head_only)) < 0:
            return -1
        if not keep:
            st.flags |= HF_CLOSE_AFTER_HELD
        return 0                # closed (if not keep) by held_release, after the answer
    if http_write(w, c, status, rtype, rbody, extra, keep, minor, head_only) < 0:
        return -1
    if not keep:
        w.close_after_flush(c)
    return 0


cdef int http_write(Worker w, Conn* c, int status, bytes ctype, bytes body, bytes extra, bint keep,
                    int minor, bint head_only):
    """Queues a response: status line, Date, Content-Type, Content-Length, the
    handler's extra header lines, Connection when it differs from the default."""
    cdef char[256] line
    cdef int hlen
    cdef Py_ssize_t blen = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t tlen = PyBytes_GET_SIZE(ctype)
    cdef Py_ssize_t xlen = PyBytes_GET_SIZE(extra)
    cdef const char* conn_hdr = b""
    cdef uint8_t* out
    cdef Py_ssize_t total
    w.counters[HTTP_REQUESTS + http_status_index(status)] += 1
    if status == 503:
        w.counters[HTTP_REQUESTS_SHED] += 1
    if not keep:
        conn_hdr = b"Connection: close\r\n"
    elif minor == 0:
        conn_hdr = b"Connection: keep-alive\r\n"
    http_update_date(w)
    hlen = snprintf(line, sizeof(line), b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Length: %zd\r\n%s",
                    status, http_reason(status), w.http_date, blen, conn_hdr)
    total = <Py_ssize_t>hlen + 14 + tlen + 2 + xlen + 2 + (0 if head_only else blen)
    if hlen < 0 or hlen >= <int>sizeof(line) or total > HTTP_MAX_RESPONSE:
        w.log_limited(CR_PYTHON, "an HTTP response too large to send (%d bytes): connection closed" % total)
        w.close_conn(c, CR_SERVER)
        return -1
    out = w.reserve(c, <uint32_t>total)
    if out == NULL:
        return -1
    memcpy(out, line, hlen)
    out += hlen
    memcpy(out, b"Content-Type: ", 14)
    out += 14
    memcpy(out, PyBytes_AS_STRING(ctype), tlen)
    out += tlen
    memcpy(out, b"\r\n", 2)
    out += 2
    memcpy(out, PyBytes_AS_STRING(extra), xlen)
    out += xlen
    memcpy(out, b"\r\n", 2)
    out += 2
    if not head_only:
        memcpy(out, PyBytes_AS_STRING(body), blen)
    return 0


cdef bytes http_response_bytes(Worker w, int status, bytes ctype, bytes body, bytes extra, bint keep, int minor,
                               bint head_only):
    """The bytes http_write would queue, for an answer that must wait."""
    w.counters[HTTP_REQUESTS + http_status_index(status)] += 1
    if status == 503:
        w.counters[HTTP_REQUESTS_SHED] += 1
    http_update_date(w)
    conn_hdr = b"" if keep and minor == 1 else b"Connection: keep-alive\r\n" if keep else b"Connection: close\r\n"
    return (b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Length: %d\r\n%sContent-Type: %s\r\n%s\r\n"
            % (status, <bytes>http_reason(status), <bytes>w.http_date, len(body), conn_hdr, ctype, extra)
            + (b"" if head_only else body))


cdef void http_update_date(Worker w):
    """The Date header (RFC 9110 6.6.1), formatted once a second."""
    cdef time_t now = time(NULL)
    cdef tm t
    if now == w.http_date_s:
        return
    w.http_date_s = now
    gmtime_r(&now, &t)
    strftime(w.http_date, sizeof(w.http_date), b"%a, %d %b %Y %H:%M:%S GMT", &t)


cdef int http_fail(Worker w, Conn* c, int status, str code, str message):
    """A request the framing refuses: a JSON error, then the connection closes
    (its framing can no longer be trusted). Always returns -1."""
    cdef bytes body
    try:
        body = w.http_app.error_body(status, code, message)
    except Exception:
        body = b'{"code":"%s","message":"%s"}' % (code.encode(), message.encode())
    if status == 408:
        w.counters[HTTP_TIMEOUTS] += 1
    else:
        w.counters[HTTP_MALFORMED] += 1
        # The client may still be sending the request: the close lingers, so it reads this answer.
        w.http[c.fd].flags |= HF_LINGER_WANTED
    w.log_limited(CR_HTTP, "closed an HTTP connection: %d %s (%s)" % (status, code, message))
    if http_write(w, c, status, b"application/json", body, b"", False, 1, False) < 0:
        return -1
    w.close_after_flush(c)
    return -1


cdef void http_on_timer(Worker w, Conn* c):
    """http_timeout passed mid-request (408), or an idle keep-alive connection
    expired, or the drain grace ended."""
    cdef HttpState* st = &w.http[c.fd]
    if st.flags & HF_LINGER:
        if st.linger_left < w.http_linger_bytes:
            # It was still sending (or stopped without closing): it gets a reset.
            w.counters[HTTP_LINGER_CUT] += 1
        w.close_conn(c, CR_TIMEOUT)
        return
    if st.flags & HF_IN_REQUEST and not w.draining:
        http_fail(w, c, 408, "request_timeout",
                  "the request was not complete within http_timeout (%d s)" % (w.http_timeout_ms // 1000))
        return
    if st.flags & HF_QUERY and not w.draining:
        w.log_limited(CR_HTTP, "a store query was not answered within http_keepalive_timeout: "
                      "its connection is closed")
    w.counters[HTTP_TIMEOUTS] += 1
    w.close_conn(c, CR_TIMEOUT)


cdef bint http_linger_start(Worker w, Conn* c):
    """A closing connection's answer is written (Worker.flush): if the client may
    still be sending, shuts our side (FIN; close_notify first on TLS) and reads
    what comes, discarded, until it closes, for at most http_linger_bytes and
    http_linger_timeout. False: close now."""
    cdef HttpState* st = &w.http[c.fd]
    cdef uint64_t ms = w.http_linger_ms
    if not (st.flags & HF_LINGER_WANTED) or w.http_linger_bytes == 0 or ms == 0:
        return False
    st.flags = (st.flags & ~(HF_LINGER_WANTED | HF_IN_REQUEST)) | HF_LINGER
    st.linger_left = w.http_linger_bytes
    if c.ssl != NULL:
        ERR_clear_error()
        SSL_shutdown(c.ssl)
        ERR_clear_error()
    tls_close_notify(c)             # gw's TLS records (worker/tls_records.pyx)
    shutdown(c.fd, SHUT_WR)
    c.state = ST_AWAIT_CONNECT      # read again (process_http discards), no longer flushing
    c.need = 0
    if c.flags & F_PAUSED:
        c.flags &= ~F_PAUSED
        w.update_events(c)
    if w.draining and ms > HTTP_DRAIN_GRACE_MS:
        ms = HTTP_DRAIN_GRACE_MS
    wheel_schedule(&w.wheel, &c.timer, w.now_ms + ms)
    return True


cdef Py_ssize_t http_linger_input(Worker w, Conn* c, Py_ssize_t n):
    """Bytes read during a lingering close: discarded (all consumed), or the
    connection reset once they pass http_linger_bytes (-1)."""
    cdef HttpState* st = &w.http[c.fd]
    if n >= st.linger_left:
        w.counters[HTTP_LINGER_CUT] += 1
        w.log_limited(CR_HTTP, "an HTTP client kept sending after its early answer, over http_linger_bytes "
                      "(%d): connection reset" % w.http_linger_bytes)
        w.close_conn(c, CR_SERVER)
        return -1
    st.linger_left -= <uint32_t>n
    return n


cdef void http_start_drain(Worker w, Conn* c):
    """SIGTERM: the connection stays a moment, so a request already on its way
    is answered (503 from the app while draining, with Connection: close)."""
    cdef HttpState* st = &w.http[c.fd]
    st.flags |= HF_CLOSE
    wheel_schedule(&w.wheel, &c.timer, w.now_ms + HTTP_DRAIN_GRACE_MS)
