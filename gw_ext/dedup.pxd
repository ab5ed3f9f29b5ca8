# The idempotency table: which (device_id, seq) telemetry records were accepted
# within the last `window` ms, shared by every worker without locks.
#
# A fixed-size open-addressing hash table in a shared anonymous mapping the
# master creates before forking, so every worker (and a respawned one) maps the
# same pages. A slot is 16 bytes: the 64-bit key (a hash of device_id and seq,
# never 0) and a 64-bit state word `e`:
#
#   0                 empty: never used
#   GWD_RELEASED (1)  free again (an insert that lost a race gave it back)
#   2 .. 2^62-1       a record, live while e > now (e: its expiry, monotonic ms)
#   GWD_BUSY|stamp    an insert in progress (stamp: its now, ms): the key is
#                     valid (tentative) unless GWD_CLAIM is also set (claiming:
#                     the key is being written)
#   GWD_PENDING|...   a record a worker took and has not made durable yet:
#                     owner (6 bits), the owner's epoch (24 bits), a stamp (ms,
#                     32 bits). Live while the owner's epoch in the table is
#                     still that one; the owner turns it into a record (an
#                     expiry) once its log is durable past the reading.
#
# Pending records (ack mode sink means "on disk"): a worker records a reading
# as pending, appends it to its log, and commits it when the log is durable
# past it. A repeat meeting a committed record is a duplicate; meeting a
# pending one, the first copy may still be lost (its worker may die before the
# fsync), so it is not one yet: the caller holds or refuses the answer. A
# worker that starts again first commits the pending records of its previous
# life whose readings its recovered log holds, then bumps its epoch: the
# pending records left (readings the crash lost) are dead, and a repeat takes
# their place. Each owner's epoch and the log offset below which it committed
# everything live in the shared mapping after the slots.
#
# A slot changes hands only by a compare-and-swap of `e` (empty, released or
# expired -> claiming); the owner then writes the key, publishes it (claiming
# -> tentative, a full barrier), checks the probe window for another copy of
# the same key (live, or tentative: two inserts of the same pair running at
# once), and either commits (tentative -> expiry) or gives the slot back. Of
# two same-key inserts, at least one sees the other's tentative slot (both
# publish, then look: store-load ordering of the full barrier); the one further
# along the probe sequence yields, the other waits for it to decide, so exactly
# one reports the pair as new. Expiry values only grow per slot (a slot is
# reused only once its expiry is <= now, and the new one is now + window), so
# a reader's (e, key, e) snapshot with equal e's is consistent (the key of a
# free or claiming slot is never used).
#
# Why the state word and not the key is compare-and-swapped: with a CAS on the
# key and a separate store of the expiry, "my pair, expired" could not be told
# from "my pair, just claimed by another worker, expiry not written yet", and a
# worker reusing the slot for another pair could take it between the two
# writes, leaving the first pair unrecorded and the second reported as a
# duplicate (a lost record).
#
# An insert whose owner died half-way (busy for over GWD_STALE_MS) is broken by
# the next insert that needs the slot. Waits are bounded (the table's wait_ns):
# past that the insert gives up with -1 ("not recorded"), like a full table, so
# a process losing its CPU mid-insert can cost a duplicate, never a lost record.

from libc.stdint cimport uint64_t, uint8_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <time.h>
    #include <sched.h>

    #define GWD_EMPTY 0ULL
    #define GWD_RELEASED 1ULL
    #define GWD_BUSY (1ULL << 63)
    #define GWD_CLAIM (1ULL << 62)
    #define GWD_STAMP ((1ULL << 62) - 1)
    #define GWD_STALE_MS 2000ULL
    #define GWD_MAX_PROBE 32
    #define GWD_PENDING (1ULL << 62)    /* without GWD_BUSY: a pending record */
    #define GWD_OWNER_SHIFT 56
    #define GWD_EPOCH_SHIFT 32
    #define GWD_EPOCH_MASK 0xFFFFFFULL
    #define GWD_MAX_OWNERS 64
    /* gwd_seen's answers */
    #define GWD_NEW 0
    #define GWD_DUPLICATE 1
    #define GWD_PENDING_HERE 2          /* pending, recorded by the caller's own worker */
    #define GWD_PENDING_ELSEWHERE 3     /* pending, recorded by another live worker */
    #define GWD_NOT_RECORDED (-1)
    #if defined(__x86_64__) || defined(__i386__)
    #define GWD_PAUSE() __builtin_ia32_pause()
    #else
    #define GWD_PAUSE() ((void)0)
    #endif

    typedef struct { uint64_t key; uint64_t e; } gwd_slot;

    static inline uint64_t gwd_mum(uint64_t a, uint64_t b) {
        __uint128_t r = (__uint128_t)a * b;
        return (uint64_t)r ^ (uint64_t)(r >> 64);
    }

    static inline uint64_t gwd_read64(const uint8_t* p) { uint64_t v; memcpy(&v, p, 8); return v; }

    /* A 64-bit hash of (device_id, seq) (wyhash-style multiply-fold, murmur3's
       finaliser), never 0. `seed` is the table's: per server, random. */
    static inline uint64_t gwd_key(uint64_t seed, const uint8_t* p, size_t n, uint64_t seq) {
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

    static inline uint64_t gwd_clock_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
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

    static inline uint64_t gwd_load(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gwd_store(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint64_t gwd_bump(uint64_t* p) { return __atomic_add_fetch(p, 1, __ATOMIC_ACQ_REL); }

    static inline uint64_t gwd_pending_word(unsigned owner, uint64_t epoch, uint64_t now) {
        return GWD_PENDING | ((uint64_t)(owner & 63) << GWD_OWNER_SHIFT)
               | ((epoch & GWD_EPOCH_MASK) << GWD_EPOCH_SHIFT) | (now & 0xFFFFFFFFULL);
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

    /* Looks (key) up and records it if it is not there. GWD_NEW: it was not,
       and now is (until now + window_ms; or, with `pending` non-zero, as that
       pending word, *slot_out its slot); GWD_DUPLICATE: recorded and live;
       GWD_PENDING_HERE / _ELSEWHERE: a live pending record of worker `me` / of
       another worker; GWD_NOT_RECORDED: no free slot in the probe window, or an
       insert of another process stalled. */
    static int gwd_seen(gwd_slot* slots, uint64_t mask, int probe, uint64_t key,
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

    /* The owner's log is durable past a pending record: it becomes a record
       until now + window_ms. 0, or -1 if the slot no longer holds that word. */
    static int gwd_commit(gwd_slot* s, uint64_t word, uint64_t now, uint64_t window_ms) {
        uint64_t expiry = now + window_ms;
        if (expiry < 2) expiry = 2;
        if (expiry > GWD_STAMP) expiry = GWD_STAMP;
        return __atomic_compare_exchange_n(&s->e, &word, expiry, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)
               ? 0 : -1;
    }

    /* The reading of a pending record was not appended after all: the slot is free again. */
    static void gwd_abandon(gwd_slot* s, uint64_t word) {
        __atomic_compare_exchange_n(&s->e, &word, GWD_RELEASED, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }

    /* A worker starting again: its recovered log holds the reading of (key), so
       a pending record of its previous life (owner, epoch) for it becomes a
       record. 1 if there was one. */
    static int gwd_commit_recovered(gwd_slot* slots, uint64_t mask, int probe, uint64_t key,
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
    """
    ctypedef struct gwd_slot:
        uint64_t key
        uint64_t e
    const int GWD_MAX_PROBE
    const int GWD_MAX_OWNERS
    const int GWD_NEW, GWD_DUPLICATE, GWD_PENDING_HERE, GWD_PENDING_ELSEWHERE, GWD_NOT_RECORDED
    uint64_t gwd_key(uint64_t seed, const uint8_t* p, size_t n, uint64_t seq) noexcept nogil
    int gwd_seen(gwd_slot* slots, uint64_t mask, int probe, uint64_t key, uint64_t now,
                 uint64_t window_ms, uint64_t wait_ns, const uint64_t* epochs, uint64_t pending, int me,
                 uint64_t* slot_out) noexcept nogil
    int gwd_commit(gwd_slot* s, uint64_t word, uint64_t now, uint64_t window_ms) noexcept nogil
    void gwd_abandon(gwd_slot* s, uint64_t word) noexcept nogil
    int gwd_commit_recovered(gwd_slot* slots, uint64_t mask, int probe, uint64_t key, unsigned owner,
                             uint64_t epoch, uint64_t now, uint64_t window_ms) noexcept nogil
    uint64_t gwd_pending_word(unsigned owner, uint64_t epoch, uint64_t now) noexcept nogil
    uint64_t gwd_load(const uint64_t* p) noexcept nogil
    void gwd_store(uint64_t* p, uint64_t v) noexcept nogil
    uint64_t gwd_bump(uint64_t* p) noexcept nogil
    uint64_t gwd_clock_ns() noexcept nogil


# A pending record of this process: its slot, the word it holds, the end
# offset of its reading in the owner's log (UINT64_MAX: not appended yet).
cdef struct PendingRec:
    uint64_t slot
    uint64_t word
    uint64_t end


cdef class DedupTable:
    cdef gwd_slot* slots
    cdef uint64_t mask
    cdef uint64_t seed
    cdef readonly uint64_t window_ms
    cdef readonly int probe
    cdef readonly uint64_t wait_ns
    cdef readonly Py_ssize_t capacity
    cdef object mm
    cdef object view
    # Shared, after the slots: per owner (worker slot), its epoch and the log
    # offset below which every reading it recorded is committed.
    cdef uint64_t* epochs
    cdef uint64_t* committed
    # This process (after attach): the owner it records pending records for.
    cdef readonly int owner             # -1: not attached (records are final at once)
    cdef int attached_pid
    cdef uint64_t epoch
    cdef uint64_t durable_seen          # the owner's log is durable up to here
    cdef PendingRec* pend               # ring, in log order
    cdef Py_ssize_t pend_head, pend_len, pend_cap
    cdef Py_ssize_t pend_unassigned     # the newest ones, not appended yet

    # The C-level `seen` for the event loop (no Python objects, no GIL needed).
    cdef int seen_c(self, const uint8_t* device_id, size_t n, uint64_t seq, uint64_t now_ms) noexcept nogil
    # The owner's log is durable up to `offset`: commits the pending records it covers.
    cdef void durable_c(self, uint64_t offset, uint64_t now_ms) noexcept nogil
    cdef int _push(self, uint64_t slot, uint64_t word) noexcept nogil
