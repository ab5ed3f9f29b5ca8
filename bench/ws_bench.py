"""MQTT over WebSocket against plain MQTT over TCP, on the same `gw serve
--workers 2` (both listeners open) in the same run, rounds alternating which
transport goes first:

- fan-in: QoS 0 and QoS 1, 4 publishers -> 1 subscriber, 64 B, flat out (as
  bench/compare.py runs them), `gw bench pubsub --transport ws|mqtt`:
  messages received per second, and the server's CPU time per message (the
  workers' user + system time over the run / messages received: on a shared
  machine the rate moves with the neighbours, the CPU per message much less);
- connections: N clients (default 10,000) ramped over 15 s, held, `gw bench
  --transport ws|mqtt --server-pid`: how many connected, and the server's
  memory per connection (its RSS at full minus before, over the clients).

    python bench/ws_bench.py                         # both, 2 rounds
    python bench/ws_bench.py --only fanin --rounds 3 --duration 10
    python bench/ws_bench.py --only conns --clients 10000

Not a pass/fail test: it prints the figures and the ratios (ws / tcp);
BENCHMARKS.md records them with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import PY, REPO, RESULTS, stop  # noqa: E402
from benchutil import free_port, wait_port  # noqa: E402

FANIN = {
    "fanin-qos0": ["--publishers", "4", "--subscribers", "1", "--qos", "0"],
    "fanin-qos1": ["--publishers", "4", "--subscribers", "1", "--qos", "1", "--inflight", "32"],
}
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


class Server:
    """gw serve with an mqtt and a ws listener."""

    def __init__(self, workdir: Path, workers: int):
        self.dir = workdir
        self.workers = workers
        self.ports = {"mqtt": free_port(), "ws": free_port()}
        self.proc = None

    def __enter__(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [PY, "-m", "gw.cli", "serve", "--workers", str(self.workers),
             "--mqtt", f"127.0.0.1:{self.ports['mqtt']}", "--ws", f"127.0.0.1:{self.ports['ws']}",
             "--mqtts", "off", "--wss", "off", "--json", "off", "--jsons", "off", "--http", "off", "--https", "off",
             "--certs", str(self.dir / "certs"), "--data-dir", str(self.dir / "data"),
             "--stats-interval", "0", "--log-level", "warning"],
            cwd=self.dir, stdout=open(self.dir / "gw.log", "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=ENV)
        for port in self.ports.values():
            wait_port(port, self.proc)
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        stop(self.proc)

    def worker_cpu(self) -> float:
        """User + system seconds of the master's children (workers, pipeline)."""
        total = 0.0
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                t = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total


def transport_args(server: Server, transport: str) -> list[str]:
    return ["--transport", transport, "--server", f"127.0.0.1:{server.ports['ws' if transport == 'ws' else 'mqtt']}"]


def fanin(server: Server, transport: str, args: list[str], duration: float, out: Path) -> dict:
    cpu0 = server.worker_cpu()
    cmd = [PY, "-m", "gw.cli", "bench", "pubsub", "--size", "64", "--duration", str(duration), *args,
           *transport_args(server, transport), "--json", str(out), "--quiet"]
    subprocess.run(cmd, env=ENV, stdin=subprocess.DEVNULL, timeout=600, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    cpu = server.worker_cpu() - cpu0
    r = json.loads(out.read_text())
    received = r["messages"]["received"]
    return {"rate": float(r["messages"]["received_per_s"]), "lost": r["delivery"]["lost"],
            "cpu_us_per_msg": cpu / received * 1e6 if received else float("nan")}


def conns(server: Server, transport: str, clients: int, rampup: float, hold: float, out: Path) -> dict:
    cmd = [PY, "-m", "gw.cli", "bench", "--clients", str(clients), "--rampup", str(rampup),
           "--duration", str(hold), "--keepalive", "30", *transport_args(server, transport),
           "--server-pid", str(server.proc.pid), "--json", str(out), "--quiet"]
    subprocess.run(cmd, env=ENV, stdin=subprocess.DEVNULL, timeout=900, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    r = json.loads(out.read_text())
    srv = r.get("server", {})
    return {"connected": r["connected"], "clients": r["clients"], "success": r["success_rate_pct"],
            "rss_per_conn": srv.get("rss_per_connection"), "connect_p99_ms": r["connect_ms"].get("p99_ms")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--rampup", type=float, default=15.0)
    ap.add_argument("--hold", type=float, default=10.0)
    ap.add_argument("--only", choices=("fanin", "conns"))
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    fan: dict = {}
    con: dict = {}
    with tempfile.TemporaryDirectory(prefix="gw-ws-bench-") as tmp:
        for r in range(args.rounds):
            order = ["ws", "mqtt"] if r % 2 == 0 else ["mqtt", "ws"]
            if args.only in (None, "fanin"):
                with Server(Path(tmp) / f"fanin-{r}", args.workers) as server:
                    for name, sc_args in FANIN.items():
                        for transport in order:
                            f = fanin(server, transport, sc_args, args.duration,
                                      RESULTS / f"ws-{r}-{name}-{transport}.json")
                            fan.setdefault((name, transport), []).append(f)
                            print(f"round {r} {name} {transport}: {f['rate']:,.0f} msg/s, "
                                  f"{f['cpu_us_per_msg']:.2f} us server CPU/msg, lost {f['lost']}",
                                  file=sys.stderr, flush=True)
            if args.only in (None, "conns"):
                for transport in order:
                    # A fresh server per transport: its RSS baseline is its own.
                    with Server(Path(tmp) / f"conns-{r}-{transport}", args.workers) as server:
                        c = conns(server, transport, args.clients, args.rampup, args.hold,
                                  RESULTS / f"ws-{r}-conns-{transport}.json")
                    con.setdefault(transport, []).append(c)
                    print(f"round {r} conns {transport}: {c['connected']:,}/{c['clients']:,} connected, "
                          f"{(c['rss_per_conn'] or 0) / 1024:.2f} KiB/conn, connect p99 {c['connect_p99_ms']} ms",
                          file=sys.stderr, flush=True)
    if fan:
        print("| scenario | tcp (msg/s) | ws (msg/s) | ws / tcp | tcp server CPU (us/msg) | ws server CPU (us/msg) |")
        print("|---|---|---|---|---|---|")
        for name in FANIN:
            if (name, "ws") not in fan:
                continue
            tcp = statistics.median(f["rate"] for f in fan[(name, "mqtt")])
            ws = statistics.median(f["rate"] for f in fan[(name, "ws")])
            tcp_cpu = statistics.median(f["cpu_us_per_msg"] for f in fan[(name, "mqtt")])
            ws_cpu = statistics.median(f["cpu_us_per_msg"] for f in fan[(name, "ws")])
            print(f"| {name} | {tcp:,.0f} | {ws:,.0f} | {ws / tcp:.2f} | {tcp_cpu:.2f} | {ws_cpu:.2f} |")
    if con:
        print("| transport | connected (each round) | server RSS per connection (KiB, median) |")
        print("|---|---|---|")
        for transport in ("mqtt", "ws"):
            rows = con.get(transport, [])
            per = [c["rss_per_conn"] for c in rows if c["rss_per_conn"] is not None]
            done = ", ".join("%d/%d" % (c["connected"], c["clients"]) for c in rows)
            name = "tcp" if transport == "mqtt" else "ws"
            print(f"| {name} | {done} | {statistics.median(per) / 1024:.2f} |" if per else f"| {name} | {done} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
