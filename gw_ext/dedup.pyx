# cython: language_level=3
"""The idempotency table of telemetry records (see dedup.pxd for the protocol).

    table = DedupTable(1 << 20, 600.0)    # in the master, before forking
    table.seen(b"dev-1", 42)              # in any worker: 0 new, 1 duplicate, -1 not recorded

A worker whose readings go to a write-ahead log attaches to the table first;
what it records is then pending until its log is durable past the reading:

    table.recommit_from(slot)             # where its previous life's pending records begin
    table.recommit(slot, b"dev-1", 42)    # ... for each reading its recovered log holds past it
    table.attach(slot, durable)           # a new life: the pending records left are dead
    table.seen(b"dev-1", 43)              # 0: recorded, pending (2, 3: pending here, elsewhere)
    table.commit_at(end)                  # its reading appended, ending at `end`
    table.durable(offset)                 # the log is durable up to offset: commits

The slots live in an anonymous shared mapping (`mmap.mmap(-1, size)` is
MAP_SHARED), so a forked worker, and a worker respawned later by the same
master, share them with every other; the DedupTable object is inherited with
the fork. Times are CLOCK_MONOTONIC ms (one clock for every process on the
machine, immune to wall-clock steps); `seen` reads the clock itself when the
caller does not pass `now_ms`.
"""

import mmap
import os

from libc.stdint cimport uint64_t, uint8_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

DEF_PROBE = 32
SLOT_BYTES = 16
MAX_OWNERS = 64
# Slot states (see dedup.pxd), for tests.
RELEASED = 1
BUSY = 1 << 63
CLAIM = 1 << 62
PENDING = 1 << 62
# seen()'s answers.
NEW = 0
DUPLICATE = 1
PENDING_HERE = 2
PENDING_ELSEWHERE = 3
NOT_RECORDED = -1
_MASK64 = (1 << 64) - 1
cdef uint64_t UNASSIGNED = <uint64_t>-1


cdef inline uint64_t _u64(object v):
    return <uint64_t>(v & _MASK64)      # negative seqs wrap, as in C


cdef const uint8_t* _bytes(object device_id, Py_ssize_t* n) except NULL:
    if type(device_id) is not bytes:
        raise TypeError(f"device_id must be bytes, not {type(device_id).__name__}")
    n[0] = len(<bytes>device_id)
    return <const uint8_t*><char*><bytes>device_id


cdef class DedupTable:
    """A shared (device_id, seq) -> expiry table of `capacity` slots (rounded up
    to a power of two), remembering each pair for `window_s` seconds.

    Linear probing over `probe` slots: keep the records of one window under
    about a third of the capacity (a 32-slot window starts filling up, -1, past
    half). `wait_s` bounds the wait for another process deciding an insert of
    the same pair (it only lasts long if that process lost its CPU); past it
    `seen` answers -1. `seed` (default random) keys the hash.

    Each process has its own view: attach() makes what this one records
    pending until durable() says its log holds it (see dedup.pxd).
    """

    def __cinit__(self):
        self.owner = -1

    def __init__(self, Py_ssize_t capacity, double window_s, *, int probe=DEF_PROBE, seed=None,
                 double wait_s=0.05):
        cdef Py_ssize_t n = 1
        cdef unsigned char[::1] view
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not window_s > 0:
            raise ValueError("window_s must be positive")
        if not 0 < wait_s < 2.0:
            raise ValueError("wait_s must be in (0, 2) s (below the stale-insert limit)")
        if not 1 <= probe <= GWD_MAX_PROBE:
            raise ValueError(f"probe must be in 1..{GWD_MAX_PROBE}")
        while n < capacity:
            n <<= 1
        self.capacity = n
        self.mask = n - 1
        self.probe = min(probe, n)
        self.window_ms = max(<uint64_t>(window_s * 1000.0 + 0.5), <uint64_t>1)
        self.wait_ns = <uint64_t>(wait_s * 1e9)
        self.seed = _u64(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
        # MAP_SHARED | MAP_ANONYMOUS, zeroed: the slots, then each owner's epoch and committed offset.
        self.mm = mmap.mmap(-1, n * SLOT_BYTES + 2 * MAX_OWNERS * 8)
        view = self.mm
        self.view = view                             # keeps the buffer exported while we point into it
        self.slots = <gwd_slot*>&view[0]
        self.epochs = <uint64_t*>&view[n * sizeof(gwd_slot)]
        self.committed = self.epochs + GWD_MAX_OWNERS

    def __dealloc__(self):
        free(self.pend)

    cdef int seen_c(self, const uint8_t* device_id, size_t n, uint64_t seq, uint64_t now_ms) noexcept nogil:
        cdef uint64_t slot = 0, word = 0
        cdef int r
        if self.owner >= 0:
            word = gwd_pending_word(<unsigned>self.owner, self.epoch, now_ms)
        r = gwd_seen(self.slots, self.mask, self.probe, gwd_key(self.seed, device_id, n, seq),
                     now_ms, self.window_ms, self.wait_ns, self.epochs, word, self.owner, &slot)
        if r == GWD_NEW and word and self._push(slot, word) < 0:
            gwd_commit(&self.slots[slot], word, now_ms, self.window_ms)   # no memory to track it: final now
        return r

    cdef int _push(self, uint64_t slot, uint64_t word) noexcept nogil:
        cdef PendingRec* grown
        cdef Py_ssize_t cap, i
        if self.pend_len == self.pend_cap:
            cap = self.pend_cap * 2 if self.pend_cap else 256
            grown = <PendingRec*>realloc(self.pend, cap * sizeof(PendingRec))
            if grown == NULL:
                return -1
            # The ring's wrapped part moves to the new space after the old end.
            if self.pend_head + self.pend_len > self.pend_cap:
                for i in range(self.pend_head + self.pend_len - self.pend_cap):
                    grown[self.pend_cap + i] = grown[i]
            self.pend = grown
            self.pend_cap = cap
        i = (self.pend_head + self.pend_len) % self.pend_cap
        self.pend[i].slot = slot
        self.pend[i].word = word
        self.pend[i].end = UNASSIGNED
        self.pend_len += 1
        self.pend_unassigned += 1
        return 0

    cdef void durable_c(self, uint64_t offset, uint64_t now_ms) noexcept nogil:
        cdef PendingRec* p
        if self.owner < 0:
            return
        while self.pend_len:
            p = &self.pend[self.pend_head]
            if p.end > offset:
                break
            gwd_commit(&self.slots[p.slot], p.word, now_ms, self.window_ms)
            self.pend_head = (self.pend_head + 1) % self.pend_cap
            self.pend_len -= 1
        if self.pend_len == 0:
            self.pend_head = 0
        if offset > self.durable_seen:
            self.durable_seen = offset
        # Every reading of this life ending at or below `offset` is committed now.
        gwd_store(&self.committed[self.owner], self.durable_seen)

    def seen(self, device_id, seq, now_ms=None):
        """1: (device_id, seq) was recorded and has not expired (a duplicate);
        0: it was not, and is now recorded until now_ms + window (attached:
        recorded as pending, see commit_at); -1: it could not be recorded (the
        table is full around its slot): accept it, count DEDUP_FULL. A pending
        record of a live worker: 2 if it is this process's own, 3 if another's.
        now_ms: CLOCK_MONOTONIC ms (read here when None)."""
        cdef Py_ssize_t n
        cdef const uint8_t* p = _bytes(device_id, &n)
        cdef uint64_t s = _u64(seq)
        cdef uint64_t now = gwd_clock_ns() // 1000000 if now_ms is None else <uint64_t>now_ms
        cdef int r
        with nogil:
            r = self.seen_c(p, <size_t>n, s, now)
        return r

    def seen_range(self, device_id, first_seq, uint64_t count, now_ms, signed char[::1] out):
        """seen(device_id, first_seq + i, now_ms) for i in range(count), in C, into
        out[i] (tests and benchmarks: the table's own speed, many inserts racing)."""
        cdef Py_ssize_t n
        cdef const uint8_t* p = _bytes(device_id, &n)
        cdef uint64_t s = _u64(first_seq), i
        cdef uint64_t now = <uint64_t>now_ms
        if out.shape[0] < <Py_ssize_t>count:
            raise ValueError("out is too short")
        with nogil:
            for i in range(count):
                out[i] = <signed char>self.seen_c(p, <size_t>n, s + i, now)

    # --- pending records (a worker with a write-ahead log) ---------------------------

    def recommit_from(self, int owner):
        """Where the pending records of owner's previous life begin in its log
        (every reading ending at or below it is committed), or None if no
        process was ever attached as that owner (nothing can be pending)."""
        _check_owner(owner)
        if gwd_load(&self.epochs[owner]) == 0:
            return None
        return gwd_load(&self.committed[owner])

    def recommit(self, int owner, device_id, seq, now_ms=None):
        """Before attach(owner): owner's recovered log holds the reading of
        (device_id, seq), so a pending record of its previous life for it
        becomes a record (it is durable). True if there was one."""
        cdef Py_ssize_t n
        cdef const uint8_t* p = _bytes(device_id, &n)
        cdef uint64_t now = gwd_clock_ns() // 1000000 if now_ms is None else <uint64_t>now_ms
        _check_owner(owner)
        return gwd_commit_recovered(self.slots, self.mask, self.probe, gwd_key(self.seed, p, <size_t>n,
                                    _u64(seq)), <unsigned>owner, gwd_load(&self.epochs[owner]), now,
                                    self.window_ms) == 1

    def attach(self, int owner, uint64_t durable=0):
        """This process is worker `owner` from now on, in a new life: pending
        records of its previous lives are dead (their readings were lost).
        `durable`: its log's durable offset. Returns the new epoch."""
        _check_owner(owner)
        if self.owner >= 0:
            if self.attached_pid == os.getpid():
                raise RuntimeError("this process is attached already")
            # A child forked from an attached process: its pending records are the parent's.
            self.pend_head = self.pend_len = self.pend_unassigned = 0
        self.attached_pid = os.getpid()
        self.epoch = gwd_bump(&self.epochs[owner])
        self.owner = owner
        self.durable_seen = durable
        gwd_store(&self.committed[owner], durable)
        return self.epoch

    def commit_at(self, uint64_t end):
        """The readings recorded (pending) since the last commit_at or abandon
        were appended to the log, the last ending at `end`: they are committed
        once durable() passes it (at once if it has)."""
        self.commit_at_c(end)

    cdef void commit_at_c(self, uint64_t end) noexcept nogil:
        cdef Py_ssize_t i
        if self.pend_unassigned == 0:
            return
        for i in range(self.pend_len - self.pend_unassigned, self.pend_len):
            self.pend[(self.pend_head + i) % self.pend_cap].end = end
        self.pend_unassigned = 0
        if end <= self.durable_seen:
            self.durable_c(self.durable_seen, gwd_clock_ns() // 1000000)

    def abandon(self):
        """The readings recorded since the last commit_at were not appended
        after all: their records are removed (a repeat is new again)."""
        self.abandon_c()

    cdef void abandon_c(self) noexcept nogil:
        cdef PendingRec* p
        while self.pend_unassigned:
            p = &self.pend[(self.pend_head + self.pend_len - 1) % self.pend_cap]
            gwd_abandon(&self.slots[p.slot], p.word)
            self.pend_len -= 1
            self.pend_unassigned -= 1

    def durable(self, uint64_t offset, now_ms=None):
        """The log is durable up to `offset`: its pending records up to there are committed."""
        self.durable_c(offset, gwd_clock_ns() // 1000000 if now_ms is None else <uint64_t>now_ms)

    @property
    def pending(self):
        """This process's pending records (not yet durable)."""
        return self.pend_len

    def key(self, device_id, seq):
        """The 64-bit key of (device_id, seq) in this table (never 0)."""
        cdef Py_ssize_t n
        cdef const uint8_t* p = _bytes(device_id, &n)
        return gwd_key(self.seed, p, <size_t>n, _u64(seq))

    def live(self, now_ms=None):
        """How many records are live at now_ms (a full scan: tests, diagnostics)."""
        cdef uint64_t now = gwd_clock_ns() // 1000000 if now_ms is None else <uint64_t>now_ms
        cdef Py_ssize_t i, count = 0
        cdef uint64_t e
        for i in range(self.capacity):
            e = self.slots[i].e
            if e > now and e < (1ULL << 62) and e != 1:
                count += 1
        return count

    def _slot(self, Py_ssize_t i):
        """(key, state) of slot i (tests)."""
        if not 0 <= i < self.capacity:
            raise IndexError(i)
        return self.slots[i].key, self.slots[i].e

    def _set_slot(self, Py_ssize_t i, uint64_t key, uint64_t e):
        """Overwrites slot i (tests: the states a dead or stalled process leaves)."""
        if not 0 <= i < self.capacity:
            raise IndexError(i)
        self.slots[i].key = key
        self.slots[i].e = e

    def _snapshot(self):
        """A copy of the slots (tests, diagnostics): capacity x (key, state) uint64 pairs."""
        return bytes(self.mm)

    @property
    def window_s(self):
        return self.window_ms / 1000.0

    def __len__(self):
        return self.live()

    def __repr__(self):
        return f"DedupTable(capacity={self.capacity}, window_s={self.window_s}, probe={self.probe})"


cdef int _check_owner(int owner) except -1:
    if not 0 <= owner < MAX_OWNERS:
        raise ValueError(f"owner must be in 0..{MAX_OWNERS - 1}")
    return 0


def monotonic_ms():
    """CLOCK_MONOTONIC in ms, the clock `seen` uses."""
    return gwd_clock_ns() // 1000000
