"""Memory per idle TLS connection and the worker's CPU per TLS message, with
each record layer (tls_record_layer = gw | openssl), one after the other in the
same run.

    python bench/tls_record_memory.py [--clients 2000] [--messages 20000] [--layers gw,openssl]

For each layer: starts `gw serve --workers 2` with only an MQTT-over-TLS
listener; reads the RSS of every process of the server (master, workers,
pipeline: /proc/PID/smaps_rollup) idle; opens --clients TLS 1.3 connections
(Python's ssl, each past CONNECT/CONNACK) and keeps them idle; reads the RSS
again (after 2 s) and divides the growth by the connections. Then one TLS
subscriber and one TLS publisher: --messages QoS 0 PUBLISHes of 64 bytes,
and the CPU time (user + system, /proc/PID/stat) the workers spent over
them, per message (each is read once and written once, both through TLS).
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "bench"))
from tls_connect_probe import connect_packet  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_pids(master: int) -> list[int]:
    pids = [master]
    try:
        pids += [int(c) for c in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    except OSError:
        pass
    return pids


def rss_kib(pids) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def cpu_s(pids) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(f[11]) + int(f[12])) / tick
    return total


def read_packet(sock) -> tuple[int, bytes]:
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf
    first = exact(1)[0]
    length, shift = 0, 0
    while True:
        b = exact(1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, exact(length)


def run(layer: str, clients: int, messages: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix=f"gw-tlsmem-{layer}-"))
    port = free_port()
    cmd = [sys.executable, "-m", "gw.cli", "serve", "--workers", "2", "--mqtt", "off", "--json", "off",
           "--http", "off", "--ws", "off", "--jsons", "off", "--https", "off", "--wss", "off",
           "--mqtts", f"127.0.0.1:{port}", "--data-dir", str(base / "data"), "--certs", str(base / "certs"),
           "--tls-record-layer", layer, "--max-connections", str(clients + 100)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(base / "gw.log", "wb"))
    try:
        ca = base / "certs" / "ca.pem"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                if ca.exists():
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "gw did not start"
            time.sleep(0.2)
        time.sleep(2)
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        pids = server_pids(proc.pid)
        before = rss_kib(pids)
        socks = []
        for i in range(clients):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
            s.sendall(connect_packet(f"mem-{i}"))
            assert read_packet(s) == (0x20, b"\x00\x00")
            socks.append(s)
        time.sleep(2)
        after = rss_kib(pids)
        per_conn = (after - before) / clients
        # CPU per message: one TLS publisher, one TLS subscriber.
        sub = socks[0]
        sub.sendall(bytes([0x82, 9]) + struct.pack("!H", 1) + struct.pack("!H", 4) + b"m/t1" + b"\x00")
        assert read_packet(sub)[0] == 0x90
        pub = socks[1]
        payload = b"x" * 64
        packet = bytes([0x30, 2 + 4 + len(payload)]) + struct.pack("!H", 4) + b"m/t1" + payload
        cpu0 = cpu_s(pids)
        sent = 0
        got = 0
        sub.setblocking(False)
        buf = bytearray()
        while got < messages:
            if sent < messages and sent - got < 500:
                pub.sendall(packet * 50)
                sent += 50
            try:
                buf += sub.recv(1 << 20)
            except (ssl.SSLWantReadError, BlockingIOError):
                time.sleep(0.0005)
                continue
            got = len(buf) // len(packet)
        cpu1 = cpu_s(pids)
        for s in socks:
            s.close()
        return {"layer": layer, "rss_idle_kib": before, "rss_connected_kib": after,
                "rss_per_connection_kib": round(per_conn, 2),
                "cpu_us_per_message": round((cpu1 - cpu0) / messages * 1e6, 2)}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--layers", default="gw,openssl")
    args = ap.parse_args()
    for layer in args.layers.split(","):
        print(run(layer, args.clients, args.messages), flush=True)


if __name__ == "__main__":
    main()
