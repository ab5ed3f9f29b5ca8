"""How evenly a shared subscription splits messages among its members, and
whether any is lost: 4 members of $share/bench/{topic}, two on each of 2
workers, one publisher (on worker 0) sending N messages at QoS 0 and at QoS 1.

    python bench/shared_split.py [--messages 20000] [--qos 0 1]

Starts `gw serve --workers 2`, places every client on its worker (tests/
placement.py), publishes as fast as the window allows (QoS 1: 64 in flight),
each member acknowledging every QoS 1 message. Prints, per QoS, each member's
count, the largest deviation from an even split (the target: within 10 %) and
the messages lost or duplicated (the target for QoS 1: none). The figures do
not depend on the machine's load: they are counts, not times."""

from __future__ import annotations

import argparse
import select
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchutil import mqtt_only_gw  # noqa: E402
import placement  # noqa: E402


def enc_len(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pkt(first: int, body: bytes) -> bytes:
    return bytes([first]) + enc_len(len(body)) + body


def mstr(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def connect(cid: bytes) -> bytes:
    return pkt(0x10, mstr(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + mstr(cid))


class Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        sock.setblocking(False)

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)

    def packets(self):
        """Whole packets read so far: (first byte, body)."""
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    break
                self.buf += chunk
        except BlockingIOError:
            pass
        out = []
        while len(self.buf) >= 2:
            mult, n, i = 1, 0, 1
            while True:
                if i >= len(self.buf):
                    return out
                b = self.buf[i]
                n += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if len(self.buf) < i + n:
                return out
            out.append((self.buf[0], bytes(self.buf[i:i + n])))
            del self.buf[:i + n]
        return out

    def wait(self, first: int, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            select.select([self.sock], [], [], 0.1)
            for f, body in self.packets():
                if f == first:
                    return body
        raise RuntimeError(f"no packet {first:#x}")


def run(port: int, pids: list[int], qos: int, n: int, tag: str, kill: bool = False) -> dict:
    topic = f"bench/shared/{tag}".encode()
    members = []
    for i in range(4):
        sock, w, _ = placement.connect_on(port, pids, i % 2)
        c = Conn(sock)
        c.send(connect(f"m{i}-{tag}".encode()))
        c.wait(0x20)
        c.send(pkt(0x82, struct.pack("!H", 1) + mstr(b"$share/bench/" + topic) + bytes([qos])))
        assert c.wait(0x90)[2] == qos
        members.append(c)
    sock, _, _ = placement.connect_on(port, pids, 0)
    pub = Conn(sock)
    pub.send(connect(f"pub-{tag}".encode()))
    pub.wait(0x20)
    counts = [0] * 4
    seen = {}
    sent = acked = 0
    window = 64
    started = time.monotonic()
    deadline = started + 120
    live = list(range(4))
    while time.monotonic() < deadline:
        if kill and len(live) == 4 and sent >= n // 2:
            # Member 3 (worker 1) goes away mid-stream: a reset, whatever it holds unacknowledged.
            members[3].sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            members[3].sock.close()
            live.remove(3)
        if sent < n and (qos == 0 or sent - acked < window):
            batch = bytearray()
            while sent < n and (qos == 0 or sent - acked < window) and len(batch) < 65536:
                payload = b"%08d" % sent
                pid = struct.pack("!H", sent % 65535 + 1) if qos else b""
                batch += pkt(0x30 | (qos << 1), mstr(topic) + pid + payload)
                sent += 1
            pub.send(bytes(batch))
        r, _, _ = select.select([members[i].sock for i in live] + [pub.sock], [], [], 0.05)
        for f, body in pub.packets():
            if f == 0x40:
                acked += 1
        for i, m in enumerate(members):
            if i not in live or m.sock not in r:
                continue
            acks = bytearray()
            for f, body in m.packets():
                if f >> 4 != 3:
                    continue
                tl = struct.unpack_from("!H", body)[0]
                pos = 2 + tl
                if (f >> 1) & 3:
                    acks += b"\x40\x02" + body[pos:pos + 2]
                    pos += 2
                counts[i] += 1
                key = body[pos:]
                seen[key] = seen.get(key, 0) + 1
            if acks:
                m.send(bytes(acks))
        if sent == n and (qos == 0 or acked == n) and len(seen) >= n:
            break
        if sent == n and qos == 0 and time.monotonic() - started > 30:
            break
    elapsed = time.monotonic() - started
    for i in live:
        members[i].sock.close()
    pub.sock.close()
    even = n / 4
    return {"qos": qos, "sent": n, "counts": counts, "received": sum(counts),
            "lost": n - len(seen), "duplicated": sum(v - 1 for v in seen.values()),
            "max_deviation_pct": round(max(abs(c - even) for c in counts) / even * 100, 2),
            "seconds": round(elapsed, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--qos", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--kill", action="store_true",
                    help="also a QoS 1 run where member 3 (worker 1) resets its connection halfway: lost must be 0")
    args = ap.parse_args()
    with mqtt_only_gw(2, stop_timeout=30) as (server, port, tmp):
        import psutil
        deadline = time.monotonic() + 10
        while len(psutil.Process(server.pid).children()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        # The workers are the children running the loop; the pipeline process is the last forked.
        kids = sorted(psutil.Process(server.pid).children(), key=lambda p: p.create_time())
        pids = [p.pid for p in kids[:2]]
        for q in args.qos:
            res = run(port, pids, q, args.messages, f"q{q}")
            print(f"QoS {q}: {res['received']:,} of {res['sent']:,} received, per member {res['counts']}, "
                  f"largest deviation from even {res['max_deviation_pct']} %, lost {res['lost']}, "
                  f"duplicated {res['duplicated']} ({res['seconds']} s)", flush=True)
        if args.kill:
            res = run(port, pids, 1, args.messages, "kill", kill=True)
            print(f"QoS 1, member 3 reset halfway: {res['received']:,} deliveries for "
                  f"{res['sent']:,} sent, per member {res['counts']}, lost {res['lost']}, "
                  f"delivered twice {res['duplicated']} (QoS 1 allows it: unacknowledged when it left)", flush=True)


if __name__ == "__main__":
    main()
