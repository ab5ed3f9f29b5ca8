"""How long GET /metrics takes with many connections open (the target: < 5 ms
with 10,000 connections).

    python bench/metrics_under_load.py [--connections 10000] [--scrapes 200]

Starts `gw serve --workers 2`, holds --connections idle MQTT connections with
`gw bench` (connection scenario), then times --scrapes GET /metrics requests
on one keep-alive connection, 50 ms apart, and prints the percentiles.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import free_port, wait_port

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def scrape(sock: socket.socket) -> tuple[float, int, bytes]:
    t0 = time.perf_counter()
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, body = buf.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return time.perf_counter() - t0, int(head.split(b" ")[1]), body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--scrapes", type=int, default=200)
    args = ap.parse_args()
    mqtt, http = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "gw.cli", "serve", "--workers", "2", "--mqtt", f"127.0.0.1:{mqtt}",
             "--mqtts", "off", "--json", "off", "--jsons", "off", "--http", f"127.0.0.1:{http}", "--https", "off", "--ws", "off", "--wss", "off",
             "--data-dir", f"{tmp}/data", "--stats-interval", "0", "--log-level", "warning"],
            cwd=tmp, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        load = None
        try:
            wait_port(http, server)
            hold = 10 + args.scrapes * 0.06
            load = subprocess.Popen(
                [sys.executable, "-m", "gw.cli", "bench", "--server", f"127.0.0.1:{mqtt}",
                 "--clients", str(args.connections), "--rampup", "5", "--duration", str(hold)],
                cwd=tmp, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            sock = socket.create_connection(("127.0.0.1", http))
            deadline = time.monotonic() + 30
            while True:
                _, _, body = scrape(sock)
                line = next(li for li in body.split(b"\n") if li.startswith(b"gw_connections "))
                open_now = int(float(line.split()[1]))
                if open_now >= args.connections or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            times = []
            for _ in range(args.scrapes):
                took, status, body = scrape(sock)
                assert status == 200
                times.append(took)
                time.sleep(0.05)
            times.sort()
            pct = lambda p: times[min(len(times) - 1, int(p / 100 * len(times)))] * 1000  # noqa: E731
            print(f"GET /metrics with {open_now:,} connections open ({len(body):,} bytes, {args.scrapes} scrapes): "
                  f"p50 {pct(50):.2f} ms / p99 {pct(99):.2f} ms / max {times[-1] * 1000:.2f} ms")
        finally:
            for proc in (load, server):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGINT if proc is load else signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


if __name__ == "__main__":
    main()
