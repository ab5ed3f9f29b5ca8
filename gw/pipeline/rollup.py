"""Rollups: count, min, max, sum, sum of squares per (window, device, metric, bucket).

A bucket is the window's start in Unix seconds: floor(ts / W) * W with W = 60,
3600, 86400 (UTC minutes, hours, days). The store keeps one row per key and
adds each batch's aggregates to it (an upsert), so a batch's samples are first
reduced to one tuple per key. The store's sink does it with numpy on the
batch's samples already sorted by series and time for its sample chunks
(batch.rollups: no further sort per window); `aggregate` here picks
numpy (sort, then reduceat) above NUMPY_FROM samples and a dict loop below
(bench/bench_store.py measures where the two cross), for callers with a batch
of their own, and `aggregate_python` is the reference the tests hold both to.
Mean and std follow from the sums (`mean_std`).
"""

from __future__ import annotations

import math
from itertools import repeat

from gw.lazy import LazyModule

np = LazyModule("numpy", globals(), "np")     # imported with the first batch (gw/lazy.py)

WINDOWS = (("1m", 60.0), ("1h", 3600.0), ("1d", 86400.0))
WINDOW_SECONDS = dict(WINDOWS)
NUMPY_FROM = 128      # samples in a batch from which numpy's aggregation is used (bench: ~100 cross)

Row = tuple  # (win, device_id, metric, bucket, count, min, max, sum, sumsq)


def mean_std(count: int, total: float, sumsq: float) -> tuple[float, float]:
    """Mean and population std of a rollup row (a negative variance from
    rounding is 0)."""
    mean = total / count
    var = sumsq / count - mean * mean
    return mean, (math.sqrt(var) if var > 0.0 else 0.0)


def aggregate_python(names: list, key: list, ts: list, val: list) -> list[Row]:
    """The reference: samples i = (names[key[i]], ts[i], val[i]) reduced per
    (window, device, metric, bucket)."""
    acc: dict = {}
    floor = math.floor
    for k, t, v in zip(key, ts, val):
        for win, w in WINDOWS:
            b = floor(t / w) * w
            a = acc.get((win, k, b))
            if a is None:
                acc[(win, k, b)] = [1, v, v, v, v * v]
            else:
                a[0] += 1
                if v < a[1]:
                    a[1] = v
                if v > a[2]:
                    a[2] = v
                a[3] += v
                a[4] += v * v
    out = []
    for (win, k, b), a in acc.items():
        dev, metric = names[k]
        out.append((win, dev, metric, float(b), a[0], a[1], a[2], a[3], a[4]))
    return out


def aggregate_numpy(names: list, key, ts, val) -> list[Row]:
    key = np.asarray(key, dtype=np.int64)
    ts = np.asarray(ts, dtype=np.float64)
    val = np.asarray(val, dtype=np.float64)
    n = len(key)
    if n == 0:
        return []
    sq = val * val
    out: list[Row] = []
    change = np.empty(n, dtype=bool)
    for win, w in WINDOWS:
        b = np.floor(ts / w) * w
        order = np.lexsort((b, key))
        k = key[order]
        bb = b[order]
        change[0] = True
        np.not_equal(k[1:], k[:-1], out=change[1:])
        change[1:] |= bb[1:] != bb[:-1]
        starts = np.flatnonzero(change)
        v = val[order]
        counts = np.diff(np.append(starts, n))
        mins = np.minimum.reduceat(v, starts)
        maxs = np.maximum.reduceat(v, starts)
        sums = np.add.reduceat(v, starts)
        sqs = np.add.reduceat(sq[order], starts)
        keys = [names[i] for i in k[starts].tolist()]
        out.extend(zip(repeat(win), [d for d, _ in keys], [m for _, m in keys], bb[starts].tolist(),
                       counts.tolist(), mins.tolist(), maxs.tolist(), sums.tolist(), sqs.tolist()))
    return out


def aggregate(names: list, key: list, ts: list, val: list) -> list[Row]:
    if len(key) >= NUMPY_FROM:
        return aggregate_numpy(names, key, ts, val)
    return aggregate_python(names, key, ts, val)
