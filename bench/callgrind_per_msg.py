"""Instructions a gw worker executes per delivered message, counted by callgrind.

    python bench/callgrind_per_msg.py                          # this checkout
    python bench/callgrind_per_msg.py --build B=/path/to/other/checkout
    python bench/callgrind_per_msg.py --only fanin-qos1 --duration 4

A count of instructions does not depend on what else runs on the machine, so
two builds (each a checkout with its extensions built: `./dev build`) can be
held against each other on a shared one. For each build it starts `gw serve
--workers 1` (plain MQTT only) under `valgrind --tool=callgrind`, counting
only inside the worker's loop turn (`--toggle-collect=*Worker_turn`: reads,
parsing, routing, encoding, writes, the user side of the syscalls); then for
each of compare.py's throughput scenarios and each MQTT version it warms the
worker up (a few packets with patience), runs `gw bench` flat out against it
(the MQTT 5.0 publishers with a Topic Alias, as in v5_vs_311.py), ends the
worker with SIGTERM once the run is over (callgrind writes its count as it
exits; the master forks a fresh worker for the next run) and divides the
count by the messages sent and received. The worker is some 50 times slower
under callgrind, so a run sees far fewer messages than a real one, and how
many a read holds (batching) differs: QoS 0 runs shed messages to the
subscriber as they would on a slow machine, so their figures move a few per
cent from run to run; QoS 1 is flow-controlled and steadier. One worker: a
message never crosses to another.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from compare import PY, REPO, SCENARIOS, free_port

DEFAULT = ("fanin-qos1", "fanin-qos0", "fanout-qos0")
VERSIONS = ("3.1.1", "5")


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"callgrind_per_msg: gw exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(1)
    raise SystemExit("callgrind_per_msg: gw did not listen in time")


def worker_during(proc: subprocess.Popen, port: int, bench: subprocess.Popen) -> int:
    """The worker: the master's child holding the bench's connections while it runs."""
    while bench.poll() is None:
        for ch in psutil.Process(proc.pid).children():
            try:
                if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                       for c in ch.net_connections(kind="tcp")):
                    return ch.pid
            except psutil.Error:
                pass
        time.sleep(0.3)
    return 0    # not seen (a loaded machine): the count is then the largest of the files


def warm_up(port: int) -> None:
    """A few packets of every kind the runs use, MQTT 3.1.1 and 5.0, with
    patience: a new worker under callgrind takes seconds over its first ones,
    longer than gw bench's preflight waits. Their instructions count too (a
    few dozen packets against tens of thousands)."""
    from gwbench import mqtt

    for version in (4, 5):
        for qos in (0, 1):
            s = socket.create_connection(("127.0.0.1", port), 300)
            s.settimeout(300)
            s.sendall(mqtt.connect(b"warm-%d-%d" % (version, qos), 60, version=version))
            s.recv(64)
            s.sendall(mqtt.subscribe(1, b"warm/#", qos, version=version))
            s.recv(64)
            s.sendall(mqtt.publish(b"warm/x", b"w" * 64, qos, 1 if qos else 0, version=version,
                                   alias=1 if version == 5 else 0))
            got = b""
            while got.count(b"w" * 64) < 1:
                more = s.recv(4096)
                if not more:
                    raise SystemExit("callgrind_per_msg: the warm-up's connection was closed")
                got += more
            s.sendall(b"\xe0\x00")
            s.close()


def one_run(work: Path, label: str, path: str, name: str, v: str, duration: float) -> tuple:
    """One gw under callgrind, one bench run against it; the worker's count
    once gw has stopped (callgrind writes it as the process ends)."""
    work.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=*Worker_turn",
         f"--callgrind-out-file={work}/cg.%p",
         PY, "-m", "gw.cli", "serve", "--workers", "1", "--mqtt", f"127.0.0.1:{port}",
         "--mqtts", "off", "--json", "off", "--jsons", "off", "--http", "off", "--https", "off",
         "--ws", "off", "--wss", "off", "--data-dir", str(work / "data"), "--stats-interval", "0",
         "--log-level", "warning"],
        cwd=work, stdout=open(work / "gw.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": path})
    try:
        wait_port(port, proc)
        bargs = list(SCENARIOS[name].bench_args)
        bargs[bargs.index("--duration") + 1] = f"{duration:g}"
        out = work / "bench.json"
        warm_up(port)
        bench = subprocess.Popen(
            [PY, "-m", "gw.cli", "bench", *bargs, "--mqtt-version", v,
             "--server", f"127.0.0.1:{port}", "--json", str(out), "--quiet"],
            env={**os.environ, "PYTHONPATH": path}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(work / "bench.err", "ab"))
        wpid = worker_during(proc, port, bench)
        bench.wait(900)
        time.sleep(1)
    finally:
        proc.terminate()
        try:
            proc.wait(300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ir = 0
    for f in ([work / f"cg.{wpid}"] if wpid else sorted(work.glob("cg.*"))):
        # Only a worker's loop turns are counted: the master's file, and any
        # other's, hold (next to) nothing.
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("totals:") or line.startswith("summary:"):
                ir = max(ir, int(line.split()[1]))
    r = json.loads(out.read_text())
    got = r["messages"]["received"]
    sent = r["messages"]["sent"]
    row = (label, name, v, ir, sent, got, ir / got if got else float("nan"), ir / sent if sent else float("nan"))
    print(f"{label} {name} MQTT {v}: {ir:,} Ir, sent {sent:,}, received {got:,}, "
          f"{row[6]:,.0f} Ir/received, {row[7]:,.0f} Ir/sent", file=sys.stderr, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", default=[], metavar="NAME=PATH",
                    help="a checkout to measure (default: this one, as 'this')")
    ap.add_argument("--only", action="append", choices=sorted(n for n, s in SCENARIOS.items() if s.kind == "pubsub"))
    ap.add_argument("--version", action="append", choices=VERSIONS)
    ap.add_argument("--duration", type=float, default=4.0, help="publishing seconds of each run")
    args = ap.parse_args()
    builds = [b.split("=", 1) for b in args.build] or [["this", str(REPO)]]
    names = args.only or list(DEFAULT)
    versions = args.version or list(VERSIONS)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="gw-cg-"))      # kept: callgrind's files, gw's log (callgrind_annotate)
    print(f"callgrind_per_msg: files in {tmp}", file=sys.stderr)
    if True:
        for label, path in builds:
            for name in names:
                for v in versions:
                    rows.append(one_run(tmp / f"{label}-{name}-{v}", label, path, name, v, args.duration))
    print("\n| build | scenario | MQTT | worker Ir | sent | received | Ir per received message | per sent |")
    print("|---|---|---|---|---|---|---|---|")
    for label, name, v, ir, sent, got, per, per_sent in rows:
        print(f"| {label} | {name} | {v} | {ir:,} | {sent:,} | {got:,} | {per:,.0f} | {per_sent:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
