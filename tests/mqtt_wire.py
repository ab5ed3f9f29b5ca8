"""A raw MQTT 3.1.1 connection for the stateful tests: bytes built by hand
(broker_fixtures' builders), packets sent whole, coalesced or cut into
fragments with pauses between them (so the server sees partial reads), and
packets parsed out of whatever the socket returns (partial reads on our side
too). It interprets nothing: the test decides what each packet means."""

from __future__ import annotations

import random
import select
import socket
import struct
import time

FRAGMENT_PAUSE = 0.002      # between two fragments: long enough for the server to read the first alone


class WireError(AssertionError):
    """The byte stream from the server is not MQTT (or ended when it must not have)."""


class Wire:
    """One TCP connection speaking MQTT, owned by the test thread (no threads)."""

    def __init__(self, sock: socket.socket, rng: random.Random, name: str):
        self.sock = sock
        self.rng = rng
        self.name = name
        self.local_port = sock.getsockname()[1]
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.inbuf = bytearray()
        self.eof = False            # the server closed (FIN or RST)
        self.closed = False         # we closed

    # --- sending ---------------------------------------------------------------

    def send(self, *packets: bytes, fragment: bool = True) -> None:
        """Writes the packets as one byte stream, in 1 to 4 writes cut at random
        offsets (packet boundaries need not match write boundaries), or whole."""
        data = b"".join(packets)
        cuts = []
        if fragment and len(data) > 1 and self.rng.random() < 0.5:
            cuts = sorted(self.rng.sample(range(1, len(data)), min(len(data) - 1, self.rng.randint(1, 3))))
        pos = 0
        for cut in cuts + [len(data)]:
            self._sendall(data[pos:cut])
            pos = cut
            if cut != len(data):
                time.sleep(FRAGMENT_PAUSE)

    def _sendall(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        deadline = time.monotonic() + 10
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WireError(f"{self.name}: the server read nothing for 10 s") from None
                select.select([], [self.sock], [], 0.1)
                continue
            view = view[n:]

    # --- receiving ---------------------------------------------------------------

    def fill(self, timeout: float) -> bool:
        """Waits up to timeout for bytes; reads what there is (in small pieces
        now and then, to exercise the parser). False when nothing came."""
        if self.eof:
            return False
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return False
        size = self.rng.choice((65536, 65536, 65536, 7))
        try:
            chunk = self.sock.recv(size)
        except BlockingIOError:
            return False
        except (ConnectionResetError, ConnectionAbortedError):
            self.eof = True
            return True
        if not chunk:
            self.eof = True
        self.inbuf += chunk
        return True

    def packets(self):
        """Yields every complete packet in the buffer: (first byte, body)."""
        while True:
            pkt = self._parse_one()
            if pkt is None:
                return
            yield pkt

    def _parse_one(self):
        buf = self.inbuf
        if len(buf) < 2:
            return None
        length, shift, pos = 0, 0, 1
        while True:
            if pos >= len(buf):
                return None
            if pos > 4:
                raise WireError(f"{self.name}: remaining length over 4 bytes from the server: {bytes(buf[:8])!r}")
            b = buf[pos]
            length |= (b & 0x7F) << shift
            shift += 7
            pos += 1
            if not b & 0x80:
                break
        if len(buf) < pos + length:
            return None
        first, body = buf[0], bytes(buf[pos:pos + length])
        del buf[:pos + length]
        return first, body

    # --- closing -----------------------------------------------------------------

    def close(self, reset: bool = False) -> None:
        """Closes without DISCONNECT: FIN, or with reset a TCP RST (SO_LINGER 0)."""
        if self.closed:
            return
        self.closed = True
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.sock.close()


def parse_publish(first: int, body: bytes):
    """(topic, payload, qos, dup, retain, packet id) of a PUBLISH from the server."""
    qos = (first >> 1) & 3
    if qos == 3:
        raise WireError(f"PUBLISH with QoS 3: {first:#x}")
    if len(body) < 2:
        raise WireError(f"PUBLISH too short: {body!r}")
    tlen = struct.unpack_from("!H", body)[0]
    pos = 2 + tlen
    if len(body) < pos + (2 if qos else 0):
        raise WireError(f"PUBLISH shorter than its topic: {body!r}")
    topic = body[2:pos].decode()
    packet_id = None
    if qos:
        packet_id = struct.unpack_from("!H", body, pos)[0]
        pos += 2
    return topic, bytes(body[pos:]), qos, bool(first & 8), bool(first & 1), packet_id
