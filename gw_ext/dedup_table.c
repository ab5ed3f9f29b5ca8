/* The idempotency table: see dedup_table.h, and dedup.pxd for the protocol. */
#include "dedup_table.h"

#include <sched.h>
#include <string.h>

#define GWD_STALE_MS 2000ULL        /* an insert busy this long: its owner died half-way */
#if defined(__x86_64__) || defined(__i386__)
#define GWD_PAUSE() __builtin_ia32_pause()
#else
#define GWD_PAUSE() ((void)0)
#endif

static inline uint64_t gwd_mum(uint64_t a, uint64_t b) {
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static inline uint64_t gwd_read64(const uint8_t* p) { uint64_t v; memcpy(&v, p, 8); return v; }

uint64_t gwd_key(uint64_t seed, const uint8_t* p, size_t n, uint64_t seq) {
    const uint64_t P0 = 0xa0761d6478bd642fULL, P1 = 0xe7037ed1a0b428dbULL,
                   P2 = 0x8ebc6af09c88c6e3ULL, P3 = 0x589965cc75374cc3ULL;
    uint64_t h = seed ^ gwd_mum((uint64_t)n ^ P0, P1);
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        h = gwd_mum(gwd_read64(p + i) ^ P1 ^ h, gwd_read64(p + i + 8) ^ P2);
    uint64_t a = 0, b = 0;
    size_t r = n - i;
    if (r > 8) { memcpy(&a, p + i, 8); memcpy(&b, p + i + 8, r - 8); }
    else if (r) memcpy(&a, p + i, r);
    h = gwd_mum(a ^ P1 ^ h, b ^ P2 ^ (uint64_t)r);
    h = gwd_mum(h ^ P3, seq ^ P0);
    h ^= h >> 33; h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h ? h : 0x9e3779b97f4a7c15ULL;
}

/* A consistent (key, e) of a slot: e read before and after the key agree. */
static inline uint64_t gwd_snap(gwd_slot* s, uint64_t* key) {
    for (;;) {
        uint64_t e1 = __atomic_load_n(&s->e, __ATOMIC_SEQ_CST);
        uint64_t k = __atomic_load_n(&s->key, __ATOMIC_SEQ_CST);
        uint64_t e2 = __atomic_load_n(&s->e, __ATOMIC_SEQ_CST);
        if (e1 == e2) { *key = k; return e1; }
    }
}

static inline int gwd_stale(uint64_t e, uint64_t now) {
    return (e & GWD_STAMP) + GWD_STALE_MS < now;
}

static inline int gwd_is_pending(uint64_t e) { return (e & (GWD_BUSY | GWD_PENDING)) == GWD_PENDING; }
static inline unsigned gwd_owner(uint64_t e) { return (unsigned)((e >> GWD_OWNER_SHIFT) & 63); }
static inline uint64_t gwd_epoch_of(uint64_t e) { return (e >> GWD_EPOCH_SHIFT) & GWD_EPOCH_MASK; }

/* Whether the worker that wrote pending word e still runs that life. */
static inline int gwd_pending_live(const uint64_t* epochs, uint64_t e) {
    return gwd_epoch_of(e) == (__atomic_load_n(&epochs[gwd_owner(e)], __ATOMIC_ACQUIRE) & GWD_EPOCH_MASK);
}

static inline int gwd_pending_answer(uint64_t e, int me) {
    return (int)gwd_owner(e) == me ? GWD_PENDING_HERE : GWD_PENDING_ELSEWHERE;
}

/* Waits until slot s leaves state e (another process deciding an insert of
   the same pair: normally well under a microsecond, longer only if that
   process lost its CPU); 0 if it did, -1 after wait_ns. */
static int gwd_wait(gwd_slot* s, uint64_t e, uint64_t wait_ns) {
    uint64_t deadline = 0;
    unsigned spins = 0;
    while (__atomic_load_n(&s->e, __ATOMIC_ACQUIRE) == e) {
        if (++spins < 100) { GWD_PAUSE(); continue; }
        uint64_t t = gwd_clock_ns();
        if (deadline == 0) deadline = t + wait_ns;
        else if (t >= deadline) return -1;
        if (spins < 1000) sched_yield();
        else { struct timespec ts = {0, 50000}; nanosleep(&ts, NULL); }
    }
    return 0;
}

int gwd_seen(gwd_slot* slots, uint64_t mask, int probe, uint64_t key,
             uint64_t now, uint64_t window_ms, uint64_t wait_ns,
             const uint64_t* epochs, uint64_t pending, int me, uint64_t* slot_out) {
    uint64_t home = key & mask;
    uint64_t expiry = now + window_ms;
    if (expiry < 2) expiry = 2;
    if (expiry > GWD_STAMP) expiry = GWD_STAMP;
    uint64_t final = pending ? pending : expiry;
    uint64_t claiming = GWD_BUSY | GWD_CLAIM | (now & GWD_STAMP);
    uint64_t tentative = GWD_BUSY | (now & GWD_STAMP);
    int answer;
    uint64_t wait_e;
    gwd_slot* wait_s;
restart:;
    int mine = -1;
    uint64_t mine_e = 0;
    /* 1. Look for the key; note the first slot that could take it. */
    for (int i = 0; i < probe; i++) {
        gwd_slot* s = &slots[(home + i) & mask];
        uint64_t k, e;
    reread:
        e = gwd_snap(s, &k);
        if (e == GWD_EMPTY) {        /* slots never become empty again: */
            if (mine < 0) { mine = i; mine_e = e; }   /* nothing of ours past it */
            break;
        }
        if (e & GWD_BUSY) {
            if (gwd_stale(e, now)) {  /* its owner died half-way */
                __atomic_compare_exchange_n(&s->e, &e, GWD_RELEASED, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST);
                goto reread;
            }
            if (!(e & GWD_CLAIM) && k == key) {   /* the same pair, being inserted now */
                if (gwd_wait(s, e, wait_ns) == 0) goto reread;
            }
            continue;                 /* someone's insert: occupied */
        }
        if (gwd_is_pending(e)) {
            if (!gwd_pending_live(epochs, e)) {   /* its worker died before the fsync */
                if (mine < 0) { mine = i; mine_e = e; }
                continue;
            }
            if (k == key) return gwd_pending_answer(e, me);
            continue;
        }
        if (e == GWD_RELEASED || e <= now) {
            if (mine < 0) { mine = i; mine_e = e; }
            continue;
        }
        if (k == key) return GWD_DUPLICATE;   /* live: a duplicate */
    }
    if (mine < 0) return GWD_NOT_RECORDED;    /* every slot of the window live: full */
    /* 2. Take the slot, write the key, publish it as tentative. */
    gwd_slot* m = &slots[(home + mine) & mask];
    if (!__atomic_compare_exchange_n(&m->e, &mine_e, claiming, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST))
        goto restart;                 /* someone else took it first */
    __atomic_store_n(&m->key, key, __ATOMIC_RELAXED);
    uint64_t exp = claiming;
    if (!__atomic_compare_exchange_n(&m->e, &exp, tentative, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST))
        goto restart;                 /* broken as stale: we were stopped too long */
    /* (That seq_cst CAS orders the loads below after it: no fence needed.) */
    /* 3. Another copy of the key in the window? */
validate:
    for (int j = 0; j < probe; j++) {
        if (j == mine) continue;
        gwd_slot* t = &slots[(home + j) & mask];
        uint64_t k, e = gwd_snap(t, &k);
        if (e == GWD_EMPTY) break;
        if (k != key || e == GWD_RELEASED) continue;
        if (e & GWD_BUSY) {
            if ((e & GWD_CLAIM) || gwd_stale(e, now)) continue;
            if (j < mine) {            /* the earlier one decides */
                if (!pending) { answer = GWD_DUPLICATE; goto yield; }
                /* It may become a record or a pending one (of which worker?): let
                   it decide, then look again. */
                wait_s = t;
                wait_e = e;
                goto wait_earlier;
            }
            if (gwd_wait(t, e, wait_ns) == 0) goto validate;   /* let the later one yield */
            goto give_up;
        }
        if (gwd_is_pending(e)) {
            if (!gwd_pending_live(epochs, e)) continue;
            answer = gwd_pending_answer(e, me);
            goto yield;
        }
        if (e > now) { answer = GWD_DUPLICATE; goto yield; }   /* live: a duplicate */
    }
    exp = tentative;
    if (__atomic_compare_exchange_n(&m->e, &exp, final, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        *slot_out = (home + mine) & mask;
        return GWD_NEW;
    }
    goto restart;                     /* broken as stale */
yield:
    exp = tentative;
    __atomic_compare_exchange_n(&m->e, &exp, GWD_RELEASED, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return answer;
wait_earlier:
    exp = tentative;
    __atomic_compare_exchange_n(&m->e, &exp, GWD_RELEASED, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    if (gwd_wait(wait_s, wait_e, wait_ns) == 0) goto restart;
    return GWD_NOT_RECORDED;
give_up:
    exp = tentative;
    __atomic_compare_exchange_n(&m->e, &exp, GWD_RELEASED, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return GWD_NOT_RECORDED;
}

int gwd_commit(gwd_slot* s, uint64_t word, uint64_t now, uint64_t window_ms) {
    uint64_t expiry = now + window_ms;
    if (expiry < 2) expiry = 2;
    if (expiry > GWD_STAMP) expiry = GWD_STAMP;
    return __atomic_compare_exchange_n(&s->e, &word, expiry, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)
           ? 0 : -1;
}

void gwd_abandon(gwd_slot* s, uint64_t word) {
    __atomic_compare_exchange_n(&s->e, &word, GWD_RELEASED, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

int gwd_commit_recovered(gwd_slot* slots, uint64_t mask, int probe, uint64_t key,
                         unsigned owner, uint64_t epoch, uint64_t now, uint64_t window_ms) {
    uint64_t home = key & mask;
    for (int i = 0; i < probe; i++) {
        gwd_slot* s = &slots[(home + i) & mask];
        uint64_t k, e = gwd_snap(s, &k);
        if (e == GWD_EMPTY) break;
        if (k == key && gwd_is_pending(e) && gwd_owner(e) == owner
                && gwd_epoch_of(e) == (epoch & GWD_EPOCH_MASK))
            return gwd_commit(s, e, now, window_ms) == 0;
    }
    return 0;
}
