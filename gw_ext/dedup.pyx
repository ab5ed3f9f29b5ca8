# cython: language_level=3
"""The idempotency table of telemetry records (see dedup.pxd for the protocol).

    table = DedupTable(1 << 20, 600.0)    # in the master, before forking
    table.seen(b"dev-1", 42)              # in any worker: 0 new, 1 duplicate, -1 not recorded

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
from libc.string cimport memcpy

DEF_PROBE = 32
SLOT_BYTES = 16
# Slot states (see dedup.pxd), for tests.
RELEASED = 1
BUSY = 1 << 63
CLAIM = 1 << 62
_MASK64 = (1 << 64) - 1


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
    """

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
        self.mm = mmap.mmap(-1, n * SLOT_BYTES)      # MAP_SHARED | MAP_ANONYMOUS, zeroed
        view = self.mm
        self.view = view                             # keeps the buffer exported while we point into it
        self.slots = <gwd_slot*>&view[0]

    cdef int seen_c(self, const uint8_t* device_id, size_t n, uint64_t seq, uint64_t now_ms) noexcept nogil:
        return gwd_seen(self.slots, self.mask, self.probe, gwd_key(self.seed, device_id, n, seq),
                        now_ms, self.window_ms, self.wait_ns)

    def seen(self, device_id, seq, now_ms=None):
        """1: (device_id, seq) was recorded and has not expired (a duplicate);
        0: it was not, and is now recorded until now_ms + window; -1: it could
        not be recorded (the table is full around its slot): accept it, count
        DEDUP_FULL. now_ms: CLOCK_MONOTONIC ms (read here when None)."""
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


def monotonic_ms():
    """CLOCK_MONOTONIC in ms, the clock `seen` uses."""
    return gwd_clock_ns() // 1000000
