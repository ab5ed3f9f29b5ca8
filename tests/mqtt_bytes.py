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
