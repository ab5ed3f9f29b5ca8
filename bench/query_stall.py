"""MQTT latency while the query API runs slow store queries: in the event loop
(`--query-threads 0`, how every query ran before the query threads) against
in the query threads (the default), same build, same run.

    python bench/query_stall.py [--rate 5000] [--duration 10] [--hammers 4] [--threads 0 2]

Builds a store (the pipeline's schema) whose queries take tens of
milliseconds: 200,000 alerts, all open, so `GET /v1/alerts?state=acked` scans
every one of them (SQLite time, the GIL released), and 10,000 raw samples of
one metric, so `GET /v1/devices/dev_00/metrics?...&limit=10000` returns them
all (Python time: rows to JSON, the GIL held). Then, for each --threads value,
starts `gw serve --workers 1` on it (one worker: the MQTT clients and the
queries share its loop) and runs, three times each (in turn):

* `gw bench pubsub --publishers 1 --subscribers 1 --qos 0 --rate R` alone
  (the baseline), and
* the same while --hammers keep-alive HTTP connections send one of the slow
  queries after the other (closed loop; half of them each kind),

and prints the MQTT publish-to-deliver p50/p99/max and the queries answered
per second, as a Markdown table (BENCHMARKS.md). Loopback only; every process
it starts is stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

ALERTS = 200_000
SAMPLES = 10_000
T0 = 1758585600.0                  # 2025-09-23T00:00:00Z
SLOW_SQL = "/v1/alerts?state=acked&limit=10"
SLOW_PY = "/v1/devices/dev_00/metrics?metric=temp_c&from=1758585600&to=1758672000&limit=10000"


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def build_store(data_dir: Path) -> None:
    from gw.pipeline.store import insert_samples, open_store

    db = open_store(data_dir / "store.sqlite")
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    insert_samples(db, "dev_00", "temp_c", [T0 + i for i in range(SAMPLES)],
                   [20 + math.sin(i / 60) for i in range(SAMPLES)])
    db.execute("INSERT INTO devices VALUES ('dev_00', ?, ?, '{\"temp_c\": 20.0}', '{}', ?)",
               (T0, T0 + SAMPLES, SAMPLES))
    db.executemany("INSERT INTO alerts (device_id, metric, ts, value, zscore, mean, std, state, created, acked) "
                   "VALUES (?, 'temp_c', ?, 40.0, 6.5, 21.0, 3.0, 'open', ?, NULL)",
                   ((f"dev_{i % 100:02d}", T0 + i, T0 + i + 1) for i in range(ALERTS)))
    db.execute("COMMIT")
    db.close()


class Server:
    def __init__(self, base: Path, data_dir: Path, threads: int):
        self.mqtt, self.http = free_ports(2)
        self.log = open(base / f"gw-threads{threads}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gw.cli", "serve", "--workers", "1", "--mqtt", f"127.0.0.1:{self.mqtt}",
             "--mqtts", "off", "--json", "off", "--jsons", "off", "--http", f"127.0.0.1:{self.http}",
             "--https", "off", "--ws", "off", "--wss", "off", "--data-dir", str(data_dir), "--stats-interval", "0", "--log-level", "warning",
             "--query-threads", str(threads)],
            cwd=base, env=ENV, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.http), timeout=1).close()
                socket.create_connection(("127.0.0.1", self.mqtt), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("gw serve did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def query(sock: socket.socket, target: str) -> int:
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return int(head.split(b" ")[1])


def hammer(port: int, target: str, stop: threading.Event, out: list) -> None:
    """Slow queries, one after the other, on one keep-alive connection."""
    sock = socket.create_connection(("127.0.0.1", port))
    done = errors = 0
    took = []
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            status = query(sock, target)
            took.append(time.perf_counter() - t0)
            if status == 200:
                done += 1
            else:
                errors += 1
    finally:
        sock.close()
    out.append((done, errors, took))


def pubsub(server: Server, rate: int, duration: float, base: Path, hammers: int) -> dict:
    result = base / "pubsub.json"
    if result.exists():
        result.unlink()
    stop = threading.Event()
    out: list = []
    threads = [threading.Thread(target=hammer, args=(server.http, SLOW_SQL if i % 2 == 0 else SLOW_PY, stop, out))
               for i in range(hammers)]
    for t in threads:
        t.start()
    started = time.monotonic()
    bench = subprocess.run(
        [sys.executable, "-m", "gw.cli", "bench", "pubsub", "--server", f"127.0.0.1:{server.mqtt}",
         "--publishers", "1", "--subscribers", "1", "--qos", "0", "--size", "64", "--rate", str(rate),
         "--duration", str(duration), "--procs", "1", "--quiet", "--json", str(result)],
        cwd=base, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        timeout=duration + 120)
    elapsed = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(30)
    if bench.returncode not in (0, 1) or not result.exists():
        raise SystemExit(f"gw bench failed: {bench.stderr.decode()[-2000:]}")
    r = json.loads(result.read_text())
    lat = r.get("latency_ms", {})
    answered = sum(o[0] for o in out)
    took = sorted(x for o in out for x in o[2])
    ms = lambda v: None if v is None else round(v, 2)      # noqa: E731
    return {"p50": ms(lat.get("p50_ms")), "p99": ms(lat.get("p99_ms")), "max": ms(lat.get("max_ms")),
            "lost": r["delivery"]["lost"], "queries_per_s": answered / elapsed if hammers else None,
            "query_p50": took[len(took) // 2] * 1000 if took else None,
            "query_errors": sum(o[1] for o in out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=5000, help="MQTT QoS 0 messages/s (fixed rate)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of each measurement")
    ap.add_argument("--hammers", type=int, default=4, help="HTTP connections sending slow queries")
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 2], help="--query-threads values to compare")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="gw-query-stall-"))
    try:
        data = base / "data"
        data.mkdir()
        t0 = time.perf_counter()
        build_store(data)
        print(f"store: {ALERTS:,} alerts, {SAMPLES:,} samples ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        rows = []
        for threads in args.threads:
            server = Server(base, data, threads)
            try:
                with socket.create_connection(("127.0.0.1", server.http)) as sock:
                    for target in (SLOW_SQL, SLOW_PY):        # warm up (and show) each slow query alone
                        t1 = time.perf_counter()
                        assert query(sock, target) == 200, target
                        alone = (time.perf_counter() - t1) * 1000
                        print(f"threads {threads}: {target} alone {alone:.1f} ms", file=sys.stderr)
                for rnd in range(args.rounds):
                    for hammers in (0, args.hammers):
                        r = pubsub(server, args.rate, args.duration, base, hammers)
                        r.update(threads=threads, hammers=hammers, round=rnd)
                        print(r, file=sys.stderr)
                        rows.append(r)
            finally:
                server.stop()
        print(f"\n| query threads | slow-query clients | MQTT p50 (ms) | MQTT p99 (ms) | MQTT max (ms) | lost | "
              f"queries answered/s | query p50 (ms) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            qps = "-" if r["queries_per_s"] is None else f"{r['queries_per_s']:.0f}"
            qp50 = "-" if r["query_p50"] is None else f"{r['query_p50']:.1f}"
            print(f"| {r['threads'] if r['threads'] else '0 (in the loop)'} | {r['hammers']} | {r['p50']} | "
                  f"{r['p99']} | {r['max']} | {r['lost']} | {qps} | {qp50} |")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
