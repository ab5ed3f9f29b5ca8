/* Scanning and resynchronising over the log's records: see wal_records.h. */
#include "wal_records.h"

size_t gw_wal_scan(const uint8_t* buf, size_t len, uint64_t* count, int* status) {
    size_t pos = 0;
    uint64_t c = 0, need;
    uint32_t n;
    int st;
    while ((st = gw_wal_next(buf + pos, len - pos, &n, &need, 1)) < 0) {
        pos += GW_WAL_REC_HDR + (size_t)n;
        c++;
    }
    *count = c;
    *status = st;
    return pos;
}

int64_t gw_wal_candidate(const uint8_t* buf, size_t len, size_t from, uint64_t limit,
                         uint32_t* n, int* whole) {
    if (len < GW_WAL_REC_HDR) return -1;
    for (size_t i = from; i + GW_WAL_REC_HDR <= len; i++) {
        uint32_t k = gw_le32(buf + i);
        if (k == 0 || k > GW_WAL_MAX_PAYLOAD) continue;
        if ((uint64_t)i + GW_WAL_REC_HDR + k > limit) continue;
        if (i + GW_WAL_REC_HDR + (size_t)k <= len) {
            if (gw_crc32c(0, buf + i + GW_WAL_REC_HDR, k) != gw_le32(buf + i + 4)) continue;
            *whole = 1;
        } else {
            *whole = 0;
        }
        *n = k;
        return (int64_t)i;
    }
    return -1;
}
