"""Pure-Python reference MQTT 3.1.1 codec, for the tests and benchmarks only.

The oracle of the property tests for ``gw_ext.codec`` and the baseline of its
speed gate (bench/bench_codec.py): same API (``decode``, ``encode``, ``decode_count``), same rules,
same check order and the same ``MalformedPacket.reason`` for each violation.

Check order: the fixed header (packet type and flags, then the remaining
length, then the size of fixed-size packets, then the caller's limit); then
the body, field by field, checking that each field fits in the body before
checking its content.
"""

from __future__ import annotations

import re

from gw.packets import (
    CONNACK, CONNECT, DISCONNECT, MAX_REMAINING_LENGTH, PINGREQ, PINGRESP,
    PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, SUBSCRIBE, UNSUBACK,
    UNSUBSCRIBE, Connack, Connect, ConnectRefused, Disconnect, MalformedPacket,
    PacketTooLarge, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec,
    Pubrel, Suback, Subscribe, Unsuback, Unsubscribe,
)

__all__ = ["decode", "decode_count", "encode", "is_valid_topic_name", "is_valid_topic_filter",
           "allow_control_characters", "control_characters_allowed"]

# Flags the fixed header of each type must carry (section 2.2.2); None for the
# reserved types 0 and 15; PUBLISH (3) carries DUP/QoS/RETAIN, checked apart.
_HEADER_FLAGS = (None, 0, 0, None, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, None)
# Remaining length of the fixed-size packets.
_FIXED_LENGTH = {CONNACK: 2, PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2,
                 UNSUBACK: 2, PINGREQ: 0, PINGRESP: 0, DISCONNECT: 0}
_ACKS = {PUBACK: Puback, PUBREC: Pubrec, PUBREL: Pubrel, PUBCOMP: Pubcomp, UNSUBACK: Unsuback}
_EMPTY = {PINGREQ: Pingreq, PINGRESP: Pingresp, DISCONNECT: Disconnect}
_PROTOCOLS = {b"MQTT": 4, b"MQIsdp": 3}
# The control characters section 1.5.3 lets a receiver close the connection for.
_CONTROL = re.compile("[\x01-\x1f\x7f-\x9f]")
_control_allowed = False


def allow_control_characters(allowed: bool) -> None:
    """Whether control characters are accepted in client ids, user names,
    topics and filters (refused by default, reason "control")."""
    global _control_allowed
    _control_allowed = bool(allowed)


def control_characters_allowed() -> bool:
    return _control_allowed


# --- validation -----------------------------------------------------------------

def _utf8(raw: bytes) -> str:
    """An MQTT UTF-8 string (MQTT-1.5.3-1/2). Python's strict decoder already
    rejects overlongs, surrogates and code points above U+10FFFF; MQTT also
    forbids U+0000, which Python accepts."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("utf8") from None
    if "\x00" in text:
        raise MalformedPacket("utf8")
    return text


def _checked(raw: bytes) -> str:
    """A client id, user name, topic or filter: _utf8, then no control
    character unless they are allowed (ill-formed UTF-8 wins over a control
    character wherever each is)."""
    text = _utf8(raw)
    if not _control_allowed and _CONTROL.search(text):
        raise MalformedPacket("control")
    return text


def _is_text(topic: str) -> bool:
    try:
        raw = topic.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (0 < len(raw) <= 65535 and "\x00" not in topic
            and (_control_allowed or not _CONTROL.search(topic)))


def is_valid_topic_name(topic: str) -> bool:
    """A topic name a client may PUBLISH to: non-empty, no wildcard, no U+0000,
    no control character unless they are allowed."""
    return _is_text(topic) and "+" not in topic and "#" not in topic


def is_valid_topic_filter(topic_filter: str) -> bool:
    """'#' only last and alone in its level, '+' alone in its level
    (MQTT-4.7.1-2/3), at least one character (MQTT-4.7.3-1), no U+0000, no
    control character unless they are allowed."""
    return _is_text(topic_filter) and _filter_syntax(topic_filter)


def _filter_syntax(topic_filter: str) -> bool:
    """At least one character, and the wildcards where MQTT-4.7.1-2/3 allow them."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


# --- decoding -------------------------------------------------------------------

def _header(data: bytes, pos: int, limit: int):
    """(first byte, remaining length, header length), or None if incomplete."""
    end = len(data)
    if pos >= end:
        return None
    first = data[pos]
    ptype = first >> 4
    if ptype == PUBLISH:
        if first & 0x06 == 0x06:
            raise MalformedPacket("qos")          # MQTT-3.3.1-4
        if first & 0x0E == 0x08:
            raise MalformedPacket("header")       # DUP on QoS 0 (MQTT-3.3.1-2)
    elif first & 0x0F != _HEADER_FLAGS[ptype]:
        raise MalformedPacket("header")           # MQTT-2.2.2-1/2
    remaining = 0
    for i in range(4):
        if pos + 1 + i >= end:
            return None
        byte = data[pos + 1 + i]
        remaining |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            break
    else:
        raise MalformedPacket("length")           # more than 4 length bytes
    fixed = _FIXED_LENGTH.get(ptype)
    if fixed is not None and remaining != fixed:
        raise MalformedPacket("length")
    if remaining > limit:
        raise PacketTooLarge(remaining, limit)
    return first, remaining, i + 2


class _Reader:
    """Reads the fields of one packet body, in order."""

    __slots__ = ("body", "pos")

    def __init__(self, body: bytes):
        self.body = body
        self.pos = 0

    def left(self) -> int:
        return len(self.body) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.body):
            raise MalformedPacket("length")
        self.pos += 1
        return self.body[self.pos - 1]

    def u16(self) -> int:
        if len(self.body) - self.pos < 2:
            raise MalformedPacket("length")
        self.pos += 2
        return int.from_bytes(self.body[self.pos - 2:self.pos], "big")

    def binary(self) -> bytes:
        size = self.u16()
        if len(self.body) - self.pos < size:
            raise MalformedPacket("length")
        self.pos += size
        return self.body[self.pos - size:self.pos]

    def string(self) -> str:
        return _checked(self.binary())


def _publish(first: int, body: bytes) -> Publish:
    qos = (first >> 1) & 3
    if qos == 3:
        raise MalformedPacket("qos")
    size = len(body)
    if size < 2:
        raise MalformedPacket("length")
    end = 2 + int.from_bytes(body[:2], "big")
    if end > size:
        raise MalformedPacket("length")
    if end == 2:
        raise MalformedPacket("topic")            # MQTT-4.7.3-1
    topic = _checked(body[2:end])
    if "+" in topic or "#" in topic:
        raise MalformedPacket("topic")            # MQTT-3.3.2-2
    packet_id = 0
    if qos:
        if size - end < 2:
            raise MalformedPacket("length")
        packet_id = int.from_bytes(body[end:end + 2], "big")
        if packet_id == 0:
            raise MalformedPacket("packet_id")    # MQTT-2.3.1-1
        end += 2
    return Publish(topic, body[end:], qos, bool(first & 1), bool(first & 8), packet_id)


def _connect(body: bytes) -> Connect:
    r = _Reader(body)
    expected = _PROTOCOLS.get(r.binary())
    if expected is None:
        raise MalformedPacket("protocol")         # MQTT-3.1.2-1
    level = r.byte()
    if level != expected:
        raise ConnectRefused(1)                   # MQTT-3.1.2-2
    if r.left() < 3:
        raise MalformedPacket("length")
    flags = r.byte()
    keepalive = r.u16()
    if flags & 0x01:
        raise MalformedPacket("protocol")         # MQTT-3.1.2-3
    clean = bool(flags & 0x02)
    will = bool(flags & 0x04)
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 0x20)
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if not will and (will_qos or will_retain):
        raise MalformedPacket("protocol")         # MQTT-3.1.2-11/13/15
    if will_qos == 3:
        raise MalformedPacket("qos")              # MQTT-3.1.2-14
    if has_password and not has_username:
        raise MalformedPacket("protocol")         # MQTT-3.1.2-22
    client_id = r.string()
    will_topic = will_message = username = password = None
    if will:
        will_topic = r.string()
        if not will_topic or "+" in will_topic or "#" in will_topic:
            raise MalformedPacket("topic")
        will_message = r.binary()
    if has_username:
        username = r.string()
    if has_password:
        password = r.binary()
    if r.left():
        raise MalformedPacket("length")
    if not client_id:
        if level == 3 or not clean:
            raise ConnectRefused(2)               # MQTT-3.1.3-8
    elif level == 3 and len(client_id) > 23:
        raise ConnectRefused(2)                   # MQTT 3.1: 1 to 23 characters
    return Connect(client_id, clean, keepalive, will_topic, will_message, will_qos,
                   will_retain, username, password, level)


def _entries_start(body: bytes) -> tuple[int, _Reader]:
    """The packet id of a SUBSCRIBE, SUBACK or UNSUBSCRIBE, and a reader at its first entry."""
    if len(body) < 2:
        raise MalformedPacket("length")
    packet_id = int.from_bytes(body[:2], "big")
    if packet_id == 0:
        raise MalformedPacket("packet_id")        # MQTT-2.3.1-1
    if len(body) == 2:
        raise MalformedPacket("empty")            # MQTT-3.8.3-3, MQTT-3.10.3-2
    r = _Reader(body)
    r.pos = 2
    return packet_id, r


def _subscribe(body: bytes) -> Subscribe:
    packet_id, r = _entries_start(body)
    topics = []
    while r.left():
        if r.left() < 2:
            raise MalformedPacket("length")
        size = int.from_bytes(body[r.pos:r.pos + 2], "big")
        if r.left() - 2 < size + 1:
            raise MalformedPacket("length")
        topic_filter = r.string()
        if not _filter_syntax(topic_filter):
            raise MalformedPacket("topic")        # MQTT-4.7.3-1, MQTT-4.7.1-2/3
        qos = r.byte()
        if qos > 2:
            raise MalformedPacket("qos")          # MQTT-3.8.3-4
        topics.append((topic_filter, qos))
    return Subscribe(packet_id, topics)


def _unsubscribe(body: bytes) -> Unsubscribe:
    packet_id, r = _entries_start(body)
    topics = []
    while r.left():
        topic_filter = r.string()
        if not _filter_syntax(topic_filter):
            raise MalformedPacket("topic")        # MQTT-4.7.3-1, MQTT-4.7.1-2/3
        topics.append(topic_filter)
    return Unsubscribe(packet_id, topics)


def _suback(body: bytes) -> Suback:
    packet_id, _ = _entries_start(body)
    codes = list(body[2:])
    for code in codes:
        if code > 2 and code != 0x80:
            raise MalformedPacket("qos")
    return Suback(packet_id, codes)


def _connack(body: bytes) -> Connack:
    if len(body) != 2:
        raise MalformedPacket("length")
    if body[0] & 0xFE or body[1] > 5:
        raise MalformedPacket("protocol")
    return Connack(bool(body[0]), body[1])


def _body(first: int, body: bytes):
    ptype = first >> 4
    if ptype == PUBLISH:
        return _publish(first, body)
    ack = _ACKS.get(ptype)
    if ack is not None:
        if len(body) != 2:
            raise MalformedPacket("length")
        packet_id = int.from_bytes(body, "big")
        if packet_id == 0:
            raise MalformedPacket("packet_id")    # MQTT-2.3.1-1
        return ack(packet_id)
    empty = _EMPTY.get(ptype)
    if empty is not None:
        return empty()
    if ptype == SUBSCRIBE:
        return _subscribe(body)
    if ptype == UNSUBSCRIBE:
        return _unsubscribe(body)
    if ptype == SUBACK:
        return _suback(body)
    if ptype == CONNECT:
        return _connect(body)
    if ptype == CONNACK:
        return _connack(body)
    raise MalformedPacket("header")


def _packets(data, limit: int):
    """Yields (packet, end offset) for every complete packet of data."""
    pos = 0
    size = len(data)
    while pos < size:
        header = _header(data, pos, limit)
        if header is None:
            return
        first, remaining, header_len = header
        start = pos + header_len
        end = start + remaining
        if end > size:
            return
        yield _body(first, data[start:end]), end
        pos = end


def decode(data, max_packet_size: int = MAX_REMAINING_LENGTH):
    """Decodes every complete packet of data: (packets, bytes consumed)."""
    if max_packet_size < 0:
        raise ValueError("max_packet_size must be >= 0")
    data = bytes(data)
    packets = []
    consumed = 0
    for packet, consumed in _packets(data, min(max_packet_size, MAX_REMAINING_LENGTH)):
        packets.append(packet)
    return packets, consumed


def decode_count(data, max_packet_size: int = MAX_REMAINING_LENGTH) -> int:
    """Decodes and validates every complete packet; returns how many."""
    if max_packet_size < 0:
        raise ValueError("max_packet_size must be >= 0")
    count = 0
    for _packet in _packets(bytes(data), min(max_packet_size, MAX_REMAINING_LENGTH)):
        count += 1
    return count


# --- encoding -------------------------------------------------------------------

def _remaining_length(size: int) -> bytes:
    if size > MAX_REMAINING_LENGTH:
        raise ValueError("packet too large for MQTT")
    out = bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        if size:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(raw: bytes) -> bytes:
    if len(raw) > 65535:
        raise ValueError("field longer than 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _str_field(text) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return _field(text.encode("utf-8"))


def _u16(value: int) -> bytes:
    if not 0 <= value <= 65535:
        raise ValueError(f"packet identifier out of range: {value!r}")
    return value.to_bytes(2, "big")


def _check_qos(qos: int) -> int:
    if not 0 <= qos <= 2:
        raise ValueError(f"QoS out of range: {qos!r}")
    return qos


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _remaining_length(len(body)) + body


def encode(packet) -> bytes:
    """Encodes one packet (gw.packets struct) to its wire bytes."""
    t = type(packet)
    if t is Publish:
        topic = _str_field(packet.topic)
        qos = _check_qos(packet.qos)
        packet_id = _u16(packet.packet_id)
        first = (PUBLISH << 4) | (8 if packet.dup else 0) | (qos << 1) | (1 if packet.retain else 0)
        body = topic + (packet_id if qos else b"") + bytes(packet.payload)
        return _packet(first, body)
    if t in (Puback, Pubrec, Pubrel, Pubcomp, Unsuback):
        return bytes((t.type << 4 | (2 if t is Pubrel else 0), 2)) + _u16(packet.packet_id)
    if t in (Pingreq, Pingresp, Disconnect):
        return bytes((t.type << 4, 0))
    if t is Subscribe:
        body = _u16(packet.packet_id) + b"".join(
            _str_field(topic_filter) + bytes((_check_qos(qos),)) for topic_filter, qos in packet.topics)
        return _packet(SUBSCRIBE << 4 | 2, body)
    if t is Unsubscribe:
        body = _u16(packet.packet_id) + b"".join(_str_field(f) for f in packet.topics)
        return _packet(UNSUBSCRIBE << 4 | 2, body)
    if t is Suback:
        return _packet(SUBACK << 4, _u16(packet.packet_id) + bytes(packet.return_codes))
    if t is Connack:
        if not 0 <= packet.return_code <= 255:
            raise ValueError("return code out of range")
        return bytes((CONNACK << 4, 2, 1 if packet.session_present else 0, packet.return_code))
    if t is Connect:
        return _encode_connect(packet)
    raise TypeError(f"not an MQTT packet: {packet!r}")


def _encode_connect(c: Connect) -> bytes:
    if not 0 <= c.protocol_level <= 255:
        raise ValueError("protocol level out of range")
    if not 0 <= c.keepalive <= 65535:
        raise ValueError("keepalive out of range")
    if not 0 <= c.will_qos <= 3:
        raise ValueError("will QoS out of range")
    will = c.will_topic is not None
    flags = ((0x02 if c.clean_session else 0) | (0x04 if will else 0) | (c.will_qos << 3)
             | (0x20 if c.will_retain else 0) | (0x40 if c.password is not None else 0)
             | (0x80 if c.username is not None else 0))
    parts = [_field(b"MQIsdp" if c.protocol_level == 3 else b"MQTT"),
             bytes((c.protocol_level, flags)), c.keepalive.to_bytes(2, "big"),
             _str_field(c.client_id)]
    if will:
        parts.append(_str_field(c.will_topic))
        parts.append(_field(bytes(c.will_message if c.will_message is not None else b"")))
    if c.username is not None:
        parts.append(_str_field(c.username))
    if c.password is not None:
        parts.append(_field(bytes(c.password)))
    return _packet(CONNECT << 4, b"".join(parts))
