# The load generator's latency histograms (gwbench/_ext/pubsub_engine.pyx,
# gwbench/_ext/ingest_engine.pyx): log-spaced buckets recorded in C on the hot loop,
# handed to Python as the dict gwbench/histogram.py merges. Bucket 0 holds
# values under min_ns, bucket nb + 1 values over the last bound; bucket k the
# values in [min_ns * g^(k-1), min_ns * g^k).

from libc.math cimport log
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

cdef struct Hist:
    int64_t* counts           # nb + 2 buckets
    int64_t total
    double sum
    double mn
    double mx


cdef inline int hist_alloc(Hist* h, int nb) noexcept nogil:
    """0, or -1 when out of memory."""
    h.counts = <int64_t*>calloc(nb + 2, sizeof(int64_t))
    h.total = 0
    h.sum = 0
    h.mn = 1e300
    h.mx = 0
    return 0 if h.counts != NULL else -1


cdef inline void hist_free(Hist* h) noexcept nogil:
    free(h.counts)
    h.counts = NULL


cdef inline void hist_clear(Hist* h, int nb) noexcept nogil:
    memset(h.counts, 0, (nb + 2) * sizeof(int64_t))
    h.total = 0
    h.sum = 0
    h.mn = 1e300
    h.mx = 0


cdef struct HistScale:
    # The buckets' bounds, the same for every histogram of an engine.
    double min_ns
    double log_min            # log(min_ns)
    double inv_log_g          # 1 / log(growth)
    int nb


cdef inline void hist_scale(HistScale* s, double min_ns, double growth, int nb) noexcept nogil:
    s.min_ns = min_ns
    s.log_min = log(min_ns)
    s.inv_log_g = 1.0 / log(growth)
    s.nb = nb


cdef inline void hist_record(Hist* h, double v, const HistScale* s) noexcept nogil:
    """One value (ns)."""
    cdef int k
    if v < s.min_ns:
        k = 0
    else:
        k = <int>((log(v) - s.log_min) * s.inv_log_g) + 1
        if k > s.nb + 1:
            k = s.nb + 1
    h.counts[k] += 1
    h.total += 1
    h.sum += v
    if v < h.mn:
        h.mn = v
    if v > h.mx:
        h.mx = v


cdef inline dict hist_dict(Hist* h, int nb):
    """The histogram as gwbench/histogram.py's Histogram.add_counts takes it."""
    import numpy as np
    cdef int k
    counts = np.zeros(nb + 2, dtype=np.int64)
    for k in range(nb + 2):
        counts[k] = h.counts[k]
    return {"counts": counts, "total": h.total, "sum_ns": h.sum,
            "min_ns": h.mn if h.total else float("inf"), "max_ns": h.mx}
