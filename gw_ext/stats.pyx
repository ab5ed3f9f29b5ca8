# cython: language_level=3
"""Counter indices and block layout (stats.pxd), exported as module constants.

gw/stats.py turns them into the Counter and Layout enums Python code uses.
The histogram bounds and the HTTP status slots are exported as tuples, and
`hist_observe` / `http_status_index` as Python functions (tests, Python callers)
running the same inline code the loop uses.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint64_t

# Upper bounds of the finite histogram buckets, nanoseconds (HIST_BUCKETS - 1 of them).
HIST_BOUNDS_NS = tuple(int(gw_hist_bounds_ns[i]) for i in range(HIST_BUCKETS - 1))
# HTTP status codes with their own slot, in slot order (slot HTTP_STATUS_OTHER: any other).
HTTP_STATUS_CODES = tuple(int(gw_http_status_codes[i]) for i in range(HTTP_STATUS_OTHER))


def observe(uint64_t[::1] row, int hist, uint64_t ns):
    """hist_observe on a row (a uint64 array of N_COUNTERS words)."""
    if row.shape[0] != N_COUNTERS:
        raise ValueError(f"a row has {N_COUNTERS} words")
    if hist != HIST_INGEST and hist != HIST_DELIVER:
        raise ValueError(f"{hist} is not a histogram")
    hist_observe(&row[0], hist, ns)


def status_index(int code):
    """http_status_index: the slot of an HTTP status code."""
    return http_status_index(code)


def column_sums(const uint64_t[:, ::1] rows):
    """Each word summed over the rows (mod 2**64, as the words themselves
    wrap), as a list of ints: the block's totals without numpy, in one pass
    over the rows in memory order."""
    cdef Py_ssize_t n = rows.shape[0], m = rows.shape[1], i, j
    cdef uint64_t *acc = <uint64_t *>PyMem_Malloc(max(m, 1) * sizeof(uint64_t))
    if acc == NULL:
        raise MemoryError()
    try:
        for j in range(m):
            acc[j] = 0
        for i in range(n):
            for j in range(m):
                acc[j] += rows[i, j]
        return [acc[j] for j in range(m)]
    finally:
        PyMem_Free(acc)


cdef extern from "sys/mman.h" nogil:
    int madvise(void *addr, size_t length, int advice)


def page_out(size_t start, size_t length):
    """Asks the kernel to reclaim now the pages of [start, start + length) in
    this process that no other process maps (madvise MADV_PAGEOUT, Linux 5.4;
    21, which older headers do not name): the master's file pages it touched
    only while starting (gw/master.py). Only a hint: no data is lost, a page
    used again is read back; the kernel leaves shared pages alone, anonymous
    ones without swap, and a file's pages unless the caller owns the file or
    could write to it (root can). False when it refused the range."""
    cdef int r
    with nogil:
        r = madvise(<void *>start, length, 21)
    return r == 0
