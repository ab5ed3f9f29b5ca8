"""How long persisting a large state holds the event loop: a worker with many
clean_session=0 sessions, one of which changes all the time, so a snapshot
is taken every persist_interval (1 s).

    python bench/persist_stall.py [--sessions 10000] [--queued 5] [--duration 15]

Starts `gw serve --workers 1`, creates the sessions (each with three
subscriptions and `--queued` QoS 1 messages waiting for it), then for
`--duration` seconds: a churn client changes its session every 50 ms, and a
probe client sends PINGREQ every 2 ms and times each PINGRESP. Prints the
probe's round trips (median, p99, max: the loop's stall as a client sees it),
the longest loop turns from the worker's turn-duration histogram (when the
build has one), and the snapshots written meanwhile. For comparing two builds
on the same machine; never a pass/fail figure.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import struct
import sys
import time
from pathlib import Path

from benchutil import mqtt_only_gw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "tests"))      # MQTT bytes built by hand (tests/mqtt_bytes.py)

from mqtt_bytes import mqtt_str, packet  # noqa: E402


def connect_packet(client_id: bytes, clean: bool) -> bytes:
    return packet(0x10, b"\x00\x04MQTT\x04" + bytes([0x02 if clean else 0]) + b"\x00\x3c" + mqtt_str(client_id))


def subscribe_packet(pid: int, filters) -> bytes:
    return packet(0x82, struct.pack("!H", pid) + b"".join(mqtt_str(f) + bytes([q]) for f, q in filters))


def unsubscribe_packet(pid: int, filters) -> bytes:
    return packet(0xA2, struct.pack("!H", pid) + b"".join(mqtt_str(f) for f in filters))


def publish_packet(topic: bytes, payload: bytes, qos: int, pid: int = 1) -> bytes:
    return packet(0x30 | (qos << 1), mqtt_str(topic) + (struct.pack("!H", pid) if qos else b"") + payload)


class Reader:
    """Whole MQTT packets from a blocking socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, bytearray()

    def packet(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 2:
                length, mult, i = 0, 1, 1
                while i < len(self.buf):
                    b = self.buf[i]
                    length += (b & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not b & 0x80:
                        if len(self.buf) >= i + length:
                            first, body = self.buf[0], bytes(self.buf[i:i + length])
                            del self.buf[:i + length]
                            return first, body
                        break
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buf += chunk


def create_sessions(port: int, count: int, batch: int = 250) -> None:
    """count clean_session=0 sessions with three subscriptions each, their clients gone."""
    for start in range(0, count, batch):
        socks = []
        for i in range(start, min(count, start + batch)):
            s = socket.create_connection(("127.0.0.1", port))
            cid = b"persist-%06d" % i
            s.sendall(connect_packet(cid, False) + subscribe_packet(1, [
                (b"fleet/%d/cmd" % i, 1), (b"fleet/%d/cfg/+" % i, 1), (b"broadcast/#", 1)]))
            socks.append(s)
        for s in socks:
            r = Reader(s)
            assert r.packet()[0] == 0x20
            assert r.packet()[0] == 0x90
            s.sendall(b"\xe0\x00")
            s.close()


def queue_messages(port: int, count: int) -> None:
    """count QoS 1 messages on broadcast/x: queued in every away session."""
    s = socket.create_connection(("127.0.0.1", port))
    r = Reader(s)
    s.sendall(connect_packet(b"persist-publisher", True))
    assert r.packet()[0] == 0x20
    for pid in range(1, count + 1):
        s.sendall(publish_packet(b"broadcast/x", b"queued message %d" % pid, 1, pid))
        assert r.packet()[0] == 0x40
    s.sendall(b"\xe0\x00")
    s.close()


def loop_turn_histogram(server_pid: int):
    """The worker's loop-turn histogram words, or None when the build has none."""
    from gw.stats import Counter, HIST_WORDS, StatsBlock
    hist = getattr(Counter, "HIST_LOOP_TURN", None)
    if hist is None:
        return None
    block = StatsBlock.open(server_pid)
    try:
        return [int(v) for v in block.totals()[hist:hist + HIST_WORDS]]
    finally:
        block.close()


def counter(server_pid: int, name: str) -> int | None:
    from gw.stats import Counter, StatsBlock
    c = getattr(Counter, name, None)
    if c is None:
        return None
    block = StatsBlock.open(server_pid)
    try:
        return int(block.totals()[c])
    finally:
        block.close()


def run(args) -> None:
    with mqtt_only_gw(1, "--persist-interval", "1", "--max-queued", str(max(args.queued, 1)),
                      tmp_parent=args.tmp, stderr=None, stop_timeout=120) as (server, port, tmp):
        t0 = time.monotonic()
        create_sessions(port, args.sessions)
        queue_messages(port, args.queued)
        time.sleep(3)                       # the first snapshots of the new state are written
        size = os.path.getsize(f"{tmp}/data/sessions-0.msgpack")
        print(f"{args.sessions} sessions, {args.queued} queued messages each, set up in "
              f"{time.monotonic() - t0:.1f} s; sessions file {size / 1e6:.1f} MB", flush=True)

        churn = socket.create_connection(("127.0.0.1", port))
        churn_r = Reader(churn)
        churn.sendall(connect_packet(b"persist-churn", False))
        assert churn_r.packet()[0] == 0x20
        probe = socket.create_connection(("127.0.0.1", port))
        probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        probe_r = Reader(probe)
        probe.sendall(connect_packet(b"persist-probe", True))
        assert probe_r.packet()[0] == 0x20

        hist_before = loop_turn_histogram(server.pid)
        writes_before = counter(server.pid, "PERSIST_WRITES")
        rtts = []
        end = time.monotonic() + args.duration
        next_churn = 0.0
        pid = 1
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_churn:
                next_churn = now + 0.05
                pid = pid % 60000 + 1
                if pid % 2:
                    churn.sendall(subscribe_packet(pid, [(b"churn/%d" % pid, 1)]))
                else:
                    churn.sendall(unsubscribe_packet(pid, [b"churn/%d" % (pid - 1)]))
                churn_r.packet()
            t = time.perf_counter()
            probe.sendall(b"\xc0\x00")
            first, _ = probe_r.packet()
            assert first == 0xD0
            rtts.append(time.perf_counter() - t)
            time.sleep(0.002)
        hist_after = loop_turn_histogram(server.pid)
        writes_after = counter(server.pid, "PERSIST_WRITES")
        rtts.sort()
        ms = lambda v: f"{v * 1e3:.2f} ms"           # noqa: E731
        print(f"probe PINGREQ round trips over {args.duration:.0f} s ({len(rtts)}): median "
              f"{ms(rtts[len(rtts) // 2])}, p99 {ms(rtts[int(len(rtts) * 0.99)])}, "
              f"max {ms(rtts[-1])}", flush=True)
        if hist_before is not None:
            from gw.stats import HIST_BOUNDS_NS, HIST_BUCKETS
            delta = [a - b for a, b in zip(hist_after, hist_before)]
            top = max((i for i in range(HIST_BUCKETS) if delta[i]), default=None)
            if top is not None:
                bound = "over 10 s" if top >= len(HIST_BOUNDS_NS) else f"<= {HIST_BOUNDS_NS[top] / 1e6:g} ms"
                over1 = sum(delta[i] for i in range(HIST_BUCKETS)
                            if i >= len(HIST_BOUNDS_NS) or HIST_BOUNDS_NS[i] > 1_000_000)
                print(f"loop turns: {delta[31]}, the longest {bound}; {over1} longer than 1 ms", flush=True)
        if writes_before is not None:
            print(f"snapshots written meanwhile: {writes_after - writes_before}", flush=True)
        probe.close()
        churn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--queued", type=int, default=5)
    ap.add_argument("--duration", type=float, default=15)
    ap.add_argument("--tmp", default=None, help="where the data dir goes (a real disk, not tmpfs)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
