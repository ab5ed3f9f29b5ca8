# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Server TLS contexts built on OpenSSL directly.

Python's ssl module would put a Python object, a socket wrapper and OpenSSL's
buffers behind every connection. The worker instead holds one SSL_CTX and an
SSL* per connection, with SSL_MODE_RELEASE_BUFFERS so an idle TLS connection
keeps no 16 KiB record buffers.
"""

from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr
from cpython.bytes cimport PyBytes_FromStringAndSize

from gw_ext.codec cimport MAL_CONTROL, check_string
from gw_ext.openssl cimport *

cdef extern from "malloc.h" nogil:
    int malloc_trim(size_t pad)

cdef extern from "tls_tickets.h" nogil:
    int GW_TICKET_SECRET
    void gw_tickets_set_secret(const unsigned char* secret)
    void gw_tickets_forget_secret()
    int gw_tickets_have_secret()
    int gw_tickets_install(SSL_CTX* ctx, const unsigned char* binding, size_t length, long lifetime)

# AEAD with forward secrecy only. ChaCha20-Poly1305 comes first (the server's
# preference): its per-connection cipher state is about half of AES-GCM's,
# which matters with 10,000s of idle TLS connections, and it is the fast
# choice for devices without AES instructions.
cdef const char* CIPHERS_TLS13 = b"TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"
cdef const char* CIPHERS_TLS12 = b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:" \
                b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:" \
                b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"


# Which sessions may be resumed here (OpenSSL requires one when it verifies
# clients); tickets are sealed with each context's own keys anyway, so a
# ticket from before a reload (another CA or CRL) never resumes.
SESSION_ID_CONTEXT = b"gw"


class TLSError(Exception):
    pass


# Seconds each session-ticket key seals tickets (and a ticket may resume):
# set with the secret by the master before it forks (tls_ticket_lifetime).
# -1 until set: OpenSSL's own keys, one per context (a tool, a test).
cdef long ticket_lifetime = -1


def set_ticket_secret(bytes secret, long lifetime):
    """The master, before it forks: the secret from which every process derives
    the same session-ticket keys (tls_tickets.h), and their lifetime in seconds;
    0 issues no tickets. Contexts made afterwards use them."""
    global ticket_lifetime
    if lifetime < 0:
        raise ValueError("ticket lifetime must be >= 0")
    if lifetime == 0:
        gw_tickets_forget_secret()
    else:
        if len(secret) != GW_TICKET_SECRET:
            raise ValueError(f"ticket secret must be {GW_TICKET_SECRET} bytes")
        gw_tickets_set_secret(<const unsigned char*>secret)
    ticket_lifetime = lifetime


def release_free_heap():
    """Gives the free pages inside the heap back to the system (glibc's
    malloc_trim, which also releases whole free pages between live blocks).
    Each TLS handshake allocates and frees tens of KiB (record buffers, the key
    exchange, the signature, the ticket) among the long-lived objects of the
    connections made meanwhile, and the freed pages stay resident otherwise: the
    worker calls it from its once-a-second tick after a run of handshakes
    (gw/worker.py). True if memory was released."""
    cdef int released
    with nogil:
        released = malloc_trim(0)
    return released == 1


def ticket_secret_is_set():
    return bool(gw_tickets_have_secret())


cdef bytes read_binding_file(str path):
    if not path:
        return b""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""      # the context's own load reports it


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


# Why a common name cannot be a user name (CN_*, tls.pxd), for the log.
CN_REASONS = ["", "no client certificate", "no common name in the certificate's subject",
              "a common name over 65,535 bytes", "a NUL byte in the common name",
              "a common name that is not UTF-8", "a control character in the common name"]
# Why a handshake was refused over the client's certificate (REFUSED_*, tls.pxd), for the log.
REFUSAL_REASONS = ["", "no client certificate", "client certificate not valid", "client certificate revoked"]


cdef int client_refusal(SSL* ssl) noexcept:
    """After a failed handshake: whether the client's certificate was the reason
    (REFUSED_*), from the verification result and OpenSSL's error queue (which
    it drains: the caller clears it anyway)."""
    cdef long verdict = SSL_get_verify_result(ssl)
    cdef unsigned long e
    if verdict == X509_V_ERR_CERT_REVOKED:
        return REFUSED_REVOKED
    if verdict != X509_V_OK:
        return REFUSED_BAD_CERT
    while True:
        e = ERR_get_error()
        if e == 0:
            return REFUSED_NONE
        if ERR_GET_LIB(e) == ERR_LIB_SSL and ERR_GET_REASON(e) == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
            return REFUSED_NO_CERT


cdef bytes x509_common_name(X509* cert, int* why):
    """The subject's first common name, checked to be usable as an MQTT user
    name: 1-65,535 bytes of UTF-8 with no NUL (nor, unless mqtt_control_characters
    accepts them, control characters). None (and *why, a CN_*) if not."""
    cdef X509_NAME* name = X509_get_subject_name(cert)
    cdef int n, got, bad
    cdef char* buf
    why[0] = CN_MISSING
    if name == NULL:
        return None
    # With no buffer it answers the entry's length: checked before anything is copied.
    n = X509_NAME_get_text_by_NID(name, NID_commonName, NULL, 0)
    if n <= 0:
        return None
    if n > MAX_COMMON_NAME:
        why[0] = CN_TOO_LONG
        return None
    buf = <char*>malloc(<size_t>n + 1)
    if buf == NULL:
        raise MemoryError()
    try:
        got = X509_NAME_get_text_by_NID(name, NID_commonName, buf, n + 1)
        if got != n:
            return None
        if memchr(buf, 0, <size_t>n) != NULL:
            why[0] = CN_NUL
            return None
        # What a user name in CONNECT must be (the codec's check, with its
        # mqtt_control_characters policy).
        bad = check_string(<const uint8_t*>buf, <uint32_t>n)
        if bad:
            why[0] = CN_CONTROL if bad == MAL_CONTROL else CN_NOT_UTF8
            return None
        why[0] = CN_OK
        return PyBytes_FromStringAndSize(buf, n)
    finally:
        free(buf)


cdef bytes peer_common_name(SSL* ssl, int* why):
    """The common name of the certificate a TLS client presented (verified by
    the handshake), or None and *why (CN_*)."""
    cdef X509* cert = SSL_get1_peer_certificate(ssl)
    if cert == NULL:
        why[0] = CN_NO_CERT
        return None
    try:
        return x509_common_name(cert, why)
    finally:
        X509_free(cert)


def certificate_common_name(bytes pem):
    """The common name a PEM certificate gives as a user name (the worker's own
    check, for tests and tools); ValueError saying why it gives none."""
    cdef BIO* bio
    cdef X509* cert
    cdef int why = CN_OK
    if len(pem) > 1 << 20:
        raise ValueError("certificate over 1 MiB")
    ERR_clear_error()
    bio = BIO_new_mem_buf(<const char*>pem, <int>len(pem))
    if bio == NULL:
        raise MemoryError()
    cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)
    BIO_free(bio)
    if cert == NULL:
        raise ValueError("not a PEM certificate: " + openssl_errors())
    try:
        name = x509_common_name(cert, &why)
    finally:
        X509_free(cert)
    if name is None:
        raise ValueError(CN_REASONS[why])
    return name


def pem_block_line(str path, int index):
    """The line (from 1) where the PEM block after `index` loaded ones begins, for
    an error message; "?" if the file cannot be read again."""
    try:
        with open(path, "rb") as fh:
            seen = 0
            for number, line in enumerate(fh, 1):
                if line.startswith(b"-----BEGIN "):
                    if seen == index:
                        return str(number)
                    seen += 1
    except OSError:
        pass
    return "?"


cdef int load_crls(SSL_CTX* ctx, str crlfile) except -1:
    """Adds every CRL of a PEM file to the context's store and turns on the
    revocation check of client certificates. TLSError if the file holds none."""
    cdef X509_STORE* store = SSL_CTX_get_cert_store(ctx)
    cdef BIO* bio
    cdef X509_CRL* crl
    cdef int added = 0
    path = crlfile.encode()
    bio = BIO_new_file(path, b"r")
    if bio == NULL:
        raise TLSError(f"cannot read crlfile {crlfile}: " + openssl_errors())
    cdef unsigned long e
    try:
        while True:
            crl = PEM_read_bio_X509_CRL(bio, NULL, NULL, NULL)
            if crl == NULL:
                e = ERR_peek_last_error()
                if ERR_GET_LIB(e) == ERR_LIB_PEM and ERR_GET_REASON(e) == PEM_R_NO_START_LINE:
                    break       # no more PEM blocks: the end of the file
                # A block that does not load fails the whole file: a revocation
                # silently left out would let its certificate in.
                raise TLSError(f"crlfile {crlfile}: the CRL beginning on line {pem_block_line(crlfile, added)} "
                               f"does not load: " + openssl_errors())
            if X509_STORE_add_crl(store, crl) != 1:
                X509_CRL_free(crl)
                raise TLSError(f"crlfile {crlfile}: the CRL beginning on line {pem_block_line(crlfile, added)} "
                               f"was refused: " + openssl_errors())
            X509_CRL_free(crl)      # the store took its own reference
            added += 1
    finally:
        BIO_free(bio)
    ERR_clear_error()
    if added == 0:
        raise TLSError(f"crlfile {crlfile} holds no PEM CRL")
    X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK)
    return added


cdef int build_chain_once(SSL_CTX* ctx, str certfile) except -1:
    """A certificate file that holds only the server's own certificate leaves
    OpenSSL to build the chain it sends from the context's certificate store,
    again in every handshake (ssl_add_cert_chain: an X509_STORE_CTX and a
    verification, whose result it ignores). Built here once instead, from the
    same store (client_cafile's CAs when loaded), so every handshake sends
    what it sent before. A file that holds a chain is sent as it is."""
    cdef STACK_OF_X509* chain = NULL
    SSL_CTX_get0_chain_certs(ctx, &chain)
    if chain != NULL:
        return 0
    if SSL_CTX_build_cert_chain(ctx, SSL_BUILD_CHAIN_FLAG_IGNORE_ERROR | SSL_BUILD_CHAIN_FLAG_CLEAR_ERROR) == 0:
        raise TLSError(f"the certificate chain of {certfile} is refused: " + openssl_errors())
    return 1


cdef class TLSContext:
    """An SSL_CTX for accepting connections: TLS 1.2 minimum, modern ciphers only;
    with require_certificate, clients must present a certificate that
    client_cafile's CAs signed and crlfile does not revoke."""

    def __cinit__(self, str certfile, str keyfile, str client_cafile="", str crlfile="",
                  bint require_certificate=False, bint use_identity_as_username=False):
        self.certfile = certfile
        self.keyfile = keyfile
        self.client_cafile = client_cafile
        self.crlfile = crlfile
        self.require_certificate = require_certificate
        self.use_identity_as_username = use_identity_as_username
        if use_identity_as_username and not require_certificate:
            raise TLSError("use_identity_as_username needs require_certificate")
        if require_certificate and not client_cafile:
            raise TLSError("require_certificate needs client_cafile")
        if crlfile and not require_certificate:
            raise TLSError("crlfile needs require_certificate")
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
        # resumption by id; one stateless ticket (TLS 1.3, or TLS 1.2's
        # extension) lets a reconnecting client resume on any worker, sealed
        # with the keys every worker derives from the master's secret.
        SSL_CTX_set_session_cache_mode(self.ctx, SSL_SESS_CACHE_OFF)
        if gw_tickets_have_secret() and ticket_lifetime > 0:
            # What the handshake verifies binds the keys: a ticket from before a
            # reload that changed the client CA or the CRLs does not resume.
            binding = b"\0".join([b"gw tickets", b"%d%d" % (require_certificate, use_identity_as_username),
                                   client_cafile.encode(), read_binding_file(client_cafile),
                                   crlfile.encode(), read_binding_file(crlfile)])
            if gw_tickets_install(self.ctx, <const unsigned char*>binding, len(binding), ticket_lifetime) != 1:
                raise TLSError("session ticket keys: " + openssl_errors())
            SSL_CTX_set_timeout(self.ctx, ticket_lifetime)
            SSL_CTX_set_num_tickets(self.ctx, 1)
            self.shared_tickets = True
        elif ticket_lifetime == 0:
            SSL_CTX_set_options(self.ctx, SSL_OP_NO_TICKET)
            SSL_CTX_set_num_tickets(self.ctx, 0)
        else:
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
        if require_certificate:
            # Without a session id context OpenSSL fails the handshake of a client
            # that resumes a session (a TLS 1.3 ticket) once it verifies peers.
            SSL_CTX_set_session_id_context(self.ctx, <const unsigned char*>SESSION_ID_CONTEXT,
                                           len(SESSION_ID_CONTEXT))
            if SSL_CTX_load_verify_locations(self.ctx, client_cafile.encode(), NULL) != 1:
                raise TLSError(f"cannot load client_cafile {client_cafile}: " + openssl_errors())
            if crlfile:
                load_crls(self.ctx, crlfile)
            # OpenSSL's own verification (chain, dates, CRL); a failure ends the
            # handshake with its alert, and the worker counts why (client_refusal).
            SSL_CTX_set_verify(self.ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL)
        build_chain_once(self.ctx, certfile)

    def __dealloc__(self):
        # Connections still using it hold their own reference (SSL_new takes one).
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)
            self.ctx = NULL
