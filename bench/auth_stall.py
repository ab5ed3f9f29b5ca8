"""PINGRESP latency of a connected client while a storm of password CONNECTs
runs: the hashes in the event loop (`--auth-threads 0`) against in the
worker's auth threads (the default), same build, same run.

    python bench/auth_stall.py [--duration 10] [--stormers 8] [--rounds 2] [--threads 0 1]

Writes a password file with `gw passwd --hash pbkdf2` ($7$, 210,000
iterations: a check costs about what an argon2id one does), then for each
--threads value, in turn, --rounds times: starts `gw serve --workers 1` (one
worker: the pinging client and the storm share its loop) with
`--auth-cache-seconds 0` (every CONNECT hashes: the worst case, distinct
credentials), connects one anonymous client that sends PINGREQ after PINGREQ
(the next once the PINGRESP came), and --stormers clients that connect with
the password, wait for the CONNACK and close, over and over, for --duration
seconds. Prints the PINGRESP latency p50/p99/max and the CONNECTs answered
per second, as a Markdown table (BENCHMARKS.md). Loopback only; every process
it starts is stopped by pid.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchutil import mqtt_only_gw

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
sys.path.append(str(REPO / "tests"))      # MQTT bytes built by hand (tests/mqtt_bytes.py)

from mqtt_bytes import connect_packet, recv_exact  # noqa: E402

USER, PASSWORD = b"storm", b"storm-password"


def run_once(port: int, duration: float, stormers: int) -> dict:
    stop = threading.Event()
    connects = [0] * stormers

    def storm(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    s.sendall(connect_packet(b"storm-%d-%d" % (k, i), user=USER, password=PASSWORD))
                    if recv_exact(s, 4) == b"\x20\x02\x00\x00":
                        connects[k] += 1
            except OSError:
                pass

    pinger = socket.create_connection(("127.0.0.1", port), timeout=60)
    pinger.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pinger.sendall(connect_packet(b"pinger"))
    assert recv_exact(pinger, 4) == b"\x20\x02\x00\x00"
    threads = [threading.Thread(target=storm, args=(k,), daemon=True) for k in range(stormers)]
    for t in threads:
        t.start()
    time.sleep(0.5)                     # the storm under way
    latencies = []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        t0 = time.perf_counter()
        pinger.sendall(b"\xc0\x00")
        assert recv_exact(pinger, 2) == b"\xd0\x00"
        latencies.append(time.perf_counter() - t0)
    stop.set()
    for t in threads:
        t.join(60)
    pinger.close()
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000  # noqa: E731
    return {"pings": len(latencies), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": latencies[-1] * 1000,
            "connects_per_s": sum(connects) / duration}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--stormers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gw-auth-stall-") as tmp:
        base = Path(tmp)
        pwfile = base / "passwd"
        subprocess.run([sys.executable, "-m", "gw.cli", "passwd", "-c", "-b", "--hash", "pbkdf2", str(pwfile),
                        USER.decode(), PASSWORD.decode()], env=ENV, check=True)
        rows = []
        for rnd in range(args.rounds):
            for threads in args.threads:
                flags = ("--password-file", str(pwfile), "--allow-anonymous", "true",
                         "--auth-cache-seconds", "0", "--auth-threads", str(threads))
                with open(base / f"gw-{threads}.log", "ab") as log, \
                        mqtt_only_gw(1, *flags, tmp_parent=tmp, stderr=log) as (_, port, _):
                    r = run_once(port, args.duration, args.stormers)
                rows.append((threads, rnd, r))
                print(f"auth_threads={threads} round {rnd + 1}: {r}", file=sys.stderr, flush=True)
    print("| auth_threads | round | PINGs | PINGRESP p50 | p99 | max | password CONNECTs/s |")
    print("|---|---|---|---|---|---|---|")
    for threads, rnd, r in rows:
        print(f"| {threads} | {rnd + 1} | {r['pings']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
              f"{r['max_ms']:.1f} ms | {r['connects_per_s']:.1f} |")


if __name__ == "__main__":
    main()
