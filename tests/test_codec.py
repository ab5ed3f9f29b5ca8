"""The MQTT 3.1.1 codec (gw_ext.codec) against the pure-Python reference (tests/mqtt_ref.py).

Property tests: both encoders agree byte for byte, decoding inverts encoding,
decoding is insensitive to how the stream is cut, and on any input (random or
mutated) both decoders reach exactly the same outcome (same packets, or the
same error with the same reason). Then one explicit test per "malformed" rule,
named after the normative statement of MQTT 3.1.1 it checks.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mqtt_ref as ref
from decode_outcome import outcome
from mqtt_bytes import mqtt_str, packet
from gw_ext import codec
from gw.packets import (
    MAX_REMAINING_LENGTH, Connack, Connect, ConnectRefused, Disconnect, MalformedPacket,
    PacketTooLarge, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback,
    Subscribe, Unsuback, Unsubscribe,
)

CODECS = [pytest.param(codec, id="cython"), pytest.param(ref, id="reference")]
PROPS = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextmanager
def control_characters(allowed: bool):
    """Both codecs with control characters allowed or refused (their default)."""
    codec.allow_control_characters(allowed)
    ref.allow_control_characters(allowed)
    try:
        yield
    finally:
        codec.allow_control_characters(False)
        ref.allow_control_characters(False)


# --- strategies ------------------------------------------------------------------

def _chars(exclude=""):
    # No U+0000, no control character (Cc: U+0001-U+001F, U+007F-U+009F):
    # what a client id, user name, topic or filter may hold by default.
    return st.characters(codec="utf-8", exclude_categories=("Cc",), exclude_characters="\x00" + exclude)


_level = st.one_of(st.sampled_from(["sensors", "dev123", "temp", "a", "$SYS", "x y", "é", "日本"]),
                   st.text(_chars("/+#"), max_size=6))
topic_names = st.one_of(
    st.lists(_level, min_size=1, max_size=5).map("/".join),
    st.text(_chars("+#"), min_size=1, max_size=30),
).filter(lambda t: t != "")
# Valid filters only: an invalid one (a/#/b, a+, empty) is a malformed packet
# (MQTT-4.7.1-2/3, MQTT-4.7.3-1), checked by the rule tests below.
topic_filters = st.one_of(
    st.builds(lambda levels, tail: "/".join(levels + tail),
              st.lists(st.one_of(_level, st.just("+")), min_size=1, max_size=5),
              st.sampled_from([[], [], ["#"]])).filter(bool),
    st.just("#"),
    st.text(_chars(), min_size=1, max_size=20).filter(ref.is_valid_topic_filter),
)
texts = st.text(_chars(), max_size=20)
packet_ids = st.integers(1, 65535)
payloads = st.binary(max_size=200)


@st.composite
def publishes(draw):
    qos = draw(st.integers(0, 2))
    return Publish(draw(topic_names), draw(payloads), qos, draw(st.booleans()),
                   draw(st.booleans()) if qos else False,       # no DUP on QoS 0 (MQTT-3.3.1-2)
                   draw(packet_ids) if qos else 0)


@st.composite
def connects(draw):
    level = draw(st.sampled_from([4, 4, 4, 3]))
    if level == 3:   # MQTT 3.1: 1 to 23 bytes
        client_id = draw(st.text(_chars(), min_size=1, max_size=5))
    else:
        client_id = draw(texts)
    clean = draw(st.booleans()) if client_id else True
    will_topic = will_message = None
    will_qos, will_retain = 0, False
    if draw(st.booleans()):
        will_topic = draw(topic_names)
        will_message = draw(st.binary(max_size=50))
        will_qos = draw(st.integers(0, 2))
        will_retain = draw(st.booleans())
    username = draw(st.none() | texts)
    password = draw(st.none() | st.binary(max_size=30)) if username is not None else None
    return Connect(client_id, clean, draw(st.integers(0, 65535)), will_topic, will_message,
                   will_qos, will_retain, username, password, level)


packets = st.one_of(
    publishes(),
    connects(),
    st.builds(Connack, st.booleans(), st.integers(0, 5)),
    st.builds(Puback, packet_ids),
    st.builds(Pubrec, packet_ids),
    st.builds(Pubrel, packet_ids),
    st.builds(Pubcomp, packet_ids),
    st.builds(Subscribe, packet_ids,
              st.lists(st.tuples(topic_filters, st.integers(0, 2)), min_size=1, max_size=5)),
    st.builds(Suback, packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=5)),
    st.builds(Unsubscribe, packet_ids, st.lists(topic_filters, min_size=1, max_size=5)),
    st.builds(Unsuback, packet_ids),
    st.just(Pingreq()),
    st.just(Pingresp()),
    st.just(Disconnect()),
)

# Bytes that sit on the edges of the UTF-8 validator and the topic rules.
edge_bytes = st.lists(st.sampled_from(
    [0x00, 0x01, 0x23, 0x2B, 0x2F, 0x61, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1,
     0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]),
    max_size=24).map(bytes)
raw_strings = st.one_of(edge_bytes, st.binary(max_size=24), texts.map(lambda s: s.encode()))
limits = st.sampled_from([MAX_REMAINING_LENGTH, MAX_REMAINING_LENGTH, 0, 2, 30, 127, 128])


def assert_same_outcome(data, limit=MAX_REMAINING_LENGTH):
    got = outcome(codec.decode, data, limit)
    assert got == outcome(ref.decode, data, limit), data
    counted = outcome(codec.decode_count, data, limit)
    assert counted == outcome(ref.decode_count, data, limit), data
    if got[0] == "ok":
        assert counted == ("ok", len(got[1][0]))
    else:
        assert counted == got
    return got


# --- property tests ----------------------------------------------------------------

@PROPS
@given(packets)
def test_encoders_agree_byte_for_byte(p):
    assert codec.encode(p) == ref.encode(p)


@PROPS
@given(packets)
def test_decode_inverts_encode(p):
    data = codec.encode(p)
    for mod in (codec, ref):
        assert mod.decode(data) == ([p], len(data))
        assert mod.decode_count(data) == 1


@PROPS
@given(st.lists(packets, min_size=1, max_size=8), st.data())
def test_any_split_of_a_stream_decodes_the_same(stream, data):
    wire = b"".join(codec.encode(p) for p in stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    chunks = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]
    for mod in (codec, ref):
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
    wire = bytearray(b"".join(codec.encode(p) for p in draw(st.lists(packets, min_size=1, max_size=4))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "set", "set", "xor_flags", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(wire) - 1, 0)))
        if op == "set" and wire:
            wire[at] = draw(st.integers(0, 255))
        elif op == "xor_flags" and wire:
            wire[at] ^= draw(st.sampled_from([0x01, 0x02, 0x04, 0x08, 0x80]))
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


CONTROL_CHARACTERS = [chr(c) for c in range(0x01, 0x20)] + [chr(c) for c in range(0x7F, 0xA0)]


@PROPS
@given(raw_strings, st.sampled_from(["publish", "connect_id", "will_topic", "username",
                                     "subscribe", "unsubscribe"]), st.booleans())
def test_utf8_and_topic_rules_same_outcome(raw, where, allow_control):
    """Arbitrary bytes in every string field: both validators agree
    (MQTT-1.5.3-1/2, control characters by the policy, filters MQTT-4.7.1-2/3
    and MQTT-4.7.3-1)."""
    with control_characters(allow_control):
        _utf8_and_topic_rules(raw, where, allow_control)


def _utf8_and_topic_rules(raw, where, allow_control):
    s = mqtt_str(raw)
    if where == "publish":
        data = packet(0x30, s + b"payload")
    elif where == "connect_id":
        data = packet(0x10, mqtt_str(b"MQTT") + b"\x04\x00\x00\x3c" + s)
    elif where == "will_topic":
        data = packet(0x10, mqtt_str(b"MQTT") + b"\x04\x06\x00\x3c" + mqtt_str(b"id") + s + mqtt_str(b"bye"))
    elif where == "username":
        data = packet(0x10, mqtt_str(b"MQTT") + b"\x04\x82\x00\x3c" + mqtt_str(b"id") + s)
    elif where == "subscribe":
        data = packet(0x82, b"\x00\x01" + s + b"\x01")
    else:
        data = packet(0xA2, b"\x00\x01" + s)
    got = assert_same_outcome(data)
    try:
        text = raw.decode("utf-8")
        well_formed = "\x00" not in text
    except UnicodeDecodeError:
        well_formed = False
    if not well_formed:
        assert got == ("malformed", "utf8")
    elif not allow_control and any(ch in CONTROL_CHARACTERS for ch in text):
        assert got == ("malformed", "control")
    elif where in ("connect_id", "username"):
        assert got[0] in ("ok", "refused")
    elif where in ("subscribe", "unsubscribe"):
        valid = text != "" and ref.is_valid_topic_filter(text)
        assert got[0] == "ok" if valid else got == ("malformed", "topic")


@PROPS
@given(st.text(st.sampled_from("ab/+#é\x00\x01\x1f\x7f\x85\x9f\xa0"), max_size=12), st.booleans())
def test_topic_validity_helpers_agree(text, allow_control):
    with control_characters(allow_control):
        assert codec.is_valid_topic_filter(text) == ref.is_valid_topic_filter(text)
        assert codec.is_valid_topic_name(text) == ref.is_valid_topic_name(text)


# --- helpers for hand-made packets -----------------------------------------------------

def _connect(flags=0x02, payload=None, name=b"MQTT", level=4, keepalive=60) -> bytes:
    if payload is None:
        payload = mqtt_str(b"client")
    return packet(0x10, mqtt_str(name) + bytes([level, flags]) + keepalive.to_bytes(2, "big") + payload)


def assert_malformed(data: bytes, reason: str):
    for mod in (codec, ref):
        for fn in (mod.decode, mod.decode_count):
            with pytest.raises(MalformedPacket) as err:
                fn(data)
            assert err.value.reason == reason, (mod.__name__, fn.__name__)


def assert_refused(data: bytes, return_code: int):
    for mod in (codec, ref):
        for fn in (mod.decode, mod.decode_count):
            with pytest.raises(ConnectRefused) as err:
                fn(data)
            assert err.value.return_code == return_code


def assert_accepted(data: bytes):
    got = codec.decode(data)
    assert got == ref.decode(data)
    assert got[1] == len(data) and len(got[0]) == 1
    assert codec.decode_count(data) == ref.decode_count(data) == 1
    return got[0][0]


# --- fixed header ------------------------------------------------------------------

def test_remaining_length_over_four_bytes_is_malformed_MQTT_2_2_3():
    """Section 2.2.3: the Remaining Length field is at most four bytes."""
    assert_malformed(b"\x30\xff\xff\xff\xff\x01", "length")
    assert_malformed(b"\xc0\x80\x80\x80\x80", "length")


def test_largest_remaining_length_is_four_bytes_and_incomplete():
    # 268435455 in four bytes: a valid header, body not here yet.
    for mod in (codec, ref):
        assert mod.decode(b"\x30\xff\xff\xff\x7f\x00\x03") == ([], 0)
        assert mod.decode(b"\x30\xff\xff") == ([], 0)


@pytest.mark.parametrize("first", [0x00, 0x0F, 0xF0, 0xFF])
def test_reserved_packet_types_0_and_15_are_malformed_MQTT_2_2_1(first):
    assert_malformed(bytes([first, 0]), "header")


@pytest.mark.parametrize("ptype", [1, 2, 4, 5, 7, 9, 11, 12, 13, 14])
@pytest.mark.parametrize("flags", range(1, 16))
def test_reserved_header_flags_must_be_zero_MQTT_2_2_2_1_and_2(ptype, flags):
    assert_malformed(bytes([ptype << 4 | flags, 2, 0, 1]), "header")


@pytest.mark.parametrize("ptype, body", [(6, b"\x00\x01"), (8, b"\x00\x01" + mqtt_str(b"a") + b"\x00"),
                                         (10, b"\x00\x01" + mqtt_str(b"a"))])
@pytest.mark.parametrize("flags", [f for f in range(16) if f != 2])
def test_pubrel_subscribe_unsubscribe_flags_must_be_0010_MQTT_3_6_1_1_MQTT_3_8_1_1_MQTT_3_10_1_1(
        ptype, body, flags):
    assert_malformed(packet(ptype << 4 | flags, body), "header")
    assert_accepted(packet(ptype << 4 | 2, body))


@pytest.mark.parametrize("first", [0x36, 0x37, 0x3E, 0x3F])
def test_publish_qos_3_is_malformed_MQTT_3_3_1_4(first):
    assert_malformed(packet(first, mqtt_str(b"a/b") + b"\x00\x01x"), "qos")


@pytest.mark.parametrize("data", [
    packet(0x40, b"\x00\x01\x00"),       # PUBACK with 3 bytes
    packet(0x50, b"\x00"),               # PUBREC with 1 byte
    packet(0x62, b"\x00\x01\x00"),       # PUBREL
    packet(0x70, b""),                   # PUBCOMP without id
    packet(0xB0, b"\x00\x01\x00\x00"),   # UNSUBACK
    packet(0x20, b"\x00\x00\x00"),       # CONNACK
    packet(0xC0, b"\x00"),               # PINGREQ
    packet(0xD0, b"\x00"),               # PINGRESP
    packet(0xE0, b"\x00\x00"),           # DISCONNECT
])
def test_trailing_or_missing_bytes_in_fixed_size_packets_are_malformed(data):
    assert_malformed(data, "length")


def test_packet_over_the_size_limit_is_rejected():
    data = codec.encode(Publish("a/b", b"x" * 100))
    for mod in (codec, ref):
        for fn in (mod.decode, mod.decode_count):
            with pytest.raises(PacketTooLarge) as err:
                fn(data, 50)
            assert (err.value.remaining_length, err.value.limit) == (105, 50)
        assert mod.decode(data, 105)[1] == len(data)


def test_incomplete_packets_consume_nothing():
    data = codec.encode(Publish("a/b", b"x" * 200, 1, packet_id=3)) + codec.encode(Pingreq())
    for mod in (codec, ref):
        for cut in range(len(data) - 2):
            decoded, used = mod.decode(data[:cut])
            assert (decoded, used) == ([], 0)
        assert mod.decode(data[:-1])[1] == len(data) - 2


# --- strings -----------------------------------------------------------------------------

BAD_UTF8 = [
    b"\xc0\xaf",              # overlong '/'
    b"\xc1\xbf",              # overlong
    b"\xe0\x80\xaf",          # overlong, 3 bytes
    b"\xf0\x80\x80\xaf",      # overlong, 4 bytes
    b"\xed\xa0\x80",          # U+D800 (surrogate)
    b"\xed\xbf\xbf",          # U+DFFF (surrogate)
    b"\xf4\x90\x80\x80",      # above U+10FFFF
    b"\xf5\x80\x80\x80",      # invalid lead byte
    b"\xff",
    b"\x80",                  # lone continuation
    b"a\xe2\x82",             # truncated sequence
    b"abcdefgh\xe2\x82",      # truncated after an ASCII word
    b"\xc3\x28",              # bad continuation
]


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_ill_formed_utf8_topic_is_malformed_MQTT_1_5_3_1(bad):
    assert_malformed(packet(0x30, mqtt_str(b"a/" + bad) + b"payload"), "utf8")


@pytest.mark.parametrize("bad", [b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80"])
def test_ill_formed_utf8_in_every_string_field_is_malformed_MQTT_1_5_3_1(bad):
    assert_malformed(_connect(payload=mqtt_str(bad)), "utf8")                                  # client id
    assert_malformed(_connect(0x06, mqtt_str(b"id") + mqtt_str(b"w/" + bad) + mqtt_str(b"m")), "utf8")    # will topic
    assert_malformed(_connect(0x82, mqtt_str(b"id") + mqtt_str(bad)), "utf8")                        # user name
    assert_malformed(packet(0x82, b"\x00\x01" + mqtt_str(bad) + b"\x00"), "utf8")                # SUBSCRIBE
    assert_malformed(packet(0xA2, b"\x00\x01" + mqtt_str(bad)), "utf8")                          # UNSUBSCRIBE


def test_null_character_is_malformed_MQTT_1_5_3_2():
    assert_malformed(packet(0x30, mqtt_str(b"a\x00b") + b"x"), "utf8")
    assert_malformed(packet(0x30, mqtt_str(b"sensors/dev123/\x00emp") + b"x"), "utf8")   # in the 8-byte path
    assert_malformed(_connect(payload=mqtt_str(b"id\x00")), "utf8")
    assert_malformed(packet(0x82, b"\x00\x01" + mqtt_str(b"\x00") + b"\x00"), "utf8")


def test_bom_and_non_characters_are_kept_MQTT_1_5_3_3():
    topic = "a/\ufeff/\uffff/\U0010ffff"
    p = assert_accepted(packet(0x30, mqtt_str(topic.encode()) + b"x"))
    assert p == Publish(topic, b"x")


def test_password_and_payload_are_not_utf8_checked():
    p = assert_accepted(_connect(0xC2, mqtt_str(b"id") + mqtt_str(b"user") + mqtt_str(b"\xff\x00\xed\xa0\x80")))
    assert p.password == b"\xff\x00\xed\xa0\x80"
    assert assert_accepted(packet(0x30, mqtt_str(b"t") + b"\xff\x00")).payload == b"\xff\x00"


@pytest.mark.parametrize("data", [
    packet(0x30, b"\x00"),                                   # topic length cut
    packet(0x30, mqtt_str(b"a/b")[:-1]),                           # topic past the body
    packet(0x32, mqtt_str(b"a/b") + b"\x00"),                      # QoS 1 without packet id
    _connect(payload=b"\x00\x05abc"),                      # client id past the body
    _connect(payload=b""),                                 # no client id
    _connect(0x06, mqtt_str(b"id") + mqtt_str(b"w")),                  # will flag, no will message
    _connect(0xC2, mqtt_str(b"id") + mqtt_str(b"u")),                  # password flag, no password
    packet(0x10, mqtt_str(b"MQTT")),                               # no protocol level
    packet(0x10, mqtt_str(b"MQTT") + b"\x04\x02\x00"),             # keepalive cut
    packet(0x10, b"\x00\x04MQ"),                             # protocol name cut
    packet(0x82, b"\x00\x01" + mqtt_str(b"a/b")),                  # SUBSCRIBE without requested QoS
    packet(0x82, b"\x00\x01\x00\x09a/b\x00"),                # filter past the body
    packet(0x82, b"\x00\x01" + mqtt_str(b"a") + b"\x00\x00"),      # 1 stray byte after an entry
    packet(0xA2, b"\x00\x01\x00\x05a"),                      # UNSUBSCRIBE filter past the body
    packet(0x82, b"\x00"),                                   # SUBSCRIBE without packet id
])
def test_string_length_running_past_the_body_is_malformed(data):
    assert_malformed(data, "length")


# --- PUBLISH -------------------------------------------------------------------------------

@pytest.mark.parametrize("topic", [b"a/+", b"a/#", b"#", b"+", b"sensors/+/temperature/x", b"a+b"])
def test_publish_topic_with_wildcard_is_malformed_MQTT_3_3_2_2(topic):
    assert_malformed(packet(0x30, mqtt_str(topic) + b"x"), "topic")


def test_publish_empty_topic_is_malformed_MQTT_4_7_3_1():
    assert_malformed(packet(0x30, mqtt_str(b"") + b"x"), "topic")


@pytest.mark.parametrize("first", [0x38, 0x39])
def test_publish_qos_0_with_dup_is_malformed_MQTT_3_3_1_2(first):
    """The DUP flag MUST be 0 for all QoS 0 messages: set, it is an invalid
    fixed-header flag (MQTT-2.2.2-2: the connection closes)."""
    assert_malformed(packet(first, mqtt_str(b"a/b") + b"x"), "header")
    assert_malformed(b"\x38", "header")            # known from the first byte alone


def test_publish_dup_and_retain_and_empty_payload_are_decoded():
    p = assert_accepted(packet(0x3D, mqtt_str(b"a/b") + b"\x12\x34"))
    assert p == Publish("a/b", b"", 2, True, True, 0x1234)


# --- packet identifiers -------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    packet(0x32, mqtt_str(b"a/b") + b"\x00\x00x"),                 # PUBLISH QoS 1
    packet(0x34, mqtt_str(b"a/b") + b"\x00\x00x"),                 # PUBLISH QoS 2
    packet(0x40, b"\x00\x00"),                               # PUBACK
    packet(0x50, b"\x00\x00"),                               # PUBREC
    packet(0x62, b"\x00\x00"),                               # PUBREL
    packet(0x70, b"\x00\x00"),                               # PUBCOMP
    packet(0x82, b"\x00\x00" + mqtt_str(b"a") + b"\x00"),          # SUBSCRIBE
    packet(0x90, b"\x00\x00\x00"),                           # SUBACK
    packet(0xA2, b"\x00\x00" + mqtt_str(b"a")),                    # UNSUBSCRIBE
    packet(0xB0, b"\x00\x00"),                               # UNSUBACK
])
def test_packet_id_zero_is_malformed_MQTT_2_3_1_1(data):
    assert_malformed(data, "packet_id")


def test_publish_qos_0_has_no_packet_id_MQTT_2_3_1_5():
    p = assert_accepted(packet(0x30, mqtt_str(b"a/b") + b"\x00\x00"))
    assert p == Publish("a/b", b"\x00\x00", 0, False, False, 0)


# --- SUBSCRIBE / UNSUBSCRIBE / SUBACK ------------------------------------------------------

def test_subscribe_without_topic_filter_is_malformed_MQTT_3_8_3_3():
    assert_malformed(packet(0x82, b"\x00\x01"), "empty")


@pytest.mark.parametrize("qos", [3, 4, 0x41, 0x80, 0xFC, 0xFF])
def test_subscribe_reserved_bits_or_qos_3_is_malformed_MQTT_3_8_3_4(qos):
    assert_malformed(packet(0x82, b"\x00\x01" + mqtt_str(b"a/b") + bytes([qos])), "qos")
    # also in a later entry
    assert_malformed(packet(0x82, b"\x00\x01" + mqtt_str(b"a") + b"\x01" + mqtt_str(b"b") + bytes([qos])), "qos")


def test_unsubscribe_without_topic_filter_is_malformed_MQTT_3_10_3_2():
    assert_malformed(packet(0xA2, b"\x00\x01"), "empty")


@pytest.mark.parametrize("bad_filter", ["a/#/b", "a#", "a+", "+a/b", "#/a", "sport/tennis#", "sport+/x"])
def test_subscribe_invalid_topic_filter_is_malformed_MQTT_4_7_1_2_and_3(bad_filter):
    """'#' only last and alone in its level, '+' alone in its level: a filter
    that is not one is a protocol violation (the connection closes,
    MQTT-4.8.0-1), not a subscription to refuse with SUBACK 0x80."""
    f = mqtt_str(bad_filter.encode())
    assert_malformed(packet(0x82, b"\x00\x07" + f + b"\x01"), "topic")
    assert_malformed(packet(0x82, b"\x00\x07" + mqtt_str(b"ok/+") + b"\x01" + f + b"\x01"), "topic")  # a later entry
    assert_malformed(packet(0xA2, b"\x00\x07" + f), "topic")
    assert_malformed(packet(0xA2, b"\x00\x07" + mqtt_str(b"ok/#") + f), "topic")
    assert not codec.is_valid_topic_filter(bad_filter)
    assert not ref.is_valid_topic_filter(bad_filter)


def test_zero_length_topic_filter_is_malformed_MQTT_4_7_3_1():
    assert_malformed(packet(0x82, b"\x00\x07" + mqtt_str(b"") + b"\x00"), "topic")
    assert_malformed(packet(0x82, b"\x00\x07" + mqtt_str(b"a") + b"\x00" + mqtt_str(b"") + b"\x01"), "topic")
    assert_malformed(packet(0xA2, b"\x00\x07" + mqtt_str(b"")), "topic")
    assert_malformed(packet(0xA2, b"\x00\x07" + mqtt_str(b"a") + mqtt_str(b"")), "topic")


def test_invalid_filter_beats_reserved_qos_of_its_entry():
    """Check order: a filter's content before the requested QoS that follows it."""
    assert_malformed(packet(0x82, b"\x00\x07" + mqtt_str(b"a/#/b") + b"\x03"), "topic")


@pytest.mark.parametrize("good_filter", ["#", "+", "a/#", "+/+", "/+", "a//b", "+/tennis/#", "$SYS/#"])
def test_valid_topic_filters_MQTT_4_7_1_2_and_3(good_filter):
    assert codec.is_valid_topic_filter(good_filter) and ref.is_valid_topic_filter(good_filter)


@pytest.mark.parametrize("code", [3, 0x7F, 0x81, 0xFF])
def test_suback_reserved_return_code_is_malformed_MQTT_3_9_3_2(code):
    assert_malformed(packet(0x90, b"\x00\x01\x00" + bytes([code])), "qos")


def test_suback_without_return_codes_is_malformed():
    assert_malformed(packet(0x90, b"\x00\x01"), "empty")


# --- CONNECT / CONNACK ----------------------------------------------------------------------

@pytest.mark.parametrize("name", [b"MQTX", b"mqtt", b"MQTT5", b"", b"MQIsdP", b"MQ"])
def test_connect_wrong_protocol_name_is_malformed_MQTT_3_1_2_1(name):
    assert_malformed(_connect(name=name), "protocol")


@pytest.mark.parametrize("name, level", [(b"MQTT", 5), (b"MQTT", 3), (b"MQTT", 0), (b"MQTT", 255),
                                         (b"MQIsdp", 4)])
def test_connect_unsupported_level_is_refused_with_connack_1_MQTT_3_1_2_2(name, level):
    assert_refused(_connect(name=name, level=level), 1)


def test_connect_mqtt5_with_properties_is_refused_with_connack_1_MQTT_3_1_2_2():
    # An MQTT 5 CONNECT has a properties block that 3.1.1 cannot parse.
    assert_refused(packet(0x10, mqtt_str(b"MQTT") + b"\x05\x02\x00\x3c\x05\x11\x00\x00\x00\x0a" + mqtt_str(b"c")), 1)


def test_connect_mqisdp_level_3_is_accepted():
    p = assert_accepted(_connect(name=b"MQIsdp", level=3))
    assert p == Connect("client", True, 60, protocol_level=3)


def test_connect_reserved_flag_is_malformed_MQTT_3_1_2_3():
    assert_malformed(_connect(0x03), "protocol")


@pytest.mark.parametrize("flags", [0x0A, 0x12, 0x1A, 0x22, 0x3A])
def test_connect_will_qos_or_retain_without_will_flag_is_malformed_MQTT_3_1_2_11_13_15(flags):
    assert_malformed(_connect(flags), "protocol")


def test_connect_will_qos_3_is_malformed_MQTT_3_1_2_14():
    assert_malformed(_connect(0x1E, mqtt_str(b"id") + mqtt_str(b"w") + mqtt_str(b"m")), "qos")


@pytest.mark.parametrize("will_topic", [b"w/+", b"#", b""])
def test_connect_will_topic_must_be_a_topic_name_MQTT_4_7_1_1_MQTT_4_7_3_1(will_topic):
    assert_malformed(_connect(0x06, mqtt_str(b"id") + mqtt_str(will_topic) + mqtt_str(b"m")), "topic")


def test_connect_password_without_user_name_is_malformed_MQTT_3_1_2_22():
    assert_malformed(_connect(0x42, mqtt_str(b"id") + mqtt_str(b"pw")), "protocol")


def test_connect_empty_client_id_without_clean_session_is_refused_MQTT_3_1_3_8():
    assert_refused(_connect(0x00, mqtt_str(b"")), 2)


def test_connect_empty_client_id_with_clean_session_is_accepted_MQTT_3_1_3_6():
    assert assert_accepted(_connect(0x02, mqtt_str(b""))) == Connect("", True, 60)


def test_connect_mqisdp_client_id_must_be_1_to_23_characters():
    """MQTT 3.1 (section 3.1, Client Identifier): between 1 and 23 characters,
    else CONNACK 0x02. Characters, not bytes: 23 two-byte characters are fine."""
    assert_refused(_connect(name=b"MQIsdp", level=3, payload=mqtt_str(b"x" * 24)), 2)
    assert_refused(_connect(name=b"MQIsdp", level=3, payload=mqtt_str("é".encode() * 24)), 2)
    assert_refused(_connect(name=b"MQIsdp", level=3, payload=mqtt_str("日".encode() * 22 + b"xy")), 2)
    assert_refused(_connect(name=b"MQIsdp", level=3, payload=mqtt_str(b"")), 2)
    assert assert_accepted(_connect(name=b"MQIsdp", level=3, payload=mqtt_str(b"x" * 23))).client_id == "x" * 23
    assert assert_accepted(_connect(name=b"MQIsdp", level=3, payload=mqtt_str("é".encode() * 23))).client_id == "é" * 23
    # MQTT 3.1.1 has no such bound (MQTT-3.1.3-5 is a floor for what a server accepts)
    assert assert_accepted(_connect(payload=mqtt_str(b"x" * 200))).client_id == "x" * 200


def test_connect_malformed_beats_refused():
    """A malformed CONNECT is closed without CONNACK even if its client id is refused."""
    assert_malformed(_connect(0x00, mqtt_str(b"") + b"\x00"), "length")


def test_connect_trailing_bytes_are_malformed():
    assert_malformed(_connect(payload=mqtt_str(b"id") + b"\x00"), "length")
    assert_malformed(_connect(0x82, mqtt_str(b"id") + mqtt_str(b"user") + mqtt_str(b"pw")), "length")


def test_connect_all_fields_decoded():
    data = _connect(0xEE, mqtt_str(b"id") + mqtt_str(b"will/t") + mqtt_str(b"bye") + mqtt_str(b"user") + mqtt_str(b"pw"), keepalive=30)
    assert assert_accepted(data) == Connect("id", True, 30, "will/t", b"bye", 1, True, "user", b"pw", 4)


@pytest.mark.parametrize("body", [b"\x02\x00", b"\x80\x00", b"\x00\x06", b"\x00\xff"])
def test_connack_reserved_flags_or_return_code_is_malformed(body):
    assert_malformed(packet(0x20, body), "protocol")


# --- control characters (section 1.5.3) -----------------------------------------------

# Where a control character is refused: the client id, user name, will topic,
# topic name and topic filters; never the password, will message or payload.
CONTROL_FIELDS = {
    "client_id": lambda t: _connect(payload=mqtt_str(t)),
    "user_name": lambda t: _connect(0x82, mqtt_str(b"id") + mqtt_str(t)),
    "will_topic": lambda t: _connect(0x06, mqtt_str(b"id") + mqtt_str(t) + mqtt_str(b"m")),
    "topic_name": lambda t: packet(0x32, mqtt_str(t) + b"\x00\x01payload"),
    "subscribe_filter": lambda t: packet(0x82, b"\x00\x01" + mqtt_str(b"ok/#") + b"\x00" + mqtt_str(t) + b"\x01"),
    "unsubscribe_filter": lambda t: packet(0xA2, b"\x00\x01" + mqtt_str(t)),
}
CONTROLS = ["\x01", "\x09", "\x0a", "\x1f", "\x7f", "\x80", "\x85", "\x9f"]


@pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("field", list(CONTROL_FIELDS))
@pytest.mark.parametrize("where", ["short", "long"])
def test_control_character_is_refused_by_default_MQTT_1_5_3(field, char, where):
    """Section 1.5.3: U+0001-U+001F and U+007F-U+009F SHOULD NOT be sent, and
    a receiver MAY close the connection: refused by default ("control"), as
    Mosquitto does; accepted when allowed. Short strings and strings long
    enough for the 8-bytes-at-a-time path, the character in the middle."""
    text = ("a/" + char + "b") if where == "short" else ("sensors/device-" + char + "-0001/temperature")
    data = CONTROL_FIELDS[field](text.encode())
    assert_malformed(data, "control")
    with control_characters(True):
        assert_accepted(data)


@pytest.mark.parametrize("size", [1, 7, 8, 9, 15, 16, 17, 23])
def test_control_character_or_nul_at_every_position(size):
    """The string checks go 8 bytes at a time, the tail in one overlapping
    word: a control character, a NUL or an ill-formed byte is found wherever
    it is, in topic names and in the other fields."""
    for pos in range(size):
        for bad, reason in ((b"\x1f", "control"), (b"\x7f", "control"), (b"\x00", "utf8"), (b"\xff", "utf8")):
            text = b"abcdefghijklmnopqrstuvw"[:size]
            text = text[:pos] + bad + text[pos + 1:]
            assert_malformed(packet(0x30, mqtt_str(text) + b"x"), reason)
            assert_malformed(_connect(payload=mqtt_str(text)), reason)
            assert_malformed(packet(0xA2, b"\x00\x01" + mqtt_str(text)), reason)
        clean = b"abcdefghijklmnopqrstuvw"[:size]
        assert_accepted(packet(0x30, mqtt_str(clean) + b"x"))


@pytest.mark.parametrize("field", list(CONTROL_FIELDS))
def test_characters_next_to_the_control_ranges_are_accepted(field):
    """U+0020 and U+00A0 (no-break space) border the control ranges; U+007E too."""
    assert_accepted(CONTROL_FIELDS[field]("a/ b~\u00a0c/long-enough-for-words".encode()))


def test_ill_formed_utf8_beats_a_control_character():
    for bad in (b"\x01\xff", b"\xff\x01", b"a\x1f\x00", b"\x7f\xc2"):
        assert_malformed(packet(0x30, mqtt_str(b"t/" + bad) + b"x"), "utf8")
        with control_characters(True):
            assert_malformed(packet(0x30, mqtt_str(b"t/" + bad) + b"x"), "utf8")


def test_control_characters_are_kept_in_password_will_message_and_payload():
    p = assert_accepted(_connect(0xC6, mqtt_str(b"id") + mqtt_str(b"w") + mqtt_str(b"\x01\x7f") + mqtt_str(b"u") + mqtt_str(b"\x1f\x0a")))
    assert (p.will_message, p.password) == (b"\x01\x7f", b"\x1f\x0a")
    assert assert_accepted(packet(0x30, mqtt_str(b"t") + b"\x01\x02\xc2\x85")).payload == b"\x01\x02\xc2\x85"


def test_control_character_policy_defaults_to_refused():
    assert codec.control_characters_allowed() is False
    assert ref.control_characters_allowed() is False
    assert not codec.is_valid_topic_name("a\tb") and not codec.is_valid_topic_filter("a/\x85/#")
    with control_characters(True):
        assert codec.control_characters_allowed() is True
        assert codec.is_valid_topic_name("a\tb") and codec.is_valid_topic_filter("a/\x85/#")


# --- encoder guards ------------------------------------------------------------------------

@pytest.mark.parametrize("p", [
    Publish("x" * 65536, b""),
    Publish("a", b"", 3),
    Publish("a", b"", 1, packet_id=65536),
    Puback(-1),
    Subscribe(1, [("a", 3)]),
    Connect("c", password=b"x" * 70000, username="u"),
    Suback(1, [256]),
])
@pytest.mark.parametrize("mod", CODECS)
def test_encoders_reject_unencodable_values(mod, p):
    with pytest.raises(ValueError):
        mod.encode(p)


@pytest.mark.parametrize("mod", CODECS)
def test_encode_large_publish_uses_multi_byte_remaining_length(mod):
    for size in (120, 200, 16380, 20000, 2_100_000):
        p = Publish("t", b"\xab" * size, 1, packet_id=1)
        data = mod.encode(p)
        assert data == ref.encode(p)
        assert codec.decode(data) == ([p], len(data))


@pytest.mark.parametrize("mod", CODECS)
def test_decode_accepts_any_bytes_like(mod):
    p = Publish("a/b", b"xyz", 1, packet_id=2)
    data = codec.encode(p) + b"\x30"
    for buf in (data, bytearray(data), memoryview(data)):
        assert mod.decode(buf) == ([p], len(data) - 1)
        assert mod.decode_count(buf) == 1
    assert mod.decode(b"") == ([], 0) and mod.decode_count(b"") == 0
