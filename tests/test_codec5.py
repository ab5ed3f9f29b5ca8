"""The MQTT 5.0 codec (gw_ext.codec5) against the pure-Python reference (tests/mqtt5_ref.py).

Property tests: both encoders agree byte for byte on any valid packet,
decoding inverts encoding, decoding is insensitive to where the stream is cut
(every byte boundary), and on any input (random bytes, mutated streams,
property blocks built from arbitrary properties) both decoders reach the same
outcome: the same packets, or the same error with the same reason and the same
class, Malformed Packet (0x81) or Protocol Error (0x82). Then one test per
rule, named after the statement of the OASIS MQTT 5.0 standard it checks; and
the per-connection choice of codec (Decoder).
"""

from __future__ import annotations

import struct
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mqtt5_ref as ref
import mqtt_ref as ref3
from decode_outcome import outcome5
from mqtt_bytes import connect_packet, mqtt_str, packet, varint
from gw_ext import codec, codec5
from gw import packets as p3
from gw.packets5 import (
    AUTH, EMPTY, MAX_REMAINING_LENGTH, PROPERTY_NAMES, Auth, Connack, Connect, ConnectRefused, Disconnect,
    MalformedPacket5, PacketTooLarge, Pingreq, Pingresp, Properties, ProtocolError5, Puback, Pubcomp, Publish,
    Pubrec, Pubrel, Suback, Subscribe, Unsuback, Unsubscribe, subscription_options,
)

CODECS = [pytest.param(codec5, id="cython"), pytest.param(ref, id="reference")]
PROPS = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT, WILL = 8, 9, 10, 11, 14, 0


@contextmanager
def control_characters(allowed: bool):
    """Both codecs' policy (the 3.1.1 codec's, which the 5.0 codec shares)."""
    codec.allow_control_characters(allowed)
    ref3.allow_control_characters(allowed)
    try:
        yield
    finally:
        codec.allow_control_characters(False)
        ref3.allow_control_characters(False)


# --- strategies --------------------------------------------------------------------

def _chars(exclude=""):
    return st.characters(codec="utf-8", exclude_categories=("Cc",), exclude_characters="\x00" + exclude)


_level = st.one_of(st.sampled_from(["sensors", "dev1", "a", "$SYS", "x y", "é", "日本"]),
                   st.text(_chars("/+#"), max_size=6))
topic_names = st.one_of(st.lists(_level, min_size=1, max_size=4).map("/".join),
                        st.text(_chars("+#"), min_size=1, max_size=20)).filter(bool)
plain_filters = st.one_of(
    st.builds(lambda levels, tail: "/".join(levels + tail),
              st.lists(st.one_of(_level, st.just("+")), min_size=1, max_size=4),
              st.sampled_from([[], [], ["#"]])).filter(bool),
    st.just("#"),
).filter(lambda f: ref3.is_valid_topic_filter(f) and not f.startswith("$share/"))
shared_filters = st.builds(lambda name, f: f"$share/{name}/{f}",
                           st.text(_chars("/+#"), min_size=1, max_size=6), plain_filters)
texts = st.text(_chars(), max_size=16)
any_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)   # controls allowed
packet_ids = st.integers(1, 65535)


def _value(ident: int):
    kind = ref.PROPERTIES[ident][0]
    if ident in ref._FLAGS:
        return st.integers(0, 1)
    if ident == 0x08:
        return topic_names
    if kind == ref.U16:
        return st.integers(1 if ident in ref._NOT_ZERO else 0, 65535)
    if kind == ref.U32:
        return st.integers(1 if ident in ref._NOT_ZERO else 0, 2**32 - 1)
    if kind == ref.VBI:
        return st.sampled_from([1, 127, 128, 16383, 16384, 2097151, 2097152, 268435455]) | st.integers(1, 268435455)
    if kind == ref.STR:
        return texts
    return st.binary(max_size=20)


@st.composite
def properties(draw, where: int):
    allowed = [i for i, (_, ctx) in ref.PROPERTIES.items() if where in ctx]
    chosen = draw(st.lists(st.sampled_from(allowed), unique=True, max_size=6)) if allowed else []
    if 0x16 in chosen and 0x15 not in chosen:
        chosen.append(0x15)         # Authentication Data needs a Method
    if where == AUTH and 0x15 not in chosen:
        chosen.append(0x15)         # AUTH always carries one (3.15.2.2.2)
    kwargs = {}
    for ident in chosen:
        name = PROPERTY_NAMES[ident]
        if ident == 0x26:
            kwargs[name] = tuple(draw(st.lists(st.tuples(any_texts, any_texts), min_size=1, max_size=3)))
        elif ident == 0x0B:
            n = 3 if where == PUBLISH else 1
            kwargs[name] = tuple(draw(st.lists(_value(ident), min_size=1, max_size=n)))
        else:
            kwargs[name] = draw(_value(ident))
    return Properties(**kwargs)


@st.composite
def publishes(draw):
    qos = draw(st.integers(0, 2))
    props = draw(properties(PUBLISH))
    topic = draw(topic_names)
    if props.topic_alias is not None and draw(st.booleans()):
        topic = ""                  # a topic alias alone (3.3.2.3.4)
    return Publish(topic, draw(st.binary(max_size=100)), qos, draw(st.booleans()),
                   draw(st.booleans()) if qos else False, draw(packet_ids) if qos else 0, props)


@st.composite
def connects(draw):
    will_topic = will_message = None
    will_qos, will_retain, will_props = 0, False, EMPTY
    if draw(st.booleans()):
        will_topic = draw(topic_names)
        will_message = draw(st.binary(max_size=30))
        will_qos = draw(st.integers(0, 2))
        will_retain = draw(st.booleans())
        will_props = draw(properties(WILL))
    return Connect(draw(texts), draw(st.booleans()), draw(st.integers(0, 65535)), draw(properties(CONNECT)),
                   will_topic, will_message, will_qos, will_retain, will_props,
                   draw(st.none() | texts), draw(st.none() | st.binary(max_size=20)))


@st.composite
def connacks(draw):
    code = draw(st.sampled_from(sorted(ref.REASON_CODES[CONNACK])))
    return Connack(draw(st.booleans()) if code == 0 else False, code, draw(properties(CONNACK)))


def _acks(cls):
    return st.builds(cls, packet_ids, st.sampled_from(sorted(ref.REASON_CODES[cls.type])), properties(cls.type))


@st.composite
def subscribes(draw):
    entries = []
    for _ in range(draw(st.integers(1, 4))):
        shared = draw(st.booleans())
        f = draw(shared_filters if shared else plain_filters)
        options = subscription_options(draw(st.integers(0, 2)), False if shared else draw(st.booleans()),
                                       draw(st.booleans()), draw(st.integers(0, 2)))
        entries.append((f, options))
    return Subscribe(draw(packet_ids), entries, draw(properties(SUBSCRIBE)))


packets = st.one_of(
    publishes(), connects(), connacks(),
    _acks(Puback), _acks(Pubrec), _acks(Pubrel), _acks(Pubcomp),
    subscribes(),
    st.builds(Suback, packet_ids, st.lists(st.sampled_from(sorted(ref.REASON_CODES[SUBACK])), min_size=1, max_size=4),
              properties(SUBACK)),
    st.builds(Unsubscribe, packet_ids, st.lists(plain_filters | shared_filters, min_size=1, max_size=4),
              properties(UNSUBSCRIBE)),
    st.builds(Unsuback, packet_ids,
              st.lists(st.sampled_from(sorted(ref.REASON_CODES[UNSUBACK])), min_size=1, max_size=4),
              properties(UNSUBACK)),
    st.just(Pingreq()), st.just(Pingresp()),
    st.builds(Disconnect, st.sampled_from(sorted(ref.REASON_CODES[DISCONNECT])), properties(DISCONNECT)),
    st.builds(Auth, st.sampled_from(sorted(ref.REASON_CODES[AUTH])), properties(AUTH)),
)
limits = st.sampled_from([MAX_REMAINING_LENGTH, MAX_REMAINING_LENGTH, 0, 2, 30, 127, 128])


def assert_same_outcome(data, limit=MAX_REMAINING_LENGTH):
    got = outcome5(codec5.decode, data, limit)
    assert got == outcome5(ref.decode, data, limit), data
    counted = outcome5(codec5.decode_count, data, limit)
    assert counted == outcome5(ref.decode_count, data, limit), data
    if got[0] == "ok":
        assert counted == ("ok", len(got[1][0]))
    else:
        assert counted == got
    return got


# --- property tests ----------------------------------------------------------------

@PROPS
@given(packets)
def test_encoders_agree_byte_for_byte(p):
    assert codec5.encode(p) == ref.encode(p)


@PROPS
@given(packets)
def test_decode_inverts_encode(p):
    data = codec5.encode(p)
    for mod in (codec5, ref):
        assert mod.decode(data) == ([p], len(data))
        assert mod.decode_count(data) == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets, min_size=1, max_size=4))
def test_a_stream_cut_at_every_byte_boundary_decodes_the_same(stream):
    wire = b"".join(codec5.encode(p) for p in stream)
    for cut in range(len(wire) + 1):
        for mod in (codec5, ref):
            first, used = mod.decode(wire[:cut])
            rest, used2 = mod.decode(wire[used:])
            assert first + rest == stream and used + used2 == len(wire)


@PROPS
@given(st.lists(packets, min_size=1, max_size=8), st.data())
def test_any_split_into_many_pieces_decodes_the_same(stream, data):
    wire = b"".join(codec5.encode(p) for p in stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    chunks = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]
    for mod in (codec5, ref):
        pending, got = b"", []
        for chunk in chunks:
            pending += chunk
            decoded, used = mod.decode(pending)
            got += decoded
            pending = pending[used:]
        assert got == stream and pending == b""


@PROPS
@given(st.binary(max_size=64), limits, st.booleans())
def test_random_bytes_same_outcome(data, limit, allow_control):
    with control_characters(allow_control):
        assert_same_outcome(data, limit)


@st.composite
def mutated_streams(draw):
    wire = bytearray(b"".join(codec5.encode(p) for p in draw(st.lists(packets, min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "set", "set", "xor", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(wire) - 1, 0)))
        if op == "set" and wire:
            wire[at] = draw(st.integers(0, 255))
        elif op == "xor" and wire:
            wire[at] ^= draw(st.sampled_from([0x01, 0x02, 0x04, 0x08, 0x10, 0x40, 0x80]))
        elif op == "insert":
            wire[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del wire[at:at + draw(st.integers(1, 4))]
        elif op == "truncate":
            del wire[at:]
    return bytes(wire)


@PROPS
@given(mutated_streams(), limits, st.booleans())
def test_mutated_streams_same_outcome(data, limit, allow_control):
    with control_characters(allow_control):
        assert_same_outcome(data, limit)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_streams())
def test_bad_input_cut_at_every_byte_boundary(data):
    """Fed in pieces, a stream is refused for the same reason as whole, or
    decodes to the start of what it decodes to whole: no check depends on
    bytes not received yet."""
    whole = assert_same_outcome(data)
    for cut in range(len(data)):
        part = assert_same_outcome(data[:cut])
        if part[0] != "ok":
            assert part == whole
        elif whole[0] == "ok":
            packets, used = part[1]
            assert whole[1][0][:len(packets)] == packets and used <= whole[1][1]


# Arbitrary properties, valid or not: identifiers of every kind (unknown
# ones, ones not allowed in the packet, duplicates), values at the edges
# (0, 1, 2, 0xFF), strings of bytes that are not UTF-8, truncated values.
_raw_string = st.one_of(st.just(b""), st.just(b"a/+"), st.just(b"\xff"), st.just(b"\x00"), st.just(b"\x01x"),
                        st.just(b"ok"), st.binary(max_size=4))


@st.composite
def raw_property(draw):
    ident = draw(st.sampled_from(sorted(ref.PROPERTIES)) | st.sampled_from([0x00, 0x04, 0x2B, 0x7F, 0x80, 0xFF]))
    kind = ref.PROPERTIES.get(ident, (ref.BYTE,))[0]
    if kind == ref.BYTE:
        value = bytes([draw(st.sampled_from([0, 1, 2, 0xFF]))])
    elif kind == ref.U16:
        value = draw(st.sampled_from([0, 1, 0xFFFF])).to_bytes(2, "big")
    elif kind == ref.U32:
        value = draw(st.sampled_from([0, 1, 2**32 - 1])).to_bytes(4, "big")
    elif kind == ref.VBI:
        value = draw(st.sampled_from([b"\x00", b"\x01", b"\x80\x01", b"\x80\x00", b"\xff\xff\xff\x7f",
                                      b"\xff\xff\xff\xff\x01", b"\x80"]))
    elif kind == ref.PAIR:
        value = mqtt_str(draw(_raw_string)) + mqtt_str(draw(_raw_string))
    else:
        value = mqtt_str(draw(_raw_string))
    if draw(st.integers(0, 15)) == 0:
        value = value[:-1]          # cut
    return bytes([ident]) + value


@st.composite
def packets_with_raw_properties(draw):
    block = b"".join(draw(st.lists(raw_property(), max_size=4)))
    props = varint(len(block)) + block
    kind = draw(st.sampled_from(["publish", "connect", "will", "connack", "puback", "pubrel", "subscribe",
                                 "suback", "unsubscribe", "unsuback", "disconnect", "auth"]))
    if kind == "publish":
        topic = draw(st.sampled_from([b"a/b", b""]))
        return packet(0x32, mqtt_str(topic) + b"\x00\x07" + props + b"payload")
    if kind == "connect":
        return packet(0x10, mqtt_str(b"MQTT") + b"\x05\x02\x00\x3c" + props + mqtt_str(b"id"))
    if kind == "will":
        return packet(0x10, mqtt_str(b"MQTT") + b"\x05\x06\x00\x3c\x00" + mqtt_str(b"id") + props
                      + mqtt_str(b"w/t") + mqtt_str(b"bye"))
    if kind == "connack":
        return packet(0x20, b"\x00\x00" + props)
    if kind in ("puback", "pubrel"):
        return packet(0x40 if kind == "puback" else 0x62, b"\x00\x07\x00" + props)
    if kind == "subscribe":
        return packet(0x82, b"\x00\x07" + props + mqtt_str(b"a/#") + b"\x01")
    if kind == "suback":
        return packet(0x90, b"\x00\x07" + props + b"\x00")
    if kind == "unsubscribe":
        return packet(0xA2, b"\x00\x07" + props + mqtt_str(b"a/#"))
    if kind == "unsuback":
        return packet(0xB0, b"\x00\x07" + props + b"\x00")
    if kind == "disconnect":
        return packet(0xE0, b"\x00" + props)
    return packet(0xF0, b"\x18" + props)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets_with_raw_properties(), st.booleans())
def test_arbitrary_properties_same_outcome(data, allow_control):
    with control_characters(allow_control):
        assert_same_outcome(data)


# --- helpers for hand-made packets ---------------------------------------------------

def props(*items: bytes) -> bytes:
    """A property block: the Property Length, then the properties."""
    block = b"".join(items)
    return varint(len(block)) + block


def u8(ident, v):
    return bytes([ident, v])


def u16(ident, v):
    return bytes([ident]) + struct.pack("!H", v)


def u32(ident, v):
    return bytes([ident]) + struct.pack("!I", v)


def s(ident, text):
    return bytes([ident]) + mqtt_str(text)


def pair(k, v):
    return b"\x26" + mqtt_str(k) + mqtt_str(v)


def connect5(flags=0x02, properties=b"\x00", payload=None, name=b"MQTT", level=5) -> bytes:
    if payload is None:
        payload = mqtt_str(b"client")
    return packet(0x10, mqtt_str(name) + bytes([level, flags]) + b"\x00\x3c" + properties + payload)


def publish5(properties=b"\x00", topic=b"a/b", qos=1, packet_id=7, payload=b"x", first=None) -> bytes:
    first = first if first is not None else 0x30 | (qos << 1)
    return packet(first, mqtt_str(topic) + (struct.pack("!H", packet_id) if qos else b"") + properties + payload)


def assert_malformed(data: bytes, reason: str):
    """A Malformed Packet (0x81) with this reason, by both decoders and both
    entry points."""
    _assert_error(data, reason, MalformedPacket5, 0x81)


def assert_protocol_error(data: bytes, reason: str):
    """A Protocol Error (0x82) with this reason."""
    _assert_error(data, reason, ProtocolError5, 0x82)


def _assert_error(data, reason, cls, code):
    for mod in (codec5, ref):
        for fn in (mod.decode, mod.decode_count):
            with pytest.raises(cls) as err:
                fn(data)
            assert (err.value.reason, err.value.reason_code) == (reason, code), (mod.__name__, fn.__name__)
            assert isinstance(err.value, p3.MalformedPacket)     # what a 3.1.1 handler catches too


def assert_accepted(data: bytes):
    got = codec5.decode(data)
    assert got == ref.decode(data)
    assert got[1] == len(data) and len(got[0]) == 1
    assert codec5.decode_count(data) == ref.decode_count(data) == 1
    return got[0][0]


# --- fixed header and Variable Byte Integers ------------------------------------------------

def test_remaining_length_over_four_bytes_is_malformed_1_5_5():
    assert_malformed(b"\x30\xff\xff\xff\xff\x01", "varint")


@pytest.mark.parametrize("data", [b"\xc0\x80\x00", b"\x30\x80\x80\x00", b"\xe0\x80\x00"])
def test_remaining_length_not_minimal_is_malformed_MQTT_1_5_5_1(data):
    assert_malformed(data, "varint")


def test_largest_remaining_length_is_incomplete_not_an_error():
    for mod in (codec5, ref):
        assert mod.decode(b"\x30\xff\xff\xff\x7f\x00\x03") == ([], 0)
        assert mod.decode(b"\x30\xff\xff") == ([], 0)
        assert mod.decode(b"\x30\x80") == ([], 0)


@pytest.mark.parametrize("first", [0x00, 0x0F])
def test_reserved_packet_type_0_is_malformed_2_1_2(first):
    assert_malformed(bytes([first, 0]), "header")


@pytest.mark.parametrize("ptype", [1, 2, 4, 5, 7, 9, 11, 12, 13, 14, 15])
@pytest.mark.parametrize("flags", [1, 2, 4, 8, 15])
def test_reserved_header_flags_are_malformed_MQTT_2_1_3_1(ptype, flags):
    assert_malformed(bytes([ptype << 4 | flags, 0]), "header")


@pytest.mark.parametrize("ptype", [6, 8, 10])
@pytest.mark.parametrize("flags", [0, 1, 3, 15])
def test_pubrel_subscribe_unsubscribe_flags_must_be_0010_MQTT_2_1_3_1(ptype, flags):
    assert_malformed(bytes([ptype << 4 | flags, 2, 0, 1]), "header")


def test_publish_qos_3_is_malformed_MQTT_3_3_1_4():
    assert_malformed(publish5(first=0x36), "qos")


def test_publish_dup_on_qos_0_is_malformed_MQTT_3_3_1_2():
    assert_malformed(publish5(qos=0, first=0x38), "header")


def test_auth_is_packet_type_15():
    p = assert_accepted(packet(0xF0, b"\x18" + props(s(0x15, b"SCRAM-SHA-1"), b"\x16\x00\x02hi")))
    assert p == Auth(0x18, Properties(authentication_method="SCRAM-SHA-1", authentication_data=b"hi"))


@pytest.mark.parametrize("data", [b"\xc0\x01\x00", b"\xd0\x01\x00"])
def test_pingreq_pingresp_with_a_body_are_malformed(data):
    assert_malformed(data, "length")


def test_packet_over_the_size_limit_is_rejected():
    data = codec5.encode(Publish("a/b", b"x" * 100))
    for mod in (codec5, ref):
        for fn in (mod.decode, mod.decode_count):
            with pytest.raises(PacketTooLarge) as err:
                fn(data, 50)
            assert (err.value.remaining_length, err.value.limit) == (106, 50)


# --- properties: section 2.2.2 -------------------------------------------------------------

def test_property_length_over_four_bytes_or_not_minimal_is_malformed_MQTT_1_5_5_1():
    assert_malformed(publish5(b"\xff\xff\xff\xff\x01"), "varint")
    assert_malformed(publish5(b"\x80\x00"), "varint")


def test_property_length_past_the_packet_is_malformed():
    assert_malformed(packet(0x32, mqtt_str(b"a") + b"\x00\x01\x05\x01\x01"), "length")
    assert_malformed(packet(0x40, b"\x00\x01\x00\x03\x1f\x00"), "length")


@pytest.mark.parametrize("ident", [0x00, 0x04, 0x05, 0x0A, 0x10, 0x14, 0x1B, 0x20, 0x2B, 0x7F, 0x80, 0xFF])
def test_unknown_property_identifier_is_malformed_2_2_2_2(ident):
    assert_malformed(publish5(props(bytes([ident, 0]))), "property")


@pytest.mark.parametrize("where, data", [
    ("PUBLISH: Session Expiry Interval", publish5(props(u32(0x11, 5)))),
    ("PUBLISH: Will Delay Interval", publish5(props(u32(0x18, 5)))),
    ("PUBLISH: Reason String", publish5(props(s(0x1F, b"r")))),
    ("CONNECT: Topic Alias", connect5(properties=props(u16(0x23, 1)))),
    ("CONNECT: Payload Format Indicator", connect5(properties=props(u8(0x01, 1)))),
    ("CONNECT: Reason String", connect5(properties=props(s(0x1F, b"r")))),
    ("will: Session Expiry Interval", connect5(0x06, payload=mqtt_str(b"id") + props(u32(0x11, 1)) + mqtt_str(b"w")
                                              + mqtt_str(b"m"))),
    ("CONNACK: Request Problem Information", packet(0x20, b"\x00\x00" + props(u8(0x17, 1)))),
    ("PUBACK: Subscription Identifier", packet(0x40, b"\x00\x01\x00" + props(b"\x0b\x01"))),
    ("SUBSCRIBE: Reason String", packet(0x82, b"\x00\x01" + props(s(0x1F, b"r")) + mqtt_str(b"a") + b"\x00")),
    ("UNSUBSCRIBE: Subscription Identifier", packet(0xA2, b"\x00\x01" + props(b"\x0b\x01") + mqtt_str(b"a"))),
    ("DISCONNECT: Authentication Method", packet(0xE0, b"\x00" + props(s(0x15, b"m")))),
    ("AUTH: Session Expiry Interval", packet(0xF0, b"\x18" + props(s(0x15, b"m"), u32(0x11, 1)))),
])
def test_property_not_valid_for_its_packet_is_malformed_2_2_2_2(where, data):
    assert_malformed(data, "property")


@pytest.mark.parametrize("item", [u8(0x01, 1), u32(0x02, 5), s(0x03, b"t"), s(0x08, b"r/t"), s(0x09, b"c"),
                                  u16(0x23, 1)])
def test_duplicate_property_in_publish_is_a_protocol_error(item):
    """Each of these: 'It is a Protocol Error to include the X more than
    once' (3.3.2.3.2-3.3.2.3.6)."""
    assert_protocol_error(publish5(props(item, item)), "duplicate_property")
    assert_protocol_error(publish5(props(item, pair(b"k", b"v"), item)), "duplicate_property")


@pytest.mark.parametrize("item", [u32(0x11, 1), u16(0x21, 1), u32(0x27, 9), u16(0x22, 1), u8(0x19, 1), u8(0x17, 1),
                                  s(0x15, b"m")])
def test_duplicate_property_in_connect_is_a_protocol_error_3_1_2_11(item):
    assert_protocol_error(connect5(properties=props(item, item)), "duplicate_property")


def test_duplicate_subscription_identifier_in_subscribe_is_a_protocol_error_3_8_2_1_2():
    assert_protocol_error(packet(0x82, b"\x00\x01" + props(b"\x0b\x01", b"\x0b\x02") + mqtt_str(b"a") + b"\x00"),
                          "duplicate_property")


def test_user_property_and_publish_subscription_identifiers_may_repeat_MQTT_3_3_4_3():
    p = assert_accepted(publish5(props(pair(b"k", b"1"), b"\x0b\x05", pair(b"k", b"2"), b"\x0b\x80\x01",
                                       pair(b"a", b"3"))))
    assert p.properties.user_properties == (("k", "1"), ("k", "2"), ("a", "3"))     # order kept: MQTT-3.3.2-18
    assert p.properties.subscription_identifiers == (5, 128)


@pytest.mark.parametrize("data", [
    connect5(properties=props(u16(0x21, 0))),                   # Receive Maximum 0: 3.1.2.11.3
    packet(0x20, b"\x00\x00" + props(u16(0x21, 0))),            # 3.2.2.3.3
    connect5(properties=props(u32(0x27, 0))),                   # Maximum Packet Size 0: 3.1.2.11.4
    packet(0x20, b"\x00\x00" + props(u32(0x27, 0))),            # 3.2.2.3.6
    publish5(props(u16(0x23, 0))),                              # Topic Alias 0: MQTT-3.3.2-8
    publish5(props(b"\x0b\x00")),                               # Subscription Identifier 0: 3.3.2.3.8
    packet(0x82, b"\x00\x01" + props(b"\x0b\x00") + mqtt_str(b"a") + b"\x00"),   # 3.8.2.1.2
    connect5(properties=props(u8(0x17, 2))),                    # Request Problem Information: 3.1.2.11.7
    connect5(properties=props(u8(0x19, 2))),                    # Request Response Information: 3.1.2.11.6
    packet(0x20, b"\x00\x00" + props(u8(0x24, 2))),             # Maximum QoS: 3.2.2.3.4
    packet(0x20, b"\x00\x00" + props(u8(0x25, 2))),             # Retain Available: 3.2.2.3.5
    packet(0x20, b"\x00\x00" + props(u8(0x28, 2))),             # Wildcard Subscription Available: 3.2.2.3.11
    packet(0x20, b"\x00\x00" + props(u8(0x29, 2))),             # Subscription Identifiers Available: 3.2.2.3.12
    packet(0x20, b"\x00\x00" + props(u8(0x2A, 0xFF))),          # Shared Subscription Available: 3.2.2.3.13
    publish5(props(u8(0x01, 2))),                               # Payload Format Indicator: 3.3.2.3.2
])
def test_property_value_not_allowed_is_a_protocol_error(data):
    assert_protocol_error(data, "property_value")


def test_subscription_identifier_over_four_bytes_or_not_minimal_is_malformed_MQTT_1_5_5_1():
    assert_malformed(publish5(props(b"\x0b\xff\xff\xff\xff\x01")), "varint")
    assert_malformed(publish5(props(b"\x0b\x80\x00")), "varint")
    assert assert_accepted(publish5(props(b"\x0b\xff\xff\xff\x7f"))).properties.subscription_identifiers == (
        268435455,)


@pytest.mark.parametrize("raw", [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"a\x00b", b"\xf4\x90\x80\x80"])
def test_ill_formed_utf8_in_string_properties_is_malformed_MQTT_1_5_4_1_and_2(raw):
    assert_malformed(publish5(props(s(0x03, raw))), "utf8")
    assert_malformed(packet(0x40, b"\x00\x01\x80" + props(s(0x1F, raw))), "utf8")


@pytest.mark.parametrize("raw", [b"\xff", b"\xed\xbf\xbf", b"\x00"])
def test_ill_formed_user_property_is_malformed_MQTT_1_5_7_1(raw):
    assert_malformed(publish5(props(pair(raw, b"v"))), "utf8")
    assert_malformed(publish5(props(pair(b"k", raw))), "utf8")


def test_control_characters_allowed_in_user_properties_and_reason_strings():
    p = assert_accepted(packet(0x40, b"\x00\x01\x80" + props(s(0x1F, b"a\x01b"), pair(b"\x7f", b"\t"))))
    assert p.properties.reason_string == "a\x01b" and p.properties.user_properties == (("\x7f", "\t"),)


@pytest.mark.parametrize("topic, reason", [(b"a/+", "topic"), (b"#", "topic"), (b"", "topic"), (b"a\x01", "control")])
def test_response_topic_must_be_a_topic_name_MQTT_3_3_2_13_and_14(topic, reason):
    assert_malformed(publish5(props(s(0x08, topic))), reason)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_property_value_cut_by_the_property_length_is_malformed(cut):
    item = u32(0x02, 60)
    assert_malformed(packet(0x32, mqtt_str(b"a") + b"\x00\x01" + bytes([len(item) - cut]) + item[:-cut]
                            + b"x" * cut), "length")


def test_authentication_data_without_method_is_a_protocol_error_3_1_2_11_10():
    assert_protocol_error(connect5(properties=props(b"\x16\x00\x01x")), "authentication")
    assert_protocol_error(packet(0x20, b"\x00\x00" + props(b"\x16\x00\x01x")), "authentication")


def test_auth_without_authentication_method_is_a_protocol_error_3_15_2_2_2():
    assert_protocol_error(packet(0xF0, b"\x18\x00"), "authentication")
    assert_protocol_error(packet(0xF0, b"\x19"), "authentication")
    # the short form (Success, no properties) is the one exception: 3.15.2.1
    assert assert_accepted(packet(0xF0, b"")) == Auth()


# --- reason codes ------------------------------------------------------------------------------

REASON_PACKETS = {
    CONNACK: lambda rc: packet(0x20, bytes([0, rc]) + b"\x00"),
    PUBACK: lambda rc: packet(0x40, b"\x00\x01" + bytes([rc])),
    PUBREC: lambda rc: packet(0x50, b"\x00\x01" + bytes([rc])),
    PUBREL: lambda rc: packet(0x62, b"\x00\x01" + bytes([rc])),
    PUBCOMP: lambda rc: packet(0x70, b"\x00\x01" + bytes([rc]) + b"\x00"),
    SUBACK: lambda rc: packet(0x90, b"\x00\x01\x00\x00" + bytes([rc])),
    UNSUBACK: lambda rc: packet(0xB0, b"\x00\x01\x00" + bytes([rc])),
    DISCONNECT: lambda rc: packet(0xE0, bytes([rc])),
    AUTH: lambda rc: packet(0xF0, bytes([rc]) + props(s(0x15, b"m"))),
}


@pytest.mark.parametrize("ptype", list(REASON_PACKETS), ids=["CONNACK", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
                                                              "SUBACK", "UNSUBACK", "DISCONNECT", "AUTH"])
def test_every_reason_code_of_each_packet_and_no_other(ptype):
    """MQTT-3.2.2-8, MQTT-3.4.2-1, MQTT-3.5.2-1, MQTT-3.6.2-1, MQTT-3.7.2-1,
    MQTT-3.9.3-2, MQTT-3.11.3-2, MQTT-3.14.2-1, MQTT-3.15.2-1: the sender MUST
    use one of the packet's reason codes; another one is a Protocol Error."""
    for rc in range(256):
        data = REASON_PACKETS[ptype](rc)
        if rc in ref.REASON_CODES[ptype]:
            assert_accepted(data)
        else:
            assert_protocol_error(data, "reason_code")


def test_acks_reason_code_and_properties_may_be_left_out_3_4_2_1():
    assert assert_accepted(packet(0x40, b"\x00\x09")) == Puback(9)
    assert assert_accepted(packet(0x50, b"\x00\x09\x10")) == Pubrec(9, 0x10)
    assert assert_accepted(packet(0x62, b"\x00\x09\x92\x00")) == Pubrel(9, 0x92)
    assert assert_accepted(packet(0xE0, b"")) == Disconnect()
    assert assert_accepted(packet(0xE0, b"\x8e")) == Disconnect(0x8E)
    # and are written short
    for mod in CODECS:
        mod = mod.values[0]
        assert mod.encode(Puback(9)) == b"\x40\x02\x00\x09"
        assert mod.encode(Pubrec(9, 0x10)) == b"\x50\x03\x00\x09\x10"
        assert mod.encode(Disconnect()) == b"\xe0\x00"
        assert mod.encode(Disconnect(0x8D)) == b"\xe0\x01\x8d"


def test_ack_trailing_bytes_after_properties_are_malformed():
    assert_malformed(packet(0x40, b"\x00\x01\x00\x00\x00"), "length")
    assert_malformed(packet(0xE0, b"\x00\x00\x00"), "length")


def test_connack_session_present_with_a_refusal_is_a_protocol_error_MQTT_3_2_2_6():
    assert_protocol_error(packet(0x20, b"\x01\x87\x00"), "session_present")


@pytest.mark.parametrize("flags", [0x02, 0x80, 0xFF])
def test_connack_reserved_flags_are_malformed_MQTT_3_2_2_1(flags):
    assert_malformed(packet(0x20, bytes([flags, 0, 0])), "protocol")


def test_connack_without_property_length_is_malformed():
    assert_malformed(packet(0x20, b"\x00\x00"), "length")


# --- packet identifiers --------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    publish5(packet_id=0), packet(0x40, b"\x00\x00"), packet(0x50, b"\x00\x00\x10"), packet(0x62, b"\x00\x00"),
    packet(0x70, b"\x00\x00"), packet(0x82, b"\x00\x00\x00" + mqtt_str(b"a") + b"\x00"),
    packet(0x90, b"\x00\x00\x00\x00"), packet(0xA2, b"\x00\x00\x00" + mqtt_str(b"a")),
    packet(0xB0, b"\x00\x00\x00\x00"),
])
def test_packet_id_zero_is_a_protocol_error_MQTT_2_2_1_3(data):
    assert_protocol_error(data, "packet_id")


# --- PUBLISH --------------------------------------------------------------------------------------

@pytest.mark.parametrize("topic", [b"a/+", b"#", b"+", b"a/#"])
def test_publish_topic_with_wildcards_is_malformed_MQTT_3_3_2_2(topic):
    assert_malformed(publish5(topic=topic), "topic")


def test_publish_empty_topic_without_topic_alias_is_a_protocol_error_3_3_2_1():
    assert_protocol_error(publish5(topic=b""), "topic_alias")
    p = assert_accepted(publish5(props(u16(0x23, 4)), topic=b""))
    assert (p.topic, p.properties.topic_alias) == ("", 4)


def test_publish_all_properties_decoded():
    data = publish5(props(u8(0x01, 1), u32(0x02, 3600), s(0x03, b"application/json"), s(0x08, b"reply/to"),
                          s(0x09, b"\x00\x01"), b"\x0b\x07", u16(0x23, 2), pair(b"k", b"v")))
    assert assert_accepted(data).properties == Properties(
        payload_format_indicator=1, message_expiry_interval=3600, content_type="application/json",
        response_topic="reply/to", correlation_data=b"\x00\x01", subscription_identifiers=(7,), topic_alias=2,
        user_properties=(("k", "v"),))


# --- SUBSCRIBE / UNSUBSCRIBE ----------------------------------------------------------------------

def _subscribe(filt=b"a/b", options=0x01, properties=b"\x00"):
    return packet(0x82, b"\x00\x07" + properties + mqtt_str(filt) + bytes([options]))


def test_subscribe_without_filters_is_a_protocol_error_MQTT_3_8_3_2():
    assert_protocol_error(packet(0x82, b"\x00\x07\x00"), "empty")


def test_unsubscribe_without_filters_is_a_protocol_error_MQTT_3_10_3_2():
    assert_protocol_error(packet(0xA2, b"\x00\x07\x00"), "empty")


def test_suback_unsuback_without_reason_codes_is_a_protocol_error():
    assert_protocol_error(packet(0x90, b"\x00\x07\x00"), "empty")
    assert_protocol_error(packet(0xB0, b"\x00\x07\x00"), "empty")


@pytest.mark.parametrize("options", [0x40, 0x80, 0xC0, 0x41])
def test_subscription_options_reserved_bits_are_malformed_MQTT_3_8_3_5(options):
    assert_malformed(_subscribe(options=options), "options")


@pytest.mark.parametrize("options", [0x03, 0x30, 0x33, 0x3F])
def test_subscription_options_qos_3_or_retain_handling_3_is_a_protocol_error_3_8_3_1(options):
    assert_protocol_error(_subscribe(options=options), "subscription")


def test_no_local_on_a_shared_subscription_is_a_protocol_error_MQTT_3_8_3_4():
    assert_protocol_error(_subscribe(b"$share/g/a/#", 0x04), "subscription")
    assert assert_accepted(_subscribe(b"$share/g/a/#", 0x2A)).topics == [("$share/g/a/#", 0x2A)]
    assert assert_accepted(_subscribe(b"a/#", 0x04)).topics == [("a/#", 0x04)]


@pytest.mark.parametrize("filt", [b"$share/", b"$share//a", b"$share/g", b"$share/g/", b"$share/g+/a", b"$share/+/a",
                                  b"$share/#"])
def test_bad_shared_subscription_filter_is_malformed_MQTT_4_8_2_1_and_2(filt):
    assert_malformed(_subscribe(filt), "topic")
    assert_malformed(packet(0xA2, b"\x00\x07\x00" + mqtt_str(filt)), "topic")


@pytest.mark.parametrize("filt", [b"a/#/b", b"a+", b"#/a", b""])
def test_bad_topic_filter_is_malformed_MQTT_4_7_1_1_and_2_MQTT_4_7_3_1(filt):
    """0x8F (Topic Filter invalid) is for a filter 'correctly formed but not
    allowed': one that is not a filter is a Malformed Packet."""
    assert_malformed(_subscribe(filt), "topic")
    assert_malformed(packet(0xA2, b"\x00\x07\x00" + mqtt_str(filt)), "topic")


def test_subscribe_options_decoded():
    opts = subscription_options(2, True, True, 2)
    assert opts == 0x2E
    p = assert_accepted(_subscribe(b"a/+", opts, props(b"\x0b\x09", pair(b"k", b"v"))))
    assert p == Subscribe(7, [("a/+", opts)], Properties(subscription_identifiers=(9,), user_properties=(("k", "v"),)))


# --- CONNECT ---------------------------------------------------------------------------------------

def test_connect_other_protocol_version_is_refused_with_0x84_MQTT_3_1_2_2():
    for level in (3, 4, 6, 0xFF):
        for mod in (codec5, ref):
            for fn in (mod.decode, mod.decode_count):
                with pytest.raises(ConnectRefused) as err:
                    fn(connect5(level=level))
                assert err.value.return_code == 0x84


@pytest.mark.parametrize("name", [b"MQIsdp", b"mqtt", b"", b"MQTT5"])
def test_connect_wrong_protocol_name_is_malformed_MQTT_3_1_2_1(name):
    assert_malformed(connect5(name=name), "protocol")


def test_connect_reserved_flag_is_malformed_MQTT_3_1_2_3():
    assert_malformed(connect5(0x03), "protocol")


@pytest.mark.parametrize("flags", [0x0A, 0x12, 0x22])
def test_connect_will_qos_or_retain_without_will_is_malformed_MQTT_3_1_2_11_and_13(flags):
    assert_malformed(connect5(flags), "protocol")


def test_connect_will_qos_3_is_malformed_MQTT_3_1_2_12():
    assert_malformed(connect5(0x1E, payload=mqtt_str(b"id") + b"\x00" + mqtt_str(b"w") + mqtt_str(b"m")), "qos")


def test_connect_password_without_user_name_is_allowed_3_1_2_9():
    p = assert_accepted(connect5(0x42, payload=mqtt_str(b"id") + mqtt_str(b"pw")))
    assert (p.username, p.password) == (None, b"pw")


def test_connect_empty_client_id_is_accepted_either_clean_start_MQTT_3_1_3_6():
    assert assert_accepted(connect5(0x00, payload=mqtt_str(b""))).client_id == ""
    assert assert_accepted(connect5(0x02, payload=mqtt_str(b""))).client_id == ""


@pytest.mark.parametrize("topic, reason", [(b"w/+", "topic"), (b"", "topic"), (b"\xff", "utf8"), (b"w\x01", "control")])
def test_will_topic_must_be_a_topic_name_MQTT_3_1_3_11(topic, reason):
    assert_malformed(connect5(0x06, payload=mqtt_str(b"id") + b"\x00" + mqtt_str(topic) + mqtt_str(b"m")), reason)


def test_connect_all_fields_decoded():
    data = connect5(0xEE, props(u32(0x11, 0xFFFFFFFF), u16(0x21, 20), u32(0x27, 1 << 20), u16(0x22, 10),
                                u8(0x19, 1), u8(0x17, 0), pair(b"a", b"b"), s(0x15, b"m"), b"\x16\x00\x01d"),
                    mqtt_str(b"id") + props(u32(0x18, 30), u8(0x01, 1), u32(0x02, 60)) + mqtt_str(b"will/t")
                    + mqtt_str(b"bye") + mqtt_str(b"user") + mqtt_str(b"pw"))
    assert assert_accepted(data) == Connect(
        "id", True, 60,
        Properties(session_expiry_interval=0xFFFFFFFF, receive_maximum=20, maximum_packet_size=1 << 20,
                   topic_alias_maximum=10, request_response_information=1, request_problem_information=0,
                   user_properties=(("a", "b"),), authentication_method="m", authentication_data=b"d"),
        "will/t", b"bye", 1, True,
        Properties(will_delay_interval=30, payload_format_indicator=1, message_expiry_interval=60),
        "user", b"pw")


def test_connect_trailing_bytes_are_malformed():
    assert_malformed(connect5(payload=mqtt_str(b"id") + b"\x00"), "length")


def test_connect_property_not_allowed_in_will_properties_2_2_2_2():
    assert_malformed(connect5(0x06, payload=mqtt_str(b"id") + props(u16(0x21, 5)) + mqtt_str(b"w") + mqtt_str(b"m")),
                     "property")


# --- control characters (section 1.5.4), the 3.1.1 codec's policy ----------------------------------

@pytest.mark.parametrize("data", [
    connect5(payload=mqtt_str(b"id\x01")),
    connect5(0x82, payload=mqtt_str(b"id") + mqtt_str(b"u\x7f")),
    publish5(topic=b"a/\x1f"),
    _subscribe(b"a/\xc2\x85"),
    packet(0xA2, b"\x00\x07\x00" + mqtt_str(b"\x09")),
])
def test_control_characters_refused_by_default_allowed_by_the_policy(data):
    assert_malformed(data, "control")
    with control_characters(True):
        assert_accepted(data)


# --- the per-connection choice ------------------------------------------------------------------------

def test_protocol_level_picks_the_codec():
    for mod in (codec5, ref):
        assert mod.protocol_level(connect5()[2:]) == 5
        assert mod.protocol_level(connect_packet(b"c")[2:]) == 4
        assert mod.protocol_level(connect_packet(b"c", level=3)[2:]) == 3
        with pytest.raises(MalformedPacket5):
            mod.protocol_level(mqtt_str(b"HTTP") + b"\x05")


def test_decoder_v5_after_a_level_5_connect():
    d = codec5.Decoder()
    assert d.version == 0
    stream = connect5() + publish5(props(u16(0x23, 1))) + packet(0xE0, b"\x8e")
    for cut in range(len(stream) + 1):
        d = codec5.Decoder()
        got, used = d.decode(stream[:cut])
        rest, used2 = d.decode(stream[used:])
        assert used + used2 == len(stream)
        assert got + rest == [Connect("client"), Publish("a/b", b"x", 1, packet_id=7, properties=Properties(
            topic_alias=1)), Disconnect(0x8E)]
        assert d.version == 5


def test_decoder_3_1_1_after_a_level_4_connect():
    d = codec5.Decoder()
    data = connect_packet(b"c") + packet(0x32, mqtt_str(b"a") + b"\x00\x01x") + b"\xe0\x00"
    got, used = d.decode(data)
    assert used == len(data) and d.version == 4
    assert got == [p3.Connect("c"), p3.Publish("a", b"x", 1, packet_id=1), p3.Disconnect()]
    # the same PUBLISH bytes mean something else in 5.0 (a property length)
    with pytest.raises(p3.MalformedPacket):
        codec5.decode(packet(0x32, mqtt_str(b"a") + b"\x00\x01x"))


def test_decoder_level_5_connect_with_a_non_minimal_length_is_malformed():
    body = connect5()[2:]
    with pytest.raises(MalformedPacket5):
        codec5.Decoder().decode(b"\x10" + b"\x80" * 0 + bytes([len(body) | 0x80, 0]) + body)


# --- encoder guards ------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [
    Publish("a", properties=Properties(session_expiry_interval=1)),         # not a PUBLISH property
    Puback(1, properties=Properties(topic_alias=1)),
    Connect("c", will_properties=Properties(will_delay_interval=1)),        # will properties without a will
    Publish("a", properties=Properties(topic_alias=70000)),
    Publish("a", properties=Properties(subscription_identifiers=(268435456,))),
    Publish("a", b"", 3),
    Puback(70000),
    Connack(reason_code=256),
    Publish("a", properties=Properties(correlation_data=b"x" * 70000)),
])
@pytest.mark.parametrize("mod", CODECS)
def test_encoders_reject_unencodable_values(mod, p):
    with pytest.raises(ValueError):
        mod.encode(p)


@pytest.mark.parametrize("mod", CODECS)
def test_encode_large_publish_uses_multi_byte_remaining_length(mod):
    for size in (120, 16380, 2_100_000):
        p = Publish("t", b"\xab" * size, 1, packet_id=1, properties=Properties(user_properties=(("k", "v"),)))
        data = mod.encode(p)
        assert data == ref.encode(p)
        assert codec5.decode(data) == ([p], len(data))


@pytest.mark.parametrize("mod", CODECS)
def test_decode_accepts_any_bytes_like(mod):
    p = Publish("a/b", b"xyz", 1, packet_id=2)
    data = codec5.encode(p) + b"\x30"
    for buf in (data, bytearray(data), memoryview(data)):
        assert mod.decode(buf) == ([p], len(data) - 1)
        assert mod.decode_count(buf) == 1
    assert mod.decode(b"") == ([], 0) and mod.decode_count(b"") == 0


def test_byte_order_mark_is_kept_MQTT_1_5_4_3():
    p = assert_accepted(publish5(props(s(0x03, "\ufefftext".encode())), topic="\ufeffa/b".encode()))
    assert (p.topic, p.properties.content_type) == ("\ufeffa/b", "\ufefftext")
