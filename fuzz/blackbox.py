"""The black-box campaign: a real `gw serve --workers 2` (started here, on free
loopback ports, with the test harness's GwServer) against many concurrent
connections sending mutated, randomly fragmented MQTT streams.

Each connection plays a session (CONNECT with a client id from a small shared
pool, so sessions are taken over, clean session 0 or 1; SUBSCRIBE, PUBLISH at
QoS 0, 1 and 2, the acknowledgements, PINGREQ, UNSUBSCRIBE, DISCONNECT), then
mutates it (bits flipped, packets cut short, duplicated, swapped, remaining
lengths replaced by random ones, random bytes inserted), writes it in random
fragments with short pauses, reads what comes back, and ends it with a
DISCONNECT, a FIN mid-stream or a reset. The campaign runs in six phases,
each followed by a pause with no client, when the workers' RSS is read idle.

At the end: no worker died (same pids, no death in the master's log), the
workers' memory is flat over the run (idle RSS after the last phase within
max(8 MiB, 10 %) of the idle RSS after the second, once warmed up: retained
messages and the shared ids' persistent sessions), and fresh clients (on both
workers) are still served: CONNACK, SUBACK, their own QoS 1 message back.
Prints the figures; exit status 1 when a check fails.

    ./dev fuzz blackbox 120 [--connections 48] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from conftest import GwServer, mqtt_str, packet, read_packet, tcp_connect, wait_for  # noqa: E402

CLIENT_IDS = [f"bb{i}".encode() for i in range(8)]
PHASES = 6              # the campaign's phases, each followed by an idle pause
IDLE_S = 3.0            # the pause: every client gone, the workers' RSS read
SESSION_EXPIRY_S = 2    # persistent sessions (of mutated ids too) end this long after their client
TOPICS = [b"bb/a", b"bb/b", b"bb/a/c", b"telemetry/bbdev", b"$SYS/bb", b"bb/retained"]
FILTERS = [b"bb/#", b"bb/+", b"#", b"bb/a/+", b"telemetry/+", b"+/+/c", b"bb/#/x"]
READING = b'{"seq":%d,"metrics":{"temp_c":%d.5}}'


def connect(rng: random.Random, cid: bytes) -> bytes:
    clean = rng.random() < 0.6
    flags = 0x02 if clean else 0
    tail = mqtt_str(cid)
    if rng.random() < 0.3:
        flags |= 0x04 | (rng.randrange(3) << 3) | (0x20 if rng.random() < 0.3 else 0)
        tail += mqtt_str(rng.choice(TOPICS)) + mqtt_str(b"will")
    return packet(0x10, mqtt_str(b"MQTT") + bytes([4, flags]) + struct.pack("!H", rng.choice((0, 5, 30, 60))) + tail)


def publish(rng: random.Random, pid: int) -> bytes:
    qos = rng.randrange(3)
    topic = rng.choice(TOPICS)
    n = rng.randrange(200)
    payload = READING % (pid, n) if topic.startswith(b"telemetry/") else os.urandom(n)
    retain = 1 if rng.random() < 0.1 else 0
    body = mqtt_str(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return packet(0x30 | (qos << 1) | retain, body)


def session(rng: random.Random) -> list[bytes]:
    """A valid session's packets."""
    pkts = [connect(rng, rng.choice(CLIENT_IDS))]
    pid = rng.randrange(1, 60000)
    for _ in range(rng.randrange(1, 30)):
        pid += 1
        kind = rng.random()
        if kind < 0.15:
            pkts.append(packet(0x82, struct.pack("!H", pid) + b"".join(
                mqtt_str(rng.choice(FILTERS)) + bytes([rng.randrange(3)]) for _ in range(rng.randrange(1, 4)))))
        elif kind < 0.6:
            pkts.append(publish(rng, pid))
        elif kind < 0.75:
            ptype = rng.choice((4, 5, 6, 7))
            pkts.append(bytes([(ptype << 4) | (2 if ptype == 6 else 0), 2]) + struct.pack("!H", rng.randrange(1, 40)))
        elif kind < 0.85:
            pkts.append(b"\xc0\x00")
        elif kind < 0.92:
            pkts.append(packet(0xA2, struct.pack("!H", pid) + mqtt_str(rng.choice(FILTERS))))
        else:
            pkts.append(publish(rng, pid) * 2)
    if rng.random() < 0.5:
        pkts.append(b"\xe0\x00")
    return pkts


def mutate(rng: random.Random, pkts: list[bytes], counts: dict) -> bytes:
    """Mutations of a valid session, most of them small."""
    pkts = list(pkts)
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3, 5))):
        i = rng.randrange(len(pkts))
        p = bytearray(pkts[i])
        m = rng.randrange(7)
        counts[m] = counts.get(m, 0) + 1
        if m == 0 and p:                                  # bit flip
            j = rng.randrange(len(p))
            p[j] ^= 1 << rng.randrange(8)
            pkts[i] = bytes(p)
        elif m == 1:                                      # truncated
            pkts[i] = bytes(p[:rng.randrange(len(p) + 1)])
        elif m == 2:                                      # duplicated
            pkts.insert(i, pkts[i])
        elif m == 3 and len(pkts) > 1:                    # reordered
            j = rng.randrange(len(pkts))
            pkts[i], pkts[j] = pkts[j], pkts[i]
        elif m == 4 and len(p) >= 2:                      # a random remaining length
            n = rng.choice((0, 1, 127, 128, 16383, 2 ** 21, 2 ** 28 - 1, rng.randrange(2 ** 28)))
            enc = bytearray()
            while True:
                b, n = n & 0x7F, n >> 7
                enc.append(b | (0x80 if n else 0))
                if not n:
                    break
            pkts[i] = bytes(p[:1]) + bytes(enc) + bytes(p[2:])
        elif m == 5:                                      # random bytes inserted
            pkts.insert(i, os.urandom(rng.randrange(1, 40)))
        elif m == 6 and p:                                # a random first byte
            p[0] = rng.randrange(256)
            pkts[i] = bytes(p)
    return b"".join(pkts)


class Campaign:
    def __init__(self, port: int, seconds: float, connections: int, seed: int):
        self.port = port
        self.deadline = time.monotonic() + seconds
        self.connections = connections
        self.seed = seed
        self.lock = threading.Lock()
        self.stats = {"sessions": 0, "bytes_sent": 0, "bytes_received": 0, "fragments": 0,
                      "ended_disconnect": 0, "ended_fin": 0, "ended_reset": 0, "server_closed": 0,
                      "connect_failed": 0}
        self.mutations: dict = {}

    def run_one(self, rng: random.Random) -> None:
        pkts = session(rng)
        counts: dict = {}
        stream = mutate(rng, pkts, counts)
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            with self.lock:
                self.stats["connect_failed"] += 1
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = received = fragments = 0
        ending = rng.random()
        # Half of the streams are cut short: the connection ends mid-stream.
        limit = len(stream) if ending < 0.5 else rng.randrange(len(stream) + 1)
        closed_by_server = False
        try:
            sock.settimeout(0.5)
            while sent < limit:
                n = min(limit - sent, rng.choice((1, 2, 3, 5, 8, 64, 512, 4096)))
                sock.sendall(stream[sent:sent + n])
                sent += n
                fragments += 1
                if rng.random() < 0.3:
                    time.sleep(rng.random() * 0.005)
                received += self.read_some(sock)
            received += self.read_some(sock)
        except OSError:
            closed_by_server = True
        finally:
            if ending < 0.7 or closed_by_server:
                sock.close()
                key = "ended_disconnect" if ending < 0.5 else "ended_fin"
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                key = "ended_reset"
        with self.lock:
            self.stats["sessions"] += 1
            self.stats["bytes_sent"] += sent
            self.stats["bytes_received"] += received
            self.stats["fragments"] += fragments
            self.stats[key if not closed_by_server else "server_closed"] += 1
            for m, n in counts.items():
                self.mutations[m] = self.mutations.get(m, 0) + n

    @staticmethod
    def read_some(sock) -> int:
        got = 0
        sock.setblocking(False)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("closed by the server")
                got += len(data)
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            sock.setblocking(True)
            sock.settimeout(0.5)
        return got

    def thread_main(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while time.monotonic() < self.deadline:
            self.run_one(rng)

    def run(self) -> None:
        threads = [threading.Thread(target=self.thread_main, args=(i,), daemon=True)
                   for i in range(self.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, self.deadline - time.monotonic()) + 30)


def fresh_client_served(port: int, n: int) -> list[str]:
    """n fresh clients (the kernel spreads them over the workers): each gets
    CONNACK, SUBACK, and its own QoS 1 message back with a PUBACK."""
    problems = []
    for i in range(n):
        cid = f"fresh-{i}".encode()
        topic = f"fresh/{i}".encode()
        try:
            with tcp_connect(port) as s:
                s.sendall(packet(0x10, mqtt_str(b"MQTT") + bytes([4, 2]) + struct.pack("!H", 30) + mqtt_str(cid)))
                assert read_packet(s) == (0x20, b"\x00\x00"), "no CONNACK 0"
                s.sendall(packet(0x82, struct.pack("!H", 1) + mqtt_str(topic) + b"\x01"))
                assert read_packet(s) == (0x90, b"\x00\x01\x01"), "no SUBACK"
                s.sendall(packet(0x32, mqtt_str(topic) + struct.pack("!H", 2) + b"still served"))
                got = {read_packet(s)[0] for _ in range(2)}
                assert got == {0x40, 0x32}, f"expected PUBACK and the message, got {got}"
        except (AssertionError, OSError, EOFError) as exc:
            problems.append(f"fresh client {i}: {exc!r}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, default=48, help="concurrent connections (threads)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    from gw.stats import Counter

    base = Path(tempfile.mkdtemp(prefix="gw-blackbox-"))
    # What the server keeps by design is bounded, so that growth left is a leak:
    # persistent sessions of mutated client ids expire, their queues and the
    # retained store (mutated topics) have small limits.
    server = GwServer(base, workers=2, listeners=("mqtt",), stats_interval=1,
                      args=["--log-level", "warning", "--session-expiry", str(SESSION_EXPIRY_S),
                            "--max-queued", "100", "--max-retained", "1000"])
    server.start()
    failures: list[str] = []
    try:
        port = server.ports["mqtt"]
        pids = server.worker_pids()
        procs: dict[int, psutil.Process] = {}
        samples: list[tuple[float, dict]] = []
        # The campaign runs in PHASES; after each, every client is gone for IDLE_S and
        # the workers' RSS is read idle: what a session leaves behind shows there,
        # not buried in the outbound buffers of the connections of the moment.
        idle: list[dict] = []
        campaign = Campaign(port, args.seconds / PHASES, args.connections, args.seed)
        t0 = time.monotonic()

        def sample() -> dict:
            rss = {}
            for pid in server.worker_pids():        # a respawned worker is sampled from its start
                if pid not in procs:
                    procs[pid] = psutil.Process(pid)
            for pid, p in procs.items():
                try:
                    rss[pid] = p.memory_info().rss
                except psutil.NoSuchProcess:
                    rss[pid] = None
            return rss

        for phase in range(PHASES):
            campaign.deadline = time.monotonic() + args.seconds / PHASES
            campaign.seed = args.seed * 100 + phase
            runner = threading.Thread(target=campaign.run, daemon=True)
            runner.start()
            while runner.is_alive():
                samples.append((time.monotonic() - t0, sample()))
                runner.join(1.0)
            time.sleep(IDLE_S)
            idle.append(sample())
        counters = server.counters()
        after = server.worker_pids()
        if after != pids:
            failures.append(f"workers changed: {pids} -> {after} (a worker died)")
        deaths = [line for line in server.log().splitlines() if " died " in line]
        if deaths:
            failures.append(f"the master logged worker deaths: {deaths[:3]}")
        # Memory: idle RSS after the first third of the phases (warm: retained
        # messages, persistent sessions of the shared ids) against the last.
        warm = idle[max(0, PHASES // 3 - 1)]
        memory = {}
        for pid in procs:
            start = warm.get(pid)
            end = idle[-1].get(pid)
            peak = max((s[1].get(pid) or 0) for s in samples)
            first = next((s[1][pid] for s in samples if s[1].get(pid)), 0)
            memory[pid] = {"rss_start_mib": round(first / 2 ** 20, 1),
                           "rss_idle_mib": [round(i[pid] / 2 ** 20, 1) if i.get(pid) else None for i in idle],
                           "rss_peak_mib": round(peak / 2 ** 20, 1)}
            if start and end and end - start > max(8 * 2 ** 20, start // 10):
                failures.append(f"worker {pid}: idle RSS grew from {start >> 20} MiB to {end >> 20} MiB "
                                f"after warm-up")
        failures += fresh_client_served(port, 8)
        block = server.block()
        totals = block.totals()
        figures = {
            "seconds": args.seconds, "connections": args.connections, "seed": args.seed,
            "client": campaign.stats,
            "mutations": {name: campaign.mutations.get(i, 0) for i, name in enumerate(
                ("bit_flip", "truncated", "duplicated", "reordered", "random_length", "inserted", "random_type"))},
            "server": {k: counters.get(k) for k in ("conns_accepted", "malformed", "closed", "mqtt_connected",
                                                   "takeovers", "packets_too_large", "sessions_away",
                                                   "sessions_expired") if k in counters},
            "server_raw": {name: int(totals[getattr(Counter, name)]) for name in
                           ("CONNS_ACCEPTED", "MQTT_CONNECTED", "TAKEOVERS", "PACKETS_TOO_LARGE", "CONNS_CURRENT")},
            "workers": memory,
            "worker_deaths": len(deaths),
            "failures": failures,
        }
        print(json.dumps(figures, indent=2, default=str))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    finally:
        server.stop()
    if failures:
        print("blackbox: FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("blackbox: no worker died, memory flat, fresh clients served")
    return 0


if __name__ == "__main__":
    sys.exit(main())
