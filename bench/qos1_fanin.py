"""QoS 1 fan-in (bench/compare.py's `fanin-qos1`: 4 publishers -> 1
subscriber, 64 B, 32 in flight, flat out) against `gw serve --workers 2`, with
what a shared machine moves least beside the rate: the workers' CPU time
(user + system, from /proc) per message delivered, and the load generator's.

    python bench/qos1_fanin.py --rounds 4 --duration 8
    python bench/qos1_fanin.py --base /path/to/other/checkout     # A/B, same run
    python bench/qos1_fanin.py --serve-args "--max-inflight 256"   # a setting A/B'd against the default
    python bench/qos1_fanin.py --scenario fanin-qos0 --base ...    # the QoS 0 rows the same way

With --base (a checkout with its extensions built) or --serve-args, every round
runs both servers, the order alternating; the load generator is this
checkout's `gw bench` for both. Prints each run and the medians; not a
pass/fail test (BENCHMARKS.md records the figures with the command).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import free_port, wait_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")
SCENARIOS = {   # as bench/compare.py runs them
    "fanin-qos1": ["--publishers", "4", "--subscribers", "1", "--qos", "1", "--inflight", "32"],
    "fanin-qos0": ["--publishers", "4", "--subscribers", "1", "--qos", "0"],
    "fanout-qos0": ["--publishers", "1", "--subscribers", "10", "--qos", "0"],
    "latency-20k": ["--publishers", "1", "--subscribers", "1", "--qos", "0", "--rate", "20000"],
}


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of pid's descendants still running (the workers)."""
    total = 0.0
    stack = children(pid)
    while stack:
        p = stack.pop()
        total += cpu_seconds(p)
        try:
            stack += children(p)
        except OSError:
            pass
    return total


def run_one(root: Path, serve_args: list[str], duration: float, workdir: Path, tag: str,
            scenario: str) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root)}
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [PY, "-m", "gw.cli", "serve", "--workers", "2", "--mqtt", f"127.0.0.1:{port}",
         "--mqtts", "off", "--ws", "off", "--wss", "off", "--json", "off", "--jsons", "off",
         "--http", "off", "--https", "off", "--certs", str(workdir / "certs"),
         "--data-dir", str(workdir / "data"), "--stats-interval", "0", "--log-level", "warning", *serve_args],
        cwd=workdir, stdout=open(workdir / "gw.log", "ab"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, env=env)
    try:
        wait_port(port, proc)
        time.sleep(0.5)
        out = workdir / f"{tag}.json"
        cpu0 = tree_cpu(proc.pid)
        t0 = os.times()
        subprocess.run([PY, "-m", "gw.cli", "bench", "pubsub", "--size", "64", "--duration", str(duration), *SCENARIOS[scenario],
                        "--server", f"127.0.0.1:{port}", "--json", str(out), "--quiet"],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
        t1 = os.times()
        cpu = tree_cpu(proc.pid) - cpu0
        r = json.loads(out.read_text())
    finally:
        proc.terminate()
        proc.wait(30)
    received = r["messages"]["received"]
    gen = (t1.children_user + t1.children_system) - (t0.children_user + t0.children_system)
    return {"rate": float(r["messages"]["received_per_s"]), "lost": r["delivery"]["lost"],
            "received": received, "p99_ms": float(r["latency_ms"].get("p99_ms") or "nan"),
            "cpu_us": cpu / received * 1e6 if received else float("nan"),
            "gen_us": gen / received * 1e6 if received else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="fanin-qos1",
                    help="the QoS 0 ones: to check a change costs them nothing")
    ap.add_argument("--base", type=Path, help="another checkout (extensions built): run as B")
    ap.add_argument("--serve-args", default="", help="extra `gw serve` flags for A")
    ap.add_argument("--base-serve-args", default="", help="extra `gw serve` flags for B")
    args = ap.parse_args()
    variants = [("A", REPO, shlex.split(args.serve_args))]
    if args.base is not None or args.base_serve_args or args.serve_args:
        variants.append(("B", args.base or REPO, shlex.split(args.base_serve_args)))
    results: dict[str, list[dict]] = {v[0]: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="gw-qos1-") as tmp:
        for rnd in range(args.rounds):
            order = variants if rnd % 2 == 0 else variants[::-1]
            for name, root, serve_args in order:
                r = run_one(root, serve_args, args.duration, Path(tmp) / f"{name}{rnd}", f"{name}{rnd}", args.scenario)
                results[name].append(r)
                print(f"round {rnd} {name}: {r['rate']:,.0f} msgs/s received, lost {r['lost']}, "
                      f"workers {r['cpu_us']:.3f} us CPU/msg, load generator {r['gen_us']:.3f} us CPU/msg, "
                      f"latency p99 {r['p99_ms']:.3f} ms",
                      flush=True)
    for name, root, serve_args in variants:
        rs = results[name]
        print(f"{name} ({root}{' ' + ' '.join(serve_args) if serve_args else ''}): median "
              f"{statistics.median(r['rate'] for r in rs):,.0f} msgs/s, "
              f"{statistics.median(r['cpu_us'] for r in rs):.3f} us worker CPU/msg, "
              f"{statistics.median(r['gen_us'] for r in rs):.3f} us load generator CPU/msg, "
              f"latency p99 {statistics.median(r['p99_ms'] for r in rs):.3f} ms, "
              f"lost {sum(r['lost'] for r in rs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
