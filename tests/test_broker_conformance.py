"""MQTT 3.1.1 to the letter: what closes a connection, on gw and Mosquitto.

The reference is the OASIS standard, section 4.8: unless stated otherwise, a
protocol violation closes the network connection [MQTT-4.8.0-1], with
nothing sent first. Each rule is a test named after its statement, run on
both brokers with the bad bytes written whole, one byte at a time, and cut at
random points with the last byte alone. Debian's Mosquitto 2.0.11 keeps some
of these connections open (2.0.12 fixed it, "strict protocol compliance"):
there gw is held to the standard and Mosquitto's run checks that it still
deviates exactly as recorded, then ends as xfail saying how
(`Broker.assert_standard`).

Outcomes are ("closed", bytes sent before the close) or ("open", bytes sent,
a PINGREQ sent a second later answered instead of a close):
`RawClient.violation_outcome`. On gw each close is also counted once under
its reason (`malformed.<reason>` and `closed_malformed` in `gw stats`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

pytest.register_assert_rewrite("broker_fixtures")   # before its import: its asserts report values
from broker_fixtures import (ack_packet, brokers, connect_packet_full, publish_packet_full,  # noqa: E402
                             unsubscribe_packet)
from conftest import get_counter, mqtt_str, packet, send_fragmented, subscribe_packet, wait_for  # noqa: E402

pytest_plugins = ["broker_fixtures"]    # the broker_proc and broker fixtures

CLOSED = ("closed", b"")                # the standard's answer to a protocol violation
PINGRESP = b"\xd0\x00"
KEPT_OPEN = ("open", PINGRESP)          # what Mosquitto 2.0.11 does instead, mostly
PIECES = ["whole", "bytewise", "random"]


def send_in(raw, data: bytes, pieces: str, rng) -> None:
    """The bad bytes whole, one byte at a time, or cut at random points with
    the last byte alone (where most malformations are)."""
    if pieces == "whole":
        raw.send(data)
    elif pieces == "bytewise":
        send_fragmented(raw.sock, data)
    else:
        send_fragmented(raw.sock, data, rng, cuts=[len(data) - 1])


@dataclass(frozen=True)
class Violation:
    """Bytes a connected client sends that the standard answers by closing;
    `reason`: the counter gw counts the close under (malformed.<reason>)."""
    name: str
    data: bytes
    reason: str
    mosquitto_2011: tuple | None = None     # what 2.0.11 does instead of closing, if it does
    why: str = ""


def counters_before(broker) -> dict | None:
    return broker.server.counters() if broker.is_gw else None


def assert_counted_once(broker, before: dict | None, reason: str) -> None:
    """gw counted the close once, under its reason and as a close for a
    malformed packet (`gw stats`: malformed.<reason>, closed_malformed)."""
    if not broker.is_gw:
        return
    names = (f"malformed.{reason}", "closed_malformed")

    def moved():
        after = broker.server.counters()
        deltas = {n: get_counter(after, n) - get_counter(before, n) for n in names}
        return deltas if all(deltas.values()) else None
    deltas = wait_for(moved, 10, what=f"the close counted under {names}")
    assert deltas == dict.fromkeys(names, 1), deltas


def check_violation(broker, case: Violation, pieces: str, rng, *, connect: bool = True) -> None:
    raw = broker.raw(client_id=None if connect else False)
    before = counters_before(broker)
    send_in(raw, case.data, pieces, rng)
    broker.assert_standard(raw.violation_outcome(), CLOSED, mosquitto_2011=case.mosquitto_2011, why=case.why)
    assert_counted_once(broker, before, case.reason)


# --- packets only servers send [MQTT-4.8.0-1] ---------------------------------------------------

SERVER_PACKETS = [
    Violation("connack", b"\x20\x02\x00\x00", "server_packet"),
    Violation("connack-without-body", b"\x20\x00", "remaining_length"),
    Violation("suback", b"\x90\x03\x00\x01\x00", "server_packet",
              KEPT_OPEN, "ignores a SUBACK from a client and keeps the connection"),
    Violation("suback-without-body", b"\x90\x00", "server_packet"),
    Violation("unsuback", b"\xb0\x02\x00\x01", "server_packet",
              KEPT_OPEN, "ignores an UNSUBACK from a client and keeps the connection"),
    Violation("unsuback-without-body", b"\xb0\x00", "remaining_length"),
    Violation("pingresp", b"\xd0\x00", "server_packet",
              KEPT_OPEN, "ignores a PINGRESP from a client and keeps the connection"),
    Violation("pingresp-with-body", b"\xd0\x01\x00", "remaining_length",
              KEPT_OPEN, "ignores a PINGRESP from a client and keeps the connection"),
]


@brokers()
@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("case", SERVER_PACKETS, ids=[c.name for c in SERVER_PACKETS])
def test_packet_only_servers_send_closes_MQTT_4_8_0_1(broker, case, pieces, frag_rng):
    """CONNACK, SUBACK, UNSUBACK and PINGRESP go from the server to the client
    (sections 3.2, 3.9, 3.11, 3.13): a client sending one, with or without a
    body, commits a protocol violation, and the server closes the connection
    without answering [MQTT-4.8.0-1]."""
    check_violation(broker, case, pieces, frag_rng)


# --- fixed-size packets and their reserved flags [MQTT-2.2.2-1/2] ---------------------------------

FIXED_SIZE = [
    Violation("pingreq-with-body", b"\xc0\x01\x00", "remaining_length",
              ("open", PINGRESP + PINGRESP), "answers a PINGREQ with a body as if it had none"),
    Violation("pingreq-flags-0001", b"\xc1\x00", "fixed_header",
              ("open", PINGRESP + PINGRESP), "answers a PINGREQ with reserved flag bits set"),
    Violation("puback-of-3-bytes", b"\x40\x03\x00\x01\x00", "remaining_length",
              KEPT_OPEN, "takes a PUBACK of 3 bytes and keeps the connection"),
    Violation("puback-of-1-byte", b"\x40\x01\x00", "remaining_length"),
    Violation("puback-of-0-bytes", b"\x40\x00", "remaining_length"),
    Violation("pubrec-of-1-byte", b"\x50\x01\x00", "remaining_length"),
    Violation("pubrel-of-1-byte", b"\x62\x01\x00", "remaining_length"),
    Violation("pubcomp-of-1-byte", b"\x70\x01\x00", "remaining_length"),
    Violation("pingreq-flags-1000", b"\xc8\x00", "fixed_header",
              ("open", PINGRESP + PINGRESP), "answers a PINGREQ with reserved flag bits set"),
    Violation("puback-flags-0010", b"\x42\x02\x00\x01", "fixed_header",
              KEPT_OPEN, "takes a PUBACK with reserved flag bits set"),
    Violation("pubrec-of-3-bytes", b"\x50\x03\x00\x01\x00", "remaining_length",
              ("open", b"\x62\x02\x00\x01" + PINGRESP), "answers a PUBREC of 3 bytes with a PUBREL"),
    Violation("pubrec-flags-0001", b"\x51\x02\x00\x01", "fixed_header",
              ("open", b"\x62\x02\x00\x01" + PINGRESP), "answers a PUBREC with reserved flag bits set"),
    Violation("pubrel-of-3-bytes", b"\x62\x03\x00\x01\x00", "remaining_length",
              ("open", b"\x70\x02\x00\x01" + PINGRESP), "answers a PUBREL of 3 bytes with a PUBCOMP"),
    Violation("pubrel-flags-0000", b"\x60\x02\x00\x01", "fixed_header"),
    Violation("pubcomp-of-3-bytes", b"\x70\x03\x00\x01\x00", "remaining_length",
              KEPT_OPEN, "takes a PUBCOMP of 3 bytes and keeps the connection"),
    Violation("pubcomp-flags-1000", b"\x78\x02\x00\x01", "fixed_header",
              KEPT_OPEN, "takes a PUBCOMP with reserved flag bits set"),
    Violation("disconnect-with-body", b"\xe0\x01\x00", "remaining_length"),
    Violation("disconnect-flags-0001", b"\xe1\x00", "fixed_header"),
]


@brokers()
@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("case", FIXED_SIZE, ids=[c.name for c in FIXED_SIZE])
def test_fixed_size_packet_with_wrong_size_or_flags_closes_MQTT_2_2_2_2(broker, case, pieces, frag_rng):
    """PINGREQ, DISCONNECT (0 bytes) and PUBACK, PUBREC, PUBREL, PUBCOMP (2)
    have a fixed remaining length (sections 3.4-3.7, 3.12, 3.14) and fixed
    flag bits (PUBREL 0010, the others 0000): invalid flags close the
    connection [MQTT-2.2.2-2] (DISCONNECT: [MQTT-3.14.1-1]), and so does a
    packet of the wrong size [MQTT-4.8.0-1]."""
    check_violation(broker, case, pieces, frag_rng)


# --- PUBLISH: DUP on QoS 0 [MQTT-3.3.1-2] ---------------------------------------------------------

@brokers()
@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("retain", [False, True], ids=["retain-0", "retain-1"])
def test_qos_0_publish_with_dup_closes_MQTT_3_3_1_2(broker, retain, pieces, frag_rng):
    """The DUP flag MUST be 0 for all QoS 0 messages [MQTT-3.3.1-2]: a set one
    is an invalid flag, which closes the connection [MQTT-2.2.2-2]; the message
    reaches no one."""
    case = Violation("qos0-dup", publish_packet_full(broker.topic("dup"), b"x", qos=0, dup=True, retain=retain),
                     "fixed_header", KEPT_OPEN, "takes a QoS 0 PUBLISH with DUP set")
    check_violation(broker, case, pieces, frag_rng)


# --- topic filters [MQTT-4.7.3-1], [MQTT-4.7.1-2], [MQTT-4.7.1-3] ------------------------------

BAD_FILTERS = [("a/#/b", "MQTT-4.7.1-2"), ("#/a", "MQTT-4.7.1-2"), ("a/b#", "MQTT-4.7.1-2"),
               ("a+", "MQTT-4.7.1-3"), ("+a/b", "MQTT-4.7.1-3"), ("a/+b/c", "MQTT-4.7.1-3"),
               ("", "MQTT-4.7.3-1")]


@brokers()
@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("bad, statement", BAD_FILTERS, ids=[f"{s}:{b or 'empty'}" for b, s in BAD_FILTERS])
def test_subscribe_with_malformed_or_empty_filter_closes_MQTT_4_7_1_2_MQTT_4_7_1_3_MQTT_4_7_3_1(
        broker, bad, statement, pieces, frag_rng):
    """'#' only last and alone in its level [MQTT-4.7.1-2], '+' alone in its
    level [MQTT-4.7.1-3], at least one character [MQTT-4.7.3-1]: a SUBSCRIBE
    carrying a filter that breaks one is malformed and closes the connection
    with no SUBACK [MQTT-4.8.0-1], even among valid entries. SUBACK 0x80 is for
    a valid filter the server refuses, not for a malformed packet."""
    data = subscribe_packet(9, [(broker.topic("ok/1"), 1), (bad, 1), (broker.topic("ok/+"), 2)])
    check_violation(broker, Violation(bad, data, "topic"), pieces, frag_rng)


@brokers()
@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("bad, statement", BAD_FILTERS, ids=[f"{s}:{b or 'empty'}" for b, s in BAD_FILTERS])
def test_unsubscribe_with_malformed_or_empty_filter_closes_MQTT_4_7_1_2_MQTT_4_7_1_3_MQTT_4_7_3_1(
        broker, bad, statement, pieces, frag_rng):
    """The same rules hold for UNSUBSCRIBE's filters: no UNSUBACK, closed."""
    data = unsubscribe_packet(9, [broker.topic("ok/#"), bad])
    check_violation(broker, Violation(bad, data, "topic"), pieces, frag_rng)


@brokers("sessions", gw_only="gw is specified to apply nothing of a malformed SUBSCRIBE (the standard only "
                             "says close); Mosquitto 2.0.11 subscribes the valid entries before the bad one")
def test_malformed_subscribe_subscribes_nothing(broker):
    """A SUBSCRIBE whose second filter is malformed closes the connection and
    subscribes nothing, its valid first entry included: the persistent
    session, resumed, holds no subscription."""
    cid, t = broker.client_id("nosub"), broker.topic("nosub")
    raw = broker.raw(client_id=cid, clean=False)
    raw.send(subscribe_packet(3, [(t, 1), ("a/#/b", 1)]))
    assert raw.violation_outcome() == CLOSED
    again = broker.raw(client_id=cid, clean=False, expect_rc=0)
    pub = broker.raw()
    pub.send(publish_packet_full(t, b"must-not", qos=1, packet_id=1))
    pub.read_until(0x40)
    again.ping()
    again.ping()
    assert not [f for f, _ in again.backlog if f >> 4 == 3], "the malformed SUBSCRIBE subscribed something"


# --- control characters [MQTT-1.5.3] ----------------------------------------------------------------

CONTROLS = ["\x01", "\x09", "\x1f", "\x7f", "\x85", "\x9f"]


def _control_id(c: str) -> str:
    return f"U+{ord(c):04X}"


@brokers()
@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("char", CONTROLS, ids=_control_id)
@pytest.mark.parametrize("where", ["topic-name", "subscribe-filter", "unsubscribe-filter"])
def test_control_character_in_topic_or_filter_closes_MQTT_1_5_3(broker, where, char, pieces, frag_rng):
    """Section 1.5.3: a string SHOULD NOT hold U+0001-U+001F or U+007F-U+009F,
    and a receiver of one MAY close the connection. Both brokers do, in topic
    names and filters (gw by default: see the setting mqtt_control_characters)."""
    text = broker.topic("ctl" + char + "x")
    if where == "topic-name":
        data = publish_packet_full(text, b"x", qos=1, packet_id=3)
    elif where == "subscribe-filter":
        data = subscribe_packet(3, [(text, 0)])
    else:
        data = unsubscribe_packet(3, [text])
    check_violation(broker, Violation(where, data, "control_character"), pieces, frag_rng)


def _connect_with(field: str, text: str) -> bytes:
    flags, payload = 0x02, mqtt_str(text if field == "client-id" else "ctl-client")
    if field == "will-topic":
        flags |= 0x04
        payload += mqtt_str(text) + mqtt_str(b"bye")
    if field == "user-name":
        flags |= 0x80
        payload += mqtt_str(text)
    return packet(0x10, mqtt_str(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + payload)


@brokers()
@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("char", CONTROLS, ids=_control_id)
@pytest.mark.parametrize("field", ["client-id", "user-name", "will-topic"])
def test_control_character_in_connect_closes_without_connack_MQTT_1_5_3(broker, field, char, pieces, frag_rng):
    """The same for the CONNECT's client id, user name and will topic: closed,
    no CONNACK."""
    text = f"ctl{char}{broker.prefix[3:]}" if field != "will-topic" else broker.topic("w" + char)
    check_violation(broker, Violation(field, _connect_with(field, text), "control_character"), pieces, frag_rng,
                    connect=False)


@brokers()
def test_characters_next_to_the_control_ranges_are_accepted(broker):
    """U+0020, U+007E and U+00A0 border the control ranges: a topic holding them
    is routed, both ways."""
    t = broker.topic("edge ~\u00a0x")
    raw = broker.raw()
    assert raw.subscribe(1, [(t, 1)]) == [1]
    raw.send(publish_packet_full(t, b"edge", qos=1, packet_id=2))
    raw.read_until(0x40)
    m = raw.read_publish()
    assert (m.topic, m.payload) == (t, b"edge")


# --- acknowledgements of the wrong kind [MQTT-4.3.2], [MQTT-4.3.3] -------------------------------

def _delivered(broker, qos: int):
    """A raw subscriber holding an undelivered-yet message of the broker's:
    (subscriber, its PUBLISH)."""
    t = broker.topic(f"ack{qos}")
    sub = broker.raw()
    assert sub.subscribe(1, [(t, qos)]) == [qos]
    pub = broker.raw()
    pub.send(publish_packet_full(t, b"m", qos=qos, packet_id=11))
    if qos == 1:
        pub.read_until(0x40)
    else:
        pub.read_until(0x50)
        pub.send(ack_packet(0x62, 11))
        pub.read_until(0x70)
    m = sub.read_publish()
    assert m.qos == qos
    return sub, m


ACK_CASES = {
    # name: (QoS delivered, what the subscriber answers first, then the wrong ack)
    "pubrec-for-qos-1": (1, [], 0x50),
    "pubcomp-for-qos-1": (1, [], 0x70),
    "puback-for-qos-2": (2, [], 0x40),
    "pubcomp-for-qos-2-before-pubrel": (2, [], 0x70),
    "puback-for-pubrel": (2, [0x50], 0x40),
}


@brokers()
@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("name", list(ACK_CASES))
def test_acknowledgement_of_the_wrong_kind_closes_MQTT_4_3_2_MQTT_4_3_3(broker, name, pieces, frag_rng):
    """A QoS 1 PUBLISH is answered by PUBACK [MQTT-4.3.2-1]; a QoS 2 one by
    PUBREC, whose PUBREL is answered by PUBCOMP [MQTT-4.3.3-1]. An
    acknowledgement of another kind for a message in flight (PUBREC or PUBCOMP
    for QoS 1, PUBACK for QoS 2 or its PUBREL, PUBCOMP before the PUBREL) is a
    protocol violation: closed [MQTT-4.8.0-1]."""
    qos, before, wrong = ACK_CASES[name]
    sub, m = _delivered(broker, qos)
    for kind in before:
        sub.send(ack_packet(kind, m.packet_id))
        if kind == 0x50:
            assert sub.read_until(0x62) == struct.pack("!H", m.packet_id)
    before = counters_before(broker)
    send_in(sub, ack_packet(wrong, m.packet_id), pieces, frag_rng)
    broker.assert_standard(sub.violation_outcome(), CLOSED)
    assert_counted_once(broker, before, "wrong_ack_kind")


@brokers()
@pytest.mark.parametrize("qos", [1, 2])
def test_acknowledgements_of_the_right_kind_complete_the_flow(broker, qos):
    """The flows the test above breaks, done right: the connection stays."""
    sub, m = _delivered(broker, qos)
    if qos == 1:
        sub.send(ack_packet(0x40, m.packet_id))
    else:
        sub.send(ack_packet(0x50, m.packet_id))
        assert sub.read_until(0x62) == struct.pack("!H", m.packet_id)
        sub.send(ack_packet(0x70, m.packet_id))
    sub.ping()


# --- answer before routing [MQTT-4.3.2-2], [MQTT-4.3.3-2] ------------------------------------------

@brokers("routing")
@pytest.mark.parametrize("qos", [1, 2])
def test_publisher_gets_its_answer_before_its_own_copy_MQTT_4_3_2_2_MQTT_4_3_3_2(broker, qos):
    """A client subscribed to the topic it publishes on: the PUBACK (QoS 1,
    [MQTT-4.3.2-2]) or PUBREC (QoS 2, [MQTT-4.3.3-2]) that answers its PUBLISH
    comes before the copy of that message routed back to it, as
    interoperability suites expect (the standard orders the answers to a
    client's packets [MQTT-4.6.0-2/3], and a copy is none of them; a receiver
    answers once it owns the message, before passing it on)."""
    t = broker.topic("self")
    raw = broker.raw()
    assert raw.subscribe(1, [(t, qos)]) == [qos]
    raw.send(publish_packet_full(t, b"mine", qos=qos, packet_id=21))
    first, body = raw.read()
    raw.backlog.append((first, body))
    answer = 0x40 if qos == 1 else 0x50
    broker.assert_standard(("first packet", first), ("first packet", answer),
                           mosquitto_2011=("first packet", 0x32) if qos == 1 else None,
                           why="routes a QoS 1 message back to its publisher before the PUBACK")
    assert raw.read_until(answer) == b"\x00\x15"
    if qos == 2:
        raw.send(ack_packet(0x62, 21))
        raw.read_until(0x70)
    m = raw.read_publish()
    assert (m.topic, m.payload) == (t, b"mine")


# --- MQTT 3.1: client ids of 1 to 23 characters ---------------------------------------------------

def _mqisdp_connect(client_id: str) -> bytes:
    return packet(0x10, mqtt_str(b"MQIsdp") + bytes([3, 0x02]) + struct.pack("!H", 60) + mqtt_str(client_id))


@brokers()
@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("client_id", ["x" * 24, "\u00e9" * 24], ids=["24-ascii", "24-two-byte"])
def test_mqisdp_client_id_over_23_characters_gets_connack_2(broker, client_id, pieces, frag_rng):
    """MQTT 3.1 (section 3.1, Client Identifier): between 1 and 23 characters;
    otherwise CONNACK 0x02 (identifier rejected), then the close."""
    raw = broker.raw(client_id=False)
    send_in(raw, _mqisdp_connect(client_id), pieces, frag_rng)
    broker.assert_standard(raw.violation_outcome(), ("closed", b"\x20\x02\x00\x02"),
                           mosquitto_2011=("open", b"\x20\x02\x00\x00" + PINGRESP),
                           why="accepts an MQTT 3.1 client id longer than 23 characters")


@brokers()
def test_mqisdp_client_id_of_23_two_byte_characters_is_accepted(broker):
    """23 characters of two bytes each: 46 bytes, 23 characters, accepted."""
    raw = broker.raw(client_id=False)
    raw.send(_mqisdp_connect("\u00e9" * 22 + "x"))
    assert raw.read() == (0x20, b"\x00\x00")
    raw.ping()
