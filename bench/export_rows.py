"""Rows per second `gw export` writes from a store of 1,000,000 readings.

    .venv/bin/python bench/export_rows.py [--readings 1000000] [--devices 1000]
        [--dir /tmp/gw-export-bench] [--formats parquet,csv,ndjson] [--rounds 3]

The store is filled once through the store sink itself (gw/pipeline/store.py
StoreSink.write: readings, samples, rollups, devices, in batches of 5,000), the
record `gw bench ingest` sends (2 metrics, a tag), readings 1 ms apart, and kept
in DIR for later runs (delete DIR to fill it again). Then each round runs
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


def fill(data_dir: Path, readings: int, devices: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = open_store(data_dir / STORE_FILE)
    have = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    if have == readings:
        conn.close()
        return
    if have:
        sys.exit(f"{data_dir} holds {have} readings, not {readings}: delete it first")
    sink = StoreSink(conn, 1, raw_retention=float("inf"), rollup_retention={})
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
    conn.close()
    print(f"filled {readings} readings in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


# The floor: a process that imports gw.export and reads the same rows through the
# same source in the same batches, writing nothing.
SCAN = """
import sys
from gw.export import Selection, SqliteSource
src = SqliteSource(sys.argv[1])
sel = Selection(float(sys.argv[2]), float(sys.argv[3]))
with src.snapshot():
    n = src.count(sel)
    rows = sum(len(b) for b in src.batches(sel))
assert rows == n
"""


def export_once(data_dir: Path, fmt: str, out: Path, readings: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    end = START + readings * STEP + 1
    t = time.perf_counter()
    if fmt == "scan":
        subprocess.run([sys.executable, "-c", SCAN, str(data_dir / STORE_FILE), str(START), str(end)],
                       env=env, check=True, stdin=subprocess.DEVNULL)
        return time.perf_counter() - t
    subprocess.run([sys.executable, "-m", "gw.cli", "export", "--data-dir", str(data_dir), "--from", str(int(START)),
                    "--to", str(int(end)), "--format", fmt, "--output", str(out), "--quiet"],
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
    args = ap.parse_args()
    data_dir = args.dir / "data"
    fill(data_dir, args.readings, args.devices)
    formats = args.formats.split(",")
    times: dict[str, list[float]] = {f: [] for f in formats}
    sizes = {}
    for _ in range(args.rounds):
        for fmt in formats:
            out = args.dir / f"export.{fmt}"
            times[fmt].append(export_once(data_dir, fmt, out, args.readings))
            sizes[fmt] = out.stat().st_size if out.exists() else 0
    store_bytes = (data_dir / STORE_FILE).stat().st_size
    print(f"{args.readings} readings, {args.devices} devices, store {store_bytes / 1e6:.0f} MB")
    for fmt in formats:
        best, median = min(times[fmt]), statistics.median(times[fmt])
        ratio = f"  {median / statistics.median(times['scan']):.2f}x the scan" if "scan" in times else ""
        print(f"{fmt:8s} best {best:6.2f} s ({args.readings / best:>9,.0f} rows/s)  median {median:6.2f} s "
              f"({args.readings / median:>9,.0f} rows/s)  file {sizes[fmt] / 1e6:.1f} MB{ratio}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
