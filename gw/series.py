"""The last minutes of the stats block, one point a second: what the dashboard draws.

The master, which already sums the workers' rows for the [stats] line, also
samples them once a second (`SeriesRecorder.tick`) into a ring of points in
memory it shares with the workers (anonymous, MAP_SHARED, made before they
are forked, so a respawned worker has it too). A worker answers
`GET /v1/stats/series` from it in its event loop, as it answers /metrics
from the stats block: a copy of the ring and one encode, no store, no lock.

The ring: a header of int64 words (magic, version, capacity, fields, workers,
points written, interval in ms), then `capacity` rows of float64, one point
each: the global figures (`GLOBAL_FIELDS`), then per worker slot its busy
fraction, connections and messages received per second. One writer (the
master) writes the row of point `n` at `n % capacity`, then stores `n + 1`
as the count; a reader reads the count before and after copying the rows
and keeps only the points no write can have touched meanwhile (x86-64 and
the compiler keep the stores in order: memoryview item stores are plain stores).

Rates are per second over the interval since the previous point. A worker's
busy fraction is the time its loop spent in turns (the sum of its
HIST_LOOP_TURN histogram: from epoll_wait's return to the turn's end) over
the interval: 1.0 is a worker that never waited for events.
"""

from __future__ import annotations

import mmap
import time
from array import array
from typing import Annotated, Sequence

from msgspec import Meta, Struct

from gw.stats import Counter as C, Layout, SINK_NAMES, StatsBlock, rss_of

SERIES_MAGIC = 0x67775352          # "gwSR"
SERIES_VERSION = 1
HEADER = 8                         # int64 words
H_MAGIC, H_VERSION, H_CAPACITY, H_FIELDS, H_WORKERS, H_COUNT, H_INTERVAL_MS = range(7)
CAPACITY = 901                     # rows: 15 minutes at a point a second (one row is the next write's)
INTERVAL = 1.0                     # seconds between two points

# (name, description): the global figures of a point, in row order.
GLOBAL_FIELDS = (
    ("t", "the point's time, Unix seconds"),
    ("connections", "connections open (any protocol)"),
    ("sessions", "MQTT and JSON-lines clients past CONNECT"),
    ("conn_rate", "sockets accepted per second"),
    ("msg_in", "application messages received per second (MQTT PUBLISH, JSON-lines Data)"),
    ("msg_out", "application messages sent per second (MQTT PUBLISH)"),
    ("bytes_in", "bytes received from clients per second"),
    ("bytes_out", "bytes sent to clients per second"),
    ("ingest", "telemetry records accepted per second (HTTP and MQTT)"),
    ("http", "HTTP requests answered per second"),
    ("wal_bytes", "bytes appended to the write-ahead logs per second"),
    ("wal_fsyncs", "fdatasync calls of the logs per second"),
    ("wal_pending_bytes", "bytes appended to the logs and not yet durable"),
    ("wal_refused", "readings the logs could not take per second"),
    *((f"{sink}_{what}", desc.format(sink=sink)) for sink in SINK_NAMES for what, desc in (
        ("lag_bytes", "log bytes durable and not yet taken by the {sink} sink (over every log)"),
        ("lag_seconds", "seconds the oldest log byte the {sink} sink has not taken has waited"),
        ("written", "readings the {sink} sink wrote per second"))),
    ("alerts", "alerts published per second"),
    ("memory_bytes", "resident memory of the master and the workers"),
)
GLOBAL_NAMES = tuple(name for name, _ in GLOBAL_FIELDS)
WORKER_FIELDS = (
    ("busy", "the fraction of the interval the worker's loop spent in turns (not waiting for events)"),
    ("connections", "connections open on the worker"),
    ("msg_in", "application messages the worker received per second"),
)
_G = {name: i for i, name in enumerate(GLOBAL_NAMES)}
_NG = len(GLOBAL_NAMES)
_NW = len(WORKER_FIELDS)
# Counters whose per-second rate a point holds: field -> counter index.
_RATES = {"conn_rate": C.CONNS_ACCEPTED, "msg_in": C.MSGS_IN, "msg_out": C.MSGS_OUT, "bytes_in": C.BYTES_IN,
          "bytes_out": C.BYTES_OUT, "ingest": C.INGEST_RECORDS_ACCEPTED, "wal_bytes": C.WAL_BYTES,
          "wal_fsyncs": C.WAL_FSYNCS, "wal_refused": C.WAL_REFUSED}
_LOOP_SUM = int(C.HIST_LOOP_TURN) + int(Layout.HIST_SUM)
_HTTP = slice(int(C.HTTP_REQUESTS), int(C.HTTP_REQUESTS) + int(Layout.HTTP_STATUS_SLOTS))


class SeriesRing:
    """The shared ring: `create` in the master before forking; every process then holds the mapping.

    Read and written through memoryviews (no numpy in the server's processes)."""

    def __init__(self, mm: mmap.mmap):
        self._mm = mm
        view = memoryview(mm)
        self.header = view[:HEADER * 8].cast("q")
        self.capacity = int(self.header[H_CAPACITY])
        self.fields = int(self.header[H_FIELDS])
        self.workers = int(self.header[H_WORKERS])
        self.interval = int(self.header[H_INTERVAL_MS]) / 1000
        # capacity x fields float64 words, row after row.
        self.rows = view[HEADER * 8:(HEADER + self.capacity * self.fields) * 8].cast("d")

    @classmethod
    def create(cls, nworkers: int, capacity: int = CAPACITY, interval: float = INTERVAL) -> "SeriesRing":
        nfields = _NG + _NW * nworkers
        mm = mmap.mmap(-1, (HEADER + capacity * nfields) * 8, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        header = memoryview(mm)[:HEADER * 8].cast("q")
        header[H_MAGIC] = SERIES_MAGIC
        header[H_VERSION] = SERIES_VERSION
        header[H_CAPACITY] = capacity
        header[H_FIELDS] = nfields
        header[H_WORKERS] = nworkers
        header[H_INTERVAL_MS] = int(interval * 1000)
        header.release()
        return cls(mm)

    @property
    def count(self) -> int:
        """Points written since the master started (the last one's sequence number is count - 1)."""
        return int(self.header[H_COUNT])

    def append(self, row: Sequence[float]) -> None:
        """The writer's only operation: the row first, then the count that makes it visible."""
        if len(row) != self.fields:
            raise ValueError(f"a point has {self.fields} fields, not {len(row)}")
        n = int(self.header[H_COUNT])
        at = (n % self.capacity) * self.fields
        self.rows[at:at + self.fields] = array("d", row)
        self.header[H_COUNT] = n + 1

    def read(self, after: int = -1) -> tuple[int, list[list[float]]]:
        """(first, rows): the points with sequence number > after still in the ring and
        untouched by a write during the copy (at most capacity - 1), oldest first; `first`
        is the first one's number."""
        before = int(self.header[H_COUNT])
        if after >= before:
            after = -1          # a point from before a restart of the master: start again
        # The oldest row is the one the next write (point `before`) takes: never served.
        start = max(after + 1, before - self.capacity + 1, 0)
        if start >= before:
            return before, []
        f = self.fields
        rows = []
        for n in range(start, before):
            at = (n % self.capacity) * f
            rows.append(self.rows[at:at + f].tolist())
        now = int(self.header[H_COUNT])
        # Writes meanwhile overwrote the points now - capacity and before (now included: in progress).
        lost = now - self.capacity + 1 - start
        if lost > 0:
            rows = rows[lost:]
            start += lost
        return start, rows

    def close(self) -> None:
        self.header.release()
        self.rows.release()
        self._mm.close()


class SeriesRecorder:
    """The master's side: one point per `tick` from the stats block's rows."""

    def __init__(self, block: StatsBlock, ring: SeriesRing):
        self.block = block
        self.ring = ring
        self.nworkers = block.nworkers
        self.prev_rows = self._rows()
        self.prev_header = block.header.tolist()
        self.prev_t = time.monotonic()

    def _rows(self) -> list[list[int]]:
        return [self.block.row(w).tolist() for w in range(self.nworkers)]

    def tick(self) -> None:
        now = time.monotonic()
        rows = self._rows()
        header = self.block.header.tolist()
        dt = max(now - self.prev_t, 1e-3)
        # A worker respawned meanwhile starts its counters again from 0: its
        # negative deltas count as 0 for that interval.
        delta = [[max(a - b, 0) for a, b in zip(r, p)] for r, p in zip(rows, self.prev_rows)]

        def total(counter: int) -> int:
            return sum(r[counter] for r in rows)

        def dsum(counter: int) -> int:
            return sum(d[counter] for d in delta)

        row = [0.0] * self.ring.fields
        row[_G["t"]] = time.time()
        row[_G["connections"]] = float(total(C.CONNS_CURRENT))
        row[_G["sessions"]] = float(total(C.SESSIONS_CURRENT))
        for name, counter in _RATES.items():
            row[_G[name]] = dsum(counter) / dt
        row[_G["http"]] = sum(sum(d[_HTTP]) for d in delta) / dt
        row[_G["wal_pending_bytes"]] = float(sum(
            max(r[C.WAL_APPENDED_OFFSET] - r[C.WAL_DURABLE_OFFSET], 0) for r in rows))
        for k, sink in enumerate(SINK_NAMES):
            row[_G[f"{sink}_lag_bytes"]] = float(header[Layout.H_SINK_LAG + k])
            row[_G[f"{sink}_lag_seconds"]] = header[Layout.H_SINK_LAG_AGE_MS + k] / 1000
            written = header[Layout.H_SINK_WRITTEN + k] - self.prev_header[Layout.H_SINK_WRITTEN + k]
            row[_G[f"{sink}_written"]] = max(written, 0) / dt
        alerts = header[Layout.H_ALERTS] - self.prev_header[Layout.H_ALERTS]
        row[_G["alerts"]] = max(alerts, 0) / dt
        row[_G["memory_bytes"]] = float(self._memory(header))
        base = _NG
        for w in range(self.nworkers):
            row[base] = min(delta[w][_LOOP_SUM] / (dt * 1e9), 1.0)
            row[base + 1] = float(rows[w][C.CONNS_CURRENT])
            row[base + 2] = delta[w][C.MSGS_IN] / dt
            base += _NW
        self.ring.append(row)
        self.prev_rows, self.prev_header, self.prev_t = rows, header, now

    def _memory(self, header: list[int]) -> int:
        """RSS of the master and every worker: one read of /proc per process."""
        pids = [header[Layout.H_MASTER_PID]] + [
            p for p in header[Layout.H_WORKER_PIDS:Layout.H_WORKER_PIDS + self.nworkers] if p]
        return sum(rss_of(pid) for pid in pids)


def columns(rows: list[list[float]], nworkers: int) -> tuple[dict[str, list[float]], list[dict[str, list[float]]]]:
    """The rows as columns: the global ones by name, then per worker its own."""
    # ms and thousandths: shorter JSON, nothing a chart shows lost.
    glob = {name: [round(r[i], 3) for r in rows] for i, name in enumerate(GLOBAL_NAMES)}
    per = []
    for w in range(nworkers):
        base = _NG + w * _NW
        per.append({name: [round(r[base + k], 3) for r in rows] for k, (name, _) in enumerate(WORKER_FIELDS)})
    return glob, per


# --- the answer of GET /v1/stats/series (its types are the OpenAPI document's) -------------

_COLUMNS_DOC = "; ".join(f"{name}: {desc}" for name, desc in GLOBAL_FIELDS)
_WORKER_DOC = "; ".join(f"{name}: {desc}" for name, desc in WORKER_FIELDS)


class WorkerSeries(Struct, forbid_unknown_fields=True):
    """One worker slot: its state now, and its columns."""

    slot: int
    pid: Annotated[int, Meta(description="the worker's pid now (0: none, being respawned)")]
    heartbeat_age_ms: Annotated[int | None, Meta(description="ms since its loop last ticked; null: not running")]
    store_lag_bytes: Annotated[int | None, Meta(
        description="bytes of its log durable and not yet committed by the store sink; null: not published yet")]
    store_behind: Annotated[bool, Meta(description="it holds ingest now (max_sink_lag_bytes)")]
    columns: Annotated[dict[str, list[float]], Meta(description="one value per point: " + _WORKER_DOC)]


class StatsSeries(Struct, forbid_unknown_fields=True):
    """GET /v1/stats/series: the points of the last minutes (one a second, sampled by the
    master from the stats block) after `after`, oldest first, as columns."""

    interval: Annotated[float, Meta(description="seconds between two points")]
    capacity: Annotated[int, Meta(description="points the server keeps")]
    first: Annotated[int, Meta(description="the sequence number of the first point in the answer")]
    last: Annotated[int, Meta(description="the sequence number of the last point: pass it as `after` "
                                          "to get only newer points next time (-1: none yet)")]
    columns: Annotated[dict[str, list[float]], Meta(description="one value per point: " + _COLUMNS_DOC)]
    workers: list[WorkerSeries]


def series_answer(ring: SeriesRing, block: StatsBlock, after: int) -> StatsSeries:
    first, rows = ring.read(after)
    glob, per = columns(rows, ring.workers)
    pids = block.header[Layout.H_WORKER_PIDS:Layout.H_WORKER_PIDS + ring.workers].tolist()
    ages = block.heartbeat_ages_ms()
    lags = block.store_lag_bytes()
    behind = block.column(C.STORE_BEHIND)
    workers = [WorkerSeries(w, int(pids[w]), ages[w], lags[w], bool(behind[w]), per[w])
               for w in range(ring.workers)]
    return StatsSeries(ring.interval, ring.capacity - 1, first, first + len(rows) - 1, glob, workers)
