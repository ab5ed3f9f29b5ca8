"""MQTT 5.0 bad input, case by case against the standard's statements: every
Malformed Packet and Protocol Error the standard names (and the errors with a
reason code of their own: 0x93, 0x94, 0x95, 0x99), what gw answers and that it
closes. Each case is a row of a table (its name, the statement, the bytes, the
answer), sent whole and in fragments, on a real `gw serve` (2 workers); a
worker that dies fails the test (conftest). The table docs/mqtt5-conformance.md
lists the same rows.

- Before the CONNACK (a bad CONNECT): a CONNACK with the reason code, then the
  connection closes (MQTT-4.13.1-1 leaves DISCONNECT out there; 3.2.2.2 lets
  the CONNACK say 0x81/0x82).
- After it: a DISCONNECT with the reason code as the server's last packet
  (MQTT-4.13.2-1), then the close; counted.
- Random bytes after the CONNACK (hypothesis): whatever the server writes back
  decodes as MQTT 5.0 (the reference codec, tests/mqtt5_ref.py), the last
  thing before a close is a DISCONNECT, and the worker lives on.

Mosquitto 2.0.11 is not the oracle here: it keeps the connection open on
several of these (a DUP flag on QoS 0, a PUBREL with flags 0) and answers
others without a DISCONNECT; where it agrees, tests/test_mqtt5_connections.py
runs it beside gw."""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mqtt5_ref as ref
from conftest import get_counter, send_fragmented
from gw import packets5 as p5
from test_mqtt5_connections import V5, connected, unique

pytest.register_assert_rewrite("broker_fixtures")
from broker_fixtures import Mosquitto  # noqa: E402

WAIT = 10.0


# --- bytes ----------------------------------------------------------------------------------

def vbi(n: int) -> bytes:
    return ref._varint(n)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + vbi(len(body)) + body


def s(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def props(b: bytes = b"") -> bytes:
    return vbi(len(b)) + b


def u16(v: int) -> bytes:
    return v.to_bytes(2, "big")


def u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def pub(topic: bytes = b"t", pr: bytes = b"", qos: int = 0, payload: bytes = b"", first: int | None = None,
        pid: int = 1) -> bytes:
    body = s(topic) + (u16(pid) if qos else b"") + props(pr) + payload
    return packet(0x30 | (qos << 1) if first is None else first, body)


def ack(first: int, pid: int = 1, tail: bytes = b"") -> bytes:
    return packet(first, u16(pid) + tail)


def sub(entries=((b"a/b", 0),), pr: bytes = b"", pid: int = 1, first: int = 0x82) -> bytes:
    return packet(first, u16(pid) + props(pr) + b"".join(s(f) + bytes([o]) for f, o in entries))


def unsub(filters=(b"a/b",), pr: bytes = b"", pid: int = 1, first: int = 0xA2) -> bytes:
    return packet(first, u16(pid) + props(pr) + b"".join(s(f) for f in filters))


def disc(code: int = 0, pr: bytes = b"", first: int = 0xE0) -> bytes:
    return packet(first, bytes([code]) + props(pr))


def connect(pr: bytes = b"", flags: int = 0x02, client_id: bytes | None = None, will_props: bytes = b"",
            will_topic: bytes = b"w", will_payload: bytes = b"bye", user: bytes | None = None,
            password: bytes | None = None, name: bytes = b"MQTT", level: int = 5, tail: bytes = b"",
            raw_payload: bytes | None = None) -> bytes:
    if client_id is None:
        client_id = unique("conf").encode()
    body = s(name) + bytes([level, flags]) + u16(60) + props(pr)
    if raw_payload is not None:
        return packet(0x10, body + raw_payload)
    body += s(client_id)
    if flags & 0x04:
        body += props(will_props) + s(will_topic) + s(will_payload)
    if user is not None:
        body += s(user)
    if password is not None:
        body += s(password)
    return packet(0x10, body + tail)


# --- the table: after the CONNACK ------------------------------------------------------------
# (name, statement, bytes, the DISCONNECT's reason code). 0x81 Malformed Packet,
# 0x82 Protocol Error; which one where the standard does not name it is 4.13's
# rule (a packet that cannot be parsed: malformed; one that parses but breaks a
# rule: a protocol error), as codec5.pxd lists for each R5_* reason.

MAL, PE = 0x81, 0x82

AFTER = [
    # The fixed header, Variable Byte Integers (1.5.5, 2.1).
    ("reserved_type_0", "2.1.2", b"\x00\x00", MAL),
    ("remaining_length_5_bytes", "1.5.5", b"\xc0\xff\xff\xff\xff\x7f", MAL),
    ("remaining_length_not_minimal", "MQTT-1.5.5-1", b"\xc0\x80\x00", MAL),
    ("pingreq_flags", "MQTT-2.1.3-1", b"\xc1\x00", MAL),
    ("pingreq_with_body", "3.12", b"\xc0\x01\x00", MAL),
    # Packets a client may not send here (3.1.0, 3.2, 3.9, 3.11, 3.13).
    ("second_connect", "MQTT-3.1.0-2", None, PE),          # filled in below (a fresh client id)
    ("connack_from_client", "3.2", b"\x20\x03\x00\x00\x00", PE),
    ("suback_from_client", "3.9", b"\x90\x04\x00\x01\x00\x00", PE),
    ("unsuback_from_client", "3.11", b"\xb0\x04\x00\x01\x00\x00", PE),
    ("pingresp_from_client", "3.13", b"\xd0\x00", PE),
    # PUBLISH (3.3).
    ("publish_qos3", "MQTT-3.3.1-4", pub(first=0x36, qos=1), MAL),
    ("publish_dup_on_qos0", "MQTT-3.3.1-2", pub(first=0x38), MAL),
    ("publish_topic_wildcard_plus", "MQTT-3.3.2-2", pub(b"a/+"), MAL),
    ("publish_topic_wildcard_hash", "MQTT-3.3.2-2", pub(b"a/#"), MAL),
    ("publish_topic_bad_utf8", "MQTT-1.5.4-1", pub(b"\xc3\x28"), MAL),
    ("publish_topic_surrogate", "MQTT-1.5.4-1", pub(b"a\xed\xa0\x80"), MAL),
    ("publish_topic_nul", "MQTT-1.5.4-2", pub(b"a\x00b"), MAL),
    ("publish_packet_id_0", "MQTT-2.2.1-3", pub(qos=1, pid=0), PE),
    ("publish_topic_past_end", "2.2.2", packet(0x30, b"\x00\x09t"), MAL),
    ("publish_props_past_end", "2.2.2.1", pub(pr=b"\x01"), MAL),
    ("publish_props_length_5_bytes", "1.5.5", packet(0x30, s(b"t") + b"\xff\xff\xff\xff\x7f"), MAL),
    ("publish_unknown_property", "2.2.2.2", pub(pr=b"\x7f\x00"), MAL),
    ("publish_connect_property", "2.2.2.2", pub(pr=b"\x11" + u32(10)), MAL),
    ("publish_property_past_end", "2.2.2.2", pub(pr=b"\x02\x00\x00"), MAL),
    ("publish_payload_format_2", "3.3.2.3.2", pub(pr=b"\x01\x02"), PE),
    ("publish_payload_format_twice", "3.3.2.3.2", pub(pr=b"\x01\x00\x01\x00"), PE),
    ("publish_message_expiry_twice", "3.3.2.3.3", pub(pr=b"\x02" + u32(5) + b"\x02" + u32(5)), PE),
    ("publish_topic_alias_twice", "3.3.2.3.4", pub(pr=b"\x23" + u16(1) + b"\x23" + u16(1)), PE),
    ("publish_response_topic_twice", "3.3.2.3.5", pub(pr=b"\x08" + s(b"r") + b"\x08" + s(b"r")), PE),
    ("publish_correlation_data_twice", "3.3.2.3.6", pub(pr=b"\x09" + s(b"c") + b"\x09" + s(b"c")), PE),
    ("publish_content_type_twice", "3.3.2.3.9", pub(pr=b"\x03" + s(b"x") + b"\x03" + s(b"x")), PE),
    ("publish_response_topic_wildcard", "MQTT-3.3.2-14", pub(pr=b"\x08" + s(b"r/#")), MAL),
    ("publish_response_topic_bad_utf8", "MQTT-3.3.2-13", pub(pr=b"\x08" + s(b"\xff")), MAL),
    ("publish_content_type_bad_utf8", "MQTT-3.3.2-19", pub(pr=b"\x03" + s(b"\xc0\xaf")), MAL),
    ("publish_user_property_bad_utf8", "MQTT-1.5.7-1", pub(pr=b"\x26" + s(b"k") + s(b"\xff")), MAL),
    ("publish_subscription_id", "MQTT-3.3.4-6", pub(pr=b"\x0b\x01"), PE),
    ("publish_topic_alias_0", "MQTT-3.3.2-8", pub(pr=b"\x23" + u16(0)), PE),
    ("publish_topic_alias_over_maximum", "MQTT-3.2.2-17", pub(pr=b"\x23" + u16(65)), 0x94),
    ("publish_empty_topic_without_alias", "3.3.2.1", pub(b""), PE),
    ("publish_empty_topic_alias_never_set", "3.3.2.3.4", pub(b"", pr=b"\x23" + u16(3)), PE),
    ("publish_payload_format_invalid_qos0", "3.3.2.3.2", pub(pr=b"\x01\x01", payload=b"\xff\xfe"), 0x99),
    # PUBACK, PUBREC, PUBREL, PUBCOMP (3.4 .. 3.7).
    ("puback_bad_reason", "3.4.2.1", ack(0x40, tail=b"\x05"), PE),
    ("puback_too_short", "3.4.2", packet(0x40, b"\x00"), MAL),
    ("puback_packet_id_0", "MQTT-2.2.1-3", ack(0x40, pid=0), PE),
    ("puback_flags", "MQTT-2.1.3-1", ack(0x41), MAL),
    ("puback_property_not_allowed", "2.2.2.2", ack(0x40, tail=b"\x00" + props(b"\x01\x00")), MAL),
    ("puback_reason_string_twice", "3.4.2.2.2",
     ack(0x40, tail=b"\x00" + props(b"\x1f" + s(b"a") + b"\x1f" + s(b"b"))), PE),
    ("puback_trailing_bytes", "3.4.2", ack(0x40, tail=b"\x00\x00\x00"), MAL),
    ("pubrec_bad_reason", "3.5.2.1", ack(0x50, tail=b"\x92"), PE),
    ("pubrec_flags", "MQTT-2.1.3-1", ack(0x52), MAL),
    ("pubrel_flags_0", "MQTT-3.6.1-1", ack(0x60), MAL),
    ("pubrel_bad_reason", "3.6.2.1", ack(0x62, tail=b"\x10"), PE),
    ("pubrel_reason_string_bad_utf8", "MQTT-1.5.4-1", ack(0x62, tail=b"\x00" + props(b"\x1f" + s(b"\xff"))), MAL),
    ("pubcomp_bad_reason", "3.7.2.1", ack(0x70, tail=b"\x80"), PE),
    ("pubcomp_flags", "MQTT-2.1.3-1", ack(0x72), MAL),
    # SUBSCRIBE (3.8).
    ("subscribe_flags", "MQTT-3.8.1-1", sub(first=0x80), MAL),
    ("subscribe_no_filter", "MQTT-3.8.3-2", sub(entries=()), PE),
    ("subscribe_packet_id_0", "MQTT-2.2.1-3", sub(pid=0), PE),
    ("subscribe_reserved_option_bits", "MQTT-3.8.3-5", sub(entries=((b"a/b", 0xC0),)), MAL),
    ("subscribe_qos3", "3.8.3.1", sub(entries=((b"a/b", 3),)), PE),
    ("subscribe_retain_handling_3", "3.8.3.1", sub(entries=((b"a/b", 0x30),)), PE),
    ("subscribe_no_local_shared", "MQTT-3.8.3-4", sub(entries=((b"$share/g/a", 0x04),)), PE),
    ("subscribe_subscription_id_0", "3.8.2.1.2", sub(pr=b"\x0b\x00"), PE),
    ("subscribe_subscription_id_twice", "3.8.2.1.2", sub(pr=b"\x0b\x01\x0b\x02"), PE),
    ("subscribe_subscription_id_5_bytes", "1.5.5", sub(pr=b"\x0b\xff\xff\xff\xff\x7f"), MAL),
    ("subscribe_property_not_allowed", "2.2.2.2", sub(pr=b"\x01\x00"), MAL),
    ("subscribe_filter_bad_utf8", "MQTT-3.8.3-1", sub(entries=((b"a\xff", 0),)), MAL),
    ("subscribe_filter_nul", "MQTT-1.5.4-2", sub(entries=((b"a\x00", 0),)), MAL),
    ("subscribe_filter_empty", "MQTT-4.7.3-1", sub(entries=((b"", 0),)), MAL),
    ("subscribe_filter_hash_not_last", "MQTT-4.7.1-1", sub(entries=((b"a/#/b", 0),)), MAL),
    ("subscribe_filter_plus_in_level", "MQTT-4.7.1-2", sub(entries=((b"a/b+", 0),)), MAL),
    ("subscribe_filter_missing_options", "3.8.3", packet(0x82, u16(1) + props() + s(b"a/b")), MAL),
    ("subscribe_share_without_filter", "MQTT-4.8.2-2", sub(entries=((b"$share/g", 0),)), MAL),
    ("subscribe_share_name_wildcard", "MQTT-4.8.2-2", sub(entries=((b"$share/g+/a", 0),)), MAL),
    ("subscribe_share_name_empty", "MQTT-4.8.2-1", sub(entries=((b"$share//a", 0),)), MAL),
    # UNSUBSCRIBE (3.10).
    ("unsubscribe_flags", "MQTT-3.10.1-1", unsub(first=0xA0), MAL),
    ("unsubscribe_no_filter", "MQTT-3.10.3-2", unsub(filters=()), PE),
    ("unsubscribe_packet_id_0", "MQTT-2.2.1-3", unsub(pid=0), PE),
    ("unsubscribe_subscription_id", "2.2.2.2", unsub(pr=b"\x0b\x01"), MAL),
    ("unsubscribe_filter_bad_utf8", "MQTT-3.10.3-1", unsub(filters=(b"\xc3\x28",)), MAL),
    ("unsubscribe_filter_invalid", "MQTT-4.7.1-1", unsub(filters=(b"#/a",)), MAL),
    # DISCONNECT (3.14).
    ("disconnect_flags", "MQTT-3.14.1-1", disc(first=0xE1), MAL),
    ("disconnect_bad_reason", "3.14.2.1", disc(0x03), PE),
    ("disconnect_server_only_reason", "3.14.2.1", disc(0x8E), PE),
    ("disconnect_session_expiry_from_0", "MQTT-3.14.2-2", disc(0, b"\x11" + u32(60)), PE),
    ("disconnect_session_expiry_twice", "3.14.2.2.2", disc(0, b"\x11" + u32(0) + b"\x11" + u32(0)), PE),
    ("disconnect_reason_string_twice", "3.14.2.2.3", disc(0, b"\x1f" + s(b"a") + b"\x1f" + s(b"a")), PE),
    ("disconnect_property_not_allowed", "2.2.2.2", disc(0, b"\x01\x00"), MAL),
    ("disconnect_props_past_end", "2.2.2.1", packet(0xE0, b"\x00\x05"), MAL),
    # Sizes the server announced (3.2.2.3.6): its Maximum Packet Size.
    ("packet_too_large", "MQTT-3.2.2-15", pub(payload=b"x" * 70000), 0x95),
]

BY_NAME = {row[0]: row for row in AFTER}
assert len(BY_NAME) == len(AFTER)


def counter_for(code: int) -> str:
    return {MAL: "mqtt5_malformed", PE: "mqtt5_protocol_errors", 0x94: "mqtt5_topic_alias_invalid",
            0x95: "packets_too_large", 0x99: "mqtt5_payload_format_invalid"}[code]


@pytest.fixture(scope="module")
def gw(gw_module_factory):
    return gw_module_factory(workers=2, listeners=("mqtt",),
                             args=["--max-packet-size", "65536", "--max-awaiting-rel", "2"])


def _send(c: V5, data: bytes, fragmented: bool, rng) -> None:
    if fragmented:
        send_fragmented(c.sock, data, rng)
    else:
        c.send(data)


def _alive(gw) -> None:
    """The worker lives on: new clients get in (one per worker, likely)."""
    for _ in range(2):
        connected(gw.ports["mqtt"], unique("after")).close()


@pytest.mark.parametrize("name", [row[0] for row in AFTER])
@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
def test_bad_packet_after_connack(gw, name, fragmented, frag_rng):
    _, statement, data, code = BY_NAME[name]
    if data is None:        # second_connect
        data = connect()
    before = gw.counters()
    c = connected(gw.ports["mqtt"], unique("bad"))
    _send(c, data, fragmented, frag_rng)
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, code)], statement
    after = gw.counters()
    counter = counter_for(code)
    assert get_counter(after, counter) > get_counter(before, counter), (statement, counter)
    _alive(gw)


# Where Mosquitto 2.0.11 answers as the standard says (the same DISCONNECT and
# a close): the same rows run against it. On the others it keeps the
# connection open (a PINGREQ with flags or a body, a DUP flag on QoS 0, acks
# with bad flags or reason codes, No Local on a shared subscription, a
# Payload Format Indicator of 2, a Subscription Identifier from a client,
# packets only servers send), closes without a DISCONNECT, or says 0x81 where
# the standard says Protocol Error: docs/mqtt5-conformance.md lists each.
MOSQUITTO_AGREES = [
    "publish_qos3", "publish_topic_bad_utf8", "publish_topic_surrogate", "publish_topic_nul",
    "publish_packet_id_0", "publish_topic_past_end", "publish_props_past_end", "publish_props_length_5_bytes",
    "publish_unknown_property", "publish_connect_property", "publish_property_past_end",
    "publish_topic_alias_over_maximum", "publish_empty_topic_without_alias", "publish_empty_topic_alias_never_set",
    "subscribe_flags", "subscribe_reserved_option_bits", "subscribe_subscription_id_5_bytes",
    "subscribe_property_not_allowed", "subscribe_filter_bad_utf8", "subscribe_filter_nul", "subscribe_filter_empty",
    "subscribe_filter_hash_not_last", "subscribe_filter_plus_in_level", "subscribe_filter_missing_options",
    "subscribe_share_name_wildcard", "unsubscribe_flags", "unsubscribe_subscription_id",
    "unsubscribe_filter_bad_utf8", "unsubscribe_filter_invalid", "disconnect_session_expiry_from_0",
]


@pytest.fixture(scope="module")
def mosq(tmp_path_factory):
    m = Mosquitto(tmp_path_factory.mktemp("mosq")).start()
    yield m
    m.stop()


@pytest.mark.parametrize("name", MOSQUITTO_AGREES)
@pytest.mark.parametrize("server", ["mosquitto", "gw"])
def test_bad_packet_as_mosquitto_answers_it(gw, mosq, server, name):
    _, statement, data, code = BY_NAME[name]
    c = connected(mosq.port if server == "mosquitto" else gw.ports["mqtt"], unique("diff"))
    c.send(data)
    assert [(type(p), p.reason_code) for p in c.closed()] == [(p5.Disconnect, code)], statement


# --- before the CONNACK: a bad CONNECT --------------------------------------------------------
# (name, statement, bytes, the CONNACK's reason code; None: closed without a CONNACK)

BEFORE = [
    ("connect_protocol_name", "MQTT-3.1.2-1", connect(name=b"MQTX"), None),
    # Larger than the server's Maximum Packet Size, which the client does not
    # know yet (CONNACK 0x95 allowed, 3.2.2.2; a close is enough).
    ("connect_too_large", "3.2.2.3.6", connect(b"\x26" + s(b"k") + s(b"v" * 65535)), None),
    # Which form the client of an unknown level reads is not known: the 3.1.1
    # CONNACK, return code 1 (0x84's meaning), as Mosquitto does.
    ("connect_protocol_level_6", "MQTT-3.1.2-2", connect(level=6), b"\x20\x02\x00\x01"),
    ("connect_reserved_flag", "MQTT-3.1.2-3", connect(flags=0x03), MAL),
    ("connect_will_qos_without_will", "MQTT-3.1.2-11", connect(flags=0x0A), MAL),
    ("connect_will_qos3", "MQTT-3.1.2-12", connect(flags=0x1E), MAL),
    ("connect_will_retain_without_will", "MQTT-3.1.2-13", connect(flags=0x22), MAL),
    ("connect_username_flag_without_name", "MQTT-3.1.2-17", connect(flags=0x82), MAL),
    ("connect_password_flag_without_password", "MQTT-3.1.2-19", connect(flags=0x42), MAL),
    ("connect_client_id_bad_utf8", "MQTT-3.1.3-4", connect(client_id=b"\xc3\x28"), MAL),
    ("connect_client_id_nul", "MQTT-1.5.4-2", connect(client_id=b"a\x00"), MAL),
    ("connect_username_bad_utf8", "MQTT-3.1.3-11", connect(flags=0x82, user=b"\xff"), MAL),
    ("connect_trailing_bytes", "3.1.3", connect(tail=b"\x00"), MAL),
    ("connect_props_past_end", "2.2.2.1", packet(0x10, s(b"MQTT") + b"\x05\x02" + u16(60) + b"\x05"), MAL),
    ("connect_client_id_past_end", "3.1.3.1", connect(raw_payload=b"\x00\x09ab"), MAL),
    ("connect_unknown_property", "2.2.2.2", connect(b"\x7f\x00"), MAL),
    ("connect_topic_alias_property", "2.2.2.2", connect(b"\x23" + u16(1)), MAL),
    ("connect_session_expiry_twice", "3.1.2.11.2", connect(b"\x11" + u32(1) + b"\x11" + u32(1)), PE),
    ("connect_receive_maximum_0", "3.1.2.11.3", connect(b"\x21" + u16(0)), PE),
    ("connect_receive_maximum_twice", "3.1.2.11.3", connect(b"\x21" + u16(5) + b"\x21" + u16(5)), PE),
    ("connect_maximum_packet_size_0", "3.1.2.11.4", connect(b"\x27" + u32(0)), PE),
    ("connect_maximum_packet_size_twice", "3.1.2.11.4", connect(b"\x27" + u32(99) + b"\x27" + u32(99)), PE),
    ("connect_topic_alias_maximum_twice", "3.1.2.11.5", connect(b"\x22" + u16(1) + b"\x22" + u16(1)), PE),
    ("connect_request_response_2", "3.1.2.11.6", connect(b"\x19\x02"), PE),
    ("connect_request_response_twice", "3.1.2.11.6", connect(b"\x19\x01\x19\x01"), PE),
    ("connect_request_problem_2", "3.1.2.11.7", connect(b"\x17\x02"), PE),
    ("connect_request_problem_twice", "3.1.2.11.7", connect(b"\x17\x01\x17\x01"), PE),
    ("connect_auth_data_without_method", "3.1.2.11.10", connect(b"\x16" + s(b"x")), PE),
    ("connect_user_property_bad_utf8", "MQTT-1.5.7-1", connect(b"\x26" + s(b"\xff") + s(b"v")), MAL),
    ("will_property_not_allowed", "2.2.2.2", connect(flags=0x06, will_props=b"\x11" + u32(1)), MAL),
    ("will_delay_twice", "3.1.3.2.2", connect(flags=0x06, will_props=b"\x18" + u32(1) + b"\x18" + u32(1)), PE),
    ("will_payload_format_2", "3.1.3.2.3", connect(flags=0x06, will_props=b"\x01\x02"), PE),
    ("will_payload_format_twice", "3.1.3.2.3", connect(flags=0x06, will_props=b"\x01\x00\x01\x00"), PE),
    ("will_message_expiry_twice", "3.1.3.2.4",
     connect(flags=0x06, will_props=b"\x02" + u32(1) + b"\x02" + u32(1)), PE),
    ("will_content_type_twice", "3.1.3.2.5",
     connect(flags=0x06, will_props=b"\x03" + s(b"a") + b"\x03" + s(b"a")), PE),
    ("will_response_topic_twice", "3.1.3.2.6",
     connect(flags=0x06, will_props=b"\x08" + s(b"a") + b"\x08" + s(b"a")), PE),
    ("will_response_topic_wildcard", "MQTT-3.3.2-14", connect(flags=0x06, will_props=b"\x08" + s(b"a/+")), MAL),
    ("will_correlation_data_twice", "3.1.3.2.7",
     connect(flags=0x06, will_props=b"\x09" + s(b"a") + b"\x09" + s(b"a")), PE),
    ("will_topic_wildcard", "MQTT-3.1.3-11", connect(flags=0x06, will_topic=b"w/#"), MAL),
    ("will_topic_bad_utf8", "MQTT-3.1.3-11", connect(flags=0x06, will_topic=b"\xff"), MAL),
    ("will_payload_format_invalid", "3.1.3.2.3",
     connect(flags=0x06, will_props=b"\x01\x01", will_payload=b"\xff\xfe"), 0x99),
]

BEFORE_BY_NAME = {row[0]: row for row in BEFORE}
assert len(BEFORE_BY_NAME) == len(BEFORE)


def raw_until_closed(sock, timeout: float = WAIT) -> bytes:
    got = bytearray()
    sock.settimeout(timeout)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("name", [row[0] for row in BEFORE])
@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
def test_bad_connect(gw, name, fragmented, frag_rng):
    _, statement, data, code = BEFORE_BY_NAME[name]
    before = gw.counters()
    c = V5(gw.ports["mqtt"])
    _send(c, data, fragmented, frag_rng)
    if isinstance(code, bytes):
        assert raw_until_closed(c.sock) == code, statement
        _alive(gw)
        return
    got = c.closed()
    if code is None:
        assert got == [] or all(isinstance(p, p5.Connack) and p.reason_code >= 0x80 for p in got), statement
        _alive(gw)
        return
    assert [(type(p), p.reason_code) for p in got] == [(p5.Connack, code)], statement
    after = gw.counters()
    if code in (MAL, PE, 0x99):
        counter = counter_for(code)
        assert get_counter(after, counter) > get_counter(before, counter), (statement, counter)
    assert get_counter(after, "connack_refused") > get_counter(before, "connack_refused")
    _alive(gw)


def test_a_packet_before_connect_closes_without_an_answer(gw, frag_rng):
    """MQTT-3.1.0-1: the first packet must be a CONNECT; anything else is
    closed at once, no CONNACK, no DISCONNECT (MQTT-4.13.1-1)."""
    for data in (b"\xc0\x00", pub(), sub(), disc()):
        for fragmented in (False, True):
            c = V5(gw.ports["mqtt"])
            _send(c, data, fragmented, frag_rng)
            assert c.closed() == []
    _alive(gw)


# --- what needs the connection's state ---------------------------------------------------------

@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
def test_receive_maximum_exceeded_is_0x93(gw, fragmented, frag_rng):
    """The CONNACK announced Receive Maximum 2 (max_awaiting_rel): a third QoS 2
    PUBLISH without PUBREL is DISCONNECT 0x93 (3.3.4, MQTT-3.3.4-7 broken)."""
    c = V5(gw.ports["mqtt"])
    ack = c.connect(unique("rm"))
    assert ack.reason_code == 0 and ack.properties.receive_maximum == 2
    before = gw.counters()
    data = b"".join(pub(b"rm/t", qos=2, pid=i, payload=b"x") for i in (1, 2, 3))
    _send(c, data, fragmented, frag_rng)
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Pubrec, 0), (p5.Pubrec, 0), (p5.Disconnect, 0x93)]
    assert (gw.counters()["mqtt5_disconnects"]["receive_maximum"]
            == before["mqtt5_disconnects"]["receive_maximum"] + 1)
    _alive(gw)


@pytest.mark.parametrize("qos", [1, 2])
@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
def test_payload_format_invalid_acked_0x99_and_not_delivered(gw, qos, fragmented, frag_rng):
    """Payload Format Indicator 1 with a payload that is not UTF-8 (3.3.2.3.2:
    the receiver may check and answer 0x99): PUBACK/PUBREC 0x99, the message
    goes nowhere, the connection stays; a valid one after it is delivered."""
    topic = unique("pfi").encode()
    subscriber = connected(gw.ports["mqtt"], unique("pfi-sub"))
    subscriber.send(sub(((topic, 1),)))
    assert subscriber.read_kind(p5.Suback).reason_codes == [1]
    c = connected(gw.ports["mqtt"], unique("pfi-pub"))
    before = gw.counters()
    _send(c, pub(topic, b"\x01\x01", qos=qos, pid=7, payload=b"ok\xc3"), fragmented, frag_rng)
    got = c.read()
    assert (type(got), got.packet_id, got.reason_code) == (p5.Puback if qos == 1 else p5.Pubrec, 7, 0x99)
    after = gw.counters()
    assert get_counter(after, "mqtt5_payload_format_invalid") == get_counter(before, "mqtt5_payload_format_invalid") + 1
    # The flow ended (MQTT-4.3.3-4): the same id again, valid, is a new message.
    c.send(pub(topic, b"\x01\x01", qos=qos, pid=7, payload="é".encode()))
    got = c.read()
    assert (type(got), got.packet_id, got.reason_code) == (p5.Puback if qos == 1 else p5.Pubrec, 7, 0)
    msg = subscriber.read_kind(p5.Publish)
    assert msg.payload == "é".encode() and msg.properties.payload_format_indicator == 1
    subscriber.sock.settimeout(0.3)
    with pytest.raises((socket.timeout, TimeoutError)):
        subscriber.sock.recv(1)
    c.close()
    subscriber.close()


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
def test_pubrel_of_an_unknown_packet_id_is_pubcomp_0x92(gw, fragmented, frag_rng):
    """3.7.2.1: a PUBREL for no QoS 2 message the server holds is answered
    PUBCOMP 0x92 Packet Identifier not found (no error: the connection stays);
    one it holds, PUBCOMP 0x00."""
    c = connected(gw.ports["mqtt"], unique("rel"))
    _send(c, ack(0x62, pid=9), fragmented, frag_rng)
    got = c.read()
    assert (type(got), got.packet_id, got.reason_code) == (p5.Pubcomp, 9, 0x92)
    c.send(pub(b"rel/t", qos=2, pid=9, payload=b"x"))
    assert c.read_kind(p5.Pubrec).packet_id == 9
    c.send(ack(0x62, pid=9))
    got = c.read_kind(p5.Pubcomp)
    assert (got.packet_id, got.reason_code) == (9, 0)
    c.close()


def test_disconnect_with_will_message_is_not_an_error(gw):
    """DISCONNECT 0x04 (3.14.2.1) is the client's to send: the connection
    closes without an answer, nothing counted as an error."""
    before = gw.counters()
    c = connected(gw.ports["mqtt"], unique("dw"))
    c.send(disc(0x04))
    assert c.closed() == []
    after = gw.counters()
    for name in ("mqtt5_malformed", "mqtt5_protocol_errors"):
        assert get_counter(after, name) == get_counter(before, name)


# --- random bytes ---------------------------------------------------------------------------

def _check_answer(data: bytes) -> None:
    """What the server wrote: MQTT 5.0 packets; the last, if the server closed
    with an error, a DISCONNECT (nothing after it)."""
    packets, used = ref.decode(data)
    assert used == len(data), data
    for i, p in enumerate(packets):
        if isinstance(p, p5.Disconnect):
            assert i == len(packets) - 1, packets
    return packets


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(junk=st.one_of(
    st.binary(min_size=1, max_size=64),
    # a plausible fixed header, then random bytes
    st.tuples(st.integers(1, 15), st.integers(0, 15), st.binary(max_size=40)).map(
        lambda t: bytes([t[0] << 4 | t[1]]) + vbi(len(t[2])) + t[2]),
))
def test_random_bytes_get_a_valid_answer_or_a_close(gw, junk):
    c = connected(gw.ports["mqtt"], unique("fuzz"))
    c.send(junk + b"\xc0\x00")          # a PINGREQ after: answered if the junk was taken
    c.sock.settimeout(0.05)
    got = bytearray()
    deadline = time.monotonic() + 1.0
    closed = False
    while time.monotonic() < deadline:
        try:
            chunk = c.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            if got.endswith(b"\xd0\x00"):
                break           # the PINGRESP: the server took it all and answered
            continue
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        got += chunk
    packets = _check_answer(bytes(got))
    # Else still open: it answered the PINGREQ, or the junk announced more
    # bytes than came and the server waits for them (the PINGREQ among them).
    c.close()
