"""The worker's loop driven turn by turn (Worker.run_once) on real loopback
sockets: containment of exceptions, and the close rule (closing marks, one
place frees) seen from outside."""

from __future__ import annotations

import json
import resource
import socket
import time

import numpy as np
import pytest

from gw.config import Config
from gw.jsonproto import JsonProtocol
from gw.stats import N_COUNTERS, Counter as C
from gw.worker import apply_limits
from gw_ext.loop import Worker


class RaisingProtocol(JsonProtocol):
    """The real JSON-lines protocol, except that a line `boom` raises, as a bug
    in its handling would."""

    def handle(self, line, *args):
        if line == b"boom":
            raise RuntimeError("a bug in handling this line")
        return super().handle(line, *args)


class LoopHarness:
    def __init__(self, proto: str = "json", protocol=None):
        self.rows = np.zeros((1, N_COUNTERS), np.uint64)
        fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.worker = Worker(0, self.rows[0], self.rows, 1, protocol or JsonProtocol(), fds)
        apply_limits(self.worker, Config())
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.worker.add_listener(self.listener.fileno(), proto)
        self.port = self.listener.getsockname()[1]

    def turns(self, n: int = 5) -> None:
        for _ in range(n):
            self.worker.run_once(5)

    def counter(self, c) -> int:
        return int(self.rows[0, c])

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setblocking(False)
        self.turns(2)
        return sock

    def read_line(self, sock, turns: int = 50) -> bytes:
        buf = b""
        for _ in range(turns):
            self.turns(1)
            try:
                buf += sock.recv(65536)
            except BlockingIOError:
                continue
            if buf.endswith(b"\n"):
                return buf
        raise AssertionError(f"no line after {turns} turns: {buf!r}")

    def closed_by_server(self, sock, turns: int = 50) -> bool:
        for _ in range(turns):
            self.turns(1)
            try:
                if sock.recv(65536) == b"":
                    return True
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return True
        return False

    def close(self) -> None:
        self.listener.close()


def json_connect(h: LoopHarness, client_id: str) -> socket.socket:
    sock = h.connect()
    sock.sendall(json.dumps({"message_type": "Connect", "client_id": client_id}).encode() + b"\n")
    assert json.loads(h.read_line(sock))["payload"] == "Connected"
    return sock


def test_an_exception_closes_its_connection_not_the_worker():
    h = LoopHarness(protocol=RaisingProtocol())
    try:
        a = json_connect(h, "a")
        b = json_connect(h, "b")
        a.sendall(b"boom\n")
        assert h.closed_by_server(a)
        assert h.counter(C.INTERNAL_ERRORS) == 1
        assert h.counter(C.CLOSED_INTERNAL) == 1
        # The worker goes on: the other client, and a new one, are served.
        b.sendall(b'{"message_type":"Heartbeat"}\n{"message_type":"Connect"}\n')
        assert json.loads(h.read_line(b))["message_type"] == "Connect"
        c = json_connect(h, "c")
        for s in (a, b, c):
            s.close()
        h.turns(3)
        assert h.counter(C.CONNS_CURRENT) == 0
    finally:
        h.close()


def test_an_exception_mid_batch_spares_the_rest_of_the_batch():
    """Several connections ready in one turn: the one whose handling raises is
    closed; those after it in the same epoll batch are still handled."""
    h = LoopHarness(protocol=RaisingProtocol())
    try:
        socks = [json_connect(h, f"c{i}") for i in range(6)]
        for i, s in enumerate(socks):
            s.sendall(b"boom\n" if i == 2 else b'{"message_type":"Connect"}\n')
        time.sleep(0.05)            # all of them readable for the same epoll_wait
        h.worker.run_once(50)
        for i, s in enumerate(socks):
            if i == 2:
                assert h.closed_by_server(s)
            else:
                assert json.loads(h.read_line(s))["message_type"] == "Connect"
        assert h.counter(C.INTERNAL_ERRORS) == 1
        for s in socks:
            s.close()
    finally:
        h.close()


def test_a_connect_is_answered_in_the_turn_that_accepts_it():
    """With the listener's TCP_DEFER_ACCEPT (as gw/master.py opens them) a new
    connection is handed over only once its CONNECT is there: the turn that
    accepts it also reads it and sends the CONNACK (read_fresh), without a
    second turn. A connection whose first bytes are not there yet is served
    when they come, as before."""
    import mqtt_bytes
    from gw.master import DEFER_ACCEPT_S
    h = LoopHarness(proto="mqtt")
    try:
        h.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
        early = socket.create_connection(("127.0.0.1", h.port))
        early.sendall(mqtt_bytes.connect_packet(b"early", clean=True, keepalive=60))
        turns = h.counter(C.LOOP_TURNS)
        h.worker.run_once(5000)         # returns once the listener is readable: the CONNECT is in
        assert h.counter(C.LOOP_TURNS) == turns + 1
        assert h.counter(C.CONNS_ACCEPTED) == 1
        early.setblocking(False)
        assert early.recv(16) == b"\x20\x02\x00\x00"       # CONNACK, sent in that one turn
        # A client that connects and sends later (here: the listener without the
        # deferral) is read when its bytes come.
        h.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 0)
        late = socket.create_connection(("127.0.0.1", h.port))
        late.setblocking(False)
        for _ in range(20):
            if h.counter(C.CONNS_ACCEPTED) == 2:
                break
            h.worker.run_once(50)
        assert h.counter(C.CONNS_ACCEPTED) == 2
        late.sendall(mqtt_bytes.connect_packet(b"late", clean=True, keepalive=60))
        got = b""
        for _ in range(50):
            h.worker.run_once(50)
            try:
                got += late.recv(16)
            except BlockingIOError:
                continue
            if len(got) >= 4:
                break
        assert got == b"\x20\x02\x00\x00"
        assert h.counter(C.MQTT_CONNECTED) == 2
        early.close()
        late.close()
        h.turns(3)
        assert h.counter(C.CONNS_CURRENT) == 0
    finally:
        h.close()


@pytest.mark.parametrize("depth", [5000, 100000])
def test_json_nested_deep_is_an_error_answer(depth):
    h = LoopHarness()
    try:
        a = json_connect(h, "deep")
        a.sendall(b'{"message_type":"Data","payload":' + b"[" * depth + b"]" * depth + b"}\n")
        reply = json.loads(h.read_line(a))
        assert reply["message_type"] == "Error" and "nested too deeply" in reply["payload"]
        assert h.counter(C.INTERNAL_ERRORS) == 0
        a.close()
    finally:
        h.close()
