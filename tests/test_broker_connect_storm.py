"""A storm of CONNECTs on a few client ids: every CONNECT gets its CONNACK.

One thread (each CONNECT after the last connection's end, as an
interoperability suite goes) or six at once, raw-socket clients keep
reconnecting 4 client ids, on both gw workers (placed), with clean session
0 and 1 mixed, keep-alive 0 among others, some with a will, CONNECTs
written whole or in fragments; each connection then leaves with a
DISCONNECT, a FIN, a reset (SO_LINGER 0), stays open to be taken over (read
by a watcher thread, or never read), or goes before its CONNACK could
arrive. Some subscribe, some publish QoS 1 or 2 (up to 64 KiB) on the
others' topics, so persistent sessions carry subscriptions and queued
messages when they move between workers, and connections left unread fill
up.

What must hold, every time:
- every CONNECT that waits for it gets a CONNACK within CONNACK_BOUND
  seconds (a correctness bound, not a timing target), as the first packet,
  return code 0, session present 0 with clean session 1 [MQTT-3.2.2-1];
- a connection kept open whose CONNACK arrived before another CONNECT with
  its client id was sent is closed by the server [MQTT-3.1.4-2] within
  CLOSE_BOUND of that CONNECT's CONNACK (one read meanwhile), or of the
  storm's end (one left unread);
- when the storm is over, at most one connection per client id is alive;
- on gw: no internal error was contained, no frame between workers was
  malformed, and every id connects again afterwards on both workers;
- on gw: no CONNECT was settled by connect_settle_timeout and no session
  was dropped for coming after it (sessions_late). The setting is meant for a
  worker that died or hung; here it is SETTLE_TIMEOUT, far above
  CONNACK_BOUND, so a CONNECT that only it would have ended (two workers'
  CONNECTs each waiting for the other) fails the bound rather than passing
  inside it.

The run is seeded (GW_STORM_SEED, else a fresh seed, printed); the threads'
interleaving is the machine's, so a failure names its seed and the history
of the client id concerned. GW_STORM_SECONDS sets the storm's length
(default 5 s per broker and number of threads). Each storm prints its
longest CONNACK wait; GW_STORM_SHOW_LONGEST=1 also prints that client id's
history around it, gw's counters and its log lines about settling."""

from __future__ import annotations

import os
import queue
import random
import selectors
import socket
import struct
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field

import pytest

pytest.register_assert_rewrite("broker_fixtures")   # before its import: its asserts report values
from broker_fixtures import (RawClient, brokers, connect_packet_full, publish_packet_full,  # noqa: E402
                             start_broker)
import fragproxy  # noqa: E402
from conftest import GwServer, get_counter, send_fragmented, stop_and_check, subscribe_packet, tcp_connect  # noqa: E402
from placement import connect_on  # noqa: E402

pytest_plugins = ["broker_fixtures"]    # the broker_proc and broker fixtures

CONNACK_BOUND = 5.0     # seconds: every CONNECT's CONNACK arrives within this, every time
CLOSE_BOUND = 5.0       # seconds: a connection taken over is closed within this
SETTLE_TIMEOUT = 30.0   # gw's connect_settle_timeout here: a wait only it ends fails CONNACK_BOUND
UNSETTLED = "could not be settled in time"      # gw's log line when connect_settle_timeout ends a wait
CLIENT_IDS = 4
THREADS = (1, 6)        # one client at a time (each CONNECT after the last one's end), or six at once
STORM_SECONDS = float(os.environ.get("GW_STORM_SECONDS", "5"))
MIN_CONNECTS = 5 if fragproxy.enabled() else 20      # answered CONNECTs a storm must have made, at least
HISTORY = 30            # a failure's report shows its id's CONNECTs this many attempts around it
# keep: left open, read by the watcher (which notes when the server closes it);
# stall: left open and never read, so a takeover finds output waiting for it.
ENDINGS = ("disconnect", "fin", "rst", "keep", "stall", "abandon_fin", "abandon_rst")
KEEPALIVES = (0, 0, 30, 60)
# Payloads published to the ids' topics: the large ones fill the sockets of
# connections kept open (not read) and make a moving session's frame go in pieces.
PAYLOADS = (8, 8, 8, 2000, 65536)
if fragproxy.enabled():
    # The fragmenting proxy (one Python thread re-cutting every stream, with
    # pauses) relays a 64 KiB message in seconds: smaller ones, fewer threads.
    PAYLOADS = (8, 8, 8, 2000)
    THREADS = (1, 3)


@dataclass
class Attempt:
    """One connection of the storm and what happened to it."""
    n: int
    thread: int
    cid: str
    clean: bool
    keepalive: int
    worker: int | None
    pieces: str
    ending: str
    subscribe: bool
    publish_to: str | None
    will: bool
    payload: int
    qos: int
    sent_at: float = 0.0
    connack_at: float | None = None
    closed_at: float | None = None      # when the watcher saw the server close it (keep)
    present: bool | None = None
    events: list = field(default_factory=list)
    sock: socket.socket | None = None

    def note(self, t0: float, what: str) -> None:
        # "t=": the storm's clock (seconds since it began), not how long anything waited;
        # the CONNACK's own wait is its note's "after ... s".
        self.events.append(f"t={time.monotonic() - t0:.3f} {what}")

    def describe(self) -> str:
        return (f"#{self.n} thread {self.thread} id {self.cid} clean={int(self.clean)} keepalive={self.keepalive} "
                f"worker={self.worker} {self.pieces} then {self.ending}"
                f"{' +sub' if self.subscribe else ''}"
                f"{f' +pub QoS {self.qos} {self.payload} B' if self.publish_to else ''}"
                f"{' +will' if self.will else ''}: "
                + "; ".join(self.events))


def placed(broker, pids: list[int], worker: int | None) -> socket.socket:
    """A TCP connection on gw worker `worker` (any on Mosquitto). The kernel's
    sock_diag finds the worker fast (tests/placement.py); behind the
    fragmenting proxy only the harness knows which upstream connection is whose."""
    if not broker.is_gw:
        return tcp_connect(broker.port)
    if fragproxy.enabled():
        return broker.socket_on(worker)[0]
    return connect_on(broker.port, pids, worker)[0]


class Storm:
    """One storm: `threads` clients, each its own seeded random, reconnecting
    the ids for `seconds`; every attempt is kept (Attempt) for the checks and
    the report."""

    def __init__(self, broker, seed: str, seconds: float, threads: int):
        self.threads = threads
        self.broker = broker
        self.seed = seed
        self.seconds = seconds
        self.ids = [broker.client_id(f"storm{i}") for i in range(CLIENT_IDS)]
        self.lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.failures: list[str] = []
        self.t0 = time.monotonic()
        self.watcher = Watcher(self.t0)
        self.pids = broker.worker_pids() if broker.is_gw else []

    # --- one client ------------------------------------------------------------

    def plan(self, rng: random.Random, thread: int) -> Attempt:
        with self.lock:
            n = len(self.attempts)
            a = Attempt(n, thread, rng.choice(self.ids), rng.random() < 0.5, rng.choice(KEEPALIVES),
                        rng.choice((0, 1)) if self.broker.is_gw else None,
                        rng.choice(("whole", "whole", "pieces")), rng.choice(ENDINGS),
                        rng.random() < 0.4, rng.choice(self.ids) if rng.random() < 0.3 else None,
                        rng.random() < 0.3, rng.choice(PAYLOADS), rng.choice((1, 2)))
            self.attempts.append(a)
        return a

    def place(self, worker: int | None) -> socket.socket:
        return placed(self.broker, self.pids, worker)

    def fail(self, a: Attempt, what: str) -> None:
        a.note(self.t0, f"FAILED: {what}")
        with self.lock:
            self.failures.append(f"{what} ({a.describe()})")

    @staticmethod
    def read(sock: socket.socket, deadline: float) -> tuple[int, bytes] | None:
        """One packet before the deadline; None on EOF or a reset; TimeoutError past it."""
        def exact(k: int) -> bytes | None:
            buf = bytearray()
            while len(buf) < k:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                try:
                    chunk = sock.recv(k - len(buf))
                except (socket.timeout, TimeoutError):
                    raise TimeoutError from None
                except (ConnectionResetError, BrokenPipeError):
                    return None
                if not chunk:
                    return None
                buf += chunk
            return bytes(buf)
        head = exact(1)
        if head is None:
            return None
        length, shift = 0, 0
        while True:
            b = exact(1)
            if b is None:
                return None
            length |= (b[0] & 0x7F) << shift
            shift += 7
            if not b[0] & 0x80 or shift > 21:
                break
        body = exact(length)
        return None if body is None else (head[0], body)

    @staticmethod
    def read_until(sock: socket.socket, first: int, timeout: float) -> bool:
        """Reads (PUBLISHes of the session, left unacknowledged) until a packet
        with this first byte: True; False when the server closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            got = Storm.read(sock, deadline)
            if got is None:
                return False
            if got[0] == first:
                return True

    def one(self, rng: random.Random, thread: int) -> None:
        a = self.plan(rng, thread)
        sock = self.place(a.worker)
        a.sock = sock
        # A will goes to another id's topic: where one subscribed, a takeover routes it
        # (to a persistent session maybe away, maybe moving between workers).
        will = (f"{self.broker.prefix}/{rng.choice(self.ids)}", b"will of #%d" % a.n, 1, False) if a.will else None
        data = connect_packet_full(a.cid, clean=a.clean, keepalive=a.keepalive, will=will)
        a.sent_at = time.monotonic()
        a.note(self.t0, f"CONNECT from port {sock.getsockname()[1]}")
        try:
            if a.pieces == "whole":
                sock.sendall(data)
            else:
                send_fragmented(sock, data, rng)
        except OSError as exc:
            self.fail(a, f"could not send the CONNECT: {exc!r}")
            sock.close()
            return
        if a.ending.startswith("abandon"):
            # Gone before the CONNACK could arrive, while the session may be settling.
            time.sleep(rng.choice((0, 0, 0.001, 0.005)))
            self.finish(a, a.ending.split("_")[1])
            return
        try:
            got = self.read(sock, a.sent_at + CONNACK_BOUND)
        except TimeoutError:
            self.fail(a, f"no CONNACK within {CONNACK_BOUND} s")
            sock.close()
            return
        if got is None:
            self.fail(a, "closed by the server instead of a CONNACK")
            sock.close()
            return
        first, body = got
        if first != 0x20 or len(body) != 2 or body[1] != 0 or body[0] & 0xFE:
            self.fail(a, f"expected CONNACK 0, got {first:#04x} {body.hex()}")
            sock.close()
            return
        a.connack_at = time.monotonic()
        a.present = bool(body[0] & 1)
        a.note(self.t0, f"CONNACK present={int(a.present)} after {a.connack_at - a.sent_at:.3f} s")
        if a.clean and a.present:
            self.fail(a, "session present with clean session 1 [MQTT-3.2.2-1]")
        # What a client does next: closed meanwhile means taken over, which is fine.
        try:
            if a.subscribe:
                sock.sendall(subscribe_packet(1, [(f"{self.broker.prefix}/{a.cid}", 1)]))
                if not self.read_until(sock, 0x90, CONNACK_BOUND):
                    a.note(self.t0, "closed before its SUBACK")
            if a.publish_to:
                sock.sendall(publish_packet_full(f"{self.broker.prefix}/{a.publish_to}",
                                                 b"m%d." % a.n + bytes(a.payload), qos=a.qos, packet_id=2))
                if not self.read_until(sock, 0x40 if a.qos == 1 else 0x50, CONNACK_BOUND):
                    a.note(self.t0, "closed before its PUBACK/PUBREC")
                elif a.qos == 2:
                    sock.sendall(b"\x62\x02\x00\x02")        # PUBREL
                    if not self.read_until(sock, 0x70, CONNACK_BOUND):
                        a.note(self.t0, "closed before its PUBCOMP")
        except TimeoutError:
            self.fail(a, f"no SUBACK/PUBACK/PUBREC/PUBCOMP within {CONNACK_BOUND} s")
        except OSError as exc:
            a.note(self.t0, f"closed while in use ({exc!r})")
        self.finish(a, a.ending)

    def finish(self, a: Attempt, how: str) -> None:
        sock = a.sock
        if how == "keep":
            a.note(self.t0, "kept open, watched")
            self.watcher.add(a)
            return
        if how == "stall":
            a.note(self.t0, "kept open, unread")
            return
        try:
            if how == "disconnect":
                sock.sendall(b"\xe0\x00")
            elif how == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()
        a.sock = None
        a.note(self.t0, f"closed ({how})")

    def thread(self, index: int, stop_at: float) -> None:
        rng = random.Random(f"{self.seed}/{index}")
        try:
            while time.monotonic() < stop_at:
                self.one(rng, index)
        except Exception:
            with self.lock:
                self.failures.append(f"thread {index} raised:\n{traceback.format_exc()}")

    # --- the run and its checks ------------------------------------------------

    def run(self) -> None:
        stop_at = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self.thread, args=(i, stop_at), daemon=True)
                   for i in range(self.threads)]
        self.watcher.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + 4 * CONNACK_BOUND + 30)
            assert not t.is_alive(), self.report("a storm thread did not finish")

    def check_takeovers(self) -> None:
        """Every connection kept open that a later CONNECT with its id took over
        is closed: a watched one within CLOSE_BOUND of that CONNECT's CONNACK,
        an unread one by CLOSE_BOUND after the storm; of the others, at most
        one per id is alive."""
        established = [a for a in self.attempts if a.connack_at is not None]
        taken_over = {}
        for a in established:
            later = [b for b in established if b.cid == a.cid and b.sent_at > a.connack_at]
            if a.sock is not None and later:
                taken_over[a.n] = min(later, key=lambda b: b.connack_at)
        watched = [a for a in established if a.ending == "keep" and a.sock is not None]
        deadline = max([taken_over[a.n].connack_at + CLOSE_BOUND for a in watched if a.n in taken_over]
                       + [time.monotonic()])
        self.watcher.wait(lambda: all(a.closed_at is not None for a in watched if a.n in taken_over), deadline)
        self.watcher.stop()
        for a in watched:
            b = taken_over.get(a.n)
            if a.closed_at is not None:
                a.note(self.t0, "closed by the server" + (f" (taken over by #{b.n} or later)" if b else ""))
                a.sock.close()
                a.sock = None
            if b is not None and (a.closed_at is None or a.closed_at > b.connack_at + CLOSE_BOUND):
                when = "never" if a.closed_at is None else f"{a.closed_at - b.connack_at:.3f} s after it"
                self.fail(a, f"still open {CLOSE_BOUND} s after #{b.n} with the same id was answered "
                             f"(closed {when}) [MQTT-3.1.4-2]")
        for a in established:
            if a.ending != "stall" or a.sock is None:
                continue
            b = taken_over.get(a.n)
            if b is not None:
                if not self.wait_closed(a.sock, CLOSE_BOUND):
                    self.fail(a, f"still open {CLOSE_BOUND} s after #{b.n} with the same id was answered "
                                 f"[MQTT-3.1.4-2]")
                else:
                    a.note(self.t0, f"closed by the server (taken over by #{b.n} or later)")
                a.sock.close()
                a.sock = None
        for cid in self.ids:
            alive = []
            for a in established:
                if a.cid == cid and a.sock is not None:
                    if self.answers_ping(a.sock):
                        alive.append(a)
                        a.note(self.t0, "alive at the end")
                    else:
                        a.note(self.t0, "closed at the end")
            if len(alive) > 1:
                for a in alive:
                    self.fail(a, f"{len(alive)} connections of {cid} alive at once [MQTT-3.1.4-2]")

    def wait_closed(self, sock: socket.socket, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        try:
            while self.read(sock, deadline) is not None:
                pass
        except TimeoutError:
            return False
        return True

    @staticmethod
    def answers_ping(sock: socket.socket) -> bool:
        try:
            sock.sendall(b"\xc0\x00")
            return Storm.read_until(sock, 0xD0, CONNACK_BOUND)
        except TimeoutError:
            return False
        except OSError:
            return False

    def close_all(self) -> None:
        self.watcher.stop()
        for a in self.attempts:
            if a.sock is not None:
                a.sock.close()
                a.sock = None

    def waits(self) -> str:
        """How long the answered CONNECTs waited for their CONNACKs: the
        longest, its attempt and when it was sent on the storm's clock."""
        answered = [a for a in self.attempts if a.connack_at is not None]
        if not answered:
            return f"{len(self.attempts)} CONNECTs, none answered"
        longest = max(answered, key=lambda a: a.connack_at - a.sent_at)
        return (f"{len(self.attempts)} CONNECTs, {len(answered)} answered, the longest CONNACK wait "
                f"{longest.connack_at - longest.sent_at:.3f} s (#{longest.n}, sent at "
                f"t={longest.sent_at - self.t0:.3f}s)")

    def report(self, headline: str) -> str:
        """The seed, the failures, and the history of the ids that failed."""
        lines = [f"{headline}; seed {self.seed!r} (replay: GW_STORM_SEED={self.seed!r}), "
                 f"{len(self.attempts)} CONNECTs in {self.seconds} s on {self.broker.kind}; {self.waits()}"]
        lines += [f"  {f}" for f in self.failures[:20]]
        failed = [a for a in self.attempts if any("FAILED" in e for e in a.events)]
        bad = {a.cid for a in failed}
        lines.append("history of " + ", ".join(sorted(bad)) + " around each failure (t=: seconds since the storm "
                     "began):")
        for a in self.attempts:
            if a.cid in bad and any(abs(a.n - f.n) <= HISTORY for f in failed):
                lines.append(f"  {a.describe()}")
        return "\n".join(lines[:600])


class Watcher:
    """Reads the connections kept open (ending "keep") in a thread of its own,
    throwing their bytes away, and notes when the server closes each."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.selector = selectors.DefaultSelector()
        self.added: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def add(self, a: Attempt) -> None:
        self.added.put(a)

    def loop(self) -> None:
        while not self.stopping.is_set():
            while True:
                try:
                    a = self.added.get_nowait()
                except queue.Empty:
                    break
                a.sock.setblocking(False)
                self.selector.register(a.sock, selectors.EVENT_READ, a)
            for key, _ in self.selector.select(0.02):
                a = key.data
                try:
                    data = a.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    a.closed_at = time.monotonic()
                    self.selector.unregister(a.sock)
        for key in list(self.selector.get_map().values()):
            self.selector.unregister(key.fileobj)

    def wait(self, done, deadline: float) -> None:
        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.stopping.set()
            self.thread.join(10)
        elif self.thread.ident is None:
            self.stopping.set()
        while True:         # added after the loop ended: never registered
            try:
                self.added.get_nowait()
            except queue.Empty:
                return


@pytest.fixture(scope="module")
def broker_proc(request, tmp_path_factory):
    """broker_fixtures' broker process, gw with connect_settle_timeout at SETTLE_TIMEOUT."""
    proc = start_broker(request.param, tmp_path_factory.mktemp(request.param),
                        gw_args=("--connect-settle-timeout", str(SETTLE_TIMEOUT)))
    yield proc
    if isinstance(proc, GwServer):
        stop_and_check([proc])      # a worker death while stopping fails the module's last test
    else:
        proc.stop()


@pytest.fixture
def storm_seed() -> str:
    seed = os.environ.get("GW_STORM_SEED") or f"{random.SystemRandom().randrange(1 << 32):08x}"
    print(f"connect storm seed {seed!r}; replay: GW_STORM_SEED={seed}")
    return seed


@brokers("sessions")
@pytest.mark.parametrize("threads", THREADS, ids=lambda n: f"{n}-at-once")
def test_every_connect_gets_its_connack_and_takes_over_the_previous_connection(broker, threads, storm_seed):
    """The storm (module docstring): every CONNECT answered within the bound,
    every takeover closing the connection it took over. gw: a connection
    taken over in the turn its own CONNECT settled lost its CONNACK (closed
    without it); two CONNECTs at once on both workers left both connected."""
    before = broker.server.counters() if broker.is_gw else None
    unsettled_before = broker.server.log().count(UNSETTLED) if broker.is_gw else 0
    storm = Storm(broker, f"{storm_seed}/{threads}", STORM_SECONDS, threads)
    try:
        storm.run()
        print(f"storm on {broker.kind}, {threads} at once: {storm.waits()}")
        if os.environ.get("GW_STORM_SHOW_LONGEST"):
            answered = [a for a in storm.attempts if a.connack_at is not None]
            longest = max(answered, key=lambda a: a.connack_at - a.sent_at)
            for a in storm.attempts:
                if a.cid == longest.cid and abs(a.n - longest.n) <= HISTORY:
                    print("  " + a.describe())
            if broker.is_gw:
                after = broker.server.counters()
                print("  counters: " + ", ".join(f"{n} +{get_counter(after, n) - get_counter(before, n)}"
                                                 for n in GW_COUNTERS + ("sessions_late",)))
                for line in broker.server.log().splitlines():
                    if "settle" in line or "session" in line or "CONNECT" in line:
                        print("  log: " + line[:300])
        storm.check_takeovers()
        if storm.failures and broker.is_gw:
            after = broker.server.counters()
            storm.failures.append("gw's counters meanwhile: " + ", ".join(
                f"{name} +{get_counter(after, name) - get_counter(before, name)}" for name in GW_COUNTERS))
        assert not storm.failures, storm.report(f"{len(storm.failures)} failure(s)")
        # Afterwards each id connects again, on each worker, clean and persistent.
        for cid in storm.ids:
            for worker in ((0, 1) if broker.is_gw else (None,)):
                for clean in (False, True):
                    raw = broker.raw(worker, client_id=False)
                    raw.connect(cid, clean=clean, keepalive=0)
                    raw.disconnect()
    finally:
        storm.close_all()
    # A storm of one thread through the fragmenting proxy makes few (its stalls wait on the broker).
    assert len([a for a in storm.attempts if a.connack_at is not None]) >= min(MIN_CONNECTS, 3 * threads), \
        storm.report("too few CONNECTs")
    if broker.is_gw:
        after = broker.server.counters()
        for name in ("internal_errors", "channel_malformed", "channel_drops", "sessions_late"):
            assert get_counter(after, name) == get_counter(before, name), storm.report(f"{name} rose")
        unsettled = broker.server.log().count(UNSETTLED) - unsettled_before
        assert unsettled == 0, storm.report(f"{unsettled} CONNECT(s) settled by connect_settle_timeout")
        assert get_counter(after, "takeovers") > get_counter(before, "takeovers"), storm.report("no takeover")


# What a failed storm's report shows of gw's counters.
GW_COUNTERS = ("takeovers", "internal_errors", "channel_malformed", "channel_drops",
               "closed_server", "closed_error")

RACES = 100     # simultaneous pairs of CONNECTs per case


@brokers("sessions")
@pytest.mark.parametrize("clean", [False, True], ids=["persistent", "clean"])
@pytest.mark.parametrize("where", ["both-workers", "same-worker"])
def test_two_connects_at_once_leave_one_connection(broker, where, clean):
    """A client id's persistent session is held on one worker; two CONNECTs
    for it arrive at once: one on each worker (one of them the id's home,
    crc32(id) % 2, whichever worker index that is), or both on the other
    worker. Each gets its CONNACK; the one the server took second takes over
    the other [MQTT-3.1.4-2], so one connection is left, and the session went
    from one to the next: session present 1 for both with clean session 0
    [MQTT-3.2.2-2]. gw, on both workers: the home granted its own CONNECT
    first, then the other worker's, which settled with no session while the
    home's took the old one: two connections alive. On one worker: the
    second settled at once with no session (session present 0), and the
    first, given the session later, took it over."""
    failures = []
    pids = broker.worker_pids() if broker.is_gw else []

    def raw(worker: int) -> RawClient:
        c = RawClient(placed(broker, pids, worker if broker.is_gw else None), worker)
        broker.clients.append(c)
        return c

    for i in range(RACES):
        cid = broker.client_id(f"race{i}")
        home = zlib.crc32(cid.encode()) % 2
        if i % 2:
            home = 1 - home     # in case worker_pids() does not list them by index
        holder = raw(1 - home)
        holder.connect(cid, clean=False, keepalive=0)
        first, second = raw(home), raw(1 - home if where == "both-workers" else home)
        packet = connect_packet_full(cid, clean=clean, keepalive=0)
        first.send(packet)
        second.send(packet)
        acks = []
        for c in (first, second):
            try:
                acks.append(c.read(CONNACK_BOUND))
            except (OSError, EOFError) as exc:
                acks.append(repr(exc))
        if any(a[0] != 0x20 if isinstance(a, tuple) else True for a in acks):
            failures.append(f"{cid}: CONNACKs {acks}")
        elif not clean and any(a[1] != b"\x01\x00" for a in acks):
            failures.append(f"{cid}: session present {[a[1][0] for a in acks]}, both must be 1")
        alive = [c for c in (first, second) if Storm.answers_ping(c.sock)]
        if len(alive) != 1:
            failures.append(f"{cid}: {len(alive)} connections alive")
        for c in (holder, first, second):
            c.close()
    assert not failures, f"{len(failures)} of {RACES}: " + "; ".join(failures[:10])
