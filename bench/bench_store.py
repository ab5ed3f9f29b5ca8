"""The pipeline's embedded store (gw/pipeline/store.py).

* ``test_store_sustained_*``: readings/s the store sink commits (readings,
  sample chunks, rollups, devices, anomaly detection, checkpoints, one
  transaction per batch) from logs written beforehand with gw_ext/wal's writer:
  2 worker logs, 2 metrics per reading (the `gw bench ingest` record), through
  the pipeline's runner (batches grow to catchup x pipeline_batch while
  behind). 1,000 devices at 20,000 readings/s of log time (gw bench ingest's
  default: 20 readings/s each), 20,000 devices at 20,000/s (1 reading/s each)
  and at 100,000/s (5 each: the rate the store is sized for; 1,500,000
  readings, so most batches are at their cap). ``extra_info``: readings_per_s
  (wall), readings_per_cpu_s (this process's CPU: the steadier figure on a
  shared machine), and steady_* from the first batch at its cap on; the
  target is 100,000/s with 20,000 devices on about one core of the 2-core
  machine.
* ``test_store_candidate_duckdb``: the same readings into DuckDB (skipped
  unless duckdb is installed): the engine the store did not take (BENCHMARKS.md).
* ``test_rollup_query_*``: one day of 1 Hz data of one device: the 24 hourly
  rows from the rollups, and the same figures computed from the raw samples,
  for comparison. Target: well under 50 ms.
* ``test_aggregation_*``: a batch's samples reduced per (window, device, metric,
  bucket) with numpy and with a dict loop; the gate: numpy at 4x
  rollup.NUMPY_FROM samples at least GATE_RATIO times the dict loop (a ratio,
  same run; at least 1: numpy pays from NUMPY_FROM on).
* ``python bench/bench_store.py --compare REV``: the store sink of git revision
  REV against this checkout's, alternating rounds on the same logs, each fed
  batches of its own catchup x pipeline_batch (readings/s and readings per
  CPU-second: the machine is shared, the CPU figure is the steadier).
No gate on absolute times.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchutil import Gate, best_time, check_gate, paired_ratio    # noqa: E402
from test_pipeline import Durable, reading, settings, wait_until, wal_api, write_log   # noqa: E402
from gw.ingest import Telemetry                                    # noqa: E402
from gw.pipeline import Pipeline                                   # noqa: E402
from gw.pipeline.rollup import NUMPY_FROM, aggregate_numpy, aggregate_python   # noqa: E402
from gw.pipeline.anomaly import Detector                           # noqa: E402
from gw.pipeline.store import STORE_FILE, StoreSink, open_store    # noqa: E402
from gw.pipeline.batch import Reading as _StoreReading             # noqa: E402

RATE = 20_000.0
WORKERS = 2
GATE_RATIO = 1.08           # measured 1.13-2.07 (BENCHMARKS.md, Speed gates)


def make_logs(devices: int, n: int, rate: float = None) -> list[list[bytes]]:
    """n readings over WORKERS logs (device d on worker d % WORKERS), `rate` (RATE) per second in all."""
    rate = rate or RATE
    enc = msgspec.json.Encoder().encode
    rng = np.random.default_rng(7)
    temps = np.round(20 + rng.standard_normal(n), 2).tolist()
    hums = np.round(45 + 5 * rng.random(n), 1).tolist()
    start = time.time() - n / rate - 60
    logs = [[] for _ in range(WORKERS)]
    for i in range(n):
        d = i % devices
        ts = datetime.fromtimestamp(round(start + i / rate, 6), timezone.utc)
        logs[d % WORKERS].append(enc(Telemetry(f"dev-{d:05d}", ts, i // devices,
                                               {"temp_c": temps[i], "humidity_pct": hums[i]},
                                               {"site": "AAL"}, msgspec.Raw(b"null"))))
    return logs


def sustained(benchmark, tmp_path, devices: int, n: int, rate: float = RATE):
    logs = make_logs(devices, n, rate)
    dirs = []

    def setup():
        d = tmp_path / f"run{len(dirs)}"
        dirs.append(d)
        durable = Durable(WORKERS)
        for w, p in enumerate(logs):
            durable.set(w, write_log(d, w, p))
        pipe = Pipeline(settings(d, pipeline_poll_interval=0.02), WORKERS, durable, wal=wal_api())
        return (pipe,), {}

    times = []
    cpus = []
    steady = []

    def run(pipe):
        runner = pipe.runners[0]
        marks = []              # (wall s, CPU s, readings written, batch size) while it runs
        t, cpu = time.perf_counter(), time.process_time()
        pipe.start()

        def caught_up():
            marks.append((time.perf_counter() - t, time.process_time() - cpu, runner.sink.written,
                          runner.cur_batch))
            return runner.lag() == 0

        wait_until(caught_up, 900, "the store", interval=0.005)
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - cpu)
        # The steady state: from the first moment batches reached their cap (the runner
        # doubles them from pipeline_batch while behind) to the end.
        cap = runner.batch * runner.sink.catchup
        first = next((m for m in marks if m[3] >= cap and m[2] > 0), None)
        if first is not None and n - first[2] >= cap:
            steady.append(((n - first[2]) / (times[-1] - first[0]), (n - first[2]) / (cpus[-1] - first[1])))
        pipe.shutdown()
        assert pipe.stats()["sinks"]["store"]["written"] == n

    benchmark.pedantic(run, setup=setup, rounds=2, iterations=1)
    c = sqlite3.connect(dirs[-1] / STORE_FILE)
    assert c.execute("SELECT count(*) FROM readings").fetchone()[0] == n
    db_bytes = (dirs[-1] / STORE_FILE).stat().st_size
    c.close()
    best = min(times)
    # CPU seconds of this process (the sink's thread, the log reader; the waiting main thread
    # sleeps): on a shared machine the steadier figure of what the store costs.
    benchmark.extra_info.update({"readings": n, "devices": devices, "readings_per_s": round(n / best),
                                 "readings_per_cpu_s": round(n / min(cpus)),
                                 "store_bytes_per_reading": round(db_bytes / n)})
    if steady:
        benchmark.extra_info.update({"steady_readings_per_s": round(max(w for w, _c in steady)),
                                     "steady_readings_per_cpu_s": round(max(c for _w, c in steady))})
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return n / best


def test_store_sustained_1000_devices(benchmark, tmp_path):
    sustained(benchmark, tmp_path, 1000, 400_000)


@pytest.mark.long
def test_store_sustained_20000_devices(benchmark, tmp_path):
    sustained(benchmark, tmp_path, 20_000, 300_000)


@pytest.mark.long
def test_store_sustained_20000_devices_100k(benchmark, tmp_path):
    """20,000 devices at 100,000 readings/s of log time (5 readings/s each), 1,500,000
    readings: the rate the store is sized for, 2 metrics each. The first ~500,000 go in
    batches growing to their cap; extra_info's steady_* figures are the rest's."""
    sustained(benchmark, tmp_path, 20_000, 1_500_000, rate=100_000.0)


# --- the engine: DuckDB as a candidate (measured once, not a dependency) -----------------------

def test_store_candidate_duckdb(benchmark, tmp_path):
    """The same batches (decoded and run through the same detector as the store sink)
    into DuckDB: readings and samples appended from numpy columns, the rollups
    aggregated by DuckDB from the batch and upserted, devices upserted, checkpoints,
    one transaction per batch of 128,000 readings. DuckDB allows one process to
    open a database file for writing and no other process to read it meanwhile,
    so it would not serve the workers' query threads as it is; measured to know
    what it would give. Skipped unless duckdb is installed."""
    duckdb = pytest.importorskip("duckdb")
    devices, n = 20_000, 600_000
    logs = make_logs(devices, n, rate=100_000.0)
    decode = msgspec.json.Decoder(_StoreReading).decode
    times = []

    def run():
        con = duckdb.connect(str(tmp_path / f"duck{len(times)}.db"))
        con.execute("CREATE TABLE readings (worker INTEGER, lsn BIGINT, device_id VARCHAR, ts DOUBLE, seq BIGINT, "
                    "metrics VARCHAR, tags VARCHAR, payload VARCHAR)")
        con.execute("CREATE TABLE samples (device_id VARCHAR, metric VARCHAR, ts DOUBLE, value DOUBLE)")
        con.execute("CREATE TABLE rollups (win VARCHAR, device_id VARCHAR, metric VARCHAR, bucket DOUBLE, "
                    "count BIGINT, min DOUBLE, max DOUBLE, sum DOUBLE, sumsq DOUBLE, "
                    "PRIMARY KEY (win, device_id, metric, bucket))")
        con.execute("CREATE TABLE devices (device_id VARCHAR PRIMARY KEY, first_seen DOUBLE, last_seen DOUBLE, "
                    "readings BIGINT)")
        con.execute("CREATE TABLE checkpoints (sink VARCHAR, worker INTEGER, next_offset BIGINT, "
                    "PRIMARY KEY (sink, worker))")
        det = Detector(60, 4.0)
        enc = msgspec.json.Encoder().encode
        t, cpu = time.perf_counter(), time.process_time()
        pos = [0] * WORKERS
        offs = [0] * WORKERS
        while any(pos[w] < len(logs[w]) for w in range(WORKERS)):
            rw, rl, rd, rt, rs, rm, rtag, sd, sm, st, sv = ([] for _ in range(11))
            for w in range(WORKERS):
                part = logs[w][pos[w]:pos[w] + 64_000]
                pos[w] += len(part)
                for payload in part:
                    r = decode(payload)
                    ts = r.ts.timestamp()
                    rw.append(w)
                    rl.append(offs[w])
                    offs[w] += 8 + len(payload)
                    rd.append(r.device_id)
                    rt.append(ts)
                    rs.append(r.seq)
                    rm.append(enc(r.metrics).decode())
                    rtag.append(bytes(r.tags).decode())
                    for m, v in r.metrics.items():
                        sd.append(r.device_id)
                        sm.append(m)
                        st.append(ts)
                        sv.append(v)
                        det.observe(r.device_id, m, v)
            batch_r = {"worker": np.array(rw), "lsn": np.array(rl), "device_id": np.array(rd, dtype=object),  # noqa: F841
                       "ts": np.array(rt), "seq": np.array(rs), "metrics": np.array(rm, dtype=object),
                       "tags": np.array(rtag, dtype=object)}
            batch_s = {"device_id": np.array(sd, dtype=object), "metric": np.array(sm, dtype=object),  # noqa: F841
                       "ts": np.array(st), "value": np.array(sv)}
            con.execute("BEGIN")
            con.execute("INSERT INTO readings SELECT worker, lsn, device_id, ts, seq, metrics, tags, NULL FROM batch_r")
            con.execute("INSERT INTO samples SELECT * FROM batch_s")
            for win, width in (("1m", 60), ("1h", 3600), ("1d", 86400)):
                con.execute(
                    f"INSERT INTO rollups SELECT '{win}', device_id, metric, floor(ts / {width}) * {width}, count(*), "
                    "min(value), max(value), sum(value), sum(value * value) FROM batch_s GROUP BY ALL "
                    "ON CONFLICT DO UPDATE SET count = count + excluded.count, min = least(min, excluded.min), "
                    "max = greatest(max, excluded.max), sum = sum + excluded.sum, sumsq = sumsq + excluded.sumsq")
            con.execute("INSERT INTO devices SELECT device_id, min(ts), max(ts), count(*) FROM batch_r GROUP BY ALL "
                        "ON CONFLICT DO UPDATE SET first_seen = least(first_seen, excluded.first_seen), "
                        "last_seen = greatest(last_seen, excluded.last_seen), readings = readings + excluded.readings")
            con.executemany("INSERT INTO checkpoints VALUES ('store', ?, ?) ON CONFLICT DO UPDATE SET "
                            "next_offset = excluded.next_offset", [(w, offs[w]) for w in range(WORKERS)])
            con.execute("COMMIT")
        times.append((time.perf_counter() - t, time.process_time() - cpu))
        assert con.execute("SELECT count(*) FROM readings").fetchone()[0] == n
        assert con.execute("SELECT sum(count) FROM rollups WHERE win = '1d'").fetchone()[0] == 2 * n
        con.close()

    benchmark.pedantic(run, rounds=2, iterations=1)
    benchmark.extra_info.update({"readings": n, "devices": devices,
                                 "readings_per_s": round(n / min(t for t, _c in times)),
                                 "readings_per_cpu_s": round(n / min(c for _t, c in times))})


# --- the rollup query ---------------------------------------------------------------------

HOURLY = ("SELECT bucket, count, min, max, sum / count AS mean, sum, sumsq FROM rollups "
          "WHERE win = '1h' AND device_id = ? AND metric = ? AND bucket >= ? AND bucket < ? ORDER BY bucket")
HOURLY_RAW = ("SELECT CAST(ts / 3600 AS INTEGER) * 3600 AS bucket, count(*), min(value), max(value), "
              "avg(value), sum(value), sum(value * value) FROM samples "
              "WHERE device_id = ? AND metric = ? AND ts >= ? AND ts < ? GROUP BY 1 ORDER BY 1")


@pytest.fixture(scope="module")
def day_store(tmp_path_factory):
    """One day of 1 Hz readings of one device (and 99 other devices' worth of
    rollups around it, so the index is not trivially small)."""
    path = tmp_path_factory.mktemp("day")
    sink = StoreSink(open_store(path / STORE_FILE), 1)
    sink.open()
    day = float(int(time.time()) // 86400 * 86400 - 86400)
    off = 0
    rng = np.random.default_rng(3)
    for h in range(24):
        recs = []
        for s in range(3600):
            t = day + h * 3600 + s
            p = reading("dev-00042", t, h * 3600 + s, {"temp_c": round(20 + float(rng.standard_normal()), 2),
                                                       "humidity_pct": 45.0})
            recs.append((off, p))
            off += 8 + len(p)
        for k in range(99):
            p = reading(f"other-{k:03d}", day + h * 3600, h, {"temp_c": 21.0, "humidity_pct": 40.0})
            recs.append((off, p))
            off += 8 + len(p)
        sink.write([(0, recs, off)])
    sink.close()
    conn = sqlite3.connect(path / STORE_FILE)
    yield conn, day
    conn.close()


def test_rollup_query_1h_over_a_day(benchmark, day_store):
    conn, day = day_store
    args = ("dev-00042", "temp_c", day, day + 86400)
    plan = " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + HOURLY, args))
    assert "PRIMARY KEY" in plan and "SCAN" not in plan, plan
    rows = benchmark(lambda: conn.execute(HOURLY, args).fetchall())
    assert len(rows) == 24 and sum(r[1] for r in rows) == 86400
    benchmark.extra_info["ms"] = round(benchmark.stats.stats.min * 1e3, 3) if benchmark.stats else None
    benchmark.extra_info["plan"] = plan


@pytest.mark.long
def test_rollup_query_from_raw_samples_for_comparison(benchmark, day_store):
    conn, day = day_store
    args = ("dev-00042", "temp_c", day, day + 86400)
    rows = benchmark(lambda: conn.execute(HOURLY_RAW, args).fetchall())
    assert len(rows) == 24 and sum(r[1] for r in rows) == 86400
    want = conn.execute(HOURLY, args).fetchall()
    for r, w in zip(rows, want):
        assert r[0] == w[0] and r[1] == w[1] and r[2] == w[2] and r[3] == w[3]
        assert r[4] == pytest.approx(w[4])
    benchmark.extra_info["ms"] = round(benchmark.stats.stats.min * 1e3, 3) if benchmark.stats else None


# --- aggregation: numpy or a dict loop ------------------------------------------------------------

def batch_samples(n: int, keys: int):
    rng = np.random.default_rng(n)
    names = [(f"dev-{i:05d}", "temp_c") for i in range(keys)]
    key = rng.integers(0, keys, n).tolist()
    ts = (time.time() + np.sort(rng.random(n)) * n / RATE).tolist()
    val = rng.standard_normal(n).tolist()
    return names, key, ts, val


@pytest.mark.parametrize("n", [64, 512, 4000, 16000])
def test_aggregation_numpy(benchmark, n):
    args = batch_samples(n, max(1, n // 2))
    benchmark(aggregate_numpy, *args)
    benchmark.extra_info["samples"] = n


@pytest.mark.parametrize("n", [64, 512, 4000, 16000])
def test_aggregation_dict_loop(benchmark, n):
    args = batch_samples(n, max(1, n // 2))
    benchmark(aggregate_python, *args)
    benchmark.extra_info["samples"] = n


def aggregation_ratio() -> tuple[float, dict]:
    """numpy against the dict loop at 4x NUMPY_FROM samples, best of 25 (each well under a ms)."""
    args = batch_samples(4 * NUMPY_FROM, 2 * NUMPY_FROM)
    ratio, t_np, t_py = paired_ratio(lambda: aggregate_numpy(*args), lambda: aggregate_python(*args), 25)
    return ratio, {"numpy_ms": round(t_np * 1e3, 3), "dict_loop_ms": round(t_py * 1e3, 3),
                         "samples": 4 * NUMPY_FROM}


# From NUMPY_FROM samples on numpy must pay (ratio >= 1); the gate is tighter,
# so a 2x regression of the numpy path fails even where it would still pay.
GATE = Gate("aggregation", aggregation_ratio, GATE_RATIO, "rollup aggregation with numpy vs a dict loop")


def test_gate_numpy_aggregation_vs_dict_loop(request):
    check_gate(GATE, request)


# --- before and after: python bench/bench_store.py --compare REV -----------------------------

def _sink_at(rev: str, into: Path, module: str = "store"):
    """The store sink of git revision `rev` (gw/pipeline/{module}.py and the modules it imports),
    as a package of its own beside this checkout's."""
    import importlib
    import subprocess

    pkg = into / f"store_{rev[:12]}"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in ("store", "pgstore", "store_sink", "batch", "copytext", "rollup", "anomaly", "sink", "errors"):
        got = subprocess.run(["git", "show", f"{rev}:gw/pipeline/{name}.py"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent.parent)
        if got.returncode == 0:            # a module the revision does not have is not needed by it
            (pkg / f"{name}.py").write_text(got.stdout)
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
    return importlib.import_module(f"{pkg.name}.{module}")


def _drive(mod, directory: Path, logs, batch: int) -> tuple[float, float]:
    """Every record of `logs` through mod's StoreSink in batches of `batch` records (what
    the runner hands a sink that is behind: catchup x pipeline_batch): (wall s, CPU s)."""
    return drive_sink(mod.StoreSink(mod.open_store(directory / mod.STORE_FILE), WORKERS), logs, batch)


def drive_sink(sink, logs, batch: int) -> tuple[float, float]:
    """Every record of `logs` through `sink` (opened here, closed after) in batches of
    `batch` records: (wall s, this process's CPU s)."""
    sink.open()
    recs = []
    for p in logs:
        off = 0
        r = []
        for x in p:
            r.append((off, x))
            off += 8 + len(x)
        recs.append(r)
    pos = [0] * WORKERS
    t, cpu = time.perf_counter(), time.process_time()
    while any(pos[w] < len(recs[w]) for w in range(WORKERS)):
        parts = []
        for w in range(WORKERS):
            chunk = recs[w][pos[w]:pos[w] + batch // WORKERS]
            if chunk:
                pos[w] += len(chunk)
                parts.append((w, chunk, chunk[-1][0] + 8 + len(chunk[-1][1])))
        sink.write(parts)
    out = time.perf_counter() - t, time.process_time() - cpu
    sink.close()
    return out


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="the store sink of a git revision against this checkout's, "
                                             "alternating, on the same logs")
    ap.add_argument("--compare", required=True, metavar="REV", help="git revision of the 'before' store")
    ap.add_argument("--devices", type=int, default=20_000)
    ap.add_argument("--readings", type=int, default=400_000)
    ap.add_argument("--rate", type=float, default=100_000.0, help="readings/s of log time")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pipeline-batch", type=int, default=2000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="gw-store-compare-"))
    try:
        before = _sink_at(args.compare, base / "pkg")
        import gw.pipeline.store as after
        logs = make_logs(args.devices, args.readings, args.rate)
        for rnd in range(args.rounds):
            for label, mod in (("before", before), ("after", after)):
                d = base / f"{label}{rnd}"
                d.mkdir()
                wall, cpu = _drive(mod, d, logs, args.pipeline_batch * mod.StoreSink.catchup)
                size = (d / mod.STORE_FILE).stat().st_size
                print(f"round {rnd + 1} {label:6s}: {args.readings / wall:9,.0f} readings/s, "
                      f"{args.readings / cpu:9,.0f} readings per CPU-second, batch "
                      f"{args.pipeline_batch * mod.StoreSink.catchup}, {size / args.readings:.0f} bytes/reading",
                      flush=True)
                shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
