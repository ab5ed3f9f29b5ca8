"""Log-bucketed latency histogram with fixed bucket edges.

Every histogram in every worker process uses the same edges, so merging is
adding count arrays. Bucket k (1..N) holds values in [MIN*G**(k-1), MIN*G**k)
nanoseconds, with G = 1.02: a value is reported as its bucket's geometric
midpoint, within ~1% of the truth, from 1 us to 100 s. Bucket 0 holds values
below 1 us, bucket N+1 values of 100 s and more; exact min and max are kept
so the extremes are never estimated.

The Cython engine (gwbench/_ext/pubsub_engine.pyx) computes the same index with the
same constants, so its counts merge with these.
"""
from __future__ import annotations

import math

import numpy as np

MIN_NS = 1_000.0            # 1 us
MAX_NS = 100_000_000_000.0  # 100 s
GROWTH = 1.02
NBUCKETS = int(math.ceil(math.log(MAX_NS / MIN_NS) / math.log(GROWTH)))  # 931
SIZE = NBUCKETS + 2         # + underflow and overflow
_LOG_MIN = math.log(MIN_NS)
_INV_LOG_G = 1.0 / math.log(GROWTH)


def bucket_index(values_ns: np.ndarray) -> np.ndarray:
    v = np.asarray(values_ns, dtype=np.float64)
    idx = np.empty(v.shape, dtype=np.int64)
    low = v < MIN_NS
    safe = np.where(low, MIN_NS, v)
    k = np.floor((np.log(safe) - _LOG_MIN) * _INV_LOG_G).astype(np.int64) + 1
    idx[:] = np.clip(k, 1, NBUCKETS + 1)
    idx[low] = 0
    return idx


def bucket_bounds(k: int) -> tuple[float, float]:
    """[lo, hi) of bucket k in ns (underflow 0..MIN, overflow MAX..inf)."""
    if k <= 0:
        return 0.0, MIN_NS
    if k > NBUCKETS:
        return MAX_NS, math.inf
    return MIN_NS * GROWTH ** (k - 1), MIN_NS * GROWTH ** k


class Histogram:
    """Counts of nanosecond values; mergeable; percentiles within ~1%."""

    __slots__ = ("counts", "total", "sum_ns", "min_ns", "max_ns")

    def __init__(self) -> None:
        self.counts = np.zeros(SIZE, dtype=np.int64)
        self.total = 0
        self.sum_ns = 0.0
        self.min_ns = math.inf
        self.max_ns = 0.0

    # -- recording ---------------------------------------------------------
    def record(self, value_ns: float) -> None:
        v = float(value_ns)
        if v < MIN_NS:
            k = 0
        else:
            k = int((math.log(v) - _LOG_MIN) * _INV_LOG_G) + 1
            if k > NBUCKETS + 1:
                k = NBUCKETS + 1
        self.counts[k] += 1
        self.total += 1
        self.sum_ns += v
        if v < self.min_ns:
            self.min_ns = v
        if v > self.max_ns:
            self.max_ns = v

    def record_many(self, values_ns) -> None:
        v = np.asarray(values_ns, dtype=np.float64).ravel()
        if v.size == 0:
            return
        np.add.at(self.counts, bucket_index(v), 1)
        self.total += int(v.size)
        self.sum_ns += float(v.sum())
        self.min_ns = min(self.min_ns, float(v.min()))
        self.max_ns = max(self.max_ns, float(v.max()))

    def add_counts(self, counts, total=None, sum_ns=0.0, min_ns=math.inf, max_ns=0.0) -> None:
        """Merge raw counts (e.g. from the Cython engine)."""
        c = np.asarray(counts, dtype=np.int64)
        self.counts += c
        self.total += int(c.sum()) if total is None else int(total)
        self.sum_ns += float(sum_ns)
        self.min_ns = min(self.min_ns, float(min_ns))
        self.max_ns = max(self.max_ns, float(max_ns))

    def merge(self, other: "Histogram") -> "Histogram":
        self.counts += other.counts
        self.total += other.total
        self.sum_ns += other.sum_ns
        self.min_ns = min(self.min_ns, other.min_ns)
        self.max_ns = max(self.max_ns, other.max_ns)
        return self

    # -- reading -----------------------------------------------------------
    def percentile(self, q: float) -> float:
        """Nearest-rank q-th percentile (0 < q <= 100) in ns; nan when empty."""
        if self.total == 0:
            return math.nan
        rank = max(1, int(math.ceil(q / 100.0 * self.total)))
        if rank >= self.total:
            return self.max_ns
        cum = np.cumsum(self.counts)
        k = int(np.searchsorted(cum, rank))
        lo, hi = bucket_bounds(k)
        if k == 0:
            est = (max(self.min_ns, 0.0) + MIN_NS) / 2
        elif k > NBUCKETS:
            est = self.max_ns
        else:
            est = math.sqrt(lo * hi)
        return min(max(est, self.min_ns), self.max_ns)

    def mean(self) -> float:
        return self.sum_ns / self.total if self.total else math.nan

    def summary(self, qs=(50, 90, 99, 99.9)) -> dict:
        """Milliseconds, for reports and JSON."""
        out = {"count": self.total}
        if self.total == 0:
            return out
        out["min_ms"] = self.min_ns / 1e6
        out["mean_ms"] = self.mean() / 1e6
        for q in qs:
            out[f"p{q:g}_ms"] = self.percentile(q) / 1e6
        out["max_ms"] = self.max_ns / 1e6
        return out

    # -- transport between processes ----------------------------------------
    def to_dict(self) -> dict:
        nz = np.nonzero(self.counts)[0]
        return {
            "buckets": {"min_ns": MIN_NS, "max_ns": MAX_NS, "growth": GROWTH},
            "index": nz.tolist(),
            "count": self.counts[nz].tolist(),
            "total": self.total,
            "sum_ns": self.sum_ns,
            "min_ns": self.min_ns if self.total else None,
            "max_ns": self.max_ns if self.total else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Histogram":
        h = cls()
        h.counts[np.asarray(d["index"], dtype=np.int64)] = np.asarray(d["count"], dtype=np.int64)
        h.total = int(d["total"])
        h.sum_ns = float(d["sum_ns"])
        h.min_ns = math.inf if d["min_ns"] is None else float(d["min_ns"])
        h.max_ns = 0.0 if d["max_ns"] is None else float(d["max_ns"])
        return h
