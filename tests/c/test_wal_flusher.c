/* The write-ahead log's writer (gw_ext/wal_flusher.c) on real files: the
   loop thread (main) appends records of every size while the flusher writes
   them into small segments, in each fsync policy, through injected write and
   fdatasync failures; then every segment is read back and scanned: each
   record exactly once, in order, at its offset. Usage: test_wal_flusher DIR */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "wal_flusher.h"

enum { RECORDS = 4000, MAX_LEN = 700 };
#define SEGMENT_BYTES 8192ULL
#define MAX_PENDING (64ULL << 10)

static uint8_t payload_byte(int rec, uint32_t i) { return (uint8_t)(rec * 31 + i * 7 + 1); }
static uint32_t payload_len(int rec) { return 1 + (uint32_t)((rec * 2654435761u) % MAX_LEN); }

static uint8_t* read_file(int dirfd, const char* name, size_t* len) {
    int fd = openat(dirfd, name, O_RDONLY);
    CHECK(fd >= 0);
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    uint8_t* b = malloc((size_t)st.st_size + 1);
    CHECK(b != NULL);
    CHECK(read(fd, b, (size_t)st.st_size) == st.st_size);
    close(fd);
    *len = (size_t)st.st_size;
    return b;
}

/* A started log in the new directory root/name, as recovery leaves an empty
   one: its first segment holding only its header. */
static struct gw_wal* new_log(const char* root, const char* name, int mode, uint64_t batch_ns) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/%s", root, name);
    CHECK(mkdir(dir, 0755) == 0);
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    CHECK(dirfd >= 0);
    int fd = openat(dirfd, "00000000000000000000.wal", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    CHECK(fd >= 0);
    uint8_t hdr[GW_WAL_HDR] = "GWWAL001";
    CHECK(write(fd, hdr, sizeof hdr) == (ssize_t)sizeof hdr);
    struct gw_wal* w = gw_wal_new(mode, SEGMENT_BYTES, MAX_PENDING, batch_ns);
    CHECK(w != NULL);
    CHECK_EQ(gw_wal_start(w, dirfd, fd, 0, 0), 0);
    return w;
}

static void run(const char* root, int mode, int inject) {
    char name[64];
    snprintf(name, sizeof name, "wal-%d-%d", mode, inject);
    struct gw_wal* w = new_log(root, name, mode, 2000000);

    uint8_t buf[MAX_LEN];
    uint64_t end = 0, durable = 0;
    int refused = 0;
    for (int rec = 0; rec < RECORDS; rec++) {
        if (inject && rec == RECORDS / 3)          /* the flusher's next calls fail; retried every 1 ms */
            gw_wal_inject(w, mode == GW_WAL_OFF ? 0 : EIO, mode == GW_WAL_OFF ? 0 : 2, ENOSPC, 3, 1000000);
        uint32_t n = payload_len(rec);
        for (uint32_t i = 0; i < n; i++) buf[i] = payload_byte(rec, i);
        int64_t at;
        while ((at = gw_wal_append(w, buf, n, 0)) < 0) {   /* full, or in the error state: wait */
            refused++;
            gw_wal_flush(w, 5000000);
        }
        end += GW_WAL_REC_HDR + n;
        CHECK_EQ((uint64_t)at, end);
        CHECK_EQ(gw_wal_appended(w), end);
        uint64_t d = gw_wal_drain(w);
        CHECK(d >= durable && d <= end);           /* the durable offset only grows */
        durable = d;
    }
    CHECK_EQ(gw_wal_flush(w, 0), 1);
    CHECK_EQ(gw_wal_durable(w), end);
    CHECK_EQ(gw_wal_err(w), 0);
    if (mode != GW_WAL_OFF) CHECK(gw_wal_fsyncs(w) > 0);
    if (inject) CHECK(gw_wal_errors(w) >= 1);
    else CHECK_EQ(gw_wal_errors(w), 0);
    CHECK(gw_wal_cur_base(w) > 0);
    gw_wal_free(w);                                 /* stops the flusher, closes both fds */

    /* Read it back: segments named by their base, each within SEGMENT_BYTES. */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/%s", root, name);
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    CHECK(dirfd >= 0);
    uint64_t off = 0;
    int rec = 0, segments = 0;
    while (off < end) {
        char name[32];
        snprintf(name, sizeof name, "%020llu.wal", (unsigned long long)off);
        size_t len;
        uint8_t* seg = read_file(dirfd, name, &len);
        segments++;
        CHECK(len > GW_WAL_HDR);
        CHECK(memcmp(seg, "GWWAL001", 8) == 0);
        uint64_t base = 0;
        for (int i = 0; i < 8; i++) base |= (uint64_t)seg[8 + i] << (8 * i);
        CHECK_EQ(base, off);
        uint64_t count;
        int status;
        size_t valid = gw_wal_scan(seg + GW_WAL_HDR, len - GW_WAL_HDR, &count, &status);
        CHECK_EQ(status, GW_SCAN_END);              /* whole records, every CRC right */
        CHECK_EQ(valid, len - GW_WAL_HDR);
        CHECK(len <= SEGMENT_BYTES || count == 1);
        for (size_t p = GW_WAL_HDR; p < len; rec++) {
            uint32_t n = gw_le32(seg + p);
            CHECK(rec < RECORDS);
            CHECK_EQ(n, payload_len(rec));
            for (uint32_t i = 0; i < n; i++) CHECK_EQ(seg[p + GW_WAL_REC_HDR + i], payload_byte(rec, i));
            p += GW_WAL_REC_HDR + n;
        }
        off += valid;
        free(seg);
    }
    CHECK_EQ(off, end);
    CHECK_EQ(rec, RECORDS);
    CHECK(segments > 10);
    close(dirfd);
    printf("mode %d%s: %d records, %d segments, %d appends refused while waiting\n",
           mode, inject ? " with failures" : "", RECORDS, segments, refused);
}

/* A log stopped with records pending writes them first; one stopped in its
   error state gives up (none of it was acknowledged), and a flush does not
   wait for it. */
static void run_stop(const char* root) {
    uint8_t rec[100] = {1};
    struct gw_wal* w = new_log(root, "wal-stop", GW_WAL_BATCH, 1000000000ULL);
    for (int i = 0; i < 10; i++) CHECK(gw_wal_append(w, rec, sizeof rec, 0) > 0);
    gw_wal_stop(w);                                  /* within the 1 s batch window */
    CHECK_EQ(gw_wal_durable(w), 10 * (GW_WAL_REC_HDR + sizeof rec));
    CHECK_EQ(gw_wal_append(w, rec, sizeof rec, 0), -1);
    gw_wal_free(w);

    w = new_log(root, "wal-stop-failing", GW_WAL_BATCH, 0);
    gw_wal_inject(w, 0, -1, EIO, 1000000, 0);        /* every write fails, retried every second */
    CHECK(gw_wal_append(w, rec, sizeof rec, 0) > 0);
    for (int i = 0; gw_wal_err(w) == 0; i++) {       /* until the flusher has tried */
        CHECK(i < 1000);
        CHECK_EQ(gw_wal_flush(w, 20000000), 0);      /* never durable */
    }
    CHECK_EQ(gw_wal_err(w), EIO);
    CHECK(!gw_wal_room(w, sizeof rec));
    CHECK_EQ(gw_wal_append(w, rec, sizeof rec, 0), -1);      /* refused in the error state */
    CHECK(gw_wal_append(w, rec, sizeof rec, 1) > 0);         /* unless the caller saw room */
    gw_wal_stop(w);
    CHECK_EQ(gw_wal_durable(w), 0);
    CHECK_EQ(gw_wal_flush(w, 0), 0);                 /* stopped: nothing will make it durable */
    gw_wal_free(w);
}

int main(int argc, char** argv) {
    CHECK(argc == 2);
    gw_crc32c_init();
    gw_wal_init();
    for (int inject = 0; inject <= 1; inject++) {
        run(argv[1], GW_WAL_ALWAYS, inject);
        run(argv[1], GW_WAL_BATCH, inject);
        run(argv[1], GW_WAL_OFF, inject);
    }
    run_stop(argv[1]);
    printf("wal_flusher ok\n");
    return 0;
}
