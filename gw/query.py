"""The query API's store side: devices, metric series and alerts, read from the
pipeline's SQLite store (`data_dir/store.sqlite`, WAL mode).

gw/http_api.py routes the requests (`/v1/devices...`, `/v1/alerts...`) here;
this module parses their query strings, runs bounded queries and returns
msgspec structs (their JSON Schemas are the OpenAPI document's, gw/openapi.py),
or raises `Invalid` (400/404, from gw/ingest.py) or `StoreError` (503).

The pipeline process is the store's writer and owns its schema (a contract;
gw/pipeline/store.py, schema version 2):

    series          (id PK, device_id, metric)                             UNIQUE (device_id, metric)
    sample_chunks   (series, t0, t1, n, ts, value)   a series' samples, JSON arrays, within one hour
                                                     INDEX (series, t0)
    rollup          (win, bucket, series, count, min, max, sum, sumsq)    PK (win, bucket, series)
    devices         (device_id PK, first_seen, last_seen, last_values, tags, readings)
    alerts          (id PK AUTOINCREMENT, device_id, metric, ts, value, zscore, mean, std, state, created, acked)
    readings, checkpoints, meta; views samples and rollups (the logical tables)

Every read is a range scan of a primary key or index (or a key look-up) with a
LIMIT, so its cost is bounded by the rows it returns: a raw range reads the
series' chunks in time order, page by page, until it holds `limit` + 1 points
before the next chunk's start; a window range probes the rollup key of each
bucket of the range (the table is ordered by bucket first, for its writer). The worker runs the queries in
its query threads (gw/query_pool.py; one `Query` per thread), or with
`query_threads = 0` in its event loop, so also:

- one read-only connection per query thread (`file:...?mode=ro`, `PRAGMA
  query_only`), opened on first use and kept; sqlite3's statement cache reuses
  the prepared statements (the SQL strings are constants);
- a short busy timeout on reads (25 ms; WAL readers are rarely blocked) and a
  progress handler that interrupts any statement running over 250 ms
  (`query_timeout`, 503) so no query holds a thread (or the loop) for long;
- every cursor is read to its end (`fetchall`), so no read transaction stays
  open between requests (it would pin the WAL and stop its checkpoints).

The store may not exist yet (the pipeline creates it): every request then
answers 503 `store_unavailable`, and the file is looked for again on the next
request (one `stat`). The same `stat` notices a store that was replaced or
removed. A store that cannot be read (not a database, corrupt, no schema yet)
closes the connection, answers 503 `store_unavailable`, is logged once (and
once more when it is readable again), and is reopened at most once a second.

The only write is the acknowledgement of an alert: a short-lived read-write
connection (`mode=rw`: never creates the store; `synchronous = NORMAL`: no fsync
per acknowledgement) with a 100 ms busy timeout, opened only when the alert is
still open; a store that stays locked longer answers 503 `store_busy`
(Retry-After).
"""

from __future__ import annotations

import logging
import math
import operator
import os
import re
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Callable, Literal
from urllib.parse import quote, unquote_to_bytes

import msgspec
from msgspec import Meta, Struct, field

from gw.ingest import KEY_PATTERN, TS_MAX, DeviceId, Invalid, _show, check_path_device_id

log = logging.getLogger("gw.query")

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STORE_FILE = "store.sqlite"
MAX_ID = 2**63 - 1

DAY = 86400
WINDOWS = {"raw": 0, "1m": 60, "1h": 3600, "1d": DAY}
DEFAULT_SPAN = {"raw": 3600, "1m": 3600, "1h": DAY, "1d": 30 * DAY}           # from = to - this
MAX_SPAN = {"raw": DAY, "1m": 7 * DAY, "1h": 366 * DAY, "1d": 3653 * DAY}     # to - from at most

DEVICES_LIMIT = (100, 1000)         # (default, maximum)
ALERTS_LIMIT = (100, 1000)
POINTS_LIMIT = (10000, 10000)

READ_BUSY_TIMEOUT = 0.025           # seconds a read waits for a lock (rare in WAL mode)
WRITE_BUSY_TIMEOUT = 0.1            # seconds the acknowledgement waits for the pipeline's write lock
QUERY_BUDGET = 0.25                 # seconds a statement may run before it is interrupted
PROGRESS_STEPS = 1000               # SQLite VM steps between two looks at the clock
RETRY_INTERVAL = 1.0                # seconds before an unreadable store is opened again

# Every error code of the query routes (status, description).
CODES = {
    "unknown_parameter": (400, "a query parameter the route does not take (typo?)"),
    "invalid_parameter": (400, "a query parameter given twice, or not valid UTF-8 once percent-decoded"),
    "invalid_device_id": (400, "the device id (path or parameter) does not match ^[A-Za-z0-9_-]{1,64}$"),
    "invalid_limit": (400, "limit is not an integer in [1, the route's maximum]"),
    "invalid_after": (400, "the paging cursor `after` is not a device id (devices) or an alert id (alerts)"),
    "missing_metric": (400, "the metric parameter is required"),
    "invalid_metric": (400, f"metric does not match {KEY_PATTERN}"),
    "invalid_window": (400, "window is not one of raw, 1m, 1h, 1d"),
    "invalid_time": (400, "from or to is neither an RFC 3339 date-time with a time zone nor Unix seconds, "
                          f"or is outside [1970-01-01, 10000-01-01) (Unix seconds in [0, {TS_MAX}))"),
    "invalid_range": (400, "from is after to"),
    "range_too_large": (400, "to - from is over the window's limit (raw 1 day, 1m 7 days, 1h 366 days, "
                             "1d 3653 days)"),
    "invalid_state": (400, "state is not open or acked"),
    "invalid_alert_id": (400, f"the alert id is not an integer in [1, {MAX_ID}]"),
    "unknown_device": (404, "the store has never seen this device"),
    "unknown_alert": (404, "no alert has this id"),
    "store_unavailable": (503, "the store does not exist yet (the pipeline creates it) or cannot be read"),
    "store_busy": (503, "the store stayed locked by its writer; retry after Retry-After seconds"),
    "query_timeout": (503, f"the query ran over {int(QUERY_BUDGET * 1000)} ms and was stopped; narrow it"),
    "queries_busy": (503, "too many store queries wait in this worker (query_max_pending); retry after "
                          "Retry-After seconds"),
}


class StoreError(Exception):
    """The store cannot answer now (503 with Retry-After): code and message."""

    __slots__ = ("code", "message")

    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message


# --- types (the OpenAPI document's schemas) -----------------------------------------------

Time = Annotated[datetime, Meta(tz=True, description="RFC 3339 in UTC (Z)", examples=["2025-09-23T11:18:41Z"])]
AlertId = Annotated[int, Meta(ge=1, le=MAX_ID, description="the alert's id", examples=[17])]


class Device(Struct, forbid_unknown_fields=True):
    """A device the pipeline has stored readings of."""

    device_id: DeviceId
    first_seen: Annotated[datetime, Meta(tz=True, description="its first reading's time, RFC 3339 in UTC")]
    last_seen: Annotated[datetime, Meta(tz=True, description="its latest reading's time, RFC 3339 in UTC")]
    last_values: Annotated[dict[str, Any], Meta(description="the latest value of each of its metrics",
                                                examples=[{"temp_c": 21.5}])]
    tags: Annotated[dict[str, Any], Meta(description="its tags", examples=[{"site": "AAL"}])]
    readings: Annotated[int, Meta(ge=0, description="readings stored")]


class DeviceList(Struct, forbid_unknown_fields=True):
    """GET /v1/devices: a page of devices in device id order."""

    devices: list[Device]
    next: Annotated[DeviceId | None, Meta(
        description="more devices follow: pass this as `after` for the next page; null on the last page")]


class RawPoint(Struct, forbid_unknown_fields=True):
    """One stored sample."""

    ts: Time
    value: float


class WindowPoint(Struct, forbid_unknown_fields=True):
    """One window of samples: its start and the statistics of its values."""

    ts: Annotated[datetime, Meta(tz=True, description="the window's start, RFC 3339 in UTC")]
    count: Annotated[int, Meta(ge=1, description="samples in the window")]
    min: float
    max: float
    mean: Annotated[float | None, Meta(description="null only if the sum overflows a double")]
    std: Annotated[Annotated[float, Meta(ge=0)] | None, Meta(
        description="population standard deviation; null only if the sum of squares overflows a double")]


_FROM = Annotated[datetime, Meta(tz=True, description="start of the range (included), RFC 3339 in UTC")]
_TO = Annotated[datetime, Meta(tz=True, description="end of the range (excluded), RFC 3339 in UTC")]
_NEXT = Annotated[Annotated[datetime, Meta(tz=True)] | None, Meta(
    description="more points follow: pass this as `from` (with the same `to`) for the next page; "
                         "null on the last page")]


class RawSeries(Struct, forbid_unknown_fields=True):
    """GET /v1/devices/{device_id}/metrics with window raw: the stored samples in time order."""

    device_id: DeviceId
    metric: str
    window: Literal["raw"]
    from_: _FROM = field(name="from")
    to: _TO
    points: list[RawPoint]
    next: _NEXT


class WindowSeries(Struct, forbid_unknown_fields=True):
    """GET /v1/devices/{device_id}/metrics with window 1m, 1h or 1d: the windows whose start
    is in the range, in time order."""

    device_id: DeviceId
    metric: str
    window: Literal["1m", "1h", "1d"]
    from_: _FROM = field(name="from")
    to: _TO
    points: list[WindowPoint]
    next: _NEXT


class Alert(Struct, forbid_unknown_fields=True):
    """An anomaly the pipeline found: a value far (zscore) from its metric's recent mean."""

    id: AlertId
    device_id: DeviceId
    metric: str
    ts: Annotated[datetime, Meta(tz=True, description="the reading's time, RFC 3339 in UTC")]
    value: float
    zscore: float
    mean: float
    std: float
    state: Literal["open", "acked"]
    created: Annotated[datetime, Meta(tz=True, description="when the alert was raised, RFC 3339 in UTC")]
    acked: Annotated[Annotated[datetime, Meta(tz=True)] | None, Meta(
        description="when it was acknowledged (RFC 3339 in UTC); null while open")]


class AlertList(Struct, forbid_unknown_fields=True):
    """GET /v1/alerts: a page of alerts, newest (highest id) first."""

    alerts: list[Alert]
    next: Annotated[AlertId | None, Meta(
        description="more alerts follow: pass this as `after` for the next page; null on the last page")]


TYPES = (Device, DeviceList, RawPoint, WindowPoint, RawSeries, WindowSeries, Alert, AlertList)


# --- SQL (constant strings: sqlite3's statement cache keeps them prepared) ----------------

_DEVICE_COLUMNS = "device_id, first_seen, last_seen, last_values, tags, readings"
SQL_DEVICE = f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?"
SQL_DEVICE_EXISTS = "SELECT 1 FROM devices WHERE device_id = ?"
SQL_DEVICES = f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id > ? ORDER BY device_id LIMIT ?"
SQL_SERIES = "SELECT id FROM series WHERE device_id = ? AND metric = ?"
# A series' sample chunks from a time on, in (t0, rowid) order, a page at a time: a chunk
# never spans an hour boundary, so a range's first chunk starts at or after its hour.
SQL_RAW = ("SELECT t0, rowid, t1, ts, value FROM sample_chunks WHERE series = ?1 AND t0 < ?4 "
           "AND (t0, rowid) > (?2, ?3) ORDER BY t0, rowid LIMIT ?5")
RAW_CHUNK_PAGE = 64
CHUNK_SECONDS = 3600.0          # gw/pipeline/store.py's (tests/test_store.py holds them equal)
# One probe of the rollup key per bucket of the range (the buckets from the first at or
# after `from`, step the window's width, before `to`), in bucket order.
SQL_ROLLUP = ("WITH RECURSIVE b(x) AS (SELECT ?1 WHERE ?1 < ?3 UNION ALL SELECT x + ?2 FROM b WHERE x + ?2 < ?3) "
              "SELECT r.bucket, r.count, r.min, r.max, r.sum, r.sumsq FROM b CROSS JOIN rollup r "
              "ON r.win = ?4 AND r.bucket = b.x AND r.series = "
              "(SELECT id FROM series WHERE device_id = ?5 AND metric = ?6) LIMIT ?7")
_ALERT_COLUMNS = "id, device_id, metric, ts, value, zscore, mean, std, state, created, acked"
SQL_ALERT = f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id = ?"
# Alerts come newest first by id, from the primary key: a scan from the newest down that stops
# after `limit` matches. `+state` keeps an index on state (the pipeline has one, on (state, ts))
# from being used for the state filter: it would read every alert in that state (most of them are
# acked) and sort them all by id. An index on device_id may serve the device filter: one device's
# alerts, then sorted.
SQL_ALERTS = {   # (by device, by state) -> statement; parameters: after, [device_id], [state], limit
    (False, False): f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id < ? ORDER BY id DESC LIMIT ?",
    (True, False): f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id < ? AND device_id = ? "
                   "ORDER BY id DESC LIMIT ?",
    (False, True): f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id < ? AND +state = ? ORDER BY id DESC LIMIT ?",
    (True, True): f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id < ? AND device_id = ? AND +state = ? "
                  "ORDER BY id DESC LIMIT ?",
}
SQL_ACK = "UPDATE alerts SET state = 'acked', acked = ? WHERE id = ? AND state = 'open'"


# --- query strings -------------------------------------------------------------------------

_KEY_RE = re.compile(KEY_PATTERN[1:-1])
_DEVICE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INT_RE = re.compile(r"[0-9]{1,19}")
_ALERT_ID_RE = re.compile(rb"[0-9]{1,19}")
_NUMBER_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TIME_TYPE = Annotated[datetime, Meta(tz=True)]
_OBJECT = msgspec.json.Decoder(dict[str, Any])
_FLOATS = msgspec.json.Decoder(list[float])
_TS = operator.itemgetter(0)

DEVICES_PARAMS = frozenset(("limit", "after"))
DEVICE_PARAMS: frozenset[str] = frozenset()
SERIES_PARAMS = frozenset(("metric", "window", "from", "to", "limit"))
ALERTS_PARAMS = frozenset(("device_id", "state", "limit", "after"))


def parse_query(raw: bytes, allowed: frozenset[str]) -> dict[str, str]:
    """The parameters of a query string: `name=value` pairs split on `&`,
    percent-decoded (UTF-8). A `+` stays a plus sign (so `+02:00` in a time
    needs no encoding; no parameter value has spaces). Unknown names and
    repeated ones are refused: a typo would otherwise be ignored silently."""
    params: dict[str, str] = {}
    if not raw:
        return params
    for part in raw.split(b"&"):
        if not part:
            continue
        rname, _, rvalue = part.partition(b"=")
        try:
            name = unquote_to_bytes(rname).decode("utf-8")
            value = unquote_to_bytes(rvalue).decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("invalid_parameter", f"parameter {_show(part.decode('utf-8', 'replace'))} is not "
                                               "valid UTF-8 once percent-decoded") from None
        if name not in allowed:
            names = ", ".join(sorted(allowed)) if allowed else "none"
            raise Invalid("unknown_parameter", f"unknown parameter {_show(name)}; this route takes: {names}")
        if name in params:
            raise Invalid("invalid_parameter", f"parameter {name} is given twice")
        params[name] = value
    return params


def parse_limit(params: dict[str, str], bounds: tuple[int, int]) -> int:
    default, maximum = bounds
    raw = params.get("limit")
    if raw is None:
        return default
    if _INT_RE.fullmatch(raw) is None or not 1 <= int(raw) <= maximum:
        raise Invalid("invalid_limit", f"limit must be an integer in [1, {maximum}], got {_show(raw)}")
    return int(raw)


def parse_time(name: str, raw: str) -> float:
    """`from`/`to`: Unix seconds, or an RFC 3339 date-time with a time zone, in
    [1970-01-01, 10000-01-01) like ingest's `ts`. Returns Unix seconds."""
    try:
        if _NUMBER_RE.fullmatch(raw) is not None:
            value = float(raw)
        else:
            value = msgspec.convert(raw, _TIME_TYPE).timestamp()
    except (msgspec.ValidationError, OverflowError, ValueError):
        value = None
    if value is None or not 0 <= value < TS_MAX:
        raise Invalid("invalid_time", f"{name} {_show(raw)} is neither an RFC 3339 date-time with a time zone "
                                      f"(such as 2025-09-23T11:18:41Z) nor Unix seconds in [0, {TS_MAX})")
    return value


def parse_alert_id(raw: bytes) -> int:
    if _ALERT_ID_RE.fullmatch(raw) is None or not 1 <= int(raw) <= MAX_ID:
        raise Invalid("invalid_alert_id", f"alert id {_show(raw.decode('utf-8', 'replace'))} is not an "
                                          f"integer in [1, {MAX_ID}]")
    return int(raw)


def _dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _cursor(seconds: float) -> tuple[datetime, float]:
    """The paging cursor for a point at `seconds`: that time floored to the
    microsecond (what RFC 3339 shows), and the Unix seconds that text parses
    back to, never above `seconds`, so the next page (`ts >= cursor`) starts
    with that point and skips none."""
    micros = math.floor(seconds * 1e6)
    while True:
        at = EPOCH + timedelta(microseconds=micros)
        back = at.timestamp()
        if back <= seconds:
            return at, back
        micros -= 1


def _moments(count: int, total: float, squares: float, low: float, high: float) -> tuple[float | None, float | None]:
    """Mean and population standard deviation of a window from its count, sum,
    sum of squares, min and max. The sums carry rounding (a constant series can
    give a variance of -1e-18 or a std of 5e-9), so a negative variance is 0, a
    window whose min equals its max has exactly its value and std 0, and the
    results are kept within their bounds (min <= mean <= max, std <= (max - min) / 2)."""
    if low == high:
        return low, 0.0
    mean = total / count
    var = squares / count - mean * mean            # nan or inf when the sums overflowed
    if var < 0.0:
        var = 0.0
    std = min(math.sqrt(var), (high - low) / 2) if var < math.inf else None
    return (min(max(mean, low), high) if math.isfinite(mean) else None), std


# --- the store ---------------------------------------------------------------------------

class Query:
    """One per query thread of a worker (HttpApp creates it on the thread's first
    query; one in the loop with query_threads = 0). Not shared between threads.
    Methods take the raw path parts and query string and return a struct, or
    raise Invalid (400/404) or StoreError (503). `now` gives Unix seconds."""

    def __init__(self, data_dir: str | os.PathLike | None, *, now=time.time):
        self.path = None if data_dir is None else os.path.abspath(os.path.join(os.fspath(data_dir), STORE_FILE))
        self.now = now
        self.budget = QUERY_BUDGET
        self.retry_interval = RETRY_INTERVAL
        self.write_timeout = WRITE_BUSY_TIMEOUT
        self._ro: sqlite3.Connection | None = None
        self._ident: tuple[int, int] | None = None
        self._deadline = 0.0
        self._stamp: tuple | None = None          # the file's (dev, inode, size, mtime) when last opened
        self._failed_stamp: tuple | None = None   # ... when it last failed: retried at once if it changed
        self._retry_at = 0.0
        self._failure_message = ""
        self._broken = False          # logged as unreadable; logged again once it reads
        self._bad_data_logged = False
        self._last_warning = 0.0
        if self.path is not None:
            uri = "file:" + quote(self.path)
            self._ro_uri = uri + "?mode=ro"
            self._rw_uri = uri + "?mode=rw"

    # --- routes ---------------------------------------------------------------------------

    def devices(self, query: bytes) -> DeviceList:
        params = parse_query(query, DEVICES_PARAMS)
        limit = parse_limit(params, DEVICES_LIMIT)
        after = params.get("after")
        if after is None:
            after = ""                # every id is after it
        elif _DEVICE_RE.fullmatch(after) is None:
            raise Invalid("invalid_after", f"after {_show(after)} is not a device id (the `next` of a page)")
        devices, last = self._page(SQL_DEVICES, [after], limit, self._device)
        return DeviceList(devices, last.device_id if last is not None else None)

    def device(self, raw_id: bytes, query: bytes) -> Device:
        device_id = check_path_device_id(raw_id)
        parse_query(query, DEVICE_PARAMS)
        rows = self._read(SQL_DEVICE, (device_id,))
        if not rows:
            raise _unknown_device(device_id)
        return self._device(rows[0])

    def series(self, raw_id: bytes, query: bytes) -> RawSeries | WindowSeries:
        device_id = check_path_device_id(raw_id)
        params = parse_query(query, SERIES_PARAMS)
        metric = params.get("metric")
        if metric is None:
            raise Invalid("missing_metric", "the metric parameter is required (the device's metrics are "
                                            "the keys of its last_values, GET /v1/devices/{device_id})")
        if _KEY_RE.fullmatch(metric) is None:
            raise Invalid("invalid_metric", f"metric {_show(metric)} does not match {KEY_PATTERN}")
        window = params.get("window", "raw")
        if window not in WINDOWS:
            raise Invalid("invalid_window", f"window must be raw, 1m, 1h or 1d, got {_show(window)}")
        limit = parse_limit(params, POINTS_LIMIT)
        to = parse_time("to", params["to"]) if "to" in params else self.now()
        if "from" in params:
            start = parse_time("from", params["from"])
        else:
            start = max(0.0, to - DEFAULT_SPAN[window])
        if start > to:
            raise Invalid("invalid_range", f"from ({_dt(start).isoformat()}) is after to ({_dt(to).isoformat()}"
                                           f"{'' if 'to' in params else ', now'})")
        if to - start > MAX_SPAN[window]:
            raise Invalid("range_too_large", f"to - from is {_span(to - start)}, over the {_span(MAX_SPAN[window])} "
                                             f"allowed with window {window}; narrow the range or use a "
                                             "larger window")
        rows = self._series_rows(device_id, metric, window, start, to, limit + 1)
        if not rows and not self._read(SQL_DEVICE_EXISTS, (device_id,)):
            raise _unknown_device(device_id)
        try:
            after = None
            if len(rows) > limit:
                after, resume = _cursor(rows[limit][0])
                page = rows[:limit]
                while page and page[-1][0] >= resume:      # points in the cursor's microsecond go next time
                    page.pop()
                if page:
                    rows = page
                else:                                      # over `limit` points in one microsecond: skip the rest
                    rows = rows[:limit]
                    after += timedelta(microseconds=1)
            if window == "raw":
                at, utc = datetime.fromtimestamp, UTC
                points = [RawPoint(at(ts, utc), value) for ts, value in rows]
                return RawSeries(device_id, metric, window, _dt(start), _dt(to), points, after)
            wpoints = []
            for bucket, count, low, high, total, squares in rows:
                if count >= 1:
                    mean, std = _moments(count, total, squares, low, high)
                    wpoints.append(WindowPoint(_dt(bucket), count, low, high, mean, std))
            return WindowSeries(device_id, metric, window, _dt(start), _dt(to), wpoints, after)
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._bad_data(exc) from None

    def alerts(self, query: bytes) -> AlertList:
        params = parse_query(query, ALERTS_PARAMS)
        limit = parse_limit(params, ALERTS_LIMIT)
        args: list = []
        raw_after = params.get("after")
        if raw_after is None:
            args.append(MAX_ID)
        elif _INT_RE.fullmatch(raw_after) is None or not 1 <= int(raw_after) <= MAX_ID:
            raise Invalid("invalid_after", f"after must be an alert id in [1, {MAX_ID}] (the `next` of a page), "
                                           f"got {_show(raw_after)}")
        else:
            args.append(int(raw_after))
        device_id = params.get("device_id")
        if device_id is not None:
            if _DEVICE_RE.fullmatch(device_id) is None:
                raise Invalid("invalid_device_id", f"device_id {_show(device_id)} does not match "
                                                   "^[A-Za-z0-9_-]{1,64}$")
            args.append(device_id)
        state = params.get("state")
        if state is not None:
            if state not in ("open", "acked"):
                raise Invalid("invalid_state", f"state must be open or acked, got {_show(state)}")
            args.append(state)
        alerts, last = self._page(SQL_ALERTS[device_id is not None, state is not None], args, limit, self._alert)
        return AlertList(alerts, last.id if last is not None else None)

    def ack(self, raw_id: bytes, query: bytes) -> Alert:
        """Acknowledges an open alert; an acknowledged one is returned unchanged."""
        alert_id = parse_alert_id(raw_id)
        parse_query(query, DEVICE_PARAMS)
        rows = self._read(SQL_ALERT, (alert_id,))
        if rows and rows[0][8] == "open":
            self._write(SQL_ACK, (self.now(), alert_id))
            rows = self._read(SQL_ALERT, (alert_id,))
        if not rows:
            raise Invalid("unknown_alert", f"no alert has id {alert_id}", status=404)
        return self._alert(rows[0])

    def _series_rows(self, device_id: str, metric: str, window: str, start: float, to: float,
                     limit: int) -> list:
        """The first `limit` points of a series in [start, to): (ts, value) for raw,
        (bucket, count, min, max, sum, sumsq) for a window."""
        if window != "raw":
            width = WINDOWS[window]
            first = float(math.ceil(start / width) * width)
            return self._read(SQL_ROLLUP, (first, float(width), to, window, device_id, metric, limit))
        found = self._read(SQL_SERIES, (device_id, metric))
        if not found:
            return []
        conn = self._connection()
        self._deadline = time.monotonic() + self.budget
        try:
            return self._raw_rows(conn, found[0][0], start, to, limit)
        except sqlite3.Error as exc:
            raise self._failure(exc) from None
        except (msgspec.DecodeError, TypeError, ValueError) as exc:
            raise self._bad_data(exc) from None

    @staticmethod
    def _raw_rows(conn: sqlite3.Connection, series: int, start: float, to: float, limit: int) -> list:
        """Chunks from the hour of `start` on, page by page, until `limit` points lie
        before the next page's first chunk (no later chunk can hold an earlier point).
        Each page is a statement of its own: a chunk committed meanwhile with a start
        before the page is not seen, as if it had been committed after the query."""
        decode = _FLOATS.decode
        points: list = []
        t0 = math.floor(start / CHUNK_SECONDS) * CHUNK_SECONDS
        after = (t0, -1)
        ordered = True              # chunks so far one after the other in time: points in order
        last = -math.inf
        while True:
            page = conn.execute(SQL_RAW, (series, after[0], after[1], to, RAW_CHUNK_PAGE)).fetchall()
            for c0, _rowid, c1, ts, value in page:
                tsl = decode(ts)
                vl = decode(value)
                if len(tsl) != len(vl):
                    raise ValueError("a sample chunk's ts and value arrays differ in length")
                if c0 >= start and c1 < to:
                    points.extend(zip(tsl, vl))
                else:
                    points.extend(p for p in zip(tsl, vl) if start <= p[0] < to)
                if c0 < last:
                    ordered = False
                last = max(last, c1)
            if len(page) < RAW_CHUNK_PAGE:
                break
            after = (page[-1][0], page[-1][1])
            # Points before the next chunk's start are final: enough of them, and done.
            if len(points) >= limit and (points[limit - 1][0] < after[0] if ordered else
                                         sum(1 for p in points if p[0] < after[0]) >= limit):
                break
        if not ordered:
            points.sort(key=_TS)
        return points[:limit]

    # --- rows -----------------------------------------------------------------------------

    def _page(self, sql: str, args: list, limit: int, item: Callable[[Any], Any]) -> tuple[list, Any]:
        """A page of a list in key order: `sql` takes `args` then how many rows, and is asked
        one row more than `limit` to learn whether another page follows. Returns the page's
        items, made by `item` from each row, and its last item when another page follows
        (whose key is the `next` to pass as `after`), else None."""
        rows = self._read(sql, [*args, limit + 1])
        items = [item(row) for row in rows[:limit]]
        return items, items[-1] if len(rows) > limit else None

    def _device(self, row) -> Device:
        try:
            return Device(row[0], _dt(row[1]), _dt(row[2]), self._object(row[3], row[0]),
                          self._object(row[4], row[0]), row[5])
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._bad_data(exc) from None

    def _object(self, text, device_id: str) -> dict:
        """A JSON object column (last_values, tags); {} (logged) if the pipeline stored something else."""
        try:
            return _OBJECT.decode(text)
        except (msgspec.DecodeError, TypeError):
            self._warn("device %s: a JSON column of the devices table is not a JSON object: %r",
                       device_id, str(text)[:100])
            return {}

    def _alert(self, row) -> Alert:
        try:
            return Alert(row[0], row[1], row[2], _dt(row[3]), row[4], row[5], row[6], row[7], row[8],
                         _dt(row[9]), None if row[10] is None else _dt(row[10]))
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._bad_data(exc) from None

    # --- connections --------------------------------------------------------------------------

    def _read(self, sql: str, params) -> list:
        conn = self._connection()
        self._deadline = time.monotonic() + self.budget
        try:
            rows = conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._failure(exc) from None
        if self._broken:
            self._broken = False
            log.warning("query store %s is readable again", self.path)
        return rows

    def _write(self, sql: str, params) -> None:
        """The one write: a short-lived read-write connection (the pipeline is the main writer)."""
        conn = None
        try:
            conn = sqlite3.connect(self._rw_uri, uri=True, timeout=self.write_timeout, isolation_level=None)
            # WAL + NORMAL: the commit does not wait for an fsync in the event loop (still atomic and
            # never corrupt; a power cut may lose the acknowledgement, which is then repeated)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise self._failure(exc, write=True) from None
        finally:
            if conn is not None:
                conn.close()

    def _connection(self) -> sqlite3.Connection:
        if self.path is None:
            raise StoreError("store_unavailable", "no data directory is configured")
        try:
            st = os.stat(self.path)
        except OSError:
            self.close()
            raise StoreError("store_unavailable", "the store does not exist yet: the pipeline creates "
                                                  f"{STORE_FILE} in the data directory") from None
        ident = (st.st_dev, st.st_ino)      # not reused while the connection holds the file open
        conn = self._ro
        if conn is not None and ident == self._ident:
            return conn
        self.close()              # none yet, or the file was replaced
        self._stamp = stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._failed_stamp and time.monotonic() < self._retry_at:
            raise StoreError("store_unavailable", self._failure_message)
        try:
            conn = sqlite3.connect(self._ro_uri, uri=True, timeout=READ_BUSY_TIMEOUT, isolation_level=None,
                                   cached_statements=32)
            conn.execute("PRAGMA query_only = 1")
            conn.set_progress_handler(self._over_budget, PROGRESS_STEPS)
        except sqlite3.Error as exc:
            raise self._failure(exc) from None
        self._ro = conn
        self._ident = ident
        return conn

    def _over_budget(self) -> int:
        return time.monotonic() > self._deadline

    def close(self) -> None:
        conn, self._ro, self._ident = self._ro, None, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:      # pragma: no cover - close of a read-only connection
                pass

    def _failure(self, exc: sqlite3.Error, *, write: bool = False) -> StoreError:
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in str(exc):
            return StoreError("store_busy", "the store is locked by its writer; retry")
        if name == "SQLITE_INTERRUPT":
            self._warn("query interrupted after %d ms (the budget)", int(self.budget * 1000))
            return StoreError("query_timeout", f"the query ran over {int(self.budget * 1000)} ms and was "
                                               "stopped; narrow the range or lower the limit")
        if write:
            self._warn("query store %s: the acknowledgement failed: %s", self.path, exc)
            return StoreError("store_unavailable", f"the store cannot be written: {exc}")
        message = f"the store cannot be read: {exc}"
        self.close()              # unusable: closed, opened again at most once a retry interval
        self._failed_stamp = self._stamp
        self._retry_at = time.monotonic() + self.retry_interval
        self._failure_message = message
        if not self._broken:
            self._broken = True
            log.error("query store %s: %s (%s); answering 503 store_unavailable until it is readable "
                      "(logged once)", self.path, exc, name or type(exc).__name__)
        return StoreError("store_unavailable", message)

    def _bad_data(self, exc: Exception) -> StoreError:
        if not self._bad_data_logged:
            self._bad_data_logged = True
            log.error("query store %s holds a value of the wrong type: %s; answering 503 "
                      "store_unavailable for such rows (logged once)", self.path, exc)
        return StoreError("store_unavailable", "the store holds a value this server cannot read")

    def _warn(self, fmt: str, *args) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10.0 or self._last_warning == 0.0:
            self._last_warning = now
            log.warning(fmt + " (logged at most every 10 s)", *args)


def open_query(data_dir, store: str | None = None) -> Query:
    """The queries of the configured store: the embedded one in data_dir, or
    PostgreSQL (gw/query_pg.py) when `store` is a postgresql:// URL."""
    from gw.config import store_is_postgresql
    if store_is_postgresql(store):
        from gw.query_pg import PgQuery
        return PgQuery(store)
    return Query(data_dir)


def _unknown_device(device_id: str) -> Invalid:
    return Invalid("unknown_device", f"no device {device_id} in the store", status=404)


def _span(seconds: float) -> str:
    if seconds >= DAY:
        return f"{seconds / DAY:g} days"
    if seconds >= 3600:
        return f"{seconds / 3600:g} hours"
    return f"{seconds:g} seconds"
