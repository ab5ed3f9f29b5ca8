"""The embedded store: SQLite in `data_dir/store.sqlite`, and the sink that fills it.

Exactly once: each batch's readings, samples, rollup upserts, device updates,
alerts **and the store sink's checkpoints** are one transaction. After a crash
the checkpoints say where the last committed batch ended, so the next start
replays only work that was never committed.

The logical tables are a contract (the query API and export are written against
them): `readings`, the views `samples` and `rollups`, `devices`, `alerts`,
`checkpoints`; the physical layout under them is this module's (see SCHEMA; a
store of an older layout is migrated on open). gw/query.py reads the physical
tables for speed. `ts`, `t0`, `t1` and `bucket` are Unix seconds (REAL); `metrics`, `tags`, `last_values` are
JSON text; `payload` is the reading's payload JSON text, NULL when it was null.
`devices.last_values` merges metrics per batch, the newest reading of a batch
(by ts) winning, and a batch older than what is stored only filling in metrics
not seen yet; `devices.tags` are the newest reading's.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import re
import sqlite3
import threading
import time
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path

import msgspec

from gw.lazy import LazyModule

from . import batch
from .errors import PipelineError
from .rollup import WINDOWS

try:
    from gw_ext import sqlitebulk
except ImportError:             # the extensions not built: sqlite3's executemany
    sqlitebulk = None
from .sink import Part
from .store_sink import Alert, StoreSinkBase

np = LazyModule("numpy", globals(), "np")     # imported with the first batch (gw/lazy.py)

log = logging.getLogger("gw.pipeline.store")

SCHEMA_VERSION = 3
STORE_FILE = "store.sqlite"

# Physical layout (schema version 3). Every table the pipeline writes under load
# is appended to in arrival order, so a commit writes few pages whatever the
# number of devices (a B-tree keyed by device took one page write per device
# and metric per commit):
#
# - readings: rowid = arrival order; a unique index on (worker, lsn) (appended
#   at two or a few points, one per worker log) guards exactly-once. No index
#   on ts (a third of the cost of a reading row): reading_spans says where a
#   time range's rows are.
# - reading_spans: per batch, its readings' rowid range [first, last] and the
#   least and greatest ts among them (t0, t1). `gw export` reads a time range
#   by rowid ranges, the spans that overlap in time together (readings_in_range).
# - series: one id per (device_id, metric).
# - sample_chunks: one row per (series, hour, batch): its samples sorted by
#   time as JSON arrays `ts` and `value` (t0, t1 the first and last time, n
#   how many); rowid = arrival order; an index on (series, t0) serves a
#   device's metric over time. A chunk never spans an hour boundary, so a
#   range [from, to) reads the chunks with t0 in [hour(from), to).
# - rollup: (win, bucket, series) first by time, so a batch's upserts land in
#   the few pages of the current buckets; a series' range is read by probing
#   each bucket of the range (gw/query.py).
#
# The logical tables of the contract stay readable (and writable, for tools
# and tests) as views: `samples` (device_id, metric, ts, value) and `rollups`
# (win, device_id, metric, bucket, count, min, max, sum, sumsq).
SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (worker INTEGER NOT NULL, lsn INTEGER NOT NULL, device_id TEXT NOT NULL, ts REAL NOT NULL, seq INTEGER, metrics TEXT NOT NULL, tags TEXT NOT NULL, payload TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS readings_log ON readings (worker, lsn);
CREATE TABLE IF NOT EXISTS reading_spans (first INTEGER PRIMARY KEY, last INTEGER NOT NULL, t0 REAL NOT NULL, t1 REAL NOT NULL);
CREATE TABLE IF NOT EXISTS series (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, metric TEXT NOT NULL, UNIQUE (device_id, metric));
CREATE TABLE IF NOT EXISTS sample_chunks (series INTEGER NOT NULL, t0 REAL NOT NULL, t1 REAL NOT NULL, n INTEGER NOT NULL, ts TEXT NOT NULL, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sample_chunks_series ON sample_chunks (series, t0);
CREATE TABLE IF NOT EXISTS rollup (win TEXT NOT NULL, bucket REAL NOT NULL, series INTEGER NOT NULL, count INTEGER NOT NULL, min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL, sumsq REAL NOT NULL, PRIMARY KEY (win, bucket, series)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL, last_values TEXT NOT NULL, tags TEXT NOT NULL, readings INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, metric TEXT NOT NULL, ts REAL NOT NULL, value REAL NOT NULL, zscore REAL NOT NULL, mean REAL NOT NULL, std REAL NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, acked REAL);
CREATE TABLE IF NOT EXISTS checkpoints (sink TEXT NOT NULL, worker INTEGER NOT NULL, next_offset INTEGER NOT NULL, PRIMARY KEY (sink, worker));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_device ON alerts (device_id, metric, ts);
CREATE INDEX IF NOT EXISTS alerts_state ON alerts (state, ts);
CREATE INDEX IF NOT EXISTS alerts_device_id ON alerts (device_id, id);
CREATE VIEW IF NOT EXISTS samples AS SELECT s.device_id AS device_id, s.metric AS metric, t.value AS ts, c.value ->> t.key AS value FROM sample_chunks c JOIN series s ON s.id = c.series JOIN json_each(c.ts) t;
CREATE VIEW IF NOT EXISTS rollups AS SELECT r.win AS win, s.device_id AS device_id, s.metric AS metric, r.bucket AS bucket, r.count AS count, r.min AS min, r.max AS max, r.sum AS sum, r.sumsq AS sumsq FROM rollup r JOIN series s ON s.id = r.series;
CREATE TRIGGER IF NOT EXISTS samples_insert INSTEAD OF INSERT ON samples BEGIN INSERT INTO series (device_id, metric) VALUES (NEW.device_id, NEW.metric) ON CONFLICT DO NOTHING; INSERT INTO sample_chunks SELECT id, NEW.ts, NEW.ts, 1, printf('[%!.17g]', NEW.ts), printf('[%!.17g]', NEW.value) FROM series WHERE device_id = NEW.device_id AND metric = NEW.metric; END;
CREATE TRIGGER IF NOT EXISTS rollups_insert INSTEAD OF INSERT ON rollups BEGIN INSERT INTO series (device_id, metric) VALUES (NEW.device_id, NEW.metric) ON CONFLICT DO NOTHING; INSERT INTO rollup SELECT NEW.win, NEW.bucket, id, NEW.count, NEW.min, NEW.max, NEW.sum, NEW.sumsq FROM series WHERE device_id = NEW.device_id AND metric = NEW.metric ON CONFLICT (win, bucket, series) DO UPDATE SET count = rollup.count + excluded.count, min = min(rollup.min, excluded.min), max = max(rollup.max, excluded.max), sum = rollup.sum + excluded.sum, sumsq = rollup.sumsq + excluded.sumsq; END;
"""
# Indexes beyond the primary keys: sample_chunks_series serves a series over
# time (the query API, the detector's warm-up); readings_log the exactly-once
# guard; alerts by key, by state and by device (a time range of readings:
# reading_spans). Retention needs none: it
# deletes from the start of the tables in arrival order (readings,
# sample_chunks) or of a window's buckets (rollup).
# The views' INSTEAD OF triggers make `INSERT INTO samples` / `INSERT INTO
# rollups` (an upsert that adds to the bucket) work for tools and tests; the
# sink writes the tables directly.
TABLES = ("readings", "reading_spans", "series", "sample_chunks", "rollup", "devices", "alerts", "checkpoints", "meta")

CHUNK_SECONDS = 3600.0      # a chunk of samples never spans a boundary of these

INSERT_READING = "INSERT INTO readings VALUES (?,?,?,?,?,?,?,?)"
INSERT_SERIES = "INSERT INTO series (device_id, metric) VALUES (?, ?) RETURNING id"
INSERT_CHUNK = "INSERT INTO sample_chunks VALUES (?,?,?,?,?,?)"
INSERT_SPAN = "INSERT OR REPLACE INTO reading_spans VALUES (?,?,?,?)"
UPSERT_ROLLUP = (
    "INSERT INTO rollup VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (win, bucket, series) "
    "DO UPDATE SET count = rollup.count + excluded.count, min = min(rollup.min, excluded.min), "
    "max = max(rollup.max, excluded.max), sum = rollup.sum + excluded.sum, "
    "sumsq = rollup.sumsq + excluded.sumsq")
UPSERT_DEVICE = (
    "INSERT INTO devices VALUES (?,?,?,?,?,?) ON CONFLICT (device_id) DO UPDATE SET "
    "first_seen = min(devices.first_seen, excluded.first_seen), "
    "last_seen = max(devices.last_seen, excluded.last_seen), "
    "last_values = CASE WHEN excluded.last_seen >= devices.last_seen "
    "THEN json_patch(devices.last_values, excluded.last_values) "
    "ELSE json_patch(excluded.last_values, devices.last_values) END, "
    "tags = CASE WHEN excluded.last_seen >= devices.last_seen THEN excluded.tags ELSE devices.tags END, "
    "readings = devices.readings + excluded.readings")
INSERT_ALERT = ("INSERT INTO alerts (device_id, metric, ts, value, zscore, mean, std, state, created) "
                "VALUES (?,?,?,?,?,?,?,'open',?) RETURNING id")
UPSERT_CHECKPOINT = ("INSERT INTO checkpoints VALUES (?,?,?) ON CONFLICT (sink, worker) "
                     "DO UPDATE SET next_offset = excluded.next_offset")
# The detector's warm-up: a series' newest chunks, newest first (each holds at least one sample).
WARM_CHUNKS = "SELECT ts, value FROM sample_chunks WHERE series = ? ORDER BY t0 DESC LIMIT ?"
WARM_ALERTS = "SELECT ts, value FROM alerts WHERE device_id = ? AND metric = ? AND ts >= ?"


# --- opening ---------------------------------------------------------------------------

def check_data_dir(data_dir: str | Path) -> Path:
    """The data directory, created if missing; PipelineError unless it is a
    directory we can create files in (tried for real: root ignores mode bits,
    a read-only file system does not)."""
    path = Path(data_dir)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise PipelineError(f"data_dir {path} exists and is not a directory") from None
    except OSError as exc:
        raise PipelineError(f"data_dir {path} cannot be created: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise PipelineError(f"data_dir {path} is not a directory")
    probe = path / f".pipeline-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PipelineError(f"data_dir {path} is not writable: {exc.strerror or exc}") from None
    return path


# SQLite 3.40's quick_check/integrity_check report "NULL value in T.C" for
# every row of a WITHOUT ROWID table whose NOT NULL column C comes before
# primary-key columns in the table's definition (samples.value, before worker
# and lsn): it reads the wrong field. The store never binds NULL to those
# columns (metrics are finite numbers), so these lines are not corruption.
_FALSE_NULL = re.compile(r"NULL value in (v1_)?samples\.value")


def _corrupt(path: Path, detail: str) -> PipelineError:
    return PipelineError(
        f"the store {path} is corrupt or not a gw store ({detail}); it was left as it is: "
        f"restore it from a backup, or move it (with any {path.name}-wal and {path.name}-shm "
        f"beside it) out of the way to start an empty store")


def open_store(path: str | Path, quick_check: bool = True) -> sqlite3.Connection:
    """Opens (creating if absent) the store and checks it: PRAGMA quick_check
    (its time grows with the file; quick_check=False when it was just run),
    then its tables and schema version. A corrupt file is never replaced:
    PipelineError says what to do."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise PipelineError(f"the store {path} is not a regular file")
    try:
        # Created empty (a valid empty database) with mode 0600 first: SQLite gives
        # its -wal and -shm files the mode of the database.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise PipelineError(f"the store {path} cannot be created: {exc.strerror or exc}") from None
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    except sqlite3.Error as exc:
        raise PipelineError(f"the store {path} cannot be opened: {exc}") from None
    try:
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall() if quick_check else [("ok",)]
        except sqlite3.DatabaseError as exc:
            raise _corrupt(path, str(exc)) from None
        rows = [r for r in rows if not _FALSE_NULL.fullmatch(str(r[0]))] or [("ok",)]
        if rows != [("ok",)]:
            problems = "; ".join(str(r[0]) for r in rows[:3])
            raise _corrupt(path, f"quick_check: {problems}" + (" ..." if len(rows) > 3 else ""))
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA cache_size=-65536")       # KiB: 64 MiB
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("PRAGMA foreign_keys=OFF")
        except sqlite3.OperationalError as exc:
            raise PipelineError(f"the store {path} cannot be written: {exc}") from None
        if mode.lower() != "wal":
            raise PipelineError(f"the store {path} cannot use write-ahead logging (journal_mode {mode})")
        _ensure_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    tables.discard("sqlite_sequence")
    if tables and "meta" not in tables:
        raise _corrupt(path, f"it holds tables {', '.join(sorted(tables))} but no meta table")
    version = SCHEMA_VERSION
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise _corrupt(path, "no schema_version in its meta table")
        try:
            version = int(row[0])
        except ValueError:
            raise _corrupt(path, f"schema_version {row[0]!r}") from None
        if version > SCHEMA_VERSION:
            raise PipelineError(f"the store {path} has schema version {version}, newer than this "
                                f"gw's {SCHEMA_VERSION}: run the newer gw, or move the store away")
        if version < 1:
            raise _corrupt(path, f"schema_version {version}")
    try:
        conn.execute("BEGIN IMMEDIATE")
        if version == 1:
            _migrate_v1(conn, path)
        for stmt in SCHEMA.split(";\n"):
            if stmt.strip():
                conn.execute(stmt)
        if version < 3:
            _migrate_v2(conn, path)
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE "
                     "SET value = excluded.value", (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise PipelineError(f"the store {path} cannot be initialised: {exc}") from None
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrate_v1(conn: sqlite3.Connection, path: Path) -> None:
    """Schema version 1 (readings by (worker, lsn), samples one row each keyed by
    (device_id, metric, ts, worker, lsn), rollups keyed by (win, device_id,
    metric, bucket)) into version 2, inside the caller's transaction: either the
    whole store is migrated or nothing changed. The old tables are renamed, the
    new ones created and filled, the old ones dropped."""
    t0 = time.monotonic()
    n = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    log.warning("store %s: migrating %d readings from schema version 1 to %d (one transaction; "
                "the pipeline starts once it is done)", path, n, SCHEMA_VERSION)
    for old in ("readings_device_ts", "readings_ts", "rollups_win_bucket"):
        conn.execute(f"DROP INDEX IF EXISTS {old}")
    for table in ("readings", "samples", "rollups"):
        conn.execute(f"ALTER TABLE {table} RENAME TO v1_{table}")
    for stmt in SCHEMA.split(";\n"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("INSERT INTO readings SELECT worker, lsn, device_id, ts, seq, metrics, tags, payload "
                 "FROM v1_readings ORDER BY ts, worker, lsn")
    conn.execute("INSERT INTO series (device_id, metric) SELECT device_id, metric FROM "
                 "(SELECT DISTINCT device_id, metric FROM v1_samples UNION SELECT DISTINCT device_id, metric "
                 "FROM v1_rollups) ORDER BY device_id, metric")
    ids = {(d, m): i for i, d, m in conn.execute("SELECT id, device_id, metric FROM series")}
    # Samples in key order, cut into chunks at hour boundaries (and every 4096 samples).
    enc = msgspec.json.encode
    chunks = []
    cur_key = None
    hour = None
    tsl: list = []
    vl: list = []

    def flush():
        if tsl:
            chunks.append((ids[cur_key], tsl[0], tsl[-1], len(tsl), enc(tsl).decode(), enc(vl).decode()))

    for dev, metric, ts, value in conn.execute(
            "SELECT device_id, metric, ts, value FROM v1_samples ORDER BY device_id, metric, ts, worker, lsn"):
        key = (dev, metric)
        h = math.floor(ts / CHUNK_SECONDS)
        if key != cur_key or h != hour or len(tsl) >= 4096:
            flush()
            cur_key, hour, tsl, vl = key, h, [], []
        tsl.append(ts)
        vl.append(value)
        if len(chunks) >= 10000:
            conn.executemany(INSERT_CHUNK, chunks)
            chunks.clear()
    flush()
    conn.executemany(INSERT_CHUNK, chunks)
    conn.execute("INSERT INTO rollup SELECT r.win, r.bucket, s.id, r.count, r.min, r.max, r.sum, r.sumsq "
                 "FROM v1_rollups r JOIN series s ON s.device_id = r.device_id AND s.metric = r.metric "
                 "ORDER BY r.win, r.bucket, s.id")
    for table in ("readings", "samples", "rollups"):
        conn.execute(f"DROP TABLE v1_{table}")
    log.warning("store %s: migrated to schema version %d in %.1f s", path, SCHEMA_VERSION,
                time.monotonic() - t0)


SPAN_ROWS = 65536      # readings per span of a migrated store's rows


def _migrate_v2(conn: sqlite3.Connection, path: Path) -> None:
    """Schema version 2 (or 1, just migrated to 2's tables) into 3, in the caller's
    transaction: the readings' ts index dropped, and their spans (reading_spans)
    made from the rows there, SPAN_ROWS rowids to a span (one pass over readings)."""
    t0 = time.monotonic()
    conn.execute("DROP INDEX IF EXISTS readings_ts")
    conn.execute("DELETE FROM reading_spans")
    conn.execute(f"INSERT INTO reading_spans SELECT min(rowid), max(rowid), min(ts), max(ts) FROM readings "
                 f"GROUP BY rowid / {SPAN_ROWS}")
    log.warning("store %s: migrated to schema version %d in %.1f s", path, SCHEMA_VERSION, time.monotonic() - t0)


def span_clusters(spans: list) -> list:
    """Spans [(first rowid, last rowid, t0, t1)] merged where they overlap (or touch)
    in time: [(least first, greatest last, t0, t1)] in time order, disjoint in
    time. A reading in a span is then in exactly one cluster with t0 <= ts <= t1
    and first <= rowid <= last."""
    out: list = []
    for f, l, t0, t1 in sorted(spans, key=lambda s: (s[2], s[0])):
        if out and t0 <= out[-1][3]:
            c = out[-1]
            c[0] = min(c[0], f)
            c[1] = max(c[1], l)
            c[3] = max(c[3], t1)
        else:
            out.append([f, l, t0, t1])
    return [tuple(c) for c in out]


def readings_in_range(conn: sqlite3.Connection, start: float, end: float) -> list:
    """The rowid ranges and times to read the readings with start <= ts < end by
    (span_clusters): [(first, last, t0, t1)] in time order; a reading of the range
    is in exactly one with t0 <= ts <= t1 and first <= rowid <= last."""
    spans = conn.execute("SELECT first, last, t0, t1 FROM reading_spans ORDER BY first").fetchall()
    lo, hi = conn.execute("SELECT min(rowid), max(rowid) FROM readings").fetchone()
    if lo is None:
        return []
    # Rowids no span covers (rows written by a tool or a test, not the sink): a span of any time.
    wide = []
    nxt = lo
    for f, l, _a, _b in spans:
        if f > nxt:
            wide.append((nxt, f - 1, -math.inf, math.inf))
        nxt = max(nxt, l + 1)
    if nxt <= hi:
        wide.append((nxt, hi, -math.inf, math.inf))
    hit = [s for s in spans if s[3] >= start and s[2] < end] + wide
    return span_clusters(hit)


def insert_samples(conn: sqlite3.Connection, device_id: str, metric: str, ts: list, values: list,
                   per_chunk: int = 60) -> None:
    """Stores a series' samples (time order) as the sink would have, `per_chunk` to a
    chunk and never across an hour; for tools, benchmarks and tests (the caller's
    transaction). `INSERT INTO samples` does the same one sample at a time."""
    conn.execute("INSERT INTO series (device_id, metric) VALUES (?, ?) ON CONFLICT DO NOTHING",
                 (device_id, metric))
    sid = conn.execute("SELECT id FROM series WHERE device_id = ? AND metric = ?", (device_id, metric)).fetchone()[0]
    enc = msgspec.json.encode
    rows = []
    i = 0
    while i < len(ts):
        hour = math.floor(ts[i] / CHUNK_SECONDS)
        j = i + 1
        while j < len(ts) and j - i < per_chunk and math.floor(ts[j] / CHUNK_SECONDS) == hour:
            j += 1
        rows.append((sid, ts[i], ts[j - 1], j - i, enc(ts[i:j]).decode(), enc(values[i:j]).decode()))
        i = j
    conn.executemany(INSERT_CHUNK, rows)


# --- the sink --------------------------------------------------------------------------

# Readings rows of a batch from which they go in on a thread of their own; a
# smaller batch (what the store takes while it keeps up) inserts them in the
# sink's thread, which starts no thread per batch.
OVERLAP_FROM = 8192


class _Inserting:
    """`many(sql, rows)` on a thread of its own; join() waits for it and raises what
    it raised, wait() only waits."""

    def __init__(self, many, sql: str, rows: list):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(many, sql, rows),
                                       name="gw-store-readings", daemon=True)
        self.thread.start()

    def _run(self, many, sql, rows) -> None:
        try:
            many(sql, rows)
        except BaseException as exc:        # noqa: BLE001  (raised in the sink's thread by join())
            self.error = exc

    def wait(self) -> None:
        self.thread.join()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


_T1 = operator.itemgetter(2)


class StoreSink(StoreSinkBase):
    """Readings -> store.sqlite, exactly once; rollups, devices, anomaly alerts."""

    name = "store"
    # Up to 256 x pipeline_batch readings per transaction when behind (512,000 by
    # default, about 200 MB of the pipeline's memory at the peak): each commit
    # writes every page it touched, and a batch's per-series rows (one sample chunk,
    # three rollup upserts, one device upsert) cost the same for one reading of a
    # series as for many, so under load the store commits seldom and big (5 s of
    # readings at 100,000/s; with 20,000 devices 128,000 per batch gave 90,000
    # readings per CPU-second, 256,000 gave 111,000, and with the batch decoded in
    # place 256,000 gave 135,000-136,000 and 512,000 159,000-164,000).
    catchup = 256

    def __init__(self, conn: sqlite3.Connection, nworkers: int, *, anomaly_window: int = 60,
                 anomaly_threshold: float = 4.0, raw_retention: float = 7 * 86400.0,
                 rollup_retention: dict | None = None, retention_interval: float = 60.0,
                 clock=time.time):
        super().__init__(nworkers, anomaly_window=anomaly_window, anomaly_threshold=anomaly_threshold,
                         raw_retention=raw_retention, rollup_retention=rollup_retention,
                         retention_interval=retention_interval, clock=clock)
        self.conn = conn
        self.deleted = 0
        self._next_retention = 0.0
        self._retention_left: list | None = None
        self._series: dict[tuple[str, str], int] = {}      # (device_id, metric) -> series id
        self._next_series = 1
        # The batch's rows go in through SQLite's C API on this connection's own handle
        # (gw_ext/sqlitebulk.pyx: a third less CPU a row, stepped without the GIL) when
        # the handle is confirmed; else through sqlite3's executemany.
        self._handle = sqlitebulk.handle_of(conn) if sqlitebulk is not None else None

    def _executemany(self, sql: str, rows: list) -> None:
        if self._handle is not None:
            sqlitebulk.executemany(self.conn, self._handle, sql, rows)
        else:
            self.conn.executemany(sql, rows)

    def open(self) -> None:
        for worker, offset in self.conn.execute(
                "SELECT worker, next_offset FROM checkpoints WHERE sink = ?", (self.name,)):
            if 0 <= worker < self.nworkers:
                self.checkpoints[worker] = offset
        self._load_series()

    def _load_series(self) -> None:
        self._series = {(d, m): i for i, d, m in self.conn.execute("SELECT id, device_id, metric FROM series")}
        self._next_series = max(self._series.values(), default=0) + 1

    # -- anomaly state from what is committed
    def _warm(self, device_id: str, metric: str) -> list[float]:
        """The series' last `window` samples (by time) that raised no alert, oldest first."""
        sid = self._series.get((device_id, metric))
        if sid is None:
            return []
        window = self.detector.window
        dec = msgspec.json.decode
        got: list = []
        pairs: list = []
        # Each chunk holds at least one sample: a few chunks usually suffice, and a
        # bounded number always (a series whose newest chunks are mostly alerts warms
        # from fewer values, as a new one would).
        for limit in (4, 64, max(128, 4 * window)):
            rows = self.conn.execute(WARM_CHUNKS, (sid, limit)).fetchall()
            pairs = []
            for ts_text, val_text in rows:
                pairs.extend(zip(dec(ts_text), dec(val_text)))
            if not pairs:
                return []
            oldest = min(p[0] for p in pairs)
            flagged = set(self.conn.execute(WARM_ALERTS, (device_id, metric, oldest)).fetchall())
            got = [p for p in pairs if p not in flagged]
            if len(got) >= window or len(rows) < limit:
                break
        got.sort(key=lambda p: p[0])
        return [v for _t, v in got[-window:]]

    # -- one batch, one transaction
    def _write(self, parts: list[Part]) -> None:
        encode = self._encode
        cols = batch.decode(parts, self._decode, encode, self._bad)
        readings = cols.readings
        namelist = cols.names
        devs = cols.devices
        series = self._series
        new_series = []
        sids = []
        for nk in namelist:
            sid = series.get(nk)
            if sid is None:
                sid = self._next_series
                self._next_series += 1
                new_series.append((sid, nk[0], nk[1]))
            sids.append(sid)
        try:
            # Before the transaction: the detector's warm-up reads the store.
            alerts = batch.detect(cols, self.detector)
        except BaseException:
            self._next_series -= len(new_series)
            self.detector.reset()
            raise
        ckpts = [(self.name, slot, nxt) for slot, _r, nxt in parts]
        conn = self.conn
        published = []
        inserting = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            if new_series:
                conn.executemany("INSERT INTO series VALUES (?,?,?)", new_series)
            if readings:
                # The batch's rowids follow the table's greatest (nothing else writes in
                # this transaction); its times bound by its devices' first and last.
                first = (conn.execute("SELECT max(rowid) FROM readings").fetchone()[0] or 0) + 1
                conn.execute(INSERT_SPAN, (first, first + len(readings) - 1,
                                           min(d[0] for d in devs.values()), max(d[1] for d in devs.values())))
            many = self._executemany
            # A large batch's readings rows go in on a thread of their own while this
            # one builds the other rows (SQLite steps them without the GIL): nothing
            # else uses the connection until it is joined.
            if len(readings) >= OVERLAP_FROM:
                inserting = _Inserting(many, INSERT_READING, readings)
            else:
                many(INSERT_READING, readings)
            chunks, rollups = self._samples(cols, sids)
            for sid, dev, m in new_series:
                series[(dev, m)] = sid
            devrows = [(dev, d[0], d[1], encode(d[2]).decode(), d[3], d[4]) for dev, d in devs.items()]
            if inserting is not None:
                inserting, done = None, inserting
                done.join()
            many(INSERT_CHUNK, chunks)
            many(UPSERT_ROLLUP, rollups)
            many(UPSERT_DEVICE, devrows)
            if alerts:
                now = self.clock()
                for dev, m, ts, v, z, mean, std in alerts:
                    aid = conn.execute(INSERT_ALERT, (dev, m, ts, v, z, mean, std, now)).fetchone()[0]
                    published.append(Alert(aid, dev, m, datetime.fromtimestamp(ts, timezone.utc),
                                            v, z, mean, std))
            conn.executemany(UPSERT_CHECKPOINT, ckpts)
            conn.execute("COMMIT")
        except BaseException:
            if inserting is not None:
                inserting.wait()            # the connection is its until it is done
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            for sid, dev, m in new_series:
                series.pop((dev, m), None)
            self._next_series = max(series.values(), default=0) + 1
            try:
                self._load_series()         # what is committed (another writer may have added series)
            except sqlite3.Error:
                pass
            self.detector.reset()           # it saw values that were not committed
            raise
        self._committed(parts, len(readings), published)

    def _samples(self, cols: batch.Columns, sids: list):
        """The batch's samples as sample chunk rows and rollup upserts: built in C
        (gw_ext/storebatch.pyx `series_rows`) when built, else `_samples_python`."""
        if not len(cols):
            return [], []
        series_rows = batch.compiled_series_rows()
        if series_rows is None:
            return self._samples_python(cols, sids)
        by = batch.BySeries(cols)
        chunks, rollups = series_rows(np.asarray(sids, dtype=np.int64), by.key, by.ts, by.val,
                                      CHUNK_SECONDS, WINDOWS)
        chunks.sort(key=_T1)            # rowid order follows time: retention deletes from the start
        return chunks, rollups

    def _samples_python(self, cols: batch.Columns, sids: list):
        """`_samples` with numpy and msgspec: the reference (the same rows; a rollup's
        sums may differ in their last bits, numpy adding in another order)."""
        if not len(cols):
            return [], []
        by = batch.BySeries(cols)
        sid_of = np.asarray(sids, dtype=np.int64)
        starts, _hours = by.runs(CHUNK_SECONDS)
        ends = np.append(starts[1:], len(by.order))
        tl = by.ts.tolist()
        vl = by.val.tolist()
        enc = self._encode
        chunks = [(sid, tl[s], tl[e - 1], e - s, enc(tl[s:e]).decode(), enc(vl[s:e]).decode())
                  for sid, s, e in zip(sid_of[by.key[starts]].tolist(), starts.tolist(), ends.tolist())]
        chunks.sort(key=_T1)            # rowid order follows time: retention deletes from the start
        rollups = []
        for win, bs, ks, counts, mins, maxs, sums, sqs in batch.rollups(by):
            ss = sid_of[ks]
            o = np.lexsort((ss, bs))           # (bucket, series): the table's order
            rollups.extend(zip(repeat(win), bs[o].tolist(), ss[o].tolist(), counts[o].tolist(),
                               mins[o].tolist(), maxs[o].tolist(), sums[o].tolist(), sqs[o].tolist()))
        return chunks, rollups

    def rewind(self) -> None:
        self.detector.reset()

    # -- retention, in small chunks between batches
    def poll(self, now: float) -> None:
        if self._retention_left is None:
            if now < self._next_retention:
                return
            self._next_retention = now + self.retention_interval
            wall = self.clock()
            self._retention_left = [("raw", wall - self.raw_retention)] + \
                [(win, wall - age) for win, age in self.rollup_retention.items()]
        deadline = time.monotonic() + 0.1
        while self._retention_left and time.monotonic() < deadline:
            what, cutoff = self._retention_left[0]
            n = self._delete_raw(cutoff) if what == "raw" else self._delete_rollups(what, cutoff)
            self.deleted += n
            if n == 0:
                self._retention_left.pop(0)
        if not self._retention_left:
            self._retention_left = None

    def retention_pass(self) -> int:
        """Runs a whole retention pass now (tests, tools): rows deleted."""
        before = self.deleted
        self._retention_left = None
        self._next_retention = 0.0
        while True:
            self.poll(time.monotonic())
            if self._retention_left is None:
                return self.deleted - before
            self._next_retention = float("inf")

    def _delete_raw(self, cutoff: float, chunk: int = 1000) -> int:
        """Deletes up to `chunk` readings and `chunk` sample chunks older than the
        cutoff from the start of their tables (arrival order): a row goes once it
        and the rows stored before it are old. One short transaction."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            gone = self._delete_head("readings", "ts", cutoff, chunk)
            if gone:
                conn.execute("DELETE FROM reading_spans WHERE last < (SELECT coalesce(min(rowid), 1 << 62) "
                             "FROM readings)")
            rows = conn.execute("SELECT rowid, t1, n FROM sample_chunks ORDER BY rowid LIMIT ?",
                                (chunk,)).fetchall()
            last = None
            samples = 0
            for rowid, t1, n in rows:
                if t1 >= cutoff:
                    break
                last = rowid
                samples += n
            if last is not None:
                conn.execute("DELETE FROM sample_chunks WHERE rowid <= ?", (last,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return gone + samples

    def _delete_head(self, table: str, column: str, cutoff: float, chunk: int) -> int:
        rows = self.conn.execute(f"SELECT rowid, {column} FROM {table} ORDER BY rowid LIMIT ?",
                                 (chunk,)).fetchall()
        last = None
        count = 0
        for rowid, t in rows:
            if t >= cutoff:
                break
            last = rowid
            count += 1
        if last is not None:
            self.conn.execute(f"DELETE FROM {table} WHERE rowid <= ?", (last,))
        return count

    def _delete_rollups(self, win: str, cutoff: float, chunk: int = 2000) -> int:
        cur = self.conn.execute(
            "DELETE FROM rollup WHERE win = ?1 AND (bucket, series) IN "
            "(SELECT bucket, series FROM rollup WHERE win = ?1 AND bucket < ?2 LIMIT ?3)",
            (win, cutoff, chunk))
        return max(cur.rowcount, 0)

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass

    def extra_stats(self) -> dict:
        return {"bad_records": self.bad_records, "alerts": self.alerts, "retention_deleted": self.deleted}

