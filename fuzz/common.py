"""What the fuzz targets share: the import path of the instrumented build, a
worker built the way gw/worker.py builds one (stats row, JsonProtocol, HttpApp,
write-ahead log, real listeners on 127.0.0.1:0), driven one loop turn at a time
with Worker.run_once, real client sockets, a well-behaved peer worker at the
other end of a SOCK_SEQPACKET channel, and the scenario machine that turns a
fuzz input into connections, byte streams, fragments, loop turns and closes.

Nothing here is a stand-in for a part of gw: the worker, its codec, framing,
HTTP app, JSON protocol and log are the real ones; the sockets are real
loopback sockets. Only the peer worker is played by the harness (it answers
claims and subscription syncs as a live peer would), so that a worker of
several can be driven alone.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The instrumented extensions (./dev fuzz builds them into .fuzz-build/lib) come
# first; without GW_FUZZ_BUILD the in-place build is used (replaying a crash
# under the normal .venv, or running a target's inputs from a test).
_BUILD = os.environ.get("GW_FUZZ_BUILD")
if _BUILD and not os.path.isfile(os.path.join(_BUILD, "gw_ext", "__init__.py")):
    raise SystemExit(f"GW_FUZZ_BUILD={_BUILD}: no instrumented build there (./dev fuzz makes it)")
for _p in ([str(REPO)] + ([_BUILD] if _BUILD else [])):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

import numpy as np  # noqa: E402

HOST = "127.0.0.1"
MAX_FDS = 4096                 # the worker's fd table; the harness stays far below it
# The end-of-input checks wait for the worker this long: past its own timers
# that may hold a connection (a CONNECT waiting for a peer that never answers
# its claim is settled after connect_settle_timeout, 3 s; a closing connection's
# grace is 2 s), so a connection still there after it is one the worker lost.
SETTLE_SECONDS = 4.5
SETTLE_WAIT_MS = 5             # epoll wait of each turn once the quick turns did not do

# Client ids the inputs share (takeovers): with two workers, crc32 puts c0 and
# c1 at worker 1 (the harness's peer) and c4 and c5 at worker 0 (the worker).
CLIENT_IDS = (b"c0", b"c4", b"c1", b"c5")
TOPICS = (b"a", b"a/b", b"t/x", b"$SYS/x", b"telemetry/dev1", b"a/b/c", b"telemetry/c4", b"x")
FILTERS = (b"#", b"+", b"a/#", b"a/+", b"t/x", b"telemetry/+", b"a/#/b", b"+/b", b"$SYS/#", b"a+",
           b"$share/g/a/#", b"$share/g/#", b"$share//a", b"$share/g")
READING = b'{"seq":%d,"metrics":{"temp_c":%d.5},"tags":{"site":"AAL"}}'

# Channel frame types (gw_ext/frames.pxd), re-exported for the targets.
from gw_ext.frames import (FR_CHECK, FR_CHECKED, FR_CLAIM, FR_EVICT, FR_GRANT, FR_HELLO,  # noqa: E402,F401
                           FR_SHARED_COUNT, FR_SHARED_PUBLISH, FR_PAUSE, FR_PUBLISH, FR_REGISTER, FR_RELEASE, FR_RESUME, FR_RETAIN, FR_SESSION,
                           FR_SUB_ADD, FR_SUB_DEL, FR_SUB_SYNC, FR_SUB_SYNCED)


# --- MQTT packets, built by hand (not with the codec under test) ------------------------

sys.path.append(str(REPO / "tests"))
from mqtt_bytes import connect_packet, mqtt_str, packet, varint  # noqa: E402,F401  (the targets import them from here)


def publish_packet(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 1, retain: bool = False,
                   dup: bool = False) -> bytes:
    body = mqtt_str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0), body)


def subscribe_packet(packet_id: int, filters) -> bytes:
    return packet(0x82, struct.pack("!H", packet_id) + b"".join(mqtt_str(f) + bytes([q]) for f, q in filters))


def unsubscribe_packet(packet_id: int, filters) -> bytes:
    return packet(0xA2, struct.pack("!H", packet_id) + b"".join(mqtt_str(f) for f in filters))


def ack_packet(ptype: int, packet_id: int) -> bytes:
    return bytes([(ptype << 4) | (2 if ptype == 6 else 0), 2]) + struct.pack("!H", packet_id)


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
CONNACK_NEW = b"\x20\x02\x00\x00"


def frame(ftype: int, body: bytes, flags: int = 0, topic_len: int = 0) -> bytes:
    """One channel frame: [type u8][flags u8][topic length u16 LE][body length u32 LE] body."""
    return struct.pack("<BBHI", ftype, flags, topic_len, len(body)) + body


# --- the process-wide set-up ---------------------------------------------------------------

class Harness:
    """Per fuzzing process: a data directory on tmpfs, a stats block, one
    write-ahead log (recovering a log costs fsyncs and a thread: one per process,
    shared by the workers of successive inputs)."""

    def __init__(self, nworkers: int = 3, wal: bool = True):
        from gw.config import Config
        from gw.stats import Counter, StatsBlock

        # Every input makes a new worker, whose rate limiter would log each
        # refusal again: quiet unless asked (GW_FUZZ_LOG=1, replaying an input).
        logging.getLogger("gw").setLevel(logging.DEBUG if os.environ.get("GW_FUZZ_LOG") else logging.CRITICAL)
        # libFuzzer ends the process with exit(), which runs no Python atexit
        # handler: fuzz/run.py makes a scratch directory per run and removes it
        # afterwards (GW_FUZZ_SCRATCH); the atexit handler serves a replay.
        base = os.environ.get("GW_FUZZ_SCRATCH") or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.dir = Path(tempfile.mkdtemp(prefix="gw-fuzz-", dir=base))
        atexit.register(shutil.rmtree, self.dir, True)
        self.Counter = Counter
        # A real stats block (as the master makes it), under a name no server
        # uses; its name is removed at once (the mapping stays), so nothing is
        # left in /dev/shm however the process ends.
        self.block = StatsBlock.create(nworkers, -os.getpid())
        self._unlink_block()
        self.cfg = Config(data_dir=str(self.dir), workers=nworkers)
        self.wal = None
        self.inputs = 0
        if wal:
            from gw_ext.wal import Wal

            self.wal = Wal(self.dir / "wal" / "0", segment_bytes=1 << 20, fsync="off", batch_ms=0.0,
                           max_pending=1 << 20, counters=self.block.rows[0])
            self.wal.recover()

    def _unlink_block(self) -> None:
        try:
            self.block.path.unlink()
        except OSError:
            pass

    def counter(self, name: str, row: int = 0) -> int:
        return int(self.block.rows[row, getattr(self.Counter, name)])

    def tidy(self) -> None:
        """Between inputs: fresh counters; the log's old segments go now and then."""
        self.block.rows[:] = 0
        self.inputs += 1
        if self.wal is not None and self.inputs % 500 == 0:
            self.wal.retain(self.wal.durable_offset, None, 2 << 20)


class WorkerUnderTest:
    """A Worker (gw_ext/loop.pyx) set up as gw/worker.py does, with real
    listeners on 127.0.0.1:0 and, for nworkers > 1, a harness-played peer per
    other slot."""

    def __init__(self, h: Harness, *, nworkers: int = 1, protos=("mqtt",), ack_sink: bool = False,
                 limits: dict | None = None, telemetry: bool = True, peer_answers: bool = True):
        from gw.http_api import HttpApp
        from gw.health import Health
        from gw.ingest import Ingest
        from gw.worker import apply_limits
        from gw.jsonproto import JsonProtocol
        from gw.metrics import render
        from gw_ext.dedup import DedupTable
        from gw_ext.loop import Worker

        self.h = h
        h.tidy()
        self.ingest = Ingest(h.cfg.max_batch, h.block.rows[0])
        self.json_protocol = JsonProtocol(self.ingest)
        self.worker = w = Worker(0, h.block.rows[0], h.block.rows, nworkers, self.json_protocol, MAX_FDS)
        apply_limits(w, h.cfg)
        w.telemetry_topic = "telemetry" if telemetry else ""
        w.tick_ms = 0
        for key, value in (limits or {}).items():
            setattr(w, key, value)
        self.listeners: dict[str, socket.socket] = {}
        self.ports: dict[str, int] = {}
        for proto in protos:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, 0))
            s.listen(128)
            s.setblocking(False)
            self.listeners[proto] = s
            self.ports[proto] = s.getsockname()[1]
        self.app = HttpApp(h.cfg, worker_index=0, ingest=self.ingest, render_metrics=lambda: render(h.block),
                           health=Health(h.block, {p: f"{HOST}:{port}" for p, port in self.ports.items()},
                                         str(h.dir), 0),
                           counters=h.block.rows[0])
        w.http_app = self.app
        w.ingest = self.ingest
        w.set_dedup(DedupTable(4096, 60.0))
        if h.wal is not None:
            w.set_wal(h.wal)
        self.peers: dict[int, StubPeer] = {}
        for p in range(1, nworkers):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            theirs.setblocking(False)
            w.add_peer(p, ours.fileno())
            self.peers[p] = StubPeer(p, ours, theirs, peer_answers)
        for proto, s in self.listeners.items():
            w.add_listener(s.fileno(), proto, None, ack_sink)

    def turn(self, timeout_ms: int = 0) -> None:
        self.worker.run_once(timeout_ms)
        for peer in self.peers.values():
            peer.pump()

    def connections(self) -> int:
        return self.h.counter("CONNS_CURRENT")

    def close(self) -> None:
        """Frees the worker (its connections' fds with it), then the listeners and channels."""
        w = self.worker
        self.worker = None
        w.http_app = None
        w.ingest = None
        del w
        for s in self.listeners.values():
            s.close()
        for peer in self.peers.values():
            peer.close()


class StubPeer:
    """Another worker, as far as the channel shows: it answers a CLAIM with a
    GRANT naming no previous owner and a SUB_SYNC with SUB_SYNCED, as a live
    peer without the client would; fuzz inputs send it frames of their own."""

    def __init__(self, index: int, ours: socket.socket, theirs: socket.socket, answers: bool):
        self.index = index
        self.ours = ours            # the worker's end (registered with add_peer)
        self.theirs = theirs        # ours to write and read
        self.answers = answers      # False: answers wait (a slow peer) until release()
        self.held: list[bytes] = []
        self.frames_in = 0

    def pump(self) -> None:
        out = []
        while True:
            try:
                dgram = self.theirs.recv(1 << 22)
            except (BlockingIOError, InterruptedError):
                break
            if not dgram:
                break
            pos = 0
            while pos + 8 <= len(dgram):
                ftype, _flags, _tlen, blen = struct.unpack_from("<BBHI", dgram, pos)
                body = dgram[pos + 8:pos + 8 + blen]
                pos += 8 + blen
                self.frames_in += 1
                if ftype == FR_CLAIM and len(body) >= 8:
                    # token u32, clean u8, user (has u8, len u16, name), client id
                    ulen = struct.unpack_from("<H", body, 6)[0] if body[5] else 0
                    out.append(frame(FR_GRANT, body[:4] + b"\xff" + body[8 + ulen:]))
                elif ftype == FR_SUB_SYNC and len(body) == 4:
                    out.append(frame(FR_SUB_SYNCED, body))
        if not self.answers:
            self.held += out
        elif out:
            self.send(b"".join(out))

    def release(self) -> None:
        """From now on answers at once, and sends those it held."""
        self.answers = True
        held, self.held = self.held, []
        for f in held:
            self.send(f)

    def send(self, datagram: bytes) -> bool:
        try:
            self.theirs.send(datagram)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False        # EMSGSIZE: larger than the socket takes

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


class Client:
    """A real client socket with the byte stream the input wrote for it; the
    stream is sent in fragments the input chooses."""

    def __init__(self, port: int):
        self.sock = socket.create_connection((HOST, port), timeout=5)
        # Each fragment leaves at once (Nagle would hold a small one for the
        # server's delayed ACK, and the loop turns would run without it).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.stream = bytearray()
        self.sent = 0
        self.received = bytearray()
        self.open = True

    def send(self, n: int) -> None:
        if not self.open or self.sent >= len(self.stream):
            return
        chunk = bytes(self.stream[self.sent:self.sent + n]) if n else bytes(self.stream[self.sent:])
        try:
            self.sent += self.sock.send(chunk)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.open = False       # the server closed it

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.open = False
                return
            if not data:
                self.open = False
                return
            if len(self.received) < (1 << 20):
                self.received += data

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self.open = False

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.open = False


# --- reading an input ---------------------------------------------------------------------

class Input:
    """Reads a fuzz input as a program: bytes, small numbers, choices; past its
    end every read gives zeros, so any input is a complete program."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def u16(self) -> int:
        return self.byte() << 8 | self.byte()

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    def pick(self, seq):
        return seq[self.byte() % len(seq)]


class Failure(AssertionError):
    """The worker is inconsistent or stopped serving (a finding, like a crash)."""


# --- the scenario machine -----------------------------------------------------------------

MAX_CLIENTS = 6
MAX_OPS = 400


class Scenario:
    """Runs one input against a WorkerUnderTest: an op byte, then its operands.

    Ops on clients: OPEN a connection, RAW (append input bytes to its stream),
    TEMPLATE (append a packet or request the protocol makes valid, from a small
    pool of ids and topics), SEND (write the next fragment of its stream, of a
    length the input picks, 0: all), TURN (loop turns), CLOSE (FIN, also mid-
    packet), RESET (RST), SHUT (half close), READ (read what the server sent),
    FLIP (a bit of the stream not sent yet). Targets add their own ops (frames
    from a peer). Then the end-of-input checks of the target run.
    """

    N_OPS = 10

    def __init__(self, wut: WorkerUnderTest, data: bytes, proto: str):
        self.wut = wut
        self.inp = Input(data)
        self.proto = proto
        self.clients: list[Client] = []
        self.all_clients: list[Client] = []

    def template(self, inp: Input) -> bytes:
        raise NotImplementedError

    def extra_op(self, op: int, inp: Input) -> None:
        """Ops past N_OPS (targets that have more)."""

    def client(self, inp: Input) -> Client | None:
        live = [c for c in self.clients if c.open]
        if not live:
            return None
        return live[inp.byte() % len(live)]

    def run(self) -> None:
        inp = self.inp
        ops = 0
        while inp.left() > 0 and ops < MAX_OPS:
            ops += 1
            op = inp.byte() % (self.N_OPS + getattr(self, "N_EXTRA", 0))
            if op == 0:
                if sum(c.open for c in self.clients) < MAX_CLIENTS:
                    c = Client(self.wut.ports[self.proto])
                    self.clients.append(c)
                    self.all_clients.append(c)
            elif op == 1:
                c = self.client(inp)
                n = inp.byte()
                if c is not None:
                    c.stream += inp.take(n)
            elif op == 2:
                c = self.client(inp)
                if c is not None:
                    c.stream += self.template(inp)
            elif op == 3:
                c = self.client(inp)
                n = inp.byte()
                if c is not None:
                    c.send(n)
            elif op == 4:
                for _ in range(inp.byte() % 3 + 1):
                    self.wut.turn(0)
            elif op == 5 or op == 6:
                c = self.client(inp)
                if c is not None:
                    c.close(reset=(op == 6))
            elif op == 7:
                c = self.client(inp)
                if c is not None:
                    c.shutdown_write()
            elif op == 8:
                c = self.client(inp)
                if c is not None:
                    c.drain()
            elif op == 9:
                c = self.client(inp)
                at = inp.u16()
                bit = inp.byte() & 7
                if c is not None and len(c.stream) > c.sent:
                    i = c.sent + at % (len(c.stream) - c.sent)
                    c.stream[i] ^= 1 << bit
            else:
                self.extra_op(op, inp)
            if not ops % 8:
                self.wut.turn(0)       # the loop keeps turning whatever the input does

    def close_all_and_settle(self) -> None:
        """Every client goes; the worker must notice each and hold none."""
        for peer in self.wut.peers.values():
            peer.release()          # a CONNECT waiting for its claim settles, then sees its client gone
        for c in self.all_clients:
            if c.open:
                c.drain()
            # Also a client the server already shut (its FIN read): until our
            # socket closes too, a lingering HTTP close waits for it.
            c.close()
        self.settle(lambda: self.wut.connections() == 0, "every connection closed")
        sessions = self.wut.h.counter("SESSIONS_CURRENT")
        if sessions != 0:
            raise Failure(f"no client is connected, yet SESSIONS_CURRENT is {sessions}")

    def settle(self, done, what: str) -> None:
        deadline = time.monotonic() + SETTLE_SECONDS
        i = 0
        while time.monotonic() < deadline:
            if done():
                return
            # Without waiting first: what the worker must notice is usually there.
            self.wut.turn(0 if i < 8 else SETTLE_WAIT_MS)
            i += 1
        if done():
            return
        raise Failure(f"the worker did not reach '{what}' within {SETTLE_SECONDS} s "
                      f"(connections: {self.wut.connections()})")

    def fresh_client_served(self, request: bytes, answered) -> bytes:
        """A new client sends a valid request; the worker must answer it."""
        c = Client(self.wut.ports[self.proto])
        c.stream += request
        c.send(0)
        try:
            self.settle(lambda: (c.drain(), answered(bytes(c.received)))[1],
                        "a fresh client's answer")
            return bytes(c.received)
        finally:
            c.close()
            self.settle(lambda: self.wut.connections() == 0, "the fresh client closed")


# --- one target's run -----------------------------------------------------------------

_HARNESS: Harness | None = None


def shared_harness() -> Harness:
    """The process's one Harness, made for the first input."""
    global _HARNESS
    if _HARNESS is None:
        _HARNESS = Harness()
    return _HARNESS


def run_scenario(wut, make_scenario, fresh_request: bytes, served) -> None:
    """Runs the scenario make_scenario() makes to its end, closes its clients,
    then checks that a fresh client sending fresh_request is served (served:
    what it received -> bool); the worker is closed whatever happens."""
    try:
        s = make_scenario()
        s.run()
        s.close_all_and_settle()
        s.fresh_client_served(fresh_request, served)
    finally:
        wut.close()


def connack_new(received: bytes) -> bool:
    """A fresh MQTT client got CONNACK accepted, no session present."""
    return received[:4] == CONNACK_NEW


def fuzz(test_one_input, instrumented: tuple[str, ...] = ()) -> None:
    """libFuzzer's loop (atheris) over test_one_input, the `instrumented`
    modules imported with coverage first."""
    import importlib

    import atheris

    if instrumented:
        with atheris.instrument_imports(include=sorted({m.split(".")[0] for m in instrumented})):
            for name in instrumented:
                importlib.import_module(name)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
