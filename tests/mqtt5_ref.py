"""Pure-Python reference MQTT 5.0 codec, for the tests and benchmarks only.

Written from the standard (OASIS MQTT Version 5.0), not from gw_ext/codec5.pyx:
the oracle of its property tests and fuzz target, and the baseline of its
benchmark. Same API (``decode``, ``decode_count``, ``encode``), same rules,
same check order, the same error class (MalformedPacket5: 0x81,
ProtocolError5: 0x82) and reason for each violation.

Check order: the fixed header (type and flags from the first byte, then the
remaining length, then PINGREQ/PINGRESP's size, then the caller's limit); then
the body field by field, each field's size before its content. A property:
its identifier (known, allowed in this packet), its value's size, whether it
is a duplicate, then its content. Checks that need the whole packet (an empty
topic without a Topic Alias, Authentication Data without a Method) come last.

Control characters follow the 3.1.1 reference's policy (mqtt_ref: refused by
default in client ids, user names, topic names and filters, the will topic
and the Response Topic).
"""

from __future__ import annotations

import mqtt_ref
from gw.packets5 import (
    AUTH, CONNACK, CONNECT, DISCONNECT, EMPTY, MAX_REMAINING_LENGTH, PINGREQ, PINGRESP, PROPERTY_NAMES, PUBACK,
    PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, Auth, Connack, Connect,
    ConnectRefused, Disconnect, MalformedPacket5, PacketTooLarge, Pingreq, Pingresp, Properties,
    ProtocolError5, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Unsuback, Unsubscribe,
)

__all__ = ["decode", "decode_count", "encode", "protocol_level"]

WILL = 0      # the will's properties: a context of their own (section 3.1.3.2)

BYTE, U16, U32, VBI, STR, BIN, PAIR = "byte", "u16", "u32", "vbi", "str", "bin", "pair"
_ALL = {CONNECT, CONNACK, PUBLISH, WILL, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE,
        UNSUBACK, DISCONNECT, AUTH}
# Section 2.2.2.2, Table 2-4: identifier -> (type, where it may appear).
PROPERTIES = {
    0x01: (BYTE, {PUBLISH, WILL}),                     # Payload Format Indicator
    0x02: (U32, {PUBLISH, WILL}),                      # Message Expiry Interval
    0x03: (STR, {PUBLISH, WILL}),                      # Content Type
    0x08: (STR, {PUBLISH, WILL}),                      # Response Topic
    0x09: (BIN, {PUBLISH, WILL}),                      # Correlation Data
    0x0B: (VBI, {PUBLISH, SUBSCRIBE}),                 # Subscription Identifier
    0x11: (U32, {CONNECT, CONNACK, DISCONNECT}),       # Session Expiry Interval
    0x12: (STR, {CONNACK}),                            # Assigned Client Identifier
    0x13: (U16, {CONNACK}),                            # Server Keep Alive
    0x15: (STR, {CONNECT, CONNACK, AUTH}),             # Authentication Method
    0x16: (BIN, {CONNECT, CONNACK, AUTH}),             # Authentication Data
    0x17: (BYTE, {CONNECT}),                           # Request Problem Information
    0x18: (U32, {WILL}),                               # Will Delay Interval
    0x19: (BYTE, {CONNECT}),                           # Request Response Information
    0x1A: (STR, {CONNACK}),                            # Response Information
    0x1C: (STR, {CONNACK, DISCONNECT}),                # Server Reference
    0x1F: (STR, {CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH}),  # Reason String
    0x21: (U16, {CONNECT, CONNACK}),                   # Receive Maximum
    0x22: (U16, {CONNECT, CONNACK}),                   # Topic Alias Maximum
    0x23: (U16, {PUBLISH}),                            # Topic Alias
    0x24: (BYTE, {CONNACK}),                           # Maximum QoS
    0x25: (BYTE, {CONNACK}),                           # Retain Available
    0x26: (PAIR, _ALL),                                # User Property
    0x27: (U32, {CONNECT, CONNACK}),                   # Maximum Packet Size
    0x28: (BYTE, {CONNACK}),                           # Wildcard Subscription Available
    0x29: (BYTE, {CONNACK}),                           # Subscription Identifier Available
    0x2A: (BYTE, {CONNACK}),                           # Shared Subscription Available
}
# Byte properties that are 0 or 1, else a Protocol Error: Payload Format
# Indicator (3.3.2.3.2), Request Problem Information (3.1.2.11.7), Request
# Response Information (3.1.2.11.6), Maximum QoS (3.2.2.3.4), Retain Available
# (3.2.2.3.5), Wildcard / Subscription Identifier / Shared Subscription
# Available (3.2.2.3.11-13).
_FLAGS = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
# Properties that are a Protocol Error when 0: Subscription Identifier
# (3.3.2.3.8, 3.8.2.1.2), Receive Maximum (3.1.2.11.3, 3.2.2.3.3), Topic Alias
# (MQTT-3.3.2-8), Maximum Packet Size (3.1.2.11.4, 3.2.2.3.6).
_NOT_ZERO = {0x0B, 0x21, 0x23, 0x27}

# The reason codes each packet may carry (the tables of sections 3.2.2.2,
# 3.4.2.1, 3.5.2.1, 3.6.2.1, 3.7.2.1, 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1).
REASON_CODES = {
    CONNACK: {0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95,
              0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F},
    PUBACK: {0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99},
    PUBREC: {0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99},
    PUBREL: {0x00, 0x92},
    PUBCOMP: {0x00, 0x92},
    SUBACK: {0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2},
    UNSUBACK: {0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91},
    DISCONNECT: {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94,
                 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2},
    AUTH: {0x00, 0x18, 0x19},
}

# Fixed-header flags (section 2.1.3, Table 2-2); None: type 0 is reserved.
_HEADER_FLAGS = (None, 0, 0, None, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0)
_ACKS = {PUBACK: Puback, PUBREC: Pubrec, PUBREL: Pubrel, PUBCOMP: Pubcomp}
_FIELDS = tuple(PROPERTY_NAMES.items())


def _mal(reason: str):
    return MalformedPacket5(reason)


def _pe(reason: str):
    return ProtocolError5(reason)


# --- strings ----------------------------------------------------------------------

def _utf8(raw: bytes) -> str:
    """An MQTT UTF-8 string: well-formed, no surrogates (MQTT-1.5.4-1), no
    U+0000 (MQTT-1.5.4-2). Python's strict decoder refuses overlongs,
    surrogates and code points past U+10FFFF."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _mal("utf8") from None
    if "\x00" in text:
        raise _mal("utf8")
    return text


def _checked(raw: bytes) -> str:
    """A client id, user name, topic or filter: _utf8, then the control
    character policy (section 1.5.4: a receiver MAY close the connection)."""
    text = _utf8(raw)
    if not mqtt_ref.control_characters_allowed() and mqtt_ref._CONTROL.search(text):
        raise _mal("control")
    return text


def _topic_name(raw: bytes) -> str:
    """A topic name: at least one character (MQTT-4.7.3-1), no wildcard
    (MQTT-3.3.2-2, MQTT-4.7.0-1)."""
    text = _checked(raw)
    if not text or "+" in text or "#" in text:
        raise _mal("topic")
    return text


def _topic_filter(raw: bytes) -> tuple[str, bool]:
    """A topic filter (MQTT-4.7.1-1/2, MQTT-4.7.3-1); a shared one
    ($share/{ShareName}/{filter}) has a ShareName of at least one character
    without '/', '+', '#', then '/', then a filter (MQTT-4.8.2-1/2).
    Returns the filter and whether it is shared."""
    text = _checked(raw)
    if not mqtt_ref._filter_syntax(text):
        raise _mal("topic")
    if text.startswith("$share/"):
        name, sep, rest = text[7:].partition("/")
        if not name or not sep or "+" in name or "#" in name or not rest:
            raise _mal("topic")
        return text, True
    return text, False


# --- decoding ----------------------------------------------------------------------

class _Reader:
    __slots__ = ("body", "pos", "end")

    def __init__(self, body: bytes, pos: int = 0, end: int | None = None):
        self.body = body
        self.pos = pos
        self.end = len(body) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if self.end - self.pos < n:
            raise _mal("length")
        self.pos += n
        return self.body[self.pos - n:self.pos]

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def vbi(self) -> int:
        """A Variable Byte Integer (section 1.5.5): at most 4 bytes, the
        fewest that hold the value (MQTT-1.5.5-1)."""
        value = 0
        for i in range(4):
            b = self.byte()
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if i and b == 0:
                    raise _mal("varint")
                return value
        raise _mal("varint")


def _properties(r: _Reader, where: int) -> Properties:
    """A property block (section 2.2.2) at r, for the packet (or will) `where`."""
    size = r.vbi()
    if r.left() < size:
        raise _mal("length")
    p = _Reader(r.body, r.pos, r.pos + size)
    r.pos += size
    if size == 0:
        return EMPTY
    values = {}
    seen = set()
    sub_ids = []
    pairs = []
    while p.left():
        ident = p.byte()
        spec = PROPERTIES.get(ident)
        if spec is None or where not in spec[1]:
            raise _mal("property")                    # section 2.2.2.2
        kind = spec[0]
        if kind == BYTE:
            value = p.byte()
        elif kind == U16:
            value = p.u16()
        elif kind == U32:
            value = p.u32()
        elif kind == VBI:
            value = p.vbi()
        elif kind == PAIR:
            value = (p.binary(), p.binary())
        else:
            value = p.binary()
        if ident in seen and not (ident == 0x26 or (ident == 0x0B and where == PUBLISH)):
            raise _pe("duplicate_property")
        seen.add(ident)
        if kind == PAIR:
            pairs.append((_utf8(value[0]), _utf8(value[1])))     # MQTT-1.5.7-1
            continue
        if kind == STR:
            value = _topic_name(value) if ident == 0x08 else _utf8(value)   # MQTT-3.3.2-13/14
        elif ident in _FLAGS and value > 1:
            raise _pe("property_value")
        elif ident in _NOT_ZERO and value == 0:
            raise _pe("property_value")
        if ident == 0x0B:
            sub_ids.append(value)
        else:
            values[ident] = value
    if 0x16 in values and 0x15 not in values:
        raise _pe("authentication")                    # 3.1.2.11.10, 3.2.2.3.18
    return Properties(*[tuple(sub_ids) if i == 0x0B else tuple(pairs) if i == 0x26 else values.get(i)
                        for i, _ in _FIELDS])


def _header(data: bytes, pos: int, limit: int):
    """(first byte, remaining length, header length), or None if incomplete."""
    end = len(data)
    if pos >= end:
        return None
    first = data[pos]
    ptype = first >> 4
    if ptype == PUBLISH:
        if first & 0x06 == 0x06:
            raise _mal("qos")                         # MQTT-3.3.1-4
        if first & 0x0E == 0x08:
            raise _mal("header")                      # DUP on QoS 0 (MQTT-3.3.1-2)
    elif first & 0x0F != _HEADER_FLAGS[ptype]:
        raise _mal("header")                          # MQTT-2.1.3-1; type 0 is reserved
    remaining = 0
    for i in range(4):
        if pos + 1 + i >= end:
            return None
        b = data[pos + 1 + i]
        remaining |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if i and b == 0:
                raise _mal("varint")                  # MQTT-1.5.5-1
            break
    else:
        raise _mal("varint")                          # more than 4 bytes (section 1.5.5)
    if ptype in (PINGREQ, PINGRESP) and remaining:
        raise _mal("length")
    if remaining > limit:
        raise PacketTooLarge(remaining, limit)
    return first, remaining, i + 2


def _done(r: _Reader) -> None:
    if r.left():
        raise _mal("length")


def _connect(body: bytes) -> Connect:
    r = _Reader(body)
    if r.binary() != b"MQTT":
        raise _mal("protocol")                        # MQTT-3.1.2-1
    if r.byte() != 5:
        raise ConnectRefused(0x84)                    # MQTT-3.1.2-2: Unsupported Protocol Version
    flags = r.byte()
    keepalive = r.u16()
    if flags & 0x01:
        raise _mal("protocol")                        # MQTT-3.1.2-3
    will = bool(flags & 0x04)
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 0x20)
    if not will and (will_qos or will_retain):
        raise _mal("protocol")                        # MQTT-3.1.2-11, MQTT-3.1.2-13
    if will_qos == 3:
        raise _mal("qos")                             # MQTT-3.1.2-12
    props = _properties(r, CONNECT)
    client_id = _checked(r.binary())                  # MQTT-3.1.3-4
    will_props = EMPTY
    will_topic = will_message = username = password = None
    if will:
        will_props = _properties(r, WILL)
        will_topic = _topic_name(r.binary())          # MQTT-3.1.3-11
        will_message = r.binary()
    if flags & 0x80:
        username = _checked(r.binary())               # MQTT-3.1.3-12
    if flags & 0x40:
        password = r.binary()
    _done(r)
    return Connect(client_id, bool(flags & 0x02), keepalive, props, will_topic, will_message, will_qos,
                   will_retain, will_props, username, password)


def _reason(ptype: int, code: int) -> int:
    if code not in REASON_CODES[ptype]:
        raise _pe("reason_code")
    return code


def _connack(body: bytes) -> Connack:
    r = _Reader(body)
    flags = r.byte()
    if flags & 0xFE:
        raise _mal("protocol")                        # MQTT-3.2.2-1
    code = _reason(CONNACK, r.byte())                 # MQTT-3.2.2-8
    if flags and code:
        raise _pe("session_present")                  # MQTT-3.2.2-6
    props = _properties(r, CONNACK)
    _done(r)
    return Connack(bool(flags), code, props)


def _publish(first: int, body: bytes) -> Publish:
    qos = (first >> 1) & 3
    r = _Reader(body)
    raw = r.binary()
    topic = _topic_name(raw) if raw else ""
    packet_id = 0
    if qos:
        packet_id = r.u16()
        if packet_id == 0:
            raise _pe("packet_id")                    # MQTT-2.2.1-3
    props = _properties(r, PUBLISH)
    if not topic and props.topic_alias is None:
        raise _pe("topic_alias")                      # 3.3.2.1: empty Topic Name without Topic Alias
    return Publish(topic, body[r.pos:], qos, bool(first & 1), bool(first & 8), packet_id, props)


def _ack(ptype: int, body: bytes):
    r = _Reader(body)
    packet_id = r.u16()
    if packet_id == 0:
        raise _pe("packet_id")                        # MQTT-2.2.1-3
    code = 0
    props = EMPTY
    if r.left():
        code = _reason(ptype, r.byte())               # MQTT-3.4.2-1, -3.5.2-1, -3.6.2-1, -3.7.2-1
        if r.left():
            props = _properties(r, ptype)
            _done(r)
    return _ACKS[ptype](packet_id, code, props)


def _entries_start(ptype: int, body: bytes) -> tuple[int, Properties, _Reader]:
    r = _Reader(body)
    packet_id = r.u16()
    if packet_id == 0:
        raise _pe("packet_id")                        # MQTT-2.2.1-3
    props = _properties(r, ptype)
    if not r.left():
        raise _pe("empty")                            # MQTT-3.8.3-2, MQTT-3.10.3-2
    return packet_id, props, r


def _subscribe(body: bytes) -> Subscribe:
    packet_id, props, r = _entries_start(SUBSCRIBE, body)
    topics = []
    while r.left():
        raw = r.binary()
        options = r.byte()
        topic_filter, shared = _topic_filter(raw)
        if options & 0xC0:
            raise _mal("options")                     # MQTT-3.8.3-5
        if options & 3 == 3 or options >> 4 == 3:
            raise _pe("subscription")                 # 3.8.3.1: QoS 3, Retain Handling 3
        if shared and options & 4:
            raise _pe("subscription")                 # MQTT-3.8.3-4
        topics.append((topic_filter, options))
    return Subscribe(packet_id, topics, props)


def _unsubscribe(body: bytes) -> Unsubscribe:
    packet_id, props, r = _entries_start(UNSUBSCRIBE, body)
    topics = []
    while r.left():
        topics.append(_topic_filter(r.binary())[0])
    return Unsubscribe(packet_id, topics, props)


def _codes(ptype: int, body: bytes):
    packet_id, props, r = _entries_start(ptype, body)
    codes = [_reason(ptype, c) for c in body[r.pos:]]    # MQTT-3.9.3-2, MQTT-3.11.3-2
    return (Suback if ptype == SUBACK else Unsuback)(packet_id, codes, props)


def _disconnect_or_auth(ptype: int, body: bytes):
    r = _Reader(body)
    if not body:
        return Disconnect() if ptype == DISCONNECT else Auth()
    code = _reason(ptype, r.byte())                   # MQTT-3.14.2-1, MQTT-3.15.2-1
    props = EMPTY
    if r.left():
        props = _properties(r, ptype)
        _done(r)
    if ptype == DISCONNECT:
        return Disconnect(code, props)
    if props.authentication_method is None:
        raise _pe("authentication")                   # 3.15.2.2.2: the Method may not be left out
    return Auth(code, props)


def _body(first: int, body: bytes):
    ptype = first >> 4
    if ptype == PUBLISH:
        return _publish(first, body)
    if ptype in _ACKS:
        return _ack(ptype, body)
    if ptype == PINGREQ:
        return Pingreq()
    if ptype == PINGRESP:
        return Pingresp()
    if ptype == SUBSCRIBE:
        return _subscribe(body)
    if ptype == UNSUBSCRIBE:
        return _unsubscribe(body)
    if ptype in (SUBACK, UNSUBACK):
        return _codes(ptype, body)
    if ptype in (DISCONNECT, AUTH):
        return _disconnect_or_auth(ptype, body)
    if ptype == CONNECT:
        return _connect(body)
    if ptype == CONNACK:
        return _connack(body)
    raise _mal("header")


def _packets(data: bytes, limit: int):
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
    packets = []
    consumed = 0
    for packet, consumed in _packets(bytes(data), min(max_packet_size, MAX_REMAINING_LENGTH)):
        packets.append(packet)
    return packets, consumed


def decode_count(data, max_packet_size: int = MAX_REMAINING_LENGTH) -> int:
    if max_packet_size < 0:
        raise ValueError("max_packet_size must be >= 0")
    return sum(1 for _ in _packets(bytes(data), min(max_packet_size, MAX_REMAINING_LENGTH)))


def protocol_level(body) -> int:
    """The protocol level of a CONNECT body whose name is "MQTT" or "MQIsdp":
    what picks a connection's codec. MalformedPacket5("protocol") for another
    name, ("length") when the body is too short to say."""
    r = _Reader(bytes(body))
    if r.binary() not in (b"MQTT", b"MQIsdp"):
        raise _mal("protocol")
    return r.byte()


# --- encoding ---------------------------------------------------------------------

def _varint(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError("variable byte integer out of range")
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(raw) -> bytes:
    raw = bytes(raw)
    if len(raw) > 65535:
        raise ValueError("field longer than 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _str(text) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return _field(text.encode("utf-8"))


def _int(value, size: int) -> bytes:
    if not isinstance(value, int) or not 0 <= value < (1 << (8 * size)):
        raise ValueError(f"value out of range: {value!r}")
    return value.to_bytes(size, "big")


def _encode_properties(props: Properties, where: int) -> bytes:
    out = bytearray()
    for ident, name in _FIELDS:
        value = getattr(props, name)
        if value is None or (ident in (0x0B, 0x26) and len(value) == 0):
            continue
        kind, contexts = PROPERTIES[ident]
        if where not in contexts:
            raise ValueError(f"property {name} not allowed in this packet")
        if ident == 0x0B:
            for v in value:
                out.append(ident)
                out += _varint(v)
        elif ident == 0x26:
            for k, v in value:
                out.append(ident)
                out += _str(k) + _str(v)
        else:
            out.append(ident)
            if kind == BYTE:
                out += _int(value, 1)
            elif kind == U16:
                out += _int(value, 2)
            elif kind == U32:
                out += _int(value, 4)
            elif kind == STR:
                out += _str(value)
            else:
                out += _field(value)
    return _varint(len(out)) + bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    if len(body) > MAX_REMAINING_LENGTH:
        raise ValueError("packet too large for MQTT")
    return bytes((first,)) + _varint(len(body)) + body


def _qos(q: int) -> int:
    if not 0 <= q <= 2:
        raise ValueError(f"QoS out of range: {q!r}")
    return q


def encode(packet) -> bytes:
    """Encodes one packet (gw.packets5 struct) to its wire bytes."""
    t = type(packet)
    if t is Publish:
        qos = _qos(packet.qos)
        _int(packet.packet_id, 2)
        first = (PUBLISH << 4) | (8 if packet.dup else 0) | (qos << 1) | (1 if packet.retain else 0)
        body = (_str(packet.topic) + (_int(packet.packet_id, 2) if qos else b"")
                + _encode_properties(packet.properties, PUBLISH) + bytes(packet.payload))
        return _packet(first, body)
    if t in (Puback, Pubrec, Pubrel, Pubcomp):
        body = _int(packet.packet_id, 2)
        props = _encode_properties(packet.properties, t.type)
        if packet.reason_code or props != b"\x00":
            body += _int(packet.reason_code, 1)
            if props != b"\x00":
                body += props
        return _packet(t.type << 4 | (2 if t is Pubrel else 0), body)
    if t in (Pingreq, Pingresp):
        return bytes((t.type << 4, 0))
    if t in (Disconnect, Auth):
        props = _encode_properties(packet.properties, t.type)
        body = b""
        if packet.reason_code or props != b"\x00":
            body = _int(packet.reason_code, 1)
            if props != b"\x00":
                body += props
        return _packet(t.type << 4, body)
    if t is Subscribe:
        body = _int(packet.packet_id, 2) + _encode_properties(packet.properties, SUBSCRIBE) + b"".join(
            _str(f) + _int(o, 1) for f, o in packet.topics)
        return _packet(SUBSCRIBE << 4 | 2, body)
    if t is Unsubscribe:
        body = _int(packet.packet_id, 2) + _encode_properties(packet.properties, UNSUBSCRIBE) + b"".join(
            _str(f) for f in packet.topics)
        return _packet(UNSUBSCRIBE << 4 | 2, body)
    if t in (Suback, Unsuback):
        body = (_int(packet.packet_id, 2) + _encode_properties(packet.properties, t.type)
                + b"".join(_int(c, 1) for c in packet.reason_codes))
        return _packet(t.type << 4, body)
    if t is Connack:
        body = (bytes((1 if packet.session_present else 0,)) + _int(packet.reason_code, 1)
                + _encode_properties(packet.properties, CONNACK))
        return _packet(CONNACK << 4, body)
    if t is Connect:
        return _encode_connect(packet)
    raise TypeError(f"not an MQTT 5 packet: {packet!r}")


def _encode_connect(c: Connect) -> bytes:
    will = c.will_topic is not None
    if not 0 <= c.will_qos <= 3:
        raise ValueError("will QoS out of range")
    flags = ((0x02 if c.clean_start else 0) | (0x04 if will else 0) | (c.will_qos << 3)
             | (0x20 if c.will_retain else 0) | (0x40 if c.password is not None else 0)
             | (0x80 if c.username is not None else 0))
    parts = [_field(b"MQTT"), bytes((5, flags)), _int(c.keepalive, 2),
             _encode_properties(c.properties, CONNECT), _str(c.client_id)]
    if will:
        parts.append(_encode_properties(c.will_properties, WILL))
        parts.append(_str(c.will_topic))
        parts.append(_field(c.will_message if c.will_message is not None else b""))
    elif c.will_properties != EMPTY:
        raise ValueError("will properties without a will")
    if c.username is not None:
        parts.append(_str(c.username))
    if c.password is not None:
        parts.append(_field(c.password))
    return _packet(CONNECT << 4, b"".join(parts))
