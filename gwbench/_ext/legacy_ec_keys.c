/* OpenSSL's built-in EC method for certificate keys, instead of the provider
   decoders: see legacy_ec_keys.h. */
#include "legacy_ec_keys.h"

#include <openssl/engine.h>
#include <openssl/evp.h>
#include <openssl/err.h>

/* The ENGINE API is deprecated in OpenSSL 3 and still the only way to do this. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

#ifndef OPENSSL_NO_ENGINE
static int gw_ec_nids[] = { EVP_PKEY_EC };
static int gw_ec_pmeths(ENGINE *e, EVP_PKEY_METHOD **pmeth, const int **nids, int nid)
{
    (void)e;
    if (pmeth == NULL) {
        *nids = gw_ec_nids;
        return 1;
    }
    if (nid == EVP_PKEY_EC) {
        *pmeth = (EVP_PKEY_METHOD *)EVP_PKEY_meth_find(EVP_PKEY_EC);
        return *pmeth != NULL;
    }
    *pmeth = NULL;
    return 0;
}
#endif

static int gw_legacy_ec_state = 0;   /* 0 not tried, 1 on, -1 unavailable */
int gw_use_legacy_ec_keys(void)
{
#ifdef OPENSSL_NO_ENGINE
    return 0;
#else
    ENGINE *e;
    int ok;
    if (gw_legacy_ec_state != 0)
        return gw_legacy_ec_state > 0;
    gw_legacy_ec_state = -1;
    if (EVP_PKEY_meth_find(EVP_PKEY_EC) == NULL)
        return 0;
    e = ENGINE_new();
    if (e == NULL)
        return 0;
    ok = ENGINE_set_id(e, "gw-bench-legacy-ec")
         && ENGINE_set_name(e, "OpenSSL's built-in EC method (gw bench)")
         && ENGINE_set_pkey_meths(e, gw_ec_pmeths)
         && ENGINE_init(e);
    if (ok) {
        ok = ENGINE_set_default_pkey_meths(e);   /* the table keeps its own reference */
        ENGINE_finish(e);
    }
    ENGINE_free(e);
    ERR_clear_error();
    if (ok)
        gw_legacy_ec_state = 1;
    return ok;
#endif
}

#pragma GCC diagnostic pop
