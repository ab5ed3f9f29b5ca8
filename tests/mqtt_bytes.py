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


def connect_packet(client_id, clean: bool = True, keepalive: int = 60, will=None, level: int = 4) -> bytes:
    """CONNECT; will = (topic, message, qos, retain); level 4 (MQTT 3.1.1,
    protocol name "MQTT") or 3 (MQTT 3.1, "MQIsdp")."""
    flags = 0x02 if clean else 0
    tail = mqtt_str(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        tail += mqtt_str(topic) + mqtt_str(message)
    proto = mqtt_str(b"MQTT" if level == 4 else b"MQIsdp")
    return packet(0x10, proto + bytes([level, flags]) + struct.pack("!H", keepalive) + tail)
