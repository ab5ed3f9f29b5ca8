"""`gw export`'s reader for a PostgreSQL store (`store = postgresql://...`).

The same contract as `SqliteSource` (gw/export.py), read from the schema of
gw/pipeline/pgstore.py, so the writers get the same columns and types from
either store and write the same files:

- One `REPEATABLE READ READ ONLY` transaction for the whole export: the count,
  the metric names and the rows come from one snapshot, whatever the pipeline
  commits meanwhile.
- Rows stream through a server-side (named) cursor in batches of
  `CHUNK_ROWS`, in the SQLite source's order: (ts, device_id, worker, lsn) for
  readings, (bucket, device_id, metric) for rollups (the columns are
  `COLLATE "C"`: byte order, as SQLite's). The time range is compared with the
  partition key (`ts`, `bucket`) as constants, so only the range's day
  partitions are read.
- Times are Unix seconds (float8), as the SQLite store keeps them; `metrics`,
  `tags` and `payload` are `jsonb` there, given to the writers as compact JSON
  text as the embedded store holds it (jsonb keeps its own order of an
  object's keys: shortest first, then bytewise).
- A device pattern (`*`, `?`) becomes a `LIKE` with every other wildcard of
  LIKE escaped.
- Messages name the database by `describe_url`: never its password.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

import msgspec

from gw.export import CHUNK_ROWS, ExportError, ReadingBatch, ReadingSource, RollupBatch, Selection
from gw.pipeline.pgstore import SCHEMA_VERSION, describe_url

UTC = timezone.utc
# Memory a sort of the range may take before it spills to disk: readings have no
# index on ts alone (the sink's COPY stays cheap), so the range is sorted.
SORT_MEMORY = "64MB"
CURSOR = "gw_export"
_EPOCH = "extract(epoch FROM {})::float8"


def like_pattern(glob: str) -> str:
    """A device pattern (`*` any run, `?` one character) as a LIKE pattern with
    `\\` as its escape: LIKE's own wildcards (`%`, `_`) and the escape match
    only themselves."""
    out = []
    for ch in glob:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


class PgSource(ReadingSource):
    """A PostgreSQL store through one connection; every statement the export
    runs against it is here."""

    READINGS = (f"SELECT device_id, {_EPOCH.format('ts')}, seq, metrics::text, tags::text, payload::text "
                "FROM readings")
    READINGS_COUNT = "SELECT count(*) FROM readings"
    READINGS_ORDER = " ORDER BY ts, device_id, worker, lsn"
    # As on SQLite: the keys of each device's last_values, kept where the device has a
    # sample of that metric in the range: one seek in samples_device_metric_ts each (a
    # LATERAL with LIMIT stays a nested loop of seeks; an EXISTS may become a hash join
    # over every sample of the range).
    READINGS_METRICS = ("SELECT DISTINCT k.key FROM devices d CROSS JOIN LATERAL jsonb_object_keys(d.last_values) "
                        "AS k(key) CROSS JOIN LATERAL (SELECT 1 FROM samples s WHERE s.device_id = d.device_id "
                        "AND s.metric = k.key AND s.ts >= %(start)s AND s.ts < %(end)s LIMIT 1) AS present{device}")
    METRICS_DEVICE = {None: "", "id": " WHERE d.device_id = %(device)s",
                      "like": " WHERE d.device_id LIKE %(device)s ESCAPE '\\'"}
    ROLLUPS = (f"SELECT {_EPOCH.format('bucket')}, device_id, metric, count, min, max, sum, sumsq "
               "FROM rollups")
    ROLLUPS_COUNT = "SELECT count(*) FROM rollups"
    ROLLUPS_ORDER = " ORDER BY bucket, device_id, metric"
    READINGS_WHERE = {
        None: " WHERE ts >= %(start)s AND ts < %(end)s",
        "id": " WHERE ts >= %(start)s AND ts < %(end)s AND device_id = %(device)s",
        "like": " WHERE ts >= %(start)s AND ts < %(end)s AND device_id LIKE %(device)s ESCAPE '\\'",
    }
    ROLLUPS_WHERE = {
        None: " WHERE win = %(window)s AND bucket >= %(start)s AND bucket < %(end)s",
        "id": " WHERE win = %(window)s AND bucket >= %(start)s AND bucket < %(end)s AND device_id = %(device)s",
        "like": " WHERE win = %(window)s AND bucket >= %(start)s AND bucket < %(end)s "
                "AND device_id LIKE %(device)s ESCAPE '\\'",
    }

    def __init__(self, url: str, connect_timeout: float = 5.0):
        self.where = describe_url(url)          # what messages show: never the password
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise ExportError("a PostgreSQL store needs psycopg 3 (pip install 'psycopg[binary]')") from None
        try:
            self._secret = conninfo_to_dict(url).get("password") or ""
        except psycopg.Error:
            # libpq's message quotes the part it could not read: it may be the password.
            raise ExportError("the store's URL does not parse: give postgresql://USER[:PASSWORD]@HOST:PORT/DBNAME "
                              "(characters such as @, : and / in the password percent-encoded)", 2) from None
        self._psycopg = psycopg
        try:
            self.conn = psycopg.connect(url, connect_timeout=max(1, round(connect_timeout)),
                                        application_name="gw-export")
        except psycopg.Error as exc:
            raise ExportError(f"cannot connect to the store {self.where}: {self._first_line(exc)}") from None
        self.conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.conn.read_only = True
        try:
            with self.conn.transaction():
                have = {t for t in ("meta", "readings", "samples", "rollups", "devices")
                        if self.conn.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] is not None}
                version = (self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                           if "meta" in have else None)
        except psycopg.Error as exc:
            self.close()
            raise ExportError(f"cannot read the store {self.where}: {self._first_line(exc)}") from None
        missing = {"meta", "readings", "samples", "rollups", "devices"} - have
        if missing:
            self.close()
            raise ExportError(f"the store {self.where} has no {' or '.join(sorted(missing))} table "
                              f"(not a gw store, or gw serve has not initialised it yet)")
        if version is None or version[0] != str(SCHEMA_VERSION):
            self.close()
            raise ExportError(f"the store {self.where} has gw schema version "
                              f"{None if version is None else version[0]!r}; this gw reads version "
                              f"{SCHEMA_VERSION} only")
        self._compact = msgspec.json.format

    def _first_line(self, exc: Exception) -> str:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        # libpq does not quote passwords in its messages; this keeps it so whatever it says.
        return text.replace(self._secret, "***") if self._secret else text

    @staticmethod
    def _params(sel: Selection) -> tuple[str | None, dict]:
        kind = None if sel.device is None else "like" if sel.device_is_pattern else "id"
        device = like_pattern(sel.device) if kind == "like" else sel.device
        # Constants of the partition key's type: the plan reads only the range's partitions.
        return kind, {"start": datetime.fromtimestamp(sel.start, UTC), "end": datetime.fromtimestamp(sel.end, UTC),
                      "device": device, "window": sel.window}

    @contextmanager
    def snapshot(self):
        try:
            with self.conn.transaction():
                self.conn.execute(f"SET LOCAL work_mem = '{SORT_MEMORY}'")
                # The metric listing's estimate (every device times every key) would make the
                # server compile it: time spent for a few thousand index seeks.
                self.conn.execute("SET LOCAL jit = off")
                yield self
        except self._psycopg.Error as exc:
            raise ExportError(f"cannot read the store {self.where}: {self._first_line(exc)}") from None

    def count(self, sel: Selection) -> int:
        kind, params = self._params(sel)
        if sel.window == "raw":
            sql = self.READINGS_COUNT + self.READINGS_WHERE[kind]
        else:
            sql = self.ROLLUPS_COUNT + self.ROLLUPS_WHERE[kind]
        return self._run(sql, params).fetchone()[0]

    def metric_names(self, sel: Selection) -> list[str]:
        kind, params = self._params(sel)
        rows = self._run(self.READINGS_METRICS.format(device=self.METRICS_DEVICE[kind]), params).fetchall()
        return sorted(r[0] for r in rows)           # code point order: SQLite's BINARY, COLLATE "C"

    def batches(self, sel: Selection, rows: int = CHUNK_ROWS) -> Iterator[ReadingBatch | RollupBatch]:
        kind, params = self._params(sel)
        raw = sel.window == "raw"
        if raw:
            sql = self.READINGS + self.READINGS_WHERE[kind] + self.READINGS_ORDER
        else:
            sql = self.ROLLUPS + self.ROLLUPS_WHERE[kind] + self.ROLLUPS_ORDER
        cur = self.conn.cursor(name=CURSOR)
        try:
            try:
                cur.itersize = rows
                cur.execute(sql, params)
            except self._psycopg.Error as exc:
                raise ExportError(f"cannot read the store {self.where}: {self._first_line(exc)}") from None
            compact = self._compact
            while True:
                try:
                    chunk = cur.fetchmany(rows)
                except self._psycopg.Error as exc:
                    raise ExportError(f"cannot read the store {self.where}: {self._first_line(exc)}") from None
                if not chunk:
                    return
                if not raw:
                    yield RollupBatch(*zip(*chunk))
                    continue
                device_id, ts, seq, metrics, tags, payload = zip(*chunk)
                # jsonb's text has a space after every ':' and ','; the embedded store's has none.
                yield ReadingBatch(device_id, ts, seq, [compact(m, indent=-1) for m in metrics],
                                   [compact(t, indent=-1) for t in tags],
                                   [None if p is None else compact(p, indent=-1) for p in payload])
        finally:
            try:
                cur.close()
            except self._psycopg.Error:
                pass

    def _run(self, sql: str, params: dict):
        try:
            return self.conn.execute(sql, params)
        except self._psycopg.Error as exc:
            raise ExportError(f"cannot read the store {self.where}: {self._first_line(exc)}") from None

    def close(self) -> None:
        conn, self.conn = getattr(self, "conn", None), None
        if conn is not None:
            try:
                conn.close()
            except Exception:          # noqa: BLE001  (closing a broken connection)
                pass

