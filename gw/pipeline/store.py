"""The embedded store: SQLite in `data_dir/store.sqlite`, and the sink that fills it.

Exactly once: each batch's readings, samples, rollup upserts, device updates,
alerts **and the store sink's checkpoints** are one transaction. After a crash
the checkpoints say where the last committed batch ended, so the next start
replays only work that was never committed.

The tables are a contract (the query API is written against them): see SCHEMA.
`ts` and `bucket` are Unix seconds (REAL); `metrics`, `tags`, `last_values` are
JSON text; `payload` is the reading's payload JSON text, NULL when it was null.
`devices.last_values` merges metrics per batch, the newest reading of a batch
(by ts) winning, and a batch older than what is stored only filling in metrics
not seen yet; `devices.tags` are the newest reading's.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import sqlite3
import time
from datetime import datetime
from pathlib import Path

import msgspec

from .anomaly import Detector
from .errors import PipelineError
from .rollup import aggregate
from .sink import Part, Sink

log = logging.getLogger("gw.pipeline.store")

SCHEMA_VERSION = 1
STORE_FILE = "store.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (worker INTEGER NOT NULL, lsn INTEGER NOT NULL, device_id TEXT NOT NULL, ts REAL NOT NULL, seq INTEGER, metrics TEXT NOT NULL, tags TEXT NOT NULL, payload TEXT, PRIMARY KEY (worker, lsn)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS samples (device_id TEXT NOT NULL, metric TEXT NOT NULL, ts REAL NOT NULL, value REAL NOT NULL, worker INTEGER NOT NULL, lsn INTEGER NOT NULL, PRIMARY KEY (device_id, metric, ts, worker, lsn)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollups (win TEXT NOT NULL, device_id TEXT NOT NULL, metric TEXT NOT NULL, bucket REAL NOT NULL, count INTEGER NOT NULL, min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL, sumsq REAL NOT NULL, PRIMARY KEY (win, device_id, metric, bucket)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL, last_values TEXT NOT NULL, tags TEXT NOT NULL, readings INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, metric TEXT NOT NULL, ts REAL NOT NULL, value REAL NOT NULL, zscore REAL NOT NULL, mean REAL NOT NULL, std REAL NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, acked REAL);
CREATE TABLE IF NOT EXISTS checkpoints (sink TEXT NOT NULL, worker INTEGER NOT NULL, next_offset INTEGER NOT NULL, PRIMARY KEY (sink, worker));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS readings_device_ts ON readings (device_id, ts);
CREATE INDEX IF NOT EXISTS readings_ts ON readings (ts);
CREATE INDEX IF NOT EXISTS rollups_win_bucket ON rollups (win, bucket);
CREATE INDEX IF NOT EXISTS alerts_device ON alerts (device_id, metric, ts);
CREATE INDEX IF NOT EXISTS alerts_state ON alerts (state, ts);
CREATE INDEX IF NOT EXISTS alerts_device_id ON alerts (device_id, id);      -- GET /v1/alerts?device_id=, newest first
"""
# Indexes beyond the primary keys: readings_device_ts serves a device's readings
# over time (the query API; the samples' primary key already serves (device,
# metric, time range) and the rollups' (win, device, metric, bucket range));
# readings_ts and rollups_win_bucket let retention find the oldest rows (both
# mostly appended at their end, cheap to keep); alerts by key and by state.
TABLES = ("readings", "samples", "rollups", "devices", "alerts", "checkpoints", "meta")

INSERT_READING = "INSERT INTO readings VALUES (?,?,?,?,?,?,?,?)"
INSERT_SAMPLE = "INSERT INTO samples VALUES (?,?,?,?,?,?)"
UPSERT_ROLLUP = (
    "INSERT INTO rollups VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (win, device_id, metric, bucket) "
    "DO UPDATE SET count = rollups.count + excluded.count, min = min(rollups.min, excluded.min), "
    "max = max(rollups.max, excluded.max), sum = rollups.sum + excluded.sum, "
    "sumsq = rollups.sumsq + excluded.sumsq")
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
WARM_SAMPLES = (
    "SELECT value FROM samples s WHERE device_id = ? AND metric = ? AND NOT EXISTS "
    "(SELECT 1 FROM alerts a WHERE a.device_id = s.device_id AND a.metric = s.metric "
    "AND a.ts = s.ts AND a.value = s.value) ORDER BY ts DESC LIMIT ?")


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
_FALSE_NULL = re.compile(r"NULL value in samples\.value")


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
    try:
        conn.execute("BEGIN IMMEDIATE")
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
                     (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise PipelineError(f"the store {path} cannot be initialised: {exc}") from None


# --- the sink --------------------------------------------------------------------------

class _Reading(msgspec.Struct):
    """The normalised reading as the workers log it (gw/ingest.py Telemetry);
    unknown fields are tolerated (a newer writer)."""
    device_id: str
    ts: datetime
    seq: int | None = None
    metrics: dict[str, float] = {}
    tags: msgspec.Raw = msgspec.Raw(b"{}")
    payload: msgspec.Raw = msgspec.Raw(b"null")


class _Alert(msgspec.Struct):
    id: int
    device_id: str
    metric: str
    ts: datetime
    value: float
    zscore: float
    mean: float
    std: float
    state: str = "open"


_NULL = b"null"


class StoreSink(Sink):
    """Readings -> store.sqlite, exactly once; rollups, devices, anomaly alerts."""

    name = "store"
    catchup = 8

    def __init__(self, conn: sqlite3.Connection, nworkers: int, *, anomaly_window: int = 60,
                 anomaly_threshold: float = 4.0, raw_retention: float = 7 * 86400.0,
                 rollup_retention: dict | None = None, retention_interval: float = 60.0,
                 clock=time.time):
        super().__init__(nworkers)
        self.conn = conn
        self.detector = Detector(anomaly_window, anomaly_threshold, warm=self._warm)
        self.raw_retention = raw_retention
        self.rollup_retention = rollup_retention if rollup_retention is not None else \
            {"1m": 30 * 86400.0, "1h": 365 * 86400.0}
        self.retention_interval = retention_interval
        self.clock = clock
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()    # (topic, payload) to publish after commit
        self._decode = msgspec.json.Decoder(_Reading).decode
        self._encode = msgspec.json.Encoder().encode
        self.bad_records = 0
        self.alerts = 0
        self.deleted = 0
        self._bad_logged = 0.0
        self._next_retention = 0.0
        self._retention_left: list | None = None

    def open(self) -> None:
        for worker, offset in self.conn.execute(
                "SELECT worker, next_offset FROM checkpoints WHERE sink = ?", (self.name,)):
            if 0 <= worker < self.nworkers:
                self.checkpoints[worker] = offset

    # -- anomaly state from what is committed
    def _warm(self, device_id: str, metric: str) -> list[float]:
        rows = self.conn.execute(WARM_SAMPLES, (device_id, metric, self.detector.window)).fetchall()
        return [r[0] for r in reversed(rows)]

    # -- one batch, one transaction
    def write(self, parts: list[Part]) -> None:
        decode = self._decode
        encode = self._encode
        observe = self.detector.observe
        readings = []
        samples = []
        names: dict = {}
        namelist: list = []
        skey = []
        sts = []
        sval = []
        devs: dict = {}
        alerts = []
        for slot, records, _next in parts:
            for off, payload in records:
                try:
                    r = decode(payload)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self._bad(slot, off, exc)
                    continue
                dt = r.ts
                ts = dt.timestamp()
                dev = r.device_id
                metrics = r.metrics
                tags = bytes(r.tags).decode()
                pl = bytes(r.payload)
                readings.append((slot, off, dev, ts, r.seq, encode(metrics).decode(), tags,
                                 None if pl == _NULL else pl.decode()))
                for m, v in metrics.items():
                    samples.append((dev, m, ts, v, slot, off))
                    nk = (dev, m)
                    k = names.get(nk)
                    if k is None:
                        k = names[nk] = len(namelist)
                        namelist.append(nk)
                    skey.append(k)
                    sts.append(ts)
                    sval.append(v)
                    a = observe(dev, m, v)
                    if a is not None:
                        alerts.append((dev, m, ts, v, a[0], a[1], a[2], dt))
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
        rollups = aggregate(namelist, skey, sts, sval)
        devrows = [(dev, d[0], d[1], encode(d[2]).decode(), d[3], d[4]) for dev, d in devs.items()]
        ckpts = [(self.name, slot, nxt) for slot, _r, nxt in parts]
        conn = self.conn
        published = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT_READING, readings)
            conn.executemany(INSERT_SAMPLE, samples)
            conn.executemany(UPSERT_ROLLUP, rollups)
            conn.executemany(UPSERT_DEVICE, devrows)
            if alerts:
                now = self.clock()
                for dev, m, ts, v, z, mean, std, dt in alerts:
                    aid = conn.execute(INSERT_ALERT, (dev, m, ts, v, z, mean, std, now)).fetchone()[0]
                    published.append(_Alert(aid, dev, m, dt, v, z, mean, std))
            conn.executemany(UPSERT_CHECKPOINT, ckpts)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self.detector.reset()           # it saw values that were not committed
            raise
        for slot, _r, nxt in parts:
            self.checkpoints[slot] = nxt
        self.written += len(readings)
        self.alerts += len(published)
        for a in published:
            self.outbox.put((b"alerts/" + a.device_id.encode(), encode(a)))

    def rewind(self) -> None:
        self.detector.reset()

    def _bad(self, slot: int, off: int, exc: Exception) -> None:
        self.bad_records += 1
        now = time.monotonic()
        if now - self._bad_logged >= 10.0:
            self._bad_logged = now
            log.error("store: skipped a record that is not a normalised reading (worker %d, offset %d): "
                      "%s (%d skipped so far)", slot, off, exc, self.bad_records)

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
        conn = self.conn
        rows = conn.execute("SELECT worker, lsn, device_id, ts, metrics FROM readings "
                            "WHERE ts < ? ORDER BY ts LIMIT ?", (cutoff, chunk)).fetchall()
        if not rows:
            return 0
        dec = msgspec.json.decode
        keys = [(dev, m, ts, w, lsn) for w, lsn, dev, ts, metrics in rows for m in dec(metrics)]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM samples WHERE device_id = ? AND metric = ? AND ts = ? "
                             "AND worker = ? AND lsn = ?", keys)
            conn.executemany("DELETE FROM readings WHERE worker = ? AND lsn = ?",
                             [(r[0], r[1]) for r in rows])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return len(rows) + len(keys)

    def _delete_rollups(self, win: str, cutoff: float, chunk: int = 2000) -> int:
        cur = self.conn.execute(
            "DELETE FROM rollups WHERE win = ?1 AND (device_id, metric, bucket) IN "
            "(SELECT device_id, metric, bucket FROM rollups WHERE win = ?1 AND bucket < ?2 LIMIT ?3)",
            (win, cutoff, chunk))
        return max(cur.rowcount, 0)

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass

    def extra_stats(self) -> dict:
        return {"bad_records": self.bad_records, "alerts": self.alerts, "retention_deleted": self.deleted}

