"""A batch's rows in PostgreSQL's COPY text format, built by columns (pgstore.py).

COPY ... FROM STDIN (text): a row per line, columns separated by a tab, `\\N`
for NULL, and in a value a backslash, newline, carriage return or tab written
as `\\\\`, `\\n`, `\\r`, `\\t` (`escape`). Times are ISO 8601 in UTC with
microseconds and no zone (numpy formats a whole column at once; the sink's
connection has timezone UTC), doubles the shortest text that reads back to the
same value.

Row orders serve the indexes: readings, samples and rollups go in the order of
their index keys ((device_id, ...) byte-wise, the columns' collation "C"),
so consecutive index insertions and upsert probes land on the same pages.
Readings and samples come in pieces of PIECE rows: the sink sends one while
the next is built.
"""

from __future__ import annotations

import re

import msgspec

from gw.lazy import LazyModule

from . import batch

np = LazyModule("numpy", globals(), "np")     # imported with the first batch (gw/lazy.py)

PIECE = 16384
_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
NULL = "\\N"
_SPECIAL = re.compile(r"[\\\n\r\t]").search
_encode = msgspec.json.Encoder().encode


def escape(text: str) -> str:
    # Most values need nothing: a search in C first (translate with a table of
    # strings costs a dictionary look-up per character).
    return text.translate(_ESCAPES) if _SPECIAL(text) else text


def times(ts: np.ndarray) -> list[str]:
    """Unix seconds -> timestamptz text in UTC, to the microsecond, without a zone:
    the sink's connection has timezone UTC (a zone suffix added by numpy cost as
    much as the formatting)."""
    us = np.rint(ts * 1e6).astype(np.int64).astype("datetime64[us]")
    return np.datetime_as_string(us, unit="us").tolist()


def floats(values: np.ndarray) -> list[str]:
    """Shortest round-trip text of each double: msgspec writes a whole list in C;
    NaN and infinities (JSON null) are written by repr instead."""
    text = _encode(values.tolist())
    if b"null" in text:
        return list(map(float.__repr__, values.tolist()))
    return text[1:-1].decode().split(",") if len(values) else []


def name_rank(names: list) -> np.ndarray:
    """Per index into names ((device_id, metric) pairs, or device ids) its rank in
    sorted order (Python's str order is by code point, which is UTF-8's byte
    order: collation "C")."""
    rank = np.empty(len(names), dtype=np.int64)
    rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names), dtype=np.int64)
    return rank


def _rows(*columns) -> str:
    return "\n".join(map("\t".join, zip(*columns))) + "\n"


def readings(rows: list, ts: np.ndarray, devices: dict):
    """Lines of `COPY readings (worker, lsn, device_id, ts, seq, metrics, tags, payload)`,
    in pieces, ordered by (device_id, ts): the order of the readings' index."""
    index = {dev: i for i, dev in enumerate(devices)}
    rank = name_rank(list(devices))
    dev = np.fromiter((index[r[2]] for r in rows), dtype=np.int64, count=len(rows))
    order = np.lexsort((ts, rank[dev])).tolist()
    esc = escape
    null = NULL
    for lo in range(0, len(order), PIECE):
        part = order[lo:lo + PIECE]
        tstext = times(ts[part])
        yield "".join([f"{w}\t{lsn}\t{esc(dev)}\t{t}\t{null if seq is None else seq}\t{esc(metrics)}\t"
                       f"{esc(tags)}\t{null if payload is None else esc(payload)}\n"
                       for (w, lsn, dev, _ts, seq, metrics, tags, payload), t
                       in zip([rows[i] for i in part], tstext)])


def _names(cols) -> np.ndarray:
    return np.array([f"{escape(d)}\t{escape(m)}" for d, m in cols.names], dtype=object)


def samples(cols, by):
    """Lines of `COPY samples (worker, lsn, device_id, metric, ts, value)`, in pieces,
    in the order of `by` (batch.BySeries sorted by name_rank: (device_id, metric, ts))."""
    names = _names(cols)
    origin = np.array([f"{r[0]}\t{r[1]}" for r in cols.readings], dtype=object)
    reading = cols.reading
    for lo in range(0, len(by.order), PIECE):
        o = by.order[lo:lo + PIECE]
        yield _rows(origin[reading[o]].tolist(), names[by.key[lo:lo + PIECE]].tolist(),
                    times(by.ts[lo:lo + PIECE]), floats(by.val[lo:lo + PIECE]))


def rollups(cols, by) -> str:
    """Lines of `COPY batch_rollups (win, device_id, metric, bucket, count, min, max,
    sum, sumsq)` (bucket in Unix seconds), in the rollups' primary key order when
    `by` is sorted by name_rank."""
    names = _names(cols)
    return "".join([_rows([win] * len(keys), names[keys].tolist(), floats(buckets),
                          list(map(str, counts.tolist())), floats(mins), floats(maxs), floats(sums),
                          floats(sqs))
                    for win, buckets, keys, counts, mins, maxs, sums, sqs in batch.rollups(by)])


def devices(devs: dict, encode) -> str:
    """Lines of `COPY batch_devices (device_id, first_seen, last_seen, last_values,
    tags, readings)` (times in Unix seconds)."""
    esc = escape
    return "".join([f"{esc(dev)}\t{d[0]!r}\t{d[1]!r}\t{esc(encode(d[2]).decode())}\t{esc(d[3])}\t{d[4]}\n"
                    for dev, d in devs.items()])
