/* gw's own TLS 1.3 record layer: see tls_records.h. RFC 8446 sections 5
 * (record protocol), 5.2-5.3 (AEAD, per-record nonce), 6 (alerts), 4.6.3 and
 * 7.2 (KeyUpdate), 7.1/7.3 (HKDF-Expand-Label, traffic keys). */
#include "tls_records.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>

#define HDR 5
#define TAG 16
#define MAX_PLAIN 16384                 /* plaintext per record (RFC 8446 5.1) */
#define MAX_CIPHER (MAX_PLAIN + 256)    /* TLSCiphertext.length at most 2^14 + 256 (5.2) */
#define MIN_CIPHER (1 + TAG)            /* the inner content type and the tag */
#define IN_SCRATCH (64 * 1024)          /* one recv when nothing is held */
#define OUT_PLAIN_CHUNK (64 * 1024)     /* plaintext sealed per send */
#define OUT_RECORDS (OUT_PLAIN_CHUNK / MAX_PLAIN + 2)
/* Ciphertext held from before (the session ticket) that a flush sends in
 * front of its new records, in the same send, when it is at most this long. */
#define HELD_COALESCE 4096
#define OUT_SCRATCH (HELD_COALESCE + OUT_PLAIN_CHUNK + OUT_RECORDS * (HDR + 1 + TAG) + 2 * (HDR + 5 + 1 + TAG))
/* AES-GCM: at most 2^24.5 records per key (RFC 8446 5.5); a KeyUpdate before 2^24. */
#define WRITE_KEY_LIMIT ((uint64_t)1 << 24)

/* Content types, alerts, handshake types. */
#define CT_ALERT 21
#define CT_HANDSHAKE 22
#define CT_APPDATA 23
#define AL_CLOSE_NOTIFY 0
#define AL_UNEXPECTED_MESSAGE 10
#define AL_BAD_RECORD_MAC 20
#define AL_RECORD_OVERFLOW 22
#define AL_ILLEGAL_PARAMETER 47
#define AL_DECODE_ERROR 50
#define HS_FINISHED 20
#define HS_KEY_UPDATE 24

/* gw_tlsrec.flags */
#define F_DECRYPTED 1      /* the record at the head of the input is opened: plaintext at poff, plen left */
#define F_EOF 2            /* the peer closed (close_notify): reads return -1 */
#define F_FAILED 4         /* a refused record or the peer's alert: reads return -2 */
#define F_KU_OWED 8        /* the peer asked for our KeyUpdate: sent before the next record */
#define F_CLOSE_SENT 16    /* close_notify or a fatal alert is written: nothing after it */
#define F_REFUSED 32       /* F_FAILED by a record of the peer's we refused (-3 once) */

/* gw_tlsrec.hs (during the handshake) */
#define HS_SERVER_FIN 1
#define HS_CLIENT_FIN 2
#define HS_CLIENT_SECRET 4
#define HS_SERVER_SECRET 8
#define HS_SERVER_HELLO 16     /* the ServerHello is written: the version is known */
#define HS_HELD 32             /* OpenSSL's handshake writes collect in the SSL's write BIO, a
                                  memory BIO (SSL_get_wbio: the SSL owns it): sent after each
                                  step; the last step's (the session ticket) wait for the first
                                  flush after the takeover */

struct gw_tlsrec {
    uint8_t rkey[32], wkey[32];         /* read (client's) and write (server's) keys */
    uint8_t riv[12], wiv[12];
    uint8_t rsec[48], wsec[48];         /* the traffic secrets, for KeyUpdate */
    uint64_t rseq, wseq;
    uint8_t *in;                        /* input held: ilen bytes from the head of a record */
    uint8_t *out;                       /* ciphertext not sent yet: out[ooff:olen] (what the socket
                                           did not take, or the handshake's last records) */
    uint32_t ilen, icap, poff, plen;
    uint32_t ooff, olen;
    uint16_t wcount, rcount;            /* handshake: records written/read after the Finished */
    uint8_t suite;                      /* 1 AES-128-GCM, 2 AES-256-GCM, 3 ChaCha20-Poly1305 */
    uint8_t hlen, klen, flags, hs, seclen;
};

static int ex_index = -1;
static int ready;                       /* 1: set up; -1: could not be */
static EVP_CIPHER_CTX *cctx[4];         /* per suite, its cipher set once: re-keyed per record */
static uint8_t *in_scratch, *out_scratch;
static int ctr_refused = -1, ctr_ku_in = -1, ctr_ku_out = -1;

static void count(uint64_t *counters, int index) {
    if (counters != NULL && index >= 0)
        counters[index] += 1;
}

void gw_tlsrec_counters(int refused, int key_updates_in, int key_updates_out) {
    ctr_refused = refused;
    ctr_ku_in = key_updates_in;
    ctr_ku_out = key_updates_out;
}

size_t gw_tlsrec_state_size(void) { return sizeof(gw_tlsrec); }

static int setup_ciphers(void) {
    static const char *names[4] = {NULL, "AES-128-GCM", "AES-256-GCM", "ChaCha20-Poly1305"};
    int i;
    if (ready)
        return ready > 0 ? 0 : -1;
    ready = -1;
    for (i = 1; i < 4; i++) {
        EVP_CIPHER *c = EVP_CIPHER_fetch(NULL, names[i], NULL);
        if (c == NULL)
            return -1;
        cctx[i] = EVP_CIPHER_CTX_new();
        if (cctx[i] == NULL || !EVP_CipherInit_ex(cctx[i], c, NULL, NULL, NULL, 1)) {
            EVP_CIPHER_free(c);
            return -1;
        }
        EVP_CIPHER_free(c);     /* the context keeps its own reference */
    }
    return (ready = 1) > 0 ? 0 : -1;
}

static int setup(void) {
    if (setup_ciphers() < 0)
        return -1;
    if (in_scratch == NULL) {
        in_scratch = malloc(IN_SCRATCH);
        out_scratch = malloc(OUT_SCRATCH);
        if (in_scratch == NULL || out_scratch == NULL) {
            free(in_scratch);
            free(out_scratch);
            in_scratch = out_scratch = NULL;
            return -1;
        }
    }
    if (ex_index < 0) {
        ex_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
        if (ex_index < 0)
            return -1;
    }
    return 0;
}

/* --- keys -------------------------------------------------------------- */

static const EVP_MD *suite_md(int suite) { return suite == 2 ? EVP_sha384() : EVP_sha256(); }

/* HKDF-Expand-Label(secret, label, "", outlen) for outlen <= the hash's
 * length: one HMAC block (RFC 8446 7.1, RFC 5869 2.3). */
static int expand_label(int suite, const uint8_t *secret, size_t slen, const char *label, uint8_t *out,
                        size_t outlen) {
    uint8_t info[2 + 1 + 6 + 16 + 1 + 1];
    uint8_t t[EVP_MAX_MD_SIZE];
    unsigned int tl = 0;
    size_t llen = strlen(label), n = 0;
    if (llen > 16 || outlen > slen)
        return -1;
    info[n++] = (uint8_t)(outlen >> 8);
    info[n++] = (uint8_t)outlen;
    info[n++] = (uint8_t)(6 + llen);
    memcpy(info + n, "tls13 ", 6);
    n += 6;
    memcpy(info + n, label, llen);
    n += llen;
    info[n++] = 0;      /* an empty context */
    info[n++] = 1;      /* T(1) */
    if (HMAC(suite_md(suite), secret, (int)slen, info, n, t, &tl) == NULL || tl < outlen)
        return -1;
    memcpy(out, t, outlen);
    OPENSSL_cleanse(t, sizeof(t));
    return 0;
}

static int derive(int suite, size_t hlen, size_t klen, const uint8_t *secret, uint8_t *key, uint8_t *iv) {
    if (expand_label(suite, secret, hlen, "key", key, klen) < 0)
        return -1;
    return expand_label(suite, secret, hlen, "iv", iv, 12);
}

/* The next generation of a traffic secret and its key and IV (RFC 8446 7.2). */
static int update_secret(gw_tlsrec *r, uint8_t *secret, uint8_t *key, uint8_t *iv) {
    uint8_t next[48];
    if (expand_label(r->suite, secret, r->hlen, "traffic upd", next, r->hlen) < 0)
        return -1;
    memcpy(secret, next, r->hlen);
    OPENSSL_cleanse(next, sizeof(next));
    return derive(r->suite, r->hlen, r->klen, secret, key, iv);
}

static int suite_params(int id, uint8_t *suite, uint8_t *hlen, uint8_t *klen) {
    switch (id) {
    case 0x1301: *suite = 1; *hlen = 32; *klen = 16; return 0;
    case 0x1302: *suite = 2; *hlen = 48; *klen = 32; return 0;
    case 0x1303: *suite = 3; *hlen = 32; *klen = 32; return 0;
    default: return -1;
    }
}

/* --- AEAD --------------------------------------------------------------- */

/* Seals (enc) or opens data[0:len] in place; aad: the record header; tag:
 * 16 bytes written (enc) or checked. 0, or -1 (a tag that does not match). */
static int aead(int enc, int suite, const uint8_t *key, const uint8_t *iv, uint64_t seq, const uint8_t *aad,
                uint8_t *data, size_t len, uint8_t *tag) {
    EVP_CIPHER_CTX *x = cctx[suite];
    uint8_t nonce[12];
    int outl = 0, i;
    memcpy(nonce, iv, 12);
    for (i = 0; i < 8; i++)
        nonce[11 - i] ^= (uint8_t)(seq >> (8 * i));
    if (!EVP_CipherInit_ex(x, NULL, NULL, key, nonce, enc))
        return -1;
    if (!EVP_CipherUpdate(x, NULL, &outl, aad, HDR))
        return -1;
    if (len > 0 && !EVP_CipherUpdate(x, data, &outl, data, (int)len))
        return -1;
    if (!enc && !EVP_CIPHER_CTX_ctrl(x, EVP_CTRL_AEAD_SET_TAG, TAG, tag))
        return -1;
    if (EVP_CipherFinal_ex(x, data + len, &outl) <= 0)
        return -1;
    if (enc && !EVP_CIPHER_CTX_ctrl(x, EVP_CTRL_AEAD_GET_TAG, TAG, tag))
        return -1;
    return 0;
}

/* One record into out: header, plain (copied unless already at out + HDR),
 * the inner type, the tag. Returns its length, or -1. */
static long seal_record(int suite, const uint8_t *key, const uint8_t *iv, uint64_t seq, int type,
                        const uint8_t *plain, size_t len, uint8_t *out) {
    size_t clen = len + 1 + TAG;
    out[0] = CT_APPDATA;
    out[1] = 3;
    out[2] = 3;
    out[3] = (uint8_t)(clen >> 8);
    out[4] = (uint8_t)clen;
    if (plain != out + HDR && len > 0)
        memcpy(out + HDR, plain, len);
    out[HDR + len] = (uint8_t)type;
    if (aead(1, suite, key, iv, seq, out, out + HDR, len + 1, out + HDR + len + 1) < 0)
        return -1;
    return (long)(HDR + clen);
}

/* A record with r's write keys (and a KeyUpdate first when one is due). */
static long seal_next(gw_tlsrec *r, int type, const uint8_t *plain, size_t len, uint8_t *out,
                      uint64_t *counters) {
    long n, k = 0;
    if ((r->flags & F_KU_OWED) || r->wseq >= WRITE_KEY_LIMIT - 1) {
        static const uint8_t ku[5] = {HS_KEY_UPDATE, 0, 0, 1, 0};      /* update_not_requested */
        k = seal_record(r->suite, r->wkey, r->wiv, r->wseq, CT_HANDSHAKE, ku, 5, out);
        if (k < 0 || update_secret(r, r->wsec, r->wkey, r->wiv) < 0)
            return -1;
        r->wseq = 0;
        r->flags &= ~F_KU_OWED;
        count(counters, ctr_ku_out);
    }
    n = seal_record(r->suite, r->wkey, r->wiv, r->wseq, type, plain, len, out + k);
    if (n < 0)
        return -1;
    r->wseq += 1;
    return k + n;
}

/* --- handshake hooks -------------------------------------------------------- */

static int hexval(int ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* "LABEL <client random> <secret>": the two application traffic secrets are
 * kept in the connection's state, nothing else, nowhere else. */
static void keylog_cb(const SSL *ssl, const char *line) {
    gw_tlsrec *r;
    uint8_t *dst;
    uint8_t bit;
    const char *p;
    size_t n = 0;
    if (ex_index < 0 || (r = SSL_get_ex_data(ssl, ex_index)) == NULL)
        return;
    if (strncmp(line, "CLIENT_TRAFFIC_SECRET_0 ", 24) == 0) {
        dst = r->rsec;
        bit = HS_CLIENT_SECRET;
    } else if (strncmp(line, "SERVER_TRAFFIC_SECRET_0 ", 24) == 0) {
        dst = r->wsec;
        bit = HS_SERVER_SECRET;
    } else {
        return;
    }
    p = strchr(line + 24, ' ');
    if (p == NULL)
        return;
    p++;
    while (n < 48 && hexval(p[2 * n]) >= 0 && hexval(p[2 * n + 1]) >= 0) {
        dst[n] = (uint8_t)(hexval(p[2 * n]) << 4 | hexval(p[2 * n + 1]));
        n++;
    }
    if ((n != 32 && n != 48) || hexval(p[2 * n]) >= 0 || (r->seclen && r->seclen != n))
        return;     /* not a secret of a suite we take over: stays on OpenSSL */
    r->seclen = (uint8_t)n;
    r->hs |= bit;
}

/* Counts the records each side sent after its Finished (the header of a
 * record is reported before the handshake message it carries). */
static void msg_cb(int write_p, int version, int content_type, const void *buf, size_t len, SSL *ssl,
                   void *arg) {
    gw_tlsrec *r = arg;
    (void)version;
    (void)ssl;
    if (r == NULL)
        return;
    if (content_type == SSL3_RT_HEADER) {
        if (write_p && (r->hs & HS_SERVER_FIN) && r->wcount < 0xFFFF)
            r->wcount++;
        else if (!write_p && (r->hs & HS_CLIENT_FIN) && r->rcount < 0xFFFF)
            r->rcount++;
    } else if (content_type == SSL3_RT_HANDSHAKE && len >= 1 && ((const uint8_t *)buf)[0] == HS_FINISHED) {
        r->hs |= write_p ? HS_SERVER_FIN : HS_CLIENT_FIN;
    } else if (content_type == SSL3_RT_HANDSHAKE && len >= 1 && write_p && ((const uint8_t *)buf)[0] == 2) {
        r->hs |= HS_SERVER_HELLO;
    }
}

gw_tlsrec *gw_tlsrec_attach(SSL *ssl) {
    gw_tlsrec *r;
    BIO *held;
    SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
    if (setup() < 0 || ctx == NULL)
        return NULL;
    r = calloc(1, sizeof(gw_tlsrec));
    if (r == NULL)
        return NULL;
    if (!SSL_set_ex_data(ssl, ex_index, r)) {
        free(r);
        return NULL;
    }
    if (SSL_CTX_get_keylog_callback(ctx) != keylog_cb)
        SSL_CTX_set_keylog_callback(ctx, keylog_cb);
    SSL_set_msg_callback(ssl, msg_cb);
    SSL_set_msg_callback_arg(ssl, r);
    /* OpenSSL's handshake writes collect in memory; the worker sends them
       after each step (gw_tlsrec_handshake_flush), and keeps the last step's
       for the first flush after the takeover. Without the BIO they go
       straight to the socket, as before. */
    held = BIO_new(BIO_s_mem());
    if (held != NULL) {
        SSL_set0_wbio(ssl, held);
        r->hs |= HS_HELD;
    }
    return r;
}

/* Appends data[0:len] to the ciphertext waiting in r->out. 0, or -1. */
static int queue_out(gw_tlsrec *r, const uint8_t *data, size_t len) {
    size_t have = r->olen - r->ooff;
    uint8_t *grown;
    if (len == 0)
        return 0;
    if (len > UINT32_MAX - have)
        return -1;
    grown = malloc(have + len);
    if (grown == NULL)
        return -1;
    if (have > 0)
        memcpy(grown, r->out + r->ooff, have);
    memcpy(grown + have, data, len);
    free(r->out);
    r->out = grown;
    r->ooff = 0;
    r->olen = (uint32_t)(have + len);
    return 0;
}

static int send_held(gw_tlsrec *r, int fd);

/* What OpenSSL wrote into the held BIO, sent after what r->out still has;
 * what the socket does not take is kept in r->out. send_held's results. */
static int send_handshake(gw_tlsrec *r, SSL *ssl, int fd) {
    BIO *held = SSL_get_wbio(ssl);      /* below OpenSSL's buffering BIO, if that is in place */
    char *data = NULL;
    long len = BIO_get_mem_data(held, &data);
    size_t sent = 0;
    if (len > 0) {
        if (r->ooff >= r->olen) {
            /* nothing waiting before them: straight from OpenSSL's buffer */
            while (sent < (size_t)len) {
                ssize_t n = send(fd, data + sent, (size_t)len - sent, MSG_NOSIGNAL);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n < 0 && errno == EAGAIN)
                    break;
                if (n < 0)
                    return -1;
                sent += (size_t)n;
            }
        }
        if (queue_out(r, (const uint8_t *)data + sent, (size_t)len - sent) < 0)
            return -1;
        (void)BIO_reset(held);
    }
    return send_held(r, fd);
}

/* OpenSSL writes to the socket again (the memory BIO freed). 0, or -1. */
static int unhold(gw_tlsrec *r, SSL *ssl) {
    BIO *sock = SSL_get_rbio(ssl);
    r->hs &= ~HS_HELD;
    if (sock == NULL || !BIO_up_ref(sock))
        return -1;
    SSL_set0_wbio(ssl, sock);
    return 0;
}

int gw_tlsrec_handshake_flush(gw_tlsrec *r, SSL *ssl, int fd) {
    int st;
    if (!(r->hs & HS_HELD))
        return 1;
    st = send_handshake(r, ssl, fd);
    if (st == 1 && (r->hs & HS_SERVER_HELLO) && SSL_version(ssl) != TLS1_3_VERSION)
        /* Not TLS 1.3: no takeover to wait for, OpenSSL writes to the socket
           again (its last flight may then block and resume as before). */
        return unhold(r, ssl) < 0 ? -1 : 1;
    return st;
}

/* The connection stays on OpenSSL: what the handshake wrote goes out now and
 * OpenSSL writes to the socket again. 0, or -1 when it could not all be sent
 * (the caller closes the connection). */
static int release_held(gw_tlsrec *r, SSL *ssl) {
    int st;
    if (!(r->hs & HS_HELD))
        return 0;
    st = send_handshake(r, ssl, SSL_get_fd(ssl));
    if (unhold(r, ssl) < 0)
        return -1;
    return st == 1 ? 0 : -1;
}

int gw_tlsrec_takeover(gw_tlsrec *r, SSL *ssl) {
    const SSL_CIPHER *cipher;
    uint8_t suite, hlen, klen;
    char *data = NULL;
    long held = 0;
    SSL_set_msg_callback(ssl, NULL);
    SSL_set_msg_callback_arg(ssl, NULL);
    SSL_set_ex_data(ssl, ex_index, NULL);
    if (SSL_version(ssl) != TLS1_3_VERSION || SSL_has_pending(ssl))
        return release_held(r, ssl);
    cipher = SSL_get_current_cipher(ssl);
    if (cipher == NULL || suite_params(SSL_CIPHER_get_protocol_id(cipher), &suite, &hlen, &klen) < 0)
        return release_held(r, ssl);
    if ((r->hs & (HS_CLIENT_SECRET | HS_SERVER_SECRET | HS_SERVER_FIN | HS_CLIENT_FIN))
            != (HS_CLIENT_SECRET | HS_SERVER_SECRET | HS_SERVER_FIN | HS_CLIENT_FIN)
        || r->seclen != hlen || r->rcount != 0)
        return release_held(r, ssl);
    r->suite = suite;
    r->hlen = hlen;
    r->klen = klen;
    r->wseq = r->wcount;        /* the session tickets went out with these keys */
    r->rseq = r->rcount;
    if (derive(suite, hlen, klen, r->rsec, r->rkey, r->riv) < 0
        || derive(suite, hlen, klen, r->wsec, r->wkey, r->wiv) < 0)
        return release_held(r, ssl);
    if (r->hs & HS_HELD)
        held = BIO_get_mem_data(SSL_get_wbio(ssl), &data);
    /* What the handshake's last step wrote (the session ticket) goes out in
       front of the first records sealed here (the CONNACK), in the same send
       (gw_tlsrec_flush). */
    if (held > 0 && queue_out(r, (const uint8_t *)data, (size_t)held) < 0)
        return release_held(r, ssl);
    r->hs &= ~HS_HELD;          /* the BIO is freed with the SSL */
    return 1;
}

void gw_tlsrec_free(gw_tlsrec *r) {
    if (r == NULL)
        return;
    if (r->in != NULL) {
        OPENSSL_cleanse(r->in, r->icap);
        free(r->in);
    }
    free(r->out);
    OPENSSL_cleanse(r, sizeof(*r));
    free(r);
}

/* --- reading ------------------------------------------------------------ */

/* Queues a fatal alert (its record sealed now) and marks r failed. */
static void refuse(gw_tlsrec *r, int alert, uint64_t *counters) {
    uint8_t body[2] = {2, (uint8_t)alert};
    uint8_t rec[HDR + 2 + 1 + TAG + HDR + 5 + 1 + TAG];
    long n;
    r->flags |= F_FAILED | F_REFUSED;
    count(counters, ctr_refused);
    if (r->flags & F_CLOSE_SENT || r->suite == 0)
        return;
    r->flags &= ~F_KU_OWED;
    n = seal_next(r, CT_ALERT, body, 2, rec, NULL);
    r->flags |= F_CLOSE_SENT;
    if (n > 0) {
        uint8_t *grown = realloc(r->out, r->olen + (size_t)n);
        if (grown != NULL) {
            memcpy(grown + r->olen, rec, (size_t)n);
            r->out = grown;
            r->olen += (uint32_t)n;
        }
    }
}

/* Checks what there is of a record header; 0: fine so far, else the alert. */
static int check_header(const uint8_t *p, size_t avail) {
    if (avail >= 1 && p[0] != CT_APPDATA)
        return AL_UNEXPECTED_MESSAGE;
    if ((avail >= 2 && p[1] != 3) || (avail >= 3 && p[2] != 3))
        return AL_DECODE_ERROR;
    if (avail >= HDR) {
        size_t len = (size_t)p[3] << 8 | p[4];
        if (len > MAX_CIPHER)
            return AL_RECORD_OVERFLOW;
        if (len < MIN_CIPHER)
            return AL_DECODE_ERROR;
    }
    return 0;
}

static size_t record_total(const uint8_t *p) { return HDR + ((size_t)p[3] << 8 | p[4]); }

/* The handshake messages of a record: KeyUpdate only (0, or the alert). */
static int handshake_record(gw_tlsrec *r, const uint8_t *p, size_t len, uint64_t *counters) {
    if (len < 4 || p[0] != HS_KEY_UPDATE)
        return AL_UNEXPECTED_MESSAGE;
    if (p[1] != 0 || p[2] != 0 || p[3] != 1)
        return AL_DECODE_ERROR;
    if (len != 5)
        return AL_UNEXPECTED_MESSAGE;       /* a key change ends its record (RFC 8446 5.1) */
    if (p[4] > 1)
        return AL_ILLEGAL_PARAMETER;
    if (update_secret(r, r->rsec, r->rkey, r->riv) < 0)
        return AL_DECODE_ERROR;
    r->rseq = 0;
    count(counters, ctr_ku_in);
    if (p[4] == 1 && !(r->flags & F_CLOSE_SENT))
        r->flags |= F_KU_OWED;              /* one answer covers every request before it */
    return 0;
}

/* Opens and hands over the records of b[*pos:end]; plaintext into
 * out[*got:cap]. Stops when out is full or at a partial record. 0, or
 * -1 (the peer closed), -2 (the peer's alert), -3 (refused). */
static int drain(gw_tlsrec *r, uint8_t *b, size_t *pos, size_t end, uint8_t *out, size_t cap, size_t *got,
                 uint64_t *counters) {
    for (;;) {
        uint8_t *p = b + *pos;
        size_t avail = end - *pos, total, clen, k;
        int alert, type;
        if (r->flags & F_DECRYPTED) {
            k = r->plen < cap - *got ? r->plen : cap - *got;
            memcpy(out + *got, p + HDR + r->poff, k);
            *got += k;
            r->poff += (uint32_t)k;
            r->plen -= (uint32_t)k;
            if (r->plen > 0)
                return 0;
            r->flags &= ~F_DECRYPTED;
            *pos += record_total(p);
            continue;
        }
        if (*got == cap)
            return 0;
        alert = check_header(p, avail);
        if (alert) {
            refuse(r, alert, counters);
            return -3;
        }
        if (avail < HDR || avail < (total = record_total(p)))
            return 0;
        clen = total - HDR - TAG;
        if (aead(0, r->suite, r->rkey, r->riv, r->rseq, p, p + HDR, clen, p + HDR + clen) < 0) {
            refuse(r, AL_BAD_RECORD_MAC, counters);
            return -3;
        }
        r->rseq += 1;
        while (clen > 0 && p[HDR + clen - 1] == 0)
            clen--;         /* the padding */
        if (clen == 0) {
            refuse(r, AL_UNEXPECTED_MESSAGE, counters);
            return -3;
        }
        type = p[HDR + clen - 1];
        clen -= 1;
        if (type == CT_APPDATA) {
            r->flags |= F_DECRYPTED;
            r->poff = 0;
            r->plen = (uint32_t)clen;
            continue;       /* handed over above (an empty record: skipped) */
        }
        if (type == CT_ALERT) {
            if (clen != 2) {
                refuse(r, AL_DECODE_ERROR, counters);
                return -3;
            }
            *pos += total;
            if (p[HDR + 1] == AL_CLOSE_NOTIFY) {
                r->flags |= F_EOF;
                return -1;
            }
            r->flags |= F_FAILED;
            return -2;
        }
        if (type == CT_HANDSHAKE) {
            alert = handshake_record(r, p + HDR, clen, counters);
            if (alert) {
                refuse(r, alert, counters);
                return -3;
            }
            *pos += total;
            continue;
        }
        refuse(r, AL_UNEXPECTED_MESSAGE, counters);
        return -3;
    }
}

/* Keeps b[pos:end] (a partial record, or records not handed over yet) in
 * r->in, with room for the whole of a partial first record; frees r->in when
 * nothing is left. 0, or -1 (no memory). */
static int keep(gw_tlsrec *r, uint8_t *b, size_t pos, size_t end) {
    size_t left = end - pos, want = left;
    if (left >= HDR && !(r->flags & F_DECRYPTED) && record_total(b + pos) > want)
        want = record_total(b + pos);
    else if (left < HDR && want < HDR)
        want = HDR;
    if (b == r->in) {
        if (left == 0) {
            free(r->in);
            r->in = NULL;
            r->ilen = r->icap = 0;
            return 0;
        }
        if (pos > 0)
            memmove(r->in, r->in + pos, left);
        r->ilen = (uint32_t)left;
        if (want > r->icap) {
            uint8_t *grown = realloc(r->in, want);
            if (grown == NULL)
                return -1;
            r->in = grown;
            r->icap = (uint32_t)want;
        }
        return 0;
    }
    if (left == 0)
        return 0;
    r->in = malloc(want);
    if (r->in == NULL)
        return -1;
    memcpy(r->in, b + pos, left);
    r->ilen = (uint32_t)left;
    r->icap = (uint32_t)want;
    return 0;
}

/* A whole record (or opened bytes) held: a read hands something over now. */
static int record_ready(const gw_tlsrec *r) {
    if (r->in == NULL)
        return 0;
    if (r->flags & F_DECRYPTED)
        return 1;
    if (r->ilen < HDR)
        return check_header(r->in, r->ilen) != 0;
    return check_header(r->in, r->ilen) != 0 || r->ilen >= record_total(r->in);
}

int gw_tlsrec_pending(const gw_tlsrec *r) {
    return (r->flags & (F_EOF | F_FAILED)) || record_ready(r);
}

int gw_tlsrec_wants_write(const gw_tlsrec *r) {
    return r->ooff < r->olen || (r->flags & F_KU_OWED);
}

static ssize_t finished(gw_tlsrec *r, size_t got, int st) {
    (void)r;
    if (got > 0)
        return (ssize_t)got;        /* the close (kept in flags) comes with the next read */
    return st;
}

static ssize_t closed_status(gw_tlsrec *r) {
    if (r->flags & F_EOF)
        return -1;
    if (r->flags & F_REFUSED) {
        r->flags &= ~F_REFUSED;
        return -3;
    }
    return -2;
}

ssize_t gw_tlsrec_read(gw_tlsrec *r, int fd, uint8_t *out, size_t cap, uint64_t *counters) {
    size_t got = 0, pos = 0;
    ssize_t n;
    int st;
    if (r->flags & (F_EOF | F_FAILED))
        return closed_status(r);
    if (r->in != NULL) {
        st = drain(r, r->in, &pos, r->ilen, out, cap, &got, counters);
        if (keep(r, r->in, pos, r->ilen) < 0)
            return got > 0 ? (ssize_t)got : -2;
        if (st < 0 || got > 0 || record_ready(r))
            return finished(r, got, st);
        if (r->in != NULL) {
            /* only a partial record held: the socket's bytes go after it */
            n = recv(fd, r->in + r->ilen, r->icap - r->ilen, 0);
            if (n == 0)
                return -1;
            if (n < 0)
                return (errno == EAGAIN || errno == EINTR) ? 0 : -2;
            r->ilen += (uint32_t)n;
            pos = 0;
            st = drain(r, r->in, &pos, r->ilen, out, cap, &got, counters);
            if (keep(r, r->in, pos, r->ilen) < 0)
                return got > 0 ? (ssize_t)got : -2;
            return finished(r, got, st);
        }
        /* what was held is consumed (a KeyUpdate, an empty record): read on */
    }
    n = recv(fd, in_scratch, IN_SCRATCH, 0);
    if (n == 0)
        return -1;
    if (n < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -2;
    st = drain(r, in_scratch, &pos, (size_t)n, out, cap, &got, counters);
    if (st == 0 && keep(r, in_scratch, pos, (size_t)n) < 0)
        return got > 0 ? (ssize_t)got : -2;
    return finished(r, got, st);
}

/* --- writing ------------------------------------------------------------ */

/* Sends out[ooff:olen]: 1 all sent (freed), 0 the socket is full, -1 error. */
static int send_held(gw_tlsrec *r, int fd) {
    while (r->ooff < r->olen) {
        ssize_t n = send(fd, r->out + r->ooff, r->olen - r->ooff, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            return -1;
        }
        r->ooff += (uint32_t)n;
    }
    free(r->out);
    r->out = NULL;
    r->ooff = r->olen = 0;
    return 1;
}

int gw_tlsrec_flush(gw_tlsrec *r, int fd, const uint8_t *plain, size_t len, size_t *consumed,
                    uint64_t *counters) {
    *consumed = 0;
    for (;;) {
        size_t total = 0, taken = 0, sent = 0;
        int st;
        if (r->ooff < r->olen && r->olen - r->ooff <= HELD_COALESCE && !(r->flags & F_CLOSE_SENT)
            && *consumed < len) {
            /* A short held run (the session ticket) leaves with the new records. */
            total = r->olen - r->ooff;
            memcpy(out_scratch, r->out + r->ooff, total);
            free(r->out);
            r->out = NULL;
            r->ooff = r->olen = 0;
        }
        st = send_held(r, fd);
        if (st <= 0)
            return st;
        if (r->flags & F_CLOSE_SENT) {
            *consumed = len;        /* nothing goes after close_notify or an alert */
            return 1;
        }
        if (*consumed == len && !(r->flags & F_KU_OWED))
            return 1;
        while (taken < OUT_PLAIN_CHUNK && (*consumed + taken < len || (r->flags & F_KU_OWED))) {
            size_t k = len - *consumed - taken;
            long n;
            if (k > MAX_PLAIN)
                k = MAX_PLAIN;
            if (k == 0) {
                /* only the owed KeyUpdate: seal_next writes it before an empty
                   record, so write it on its own */
                static const uint8_t ku[5] = {HS_KEY_UPDATE, 0, 0, 1, 0};
                n = seal_record(r->suite, r->wkey, r->wiv, r->wseq, CT_HANDSHAKE, ku, 5, out_scratch + total);
                if (n < 0 || update_secret(r, r->wsec, r->wkey, r->wiv) < 0)
                    return -1;
                r->wseq = 0;
                r->flags &= ~F_KU_OWED;
                count(counters, ctr_ku_out);
                total += (size_t)n;
                break;
            }
            n = seal_next(r, CT_APPDATA, plain + *consumed + taken, k, out_scratch + total, counters);
            if (n < 0)
                return -1;
            total += (size_t)n;
            taken += k;
        }
        *consumed += taken;
        while (sent < total) {
            ssize_t n = send(fd, out_scratch + sent, total - sent, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    break;
                return -1;
            }
            sent += (size_t)n;
        }
        if (sent < total) {
            r->out = malloc(total - sent);
            if (r->out == NULL)
                return -1;
            memcpy(r->out, out_scratch + sent, total - sent);
            r->ooff = 0;
            r->olen = (uint32_t)(total - sent);
            return 0;
        }
    }
}

void gw_tlsrec_close_notify(gw_tlsrec *r, int fd) {
    static const uint8_t body[2] = {1, AL_CLOSE_NOTIFY};
    uint8_t rec[HDR + 2 + 1 + TAG + HDR + 5 + 1 + TAG];
    long n;
    /* Non-blocking, best effort: what the socket does not take is dropped. */
    if (r->ooff < r->olen && send_held(r, fd) <= 0)
        return;
    if (r->flags & F_CLOSE_SENT || r->suite == 0)
        return;
    r->flags |= F_CLOSE_SENT;
    r->flags &= ~F_KU_OWED;
    n = seal_next(r, CT_ALERT, body, 2, rec, NULL);
    if (n > 0 && send(fd, rec, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
        errno = 0;
}

/* --- the parser on its own --------------------------------------------------- */

static int test_state(gw_tlsrec *r, int suite, const uint8_t *secret, size_t hash_len) {
    memset(r, 0, sizeof(*r));
    if (setup_ciphers() < 0 || suite_params(suite, &r->suite, &r->hlen, &r->klen) < 0 || hash_len != r->hlen)
        return -1;
    memcpy(r->rsec, secret, hash_len);
    memcpy(r->wsec, secret, hash_len);
    if (derive(r->suite, r->hlen, r->klen, r->rsec, r->rkey, r->riv) < 0)
        return -1;
    memcpy(r->wkey, r->rkey, sizeof(r->wkey));
    memcpy(r->wiv, r->riv, sizeof(r->wiv));
    return 0;
}

ssize_t gw_tlsrec_parse(int suite, const uint8_t *secret, size_t hash_len, const uint8_t *in, size_t len,
                        uint8_t *out, size_t cap, size_t *used) {
    gw_tlsrec r;
    uint8_t *copy;
    size_t got = 0, pos = 0;
    int st;
    *used = 0;
    if (test_state(&r, suite, secret, hash_len) < 0)
        return -2;
    copy = malloc(len ? len : 1);       /* opened in place: the caller's bytes stay as they were */
    if (copy == NULL)
        return -2;
    memcpy(copy, in, len);
    st = drain(&r, copy, &pos, len, out, cap, &got, NULL);
    *used = pos;
    free(copy);
    free(r.out);
    OPENSSL_cleanse(&r, sizeof(r));
    return st < 0 ? st : (ssize_t)got;
}

ssize_t gw_tlsrec_seal(int suite, const uint8_t *secret, size_t hash_len, uint64_t seq, int type,
                       const uint8_t *plain, size_t len, uint8_t *out, size_t cap) {
    gw_tlsrec r;
    size_t total = 0, off = 0;
    if (test_state(&r, suite, secret, hash_len) < 0)
        return -1;
    do {
        size_t k = len - off > MAX_PLAIN ? MAX_PLAIN : len - off;
        long n;
        if (cap - total < HDR + k + 1 + TAG)
            return -1;
        n = seal_record(r.suite, r.wkey, r.wiv, seq++, type, plain + off, k, out + total);
        if (n < 0)
            return -1;
        total += (size_t)n;
        off += k;
    } while (off < len);
    OPENSSL_cleanse(&r, sizeof(r));
    return (ssize_t)total;
}
