# The few OpenSSL 3 calls gw makes, declared for Cython. The worker drives TLS
# itself (non-blocking handshakes in its epoll loop, SSL_read/SSL_write on the
# socket) so a TLS connection costs an SSL object and nothing else.

cdef extern from "openssl/ssl.h" nogil:
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_METHOD:
        pass

    const SSL_METHOD* TLS_server_method()
    const SSL_METHOD* TLS_client_method()
    SSL_CTX* SSL_CTX_new(const SSL_METHOD* method)
    void SSL_CTX_free(SSL_CTX* ctx)
    int SSL_CTX_up_ref(SSL_CTX* ctx)
    long SSL_CTX_set_min_proto_version(SSL_CTX* ctx, int version)
    unsigned long SSL_CTX_set_options(SSL_CTX* ctx, unsigned long options)
    long SSL_CTX_set_mode(SSL_CTX* ctx, long mode)
    long SSL_CTX_set_session_cache_mode(SSL_CTX* ctx, long mode)
    int SSL_CTX_set_num_tickets(SSL_CTX* ctx, size_t num_tickets)
    int SSL_CTX_set_cipher_list(SSL_CTX* ctx, const char* s)
    int SSL_CTX_set_ciphersuites(SSL_CTX* ctx, const char* s)
    int SSL_CTX_set1_groups_list(SSL_CTX* ctx, const char* s)
    int SSL_CTX_use_certificate_chain_file(SSL_CTX* ctx, const char* file)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX* ctx, const char* file, int type)
    int SSL_CTX_check_private_key(const SSL_CTX* ctx)
    int SSL_CTX_load_verify_locations(SSL_CTX* ctx, const char* CAfile, const char* CApath)
    void SSL_CTX_set_verify(SSL_CTX* ctx, int mode, void* callback)

    SSL* SSL_new(SSL_CTX* ctx)
    void SSL_free(SSL* ssl)
    int SSL_set_fd(SSL* ssl, int fd)
    void SSL_set_accept_state(SSL* ssl)
    void SSL_set_connect_state(SSL* ssl)
    int SSL_do_handshake(SSL* ssl)
    int SSL_read_ex(SSL* ssl, void* buf, size_t num, size_t* readbytes)
    int SSL_write_ex(SSL* ssl, const void* buf, size_t num, size_t* written)
    int SSL_pending(const SSL* ssl)
    int SSL_shutdown(SSL* ssl)
    int SSL_get_error(const SSL* ssl, int ret)
    long SSL_set_mode(SSL* ssl, long mode)
    const char* SSL_get_version(const SSL* ssl)
    int SSL_set_tlsext_host_name(SSL* ssl, const char* name)

    int TLS1_2_VERSION
    int SSL_FILETYPE_PEM
    int SSL_VERIFY_NONE
    int SSL_VERIFY_PEER
    unsigned long SSL_OP_NO_COMPRESSION
    unsigned long SSL_OP_CIPHER_SERVER_PREFERENCE
    unsigned long SSL_OP_NO_RENEGOTIATION
    unsigned long SSL_OP_SINGLE_ECDH_USE
    long SSL_MODE_RELEASE_BUFFERS
    long SSL_MODE_ENABLE_PARTIAL_WRITE
    long SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
    long SSL_SESS_CACHE_OFF
    unsigned long SSL_OP_NO_TICKET
    long SSL_CTX_set_timeout(SSL_CTX* ctx, long t)
    int SSL_session_reused(const SSL* ssl)

    int SSL_ERROR_NONE
    int SSL_ERROR_SSL
    int SSL_ERROR_WANT_READ
    int SSL_ERROR_WANT_WRITE
    int SSL_ERROR_SYSCALL
    int SSL_ERROR_ZERO_RETURN

cdef extern from "openssl/err.h" nogil:
    unsigned long ERR_get_error()
    unsigned long ERR_peek_error()
    void ERR_clear_error()
    void ERR_error_string_n(unsigned long e, char* buf, size_t len)

# Client side (gwbench/_ext/tls_clients.pyx: the load generator's TLS clients).

cdef extern from "openssl/ssl.h" nogil:
    ctypedef struct X509_VERIFY_PARAM:
        pass

    int SSL_connect(SSL* ssl)
    int SSL_has_pending(const SSL* ssl)
    long SSL_get_verify_result(const SSL* ssl)
    void SSL_CTX_set_read_ahead(SSL_CTX* ctx, int yes)
    int SSL_CTX_set_default_verify_paths(SSL_CTX* ctx)
    X509_VERIFY_PARAM* SSL_CTX_get0_param(SSL_CTX* ctx)
    X509_VERIFY_PARAM* SSL_get0_param(SSL* ssl)
    const char* SSL_get_cipher_name(const SSL* ssl)

    unsigned long SSL_OP_ALL
    unsigned long SSL_OP_NO_SSLv3
    unsigned long SSL_OP_ENABLE_MIDDLEBOX_COMPAT
    long SSL_MODE_AUTO_RETRY
    int SSL_R_CERTIFICATE_VERIFY_FAILED
    int SSL_R_UNEXPECTED_EOF_WHILE_READING

cdef extern from "openssl/x509_vfy.h" nogil:
    int X509_VERIFY_PARAM_set1_host(X509_VERIFY_PARAM* param, const char* name, size_t namelen)
    int X509_VERIFY_PARAM_set1_ip_asc(X509_VERIFY_PARAM* param, const char* ipasc)
    void X509_VERIFY_PARAM_set_hostflags(X509_VERIFY_PARAM* param, unsigned int flags)
    int X509_VERIFY_PARAM_set_flags(X509_VERIFY_PARAM* param, unsigned long flags)
    const char* X509_verify_cert_error_string(long n)
    long X509_V_OK
    unsigned long X509_V_FLAG_TRUSTED_FIRST

cdef extern from "openssl/x509v3.h" nogil:
    unsigned int X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS

cdef extern from "openssl/err.h" nogil:
    unsigned long ERR_peek_last_error()
    int ERR_GET_LIB(unsigned long e)
    int ERR_GET_REASON(unsigned long e)
    int ERR_LIB_SSL
    const char* ERR_reason_error_string(unsigned long e)

# Client certificates (gw_ext/tls.pyx): verification against client_cafile,
# revocation lists, and the subject's common name as the user name.

cdef extern from "openssl/x509.h" nogil:
    ctypedef struct X509:
        pass
    ctypedef struct X509_NAME:
        pass
    ctypedef struct X509_CRL:
        pass
    ctypedef struct X509_STORE:
        pass
    void X509_free(X509* x)
    void X509_CRL_free(X509_CRL* crl)
    X509_NAME* X509_get_subject_name(const X509* x)
    int X509_NAME_get_text_by_NID(const X509_NAME* name, int nid, char* buf, int len)
    int X509_STORE_add_crl(X509_STORE* store, X509_CRL* crl)
    int X509_STORE_set_flags(X509_STORE* store, unsigned long flags)
    int NID_commonName

cdef extern from "openssl/x509_vfy.h" nogil:
    unsigned long X509_V_FLAG_CRL_CHECK
    long X509_V_ERR_CERT_REVOKED

cdef extern from "openssl/bio.h" nogil:
    ctypedef struct BIO:
        pass
    BIO* BIO_new_file(const char* filename, const char* mode)
    BIO* BIO_new_mem_buf(const void* buf, int len)
    int BIO_free(BIO* bio)

cdef extern from "openssl/pem.h" nogil:
    int ERR_LIB_PEM
    int PEM_R_NO_START_LINE
    X509_CRL* PEM_read_bio_X509_CRL(BIO* bp, X509_CRL** x, void* cb, void* u)
    X509* PEM_read_bio_X509(BIO* bp, X509** x, void* cb, void* u)

cdef extern from "openssl/ssl.h" nogil:
    int SSL_VERIFY_FAIL_IF_NO_PEER_CERT
    int SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE
    X509_STORE* SSL_CTX_get_cert_store(const SSL_CTX* ctx)
    int SSL_CTX_set_session_id_context(SSL_CTX* ctx, const unsigned char* sid_ctx, unsigned int sid_ctx_len)
    X509* SSL_get1_peer_certificate(const SSL* ssl)
    const SSL_CTX* SSL_get_SSL_CTX(const SSL* ssl)

# The server context's set-up (gw_ext/tls.pyx): the certificate chain built once.
cdef extern from "openssl/ssl.h" nogil:
    ctypedef struct STACK_OF_X509 "struct stack_st_X509":
        pass
    long SSL_CTX_get0_chain_certs(SSL_CTX* ctx, STACK_OF_X509** chain)
    long SSL_CTX_build_cert_chain(SSL_CTX* ctx, long flags)
    long SSL_BUILD_CHAIN_FLAG_IGNORE_ERROR
    long SSL_BUILD_CHAIN_FLAG_CLEAR_ERROR
