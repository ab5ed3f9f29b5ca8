"""One TLS client at a time, blocking: how long the handshake takes and how long
CONNECT -> CONNACK takes after it, without any load generator's own scheduling.

    python bench/tls_connect_probe.py --port 8883 --cafile certs/ca.pem [--count 300]
        [--resume] [--tls12] [--server-pid PID]

--resume: every connection after the first offers the session (ticket) of the
one before it, and the probe counts how many the server resumed. --server-pid:
the CPU time (user + system, /proc/PID/stat, the process and its children) the
server spent per connection over the run: with one worker, its cost per
handshake + CONNECT (the client is blocking, one connection at a time).
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import struct
import time
from pathlib import Path


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", keepalive) + struct.pack(">H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] * 1e3


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of its threads and children (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick       # utime, stime
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8883)
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--resume", action="store_true", help="offer the last connection's session")
    ap.add_argument("--tls12", action="store_true", help="TLS 1.2 only (default: TLS 1.3)")
    ap.add_argument("--server-pid", type=int, default=None, help="report the server's CPU per connection")
    args = ap.parse_args()
    ctx = ssl.create_default_context(cafile=args.cafile)
    if args.tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    handshake, connack = [], []
    session, resumed = None, 0
    cpu0 = cpu_seconds(args.server_pid) if args.server_pid else 0.0
    for i in range(args.count):
        sock = socket.create_connection((args.host, args.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        tls = ctx.wrap_socket(sock, server_hostname="localhost", session=session if args.resume else None)
        t1 = time.perf_counter()
        tls.sendall(connect_packet(f"probe-{i}"))
        reply = b""
        while len(reply) < 4:
            chunk = tls.recv(4 - len(reply))
            if not chunk:
                raise SystemExit("connection closed before CONNACK")
            reply += chunk
        t2 = time.perf_counter()
        if reply != b"\x20\x02\x00\x00":
            raise SystemExit(f"unexpected CONNACK {reply!r}")
        handshake.append(t1 - t0)
        connack.append(t2 - t1)
        resumed += tls.session_reused
        session = tls.session       # with TLS 1.3, the ticket came before the CONNACK
        version = tls.version()
        tls.close()
    cpu = (cpu_seconds(args.server_pid) - cpu0) if args.server_pid else None
    print(f"{args.count} connections ({version}, {resumed} resumed): TLS handshake p50 {pct(handshake, 50):.2f} ms "
          f"p99 {pct(handshake, 99):.2f} ms; CONNECT->CONNACK p50 {pct(connack, 50):.2f} ms p99 {pct(connack, 99):.2f} ms"
          + (f"; server CPU {cpu / args.count * 1e6:.0f} us per connection" if cpu is not None else ""))


if __name__ == "__main__":
    main()
