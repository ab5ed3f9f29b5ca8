# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Server TLS contexts built on OpenSSL directly.

Python's ssl module would put a Python object, a socket wrapper and OpenSSL's
buffers behind every connection. The worker instead holds one SSL_CTX and an
SSL* per connection, with SSL_MODE_RELEASE_BUFFERS so an idle TLS connection
keeps no 16 KiB record buffers.
"""

from gw_ext.openssl cimport *

# AEAD with forward secrecy only. ChaCha20-Poly1305 comes first (the server's
# preference): its per-connection cipher state is about half of AES-GCM's,
# which matters with 10,000s of idle TLS connections, and it is the fast
# choice for devices without AES instructions.
cdef const char* CIPHERS_TLS13 = b"TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"
cdef const char* CIPHERS_TLS12 = b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:" \
                b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:" \
                b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"


class TLSError(Exception):
    pass


def openssl_errors():
    """Drains OpenSSL's error queue into one readable string."""
    cdef unsigned long e
    cdef char buf[256]
    parts = []
    while True:
        e = ERR_get_error()
        if e == 0:
            break
        ERR_error_string_n(e, buf, sizeof(buf))
        parts.append(buf.decode("ascii", "replace"))
    return "; ".join(parts) or "unknown error"


cdef class TLSContext:
    """An SSL_CTX for accepting connections: TLS 1.2 minimum, modern ciphers only."""

    def __cinit__(self, str certfile, str keyfile):
        self.certfile = certfile
        self.keyfile = keyfile
        ERR_clear_error()
        self.ctx = SSL_CTX_new(TLS_server_method())
        if self.ctx == NULL:
            raise TLSError("SSL_CTX_new failed: " + openssl_errors())
        SSL_CTX_set_min_proto_version(self.ctx, TLS1_2_VERSION)
        SSL_CTX_set_options(self.ctx, SSL_OP_NO_COMPRESSION | SSL_OP_CIPHER_SERVER_PREFERENCE
                            | SSL_OP_NO_RENEGOTIATION)
        SSL_CTX_set_mode(self.ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE
                         | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
        # No server-side session cache: memory per connection matters more than
        # resumption; one stateless TLS 1.3 ticket still lets clients resume.
        SSL_CTX_set_session_cache_mode(self.ctx, SSL_SESS_CACHE_OFF)
        SSL_CTX_set_num_tickets(self.ctx, 1)
        if SSL_CTX_set_ciphersuites(self.ctx, CIPHERS_TLS13) != 1:
            raise TLSError("TLS 1.3 cipher suites rejected: " + openssl_errors())
        if SSL_CTX_set_cipher_list(self.ctx, CIPHERS_TLS12) != 1:
            raise TLSError("cipher list rejected: " + openssl_errors())
        SSL_CTX_set1_groups_list(self.ctx, b"X25519:P-256:P-384")
        cert = certfile.encode()
        key = keyfile.encode()
        if SSL_CTX_use_certificate_chain_file(self.ctx, cert) != 1:
            raise TLSError(f"cannot load certificate {certfile}: " + openssl_errors())
        if SSL_CTX_use_PrivateKey_file(self.ctx, key, SSL_FILETYPE_PEM) != 1:
            raise TLSError(f"cannot load private key {keyfile}: " + openssl_errors())
        if SSL_CTX_check_private_key(self.ctx) != 1:
            raise TLSError(f"private key {keyfile} does not match {certfile}: " + openssl_errors())

    def __dealloc__(self):
        # Connections still using it hold their own reference (SSL_new takes one).
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)
            self.ctx = NULL
