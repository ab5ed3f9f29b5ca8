"""Bad input closes only the offending connection. Each case sends hand-built
bytes (struct, not the project codec) on a fresh connection, checks what comes
back before the close and which counters moved, then checks that a healthy
paho client on the same server is still connected and can ping and publish
QoS 1 (PUBACK)."""

from __future__ import annotations

import signal
import struct

import pytest

from conftest import (CONNACK_OK, PINGREQ, PahoClient, assert_counter_deltas, client_tls_context,
                      connect_packet, counter_delta, mqtt_str, packet, ping, publish_packet, read_packet,
                      send_fragmented, subscribe_packet, tcp_connect, tls_connect, wait_closed, wait_for)

MAX_PACKET = 4096


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, args=["--max-packet-size", str(MAX_PACKET)])


@pytest.fixture(scope="module")
def healthy(server):
    client = PahoClient(server.ports["mqtt"], keepalive=60, client_id="healthy")
    yield client
    client.close()


def connect_body(proto=b"MQTT", level=4, flags=0x02, keepalive=60, client_id=b"bad"):
    return mqtt_str(proto) + bytes([level, flags]) + struct.pack("!H", keepalive) + mqtt_str(client_id)


MAL = lambda reason: {"closed_malformed": 1, f"malformed.{reason}": 1}  # noqa: E731
REFUSED = lambda: {"connack_refused": 1, "closed_server": 1, "closed_malformed": 0}  # noqa: E731

# (id, connect first?, bytes, bytes expected before the close, counter deltas)
CASES = [
    ("garbage-bytes", False, bytes(range(0, 64)) * 4, b"", MAL("fixed_header")),
    ("http-request", False, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"", MAL("fixed_header")),
    ("remaining-length-5th-byte", True, b"\x30\xff\xff\xff\xff\x01", b"", MAL("remaining_length")),
    ("remaining-length-5th-byte-before-connect", False, b"\x10\x80\x80\x80\x80\x01", b"",
     MAL("remaining_length")),
    ("over-max-packet-size", True, publish_packet("big", b"x" * (MAX_PACKET + 10)), b"",
     {"closed_malformed": 1, "packets_too_large": 1}),
    ("header-announcing-1MB", True, b"\x30\x80\x80\x40", b"",
     {"closed_malformed": 1, "packets_too_large": 1}),
    ("MQTT-1.5.3-1-invalid-utf8-client-id", False, connect_packet(b"\xff\xfebad"), b"", MAL("utf8")),
    ("MQTT-1.5.3-1-surrogate-in-client-id", False, connect_packet(b"a\xed\xa0\x80"), b"",
     MAL("utf8")),
    ("MQTT-1.5.3-2-nul-in-topic", True, publish_packet(b"a\x00b", b"x"), b"", MAL("utf8")),
    ("MQTT-3.3.2-2-plus-in-publish-topic", True, publish_packet("a/+/b", b"x"), b"", MAL("topic")),
    ("MQTT-3.3.2-2-hash-in-publish-topic", True, publish_packet("a/#", b"x", qos=1), b"",
     MAL("topic")),
    ("MQTT-4.7.3-1-empty-publish-topic", True, publish_packet("", b"x"), b"", MAL("topic")),
    ("MQTT-3.1.0-2-second-connect", True, connect_packet(b"again"), b"", MAL("protocol")),
    ("MQTT-3.1.0-1-publish-before-connect", False, publish_packet("a", b"x"), b"",
     MAL("protocol")),
    ("MQTT-3.1.0-1-subscribe-before-connect", False, subscribe_packet(1, [("a", 0)]), b"",
     MAL("protocol")),
    ("MQTT-3.1.2-1-bad-protocol-name", False, packet(0x10, connect_body(proto=b"MQTX")), b"",
     MAL("protocol")),
    ("MQTT-3.1.2-3-reserved-connect-flag", False, packet(0x10, connect_body(flags=0x03)), b"",
     MAL("protocol")),
    ("MQTT-3.1.2-2-level-6-connack-1", False, packet(0x10, connect_body(level=6)),
     b"\x20\x02\x00\x01", REFUSED()),
    ("MQTT-3.1.3-8-empty-id-clean-0-connack-2", False,
     packet(0x10, connect_body(flags=0x00, client_id=b"")), b"\x20\x02\x00\x02", REFUSED()),
    ("MQTT-2.2.2-2-subscribe-flags-0", True, packet(0x80, struct.pack("!H", 1) + mqtt_str("a") + b"\x00"),
     b"", MAL("fixed_header")),
    ("MQTT-2.2.2-2-pingreq-flags-1", True, b"\xc1\x00", b"", MAL("fixed_header")),
    ("MQTT-2.2.2-2-pubrel-flags-0", True, b"\x60\x02\x00\x01", b"", MAL("fixed_header")),
    ("MQTT-2.2.2-2-reserved-type-15", True, b"\xf0\x00", b"", MAL("fixed_header")),
    ("MQTT-3.3.1-4-publish-qos-3", True, b"\x36\x05\x00\x01a\x00\x01", b"", MAL("qos")),
    ("MQTT-2.3.1-1-packet-id-0", True, publish_packet("a", b"x", qos=1, packet_id=0), b"",
     MAL("packet_id")),
    ("MQTT-3.8.3-3-subscribe-without-filter", True, packet(0x82, struct.pack("!H", 5)), b"",
     MAL("no_topic_filter")),
    ("MQTT-3.8.3-4-subscribe-qos-3", True, subscribe_packet(6, [("a", 3)]), b"", MAL("qos")),
    ("MQTT-3.3.1-2-publish-qos-0-with-dup", True, packet(0x38, mqtt_str("a/b") + b"x"), b"",
     MAL("fixed_header")),
    ("MQTT-4.7.3-1-empty-subscribe-filter", True, subscribe_packet(7, [("ok/+", 0), ("", 1)]), b"",
     MAL("topic")),
    ("MQTT-4.7.1-2-hash-not-last-in-filter", True, subscribe_packet(8, [("a/#/b", 1)]), b"", MAL("topic")),
    ("MQTT-4.7.1-3-plus-not-alone-in-level", True, subscribe_packet(9, [("a+", 0)]), b"", MAL("topic")),
    ("MQTT-4.7.3-1-empty-unsubscribe-filter", True, packet(0xA2, struct.pack("!H", 10) + mqtt_str("")), b"",
     MAL("topic")),
    ("MQTT-4.7.1-2-unsubscribe-bad-filter", True, packet(0xA2, struct.pack("!H", 11) + mqtt_str("#/a")), b"",
     MAL("topic")),
    ("MQTT-1.5.3-control-character-in-topic", True, publish_packet("a/\x07", b"x", qos=1), b"",
     MAL("control_character")),
    ("MQTT-1.5.3-c1-control-in-filter", True, subscribe_packet(12, [("a/\x85/#", 0)]), b"",
     MAL("control_character")),
    ("MQTT-1.5.3-control-character-in-client-id", False, connect_packet(b"dev\x1bice"), b"",
     MAL("control_character")),
    ("pingreq-with-a-body", True, b"\xc0\x01\x00", b"", MAL("remaining_length")),
    ("puback-of-3-bytes", True, b"\x40\x03\x00\x01\x00", b"", MAL("remaining_length")),
    ("MQTT-4.8.0-1-server-only-packet-connack", True, b"\x20\x02\x00\x00", b"", MAL("server_packet")),
    ("MQTT-4.8.0-1-server-only-packet-suback", True, b"\x90\x03\x00\x01\x00", b"", MAL("server_packet")),
    ("MQTT-4.8.0-1-server-only-packet-unsuback", True, b"\xb0\x02\x00\x01", b"", MAL("server_packet")),
    ("MQTT-4.8.0-1-server-only-packet-pingresp", True, b"\xd0\x00", b"", MAL("server_packet")),
    ("MQTT-3.1.0-1-server-only-packet-before-connect", False, b"\xd0\x00", b"", MAL("protocol")),
]


@pytest.mark.parametrize("connect_first, data, reply, deltas",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_closes_only_the_offender(server, healthy, connect_first, data, reply, deltas):
    before = server.counters()
    with tcp_connect(server.ports["mqtt"]) as sock:
        if connect_first:
            sock.sendall(connect_packet(b"offender"))
            assert read_packet(sock) == CONNACK_OK
        sock.sendall(data)
        assert wait_closed(sock, 10) == reply
    assert_counter_deltas(server, before, {**deltas, "conns_current": 0})
    healthy.check_healthy()


BYTEWISE_HEAD = 64     # bytewise: the first bytes one at a time, the rest in one piece


@pytest.mark.parametrize("pieces", ["bytewise", "random"])
@pytest.mark.parametrize("connect_first, data, reply, deltas",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_in_pieces_closes_only_the_offender(server, healthy, connect_first, data, reply, deltas,
                                                       pieces, frag_rng):
    """The same cases, the bad bytes written in pieces (the CONNECT before them
    whole): the first bytes one at a time, or cut at random points with the
    last byte alone (where most malformations are). Same answer, same counters."""
    before = server.counters()
    with tcp_connect(server.ports["mqtt"]) as sock:
        if connect_first:
            sock.sendall(connect_packet(b"offender"))
            assert read_packet(sock) == CONNACK_OK
        if pieces == "bytewise":
            send_fragmented(sock, data, cuts=range(1, BYTEWISE_HEAD))
        else:
            send_fragmented(sock, data, frag_rng, cuts=[len(data) - 1])
        assert wait_closed(sock, 10) == reply
    assert_counter_deltas(server, before, {**deltas, "conns_current": 0})
    healthy.check_healthy()


@pytest.mark.parametrize("cuts", [[1], [3], "bytewise"], ids=["after-first-byte", "in-protocol-name",
                                                              "bytewise"])
def test_connect_in_pieces_is_accepted(gw_factory, cuts):
    """A valid CONNECT written in pieces gets CONNACK 0 and the connection works,
    and the worker lives on. One worker: the client id's home is the worker
    holding the connection, so its session settles at once."""
    server = gw_factory(workers=1, listeners=("mqtt",))
    [pid] = server.worker_pids()
    with tcp_connect(server.ports["mqtt"]) as sock:
        send_fragmented(sock, connect_packet(b"in-pieces"), cuts=None if cuts == "bytewise" else cuts)
        assert read_packet(sock) == CONNACK_OK
        ping(sock)
    assert server.worker_pids() == [pid]


def test_packets_in_pieces_after_connect(server, healthy, frag_rng):
    """After a whole CONNECT, a stream of packets written in pieces cut at
    random points: each answered, the PUBACKs in order, as written whole (the
    SUBACK may come after later PINGRESPs: it waits for the other worker to
    learn the new filter)."""
    before = server.counters()
    with tcp_connect(server.ports["mqtt"]) as sock:
        sock.sendall(connect_packet(b"pieces"))
        assert read_packet(sock) == CONNACK_OK
        stream = b"".join([PINGREQ, publish_packet("pieces/t", bytes(300), qos=1, packet_id=1),
                           subscribe_packet(2, [("pieces/+/x", 1)]), PINGREQ,
                           publish_packet("pieces/t", b"y" * 5, qos=1, packet_id=3)])
        send_fragmented(sock, stream, frag_rng, cuts=range(1, 8))
        answers = [read_packet(sock) for _ in range(5)]
        pubacks = [(0x40, b"\x00\x01"), (0x40, b"\x00\x03")]
        assert sorted(answers) == sorted([(0xD0, b""), (0xD0, b""), (0x90, b"\x00\x02\x01"), *pubacks])
        assert [a for a in answers if a[0] == 0x40] == pubacks
    assert_counter_deltas(server, before, {"closed_malformed": 0, "packets_in.publish": 2})
    healthy.check_healthy()


def test_bad_input_over_tls(server, healthy):
    """Garbage inside an established TLS session: closed and counted the same way."""
    before = server.counters()
    with tls_connect(server.ports["mqtts"], client_tls_context(server.ca)) as sock:
        sock.sendall(connect_packet(b"tls-offender"))
        assert read_packet(sock) == CONNACK_OK
        sock.sendall(publish_packet("a/#", b"x"))
        wait_closed(sock, 10)
    assert_counter_deltas(server, before, {"malformed.topic": 1, "closed_malformed": 1})
    healthy.check_healthy()


def test_mqisdp_level_3_accepted(server, healthy):
    """MQTT 3.1 ("MQIsdp", level 3), as Mosquitto accepts it: CONNACK 0, then it works."""
    before = server.counters()
    with tcp_connect(server.ports["mqtt"]) as sock:
        sock.sendall(packet(0x10, connect_body(proto=b"MQIsdp", level=3, client_id=b"v31")))
        assert read_packet(sock) == CONNACK_OK
        ping(sock)
        sock.sendall(publish_packet("v31/t", b"x", qos=1, packet_id=3))
        assert read_packet(sock) == (0x40, b"\x00\x03")
    assert counter_delta(before, server.counters(), "mqtt_connected") == 1
    healthy.check_healthy()


def test_mqisdp_client_id_over_23_characters_refused(server):
    """MQTT 3.1: a client id of 1 to 23 characters, else CONNACK 0x02."""
    with tcp_connect(server.ports["mqtt"]) as sock:
        sock.sendall(packet(0x10, connect_body(proto=b"MQIsdp", level=3, client_id=b"x" * 24)))
        assert wait_closed(sock, 10) == b"\x20\x02\x00\x02"
    with tcp_connect(server.ports["mqtt"]) as sock:
        sock.sendall(packet(0x10, connect_body(proto=b"MQIsdp", level=3, client_id="é".encode() * 23)))
        assert read_packet(sock) == CONNACK_OK


@pytest.mark.parametrize("qos, wrong", [(1, 0x50), (1, 0x70), (2, 0x40), (2, 0x70)],
                         ids=["pubrec-for-qos-1", "pubcomp-for-qos-1", "puback-for-qos-2", "pubcomp-before-pubrel"])
def test_acknowledgement_of_the_wrong_kind_closes_and_is_counted(server, healthy, qos, wrong):
    """MQTT-4.3.2/4.3.3, MQTT-4.8.0-1: a subscriber answering our QoS 1 PUBLISH
    with PUBREC or PUBCOMP, or our QoS 2 PUBLISH with PUBACK or PUBCOMP, is
    closed with nothing sent, counted as malformed.wrong_ack_kind."""
    before = server.counters()
    topic = f"wrong-ack/{qos}/{wrong:x}"
    with tcp_connect(server.ports["mqtt"]) as sub, tcp_connect(server.ports["mqtt"]) as pub:
        sub.sendall(connect_packet(b"wrong-ack-sub"))
        assert read_packet(sub) == CONNACK_OK
        sub.sendall(subscribe_packet(1, [(topic, qos)]))
        assert read_packet(sub) == (0x90, bytes([0, 1, qos]))
        pub.sendall(connect_packet(b"wrong-ack-pub"))
        assert read_packet(pub) == CONNACK_OK
        pub.sendall(publish_packet(topic, b"m", qos=qos, packet_id=5))
        assert read_packet(pub) == (0x40 if qos == 1 else 0x50, b"\x00\x05")
        first, body = read_packet(sub)
        assert first == 0x30 | (qos << 1)
        pid = body[2 + body[1]:4 + body[1]]
        sub.sendall(bytes([wrong, 2]) + pid)
        assert wait_closed(sub, 10) == b""
    assert_counter_deltas(server, before, {"malformed.wrong_ack_kind": 1, "closed_malformed": 1})
    healthy.check_healthy()


def test_several_packets_in_one_write_then_a_bad_one(server, healthy):
    """Good packets before the bad one in the same segment are handled (counted)
    in order; the bad one then closes the connection (MQTT-4.8.0-1). Replies still
    queued when it closes may be dropped, which the standard allows; if any come,
    they are a prefix of the expected answers, in order."""
    before = server.counters()
    with tcp_connect(server.ports["mqtt"]) as sock:
        sock.sendall(connect_packet(b"batch") + PINGREQ + publish_packet("t", b"1", qos=1, packet_id=9)
                     + PINGREQ + b"\x00\x00")
        got = wait_closed(sock, 10)
    answers = b"\x20\x02\x00\x00" + b"\xd0\x00" + b"\x40\x02\x00\x09" + b"\xd0\x00"
    assert answers.startswith(got)
    assert_counter_deltas(server, before, {
        "mqtt_connected": 1,
        "packets_in.pingreq": 2,
        "packets_in.publish": 1,
        "malformed.fixed_header": 1,
    })
    healthy.check_healthy()


def test_control_characters_accepted_when_configured_and_refused_again_after_reload(gw_factory, tmp_path):
    """mqtt_control_characters = "accept": a client id and a topic holding
    control characters (U+0007, U+0085) are served and routed; after a SIGHUP
    with "close" (the default) the same PUBLISH closes its connection, counted
    as malformed.control_character (MQTT 3.1.1 section 1.5.3 lets the server
    close)."""
    cfg = tmp_path / "gw.toml"
    cfg.write_text('mqtt_control_characters = "accept"\nlog_level = "debug"\n')   # workers log "reloaded" at debug
    server = gw_factory(workers=1, listeners=("mqtt",), config=cfg)
    topic = "ctl/\x07/\x85"
    with tcp_connect(server.ports["mqtt"]) as sock:
        sock.sendall(connect_packet("bell\x07id".encode()))
        assert read_packet(sock) == CONNACK_OK
        sock.sendall(subscribe_packet(1, [("ctl/\x07/+", 1)]))
        assert read_packet(sock) == (0x90, b"\x00\x01\x01")
        sock.sendall(publish_packet(topic, b"ring", qos=1, packet_id=2))
        got = [read_packet(sock), read_packet(sock)]
        assert got[0] == (0x40, b"\x00\x02")
        assert got[1][0] == 0x32 and got[1][1].startswith(mqtt_str(topic)) and got[1][1].endswith(b"ring")
    cfg.write_text('mqtt_control_characters = "close"\nlog_level = "debug"\n')
    log = server.log()
    server.signal(signal.SIGHUP)
    wait_for(lambda: server.log().count("worker 0: reloaded") > log.count("worker 0: reloaded"), 10,
             what="the worker to reload")
    before = server.counters()
    with tcp_connect(server.ports["mqtt"]) as sock:
        sock.sendall(connect_packet(b"plain-id"))
        assert read_packet(sock) == CONNACK_OK
        sock.sendall(publish_packet(topic, b"ring", qos=1, packet_id=3))
        assert wait_closed(sock, 10) == b""
    assert counter_delta(before, server.counters(), "malformed.control_character") == 1
