"""A store sink's batch as columns: what the embedded (store.py) and the PostgreSQL
(pgstore.py) sinks both do to a batch before writing it.

- `decode`: the logged records (gw_ext/storebatch.pyx, compiled) -> one tuple per reading, the batch's series
  (device_id, metric) in order of first appearance, and per sample its series
  index, time and value (numpy arrays), the reading it came from, and the
  batch's per-device summary (first and last time, last values, tags, count).
- `detect`: the anomaly detector once per series and batch
  (`Detector.observe_many`), the alerts in arrival order.
- `by_series`: one stable sort of the samples by (series, time), which serves
  each sink's per-series rows (sample chunks) and `rollups`, the aggregation of
  all three windows without sorting again.
- `paused_gc`: a batch allocates a few hundred thousand objects, all freed at
  its end and holding no cycles; the cyclic collector would walk them (and every
  older object) several times over for nothing.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from datetime import datetime

import msgspec

from gw.lazy import LazyModule

from .rollup import WINDOWS

np = LazyModule("numpy", globals(), "np")     # imported with the first batch (gw/lazy.py)

_NULL = b"null"


class Reading(msgspec.Struct):
    """The normalised reading as the workers log it (gw/ingest.py Telemetry);
    unknown fields are tolerated (a newer writer)."""
    device_id: str
    ts: datetime
    seq: int | None = None
    metrics: dict[str, float] = {}
    tags: msgspec.Raw = msgspec.Raw(b"{}")
    payload: msgspec.Raw = msgspec.Raw(b"null")


class Columns:
    """One batch, decoded.

    readings  [(worker, lsn, device_id, ts, seq, metrics JSON, tags JSON, payload JSON or None)]
    names     [(device_id, metric)]: the batch's series, in order of first appearance
    key, ts, val   per sample (arrival order): index into names, Unix seconds, value (numpy)
    reading   per sample: index into readings (numpy)
    devices   device_id -> [first ts, last ts, last values dict, tags JSON, readings]
    """
    __slots__ = ("readings", "names", "key", "ts", "val", "reading", "devices")

    def __init__(self, readings, names, key, ts, val, reading, devices):
        self.readings = readings
        self.names = names
        self.key = key
        self.ts = ts
        self.val = val
        self.reading = reading
        self.devices = devices

    def __len__(self) -> int:
        return len(self.key)


def _compiled():
    """gw_ext.storebatch's decoder, imported with the first batch (it brings numpy,
    which the processes forked before the pipeline's first batch never map); None
    when the extensions are not built: the reference decoder below."""
    global _decode_columns
    if _decode_columns is _UNRESOLVED:
        try:
            from gw_ext.storebatch import decode_columns as _decode_columns
        except ImportError:
            _decode_columns = None
    return _decode_columns


_UNRESOLVED = object()
_decode_columns = _UNRESOLVED
_series_rows = _UNRESOLVED


def compiled_series_rows():
    """gw_ext.storebatch's `series_rows` (the embedded store's chunk and rollup rows
    built in C), or None when the extensions are not built."""
    global _series_rows
    if _series_rows is _UNRESOLVED:
        try:
            from gw_ext.storebatch import series_rows as _series_rows
        except ImportError:
            _series_rows = None
    return _series_rows

_detect_runs = _UNRESOLVED


def compiled_detect_runs():
    """gw_ext.storebatch's `detect_runs` (detect's loop in C), or None when the
    extensions are not built."""
    global _detect_runs
    if _detect_runs is _UNRESOLVED:
        try:
            from gw_ext.storebatch import detect_runs as _detect_runs
        except ImportError:
            _detect_runs = None
    return _detect_runs


_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)

_heap_kept = False


def keep_heap() -> None:
    """Before the first batch: the process's malloc keeps what a batch freed for
    the next (gw_ext/storebatch.pyx `keep_heap`; with glibc's defaults every
    large batch mapped its arrays afresh, and the kernel zeroed each page again:
    a sixth of the sink's CPU at 512,000 readings a batch). Given back by
    `trim_heap` once the sink is idle."""
    global _heap_kept
    if _heap_kept:
        return
    _heap_kept = True
    try:
        from gw_ext.storebatch import keep_heap as keep
    except ImportError:
        return
    keep()


def trim_heap() -> int:
    """The heap's free pages back to the system (malloc_trim), when kept."""
    if not _heap_kept:
        return 0
    try:
        from gw_ext.storebatch import trim_heap as trim
    except ImportError:
        return 0
    return trim()


def decode(parts, decode_reading, encode, bad) -> Columns:
    """The batch's records (`parts`: [(worker, [(lsn, payload)], next)]) as
    columns; a record that is not a normalised reading goes to bad(worker, lsn,
    exc) and is left out. Compiled (gw_ext/storebatch.pyx: the logged layout
    read in place, its metrics, tags and payload kept as their JSON text) when
    built, else `decode_python`; both give the same columns."""
    compiled = _compiled()
    if compiled is not None:
        return Columns(*compiled(parts, decode_reading, encode, bad, _ERRORS))
    return decode_python(parts, decode_reading, encode, bad)


def decode_python(parts, decode_reading, encode, bad) -> Columns:
    """`decode` in Python, one msgspec decode per record: the reference."""
    readings = []
    names: dict = {}
    namelist: list = []
    skey = []
    sts = []
    sval = []
    sread = []
    devs: dict = {}
    for slot, records, _next in parts:
        for off, payload in records:
            try:
                r = decode_reading(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                bad(slot, off, exc)
                continue
            ts = r.ts.timestamp()
            dev = r.device_id
            metrics = r.metrics
            tags = bytes(r.tags).decode()
            pl = bytes(r.payload)
            ri = len(readings)
            readings.append((slot, off, dev, ts, r.seq, encode(metrics).decode(), tags,
                             None if pl == _NULL else pl.decode()))
            for m, v in metrics.items():
                nk = (dev, m)
                k = names.get(nk)
                if k is None:
                    k = names[nk] = len(namelist)
                    namelist.append(nk)
                skey.append(k)
                sts.append(ts)
                sval.append(v)
                sread.append(ri)
            d = devs.get(dev)
            if d is None:
                devs[dev] = [ts, ts, dict(metrics), tags, 1]
            else:
                if ts >= d[1]:
                    d[1] = ts
                    d[2].update(metrics)
                    d[3] = tags
                else:
                    lv = d[2]
                    for m, v in metrics.items():
                        lv.setdefault(m, v)
                    if ts < d[0]:
                        d[0] = ts
                d[4] += 1
    return Columns(readings, namelist, np.array(skey, dtype=np.int64), np.array(sts, dtype=np.float64),
                   np.array(sval, dtype=np.float64), np.array(sread, dtype=np.int64), devs)


def detect(cols: Columns, detector) -> list:
    """The detector over the batch, each series' values in arrival order as
    observe() would see them: [(device_id, metric, ts, value, zscore, mean, std)]
    in arrival order."""
    n = len(cols)
    if not n:
        return []
    key = cols.key
    order = np.argsort(key, kind="stable")
    ko = key[order]
    runs = compiled_detect_runs() if detector.compiled else None
    if runs is not None:
        # Every series' run in C (gw_ext/storebatch.pyx `detect_runs`): the loop
        # below without a Python float per sample or a call per series into it.
        found = runs(detector.state, cols.names, order, ko, cols.val[order], detector.min_samples,
                     detector.threshold)
        return _alerts(cols, found)
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(ko[1:], ko[:-1], out=change[1:])
    starts = np.flatnonzero(change).tolist()
    vals = cols.val[order].tolist()
    names = cols.names
    observe = detector.observe_many
    found = []
    ends = starts[1:] + [n]
    for s, e, k in zip(starts, ends, ko[starts].tolist()):
        dev, m = names[k]
        for i, z, mean, std in observe(dev, m, vals[s:e]):
            found.append((int(order[s + i]), dev, m, z, mean, std))
    return _alerts(cols, found)


def _alerts(cols: Columns, found: list) -> list:
    """[(arrival index, device_id, metric, zscore, mean, std)] as detect's alerts."""
    if not found:
        return []
    found.sort()
    ts = cols.ts
    val = cols.val
    return [(dev, m, float(ts[i]), float(val[i]), z, mean, std) for i, dev, m, z, mean, std in found]


class BySeries:
    """The samples sorted by (series, time), stable: `order` (indices into the
    arrival-order columns), `key`, `ts`, `val` in that order, and `starts`: True
    where a series begins. Series follow in index order, or in the order of
    `rank` (per series index its place)."""
    __slots__ = ("order", "key", "ts", "val", "starts")

    def __init__(self, cols: Columns, rank: np.ndarray | None = None):
        order = np.lexsort((cols.ts, cols.key if rank is None else rank[cols.key]))
        self.order = order
        self.key = cols.key[order]
        self.ts = cols.ts[order]
        self.val = cols.val[order]
        starts = np.empty(len(order), dtype=bool)
        if len(order):
            starts[0] = True
            np.not_equal(self.key[1:], self.key[:-1], out=starts[1:])
        self.starts = starts

    def runs(self, seconds: float):
        """Where a run of one series within one interval of `seconds` (aligned to
        the epoch) begins: (start indices, interval starts)."""
        n = len(self.order)
        b = np.floor(self.ts / seconds) * seconds
        change = np.empty(n, dtype=bool)
        change[0] = True
        np.not_equal(b[1:], b[:-1], out=change[1:])
        change |= self.starts
        st = np.flatnonzero(change)
        return st, b[st]


def rollups(s: BySeries):
    """Each window's aggregates: [(win, bucket, series index, count, min, max, sum,
    sumsq)], each a numpy array of one entry per (series, bucket), in the order
    of `s`: by series, then bucket."""
    n = len(s.order)
    if not n:
        return []
    v = s.val
    sq = v * v
    out = []
    for win, w in WINDOWS:
        st, buckets = s.runs(w)
        out.append((win, buckets, s.key[st], np.diff(np.append(st, n)), np.minimum.reduceat(v, st),
                    np.maximum.reduceat(v, st), np.add.reduceat(v, st), np.add.reduceat(sq, st)))
    return out


@contextmanager
def paused_gc():
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()
