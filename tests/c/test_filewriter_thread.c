/* The persistence writer thread (gw_ext/filewriter_thread.c) on real files:
   snapshots replaced while one is written, injected failures, completions
   past the results' capacity, a full file table, and a stop that writes what
   is still pending. Usage: test_filewriter_thread DIR */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "filewriter_thread.h"

static char root[4096];

static void path_of(char* out, size_t cap, const char* name, const char* suffix) {
    snprintf(out, cap, "%s/%s%s", root, name, suffix);
}

static int slot_of(struct gw_fw* w, const char* name) {
    char p[4200], t[4200];
    path_of(p, sizeof p, name, "");
    path_of(t, sizeof t, name, ".tmp");
    return gw_fw_slot_of(w, p, t, root);
}

static uint64_t submit(struct gw_fw* w, int slot, const char* text) {
    size_t n = strlen(text);
    uint8_t* b = malloc(n ? n : 1);            /* the writer frees it */
    CHECK(b != NULL);
    memcpy(b, text, n);
    return gw_fw_submit(w, slot, b, n);
}

static void check_content(const char* name, const char* want) {
    char p[4200], got[256];
    path_of(p, sizeof p, name, "");
    int fd = open(p, O_RDONLY);
    CHECK(fd >= 0);
    ssize_t n = read(fd, got, sizeof got - 1);
    close(fd);
    CHECK(n >= 0);
    got[n] = 0;
    if (strcmp(got, want) != 0) fprintf(stderr, "%s: '%s', want '%s'\n", name, got, want);
    CHECK(strcmp(got, want) == 0);
    path_of(p, sizeof p, name, ".tmp");
    CHECK(access(p, F_OK) != 0);               /* no temporary file left */
}

int main(int argc, char** argv) {
    CHECK(argc == 2);
    snprintf(root, sizeof root, "%s", argv[1]);
    struct gw_fw* w = gw_fw_new();
    CHECK(w != NULL);
    CHECK_EQ(gw_fw_start(w), 0);
    CHECK_EQ(gw_fw_start(w), 0);               /* again: a no-op */
    struct gw_fw_result res[64];

    /* Two files, several snapshots each: the last one of each is what stays. */
    int a = slot_of(w, "a"), b = slot_of(w, "b");
    CHECK(a >= 0 && b >= 0 && a != b);
    CHECK_EQ(slot_of(w, "a"), a);
    char text[64];
    uint64_t last_a = 0, last_b = 0;
    for (int i = 0; i < 50; i++) {
        snprintf(text, sizeof text, "a-%d", i);
        last_a = submit(w, a, text);
        snprintf(text, sizeof text, "b-%d", i);
        last_b = submit(w, b, text);
    }
    CHECK_EQ(last_a, 50);
    CHECK_EQ(gw_fw_wait_idle(w, 0), 1);
    check_content("a", "a-49");
    check_content("b", "b-49");
    int n = gw_fw_take(w, res, 64);
    CHECK(n >= 2 && n <= 64);
    uint64_t seen_a = 0, seen_b = 0;
    for (int i = 0; i < n; i++) {
        CHECK_EQ(res[i].err, 0);
        uint64_t* seen = res[i].slot == a ? &seen_a : &seen_b;
        CHECK(res[i].gen > *seen);               /* oldest first */
        *seen = res[i].gen;
    }
    CHECK_EQ(seen_a, last_a);
    CHECK_EQ(seen_b, last_b);
    CHECK_EQ(gw_fw_writes(w), (uint64_t)n);
    CHECK_EQ(gw_fw_take(w, res, 64), 0);

    /* A failure is reported, the file keeps its previous content. */
    gw_fw_inject(w, EIO, 1, 0);
    uint64_t g = submit(w, a, "lost");
    CHECK_EQ(gw_fw_wait_idle(w, 0), 1);
    CHECK_EQ(gw_fw_take(w, res, 64), 1);
    CHECK_EQ(res[0].err, EIO);
    CHECK_EQ(res[0].gen, g);
    CHECK_EQ(gw_fw_errors(w), 1);
    check_content("a", "a-49");

    /* A slow write: not idle while it lasts; the snapshots behind it are replaced. */
    gw_fw_inject(w, 0, 0, 500000000);
    uint64_t first = submit(w, a, "slow-0"), newest = 0;
    /* The writer has taken slow-0 before the others come: on a loaded machine
       its thread may start late, and a snapshot still pending is replaced by
       a newer one, not written. (Each wait: 0.1 ms, not idle meanwhile.) */
    for (int tries = 0; !gw_fw_busy(w) && tries < 100000; tries++)
        gw_fw_wait_idle(w, 100000);
    CHECK(gw_fw_busy(w) == 1);
    CHECK_EQ(gw_fw_wait_idle(w, 1000000), 0);  /* 1 ms into a write of at least 500 ms */
    for (int i = 1; i <= 5; i++) {
        snprintf(text, sizeof text, "slow-%d", i);
        newest = submit(w, a, text);
    }
    CHECK_EQ(gw_fw_wait_idle(w, 0), 1);
    CHECK(gw_fw_busy(w) == 0);
    check_content("a", "slow-5");
    n = gw_fw_take(w, res, 64);
    CHECK(n >= 2 && n <= 6);                   /* slow-0, slow-5 and what began between */
    CHECK_EQ(res[0].gen, first);
    CHECK_EQ(res[n - 1].gen, newest);
    gw_fw_inject(w, 0, 0, 0);

    /* More completions than the results hold: the oldest 64 kept, the rest counted. */
    for (int i = 0; i < 70; i++) {
        snprintf(text, sizeof text, "c-%d", i);
        submit(w, b, text);
        CHECK_EQ(gw_fw_wait_idle(w, 0), 1);
    }
    CHECK_EQ(gw_fw_take(w, res, 64), 64);
    CHECK_EQ(gw_fw_take(w, res, 64), 0);
    CHECK_EQ(gw_fw_lost(w), 6);
    check_content("b", "c-69");

    /* Eight files at most. */
    char name[16];
    for (int i = 2; i < 8; i++) {
        snprintf(name, sizeof name, "f%d", i);
        CHECK(slot_of(w, name) == i);
    }
    CHECK_EQ(slot_of(w, "one-too-many"), -1);

    /* Stopping writes what is pending first. */
    for (int i = 2; i < 8; i++) {
        snprintf(name, sizeof name, "f%d", i);
        submit(w, i, name);
    }
    gw_fw_stop(w);
    for (int i = 2; i < 8; i++) {
        snprintf(name, sizeof name, "f%d", i);
        check_content(name, name);
    }
    gw_fw_free(w);
    printf("filewriter_thread ok\n");
    return 0;
}
