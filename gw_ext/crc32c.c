/* CRC-32C: see crc32c.h. */
#include "crc32c.h"
#include "le_words.h"

#include <string.h>

#ifdef GW_CRC32C_SSE42
#include <nmmintrin.h>
#endif

int gw_crc32c_hw;

static uint32_t gw_crc32c_tab[8][256];

void gw_crc32c_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        gw_crc32c_tab[0][i] = c;
    }
    for (int i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            gw_crc32c_tab[t][i] = (gw_crc32c_tab[t - 1][i] >> 8)
                                  ^ gw_crc32c_tab[0][gw_crc32c_tab[t - 1][i] & 0xff];
#ifdef GW_CRC32C_SSE42
    __builtin_cpu_init();
    gw_crc32c_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#endif
}

/* Slicing-by-8: eight table lookups per 8 bytes, after aligning the pointer. */
uint32_t gw_crc32c_sw(uint32_t crc, const uint8_t* p, size_t n) {
    uint32_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) { c = (c >> 8) ^ gw_crc32c_tab[0][(c ^ *p++) & 0xff]; n--; }
    while (n >= 8) {
        uint32_t lo = gw_le32(p) ^ c, hi = gw_le32(p + 4);
        c = gw_crc32c_tab[7][lo & 0xff] ^ gw_crc32c_tab[6][(lo >> 8) & 0xff]
          ^ gw_crc32c_tab[5][(lo >> 16) & 0xff] ^ gw_crc32c_tab[4][lo >> 24]
          ^ gw_crc32c_tab[3][hi & 0xff] ^ gw_crc32c_tab[2][(hi >> 8) & 0xff]
          ^ gw_crc32c_tab[1][(hi >> 16) & 0xff] ^ gw_crc32c_tab[0][hi >> 24];
        p += 8; n -= 8;
    }
    while (n--) c = (c >> 8) ^ gw_crc32c_tab[0][(c ^ *p++) & 0xff];
    return ~c;
}

#ifdef GW_CRC32C_SSE42
__attribute__((target("sse4.2")))
uint32_t gw_crc32c_sse42(uint32_t crc, const uint8_t* p, size_t n) {
    uint64_t c = (uint32_t)~crc;
    while (n && ((uintptr_t)p & 7)) { c = _mm_crc32_u8((uint32_t)c, *p++); n--; }
    while (n >= 8) { uint64_t v; memcpy(&v, p, 8); c = _mm_crc32_u64(c, v); p += 8; n -= 8; }
    while (n--) c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif
