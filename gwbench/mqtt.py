"""The few MQTT packets the connection engine needs, in plain Python: 3.1.1,
and MQTT 5.0's forms of them (`--mqtt-version 5`: a property block in
CONNECT, PUBLISH and SUBSCRIBE; reason codes and properties in CONNACK,
SUBACK and the acknowledgements).

The connection scenario is paced by the ramp (hundreds of packets a second),
so a tiny encoder here is plenty; the throughput hot path encodes and decodes
with the project codecs (gw_ext/codec.pxd, codec5.pxd) from Cython.
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


# MQTT 5.0 reason codes a server refuses a CONNECT with (section 3.2.2.2), for messages.
CONNACK5_TEXT = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x90: "topic name invalid",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9F: "connection rate exceeded",
}

# MQTT 5.0 property identifiers this client reads or writes (section 2.2.2.2).
P_REASON_STRING = 0x1F
P_RECEIVE_MAXIMUM = 0x21
P_TOPIC_ALIAS_MAXIMUM = 0x22
P_TOPIC_ALIAS = 0x23
P_MAXIMUM_PACKET_SIZE = 0x27
# Every property's value type, to walk a block: 1, 2, 4 bytes, a Variable Byte
# Integer, a string or binary (two-byte length), a string pair.
_PROP_TYPES = {}
for _ids, _kind in (((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), "u8"), ((0x13, 0x21, 0x22, 0x23), "u16"),
                    ((0x02, 0x11, 0x18, 0x27), "u32"), ((0x0B,), "varint"),
                    ((0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F), "bytes"), ((0x26,), "pair")):
    for _i in _ids:
        _PROP_TYPES[_i] = _kind


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
            password: bytes | None = None, clean: bool = True, version: int = 4) -> bytes:
    """CONNECT of protocol level `version`: 4 (3.1.1) or 5 (MQTT 5.0, with an
    empty property block: the standard's defaults, so no Topic Alias from the
    server; Session Expiry Interval 0, as a 3.1.1 clean session)."""
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
    body = (_str(b"MQTT") + bytes((version, flags)) + struct.pack("!H", keepalive)
            + (b"\x00" if version == 5 else b"") + payload)
    return b"\x10" + _remaining(len(body)) + body


def publish(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 0, version: int = 4,
            alias: int = 0) -> bytes:
    """PUBLISH; MQTT 5.0 (version 5) with a property block, holding a Topic
    Alias when alias is not 0 (the topic may then be empty: the alias stands for it)."""
    props = b""
    if version == 5:
        props = (b"\x03" + bytes((P_TOPIC_ALIAS,)) + struct.pack("!H", alias)) if alias else b"\x00"
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + props + payload
    return bytes((0x30 | (qos << 1),)) + _remaining(len(body)) + body


def subscribe(packet_id: int, topic_filter: bytes, qos: int, version: int = 4) -> bytes:
    """SUBSCRIBE of one filter (MQTT 5.0: no properties, options = the QoS)."""
    body = struct.pack("!H", packet_id) + (b"\x00" if version == 5 else b"") + _str(topic_filter) + bytes((qos,))
    return b"\x82" + _remaining(len(body)) + body


def ack(packet_type: int, packet_id: int) -> bytes:
    first = (packet_type << 4) | (0x02 if packet_type == PUBREL else 0)
    return bytes((first, 2)) + struct.pack("!H", packet_id)


class MalformedError(ValueError):
    pass


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """A Variable Byte Integer at buf[i:]: (value, the offset after it)."""
    value = 0
    for k in range(4):
        if i >= len(buf):
            raise MalformedError("variable byte integer cut")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << (7 * k)
        if not b & 0x80:
            return value, i
    raise MalformedError("variable byte integer over 4 bytes")


def properties(buf: bytes, i: int) -> tuple[dict, int]:
    """The MQTT 5.0 property block at buf[i:] (its length first): ({identifier:
    value}, the offset after it). Integers as ints, strings and binary as
    bytes; User Properties as a list of pairs under 0x26."""
    n, i = _varint(buf, i)
    end = i + n
    if end > len(buf):
        raise MalformedError("property block past the packet's end")
    out: dict = {}
    while i < end:
        ident = buf[i]
        i += 1
        kind = _PROP_TYPES.get(ident)
        if kind == "u8":
            value, i = buf[i], i + 1
        elif kind == "u16":
            value, i = int.from_bytes(buf[i:i + 2], "big"), i + 2
        elif kind == "u32":
            value, i = int.from_bytes(buf[i:i + 4], "big"), i + 4
        elif kind == "varint":
            value, i = _varint(buf, i)
        elif kind == "bytes":
            ln = int.from_bytes(buf[i:i + 2], "big")
            value, i = bytes(buf[i + 2:i + 2 + ln]), i + 2 + ln
        elif kind == "pair":
            kl = int.from_bytes(buf[i:i + 2], "big")
            k = bytes(buf[i + 2:i + 2 + kl])
            i += 2 + kl
            vl = int.from_bytes(buf[i:i + 2], "big")
            out.setdefault(ident, []).append((k, bytes(buf[i + 2:i + 2 + vl])))
            i += 2 + vl
            continue
        else:
            raise MalformedError(f"unknown property identifier 0x{ident:02x}")
        if i > end:
            raise MalformedError("property past its block")
        out[ident] = value
    return out, end


def connack5(body: bytes) -> tuple[int, dict]:
    """An MQTT 5.0 CONNACK's body: (reason code, properties)."""
    if len(body) < 3:
        raise MalformedError("MQTT 5.0 CONNACK shorter than 3 bytes")
    props, end = properties(body, 2)
    if end != len(body):
        raise MalformedError("bytes after the CONNACK's properties")
    return body[1], props


def suback5_codes(body: bytes) -> bytes:
    """An MQTT 5.0 SUBACK's reason codes (one per filter)."""
    if len(body) < 3:
        raise MalformedError("MQTT 5.0 SUBACK shorter than 3 bytes")
    _, i = properties(body, 2)
    return bytes(body[i:])


def ack5_reason(body: bytes) -> int:
    """The reason code of an MQTT 5.0 PUBACK/PUBREC/PUBREL/PUBCOMP (0 when left out)."""
    return body[2] if len(body) > 2 else 0


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
