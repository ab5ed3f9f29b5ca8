# gw's own TLS 1.3 record layer (tls_record_layer = "gw"), included into loop.pyx.
#
# OpenSSL runs the handshake. When it has finished a TLS 1.3 one with an AEAD
# suite, the connection's records are sealed and opened by gw_ext/tls_records.c
# and its SSL object is freed (what kernel TLS does, in user space): an idle
# TLS connection then holds its Conn and Conn.tls (secrets, keys, IVs,
# sequence numbers), no OpenSSL object. Everything else stays on OpenSSL as
# with tls_record_layer = "openssl": TLS 1.2, another suite, and listeners
# that take the client certificate's CN as the user name (read from the SSL
# at CONNECT). Each hook below is called where loop.pyx would otherwise call
# OpenSSL: the accept, the end of the handshake, a read, the flush, the close.

cdef void tls_attach(Worker w, Conn* c) noexcept:
    """At accept, before the handshake: the state that collects the traffic
    secrets and counts the records around the Finished messages."""
    if w.tls_own_records and not w.listeners[c.listener].identity_username:
        c.tls = gw_tlsrec_attach(c.ssl)     # NULL: stays on OpenSSL


cdef int tls_handshake_flush(Conn* c) noexcept:
    """A handshake step wants more input: what it wrote (OpenSSL writes the
    handshake into memory while gw's layer is attached), sent. 1: all out;
    0: the socket is full (wait for EPOLLOUT); -1: a socket error."""
    if c.tls == NULL:
        return 1
    return gw_tlsrec_handshake_flush(c.tls, c.ssl, c.fd)


cdef void tls_handshake_failed(Conn* c) noexcept:
    """The handshake failed: OpenSSL's alert goes out now, best effort."""
    if c.tls != NULL:
        gw_tlsrec_handshake_flush(c.tls, c.ssl, c.fd)


cdef int tls_take_over(Worker w, Conn* c) noexcept:
    """SSL_do_handshake() returned 1: the records are gw's from here on (the
    SSL freed; what its last step wrote, the session ticket, goes out with
    this turn's flush, in the same send as the CONNACK when the CONNECT came
    with the client's Finished), or the connection stays on OpenSSL. 0, or
    -1: what the handshake wrote could not be sent (the caller closes the
    connection)."""
    cdef int r
    if c.tls == NULL:
        return 0
    r = gw_tlsrec_takeover(c.tls, c.ssl)
    ERR_clear_error()
    if r == 1:
        SSL_free(c.ssl)
        c.ssl = NULL
        w.counters[TLS_OWN_RECORDS] += 1
        if gw_tlsrec_wants_write(c.tls):
            mark_dirty(w, c)
        return 0
    gw_tlsrec_free(c.tls)
    c.tls = NULL
    if r < 0:
        return -1
    w.counters[TLS_OPENSSL_RECORDS] += 1
    return 0


cdef Py_ssize_t tls_read(Worker w, Conn* c, uint8_t* buf, size_t cap) noexcept:
    """Worker.sock_read's contract: > 0 plaintext bytes; 0 nothing now; -1
    the peer closed; -2 an error (a refused record: counted, its alert
    queued)."""
    cdef ssize_t n = gw_tlsrec_read(c.tls, c.fd, buf, cap, w.counters)
    if gw_tlsrec_wants_write(c.tls) and is_client_state(c.state):
        # A KeyUpdate the client asked for, or an alert: out with this turn's flush.
        mark_dirty(w, c)
    if n < -1:
        return -2
    return n


cdef bint tls_pending(Conn* c) noexcept:
    """Input a read hands over now that epoll cannot see (OpenSSL's decrypted
    bytes, or records gw's layer holds)."""
    if c.ssl != NULL:
        return SSL_pending(c.ssl) > 0
    return c.tls != NULL and gw_tlsrec_pending(c.tls)


cdef int tls_flush(Worker w, Conn* c) noexcept:
    """Worker.flush for gw's records: what the turn wrote, sealed and sent in
    one send (64 KiB of plaintext per send). 1: everything out; 0: the
    socket is full (EPOLLOUT armed, the rest of the ciphertext kept); -1:
    closed."""
    cdef size_t consumed = 0
    cdef const uint8_t* plain = c.outbuf + c.outoff if c.outbuf != NULL else NULL
    cdef int r = gw_tlsrec_flush(c.tls, c.fd, plain, c.outlen - c.outoff, &consumed, w.counters)
    c.outoff += <uint32_t>consumed
    w.counters[BYTES_OUT] += consumed
    if r == 0:
        w.set_pollout(c, True)
        return 0
    if r < 0:
        w.close_conn(c, CR_ERROR)
        return -1
    return 1


cdef void tls_close_notify(Conn* c) noexcept:
    """close_notify (after what is left to send), once, best effort: the
    lingering closes of HTTP and WebSocket, and release."""
    if c.tls != NULL and c.ssl == NULL:
        gw_tlsrec_close_notify(c.tls, c.fd)


cdef void tls_release(Conn* c) noexcept:
    """Frees gw's record state (secrets wiped), after the SSL if both exist
    (a handshake that did not finish)."""
    if c.tls != NULL:
        gw_tlsrec_free(c.tls)
        c.tls = NULL


gw_tlsrec_counters(TLS_RECORDS_REFUSED, TLS_KEY_UPDATES_IN, TLS_KEY_UPDATES_OUT)


# --- the record parser on its own (tests, fuzz/fuzz_tls_records.py) -------------

def tls_records_open(int suite, bytes secret, bytes data, Py_ssize_t cap=1 << 20):
    """Opens the TLS 1.3 records of data as gw's read side keyed by secret (the
    client's traffic secret; suite 0x1301, 0x1302 or 0x1303), sequence
    numbers from 0: (status, plaintext, bytes of data consumed); status is
    the plaintext's length, or -1 close_notify, -2 another alert, -3 refused."""
    cdef size_t used = 0
    if cap < 0:
        raise ValueError("cap must not be negative")
    cdef bytearray out = bytearray(max(cap, 1))
    cdef uint8_t* o = out
    cdef ssize_t n = gw_tlsrec_parse(suite, secret, len(secret), data, len(data), o, cap, &used)
    if n == -2 and suite not in (0x1301, 0x1302, 0x1303):
        raise ValueError("unknown suite or secret length")
    return n, bytes(out[:n if n > 0 else 0]), used


def tls_records_seal(int suite, bytes secret, bytes plain, uint64_t seq=0, int content_type=23):
    """Records of plain (at most 16,384 bytes each, inner type content_type)
    sealed with the keys of secret from sequence number seq: the other end of
    tls_records_open."""
    cdef Py_ssize_t cap = len(plain) + (len(plain) // 16384 + 1) * 22
    cdef bytearray out = bytearray(cap)
    cdef uint8_t* o = out
    cdef ssize_t n = gw_tlsrec_seal(suite, secret, len(secret), seq, content_type, plain, len(plain), o, cap)
    if n < 0:
        raise ValueError("unknown suite or secret length")
    return bytes(out[:n])


def tls_record_state_size():
    """Bytes of gw's record state per TLS connection (Conn.tls)."""
    return gw_tlsrec_state_size()
