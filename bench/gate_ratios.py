"""Measures every speed gate of bench/ several times and prints the spread.

    .venv/bin/python bench/gate_ratios.py [--runs 7] [gate ...]

Each gate is a ratio, baseline time / our time, measured in one run (see
benchutil.py); each row here is what the gate judges (the median of five
measurements), measured --runs times. Its minimum must sit between half the highest ratio seen here
(a 2x regression at the luckiest moment still fails) and the lowest (the noise
passes); the table says whether it does. BENCHMARKS.md ("Speed gates") holds
the figures and the commands.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))      # bench_store uses the pipeline tests' helpers
sys.path.insert(0, str(HERE.parent))

from benchutil import gated_ratio  # noqa: E402

MODULES = ("bench_codec", "bench_dedup", "bench_topics", "bench_wal", "bench_wheel", "bench_store",
           "bench_query", "bench_ingest")


def all_gates(names: set[str]):
    for name in MODULES:
        mod = importlib.import_module(name)
        gates = mod.gates() if hasattr(mod, "gates") else [mod.GATE]
        for gate in gates:
            if not names or gate.name in names:
                yield gate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("gates", nargs="*", help="gate names (codec, dedup, topics, wal, wheel, "
                                                 "aggregation, query_rollup, query_raw, ingest_json); default all")
    args = parser.parse_args()
    rows = []
    for gate in all_gates(set(args.gates)):
        ratios = []
        for _ in range(args.runs):
            ratio, _figures = gated_ratio(gate)
            ratios.append(ratio)
            print(f"{gate.name}: {ratio:.2f}", file=sys.stderr, flush=True)
        lo, hi, mid = min(ratios), max(ratios), statistics.median(ratios)
        verdict = ("ok" if hi / 2 < gate.minimum < lo else
                   "noise fails" if gate.minimum >= lo else "2x passes")
        rows.append((gate.name, len(ratios), lo, mid, hi, hi / lo, gate.minimum, verdict))
    print("| gate | runs | min | median | max | max/min | gate | a 2x regression (max/2) | verdict |")
    print("|------|-----:|----:|-------:|----:|--------:|-----:|-----:|---------|")
    for name, n, lo, mid, hi, spread, minimum, verdict in rows:
        print(f"| {name} | {n} | {lo:.2f} | {mid:.2f} | {hi:.2f} | {spread:.2f} | {minimum:g} | "
              f"{hi / 2:.2f} | {verdict} |")
    return 0 if all(r[-1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
