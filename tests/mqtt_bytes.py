"""MQTT 3.1.1 bytes built by hand, not with the codec under test: the tests,
the fuzzing harness (fuzz/common.py) and the benchmarks that speak raw MQTT
share them."""

from __future__ import annotations

import struct


def varint(n: int) -> bytes:
    """The Remaining Length encoding of n (section 2.2.3)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    """A whole packet: its first byte, the length of body, body."""
    return bytes([first]) + varint(len(body)) + body


def mqtt_str(s) -> bytes:
    """A length-prefixed string field: str (as UTF-8) or bytes as they are."""
    b = s.encode() if isinstance(s, str) else bytes(s)
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id, clean: bool = True, keepalive: int = 60, will=None, level: int = 4,
                   user=None, password=None) -> bytes:
    """CONNECT; will = (topic, message, qos, retain); level 4 (MQTT 3.1.1,
    protocol name "MQTT") or 3 (MQTT 3.1, "MQIsdp"); user and password: None
    leaves the field out."""
    flags = 0x02 if clean else 0
    tail = mqtt_str(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        tail += mqtt_str(topic) + mqtt_str(message)
    if user is not None:
        flags |= 0x80
        tail += mqtt_str(user)
    if password is not None:
        flags |= 0x40
        tail += mqtt_str(password)
    proto = mqtt_str(b"MQTT" if level == 4 else b"MQIsdp")
    return packet(0x10, proto + bytes([level, flags]) + struct.pack("!H", keepalive) + tail)


def recv_exact(sock, n: int) -> bytes:
    """n bytes from a blocking socket; EOFError if it closes first."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the server closed the connection")
        buf += chunk
    return buf


def read_packet(sock) -> tuple[int, bytes]:
    """One whole packet from a blocking socket: (first byte, body)."""
    first = recv_exact(sock, 1)[0]
    length, mult = 0, 1
    while True:
        b = recv_exact(sock, 1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return first, recv_exact(sock, length)
