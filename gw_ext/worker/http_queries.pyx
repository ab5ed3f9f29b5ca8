# Included by loop.pyx. The query routes (/v1/devices..., /v1/alerts...) run in
# the worker's query threads (gw/query_pool.py), never in its loop: http.pyx's
# http_dispatch hands a request to them with a token naming its connection and
# stops reading that connection; their answers come back through an eventfd
# in the epoll set (ST_QUERY, query_readable) and are written in request
# order, then the connection is read again. An answer whose connection closed
# meanwhile (its fd and generation no longer match) is dropped.

cdef inline object http_query_token(Conn* c):
    """Names a connection for the query threads: its fd and generation, so an
    answer for a connection closed meanwhile (its fd maybe reused) is dropped."""
    return (<uint64_t>c.gen << 32) | <uint32_t>c.fd


cdef void query_readable(Worker w):
    """The query threads' eventfd: answers are ready."""
    cdef list done
    try:
        done = w.query_pool.drain()
    except Exception:
        w.log_limited(CR_PYTHON, "the query threads' answers could not be read")
        return
    w.counters[QUERIES_PENDING] = w.query_pool.pending
    for item in done:
        try:
            query_answered(w, item[0], item[1])
        except Exception:       # a bug: this answer is lost, the others go on
            w.log_limited(CR_PYTHON, "a store query's answer could not be written")


cdef void query_answered(Worker w, object token, object answer) except *:
    """Writes a query's answer on its connection, unless it closed meanwhile,
    then reads the connection again (its pipelined requests, if any)."""
    cdef uint64_t t = token
    cdef uint32_t fd = <uint32_t>(t & 0xffffffff)
    cdef uint32_t gen = <uint32_t>(t >> 32)
    cdef Conn* c
    cdef HttpState* st
    cdef bint keep, head_only
    if fd >= <uint32_t>w.nconns:
        return
    c = &w.conns[fd]
    if c.gen != gen or c.state != ST_AWAIT_CONNECT or c.proto != PROTO_HTTP:
        return                  # closed meanwhile: the answer is dropped
    st = &w.http[fd]
    if not (st.flags & HF_QUERY):
        return
    keep = (st.flags & HF_QUERY_KEEP) != 0 and not ((st.flags & HF_CLOSE) != 0 or w.draining)
    head_only = (st.flags & HF_QUERY_HEAD) != 0
    st.flags &= ~(HF_QUERY | HF_QUERY_KEEP | HF_QUERY_HEAD)
    if not keep and c.inlen:
        st.flags |= HF_LINGER_WANTED        # pipelined requests it will not read
    if http_answer(w, c, answer, 0, keep, st.query_minor, head_only) < 0 or c.state != ST_AWAIT_CONNECT:
        return
    c.flags &= ~F_PAUSED
    w.update_events(c)
    if not (st.flags & HF_CLOSE):
        wheel_schedule(&w.wheel, &c.timer, w.now_ms + w.http_keepalive_ms)
    if c.inlen and w.resume_input(c) < 0:
        return
    if c.state == ST_AWAIT_CONNECT and not (c.flags & F_PAUSED) and tls_pending(c):
        w.on_readable(c)        # bytes OpenSSL decrypted already: epoll cannot see them
