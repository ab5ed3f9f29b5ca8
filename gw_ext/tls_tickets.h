/* Session tickets every worker can open (gw_ext/tls.pyx).
 *
 * OpenSSL seals tickets with keys of its own, made at random per SSL_CTX: a
 * ticket one worker issued would not resume on another, and SO_REUSEPORT sends
 * a reconnecting device to any of them. Here the master makes one random
 * secret before it forks (gw_tickets_set_secret); every process derives the
 * same keys from it, so a ticket resumes on whichever worker the device
 * reaches, and a respawned worker (forked from the master) has them too.
 *
 * Rotation: time is cut into periods of `lifetime` seconds; period p's keys
 * (AES-256-CBC + HMAC-SHA256, OpenSSL's own ticket format) seal the tickets
 * issued in p and open tickets of p and p - 1 (those of p - 1 are reissued
 * under p's key). A ticket is also given a session timeout of `lifetime`, so
 * none resumes more than `lifetime` seconds after it was issued. Keys of
 * older periods cannot be derived back from the cached ones; the secret lives
 * as long as the master and is never written anywhere.
 *
 * A context's keys also depend on what its handshakes verify (client CA and
 * CRL files, the flags: gw_tickets_new's `binding`), so a ticket from before
 * a reload that changed them does not resume (a revoked certificate must go
 * through the verification again). */
#ifndef GW_TLS_TICKETS_H
#define GW_TLS_TICKETS_H

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define GW_TICKET_SECRET 32
#define GW_TICKET_NAME 16       /* 8 bytes of period (big-endian) + 8 bytes naming the key */
#define GW_TICKET_AES 32
#define GW_TICKET_MAC 32

typedef struct {
    unsigned char secret[GW_TICKET_SECRET];     /* the master's secret bound to the context */
    long lifetime;                              /* seconds per period */
    int64_t period[2];                          /* which period's keys each slot holds (-1: none) */
    unsigned char keys[2][GW_TICKET_NAME + GW_TICKET_AES + GW_TICKET_MAC];
} gw_ticket_keys;

static unsigned char gw_ticket_master[GW_TICKET_SECRET];
static int gw_ticket_master_set = 0;
static int gw_ticket_index = -1;
/* AES-256-CBC fetched once (gw_tickets_install, in the master before it forks):
 * EVP_aes_256_cbc() is a legacy object that OpenSSL 3 fetches from the provider
 * again at every EVP_EncryptInit_ex, i.e. for every ticket sealed or opened. */
static EVP_CIPHER *gw_ticket_cipher = NULL;

static void gw_tickets_set_secret(const unsigned char *secret) {
    memcpy(gw_ticket_master, secret, GW_TICKET_SECRET);
    gw_ticket_master_set = 1;
}

static void gw_tickets_forget_secret(void) {
    OPENSSL_cleanse(gw_ticket_master, GW_TICKET_SECRET);
    gw_ticket_master_set = 0;
}

static int gw_tickets_have_secret(void) { return gw_ticket_master_set; }

static void gw_tickets_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp) {
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    if (ptr != NULL) {
        OPENSSL_cleanse(ptr, sizeof(gw_ticket_keys));
        OPENSSL_free(ptr);
    }
}

static void gw_put_be64(unsigned char *p, int64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = (unsigned char)(v & 0xff); v = (int64_t)((uint64_t)v >> 8); }
}

static int64_t gw_get_be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return (int64_t)v;
}

static int gw_hmac(const unsigned char *key, size_t keylen, const unsigned char *msg, size_t len,
                   unsigned char out[32]) {
    unsigned int n = 0;
    return HMAC(EVP_sha256(), key, (int)keylen, msg, len, out, &n) != NULL && n == 32;
}

/* Period p's name and keys into k->keys[p & 1] (cached). NULL if OpenSSL fails. */
static const unsigned char *gw_ticket_keys_for(gw_ticket_keys *k, int64_t period) {
    int slot = (int)(period & 1);
    unsigned char *out = k->keys[slot];
    unsigned char msg[16], pkey[32], tmp[32];
    if (k->period[slot] == period) return out;
    memcpy(msg, "gw-ticket-period", 8);
    gw_put_be64(msg + 8, period);
    if (!gw_hmac(k->secret, GW_TICKET_SECRET, msg, 16, pkey)) return NULL;
    gw_put_be64(out, period);
    if (!gw_hmac(pkey, 32, (const unsigned char *)"name", 4, tmp)) return NULL;
    memcpy(out + 8, tmp, 8);
    if (!gw_hmac(pkey, 32, (const unsigned char *)"aes-256-cbc", 11, out + GW_TICKET_NAME)) return NULL;
    if (!gw_hmac(pkey, 32, (const unsigned char *)"hmac-sha256", 11, out + GW_TICKET_NAME + GW_TICKET_AES))
        return NULL;
    OPENSSL_cleanse(pkey, sizeof(pkey));
    OPENSSL_cleanse(tmp, sizeof(tmp));
    k->period[slot] = period;
    return out;
}

/* SSL_CTX_set_tlsext_ticket_key_evp_cb's callback: seal (enc = 1) with the current
 * period's key; open (enc = 0) a ticket of this period (1) or the one before (2: reissue). */
static int gw_tickets_cb(SSL *s, unsigned char *key_name, unsigned char *iv, EVP_CIPHER_CTX *cctx,
                         EVP_MAC_CTX *hctx, int enc) {
    gw_ticket_keys *k = (gw_ticket_keys *)SSL_CTX_get_ex_data(SSL_get_SSL_CTX(s), gw_ticket_index);
    const unsigned char *key;
    int64_t now, period;
    OSSL_PARAM params[3];
    if (k == NULL || k->lifetime <= 0) return enc ? -1 : 0;
    now = ((int64_t)time(NULL)) / k->lifetime;
    if (enc) {
        period = now;
    } else {
        period = gw_get_be64(key_name);
        if (period != now && period != now - 1) return 0;      /* unknown or too old: full handshake */
    }
    key = gw_ticket_keys_for(k, period);
    if (key == NULL) return -1;
    const EVP_CIPHER *cipher = gw_ticket_cipher;
    if (cipher == NULL) return -1;
    if (enc) {
        memcpy(key_name, key, GW_TICKET_NAME);
        if (RAND_bytes(iv, EVP_CIPHER_get_iv_length(cipher)) <= 0) return -1;
    } else if (CRYPTO_memcmp(key_name, key, GW_TICKET_NAME) != 0) {
        return 0;
    }
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, (void *)(key + GW_TICKET_NAME + GW_TICKET_AES),
                                                  GW_TICKET_MAC);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    if (!EVP_MAC_CTX_set_params(hctx, params)) return -1;
    if (enc) {
        if (!EVP_EncryptInit_ex(cctx, cipher, NULL, key + GW_TICKET_NAME, iv)) return -1;
        return 1;
    }
    if (!EVP_DecryptInit_ex(cctx, cipher, NULL, key + GW_TICKET_NAME, iv)) return -1;
    return period == now ? 1 : 2;
}

/* Installs the shared keys on a context: its secret = HMAC(master secret, binding).
 * 1 done, 0 no master secret (OpenSSL's own per-context keys stay), -1 OpenSSL failed. */
static int gw_tickets_install(SSL_CTX *ctx, const unsigned char *binding, size_t len, long lifetime) {
    gw_ticket_keys *k;
    if (!gw_ticket_master_set || lifetime <= 0) return 0;
    if (gw_ticket_index < 0) {
        gw_ticket_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, gw_tickets_free);
        if (gw_ticket_index < 0) return -1;
    }
    if (gw_ticket_cipher == NULL) {
        gw_ticket_cipher = EVP_CIPHER_fetch(NULL, "AES-256-CBC", NULL);
        if (gw_ticket_cipher == NULL) return -1;
    }
    k = (gw_ticket_keys *)OPENSSL_zalloc(sizeof(*k));
    if (k == NULL) return -1;
    k->lifetime = lifetime;
    k->period[0] = k->period[1] = -1;
    if (!gw_hmac(gw_ticket_master, GW_TICKET_SECRET, binding, len, k->secret)
            || !SSL_CTX_set_ex_data(ctx, gw_ticket_index, k)) {
        gw_tickets_free(NULL, k, NULL, 0, 0, NULL);
        return -1;
    }
    if (!SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, gw_tickets_cb)) return -1;
    return 1;
}

#endif
