"""What a delivery to a subscriber on another worker costs, against one on the
publisher's own worker (the target: at most 2x).

    python bench/cross_worker_cost.py [--runs 8] [--rate 100000]

Starts `gw serve --workers 2`, then runs `gw bench pubsub` 1 publisher -> 1
subscriber, QoS 0, at a fixed rate, several times. The kernel places the two
clients; each run's placement shows in the workers' CPU (one worker idle: both
on the same worker). Prints worker CPU per delivered message for each kind of
run and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchutil import mqtt_only_gw

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--rate", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=4)
    args = ap.parse_args()
    with mqtt_only_gw(2, stop_timeout=30) as (server, port, tmp):
        time.sleep(2)
        import psutil
        workers = [c.pid for c in psutil.Process(server.pid).children()]
        same, cross = [], []
        for i in range(args.runs):
            before = [cpu_seconds(w) for w in workers]
            out = Path(tmp) / "run.json"
            subprocess.run([sys.executable, "-m", "gw.cli", "bench", "pubsub", "--publishers", "1",
                            "--subscribers", "1", "--qos", "0", "--rate", str(args.rate),
                            "--duration", str(args.duration), "--size", "64", "--procs", "1",
                            "--server", f"127.0.0.1:{port}", "--quiet", "--json", str(out)],
                           env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120)
            used = [cpu_seconds(w) - b for w, b in zip(workers, before)]
            received = json.loads(out.read_text())["messages"]["received"]
            per_msg = sum(used) / max(received, 1) * 1e6
            kind = "same" if min(used) < 0.1 * max(used) else "cross"
            (same if kind == "same" else cross).append(per_msg)
            print(f"run {i + 1}: {kind:5} worker CPU {used[0]:.2f} s + {used[1]:.2f} s for {received:,} "
                  f"messages: {per_msg:.2f} us/message", flush=True)
    if same and cross:
        s, c = sorted(same)[len(same) // 2], sorted(cross)[len(cross) // 2]
        print(f"median same-worker {s:.2f} us, cross-worker {c:.2f} us per message: ratio {c / s:.2f}")
    else:
        print("every run landed the same way; run again with more --runs")


if __name__ == "__main__":
    main()
