# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""TLS clients for `gw bench`'s connection scenario, on OpenSSL directly.

Python's ssl module puts an SSLSocket, an _ssl._SSLSocket and an exception
for every would-block behind each client. Here a client is
one SSL* on the socket's fd, driven by the connection engine's epoll loop
(gwbench/connections.py): one SSL_CTX per process built from --cafile, SSL_new per
client, non-blocking SSL_connect, SSL_read_ex/SSL_write_ex.

What is measured does not change: the handshake is the one Python's
ssl.SSLContext(PROTOCOL_TLS_CLIENT) makes (same protocol versions, cipher
list and options; certificate verification against --cafile or the system
store; IP address or host name check, SNI for names) unless --insecure.

Where a client's CPU went (perf, py-spy: ~0.8 ms per connection with
Python's ssl) and what is left of it:
- OpenSSL 3.0's provider decoders for the server certificate's key, a
  quarter of it: use_legacy_ec_keys() below;
- the Python ssl layer, ~0.1 ms: gone;
- read-ahead: one read() for the server's whole flight instead of a header
  read and a body read per record;
- the rest is the handshake itself (X25519, two ECDSA verifications, chain
  building) and the kernel's loopback TCP.
SSL_MODE_RELEASE_BUFFERS keeps idle clients free of 16 KiB record buffers.
"""

cimport cython
from libc.errno cimport errno, EAGAIN, EINTR
from libc.string cimport strerror
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals

from gw_ext.netio cimport epoll_event
from gw_ext.openssl cimport *

import os

# OpenSSL 3.0 decodes the public key of every certificate it parses through
# its provider decoders: OSSL_DECODER_CTX_new_for_pkey enumerates every key
# manager and decoder of the library context, under locks, for each
# certificate. That was the largest single cost of a bench TLS client (about
# a quarter of its CPU; OpenSSL 3.1 added a cache for it). For EC keys the
# library still has its built-in ASN.1 decoder, the one OpenSSL 1.1.1 used,
# and x509_pubkey_decode takes that path when an ENGINE claims the key type.
# This registers an ENGINE that claims EC and hands back OpenSSL's own
# built-in EC method (EVP_PKEY_meth_find): the same checks (chain, signature,
# CertificateVerify) on the same EC code, minus the decoder search. Only in
# the bench's connection workers; other key types (RSA...) are untouched.
cdef extern from "legacy_ec_keys.h":
    int gw_use_legacy_ec_keys() nogil


def use_legacy_ec_keys():
    """Decode EC certificate keys with OpenSSL's built-in EC method instead of
    the provider decoders (see above), for this process. Call before building
    a ClientContext (its CA certificates are decoded then). True if on."""
    return gw_use_legacy_ec_keys() == 1

# Python's default for PROTOCOL_TLS_CLIENT (CPython 3.11, Modules/_ssl.c):
# the TLS 1.2 cipher list; TLS 1.3 suites are OpenSSL's defaults.
cdef const char* PY_CIPHERS = b"@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM"

DEF RBUF = 65536

# handshake() results
DONE = 0
WANT_READ = 1
WANT_WRITE = 2


class TLSError(Exception):
    """A TLS failure; `kind` is the error name the bench reports (the same
    names as for Python's ssl errors: tls_verify_failed, tls_<reason>)."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


cdef str _errors(unsigned long first):
    """Drains OpenSSL's error queue into one readable string."""
    cdef unsigned long e = first
    cdef char buf[256]
    parts = []
    while e != 0:
        ERR_error_string_n(e, buf, sizeof(buf))
        parts.append(buf.decode("ascii", "replace"))
        e = ERR_get_error()
    return "; ".join(parts) or "unknown error"


cdef class ClientContext:
    """One SSL_CTX for all the clients of a process."""

    cdef SSL_CTX* ctx
    cdef bint verify
    cdef bytes sni
    cdef char rbuf[RBUF]

    def __cinit__(self, cafile, bint insecure, server_hostname):
        """server_hostname: checked against the certificate (and sent as SNI
        when it is a name, not an address) unless insecure."""
        cdef X509_VERIFY_PARAM* param
        ERR_clear_error()
        self.ctx = SSL_CTX_new(TLS_client_method())
        if self.ctx == NULL:
            raise TLSError("tls_error", "SSL_CTX_new failed: " + _errors(ERR_get_error()))
        SSL_CTX_set_min_proto_version(self.ctx, TLS1_2_VERSION)
        SSL_CTX_set_options(self.ctx, SSL_OP_ALL | SSL_OP_NO_SSLv3 | SSL_OP_NO_COMPRESSION
                            | SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_ENABLE_MIDDLEBOX_COMPAT)
        if SSL_CTX_set_cipher_list(self.ctx, PY_CIPHERS) != 1:
            raise TLSError("tls_error", "cipher list rejected: " + _errors(ERR_get_error()))
        SSL_CTX_set_mode(self.ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE
                         | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_AUTO_RETRY)
        SSL_CTX_set_read_ahead(self.ctx, 1)
        self.verify = not insecure
        self.sni = None
        if insecure:
            SSL_CTX_set_verify(self.ctx, SSL_VERIFY_NONE, NULL)
            return
        SSL_CTX_set_verify(self.ctx, SSL_VERIFY_PEER, NULL)
        if cafile:
            if SSL_CTX_load_verify_locations(self.ctx, os.fsencode(cafile), NULL) != 1:
                raise TLSError("tls_bad_cafile", f"cannot load CA file {cafile}: " + _errors(ERR_get_error()))
        elif SSL_CTX_set_default_verify_paths(self.ctx) != 1:
            raise TLSError("tls_error", "cannot load the system CA store: " + _errors(ERR_get_error()))
        # Every SSL inherits the context's verification parameters (SSL_new
        # copies them), host name included.
        param = SSL_CTX_get0_param(self.ctx)
        X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_TRUSTED_FIRST)
        X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
        if server_hostname:
            host = server_hostname.encode("idna") if not _is_ip(server_hostname) else server_hostname.encode()
            if _is_ip(server_hostname):
                ok = X509_VERIFY_PARAM_set1_ip_asc(param, host)
            else:
                ok = X509_VERIFY_PARAM_set1_host(param, host, len(host))
                self.sni = host
            if ok != 1:
                raise TLSError("tls_error", f"bad server host name {server_hostname!r}")

    def __dealloc__(self):
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)   # clients still open hold their own reference
            self.ctx = NULL

    def wrap(self, int fd):
        """A client on a connected, non-blocking socket (the caller keeps
        owning the fd and closes it after TLSConn.close())."""
        cdef TLSConn t = TLSConn.__new__(TLSConn)
        ERR_clear_error()
        t.ssl = SSL_new(self.ctx)
        if t.ssl == NULL:
            raise TLSError("tls_error", "SSL_new failed: " + _errors(ERR_get_error()))
        t.ctx = self
        if SSL_set_fd(t.ssl, fd) != 1:
            raise TLSError("tls_error", "SSL_set_fd failed: " + _errors(ERR_get_error()))
        if self.sni is not None:
            SSL_set_tlsext_host_name(t.ssl, <const char*>self.sni)
        SSL_set_connect_state(t.ssl)
        return t


def _is_ip(str host):
    import ipaddress
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


@cython.no_gc
cdef class TLSConn:
    """One client's SSL*. Would-block is a return value, never an exception."""

    cdef SSL* ssl
    cdef ClientContext ctx

    def __dealloc__(self):
        if self.ssl != NULL:
            SSL_free(self.ssl)
            self.ssl = NULL

    cdef int _fail(self, int ret) except -1:
        """Turns a failed call into a return code (want read / want write) or
        an exception: TLSError, OSError (socket errors), or EOFError."""
        cdef int saved = errno
        cdef int err = SSL_get_error(self.ssl, ret)
        cdef unsigned long e
        cdef long vr
        if err == SSL_ERROR_WANT_READ:
            return WANT_READ
        if err == SSL_ERROR_WANT_WRITE:
            return WANT_WRITE
        if err == SSL_ERROR_ZERO_RETURN:
            raise EOFError("close_notify")
        if err == SSL_ERROR_SYSCALL:
            e = ERR_get_error()
            if e == 0:
                if saved == EAGAIN or saved == EINTR:
                    return WANT_READ
                if saved == 0:
                    raise EOFError("eof")
                raise OSError(saved, strerror(saved).decode("ascii", "replace"))
            raise TLSError("tls_error", _errors(e))
        if err == SSL_ERROR_SSL:
            # The error that ended the handshake is the last one queued (as
            # Python's ssl reads it); a failed signature check queues its own
            # errors first.
            e = ERR_peek_last_error()
            if ERR_GET_LIB(e) == ERR_LIB_SSL and ERR_GET_REASON(e) == SSL_R_UNEXPECTED_EOF_WHILE_READING:
                ERR_clear_error()   # the peer closed without close_notify: an EOF
                raise EOFError("eof")   # (Python's ssl: suppress_ragged_eofs)
            vr = SSL_get_verify_result(self.ssl)
            if ((ERR_GET_LIB(e) == ERR_LIB_SSL and ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED)
                    or (vr != X509_V_OK and self.ctx.verify)):
                ERR_clear_error()
                raise TLSError("tls_verify_failed", "certificate verify failed: "
                               + X509_verify_cert_error_string(vr).decode("ascii", "replace"))
            reason = ERR_reason_error_string(e) if e else NULL
            kind = "tls_" + reason.decode("ascii", "replace").replace(" ", "_").lower() if reason != NULL else "tls_error"
            raise TLSError(kind, _errors(ERR_get_error()))
        raise TLSError("tls_error", f"SSL error {err}")

    def handshake(self):
        """One step of the handshake: DONE, WANT_READ or WANT_WRITE."""
        cdef int r
        if self.ssl == NULL:
            raise ValueError("closed")
        ERR_clear_error()
        r = SSL_connect(self.ssl)
        if r == 1:
            return DONE
        try:
            return self._fail(r)
        except EOFError:
            raise TLSError("tls_unexpected_eof_while_reading", "the server closed the connection "
                           "during the TLS handshake") from None

    def send(self, const unsigned char[::1] data):
        """Writes what it can (at least one record's worth, unless the socket
        is full): the number of bytes taken, 0 when it would block."""
        cdef size_t n = data.shape[0]
        cdef size_t done = 0
        if self.ssl == NULL:
            raise ValueError("closed")
        if n == 0:
            return 0
        ERR_clear_error()
        if SSL_write_ex(self.ssl, &data[0], n, &done) == 1:
            return done
        try:
            self._fail(0)
        except EOFError:
            raise ConnectionResetError(32, "connection closed") from None
        return 0

    def recv(self):
        """Everything readable now (up to 64 KiB) as bytes; b"" at the end of
        the stream; None when nothing is there yet."""
        cdef size_t got = 0
        cdef int r
        if self.ssl == NULL:
            raise ValueError("closed")
        ERR_clear_error()
        r = SSL_read_ex(self.ssl, self.ctx.rbuf, RBUF, &got)
        if r == 1:
            return PyBytes_FromStringAndSize(self.ctx.rbuf, got)
        try:
            self._fail(r)
        except EOFError:
            return b""
        return None

    def has_pending(self):
        """Bytes OpenSSL holds already (read ahead): read again before epoll."""
        return SSL_has_pending(self.ssl) == 1

    def version(self):
        cdef const char* v = SSL_get_version(self.ssl)
        return v.decode() if v != NULL else None

    def cipher(self):
        cdef const char* c = SSL_get_cipher_name(self.ssl)
        return c.decode() if c != NULL else None

    def close(self):
        """Frees the SSL (no close_notify, as Python's SSLSocket.close()); the
        caller closes the fd."""
        if self.ssl != NULL:
            SSL_free(self.ssl)
            self.ssl = NULL


# -- waiting -------------------------------------------------------------------
# select.epoll.poll() rounds its timeout up to whole milliseconds, so every
# connect on the ramp started up to 1 ms late (p50 ~0.5 ms of ramp lag).
# epoll_pwait2 (Linux 5.11) takes a timespec.

cdef extern from "epoll_wait_ns.h":
    int gw_epoll_wait_ns(int epfd, epoll_event* evs, int n, double timeout) nogil

DEF MAXEV = 1024
cdef epoll_event _evs[MAXEV]


def epoll_wait(int epfd, double timeout, int maxevents=MAXEV):
    """select.epoll(...).poll(timeout, maxevents) with a timeout precise to
    the microsecond, on the epoll object's fileno(): a list of (fd, events);
    [] after a signal."""
    cdef int r, i
    cdef int m = maxevents if 0 < maxevents <= MAXEV else MAXEV
    with nogil:
        r = gw_epoll_wait_ns(epfd, _evs, m, timeout)
    if r < 0:
        if errno == EINTR:
            PyErr_CheckSignals()
            return []
        raise OSError(errno, strerror(errno).decode("ascii", "replace"))
    return [(_evs[i].data.fd, _evs[i].events) for i in range(r)]
