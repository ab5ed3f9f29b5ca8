"""`gw export`: readings, or the windows of a rollup, from the store to a
Parquet, CSV or NDJSON file.

Two halves meet at a seam:

- a `ReadingSource` reads the store's logical contract (`readings`,
  `rollups`; see gw/pipeline/store.py) inside one read transaction, so the
  export is one consistent snapshot even while `gw serve` writes: the count
  (for the progress bar), the metric names (the wide table's columns) and the
  rows all come from the same state of the store. It yields columnar batches
  of at most `CHUNK_ROWS` rows, in (time, device id) order, so memory stays
  bounded whatever the range. `SqliteSource` holds every SQL statement for the
  embedded store, `PgSource` (gw/export_pg.py) every one for a PostgreSQL
  store; `open_source` picks one by the `store` setting. Both give the writers
  the same columns and types (times as Unix seconds, JSON as compact text), so
  both stores export the same files.
- a writer per format turns a batch into rows of the output: Parquet
  (pyarrow, zstd, one row group per batch, `ts` a `timestamp[us, tz=UTC]`),
  CSV and NDJSON (RFC 3339 times in UTC). The file is written beside its
  destination under a temporary name (mode 0600, like the store's files),
  flushed to disk and renamed over it only when complete: an export that fails
  or is interrupted leaves no partial file.

Raw readings are a wide, typed table for Parquet and CSV: `device_id`, `ts`,
`seq`, one float64 column `metric_<name>` per metric present in the range
(null where a reading lacks it), `tags` (a map of strings in Parquet, JSON text
in CSV), `payload` (JSON text, null when the reading had none). NDJSON keeps a
reading's shape: `metrics` and `tags` objects. Rollup windows: `window`,
`bucket` (the window's start), `device_id`, `metric`, `count`, `min`, `max`,
`mean`, `std` (population), computed as the query API computes them.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import msgspec

CHUNK_ROWS = 50_000            # rows per batch read from the store and per Parquet row group
DEFAULT_SPAN = 86_400.0         # seconds exported when --from is not given: the 24 h before --to
WINDOWS = ("raw", "1m", "1h", "1d")
FORMATS = ("parquet", "csv", "ndjson")
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson"}
METRIC_PREFIX = "metric_"
# Device ids are [A-Za-z0-9_-]{1,64}; a pattern adds the wildcards * and ?.
_DEVICE_PATTERN = re.compile(r"[A-Za-z0-9_*?-]{1,64}")
_UNIX_SECONDS = re.compile(r"-?[0-9]{1,12}(\.[0-9]{1,9})?")
_MAX_SECONDS = 253402300799.0   # 9999-12-31T23:59:59Z: the last second RFC 3339 can write


class ExportError(Exception):
    """A reason the export cannot be made; `code` is gw's exit status (2: a bad
    argument or setting, 1: the store or the output)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# --- what is asked for -------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """The rows to export: times in [start, end) (Unix seconds; a reading's
    `ts`, a window's start), an optional device id or glob, raw readings or a
    rollup window."""

    start: float
    end: float
    device: str | None = None
    window: str = "raw"

    @property
    def device_is_pattern(self) -> bool:
        return self.device is not None and ("*" in self.device or "?" in self.device)


def parse_time(text: str, what: str) -> float:
    """RFC 3339 with a time zone (`2026-01-31T12:00:00Z`, `...+01:00`) or Unix
    seconds (`1767225600`, `1767225600.5`) -> Unix seconds."""
    text = text.strip()
    if _UNIX_SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            raise ExportError(f"{what} {text!r} is neither RFC 3339 (2026-01-31T12:00:00Z) nor Unix seconds",
                              2) from None
        if at.tzinfo is None:
            raise ExportError(f"{what} {text!r} has no time zone: add Z (UTC) or an offset such as +01:00", 2)
        seconds = at.timestamp()
    if not 0.0 <= seconds <= _MAX_SECONDS:
        raise ExportError(f"{what} {text!r} is outside 1970-01-01 .. 9999-12-31", 2)
    return seconds


def selection(start: str | None, end: str | None, device: str | None, window: str,
              now: float) -> Selection:
    """The Selection the command line asks for: --to defaults to now, --from to
    DEFAULT_SPAN before --to."""
    end_s = parse_time(end, "--to") if end is not None else now
    start_s = parse_time(start, "--from") if start is not None else max(0.0, end_s - DEFAULT_SPAN)
    if start_s >= end_s:
        raise ExportError(f"--from ({_rfc3339(start_s)}) is not before --to ({_rfc3339(end_s)})", 2)
    if device is not None and not _DEVICE_PATTERN.fullmatch(device):
        raise ExportError(f"--device {device!r} is not a device id or a pattern of one (letters, digits, "
                          f"_ and -, with the wildcards * and ?; at most 64 characters)", 2)
    if window not in WINDOWS:
        raise ExportError(f"--window {window!r} is not one of {', '.join(WINDOWS)}", 2)
    return Selection(start_s, end_s, device, window)


def output_format(fmt: str | None, output: str) -> str:
    """--format, or the one the output's suffix names."""
    if fmt is not None:
        return fmt
    found = SUFFIXES.get(Path(output).suffix.lower())
    if found is None:
        raise ExportError(f"give --format ({'|'.join(FORMATS)}): the suffix of {output} names none", 2)
    return found


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


# --- the reader seam ---------------------------------------------------------------------

@dataclass
class ReadingBatch:
    """Raw readings, column by column (sequences of equal length): `ts` Unix seconds; `metrics`, `tags`
    JSON text of objects; `payload` JSON text or None."""

    device_id: list
    ts: list
    seq: list
    metrics: list
    tags: list
    payload: list

    def __len__(self) -> int:
        return len(self.ts)


@dataclass
class RollupBatch:
    """Windows of one rollup, column by column (sequences of equal length): `bucket` the window's start
    (Unix seconds), the sums the store keeps (count, min, max, sum, sumsq)."""

    bucket: list
    device_id: list
    metric: list
    count: list
    min: list
    max: list
    sum: list
    sumsq: list

    def __len__(self) -> int:
        return len(self.bucket)


class ReadingSource:
    """What an export reads from a store. Every call between entering and
    leaving `snapshot()` sees the same state of the store; rows come in
    (time, device id) order (readings: `ts`; rollups: `bucket`, then metric),
    in batches of at most `rows`."""

    def snapshot(self):
        """A context manager: one read transaction."""
        raise NotImplementedError

    def count(self, sel: Selection) -> int:
        """Readings (or windows) the selection holds."""
        raise NotImplementedError

    def metric_names(self, sel: Selection) -> list[str]:
        """The metric names of the selection's readings, sorted."""
        raise NotImplementedError

    def batches(self, sel: Selection, rows: int = CHUNK_ROWS) -> Iterator[ReadingBatch | RollupBatch]:
        raise NotImplementedError

    def files(self) -> list[Path]:
        """Files the source reads: an export never writes over them."""
        return []

    def close(self) -> None:
        pass


class SqliteSource(ReadingSource):
    """The embedded store, `data_dir/store.sqlite`, through a read-only
    connection (WAL mode: `gw serve` goes on writing meanwhile; the read
    transaction keeps the WAL from being checkpointed past it until the export
    ends). Every statement the export runs against it is here."""

    READINGS = "SELECT device_id, ts, seq, metrics, tags, payload FROM readings"
    READINGS_COUNT = "SELECT count(*) FROM readings"
    # A device's last_values has a key for every metric it ever sent; a seek in the
    # sample chunks' index per (device, metric) then says whether it has one in the
    # range: far cheaper than reading every reading's metrics. A chunk spans at most
    # an hour (CHUNK_SECONDS), so one overlapping the range starts less than an hour
    # before it.
    READINGS_METRICS = ("SELECT DISTINCT k.key FROM devices d, json_each(d.last_values) k WHERE {device}"
                        "EXISTS (SELECT 1 FROM series s JOIN sample_chunks c ON c.series = s.id "
                        "WHERE s.device_id = d.device_id AND s.metric = k.key "
                        "AND c.t0 >= :start - 3600.0 AND c.t0 < :end AND c.t1 >= :start) ORDER BY 1")
    METRICS_DEVICE = {None: "", "id": "d.device_id = :device AND ", "glob": "d.device_id GLOB :device AND "}
    ROLLUPS = "SELECT bucket, device_id, metric, count, min, max, sum, sumsq FROM rollups"
    ROLLUPS_COUNT = "SELECT count(*) FROM rollups"
    # The time range always drives the scan so rows stream in time order: readings
    # by the rowid ranges of their spans (gw/pipeline/store.py readings_in_range: the
    # readings have no ts index), each cluster of spans sorted on its own (a batch or
    # a few); rollups by the rollup table's (win, bucket) key. `+device_id` keeps a
    # pattern from choosing a device index instead.
    READINGS_WHERE = {
        None: " WHERE ts >= ? AND ts < ?",
        "id": " WHERE device_id = ? AND ts >= ? AND ts < ?",
        "glob": " WHERE ts >= ? AND ts < ? AND +device_id GLOB ?",
    }
    READINGS_SPAN = " AND rowid BETWEEN ? AND ? AND ts >= ? AND ts <= ?"
    READINGS_ORDER = " ORDER BY ts, device_id, worker, lsn"
    ROLLUPS_WHERE = {
        None: " WHERE win = ? AND bucket >= ? AND bucket < ?",
        "id": " WHERE win = ? AND device_id = ? AND bucket >= ? AND bucket < ?",
        "glob": " WHERE win = ? AND bucket >= ? AND bucket < ? AND +device_id GLOB ?",
    }
    ROLLUPS_ORDER = " ORDER BY bucket, device_id, metric"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"no store at {self.path}: gw serve creates it in its data_dir "
                              f"(give the same --config or --data-dir)")
        try:
            self.conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                        isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:
            raise ExportError(f"cannot open the store {self.path}: {exc}") from None
        try:
            self.conn.execute("PRAGMA query_only = 1")
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        except sqlite3.Error as exc:
            self.conn.close()
            raise ExportError(f"cannot read the store {self.path}: {exc}") from None
        missing = {"readings", "series", "sample_chunks", "rollups", "devices"} - tables
        if missing:
            self.conn.close()
            raise ExportError(f"the store {self.path} has no {' or '.join(sorted(missing))} table "
                              f"(not a gw store, or gw serve has not initialised it yet)")
        # A store of the layout before reading_spans (not yet opened by this gw's
        # serve) still has its readings' ts index: one query over the range.
        self.spans = "reading_spans" in tables

    @staticmethod
    def _device_kind(sel: Selection) -> str | None:
        return None if sel.device is None else "glob" if sel.device_is_pattern else "id"

    def _where(self, sel: Selection) -> tuple[str, tuple]:
        kind = self._device_kind(sel)
        if sel.window == "raw":
            params = {None: (sel.start, sel.end), "id": (sel.device, sel.start, sel.end),
                      "glob": (sel.start, sel.end, sel.device)}[kind]
            return self.READINGS_WHERE[kind], params
        params = {None: (sel.window, sel.start, sel.end), "id": (sel.window, sel.device, sel.start, sel.end),
                  "glob": (sel.window, sel.start, sel.end, sel.device)}[kind]
        return self.ROLLUPS_WHERE[kind], params

    @contextmanager
    def snapshot(self):
        self._run("BEGIN")
        try:
            yield self
        finally:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                pass

    def _raw_parts(self, sel: Selection) -> list[tuple[str, tuple]]:
        """A raw range's WHERE clauses and parameters, one per cluster of spans, in time order."""
        where, params = self._where(sel)
        if not self.spans:
            return [(where, params)]
        from gw.pipeline.store import readings_in_range

        try:
            clusters = readings_in_range(self.conn, sel.start, sel.end)
        except sqlite3.Error as exc:
            raise ExportError(f"cannot read the store {self.path}: {exc}") from None
        return [(where + self.READINGS_SPAN, params + c) for c in clusters]

    def count(self, sel: Selection) -> int:
        if sel.window == "raw":
            return sum(self._run(self.READINGS_COUNT + where, params).fetchone()[0]
                       for where, params in self._raw_parts(sel))
        where, params = self._where(sel)
        return self._run(self.ROLLUPS_COUNT + where, params).fetchone()[0]

    def metric_names(self, sel: Selection) -> list[str]:
        kind = self._device_kind(sel)
        sql = self.READINGS_METRICS.format(device=self.METRICS_DEVICE[kind])
        return [r[0] for r in self._run(sql, {"device": sel.device, "start": sel.start, "end": sel.end})]

    def batches(self, sel: Selection, rows: int = CHUNK_ROWS) -> Iterator[ReadingBatch | RollupBatch]:
        if sel.window == "raw":
            for where, params in self._raw_parts(sel):
                yield from self._fetch(self.READINGS + where + self.READINGS_ORDER, params, rows, ReadingBatch)
        else:
            where, params = self._where(sel)
            yield from self._fetch(self.ROLLUPS + where + self.ROLLUPS_ORDER, params, rows, RollupBatch)

    def _fetch(self, sql: str, params: tuple, rows: int, kind) -> Iterator[ReadingBatch | RollupBatch]:
        cur = self._run(sql, params)
        while True:
            try:
                chunk = cur.fetchmany(rows)
            except sqlite3.Error as exc:
                raise ExportError(f"cannot read the store {self.path}: {exc}") from None
            if not chunk:
                return
            yield kind(*zip(*chunk))

    def files(self) -> list[Path]:
        return [self.path.with_name(self.path.name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]

    def _run(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise ExportError(f"cannot read the store {self.path}: {exc}") from None

    def close(self) -> None:
        self.conn.close()


def is_postgresql(store: str) -> bool:
    return store.startswith(("postgresql://", "postgres://"))


def open_source(cfg) -> ReadingSource:
    """The source for the configured store (`store`: `sqlite` or a PostgreSQL URL)."""
    from gw.pipeline.store import STORE_FILE

    store = getattr(cfg, "store", "sqlite") or "sqlite"
    if is_postgresql(store):
        from gw.export_pg import PgSource

        return PgSource(store, getattr(cfg, "store_pg_connect_timeout", 5.0))
    return SqliteSource(Path(cfg.data_dir) / STORE_FILE)


# --- writers -----------------------------------------------------------------------------

def _arrow():
    import pyarrow as pa
    import pyarrow.compute as pc

    return pa, pc


def _timestamps(pa, pc, seconds: list):
    """Unix seconds -> timestamp[us, tz=UTC], to the nearest microsecond (as the
    query API shows them)."""
    micros = pc.round(pc.multiply(pa.array(seconds, pa.float64()), 1e6))
    return pc.cast(micros, pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def _rfc3339_array(pc, stamps):
    return pc.strftime(stamps, format="%Y-%m-%dT%H:%M:%SZ")    # %S carries the microseconds


class _Columns:
    """A batch as an Arrow table of the export's columns, for Parquet and CSV."""

    def __init__(self, sel: Selection, metrics: list[str], text_times: bool):
        self.pa, self.pc = _arrow()
        pa = self.pa
        self.raw = sel.window == "raw"
        self.window = sel.window
        self.metrics = metrics
        self.text_times = text_times
        time_type = pa.string() if text_times else pa.timestamp("us", tz="UTC")
        if self.raw:
            self.tags_type = pa.string() if text_times else pa.map_(pa.string(), pa.string())
            fields = [("device_id", pa.string()), ("ts", time_type), ("seq", pa.int64())]
            fields += [(METRIC_PREFIX + m, pa.float64()) for m in metrics]
            fields += [("tags", self.tags_type), ("payload", pa.string())]
        else:
            fields = [("window", pa.string()), ("bucket", time_type), ("device_id", pa.string()),
                      ("metric", pa.string()), ("count", pa.int64()), ("min", pa.float64()),
                      ("max", pa.float64()), ("mean", pa.float64()), ("std", pa.float64())]
        self.schema = pa.schema(fields)
        self._decode = msgspec.json.Decoder(dict[str, float]).decode
        self._decode_tags = msgspec.json.Decoder(dict[str, str]).decode
        self._tag_cache: dict[str, dict] = {}

    def _tags(self, text: str) -> dict:
        """Tags decoded, remembered by their text: a device's readings mostly repeat theirs."""
        found = self._tag_cache.get(text)
        if found is None:
            if len(self._tag_cache) >= 4096:
                self._tag_cache.clear()
            found = self._tag_cache[text] = self._decode_tags(text)
        return found

    def _times(self, seconds: list):
        stamps = _timestamps(self.pa, self.pc, seconds)
        return _rfc3339_array(self.pc, stamps) if self.text_times else stamps

    def table(self, batch):
        pa = self.pa
        if not self.raw:
            return self._rollups(batch)
        decode = self._decode
        values = [decode(m) for m in batch.metrics]
        columns = [pa.array(batch.device_id, pa.string()), self._times(batch.ts), pa.array(batch.seq, pa.int64())]
        metric_columns = [pa.array([v.get(name) for v in values], pa.float64()) for name in self.metrics]
        # Every value lands in a column: a metric the listing missed is an error, never dropped.
        if sum(len(c) - c.null_count for c in metric_columns) != sum(map(len, values)):
            unknown = sorted({k for v in values for k in v} - set(self.metrics))
            raise ExportError(f"readings hold metrics {', '.join(unknown)} that the store did not list "
                              f"for this range: nothing was written")
        columns += metric_columns
        if self.text_times:
            tags = pa.array(batch.tags, pa.string())
        else:
            tags = pa.array([self._tags(t) for t in batch.tags], self.tags_type)
        columns += [tags, pa.array(batch.payload, pa.string())]
        return pa.Table.from_arrays(columns, schema=self.schema)

    def _rollups(self, batch):
        pa = self.pa
        from gw.query import _moments    # the query API's mean and std: the same figures as its answers

        moments = [_moments(*row) for row in zip(batch.count, batch.sum, batch.sumsq, batch.min, batch.max)]
        columns = [pa.array([self.window] * len(batch), pa.string()), self._times(batch.bucket),
                   pa.array(batch.device_id, pa.string()), pa.array(batch.metric, pa.string()),
                   pa.array(batch.count, pa.int64()), pa.array(batch.min, pa.float64()),
                   pa.array(batch.max, pa.float64()), pa.array([m[0] for m in moments], pa.float64()),
                   pa.array([m[1] for m in moments], pa.float64())]
        return pa.Table.from_arrays(columns, schema=self.schema)


class ParquetOut:
    def __init__(self, fh, sel: Selection, metrics: list[str]):
        import pyarrow.parquet as pq

        self.columns = _Columns(sel, metrics, text_times=False)
        self.writer = pq.ParquetWriter(fh, self.columns.schema, compression="zstd")

    def write(self, batch) -> None:
        self.writer.write_table(self.columns.table(batch), row_group_size=CHUNK_ROWS)

    def close(self) -> None:
        self.writer.close()


class CsvOut:
    def __init__(self, fh, sel: Selection, metrics: list[str]):
        import pyarrow.csv as pcsv

        self.columns = _Columns(sel, metrics, text_times=True)
        self.writer = pcsv.CSVWriter(fh, self.columns.schema)

    def write(self, batch) -> None:
        self.writer.write_table(self.columns.table(batch))

    def close(self) -> None:
        self.writer.close()


class NdjsonOut:
    """One JSON object per line: a reading ({"device_id", "ts", "seq", "metrics",
    "tags", "payload"}) or a window ({"window", "bucket", "device_id", "metric",
    "count", "min", "max", "mean", "std"})."""

    def __init__(self, fh, sel: Selection, metrics: list[str]):
        self.fh = fh
        self.pa, self.pc = _arrow()
        self.window = sel.window
        self.encode = msgspec.json.Encoder().encode
        self._check = msgspec.json.Decoder(dict[str, float]).decode

    def write(self, batch) -> None:
        pa, pc = self.pa, self.pc
        raw = self.window == "raw"
        times = _rfc3339_array(pc, _timestamps(pa, pc, batch.ts if raw else batch.bucket)).to_pylist()
        enc = self.encode
        if raw:
            # metrics, tags and payload are the store's JSON text, put in as it is.
            lines = [b'{"device_id":%s,"ts":"%s","seq":%s,"metrics":%s,"tags":%s,"payload":%s}\n' % (
                enc(dev), t.encode(), b"null" if seq is None else b"%d" % seq, m.encode(), tg.encode(),
                b"null" if pl is None else pl.encode())
                for dev, t, seq, m, tg, pl in zip(batch.device_id, times, batch.seq, batch.metrics,
                                                  batch.tags, batch.payload)]
        else:
            from gw.query import _moments    # the query API's mean and std

            lines = []
            for b, dev, metric, count, low, high, total, squares in zip(
                    times, batch.device_id, batch.metric, batch.count, batch.min, batch.max, batch.sum,
                    batch.sumsq):
                mean, std = _moments(count, total, squares, low, high)
                lines.append(enc({"window": self.window, "bucket": b, "device_id": dev, "metric": metric,
                                  "count": count, "min": low, "max": high, "mean": mean, "std": std}) + b"\n")
        self.fh.write(b"".join(lines))

    def close(self) -> None:
        pass


WRITERS = {"parquet": ParquetOut, "csv": CsvOut, "ndjson": NdjsonOut}


# --- the export --------------------------------------------------------------------------

@dataclass
class Result:
    rows: int
    columns: list[str]


def export(source: ReadingSource, sel: Selection, fmt: str, output: str | Path,
           on_count: Callable[[int], None] | None = None,
           on_batch: Callable[[int], None] | None = None) -> Result:
    """Writes the selection to `output` in `fmt`; `on_count(total)` once the
    rows are counted, `on_batch(rows)` after each batch. The file appears
    complete or not at all."""
    output = Path(output)
    if output.is_dir():
        raise ExportError(f"--output {output} is a directory")
    if output.resolve() in {f.resolve() for f in source.files()}:
        raise ExportError(f"--output {output} is a file of the store itself", 2)
    directory = output.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=directory)   # mode 0600
    except OSError as exc:
        raise ExportError(f"cannot write in {directory}: {exc.strerror or exc}") from None
    done = False
    try:
        with os.fdopen(fd, "wb") as fh, source.snapshot():
            total = source.count(sel)
            if on_count is not None:
                on_count(total)
            metrics = source.metric_names(sel) if sel.window == "raw" and fmt != "ndjson" and total else []
            out = WRITERS[fmt](fh, sel, metrics)
            written = 0
            try:
                for batch in source.batches(sel):
                    out.write(batch)
                    written += len(batch)
                    if on_batch is not None:
                        on_batch(len(batch))
            finally:
                out.close()          # before its file: a writer left open would write to it when collected
            if written != total:
                raise ExportError(f"the store gave {written} rows where it counted {total}: nothing was written")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, output)
        done = True
        _fsync_dir(directory)
    except OSError as exc:
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return Result(written, [METRIC_PREFIX + m for m in metrics])


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
