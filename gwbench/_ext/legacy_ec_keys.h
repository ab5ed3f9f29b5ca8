/* The bench's TLS clients: certificate EC keys decoded by OpenSSL's
   built-in EC method instead of OpenSSL 3.0's provider decoders, which search
   every decoder of the library context, under locks, for each certificate
   (a quarter of a bench TLS client's CPU). An ENGINE claims EC and hands back
   the built-in method (EVP_PKEY_meth_find): the same checks on the same EC
   code, minus the decoder search. */
#ifndef GW_LEGACY_EC_KEYS_H
#define GW_LEGACY_EC_KEYS_H

#pragma GCC visibility push(hidden)

/* Registers that ENGINE as the default for EC keys in this process (once;
   later calls answer the first's result). 1 if on, 0 if unavailable. Call
   before any CA certificate is loaded; not thread-safe. */
int gw_use_legacy_ec_keys(void);

#pragma GCC visibility pop

#endif
