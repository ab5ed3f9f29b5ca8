"""The embedded store's CPU per reading as the runner's batches make it.

    python bench/store_batches.py sizes [--readings 512000] [--sizes 8000,32000,128000,512000]
        the store sink alone (bench_store.drive_sink), 20,000 devices at 100,000/s of
        log time, in batches of each size: readings per CPU-second and per second.
    python bench/store_batches.py paced [--rate 30000] [--seconds 20]
        the pipeline's runner and store sink while the logs grow at --rate (20,000
        devices, 2 metrics): the logs are written beforehand and their durable offset
        moves with the wall clock, as a running server's would. Readings per
        CPU-second of the process (from the pipeline's start until all are stored),
        how long after the last reading became durable the store had it, and the
        batches the runner handed the sink.
    python bench/store_batches.py rows [--readings 512000]
        one decoded batch (20,000 devices): its sample chunk and rollup rows built
        in C (storebatch.series_rows) and with numpy (_samples_python), 5 rounds
        alternating, CPU seconds each.
    --repo PATH: the checkout to measure (its gw and built gw_ext; default this one),
    for A/B runs of two builds alternately.
No gate: figures for BENCHMARKS.md ("The store's batches under a sustained rate").
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("sizes", "paced", "rows"))
    p.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent))
    p.add_argument("--readings", type=int, default=512_000, help="sizes: readings per size")
    p.add_argument("--sizes", default="8000,32000,128000,512000", help="sizes: batch sizes")
    p.add_argument("--rate", type=float, default=30_000.0, help="paced: readings/s becoming durable")
    p.add_argument("--seconds", type=float, default=20.0, help="paced: seconds of readings")
    args = p.parse_args()
    repo = Path(args.repo).resolve()
    sys.path[:0] = [str(repo), str(repo / "bench"), str(repo / "tests")]
    import bench_store as B                                         # noqa: PLC0415
    from gw.pipeline.store import StoreSink, open_store             # noqa: PLC0415
    work = Path(tempfile.mkdtemp(prefix="gw-store-batches-"))
    try:
        if args.mode == "sizes":
            logs = B.make_logs(20_000, args.readings, 100_000.0)
            for size in (int(x) for x in args.sizes.split(",")):
                d = Path(tempfile.mkdtemp(dir=work))
                wall, cpu = B.drive_sink(StoreSink(open_store(d / "store.sqlite"), B.WORKERS), logs, size)
                print(f"batch {size:>7,}: {args.readings / cpu:>9,.0f} readings per CPU-s, "
                      f"{args.readings / wall:>9,.0f}/s wall", flush=True)
                shutil.rmtree(d)
        elif args.mode == "rows":
            rows(args, B, work, StoreSink, open_store)
        else:
            paced(args, B, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average {os.getloadavg()}")


def rows(args, B, work: Path, StoreSink, open_store) -> None:
    import gc                                                       # noqa: PLC0415
    from gw.pipeline import batch                                   # noqa: PLC0415
    logs = B.make_logs(20_000, args.readings, 100_000.0)
    sink = StoreSink(open_store(work / "store.sqlite"), B.WORKERS)
    parts = []
    for w, payloads in enumerate(logs):
        off, recs = 0, []
        for x in payloads:
            recs.append((off, x))
            off += 8 + len(x)
        parts.append((w, recs, off))
    gc.disable()                # as the sink's write does (batch.paused_gc)
    cols = batch.decode(parts, sink._decode, sink._encode, sink._bad)
    sids = list(range(1, len(cols.names) + 1))
    took: dict = {"C (series_rows)": [], "numpy": []}
    for _ in range(5):
        for name, f in (("numpy", sink._samples_python), ("C (series_rows)", sink._samples)):
            t = time.process_time()
            f(cols, sids)
            took[name].append(time.process_time() - t)
    gc.enable()
    sink.close()
    for name, xs in took.items():
        print(f"{name:>16}: {' '.join(f'{x:.3f}' for x in xs)} CPU-s per {args.readings:,}-reading batch")


def paced(args, B, work: Path) -> None:
    from test_pipeline import Durable, settings, wal_api, write_log    # noqa: PLC0415
    from gw.pipeline import Pipeline                                    # noqa: PLC0415
    rate = args.rate
    n = int(rate * args.seconds)
    logs = B.make_logs(20_000, n, rate)
    step = max(1, int(rate / 40))       # 50 ms of log time per log (2 logs)
    marks = []                          # per log: [(records so far, end offset)]
    for w, payloads in enumerate(logs):
        m = []
        for i in range(0, len(payloads), step):
            part = payloads[i:i + step]
            m.append((i + len(part), write_log(work, w, part)))
        marks.append(m)
    durable = Durable(2)
    pipe = Pipeline(settings(work, pipeline_poll_interval=0.025), 2, durable, wal=wal_api())
    sink = pipe.runners[0].sink
    sizes = []
    write = sink.write

    def counted(parts):
        sizes.append(sum(len(r) for _s, r, _n in parts))
        return write(parts)

    sink.write = counted
    done = threading.Event()

    def feed():
        t0 = time.monotonic()
        idx = [0, 0]
        while not done.is_set():
            due = (time.monotonic() - t0) * rate / 2
            for w in range(2):
                m = marks[w]
                while idx[w] < len(m) and m[idx[w]][0] <= due:
                    durable.set(w, m[idx[w]][1])
                    idx[w] += 1
            if all(idx[w] >= len(marks[w]) for w in range(2)):
                return
            time.sleep(0.01)

    threading.Thread(target=feed, daemon=True).start()
    t, cpu = time.perf_counter(), time.process_time()
    pipe.start()
    while sink.written < n:
        time.sleep(0.02)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    done.set()
    pipe.shutdown()
    sizes.sort()
    print(f"{n:,} readings becoming durable at {rate:,.0f}/s: {n / cpu:,.0f} readings per CPU-s; stored "
          f"{wall - args.seconds:.1f} s after the last became durable; {len(sizes)} batches, median "
          f"{sizes[len(sizes) // 2]:,}, largest {sizes[-1]:,}", flush=True)


if __name__ == "__main__":
    main()
