/* gw's own TLS 1.3 record layer (tls_record_layer = "gw").
 *
 * OpenSSL runs the handshake; once it has finished a TLS 1.3 handshake with
 * an AEAD suite (AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305), the worker
 * takes the record layer over and frees the SSL object, as kernel TLS would:
 * an idle connection then holds only this struct (its traffic secrets, keys,
 * IVs and sequence numbers), no OpenSSL object. Records are sealed and opened
 * through one EVP_CIPHER_CTX per suite for the whole worker, re-keyed per
 * record. Input held between reads (a partial record, or records the caller
 * had no room for) and ciphertext a full socket did not take are kept per
 * connection only while they exist.
 *
 * The traffic secrets come from OpenSSL's key-log callback (only into this
 * struct: never logged, never written anywhere; wiped when freed); the
 * sequence numbers from its message callback, which counts the records
 * written after the server's Finished (the session tickets) and read after
 * the client's. See ARCHITECTURE.md, "TLS: gw's record layer".
 */
#ifndef GW_TLS_RECORDS_H
#define GW_TLS_RECORDS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <openssl/ssl.h>

typedef struct gw_tlsrec gw_tlsrec;

/* The worker's counters this layer adds to (indices into the stats row). */
void gw_tlsrec_counters(int refused, int key_updates_in, int key_updates_out);

/* Before the handshake: state for one connection, hooked to its SSL
 * (ex_data, message callback, the context's key-log callback), and OpenSSL's
 * handshake writes pointed at a memory BIO, so that the last step's (the
 * session ticket) can leave with the CONNACK in one send. NULL if it could
 * not be made: the connection stays on OpenSSL. */
gw_tlsrec *gw_tlsrec_attach(SSL *ssl);

/* After each SSL_do_handshake() that did not finish: sends what it wrote
 * (OpenSSL writes the handshake into a memory BIO, see gw_tlsrec_attach).
 * 1: all sent; 0: the socket is full (the rest kept, sent by the next call:
 * wait for EPOLLOUT); -1: a socket error. Once all is out and the version is
 * not TLS 1.3, OpenSSL writes to the socket again (no takeover follows). A
 * failed handshake calls it too, best effort, for OpenSSL's alert. */
int gw_tlsrec_handshake_flush(gw_tlsrec *r, SSL *ssl, int fd);

/* After SSL_do_handshake() returned 1: unhooks r from ssl; 1 if gw takes the
 * record layer over (the caller frees the SSL; what the handshake's last
 * step wrote, the session ticket, waits in front of the first flush: flush
 * in this turn), 0 if the connection stays on OpenSSL (TLS 1.2, another
 * suite, bytes OpenSSL holds, a secret or record count not seen: what the
 * handshake wrote is sent now and OpenSSL writes to the socket again; the
 * caller frees r), -1 if that could not all be sent (the caller frees r and
 * closes the connection). */
int gw_tlsrec_takeover(gw_tlsrec *r, SSL *ssl);

/* Wipes and frees r and its buffers (NULL: nothing). */
void gw_tlsrec_free(gw_tlsrec *r);

/* Plaintext into out[0:cap]: > 0 bytes; 0 nothing now (EAGAIN or a partial
 * record); -1 the peer closed (EOF, close_notify); -2 a socket error or the
 * peer's alert; -3 a record refused (bad header, length, tag, content): its
 * alert is queued, counted. */
ssize_t gw_tlsrec_read(gw_tlsrec *r, int fd, uint8_t *out, size_t cap, uint64_t *counters);

/* Input held that a read would hand over now (decrypted bytes, a whole
 * record, or the peer's close): epoll cannot see it. */
int gw_tlsrec_pending(const gw_tlsrec *r);

/* Something to send without new plaintext (a KeyUpdate the peer asked for,
 * an alert, ciphertext a full socket left): flush the connection. */
int gw_tlsrec_wants_write(const gw_tlsrec *r);

/* Seals plain[0:len] into records (<= 16384 bytes of plaintext each) and
 * sends them, after any ciphertext left before; *consumed: plaintext taken
 * (sealed: sent or kept). 1: everything out; 0: the socket is full (the rest
 * of the ciphertext kept for the next call); -1: a socket error. */
int gw_tlsrec_flush(gw_tlsrec *r, int fd, const uint8_t *plain, size_t len, size_t *consumed,
                    uint64_t *counters);

/* close_notify after what is left to send, one non-blocking send, best
 * effort (once per connection; not after a refused record's alert). */
void gw_tlsrec_close_notify(gw_tlsrec *r, int fd);

/* The record parser on its own (fuzz target, tests): opens the records of
 * in[0:len] as the read side of a connection keyed by secret (hash_len 32 or
 * 48, suite 0x1301, 0x1302 or 0x1303), plaintext into out. Returns what
 * gw_tlsrec_read would (the bytes delivered, or its negative codes), *used:
 * the input consumed. For tests: no socket. */
ssize_t gw_tlsrec_parse(int suite, const uint8_t *secret, size_t hash_len, const uint8_t *in, size_t len,
                        uint8_t *out, size_t cap, size_t *used);

/* The sealing side on its own (tests, the fuzz target's corpus): records of
 * plain[0:len] (inner type 23; or 22/21 given as type) with the write keys
 * of secret, starting at sequence number seq, into out; the bytes written,
 * -1 if out is too small. */
ssize_t gw_tlsrec_seal(int suite, const uint8_t *secret, size_t hash_len, uint64_t seq, int type,
                       const uint8_t *plain, size_t len, uint8_t *out, size_t cap);

/* Size of the per-connection state (for the docs' figure and a test). */
size_t gw_tlsrec_state_size(void);

#endif
