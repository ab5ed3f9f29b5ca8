"""A worker (gw_ext/loop.pyx) set up as gw/worker.py sets one up, driven turn
by turn in the test's process: real HTTP listeners (one per ack mode), a real
write-ahead log in a temporary directory, the real idempotency table, and a
real MQTT subscriber on `#` that records what the worker routes. The tests of
the HTTP app send their requests through it, so an ingest request takes the
one path a served one takes (gw/http_api.py validates, gw_ext/worker/ingest.pyx
deduplicates, logs and routes, the framing answers)."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from gw.config import Config
from gw.http_api import HttpApp, setting
from gw.ingest import Ingest
from gw.jsonproto import JsonProtocol
from gw.stats import N_COUNTERS
from gw.worker import apply_limits

HOST = "127.0.0.1"
JSON = b"application/json"
TURNS = 400                 # loop turns a request may take to be answered (each waits at most 5 ms)
_FRAMING_HEADERS = (b"date", b"content-length", b"content-type", b"connection")


def cfg(**values):
    """The gateway's Config with these settings (the rest: their defaults)."""
    return Config(**values)


class Subscriber:
    """A raw MQTT 3.1.1 client subscribed to `#` at QoS 1: what the worker routes."""

    def __init__(self, harness: "IngestWorker", port: int):
        self.h = harness
        self.sock = socket.create_connection((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)     # each packet at once, no Nagle
        self.sock.setblocking(False)
        self.buf = b""
        self.received: list = []
        client_id = b"recorder"
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(client_id)) + client_id
        self.sock.sendall(bytes([0x10, len(body)]) + body)
        sub = struct.pack("!H", 1) + struct.pack("!H", 1) + b"#" + b"\x01"
        self.sock.sendall(bytes([0x82, len(sub)]) + sub)
        for _ in range(TURNS):
            self.h.turn()
            self._read()
            if self.suback:
                return
        raise AssertionError("the subscriber got no SUBACK")

    suback = False

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise AssertionError("the worker closed the subscriber")
                self.buf += data
        except BlockingIOError:
            pass
        while True:
            if len(self.buf) < 2:
                return
            first = self.buf[0]
            length, mult, pos = 0, 1, 1
            while True:
                if pos >= len(self.buf):
                    return
                byte = self.buf[pos]
                pos += 1
                length += (byte & 0x7F) * mult
                mult *= 128
                if not byte & 0x80:
                    break
            if len(self.buf) < pos + length:
                return
            body, self.buf = self.buf[pos:pos + length], self.buf[pos + length:]
            kind = first >> 4
            if kind == 9:
                self.suback = True
            elif kind == 3:
                qos = (first >> 1) & 3
                tlen = struct.unpack_from("!H", body)[0]
                topic, at = body[2:2 + tlen], 2 + tlen
                if qos:
                    packet_id = struct.unpack_from("!H", body, at)[0]
                    at += 2
                    self.sock.sendall(b"\x40\x02" + struct.pack("!H", packet_id))
                self.received.append((topic, body[at:], qos, bool(first & 1)))

    def publish(self, topic: bytes, payload: bytes) -> None:
        """A QoS 0 PUBLISH from this client (it receives it back too: it is on `#`)."""
        body = struct.pack("!H", len(topic)) + topic + payload
        size, length = len(body), b""
        while True:
            byte, size = size & 0x7F, size >> 7
            length += bytes([byte | (0x80 if size else 0)])
            if not size:
                break
        self.sock.sendall(b"\x30" + length + body)

    def drain(self, turns: int = 5) -> list:
        for _ in range(turns):
            self.h.turn()
            self._read()
        return self.received

    def close(self) -> None:
        self.sock.close()


class IngestWorker:
    """The worker, its listeners, its log and table; `request` sends one HTTP
    request on a connection of its own and returns the answer."""

    def __init__(self, config=None, *, dedup=None, health=None, render_metrics=None, fsync: str = "off",
                 batch_ms: float = 0.0):
        from gw_ext.dedup import DedupTable
        from gw_ext.loop import Worker
        from gw_ext.wal import Wal

        self.cfg = config if config is not None else cfg()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-ingest-worker-"))
        self.rows = np.zeros((1, N_COUNTERS), np.uint64)
        self.counters = self.rows[0]
        self.ingest = Ingest(int(setting(self.cfg, "max_batch")), self.counters)
        fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.worker = w = Worker(0, self.rows[0], self.rows, 1, JsonProtocol(self.ingest), min(fds, 4096))
        apply_limits(w, Config())
        w.telemetry_topic = str(setting(self.cfg, "telemetry_topic"))
        w.tick_ms = 0
        self.app = HttpApp(self.cfg, worker_index=3, ingest=self.ingest,
                           render_metrics=render_metrics or (lambda: b""),
                           health=health or (lambda: (True, {})), counters=self.counters)
        w.http_app = self.app
        w.ingest = self.ingest
        self.wal = Wal(self.dir / "wal" / "0", segment_bytes=1 << 20, fsync=fsync, batch_ms=batch_ms,
                       counters=self.counters)
        self.wal.recover()
        w.set_wal(self.wal)
        # dedup=False: idempotency_window = 0, no table.
        self.dedup = DedupTable(1 << 16, 60.0) if dedup is None else dedup if dedup is not False else None
        w.set_dedup(self.dedup)
        self.listeners: dict[str, socket.socket] = {}
        self.ports: dict[str, int] = {}
        for name, proto, sink in (("http", "http", setting(self.cfg, "ack") == "sink"),
                                  ("sink", "http", True), ("enqueue", "http", False), ("mqtt", "mqtt", False)):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, 0))
            s.listen(64)
            s.setblocking(False)
            w.add_listener(s.fileno(), proto, None, sink)
            self.listeners[name] = s
            self.ports[name] = s.getsockname()[1]
        self.subscriber = Subscriber(self, self.ports["mqtt"])

    def turn(self) -> None:
        self.worker.run_once(5)

    def reload(self, config) -> None:
        """What gw/worker.py does on SIGHUP for these settings."""
        self.cfg = config
        self.worker.telemetry_topic = str(setting(config, "telemetry_topic"))
        self.app.cfg = config

    # --- HTTP ----------------------------------------------------------------------------

    def send(self, method: bytes, target: bytes, body: bytes = b"", content_type: bytes | None = JSON,
             listener: str = "http") -> "Sent":
        """Sends one request on a new connection; the answer is read by `answer`."""
        head = [method + b" " + target + b" HTTP/1.1", b"Host: test", b"Connection: close",
                b"Content-Length: %d" % len(body)]
        if content_type is not None:
            head.append(b"Content-Type: " + content_type)
        sock = socket.create_connection((HOST, self.ports[listener]))
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        sock.setblocking(False)
        return Sent(sock, method == b"HEAD")

    def answer(self, sent: "Sent", turns: int = TURNS):
        """(status, content type, body, extra header lines) once it arrived
        whole, or None if it has not after `turns` loop turns."""
        for _ in range(turns):
            self.turn()
            try:
                data = sent.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            sent.buf += data
            parsed = _parse(sent.buf, sent.head_only)
            if parsed is not None:
                sent.sock.close()
                return parsed
            if not data:
                raise AssertionError(f"the connection closed before a whole answer: {sent.buf!r}")
        return None

    def request(self, method: bytes, target: bytes, body: bytes = b"", content_type: bytes | None = JSON,
                listener: str = "http"):
        answer = self.answer(self.send(method, target, body, content_type, listener))
        assert answer is not None, f"no answer to {method!r} {target!r}"
        return answer

    def make_durable(self) -> None:
        """Everything logged so far becomes durable now; the loop hears of it as
        it does from the flusher (whose signal flush() consumed)."""
        self.wal.flush()
        os.eventfd_write(self.wal.fileno(), 1)

    def published(self) -> list:
        """(topic, payload, qos, retain) of every message routed so far."""
        return self.subscriber.drain()

    def close(self) -> None:
        w, self.worker = self.worker, None
        if w is None:
            return
        self.subscriber.close()
        w.http_app = None
        w.ingest = None
        del w
        self.wal.close()
        for s in self.listeners.values():
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Sent:
    """A request sent on its own connection, its answer not read yet."""

    def __init__(self, sock: socket.socket, head_only: bool):
        self.sock = sock
        self.head_only = head_only
        self.buf = b""


def _parse(buf: bytes, head_only: bool):
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    length, ctype, extra = 0, b"", b""
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        lower = name.lower()
        if lower == b"content-length":
            length = int(value)
        elif lower == b"content-type":
            ctype = value
        if lower not in _FRAMING_HEADERS:
            extra += line + b"\r\n"
    body = buf[end + 4:]
    if head_only:
        return status, ctype, b"", extra
    if len(body) < length:
        return None
    return status, ctype, body[:length], extra


def namespace(**values) -> SimpleNamespace:
    """A config object with only these attributes (an older Config): the rest default."""
    return SimpleNamespace(**values)
