"""The PostgreSQL store (gw/pipeline/pgstore.py): readings/s its sink commits.

Like bench/bench_store.py's sustained runs: logs written beforehand with
gw_ext/wal's writer (2 worker logs, 2 metrics per reading, readings 50 us
apart), the pipeline started with `store = postgresql://...` and timed until
its store sink has committed them all (readings, samples, rollups, devices,
anomaly detection, checkpoints: one transaction per batch). PostgreSQL runs on
the same machine (tests/pg_server.py: its own cluster on a free loopback port,
fsync on), a fresh database per round. ``extra_info["readings_per_s"]``; the
target is 50,000/s on the 2-core machine. No gate on absolute times.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_store import WORKERS, make_logs                            # noqa: E402
from pg_server import make_pg_server                                  # noqa: E402
from test_pipeline import Durable, settings, wait_until, wal_api, write_log   # noqa: E402
from gw.pipeline import Pipeline                                       # noqa: E402


@pytest.fixture(scope="module")
def pg_bench_server():
    server = make_pg_server(fsync=True)
    yield server
    server.stop()
    shutil.rmtree(server.base, ignore_errors=True)


def sustained(benchmark, tmp_path, server, devices: int, n: int):
    logs = make_logs(devices, n)
    dirs = []
    urls = []

    def setup():
        d = tmp_path / f"run{len(dirs)}"
        dirs.append(d)
        url = server.database()
        urls.append(url)
        durable = Durable(WORKERS)
        for w, p in enumerate(logs):
            durable.set(w, write_log(d, w, p))
        pipe = Pipeline(settings(d, pipeline_poll_interval=0.02, store=url), WORKERS, durable, wal=wal_api())
        return (pipe,), {}

    times = []

    def run(pipe):
        t = time.perf_counter()
        pipe.start()
        wait_until(lambda: pipe.runners[0].lag() == 0, 900, "the store", interval=0.005)
        times.append(time.perf_counter() - t)
        pipe.shutdown()
        assert pipe.stats()["sinks"]["store"]["written"] == n

    benchmark.pedantic(run, setup=setup, rounds=2, iterations=1)
    assert server.psql("SELECT count(*), count(DISTINCT (worker, lsn)) FROM readings", urls[-1].rsplit("/", 1)[1]) \
        == [(n, n)]
    size = server.psql("SELECT pg_database_size(current_database())", urls[-1].rsplit("/", 1)[1])[0][0]
    best = min(times)
    benchmark.extra_info.update({"readings": n, "devices": devices, "readings_per_s": round(n / best),
                                 "database_bytes_per_reading": round(size / n)})
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    for url in urls:
        server.drop(url)
    return n / best


def test_pg_store_sustained_1000_devices(benchmark, tmp_path, pg_bench_server):
    sustained(benchmark, tmp_path, pg_bench_server, 1000, 400_000)


def test_pg_store_sustained_20000_devices(benchmark, tmp_path, pg_bench_server):
    sustained(benchmark, tmp_path, pg_bench_server, 20_000, 300_000)
