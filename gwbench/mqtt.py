"""The few MQTT 3.1.1 packets the connection engine needs, in plain Python.

The connection scenario is paced by the ramp (hundreds of packets a second),
so a tiny encoder here is plenty; the throughput hot path encodes and decodes
with the project codec (gw_ext/codec.pxd) from Cython.
"""
from __future__ import annotations

import struct

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

PINGREQ_BYTES = b"\xc0\x00"
DISCONNECT_BYTES = b"\xe0\x00"

CONNACK_CODES = {
    1: "connack_bad_protocol",
    2: "connack_id_rejected",
    3: "connack_server_unavailable",
    4: "connack_bad_credentials",
    5: "connack_not_authorized",
}

CONNACK_TEXT = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _str(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def connect(client_id: bytes, keepalive: int, username: bytes | None = None,
            password: bytes | None = None, clean: bool = True) -> bytes:
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
    body = _str(b"MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive) + payload
    return b"\x10" + _remaining(len(body)) + body


def publish(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes((0x30 | (qos << 1),)) + _remaining(len(body)) + body


def subscribe(packet_id: int, topic_filter: bytes, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + _str(topic_filter) + bytes((qos,))
    return b"\x82" + _remaining(len(body)) + body


def ack(packet_type: int, packet_id: int) -> bytes:
    first = (packet_type << 4) | (0x02 if packet_type == PUBREL else 0)
    return bytes((first, 2)) + struct.pack("!H", packet_id)


class MalformedError(ValueError):
    pass


def split(buf: bytearray, max_remaining: int = 1 << 20):
    """Yields (first_byte, body) for each complete packet at the start of buf
    and deletes them from buf; leaves an incomplete tail in place."""
    pos = 0
    n = len(buf)
    out = []
    while n - pos >= 2:
        first = buf[pos]
        i = pos + 1
        mult = 1
        remaining = 0
        complete = False
        for _ in range(4):
            if i >= n:
                break
            b = buf[i]
            i += 1
            remaining += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                complete = True
                break
        else:
            raise MalformedError("remaining length over 4 bytes")
        if not complete:
            break  # header cut: wait for more
        if remaining > max_remaining:
            raise MalformedError(f"packet of {remaining} bytes")
        if n - i < remaining:
            break
        out.append((first, bytes(buf[i:i + remaining])))
        pos = i + remaining
    if pos:
        del buf[:pos]
    return out
