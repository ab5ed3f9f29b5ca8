"""A fragmenting TCP proxy for tests: the byte stream re-cut at random points.

Most test clients write whole packets at once, so a server's handling of
packets split across reads goes untested. `FragProxy` listens on a loopback
port, connects every client it accepts to the real server, and relays both
directions, re-cutting the stream: each chunk it reads is written in random
pieces (single bytes included, whole small chunks byte by byte now and then),
with TCP_NODELAY so each piece leaves as its own segment, and a small random
pause (0 to `max_delay`, 3 ms) before most pieces so the receiver reads them
separately. The pauses of one chunk add up to 20 ms at most, so a keepalive
exchange is late by milliseconds; and when the next chunk is already waiting
(the sender writes faster than the pauses let through) the proxy catches up
without pausing, so a stream keeps its throughput and only its cuts change.

Closes pass through as they came, after the bytes read before them: a FIN
(EOF) becomes a shutdown(SHUT_WR) of the other side, so half-closes work; a
reset becomes a reset (SO_LINGER 0). A write the far side refuses (it is gone)
resets the near side, as the far kernel would have. An upstream that refuses
the connection resets the client at once.

Replay: the cuts (and pauses) of a connection come from its own random.Random,
seeded from the proxy's seed, its name, the connection's number (in accept
order since the last reseed) and the direction. The test harness seeds every
proxy per test from `BASE_SEED` and the test's node id (conftest.py prints
it), so `GW_TEST_FRAGMENT=1 GW_TEST_FRAGMENT_SEED=<seed> pytest <node id>` cuts
that test's connections the same way again (thread timing aside).

One thread per proxy runs a selector loop over non-blocking sockets; every
socket operation happens on it, so a close is never raced by a blocked read.
`stop()` closes what is open and ends the thread; a proxy is stopped with the
server it fronts.

`GW_TEST_FRAGMENT=1` (`enabled()`) puts a proxy in front of every server the
test harness starts (conftest.GwServer, broker_fixtures.Mosquitto).
"""

from __future__ import annotations

import errno
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections import deque

HOST = "127.0.0.1"
MAX_DELAY = 0.003        # longest pause before a piece, seconds
PAUSE_CHANCE = 0.5       # share of the pieces that pause at all
CHUNK_PAUSES = 0.02      # the most the pauses of one chunk add up to, seconds
READ_SIZE = 65536        # bytes read from a side at once (one chunk to cut)
HOLD_LIMIT = 2 * READ_SIZE   # bytes held per direction before that side is no longer read
MAX_CUTS = 4             # random cut points per chunk, besides the first/last byte alone
BYTEWISE_MAX = 64        # a chunk this short is sometimes written one byte at a time
BYTEWISE_CHANCE = 0.15
FIRST_BYTE_CHANCE = 0.3  # a chunk's first byte alone: splits a fixed header after its type byte
LAST_BYTE_CHANCE = 0.2   # its last byte alone: the end of a packet arrives late
PIECE_LOG = 10000        # pieces recorded per direction, for inspection


def enabled() -> bool:
    """GW_TEST_FRAGMENT set (to anything but 0): the harness fronts servers with a proxy."""
    return os.environ.get("GW_TEST_FRAGMENT", "") not in ("", "0")


def _base_seed() -> int:
    value = os.environ.get("GW_TEST_FRAGMENT_SEED", "")
    return int(value) if value else random.SystemRandom().randrange(1 << 32)


BASE_SEED = _base_seed()         # one per test run; printed by conftest
_current_seed = str(BASE_SEED)   # the running test's seed (set by conftest per test)
_LIVE: "set[FragProxy]" = set()
_LIVE_LOCK = threading.Lock()


def seed_for(nodeid: str) -> str:
    """The seed of one test's proxies (and fragmented sends): the run's base seed and its node id."""
    return f"{BASE_SEED}:{nodeid}"


def begin_test(nodeid: str) -> str:
    """Reseeds every live proxy for the test about to run, and the ones it will create."""
    global _current_seed
    _current_seed = seed_for(nodeid)
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proxy in live:
        proxy.reseed(_current_seed)
    return _current_seed


def cut_sizes(n: int, rng: random.Random) -> list[int]:
    """The sizes of the pieces a chunk of n bytes is written in (they sum to n)."""
    if n <= 1:
        return [n]
    if n <= BYTEWISE_MAX and rng.random() < BYTEWISE_CHANCE:
        return [1] * n
    cuts = set(rng.sample(range(1, n), rng.randint(0, min(n - 1, MAX_CUTS))))
    if rng.random() < FIRST_BYTE_CHANCE:
        cuts.add(1)
    if rng.random() < LAST_BYTE_CHANCE:
        cuts.add(n - 1)
    bounds = [0, *sorted(cuts), n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _reset(sock: socket.socket) -> None:
    """Closes with a TCP RST, as a peer whose connection broke."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Pipe:
    """One direction of a relay: bytes read from src, written to dst in planned pieces.

    end: what src did after its last byte (None: nothing yet, "fin", "rst"),
    passed on to dst once every byte read before it was written."""

    __slots__ = ("src", "dst", "rng", "pause_rng", "proxy", "buf", "pieces", "chunks", "budget", "due",
                 "blocked", "end", "done", "log")

    def __init__(self, src: socket.socket, dst: socket.socket, seed: str, proxy: "FragProxy"):
        self.src, self.dst, self.proxy = src, dst, proxy
        # Pauses depend on timing (see pause()); their own generator keeps the cuts replayable.
        self.rng, self.pause_rng = random.Random(seed), random.Random(seed + "/pauses")
        self.buf = bytearray()
        self.pieces: deque[int] = deque()   # sizes of the pieces to write, summing to len(buf)
        self.chunks: deque[int] = deque()   # bytes left to write of each chunk read, summing to len(buf)
        self.budget = 0.0       # pause time the current chunk has left
        self.due = 0.0          # monotonic time the next piece may go
        self.blocked = False    # dst's send buffer is full: wait until it is writable
        self.end: str | None = None
        self.done = False       # end passed on (or this direction given up)
        self.log: list[int] = []

    def wants_input(self) -> bool:
        return self.end is None and not self.done and len(self.buf) < HOLD_LIMIT

    def take(self, data: bytes, now: float) -> None:
        self.buf += data
        self.pieces.extend(cut_sizes(len(data), self.rng))
        self.chunks.append(len(data))
        if len(self.chunks) == 1:
            self.budget = CHUNK_PAUSES
            self.due = max(self.due, now + self.pause())

    def written(self, n: int) -> None:
        """n bytes of the buffer went out."""
        del self.buf[:n]
        if len(self.log) < PIECE_LOG:
            self.log.append(n)
        while n:
            step = min(n, self.chunks[0])
            self.chunks[0] -= step
            n -= step
            if not self.chunks[0]:
                self.chunks.popleft()
                self.budget = CHUNK_PAUSES

    def pause(self) -> float:
        """The pause before the next piece: none while another chunk waits behind
        this one (catching up), else random, within the chunk's budget."""
        p = self.proxy
        if len(self.chunks) > 1 or self.budget <= 0:
            return 0.0
        if p.pause_chance < 1.0 and self.pause_rng.random() >= p.pause_chance:
            return 0.0
        pause = min(self.budget, self.pause_rng.uniform(p.min_delay, p.max_delay))
        self.budget -= pause
        return pause

    def discard(self) -> None:
        self.buf.clear()
        self.pieces.clear()
        self.chunks.clear()
        self.done = True


class _Relay:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: "FragProxy", down: socket.socket, up: socket.socket, seed: str):
        self.proxy = proxy
        self.down, self.up = down, up
        self.client_port = down.getpeername()[1]
        self.upstream_port = up.getsockname()[1]
        self.connected = False          # the upstream connect completed
        self.closed = False
        self.to_up = _Pipe(down, up, seed + "/up", proxy)
        self.to_down = _Pipe(up, down, seed + "/down", proxy)
        self.masks = {down: 0, up: 0}   # what each socket is registered for

    def pipe_from(self, sock: socket.socket) -> _Pipe:
        return self.to_up if sock is self.down else self.to_down

    def pipe_to(self, sock: socket.socket) -> _Pipe:
        return self.to_down if sock is self.down else self.to_up


class FragProxy:
    """A proxy on a loopback port (listen_port, or a free one: `port`) to
    upstream_port, re-cutting both directions. Starts at once; stop() ends it."""

    def __init__(self, upstream_port: int, *, listen_port: int = 0, name: str = "",
                 seed: str | None = None, max_delay: float = MAX_DELAY, min_delay: float = 0.0,
                 pause_chance: float = PAUSE_CHANCE, host: str = HOST):
        assert 0 <= min_delay <= max_delay <= 0.05, "pauses are bounded (keepalive tests run through it)"
        self.upstream = (host, upstream_port)
        self.name = name or str(upstream_port)
        self.max_delay, self.min_delay, self.pause_chance = max_delay, min_delay, pause_chance
        self._lock = threading.Condition()
        self._seed = seed if seed is not None else _current_seed
        self._accepted = 0                       # since the last reseed
        self._by_client_port: dict[int, _Relay] = {}
        self._relays: set[_Relay] = set()
        self.relays_total = 0
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, listen_port))
            self.listener.listen(512)
        except BaseException:
            self.listener.close()
            raise
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=f"fragproxy-{self.name}", daemon=True)
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._thread.start()

    # --- from the test's threads ------------------------------------------------------------

    @property
    def seed(self) -> str:
        return self._seed

    def reseed(self, seed: str) -> None:
        """Connections accepted from now on are cut from this seed, numbered from 0."""
        with self._lock:
            self._seed, self._accepted = seed, 0

    def upstream_port(self, client_port: int, timeout: float = 5.0) -> int:
        """The local port of the upstream socket relaying the client connection
        from client_port (what the server sees as its peer's port). Waits for the
        proxy to accept it; KeyError if it does not within timeout."""
        with self._lock:
            if not self._lock.wait_for(lambda: client_port in self._by_client_port, timeout):
                raise KeyError(f"{self.name}: no connection from client port {client_port}")
            return self._by_client_port[client_port].upstream_port

    def knows(self, client_port: int) -> bool:
        with self._lock:
            return client_port in self._by_client_port

    def open_relays(self) -> int:
        with self._lock:
            return len(self._relays)

    def pieces(self, client_port: int) -> tuple[list[int], list[int]]:
        """The piece sizes written so far (to upstream, to the client) for a connection."""
        with self._lock:
            r = self._by_client_port[client_port]
            return list(r.to_up.log), list(r.to_down.log)

    def stop(self, timeout: float = 10.0) -> None:
        """Closes the listener and every open relay (a FIN each way), ends the thread."""
        if self._stopping:
            return
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> "FragProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the proxy's thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                now = time.monotonic()
                for key, mask in self._sel.select(self._timeout(now)):
                    relay = key.data
                    if relay is None:
                        if key.fileobj is self.listener:
                            self._accept()
                        else:
                            self._drain_wake()
                    elif not relay.closed:
                        self._on_event(relay, key.fileobj, mask)
                now = time.monotonic()
                for relay in list(self._relays):
                    self._pump(relay, now)
        finally:
            for relay in list(self._relays):
                self._close(relay)
            self._sel.close()
            self.listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _timeout(self, now: float) -> float | None:
        soonest = None
        for relay in self._relays:
            for pipe in (relay.to_up, relay.to_down):
                if pipe.pieces and not pipe.blocked and (relay.connected or pipe is relay.to_down):
                    soonest = pipe.due if soonest is None else min(soonest, pipe.due)
        return None if soonest is None else max(0.0, soonest - now)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError:
                return
            down.setblocking(False)
            down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setblocking(False)
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = up.connect_ex(self.upstream)
            if err not in (0, errno.EINPROGRESS):
                up.close()
                _reset(down)        # as a refused connection looks to a client that got through
                continue
            with self._lock:
                seed = f"{self._seed}/{self.name}/{self._accepted}"
                self._accepted += 1
                try:
                    relay = _Relay(self, down, up, seed)
                except OSError:
                    # The client reset the connection before we took it (no peer
                    # name any more): nothing to relay, and the proxy goes on.
                    up.close()
                    down.close()
                    continue
                self._relays.add(relay)
                self._by_client_port[relay.client_port] = relay
                self.relays_total += 1
                self._lock.notify_all()
            relay.connected = err == 0
            self._interest(relay)

    def _interest(self, relay: _Relay) -> None:
        """(Re-)registers both sockets for what the relay waits for now."""
        for sock in (relay.down, relay.up):
            if sock.fileno() < 0:
                continue
            mask = 0
            if sock is relay.up and not relay.connected:
                mask = selectors.EVENT_WRITE
            else:
                if relay.pipe_from(sock).wants_input() and (relay.connected or sock is relay.down):
                    mask |= selectors.EVENT_READ
                if relay.pipe_to(sock).blocked:
                    mask |= selectors.EVENT_WRITE
            old = relay.masks[sock]
            if mask == old:
                continue
            if old and mask:
                self._sel.modify(sock, mask, relay)
            elif mask:
                self._sel.register(sock, mask, relay)
            else:
                self._sel.unregister(sock)
            relay.masks[sock] = mask

    def _on_event(self, relay: _Relay, sock: socket.socket, mask: int) -> None:
        now = time.monotonic()
        if sock is relay.up and not relay.connected:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                # The server refused (or is gone): the client sees a reset.
                relay.to_up.discard()
                relay.to_down.discard()
                self._close(relay, reset_down=True)
                return
            relay.connected = True
        if mask & selectors.EVENT_WRITE:
            relay.pipe_to(sock).blocked = False
        if mask & selectors.EVENT_READ:
            self._read(relay, sock, now)
        if not relay.closed:
            self._interest(relay)

    def _read(self, relay: _Relay, sock: socket.socket, now: float) -> None:
        pipe = relay.pipe_from(sock)
        if not pipe.wants_input():
            return
        try:
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # A reset (or another error): pass on a reset after what came before it.
            pipe.end = "rst"
            relay.pipe_to(sock).discard()     # nothing can be written to it any more
            return
        if not data:
            pipe.end = "fin"
            return
        pipe.take(data, now)

    def _pump(self, relay: _Relay, now: float) -> None:
        """Writes the pieces that are due, then passes on an end once all is written."""
        if relay.closed:
            return
        for pipe in (relay.to_up, relay.to_down):
            if pipe.done or (pipe is relay.to_up and not relay.connected):
                continue
            while pipe.pieces and not pipe.blocked and now >= pipe.due:
                size = pipe.pieces[0]
                try:
                    n = pipe.dst.send(memoryview(pipe.buf)[:size])
                except (BlockingIOError, InterruptedError):
                    pipe.blocked = True
                    break
                except OSError:
                    self._far_side_gone(relay, pipe)
                    break
                pipe.written(n)
                if n < size:
                    pipe.pieces[0] = size - n
                    pipe.blocked = True
                    break
                pipe.pieces.popleft()
                pipe.due = now + pipe.pause()
            if not pipe.pieces and pipe.end is not None and not pipe.done:
                pipe.done = True
                if pipe.end == "rst":
                    self._close(relay, reset_down=pipe.dst is relay.down, reset_up=pipe.dst is relay.up)
                    return
                try:
                    pipe.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if relay.to_up.done and relay.to_down.done:
            self._close(relay)
        else:
            self._interest(relay)

    def _far_side_gone(self, relay: _Relay, pipe: _Pipe) -> None:
        """A write to pipe.dst failed: its peer is gone. What it sent before still
        goes to the other side, then that side is reset, as it would have been
        writing to the gone peer itself."""
        pipe.discard()
        other = relay.pipe_to(pipe.src)
        other.end = "rst"
        other.done = False

    def _close(self, relay: _Relay, reset_down: bool = False, reset_up: bool = False) -> None:
        if relay.closed:
            return
        relay.closed = True
        for sock, reset in ((relay.down, reset_down), (relay.up, reset_up)):
            if relay.masks.get(sock):
                try:
                    self._sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
            relay.masks[sock] = 0
            if reset:
                _reset(sock)
            else:
                sock.close()
        with self._lock:
            self._relays.discard(relay)
            if self._by_client_port.get(relay.client_port) is relay:
                del self._by_client_port[relay.client_port]
            self._lock.notify_all()
