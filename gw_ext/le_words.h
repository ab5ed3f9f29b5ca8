/* Little-endian 32-bit words in a byte buffer, at any alignment: the
   write-ahead log's framing (wal_records.h) and CRC-32C's table walk (crc32c.c)
   read and write them. */
#ifndef GW_LE_WORDS_H
#define GW_LE_WORDS_H

#include <stdint.h>
#include <string.h>

static inline uint32_t gw_le32(const uint8_t* p) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
#else
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
#endif
}

static inline void gw_put32(uint8_t* p, uint32_t v) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(p, &v, 4);
#else
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
#endif
}

#endif
