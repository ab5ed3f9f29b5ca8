"""MQTT over WebSocket for the load generator's Python side (`--transport ws`):
the upgrade request and its answer's check, client frames (masked, RFC 6455
5.3), and the reading of the server's frames into the MQTT byte stream. The
throughput engine (gwbench/_ext/pubsub_engine.pyx) frames and unframes in C
from where this leaves a connection (`FrameReader.remaining`, `.raw`)."""
from __future__ import annotations

import base64
import hashlib
import os
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16384


class WsError(Exception):
    """The upgrade was refused, or the server broke the framing."""


def upgrade_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    key = base64.b64encode(os.urandom(16))
    req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
           f"Sec-WebSocket-Protocol: mqtt\r\n\r\n").encode()
    return req, key


def check_answer(head: bytes, key: bytes) -> None:
    """Raises WsError unless head is a 101 with the right accept key and subprotocol."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise WsError(f"upgrade refused: {lines[0]!r}")
    fields = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        fields[k.strip().lower()] = v.strip()
    want = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
    if fields.get("sec-websocket-accept") != want:
        raise WsError("upgrade answered with a wrong Sec-WebSocket-Accept")
    if fields.get("sec-websocket-protocol") not in ("mqtt", "mqttv3.1"):
        raise WsError("upgrade answered without the mqtt subprotocol")


def mask_bytes(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    pattern = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(pattern, "little")).to_bytes(n, "little")


def client_frame(data: bytes, opcode: int = 2) -> bytes:
    """A masked frame (FIN) holding data."""
    n = len(data)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + mask_bytes(data, mask)


class FrameReader:
    """The server's frames in, in any pieces: the data frames' payloads out (the
    MQTT stream), Pings answered (`replies`), a Close noted (`closed`)."""

    def __init__(self):
        self.raw = bytearray()      # bytes not decoded yet: an incomplete header or control frame
        self.remaining = 0          # payload bytes of the current data frame still to come
        self.closed = None          # the Close's code (0: none) once one came
        self.replies = bytearray()  # frames to send back (Pongs)

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        self.raw += data
        raw = self.raw
        pos = 0
        while pos < len(raw) and self.closed is None:
            if self.remaining:
                k = min(self.remaining, len(raw) - pos)
                out += raw[pos:pos + k]
                pos += k
                self.remaining -= k
                continue
            if len(raw) - pos < 2:
                break
            b0, b1 = raw[pos], raw[pos + 1]
            if b1 & 0x80 or b0 & 0x70:
                raise WsError("a server frame masked or with RSV bits")
            n, hl = b1 & 0x7F, 2
            if n == 126:
                hl = 4
                if len(raw) - pos < hl:
                    break
                n = struct.unpack_from("!H", raw, pos + 2)[0]
            elif n == 127:
                hl = 10
                if len(raw) - pos < hl:
                    break
                n = struct.unpack_from("!Q", raw, pos + 2)[0]
            op = b0 & 0x0F
            if op >= 8:
                if len(raw) - pos < hl + n:
                    break
                payload = bytes(raw[pos + hl:pos + hl + n])
                pos += hl + n
                if op == 8:
                    self.closed = struct.unpack("!H", payload[:2])[0] if n >= 2 else 0
                elif op == 9:
                    self.replies += client_frame(payload, 10)
                continue
            if op not in (0, 2):
                raise WsError(f"a server data frame of opcode {op}")
            pos += hl
            self.remaining = n
        del raw[:pos]
        return bytes(out)
