# Connections open per client IP address, across every worker
# (max_connections_per_ip): a table of counts per address hash in shared
# anonymous memory, created by the master before forking, so every worker
# (and a respawned one) maps the same pages.
#
# Layout: `nslots` uint32 totals (atomic: any worker adds or takes away), then
# one row of `nslots` uint16 counts per worker slot (single writer: that
# worker; read by the master only once the worker is dead, to give back what
# its connections held: release_worker). A count per slot is at most the limit
# (<= 65535, the setting's maximum), so a uint16 row cannot wrap.
#
# An address maps to one slot by a keyed hash (a random key per master: slots
# cannot be aimed at from outside). Addresses sharing a slot share its count,
# so a collision errs toward refusing, never toward admitting more than the
# limit; the table has at least 4 slots per allowed connection (load <= 1/4),
# so a refusal by collision needs several busy addresses in one slot.
#
# IPv4-mapped IPv6 addresses count as their IPv4 address; other IPv6 addresses
# count per full address (/128).

from libc.stdint cimport uint16_t, uint32_t, uint64_t, uint8_t

cdef extern from "addrlimit.h":
    int gw_peer_address(const void* sa, unsigned len, uint8_t* out) noexcept nogil
    uint32_t gw_address_slot(uint64_t seed, const uint8_t* a, int n, uint32_t mask) noexcept nogil
    uint32_t gw_count_add(uint32_t* p) noexcept nogil
    void gw_count_sub(uint32_t* p) noexcept nogil


cdef class AddressCounts:
    cdef uint32_t* totals             # nslots, shared, atomic
    cdef uint16_t* rows               # nworkers x nslots, each row written by its worker only
    cdef readonly uint32_t nslots     # a power of two
    cdef uint32_t mask
    cdef readonly int nworkers
    cdef uint64_t seed
    cdef object mm

    # A connection from the peer address `sa` accepted by `worker`, under `limit`:
    # 1: counted, slot[0] = its slot (give it back with release_c); 0: over the
    # limit, not counted (slot[0] = its slot, for the log); -1: not an IP address.
    cdef int acquire_c(self, int worker, const void* sa, unsigned salen, uint32_t limit,
                       uint32_t* slot) noexcept nogil
    cdef void release_c(self, int worker, uint32_t slot) noexcept nogil
