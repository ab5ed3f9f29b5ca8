/* The idempotency table (gw_ext/dedup_table.c): its answers one call at a
   time (new, duplicate, expiry, pending here and elsewhere, commit, abandon,
   recovery, a dead owner's epoch, a stalled or dead insert, a full probe
   window), then threads racing on the same pairs the way worker processes
   do on the shared mapping: each pair reported new exactly once. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "dedup_table.h"

enum { PROBE = 32, WINDOW_MS = 60000 };
#define WAIT_NS 5000000000ULL                 /* long: a racing insert is never given up on */

static uint64_t epochs[GWD_MAX_OWNERS];

static gwd_slot* new_table(uint64_t capacity) {
    gwd_slot* t = calloc(capacity, sizeof(gwd_slot));
    CHECK(t != NULL);
    return t;
}

static int seen(gwd_slot* t, uint64_t mask, uint64_t key, uint64_t now, uint64_t pending, int me,
                uint64_t* slot) {
    return gwd_seen(t, mask, PROBE, key, now, WINDOW_MS, WAIT_NS, epochs, pending, me, slot);
}

static void check_key(void) {
    unsigned long long s = 7;
    uint8_t src[80];
    for (size_t i = 0; i < sizeof src; i++) src[i] = (uint8_t)check_rand(&s);
    uint64_t prev = 0;
    for (size_t n = 0; n <= 64; n++) {
        uint8_t* p = malloc(n ? n : 1);            /* exact size: ASan sees an over-read */
        CHECK(p != NULL);
        memcpy(p, src, n);
        uint64_t k = gwd_key(1, p, n, 42);
        CHECK(k != 0);
        CHECK(k != prev);
        CHECK_EQ(gwd_key(1, p, n, 42), k);
        CHECK(gwd_key(2, p, n, 42) != k);
        CHECK(gwd_key(1, p, n, 43) != k);
        prev = k;
        free(p);
    }
}

static void check_one_at_a_time(void) {
    const uint64_t cap = 1024, mask = cap - 1;
    gwd_slot* t = new_table(cap);
    uint64_t slot, now = 1000000;

    /* final records: new, then a duplicate while live, new again once expired */
    CHECK_EQ(seen(t, mask, 11, now, 0, 0, &slot), GWD_NEW);
    CHECK_EQ(seen(t, mask, 11, now + 1, 0, 0, &slot), GWD_DUPLICATE);
    CHECK_EQ(seen(t, mask, 12, now, 0, 0, &slot), GWD_NEW);
    CHECK_EQ(seen(t, mask, 11, now + WINDOW_MS - 1, 0, 0, &slot), GWD_DUPLICATE);
    CHECK_EQ(seen(t, mask, 11, now + WINDOW_MS, 0, 0, &slot), GWD_NEW);

    /* pending: here for its owner, elsewhere for another; committed: a duplicate */
    epochs[3] = 5;
    uint64_t w3 = gwd_pending_word(3, 5, now);
    CHECK_EQ(seen(t, mask, 21, now, w3, 3, &slot), GWD_NEW);
    CHECK_EQ(t[slot].key, 21);
    CHECK_EQ(t[slot].e, w3);
    CHECK_EQ(seen(t, mask, 21, now, gwd_pending_word(4, 0, now), 4, &slot), GWD_PENDING_ELSEWHERE);
    CHECK_EQ(seen(t, mask, 21, now, w3, 3, &slot), GWD_PENDING_HERE);
    CHECK_EQ(seen(t, mask, 21, now, 0, 0, &slot), GWD_PENDING_ELSEWHERE);
    uint64_t s21 = 21 & mask;
    CHECK_EQ(gwd_commit(&t[s21], w3, now, WINDOW_MS), 0);
    CHECK_EQ(gwd_commit(&t[s21], w3, now, WINDOW_MS), -1);       /* no longer that word */
    CHECK_EQ(seen(t, mask, 21, now, w3, 3, &slot), GWD_DUPLICATE);

    /* abandoned: free again */
    CHECK_EQ(seen(t, mask, 22, now, w3, 3, &slot), GWD_NEW);
    gwd_abandon(&t[slot], w3);
    CHECK_EQ(t[slot].e, GWD_RELEASED);
    CHECK_EQ(seen(t, mask, 22, now, 0, 0, &slot), GWD_NEW);

    /* a new life of owner 3: what its recovered log holds is committed, the rest is dead */
    CHECK_EQ(seen(t, mask, 23, now, w3, 3, &slot), GWD_NEW);
    CHECK_EQ(seen(t, mask, 24, now, w3, 3, &slot), GWD_NEW);
    CHECK_EQ(gwd_commit_recovered(t, mask, PROBE, 23, 3, 5, now, WINDOW_MS), 1);
    CHECK_EQ(gwd_commit_recovered(t, mask, PROBE, 23, 3, 5, now, WINDOW_MS), 0);
    CHECK_EQ(gwd_commit_recovered(t, mask, PROBE, 24, 3, 4, now, WINDOW_MS), 0);   /* another life */
    CHECK_EQ(gwd_bump(&epochs[3]), 6);
    CHECK_EQ(seen(t, mask, 23, now, 0, 0, &slot), GWD_DUPLICATE);
    CHECK_EQ(seen(t, mask, 24, now, 0, 0, &slot), GWD_NEW);       /* its reading was lost */

    /* an insert that died claiming a slot, or tentative: broken once stale */
    gwd_slot* s = &t[31];
    s->key = 31;
    s->e = GWD_BUSY | GWD_CLAIM | (now & GWD_STAMP);
    CHECK_EQ(seen(t, mask, 31, now + 5000, 0, 0, &slot), GWD_NEW);
    CHECK_EQ(slot, 31);                      /* released, then taken */
    CHECK_EQ(s->e, now + 5000 + WINDOW_MS);
    s = &t[40];
    s->key = 40;
    s->e = GWD_BUSY | (now & GWD_STAMP);
    CHECK_EQ(seen(t, mask, 40, now + 5000, 0, 0, &slot), GWD_NEW);

    /* a same-pair insert that stalls (tentative, not stale): waited for, then given up */
    s = &t[50];
    s->key = 50;
    s->e = GWD_BUSY | (now & GWD_STAMP);
    CHECK_EQ(gwd_seen(t, mask, PROBE, 50, now, WINDOW_MS, 1000000, epochs, w3, 3, &slot),
             GWD_NOT_RECORDED);
    CHECK_EQ(gwd_seen(t, mask, PROBE, 50, now, WINDOW_MS, 1000000, epochs, 0, 0, &slot),
             GWD_DUPLICATE);                 /* final: the earlier insert decides */
    for (uint64_t i = 51; i < 51 + PROBE; i++)
        CHECK(!(t[i & mask].e & GWD_BUSY));  /* what those inserts claimed was given back */

    /* a full probe window: every pair homed on slot 512 */
    uint64_t home = 512;
    int news = 0, refused = 0;
    for (uint64_t i = 0; i < PROBE + 8; i++) {
        int r = seen(t, mask, home + i * cap, now, 0, 0, &slot);
        CHECK(r == GWD_NEW || r == GWD_NOT_RECORDED);
        news += r == GWD_NEW;
        refused += r == GWD_NOT_RECORDED;
    }
    CHECK_EQ(news, PROBE);
    CHECK_EQ(refused, 8);
    free(t);
}

/* ---- threads racing ---------------------------------------------------------- */

enum { THREADS = 4, KEYS = 3000 };
#define RACE_CAP 16384ULL

struct race {
    gwd_slot* t;
    pthread_barrier_t start;
    int pending;                              /* 1: pending records, each thread an owner */
    int shuffled;                             /* 0: every thread in the same order (most contention) */
    uint64_t now;
    int news[KEYS], not_recorded[KEYS], pending_here[KEYS], commit_failed[KEYS];
};

struct racer { struct race* r; int id; };

static int abandoned(uint64_t key) { return key % 3 == 0; }

static void* race_main(void* arg) {
    struct racer* me = arg;
    struct race* r = me->r;
    unsigned long long s = 1234567ULL * (unsigned long long)(me->id + 1);
    int order[KEYS];
    for (int i = 0; i < KEYS; i++) order[i] = i;
    for (int i = KEYS - 1; r->shuffled && i > 0; i--) {      /* each thread its own order */
        int j = (int)(check_rand(&s) % (unsigned long long)(i + 1)), x = order[i];
        order[i] = order[j];
        order[j] = x;
    }
    uint64_t word = r->pending ? gwd_pending_word((unsigned)me->id, gwd_load(&epochs[me->id]), r->now) : 0;
    pthread_barrier_wait(&r->start);
    for (int i = 0; i < KEYS; i++) {
        int k = order[i];
        uint64_t key = 0x5bd1e995ULL * (uint64_t)(k + 1), slot = 0;
        int a = gwd_seen(r->t, RACE_CAP - 1, PROBE, key, r->now, WINDOW_MS, WAIT_NS, epochs, word,
                         me->id, &slot);
        if (a == GWD_NEW) {
            __atomic_add_fetch(&r->news[k], 1, __ATOMIC_RELAXED);
            if (r->pending) {
                if (abandoned(key)) gwd_abandon(&r->t[slot], word);
                else if (gwd_commit(&r->t[slot], word, r->now, WINDOW_MS) != 0)
                    __atomic_add_fetch(&r->commit_failed[k], 1, __ATOMIC_RELAXED);
            }
        } else if (a == GWD_NOT_RECORDED) {
            __atomic_add_fetch(&r->not_recorded[k], 1, __ATOMIC_RELAXED);
        } else if (a == GWD_PENDING_HERE) {
            __atomic_add_fetch(&r->pending_here[k], 1, __ATOMIC_RELAXED);
        } else {
            CHECK(a == GWD_DUPLICATE || (r->pending && a == GWD_PENDING_ELSEWHERE));
        }
    }
    return NULL;
}

static void race(int pending, int shuffled) {
    static struct race r;
    memset(&r, 0, sizeof r);
    r.t = new_table(RACE_CAP);
    r.pending = pending;
    r.shuffled = shuffled;
    CHECK(pthread_barrier_init(&r.start, NULL, THREADS) == 0);
    r.now = gwd_clock_ns() / 1000000;
    pthread_t th[THREADS];
    struct racer who[THREADS];
    for (int i = 0; i < THREADS; i++) {
        epochs[i] = 1;
        who[i].r = &r;
        who[i].id = i;
        CHECK(pthread_create(&th[i], NULL, race_main, &who[i]) == 0);
    }
    for (int i = 0; i < THREADS; i++) CHECK(pthread_join(th[i], NULL) == 0);
    pthread_barrier_destroy(&r.start);
    for (int k = 0; k < KEYS; k++) {
        uint64_t key = 0x5bd1e995ULL * (uint64_t)(k + 1), slot;
        CHECK_EQ(r.not_recorded[k], 0);        /* room enough, waits long enough */
        CHECK_EQ(r.pending_here[k], 0);        /* each owner records each pair once */
        CHECK_EQ(r.commit_failed[k], 0);       /* a live owner's pending record is its own */
        if (pending && abandoned(key)) {
            CHECK(r.news[k] >= 1);             /* given back: another may take it */
            CHECK_EQ(seen(r.t, RACE_CAP - 1, key, r.now, 0, 0, &slot), GWD_NEW);
        } else {
            CHECK_EQ(r.news[k], 1);            /* exactly one caller reports the pair new */
            CHECK_EQ(seen(r.t, RACE_CAP - 1, key, r.now, 0, 0, &slot), GWD_DUPLICATE);
        }
    }
    free(r.t);
}

int main(void) {
    check_key();
    check_one_at_a_time();
    for (int round = 0; round < 20; round++) {
        race(0, round & 1);
        race(1, round & 1);
    }
    printf("dedup_table ok\n");
    return 0;
}
