"""One TLS client at a time, blocking: how long the handshake takes and how long
CONNECT -> CONNACK takes after it, without any load generator's own scheduling.

    python bench/tls_connect_probe.py --port 8883 --cafile certs/ca.pem [--count 300]
"""

from __future__ import annotations

import argparse
import socket
import ssl
import struct
import time


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", keepalive) + struct.pack(">H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8883)
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--count", type=int, default=300)
    args = ap.parse_args()
    ctx = ssl.create_default_context(cafile=args.cafile)
    handshake, connack = [], []
    for i in range(args.count):
        sock = socket.create_connection((args.host, args.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
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
        tls.close()
    print(f"{args.count} connections: TLS handshake p50 {pct(handshake, 50):.2f} ms p99 {pct(handshake, 99):.2f} ms; "
          f"CONNECT->CONNACK p50 {pct(connack, 50):.2f} ms p99 {pct(connack, 99):.2f} ms")


if __name__ == "__main__":
    main()
