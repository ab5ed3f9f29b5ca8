"""The query API's store side on PostgreSQL (`store = postgresql://...`).

gw/query.py's `Query` answers the routes (parsing, paging, the answers'
types); this subclass only reads them from PostgreSQL instead of SQLite: each
of query.py's statements has its PostgreSQL twin here (`PG_SQL`), returning the
same columns (times as Unix seconds, JSON columns as text), so both stores
answer alike (tests/test_query_api.py runs against both).

- One connection per query thread, opened on first use and kept; every
  statement runs in its own read-only transaction (autocommit with
  `default_transaction_read_only`), so no transaction stays open between requests.
- `statement_timeout` is the query budget (250 ms): a statement running over it
  is cancelled by the server, 503 `query_timeout`.
- The alert acknowledgement is the one write: a read-write transaction with a
  100 ms `lock_timeout` (503 `store_busy` when the row stays locked).
- A database that cannot be reached, or that has no gw schema yet (the pipeline
  creates it), answers 503 `store_unavailable`; logged once (and once more when
  it answers again); the connection is tried again at most once a second.
"""

from __future__ import annotations

import logging
import time

from gw import query as q
from gw.pipeline.pgstore import describe_url
from gw.query import StoreError

log = logging.getLogger("gw.query")

_EPOCH = "extract(epoch FROM {})::float8"
_DEVICE_COLUMNS = (f"device_id, {_EPOCH.format('first_seen')}, {_EPOCH.format('last_seen')}, last_values::text, "
                   "tags::text, readings")
_ALERT_COLUMNS = (f"id, device_id, metric, {_EPOCH.format('ts')}, value, zscore, mean, std, state, "
                  f"{_EPOCH.format('created')}, {_EPOCH.format('acked')}")

# query.py's statement -> the same question in PostgreSQL (same parameters, same columns).
PG_SQL = {
    q.SQL_DEVICE: f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = %s",
    q.SQL_DEVICE_EXISTS: "SELECT 1 FROM devices WHERE device_id = %s",
    q.SQL_DEVICES: f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id > %s ORDER BY device_id LIMIT %s",
    q.SQL_ALERT: f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id = %s",
    q.SQL_ALERTS[False, False]: f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id < %s ORDER BY id DESC LIMIT %s",
    q.SQL_ALERTS[True, False]: (f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id < %s AND device_id = %s "
                                "ORDER BY id DESC LIMIT %s"),
    q.SQL_ALERTS[False, True]: (f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id < %s AND state = %s "
                                "ORDER BY id DESC LIMIT %s"),
    q.SQL_ALERTS[True, True]: (f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id < %s AND device_id = %s "
                               "AND state = %s ORDER BY id DESC LIMIT %s"),
    q.SQL_ACK: "UPDATE alerts SET state = 'acked', acked = to_timestamp(%s) WHERE id = %s AND state = 'open'",
}

# A series' points: the embedded store reads its sample chunks and probes its rollup
# key per bucket (Query._series_rows); PostgreSQL keeps one row per sample and per
# rollup bucket, each served by its primary key's range.
PG_RAW = (f"SELECT {_EPOCH.format('ts')}, value FROM samples WHERE device_id = %s AND metric = %s "
          "AND ts >= to_timestamp(%s) AND ts < to_timestamp(%s) ORDER BY ts LIMIT %s")
PG_ROLLUP = (f"SELECT {_EPOCH.format('bucket')}, count, min, max, sum, sumsq FROM rollups WHERE win = %s "
             "AND device_id = %s AND metric = %s AND bucket >= to_timestamp(%s) AND bucket < to_timestamp(%s) "
             "ORDER BY bucket LIMIT %s")

CONNECT_TIMEOUT = 2          # seconds (libpq's least)


class PgQuery(q.Query):
    """query.py's Query over a PostgreSQL store; one per query thread."""

    def __init__(self, url: str, *, now=time.time):
        super().__init__(None, now=now)
        self.url = url
        self.path = describe_url(url)          # what messages show: never the password
        self._conn = None

    # --- statements -------------------------------------------------------------------------

    def _series_rows(self, device_id: str, metric: str, window: str, start: float, to: float,
                     limit: int) -> list:
        if window == "raw":
            return self._read_pg(PG_RAW, (device_id, metric, start, to, limit))
        return self._read_pg(PG_ROLLUP, (window, device_id, metric, start, to, limit))

    def _read(self, sql: str, params) -> list:
        return self._read_pg(PG_SQL[sql], params)

    def _read_pg(self, statement: str, params) -> list:
        import psycopg
        conn = self._connection()
        try:
            rows = conn.execute(statement, tuple(params)).fetchall()
        except psycopg.Error as exc:
            raise self._pg_failure(exc) from None
        if self._broken:
            self._broken = False
            log.warning("query store %s is readable again", self.path)
        return rows

    def _write(self, sql: str, params) -> None:
        import psycopg
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION READ WRITE")
                conn.execute(f"SET LOCAL lock_timeout = {int(self.write_timeout * 1000)}")
                conn.execute(PG_SQL[sql], tuple(params))
        except psycopg.Error as exc:
            raise self._pg_failure(exc, write=True) from None

    # --- the connection ------------------------------------------------------------------------

    def _connection(self):
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.close()
        if time.monotonic() < self._retry_at:
            raise StoreError("store_unavailable", self._failure_message)
        import psycopg
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                   application_name="gw-query",
                                   options=f"-c default_transaction_read_only=on "
                                           f"-c statement_timeout={int(self.budget * 1000)}")
        except psycopg.Error as exc:
            raise self._pg_failure(exc) from None
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = getattr(self, "_conn", None), None
        if conn is not None:
            try:
                conn.close()
            except Exception:          # noqa: BLE001  (closing a broken connection)
                pass

    def _pg_failure(self, exc, *, write: bool = False) -> StoreError:
        from psycopg import errors
        if isinstance(exc, errors.LockNotAvailable):
            return StoreError("store_busy", "the alert is locked by another writer; retry")
        if isinstance(exc, errors.QueryCanceled):
            self._warn("query cancelled after %d ms (the budget)", int(self.budget * 1000))
            return StoreError("query_timeout", f"the query ran over {int(self.budget * 1000)} ms and was "
                                               "stopped; narrow the range or lower the limit")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, errors.UndefinedTable):
            message = "the store has no tables yet: the pipeline creates them"
        elif write:
            message = f"the store cannot be written: {first}"
        else:
            message = f"the store cannot be read: {first}"
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self.close()          # unusable: connected again at most once a retry interval
            self._retry_at = time.monotonic() + self.retry_interval
            self._failure_message = message
        if not self._broken:
            self._broken = True
            log.error("query store %s: %s (%s); answering 503 store_unavailable until it answers "
                      "(logged once)", self.path, first, type(exc).__name__)
        return StoreError("store_unavailable", message)
