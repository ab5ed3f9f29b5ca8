"""Rows per second `gw export` writes from a store of 1,000,000 readings.

    .venv/bin/python bench/export_rows.py [--readings 1000000] [--devices 1000]
        [--dir /tmp/gw-export-bench] [--formats parquet,csv,ndjson] [--rounds 3]
        [--store sqlite|postgresql|postgresql://USER@HOST:PORT/DBNAME]

The store is filled once through the store's sink itself (gw/pipeline/store.py
StoreSink.write, or gw/pipeline/pgstore.py PgStoreSink.write: readings,
samples, rollups, devices, in batches of 5,000), the record `gw bench ingest`
sends (2 metrics, a tag), readings 1 ms apart, and kept for later runs: the
embedded store in DIR (delete DIR to fill it again), a PostgreSQL database as
it is (an empty one to fill it again). `--store postgresql` alone starts a
throwaway PostgreSQL cluster (tests/pg_server.py: initdb in a temporary
directory, a free loopback port), filled and stopped in the same run. Then each round runs
`gw export` as a subprocess over the whole range, each format once per round
(alternating, so a shared machine's noise falls on all of them), and prints
the best and the median wall time (process start included) and rows/s, and
each format's median time over the scan's (the rows read, nothing written).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gw.pipeline.store import STORE_FILE, StoreSink, open_store    # noqa: E402

START = 1_767_225_600.0         # 2026-01-01T00:00:00Z
STEP = 0.001                    # seconds between two readings


def fill(data_dir: Path, readings: int, devices: int, store: str) -> None:
    if store == "sqlite":
        data_dir.mkdir(parents=True, exist_ok=True)
        conn = open_store(data_dir / STORE_FILE)
        have = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
        sink = StoreSink(conn, 1, raw_retention=float("inf"), rollup_retention={})
        where = str(data_dir)
    else:
        import psycopg
        from gw.pipeline.pgstore import PgStoreSink, describe_url
        with psycopg.connect(store, autocommit=True) as probe:
            found = probe.execute("SELECT to_regclass('readings')").fetchone()[0]
            have = probe.execute("SELECT count(*) FROM readings").fetchone()[0] if found else 0
        # The sink's clock at the readings' time: their day partition is made, nothing is retired.
        sink = PgStoreSink(store, 1, raw_retention=10 * 365 * 86400.0, rollup_retention={}, retention_interval=1e12,
                           clock=lambda: START)
        sink.open()
        conn = None
        where = describe_url(store)
    if have == readings:
        sink.close()
        return
    if have:
        sys.exit(f"{where} holds {have} readings, not {readings}: delete it (or give an empty database) first")
    enc = msgspec.json.Encoder().encode
    t0 = time.perf_counter()
    batch = 5000
    for first in range(0, readings, batch):
        records = []
        for i in range(first, min(readings, first + batch)):
            ts = datetime.fromtimestamp(round(START + i * STEP, 6), timezone.utc)
            records.append((i, enc({"device_id": f"dev-{i % devices:05d}", "ts": ts, "seq": i // devices,
                                    "metrics": {"temp_c": 20 + (i % 97) / 10, "humidity_pct": 40 + (i % 13)},
                                    "tags": {"site": "AAL"}})))
        sink.write([(0, records, first + len(records))])
    sink.close()
    if conn is not None:
        conn.close()
    print(f"filled {readings} readings in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


# The floor: a process that imports gw.export and reads the same rows through the
# same source in the same batches, writing nothing.
SCAN = """
import sys
from gw.export import Selection, SqliteSource
if sys.argv[1].startswith("postgresql://"):
    from gw.export_pg import PgSource
    src = PgSource(sys.argv[1])
else:
    src = SqliteSource(sys.argv[1])
sel = Selection(float(sys.argv[2]), float(sys.argv[3]))
with src.snapshot():
    n = src.count(sel)
    rows = sum(len(b) for b in src.batches(sel))
assert rows == n
"""


def export_once(data_dir: Path, fmt: str, out: Path, readings: int, store: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    end = START + readings * STEP + 1
    t = time.perf_counter()
    if fmt == "scan":
        subprocess.run([sys.executable, "-c", SCAN, str(data_dir / STORE_FILE) if store == "sqlite" else store,
                        str(START), str(end)],
                       env=env, check=True, stdin=subprocess.DEVNULL)
        return time.perf_counter() - t
    subprocess.run([sys.executable, "-m", "gw.cli", "export", "--data-dir", str(data_dir), "--store", store,
                    "--from", str(int(START)), "--to", str(int(end)), "--format", fmt, "--output", str(out),
                    "--quiet"],
                   env=env, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readings", type=int, default=1_000_000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/gw-export-bench"))
    ap.add_argument("--formats", default="scan,parquet,csv,ndjson",
                    help="scan: read the rows, write nothing (the floor)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store", default="sqlite",
                    help="sqlite, a PostgreSQL URL, or postgresql: a throwaway PostgreSQL cluster for this run")
    args = ap.parse_args()
    data_dir = args.dir / "data"
    pg = None
    if args.store == "postgresql":
        sys.path.insert(0, str(REPO / "tests"))
        from pg_server import make_pg_server
        pg = make_pg_server()
        args.store = pg.database()
    try:
        run(args, data_dir)
    finally:
        if pg is not None:
            import shutil
            pg.stop()
            shutil.rmtree(pg.base, ignore_errors=True)


def run(args, data_dir: Path) -> None:
    args.dir.mkdir(parents=True, exist_ok=True)
    fill(data_dir, args.readings, args.devices, args.store)
    formats = args.formats.split(",")
    times: dict[str, list[float]] = {f: [] for f in formats}
    sizes = {}
    for _ in range(args.rounds):
        for fmt in formats:
            out = args.dir / f"export.{fmt}"
            times[fmt].append(export_once(data_dir, fmt, out, args.readings, args.store))
            sizes[fmt] = out.stat().st_size if out.exists() else 0
    if args.store == "sqlite":
        store = f"store {(data_dir / STORE_FILE).stat().st_size / 1e6:.0f} MB"
    else:
        import psycopg
        from gw.pipeline.pgstore import describe_url
        with psycopg.connect(args.store, autocommit=True) as conn:
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        store = f"store {describe_url(args.store)}, {size / 1e6:.0f} MB"
    print(f"{args.readings} readings, {args.devices} devices, {store}")
    for fmt in formats:
        best, median = min(times[fmt]), statistics.median(times[fmt])
        ratio = f"  {median / statistics.median(times['scan']):.2f}x the scan" if "scan" in times else ""
        print(f"{fmt:8s} best {best:6.2f} s ({args.readings / best:>9,.0f} rows/s)  median {median:6.2f} s "
              f"({args.readings / median:>9,.0f} rows/s)  file {sizes[fmt] / 1e6:.1f} MB{ratio}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
