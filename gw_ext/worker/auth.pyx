# Included by loop.pyx. Who may connect: a CONNECT's user name and password,
# checked before its session is claimed (registry.pyx); a JSON-lines Connect's
# (jsonlines.pyx) by the same rules, through the same threads and cache,
# answered with an Error line instead of a CONNACK.
#
# - No user name: accepted while anonymous access is allowed
#   (Worker.allow_anonymous, from `allow_anonymous`, gw/auth.py), else
#   CONNACK 0x05.
# - A user name with a password file in force: its password must verify, else
#   CONNACK 0x04 (no password, unknown user, wrong password alike). Without a
#   password file a user name is taken as given while anonymous access is
#   allowed (Mosquitto's behaviour), else CONNACK 0x05.
# - Checking a password is a hash that may take tens of ms, so it does not run
#   here (but for a file of cheap hashes, `auth_inline_iterations`, such as
#   mosquitto_passwd makes: about 70 us, less than a hand-off): the worker's auth threads (a gw/query_pool.py QueryPool running
#   gw.auth.Authenticator.verify) do it, and answer through an eventfd in the
#   epoll set (ST_AUTH, auth_readable). The CONNECT is held meanwhile: its
#   connection is ST_SETTLING with no claim (pending_token 0), so it reads
#   nothing more, and its connect timeout still runs (then it is answered as a
#   busy server: CONNACK 0x03). The answer finds the
#   connection by fd and generation; one closed meanwhile is gone, and the
#   answer is dropped. A check verified recently (Authenticator.cached: a
#   digest and a dict look-up) is not queued at all.
# - Refusals are counted (AUTH_REFUSED_*) and logged at most once per 10 s
#   per reason, with the client's address, never the password.


cdef enum:                  # in the order of CR_AUTH_* (loop.pxd) and AUTH_COUNTER
    AUTH_LOG_ANONYMOUS = 0
    AUTH_LOG_PASSWORD = 1
    AUTH_LOG_TAKEOVER = 2
    AUTH_LOG_BUSY = 3

cdef uint32_t[4] AUTH_COUNTER = [AUTH_REFUSED_ANONYMOUS, AUTH_REFUSED_PASSWORD, AUTH_REFUSED_TAKEOVER,
                                 AUTH_REFUSED_BUSY]


cdef int auth_connect(Worker w, Conn* c, PendingConnect pc, const uint8_t* password, uint32_t password_len,
                      bint has_password):
    """pc.username is who the client says it is (None: no user name).
    0: go on now (claim the session; JSON lines: connected); 1: held for its
    password check; -1: refused (answered, closing)."""
    cdef bytes user, secret
    cdef Listener* l = &w.listeners[c.listener]
    if l.identity_username and c.ssl != NULL:
        return 0                        # use_identity_as_username: the verified certificate's CN is who it is
    # On a listener that requires a client certificate, the handshake already
    # proved the client: one without a user name is let in (as anonymous for
    # the ACL), unless allow_anonymous = false asks for user names everywhere.
    if pc.username is None:
        if w.allow_anonymous or (l.client_certificate and w.certificate_anonymous):
            return 0
        auth_refuse(w, c, CONNACK_NOT_AUTHORIZED, AUTH_LOG_ANONYMOUS)
        return -1
    user = pc.username                  # the identity the password must prove
    if w.authenticator is None:
        # No password file: a user name is taken on the client's word only where
        # anyone may connect; a certificate proves who holds it, not a name it claims.
        if w.allow_anonymous:
            return 0
        auth_refuse(w, c, CONNACK_NOT_AUTHORIZED, AUTH_LOG_ANONYMOUS)
        return -1
    if not has_password:
        auth_refuse(w, c, CONNACK_BAD_AUTH, AUTH_LOG_PASSWORD)
        return -1
    secret = PyBytes_FromStringAndSize(<char*>password, password_len)
    if w.authenticator.cached(user, secret):
        return 0
    if w.auth_pool is None or w.authenticator.inline:
        # A file of cheap hashes (auth_inline_iterations, gw/auth.py): checked here,
        # cheaper than a hand-off to the auth thread and back. auth_threads = 0:
        # any hash runs here, and the whole worker waits for it.
        if w.authenticator.verify(user, secret):
            return 0
        auth_refuse(w, c, CONNACK_BAD_AUTH, AUTH_LOG_PASSWORD)
        return -1
    w.auth_token += 1
    if w.auth_token == 0:
        w.auth_token = 1
    if not w.auth_pool.submit(w.auth_token, w.authenticator.verify, user, secret):
        auth_refuse(w, c, CONNACK_UNAVAILABLE, AUTH_LOG_BUSY)
        return -1
    w.auth_waiting[w.auth_token] = pc
    c.state = ST_SETTLING
    c.pending_token = 0          # no claim yet: auth_readable makes it
    w.update_events(c)           # read nothing more until answered
    return 1


cdef void auth_readable(Worker w):
    """The auth threads answered: claim the sessions of the CONNECTs that
    verified, refuse the others; answers for connections gone are dropped."""
    cdef PendingConnect pc
    cdef Conn* c
    for token, ok in w.auth_pool.drain():
        pc = w.auth_waiting.pop(token, None)
        if pc is None:
            continue
        c = &w.conns[pc.fd]
        if c.state != ST_SETTLING or c.gen != pc.gen or c.pending_token != 0:
            continue             # the client left while its password was checked
        if ok is True:
            if pc.json_reply is not None:
                json_connected(w, c, pc)        # jsonlines.pyx
            else:
                connect_claim(w, c, pc)
        else:
            auth_refuse(w, c, CONNACK_BAD_AUTH, AUTH_LOG_PASSWORD)


cdef void auth_refuse(Worker w, Conn* c, uint8_t code, int why):
    """CONNACK `code` (JSON lines: an Error line saying why), counted and
    logged, then the connection closes."""
    cdef uint8_t* out
    w.counters[AUTH_COUNTER[why]] += 1
    if c.state == ST_SETTLING:
        c.state = ST_AWAIT_CONNECT   # no longer held: close_after_flush takes it from here
    if c.proto == PROTO_JSON:
        json_auth_refuse(w, c, why)      # jsonlines.pyx
        return
    w.counters[CONNACK_REFUSED] += 1
    if why == AUTH_LOG_ANONYMOUS:
        auth_log(w, why, c.fd, "refused a CONNECT without a user name: anonymous access is off "
                 "(allow_anonymous)")
    elif why == AUTH_LOG_PASSWORD:
        auth_log(w, why, c.fd, "refused a CONNECT: bad user name or password")
    elif why == AUTH_LOG_TAKEOVER:
        auth_log(w, why, c.fd, "refused a CONNECT: its client id is held by a session of another user")
    else:
        auth_log(w, why, c.fd, "refused a CONNECT: the password checks are behind (auth_max_pending "
                 "waiting, or its own not done within connect_timeout)")
    if c.version == 5:
        out = w.reserve(c, connack5_size(0))
        if out == NULL:
            return
        encode_connack5(out, 0, connack_code5(code), NULL, 0)     # 0x86, 0x87, 0x88 (worker/mqtt5.pyx)
    else:
        out = w.reserve(c, 4)
        if out == NULL:
            return
        encode_connack(out, 0, code)
    w.counters[PKT_OUT + CONNACK] += 1
    w.close_after_flush(c)


cdef void auth_log(Worker w, int why, int fd, str message):
    """Logs a refusal at most once per 10 s per reason, with the client's address."""
    w.log_client(CR_AUTH_ANONYMOUS + why, fd, message)
