# cython: language_level=3
"""Counter indices and block layout (stats.pxd), exported as module constants.

gw/stats.py turns them into the Counter and Layout enums Python code uses.
The histogram bounds and the HTTP status slots are exported as tuples, and
`hist_observe` / `http_status_index` as Python functions (tests, Python callers)
running the same inline code the loop uses.
"""

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
