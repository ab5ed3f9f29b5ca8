/* The idempotency table's slots and operations (the protocol is described in
   dedup.pxd): open addressing over 16-byte slots in memory shared by every
   worker, each slot changing hands by compare-and-swap of its state word
   (GCC atomics, no locks). dedup.pyx wraps it as DedupTable. */
#ifndef GW_DEDUP_TABLE_H
#define GW_DEDUP_TABLE_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* The state word `e` of a slot. */
#define GWD_EMPTY 0ULL
#define GWD_RELEASED 1ULL
#define GWD_BUSY (1ULL << 63)
#define GWD_CLAIM (1ULL << 62)
#define GWD_STAMP ((1ULL << 62) - 1)
#define GWD_PENDING (1ULL << 62)    /* without GWD_BUSY: a pending record */
#define GWD_OWNER_SHIFT 56
#define GWD_EPOCH_SHIFT 32
#define GWD_EPOCH_MASK 0xFFFFFFULL
#define GWD_MAX_OWNERS 64
#define GWD_MAX_PROBE 32
/* gwd_seen's answers */
#define GWD_NEW 0
#define GWD_DUPLICATE 1
#define GWD_PENDING_HERE 2          /* pending, recorded by the caller's own worker */
#define GWD_PENDING_ELSEWHERE 3     /* pending, recorded by another live worker */
#define GWD_NOT_RECORDED (-1)

typedef struct { uint64_t key; uint64_t e; } gwd_slot;

#pragma GCC visibility push(hidden)

/* A 64-bit hash of (device_id, seq) (wyhash-style multiply-fold, murmur3's
   finaliser), never 0. `seed` is the table's: per server, random. */
uint64_t gwd_key(uint64_t seed, const uint8_t* p, size_t n, uint64_t seq);

/* Looks (key) up and records it if it is not there. GWD_NEW: it was not,
   and now is (until now + window_ms; or, with `pending` non-zero, as that
   pending word, *slot_out its slot); GWD_DUPLICATE: recorded and live;
   GWD_PENDING_HERE / _ELSEWHERE: a live pending record of worker `me` / of
   another worker; GWD_NOT_RECORDED: no free slot in the probe window, or an
   insert of another process stalled over wait_ns. `epochs`: each owner's
   current epoch (GWD_MAX_OWNERS words). Times in ms of CLOCK_MONOTONIC. */
int gwd_seen(gwd_slot* slots, uint64_t mask, int probe, uint64_t key,
             uint64_t now, uint64_t window_ms, uint64_t wait_ns,
             const uint64_t* epochs, uint64_t pending, int me, uint64_t* slot_out);

/* The owner's log is durable past a pending record: it becomes a record
   until now + window_ms. 0, or -1 if the slot no longer holds that word. */
int gwd_commit(gwd_slot* s, uint64_t word, uint64_t now, uint64_t window_ms);

/* The reading of a pending record was not appended after all: the slot is free again. */
void gwd_abandon(gwd_slot* s, uint64_t word);

/* A worker starting again: its recovered log holds the reading of (key), so
   a pending record of its previous life (owner, epoch) for it becomes a
   record. 1 if there was one. */
int gwd_commit_recovered(gwd_slot* slots, uint64_t mask, int probe, uint64_t key,
                         unsigned owner, uint64_t epoch, uint64_t now, uint64_t window_ms);

#pragma GCC visibility pop

static inline uint64_t gwd_clock_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Shared words outside the slots (the owners' epochs and committed offsets). */
static inline uint64_t gwd_load(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void gwd_store(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint64_t gwd_bump(uint64_t* p) { return __atomic_add_fetch(p, 1, __ATOMIC_ACQ_REL); }

/* The state word of a pending record of `owner` in its life `epoch`. */
static inline uint64_t gwd_pending_word(unsigned owner, uint64_t epoch, uint64_t now) {
    return GWD_PENDING | ((uint64_t)(owner & 63) << GWD_OWNER_SHIFT)
           | ((epoch & GWD_EPOCH_MASK) << GWD_EPOCH_SHIFT) | (now & 0xFFFFFFFFULL);
}

#endif
