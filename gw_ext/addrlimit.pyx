# cython: language_level=3
"""Connections open per client IP address across every worker, for
max_connections_per_ip (see addrlimit.pxd for the table and its collisions).

    counts = AddressCounts(workers, max_connections)   # in the master, before forking
    counts.count("192.0.2.1")                           # connections open from it now
    counts.release_worker(slot)                         # the master, once worker `slot` died

The workers count in the event loop (gw_ext/loop.pyx, accept_from and
release) through acquire_c and release_c: no Python objects.
"""

import mmap
import os
import socket

from libc.string cimport memset

MIN_SLOTS = 1 << 16
MAX_SLOTS = 1 << 22
SLOTS_PER_CONNECTION = 4


def slots_for(Py_ssize_t max_connections):
    """The table's size for max_connections: 4 slots per connection, a power of
    two within [65536, 4194304]."""
    cdef Py_ssize_t n = MIN_SLOTS
    while n < SLOTS_PER_CONNECTION * max_connections and n < MAX_SLOTS:
        n <<= 1
    return n


cdef class AddressCounts:
    """Counts of open connections per address slot, shared by `nworkers` workers."""

    def __init__(self, int nworkers, Py_ssize_t max_connections, seed=None):
        cdef Py_ssize_t n = slots_for(max_connections)
        cdef unsigned char[::1] view
        if not 1 <= nworkers <= 64:
            raise ValueError("nworkers must be within 1-64")
        self.nslots = <uint32_t>n
        self.mask = <uint32_t>(n - 1)
        self.nworkers = nworkers
        self.seed = int.from_bytes(os.urandom(8), "little") if seed is None else (seed & ((1 << 64) - 1))
        # Anonymous and MAP_SHARED: inherited by every fork, pages touched only when used.
        self.mm = mmap.mmap(-1, n * 4 + nworkers * n * 2)
        view = self.mm
        self.totals = <uint32_t*>&view[0]
        self.rows = <uint16_t*>&view[n * 4]

    cdef int acquire_c(self, int worker, const void* sa, unsigned salen, uint32_t limit,
                       uint32_t* slot) noexcept nogil:
        cdef uint8_t[16] address
        cdef int n = gw_peer_address(sa, salen, address)
        cdef uint32_t s
        if n == 0 or not 0 <= worker < self.nworkers:
            return -1
        s = gw_address_slot(self.seed, address, n, self.mask)
        slot[0] = s
        if gw_count_add(&self.totals[s]) > limit:
            gw_count_sub(&self.totals[s])
            return 0
        self.rows[<size_t>worker * self.nslots + s] += 1
        return 1

    cdef void release_c(self, int worker, uint32_t slot) noexcept nogil:
        cdef uint16_t* mine
        if slot >= self.nslots or not 0 <= worker < self.nworkers:
            return
        mine = &self.rows[<size_t>worker * self.nslots + slot]
        if mine[0] == 0:
            return      # not ours (never counted here): the total is someone else's
        mine[0] -= 1
        gw_count_sub(&self.totals[slot])

    def release_worker(self, int worker):
        """Gives back every count a dead worker held (its connections died with
        it); the master calls it before respawning the slot. Returns how many."""
        cdef uint16_t* row
        cdef uint32_t s
        cdef uint16_t k
        cdef Py_ssize_t released = 0
        if not 0 <= worker < self.nworkers:
            raise ValueError("no worker slot %d" % worker)
        row = &self.rows[<size_t>worker * self.nslots]
        for s in range(self.nslots):
            k = row[s]
            if k:
                released += k
                while k:
                    gw_count_sub(&self.totals[s])
                    k -= 1
                row[s] = 0
        return released

    def count(self, str host):
        """Connections counted now for an IP address (and any sharing its slot)."""
        cdef bytes sa
        cdef uint8_t[16] address
        cdef int n
        cdef const char* p
        if ":" in host:
            sa = (socket.AF_INET6).to_bytes(2, "little") + bytes(6) + socket.inet_pton(socket.AF_INET6, host) + bytes(4)
        else:
            sa = (socket.AF_INET).to_bytes(2, "little") + bytes(2) + socket.inet_pton(socket.AF_INET, host) + bytes(8)
        p = sa
        n = gw_peer_address(p, len(sa), address)
        if n == 0:
            raise ValueError("not an IP address: %r" % host)
        return self.totals[gw_address_slot(self.seed, address, n, self.mask)]
