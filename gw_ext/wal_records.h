/* The write-ahead log's framing (the format is described in wal.pxd): the
   header sizes and limits, little-endian words, scanning a buffer of records
   and resynchronising after a corrupt one. Pure functions over memory: the
   writer (wal_flusher.c), the recovery and the readers (wal.pyx) share them. */
#ifndef GW_WAL_RECORDS_H
#define GW_WAL_RECORDS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "crc32c.h"
#include "le_words.h"

#define GW_WAL_HDR 16                       /* segment header: "GWWAL001" + u64 LE base */
#define GW_WAL_REC_HDR 8                    /* record header: u32 LE length + u32 LE CRC-32C */
#define GW_WAL_MAX_PAYLOAD (16u << 20)

enum { GW_SCAN_END = 0, GW_SCAN_PARTIAL = 1, GW_SCAN_BADLEN = 2, GW_SCAN_BADCRC = 3 };

/* The next record at buf[0:len): GW_SCAN_END (len == 0), GW_SCAN_PARTIAL
   (*need: bytes the whole record takes), GW_SCAN_BADLEN, GW_SCAN_BADCRC (only
   when `check`), or -1 with *n its payload length: a valid record of 8 + *n
   bytes. Inline: the readers call it once per record. */
static inline int gw_wal_next(const uint8_t* buf, size_t len, uint32_t* n, uint64_t* need, int check) {
    if (len == 0) return GW_SCAN_END;
    if (len < GW_WAL_REC_HDR) { *need = GW_WAL_REC_HDR; return GW_SCAN_PARTIAL; }
    uint32_t k = gw_le32(buf);
    if (k == 0 || k > GW_WAL_MAX_PAYLOAD) return GW_SCAN_BADLEN;
    if (len - GW_WAL_REC_HDR < k) { *need = (uint64_t)GW_WAL_REC_HDR + k; return GW_SCAN_PARTIAL; }
    if (check && gw_crc32c(0, buf + GW_WAL_REC_HDR, k) != gw_le32(buf + 4)) return GW_SCAN_BADCRC;
    *n = k;
    return -1;
}

#pragma GCC visibility push(hidden)

/* The valid prefix of buf[0:len) (whole records, CRCs checked); *count
   records, *status why it stopped (a GW_SCAN_* value). */
size_t gw_wal_scan(const uint8_t* buf, size_t len, uint64_t* count, int* status);

/* The first i in [from, len - 8] where buf[i:] could start a record: its
   length sane (1 .. 16 MiB) and the record ending within `limit` bytes of
   buf[0] (limit may exceed len: the data goes on past buf). If the record
   lies wholly in buf its CRC must match (*whole = 1); otherwise *whole = 0
   and the caller checks it from the file. *n: its payload length. -1: none. */
int64_t gw_wal_candidate(const uint8_t* buf, size_t len, size_t from, uint64_t limit,
                         uint32_t* n, int* whole);

#pragma GCC visibility pop

#endif
