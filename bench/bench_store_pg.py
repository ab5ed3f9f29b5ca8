"""The PostgreSQL store (gw/pipeline/pgstore.py): readings/s its sink commits.

Like bench/bench_store.py's sustained runs: logs written beforehand with
gw_ext/wal's writer (2 worker logs, 2 metrics per reading, readings 50 us
apart), the pipeline started with `store = postgresql://...` and timed until
its store sink has committed them all (readings, samples, rollups, devices,
anomaly detection, checkpoints: one transaction per batch). PostgreSQL runs on
the same machine (tests/pg_server.py: its own cluster on a free loopback port,
fsync on), a fresh database per round. ``extra_info["readings_per_s"]``; the
target is 50,000/s on the 2-core machine. No gate on absolute times.

``python bench/bench_store_pg.py --compare REV``: the PostgreSQL store sink of git
revision REV against this checkout's, alternating, on the same logs and server,
each driven directly in batches of its own `catchup` x `pipeline_batch` (a sink
that is behind: what "sustained" means), without the pipeline's log reading.
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


@pytest.mark.long
def test_pg_store_sustained_20000_devices(benchmark, tmp_path, pg_bench_server):
    sustained(benchmark, tmp_path, pg_bench_server, 20_000, 1_000_000)


# --- before and after: python bench/bench_store_pg.py --compare REV --------------------------

def _drive_pg(mod, url: str, logs, batch: int) -> tuple[float, float]:
    """Every record of `logs` through mod's PgStoreSink in batches of `batch` records
    (what the runner hands a sink that is behind): (wall s, this process's CPU s)."""
    from bench_store import drive_sink
    return drive_sink(mod.PgStoreSink(url, WORKERS), logs, batch)


def main() -> None:
    import argparse

    from bench_store import _sink_at

    ap = argparse.ArgumentParser(description="the PostgreSQL store sink of a git revision against this "
                                             "checkout's, alternating, on the same logs and server")
    ap.add_argument("--compare", required=True, metavar="REV", help="git revision of the 'before' sink")
    ap.add_argument("--devices", type=int, default=20_000)
    ap.add_argument("--readings", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pipeline-batch", type=int, default=2000)
    args = ap.parse_args()
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="gw-pgstore-compare-"))
    server = make_pg_server(fsync=True)
    try:
        before = _sink_at(args.compare, base / "pkg", "pgstore")
        import gw.pipeline.pgstore as after
        logs = make_logs(args.devices, args.readings)
        for rnd in range(args.rounds):
            for label, mod in (("before", before), ("after", after)):
                url = server.database()
                batch = args.pipeline_batch * mod.PgStoreSink.catchup
                wall, cpu = _drive_pg(mod, url, logs, batch)
                print(f"round {rnd + 1} {label:6s}: {args.readings / wall:9,.0f} readings/s, "
                      f"{args.readings / cpu:9,.0f} readings per CPU-second of the sink's process, "
                      f"batch {batch}", flush=True)
                server.drop(url)
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
