from gw_ext.openssl cimport SSL_CTX

cdef class TLSContext:
    cdef SSL_CTX* ctx
    cdef readonly str certfile
    cdef readonly str keyfile
