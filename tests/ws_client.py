"""A plain WebSocket client for the tests, written from RFC 6455 without gw's
codec (gw_ext/wsframe.pyx), so the two check each other: the upgrade request,
masked client frames (any opcode, flags, mask or declared length, malformed on
purpose too), the server's frames read and checked (unmasked, the shortest
length form), and MQTT packets carried over them."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HOST = "127.0.0.1"


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def upgrade_request(path: str = "/mqtt", protocols: str | None = "mqtt", key: bytes | None = None,
                    version: str = "13", origin: str | None = None, extra: str = "",
                    host: str = "127.0.0.1") -> tuple[bytes, bytes]:
    """(request bytes, its key)."""
    key = key if key is not None else base64.b64encode(os.urandom(16))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key.decode()}", f"Sec-WebSocket-Version: {version}"]
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode(), key


def read_head(sock) -> bytes:
    """The server's HTTP answer head (through the blank line)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"closed during the HTTP answer: {buf!r}")
        buf += chunk
    return buf


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def header(head: bytes, name: str) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


def frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bytes | None = b"",
          rsv: int = 0, length: int | None = None, long_form: int | None = None) -> bytes:
    """A client frame. mask: 4 bytes, b"" for a random one, None for none
    (malformed). length: the declared length (default: the payload's).
    long_form: 2 or 8 to use that length form whatever the length."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if mask is not None else 0
    if long_form == 8 or (long_form is None and n >= 65536):
        head = struct.pack("!BBQ", first, bit | 127, n)
    elif long_form == 2 or (long_form is None and n >= 126):
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BB", first, bit | n)
    if mask is None:
        return head + payload
    mask = mask or os.urandom(4)
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


def binary(payload: bytes, **kw) -> bytes:
    return frame(2, payload, **kw)


def close_frame(code: int | None = 1000, reason: bytes = b"") -> bytes:
    return frame(8, b"" if code is None else struct.pack("!H", code) + reason)


def recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_frame(sock, timeout: float = 10.0) -> tuple[bool, int, bytes]:
    """One server frame: (fin, opcode, payload); checks what RFC 6455 asks of a
    server's frame (no mask, no RSV bits, the shortest length form)."""
    sock.settimeout(timeout)
    b0, b1 = recv_exact(sock, 2)
    assert not b1 & 0x80, "a server frame is never masked"
    assert not b0 & 0x70, "RSV bits without an extension"
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", recv_exact(sock, 2))
        assert n >= 126, "not the shortest length form"
    elif n == 127:
        (n,) = struct.unpack("!Q", recv_exact(sock, 8))
        assert n >= 65536, "not the shortest length form"
    return bool(b0 & 0x80), b0 & 0x0F, recv_exact(sock, n)


def read_close(sock, timeout: float = 10.0) -> int | None:
    """Reads frames until a Close; its code (None: none given). Data frames
    before it are skipped."""
    while True:
        fin, op, payload = read_frame(sock, timeout)
        if op == 8:
            return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def ws_connect(port: int, *, tls: ssl.SSLContext | None = None, timeout: float = 10.0, sock=None,
               **request) -> socket.socket:
    """A socket past a 101 upgrade (checked: the accept key, the subprotocol)."""
    if sock is None:
        sock = socket.create_connection((HOST, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
    req, key = upgrade_request(**request)
    sock.sendall(req)
    head = read_head(sock)
    assert status_of(head) == 101, head
    assert header(head, "Sec-WebSocket-Accept") == accept_for(key).decode()
    assert header(head, "Upgrade").lower() == "websocket"
    offered = [p.strip() for p in (request.get("protocols") or "mqtt").split(",")]
    assert header(head, "Sec-WebSocket-Protocol") == next(p for p in offered if p in ("mqtt", "mqttv3.1"))
    return sock


class WsMqtt:
    """MQTT packets over a WebSocket: sent in binary frames (as given), read
    from the server's frames whatever their boundaries."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.frames = []        # (fin, opcode, length) of every server frame read

    def send(self, data: bytes, **kw) -> None:
        self.sock.sendall(binary(data, **kw))

    def _fill(self, timeout: float) -> None:
        fin, op, payload = read_frame(self.sock, timeout)
        self.frames.append((fin, op, len(payload)))
        if op == 8:
            raise EOFError(f"Close {payload[:2].hex()} from the server")
        if op == 2:
            self.buf += payload

    def read_packet(self, timeout: float = 10.0) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 2:
                length, shift, i = 0, 0, 1
                while i < len(self.buf) and i <= 4:
                    b = self.buf[i]
                    length |= (b & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not b & 0x80:
                        if len(self.buf) >= i + length:
                            first = self.buf[0]
                            body = bytes(self.buf[i:i + length])
                            del self.buf[:i + length]
                            return first, body
                        break
            self._fill(timeout)
