"""The query API (gw/query.py) on a real store: one day of 1 Hz readings of 10
devices (two metrics each: 1.73 M samples, their 1m/1h/1d rollups, 1,000
alerts), filled through the pipeline's schema in WAL mode.

Each benchmark times `HttpApp.handle` as the worker's event loop calls it
(routing, query-string parsing, the SQLite query, row conversion, JSON
encoding), on one device's data:

* ``rollup_1h_day``: window 1h over one day, 24 rows of `rollups`;
* ``raw_hour``: window raw over one hour, 3,600 samples (60 sample chunks);
* ``rollup_1m_day``: window 1m over one day, 1,440 rows;
* ``rollup_1m_hour``: window 1m over one hour, 60 rows;
* ``raw_10k``: window raw, 10,000 samples (the most a page holds);
* ``device``, ``devices``, ``alerts``: one device, the device list, a page of 100 alerts.

Besides pytest-benchmark's statistics, ``extra_info`` holds p50/p99/max over
1,000 timed calls (perf_counter_ns) and, for the series, the time of the bare
store read without the HTTP layer (`sql_ms`, `Query._series_rows`). The gates are ratios against baselines timed in the
same run, never absolute times:

* ``query_rollup``: the 1-hour rollup query over one day (`HttpApp.handle`,
  the whole request) against the same hourly figures aggregated by SQLite from
  the day's raw samples, what the rollups spare (a query that stopped using
  them, or got slow around them, fails);
* ``query_raw``: the raw hour through `HttpApp.handle` against the bare fetch
  of the same 60 sample chunks by their index, their arrays decoded, and
  `json.dumps` of the 3,600 points (the least any handler does: a slower plan
  or per-row work fails).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from types import SimpleNamespace

import msgspec
import pytest

from gw import query as q
from gw.pipeline.store import open_store
from gw.http_api import HttpApp
from gw.ingest import Ingest
from benchutil import Gate, check_gate, paired_ratio

DAY0 = 1758585600.0                  # 2025-09-23T00:00:00Z
DEVICES = [f"dev_{i:02d}" for i in range(10)]
METRICS = ("temp_c", "rssi")
TIMED_CALLS = 1000
GATE_ROLLUP = 340.0         # measured 406-631 (BENCHMARKS.md, Speed gates)
GATE_RAW = 0.7              # measured 0.79-1.26



def _value(device: int, metric: int, second: int) -> float:
    base = 21.0 if metric == 0 else -67.0
    return round(base + 3 * math.sin(second / 3600 + device) + ((second * 7919 + device) % 101) / 100, 3)


def build_store(directory) -> dict:
    """Fills directory/store.sqlite the way the pipeline does, in batches of one
    minute of readings (each reading: a readings row; each batch: one sample
    chunk per device and metric; the rollups of each bucket; the devices row)."""
    path = directory / q.STORE_FILE
    db = open_store(path)                          # the store's own schema (gw/pipeline/store.py)
    db.execute("PRAGMA synchronous = OFF")         # building the fixture only
    t0 = time.perf_counter()
    lsn = 0
    rollups: dict = {}
    enc = msgspec.json.encode
    db.execute("BEGIN")
    series = {}
    for device in DEVICES:
        for metric in METRICS:
            series[device, metric] = db.execute("INSERT INTO series (device_id, metric) VALUES (?, ?) RETURNING id",
                                                (device, metric)).fetchone()[0]
    for d, device in enumerate(DEVICES):
        readings, chunks = [], []
        for minute in range(1440):
            cols: dict = {m: ([], []) for m in METRICS}
            for second in range(minute * 60, minute * 60 + 60):
                ts = DAY0 + second
                lsn += 1
                values = [_value(d, m, second) for m in range(len(METRICS))]
                metrics = dict(zip(METRICS, values))
                readings.append((d % 4, lsn, device, ts, second, json.dumps(metrics), '{"site":"AAL"}'))
                for metric, value in metrics.items():
                    cols[metric][0].append(ts)
                    cols[metric][1].append(value)
                    for win, width in (("1m", 60), ("1h", 3600), ("1d", 86400)):
                        key = (win, series[device, metric], math.floor(ts / width) * width)
                        agg = rollups.get(key)
                        if agg is None:
                            rollups[key] = [1, value, value, value, value * value]
                        else:
                            agg[0] += 1
                            agg[1] = min(agg[1], value)
                            agg[2] = max(agg[2], value)
                            agg[3] += value
                            agg[4] += value * value
            for metric, (tsl, vl) in cols.items():
                chunks.append((series[device, metric], tsl[0], tsl[-1], len(tsl), enc(tsl).decode(),
                               enc(vl).decode()))
        db.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?, ?, NULL)", readings)
        db.executemany("INSERT INTO sample_chunks VALUES (?, ?, ?, ?, ?, ?)", chunks)
        db.execute("INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?)",
                   (device, DAY0, DAY0 + 86399, json.dumps(metrics), '{"site":"AAL"}', 86400))
    db.executemany("INSERT INTO rollup VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   sorted((win, bucket, sid, *agg) for (win, sid, bucket), agg in rollups.items()))
    db.executemany("INSERT INTO alerts (device_id, metric, ts, value, zscore, mean, std, state, created, acked) "
                   "VALUES (?, ?, ?, 40.0, 6.0, 21.0, 3.0, ?, ?, ?)",
                   [(DEVICES[i % 10], "temp_c", DAY0 + i * 86, "acked" if i % 3 else "open", DAY0 + i * 86 + 1,
                     DAY0 + i * 86 + 60 if i % 3 else None) for i in range(1000)])
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("readings", "samples", "rollups", "devices", "alerts")}
    db.close()
    counts["build_s"] = round(time.perf_counter() - t0, 1)
    counts["file_mb"] = round(path.stat().st_size / 1e6, 1)
    return counts


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("query-store")
    info = build_store(directory)
    assert info["samples"] == 10 * 86400 * len(METRICS) and info["readings"] == 10 * 86400
    return directory, info


def make_app(directory) -> HttpApp:
    cfg = SimpleNamespace(data_dir=str(directory))       # the rest: gw/config.py's defaults
    counters = [0] * 512
    a = HttpApp(cfg, worker_index=0, ingest=Ingest(1000, counters), render_metrics=lambda: b"", health=None,
                counters=counters)
    a._query_api().now = lambda: DAY0 + 86400
    return a


@pytest.fixture(scope="module")
def app(store):
    directory, _ = store
    return make_app(directory)


def _iso(seconds: float) -> str:
    return q._dt(seconds).isoformat().replace("+00:00", "Z")


TARGETS = {
    "rollup_1h_day": (f"/v1/devices/dev_03/metrics?metric=temp_c&window=1h&from={_iso(DAY0)}"
                      f"&to={_iso(DAY0 + 86400)}", 24),
    "raw_hour": (f"/v1/devices/dev_03/metrics?metric=temp_c&from={_iso(DAY0 + 43200)}"
                 f"&to={_iso(DAY0 + 46800)}", 3600),
    "rollup_1m_day": (f"/v1/devices/dev_03/metrics?metric=temp_c&window=1m&from={_iso(DAY0)}"
                      f"&to={_iso(DAY0 + 86400)}", 1440),
    "rollup_1m_hour": (f"/v1/devices/dev_03/metrics?metric=temp_c&window=1m&from={_iso(DAY0 + 43200)}"
                       f"&to={_iso(DAY0 + 46800)}", 60),
    "raw_10k": (f"/v1/devices/dev_03/metrics?metric=temp_c&from={_iso(DAY0 + 40000)}"
                f"&to={_iso(DAY0 + 50000)}", 10000),
    "device": ("/v1/devices/dev_03", None),
    "devices": ("/v1/devices", None),
    "alerts": ("/v1/alerts?limit=100", None),
}
SQL = {      # the store reads alone (Query._series_rows: one read transaction), without the HTTP layer
    "rollup_1h_day": ("dev_03", "temp_c", "1h", DAY0, DAY0 + 86400, 10001),
    "raw_hour": ("dev_03", "temp_c", "raw", DAY0 + 43200, DAY0 + 46800, 10001),
    "rollup_1m_day": ("dev_03", "temp_c", "1m", DAY0, DAY0 + 86400, 10001),
    "rollup_1m_hour": ("dev_03", "temp_c", "1m", DAY0 + 43200, DAY0 + 46800, 10001),
    "raw_10k": ("dev_03", "temp_c", "raw", DAY0 + 40000, DAY0 + 50000, 10001),
}


def _percentiles(fn, calls: int) -> dict:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    times.sort()
    ms = lambda ns: round(ns / 1e6, 3)      # noqa: E731
    return {"p50_ms": ms(times[len(times) // 2]), "p99_ms": ms(times[int(len(times) * 0.99) - 1]),
            "max_ms": ms(times[-1])}


@pytest.mark.parametrize("name", list(TARGETS))
def test_query(benchmark, app, store, name):
    target, points = TARGETS[name]
    raw = target.encode()

    def call():
        return app.handle(b"GET", raw, None, b"")

    status, _, body, _ = call()
    assert status == 200, body
    doc = json.loads(body)
    if points is not None:
        assert len(doc["points"]) == points and doc["next"] is None
    benchmark(call)
    info = _percentiles(call, TIMED_CALLS)
    info["response_bytes"] = len(body)
    if name in SQL:
        api = app._query_api()
        params = SQL[name]
        info["sql_ms"] = _percentiles(lambda: api._series_rows(*params), 200)["p50_ms"]
    if name == "rollup_1h_day":
        info.update({f"store_{k}": v for k, v in store[1].items()})
    benchmark.extra_info.update(info)


# --- the gates -------------------------------------------------------------------------

HOURLY_FROM_RAW = ("SELECT CAST(ts / 3600 AS INTEGER) * 3600, count(*), min(value), max(value), sum(value), "
                   "sum(value * value) FROM samples WHERE device_id = ? AND metric = ? AND ts >= ? AND ts < ? "
                   "GROUP BY 1 ORDER BY 1")
# The least a raw handler does: the hour's sample chunks by the index, their arrays decoded.
RAW_FETCH = ("SELECT c.ts, c.value FROM sample_chunks c JOIN series s ON s.id = c.series WHERE s.device_id = ? "
             "AND s.metric = ? AND c.t0 >= ? AND c.t0 < ? ORDER BY c.t0")


def _raw_fetch(conn, args) -> list:
    dec = msgspec.json.decode
    out = []
    for ts, value in conn.execute(RAW_FETCH, args):
        out.extend(zip(dec(ts), dec(value)))
    return out


def query_gates(app: HttpApp, directory) -> list[Gate]:
    conn = sqlite3.connect(f"file:{directory / q.STORE_FILE}?mode=ro", uri=True)

    def rollup_ratio():
        raw = TARGETS["rollup_1h_day"][0].encode()
        assert app.handle(b"GET", raw, None, b"")[0] == 200
        args = ("dev_03", "temp_c", DAY0, DAY0 + 86400)
        assert len(conn.execute(HOURLY_FROM_RAW, args).fetchall()) == 24
        ratio, ours, base = paired_ratio(lambda: app.handle(b"GET", raw, None, b""),
                                         lambda: conn.execute(HOURLY_FROM_RAW, args).fetchall(), 7)
        return ratio, {"handle_ms": round(ours * 1e3, 3), "from_raw_ms": round(base * 1e3, 3)}

    def raw_ratio():
        raw = TARGETS["raw_hour"][0].encode()
        assert app.handle(b"GET", raw, None, b"")[0] == 200
        args = ("dev_03", "temp_c", DAY0 + 43200, DAY0 + 46800)
        assert len(_raw_fetch(conn, args)) == 3600
        ratio, ours, base = paired_ratio(lambda: app.handle(b"GET", raw, None, b""),
                                         lambda: json.dumps(_raw_fetch(conn, args)).encode(), 15)
        return ratio, {"handle_ms": round(ours * 1e3, 3), "fetch_and_dumps_ms": round(base * 1e3, 3)}

    return [Gate("query_rollup", rollup_ratio, GATE_ROLLUP,
                 "the 1h rollup query vs aggregating the raw samples"),
            Gate("query_raw", raw_ratio, GATE_RAW, "the raw-hour query vs a bare fetch and json.dumps")]


def gates() -> list[Gate]:
    """The gates on a store of their own (bench/gate_ratios.py)."""
    import tempfile
    from pathlib import Path

    directory = Path(tempfile.mkdtemp(prefix="gw-query-gates-"))
    build_store(directory)
    return query_gates(make_app(directory), directory)


@pytest.mark.parametrize("which", ["query_rollup", "query_raw"])
def test_gate(request, app, store, which):
    gate = next(g for g in query_gates(app, store[0]) if g.name == which)
    check_gate(gate, request)
