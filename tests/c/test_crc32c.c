/* CRC-32C (gw_ext/crc32c.c) against published vectors and a bit-at-a-time
   reference, both implementations, every alignment; the log's record
   framing, scanning and resynchronising (gw_ext/wal_records.c) over intact,
   cut and damaged buffers. Buffers are allocated to their exact size, so
   AddressSanitizer catches a read past the end. */
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "crc32c.h"
#include "wal_records.h"

typedef uint32_t (*crc_fn)(uint32_t, const uint8_t*, size_t);

static uint32_t crc_bitwise(uint32_t crc, const uint8_t* p, size_t n) {
    uint32_t c = ~crc;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return ~c;
}

/* fn over an exact-size heap copy of p[0:n). */
static uint32_t crc_exact(crc_fn fn, uint32_t crc, const uint8_t* p, size_t n) {
    uint8_t* q = malloc(n ? n : 1);
    CHECK(q != NULL);
    if (n) memcpy(q, p, n);
    uint32_t r = fn(crc, q, n);
    free(q);
    return r;
}

static void check_vectors(crc_fn fn) {
    uint8_t buf[48];
    CHECK_EQ(crc_exact(fn, 0, (const uint8_t*)"123456789", 9), 0xE3069283u);
    CHECK_EQ(crc_exact(fn, 0, buf, 0), 0);
    CHECK_EQ(crc_exact(fn, 0x12345678u, buf, 0), 0x12345678u);
    /* RFC 3720 (iSCSI), B.4 */
    memset(buf, 0, 32);
    CHECK_EQ(crc_exact(fn, 0, buf, 32), 0x8A9136AAu);
    memset(buf, 0xFF, 32);
    CHECK_EQ(crc_exact(fn, 0, buf, 32), 0x62A8AB43u);
    for (int i = 0; i < 32; i++) buf[i] = (uint8_t)i;
    CHECK_EQ(crc_exact(fn, 0, buf, 32), 0x46DD794Eu);
    for (int i = 0; i < 32; i++) buf[i] = (uint8_t)(31 - i);
    CHECK_EQ(crc_exact(fn, 0, buf, 32), 0x113FDB5Cu);
    static const uint8_t read_pdu[48] = {
        0x01, 0xC0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18,
        0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
    CHECK_EQ(crc_exact(fn, 0, read_pdu, 48), 0xD9963A56u);
}

/* Every length up to 300 at every alignment, and continuation, against the reference. */
static void check_random(crc_fn fn) {
    unsigned long long seed = 0x9E3779B97F4A7C15ULL;
    uint8_t src[320];
    for (size_t i = 0; i < sizeof src; i++) src[i] = (uint8_t)check_rand(&seed);
    for (size_t n = 0; n <= 300; n++) {
        for (size_t off = 0; off < 8; off++) {
            uint8_t* q = malloc(n + off + 1);
            CHECK(q != NULL);
            memcpy(q + off, src, n);
            uint32_t want = crc_bitwise(0, src, n);
            CHECK_EQ(fn(0, q + off, n), want);
            size_t cut = n / 3;
            CHECK_EQ(fn(fn(0, q + off, cut), q + off + cut, n - cut), want);
            free(q);
        }
    }
}

static size_t put_record(uint8_t* at, const uint8_t* payload, uint32_t n) {
    gw_put32(at, n);
    gw_put32(at + 4, gw_crc32c(0, payload, n));
    memcpy(at + GW_WAL_REC_HDR, payload, n);
    return GW_WAL_REC_HDR + (size_t)n;
}

enum { NREC = 40 };

static void check_records(void) {
    unsigned long long seed = 42;
    static uint8_t log[NREC * (GW_WAL_REC_HDR + 200)];
    size_t starts[NREC + 1], len = 0;
    for (int i = 0; i < NREC; i++) {
        uint8_t payload[200];
        uint32_t n = 1 + (uint32_t)(check_rand(&seed) % 199);
        for (uint32_t k = 0; k < n; k++) payload[k] = (uint8_t)check_rand(&seed);
        starts[i] = len;
        len += put_record(log + len, payload, n);
    }
    starts[NREC] = len;

    /* Every prefix: the whole records in it, then partial (or the end). */
    for (size_t cut = 0; cut <= len; cut++) {
        uint8_t* b = malloc(cut ? cut : 1);
        CHECK(b != NULL);
        memcpy(b, log, cut);
        uint64_t count = 99;
        int status = -7;
        size_t valid = gw_wal_scan(b, cut, &count, &status);
        int whole = 0;
        while (whole < NREC && starts[whole + 1] <= cut) whole++;
        CHECK_EQ(valid, starts[whole]);
        CHECK_EQ(count, (uint64_t)whole);
        CHECK_EQ(status, valid == cut ? GW_SCAN_END : GW_SCAN_PARTIAL);
        if (status == GW_SCAN_PARTIAL) {
            uint32_t n;
            uint64_t need = 0;
            CHECK_EQ(gw_wal_next(b + valid, cut - valid, &n, &need, 1), GW_SCAN_PARTIAL);
            CHECK_EQ(need, cut - valid < GW_WAL_REC_HDR ? (uint64_t)GW_WAL_REC_HDR
                                                        : (uint64_t)(starts[whole + 1] - starts[whole]));
        }
        free(b);
    }

    /* A damaged payload stops the scan there; the resynchronisation finds the next record. */
    uint8_t* b = malloc(len);
    CHECK(b != NULL);
    memcpy(b, log, len);
    b[starts[7] + GW_WAL_REC_HDR] ^= 0x40;
    uint64_t count;
    int status;
    CHECK_EQ(gw_wal_scan(b, len, &count, &status), starts[7]);
    CHECK_EQ(count, 7);
    CHECK_EQ(status, GW_SCAN_BADCRC);
    uint32_t n = 0;
    int whole = -1;
    int64_t at = gw_wal_candidate(b, len, starts[7] + 1, len, &n, &whole);
    /* a false candidate inside the damaged record would need a matching CRC-32C */
    CHECK_EQ(at, (int64_t)starts[8]);
    CHECK_EQ(whole, 1);
    CHECK_EQ(GW_WAL_REC_HDR + n, starts[9] - starts[8]);
    /* The next record cut by the end of the buffer: a candidate to check from the file. */
    size_t cut = starts[8] + GW_WAL_REC_HDR + 1;
    CHECK_EQ(gw_wal_candidate(b, cut, starts[7] + 1, len, &n, &whole), (int64_t)starts[8]);
    CHECK_EQ(whole, 0);
    /* ... unless the data ends before that record could: no candidate there. */
    int64_t none = gw_wal_candidate(b, cut, starts[8], starts[9] - 1, &n, &whole);
    CHECK(none < 0 || (none > (int64_t)starts[8] && whole == 0));
    CHECK_EQ(gw_wal_candidate(b, 7, 0, len, &n, &whole), -1);
    free(b);

    /* Lengths 0 and over 16 MiB are not records. */
    uint8_t hdr[GW_WAL_REC_HDR] = {0};
    uint64_t need;
    CHECK_EQ(gw_wal_scan(hdr, sizeof hdr, &count, &status), 0);
    CHECK_EQ(status, GW_SCAN_BADLEN);
    gw_put32(hdr, GW_WAL_MAX_PAYLOAD + 1);
    CHECK_EQ(gw_wal_next(hdr, sizeof hdr, &n, &need, 0), GW_SCAN_BADLEN);
    gw_put32(hdr, GW_WAL_MAX_PAYLOAD);
    CHECK_EQ(gw_wal_next(hdr, sizeof hdr, &n, &need, 0), GW_SCAN_PARTIAL);
    CHECK_EQ(need, (uint64_t)GW_WAL_REC_HDR + GW_WAL_MAX_PAYLOAD);
}

int main(void) {
    gw_crc32c_init();
    check_vectors(gw_crc32c_sw);
    check_random(gw_crc32c_sw);
    check_vectors(gw_crc32c);
    check_random(gw_crc32c);
#ifdef GW_CRC32C_SSE42
    if (gw_crc32c_hw) {
        check_vectors(gw_crc32c_sse42);
        check_random(gw_crc32c_sse42);
    }
#endif
    check_records();
    printf("crc32c ok (%s)\n", gw_crc32c_hw ? "sse4.2 and table" : "table");
    return 0;
}
