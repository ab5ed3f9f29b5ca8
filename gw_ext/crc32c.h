/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of the
   write-ahead log's records: SSE4.2's crc32 instruction when the CPU has it,
   slicing-by-8 tables otherwise. `crc` continues a previous result (0 to
   start), as zlib.crc32 does. */
#ifndef GW_CRC32C_H
#define GW_CRC32C_H

#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__)
#define GW_CRC32C_SSE42 1
#endif

/* Internal to the extension module that links this file: no symbol exported. */
#pragma GCC visibility push(hidden)

extern int gw_crc32c_hw;            /* 1: gw_crc32c uses SSE4.2 (set by gw_crc32c_init) */

/* Fills the tables and detects the CPU; once, before any other call. */
void gw_crc32c_init(void);

/* The table implementation, whatever the CPU. */
uint32_t gw_crc32c_sw(uint32_t crc, const uint8_t* p, size_t n);

#ifdef GW_CRC32C_SSE42
/* SSE4.2 only: call only when gw_crc32c_hw is 1. */
uint32_t gw_crc32c_sse42(uint32_t crc, const uint8_t* p, size_t n);
#endif

#pragma GCC visibility pop

/* Inline so the per-record call goes straight to the implementation. */
static inline uint32_t gw_crc32c(uint32_t crc, const uint8_t* p, size_t n) {
#ifdef GW_CRC32C_SSE42
    if (gw_crc32c_hw) return gw_crc32c_sse42(crc, p, n);
#endif
    return gw_crc32c_sw(crc, p, n);
}

#endif
