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

# The C: dedup_table.c (dedup.pyx wraps it).
cdef extern from "dedup_table.h":
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
    # The readings recorded since the last commit were appended, the last ending at `end`.
    cdef void commit_at_c(self, uint64_t end) noexcept nogil
    # ... or were not appended after all: their records are removed.
    cdef void abandon_c(self) noexcept nogil
    cdef int _push(self, uint64_t slot, uint64_t word) noexcept nogil
