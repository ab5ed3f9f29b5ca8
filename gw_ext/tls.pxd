from gw_ext.openssl cimport SSL, SSL_CTX, X509

cdef enum:
    MAX_COMMON_NAME = 65535     # an MQTT string's limit: a longer CN is no user name

# Why a certificate's common name is no user name (x509_common_name).
cdef enum:
    CN_OK = 0
    CN_NO_CERT = 1
    CN_MISSING = 2
    CN_TOO_LONG = 3
    CN_NUL = 4
    CN_NOT_UTF8 = 5
    CN_CONTROL = 6

# Why a handshake failed over the client's certificate (client_refusal); the
# worker counts REFUSED_NO_CERT.. at TLS_REFUSED_NO_CERT + refusal - 1.
cdef enum:
    REFUSED_NONE = 0            # another reason (not TLS, a protocol error, ...)
    REFUSED_NO_CERT = 1
    REFUSED_BAD_CERT = 2        # unknown CA, bad signature, expired, ...
    REFUSED_REVOKED = 3

cdef int client_refusal(SSL* ssl) noexcept
cdef bytes x509_common_name(X509* cert, int* why)
cdef bytes peer_common_name(SSL* ssl, int* why)

cdef class TLSContext:
    cdef SSL_CTX* ctx
    cdef readonly str certfile
    cdef readonly str keyfile
    cdef readonly str client_cafile
    cdef readonly str crlfile
    cdef readonly bint require_certificate
    cdef readonly bint use_identity_as_username
    cdef readonly bint shared_tickets      # sealed with the keys every worker shares
