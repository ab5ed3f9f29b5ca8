"""The MQTT 5.0 codec against real implementations: Debian's Mosquitto 2.0.11
on a loopback port and paho-mqtt's v5 client.

- What Mosquitto writes (CONNACK, SUBACK, a PUBLISH it forwards with the
  properties of ours and a Subscription Identifier added) decodes with both
  codecs, and what gw_ext.codec5 writes is what Mosquitto and paho read
  (every PUBLISH property forwarded to a paho subscriber as sent).
- Bad packets: where Mosquitto answers with a DISCONNECT, its reason code is
  the class codec5 gives the same bytes, but where Mosquitto 2.0.11 deviates
  from the standard (each such case names the statement that decides).
"""

from __future__ import annotations

import queue
import socket
import uuid

import pytest

import mqtt5_ref as ref
from broker_fixtures import Mosquitto
from conftest import HOST
from mqtt_bytes import mqtt_str, packet, read_packet, varint
from gw_ext import codec5
from gw.packets5 import (
    Connack, Connect, Disconnect, MalformedPacket5, Properties, ProtocolError5, Publish, Suback, Subscribe,
)

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties as PahoProperties  # noqa: E402


@pytest.fixture
def mosquitto(tmp_path):
    m = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield m
    finally:
        m.stop()


def read_one(sock) -> bytes:
    first, body = read_packet(sock)
    return bytes([first]) + varint(len(body)) + body


def decoded(data: bytes):
    got = codec5.decode(data)
    assert got == ref.decode(data) and got[1] == len(data)
    return got[0][0]


def connect(m, client_id: str, props=Properties()) -> tuple[socket.socket, Connack]:
    s = socket.create_connection((HOST, m.port), timeout=5)
    s.sendall(codec5.encode(Connect(client_id, True, 60, props)))
    return s, decoded(read_one(s))


def test_mosquitto_reads_our_packets_and_we_read_its(mosquitto):
    sub, connack = connect(mosquitto, "sub", Properties(receive_maximum=5, topic_alias_maximum=4,
                                                        user_properties=(("a", "b"),)))
    assert connack.reason_code == 0 and connack.properties.topic_alias_maximum is not None
    sub.sendall(codec5.encode(Subscribe(3, [("t/#", 0x01)], Properties(subscription_identifiers=(77,)))))
    assert decoded(read_one(sub)) == Suback(3, [1])
    pub, _ = connect(mosquitto, "pub")
    props = Properties(payload_format_indicator=1, message_expiry_interval=3600, content_type="text/plain",
                       response_topic="reply/here", correlation_data=b"\x00\x01\x02",
                       user_properties=(("k", "1"), ("z", "2"), ("k", "3")))
    pub.sendall(codec5.encode(Publish("t/x", "héllo".encode(), 1, packet_id=9, properties=props)))
    assert decoded(read_one(pub)).packet_id == 9                 # PUBACK
    got = decoded(read_one(sub))
    assert (got.topic, got.payload, got.qos) == ("t/x", "héllo".encode(), 1)
    p = got.properties
    assert p.subscription_identifiers == (77,)
    assert 3590 <= p.message_expiry_interval <= 3600             # the time it waited taken off (MQTT-3.3.2-6)
    assert (p.payload_format_indicator, p.content_type, p.response_topic, p.correlation_data) == (
        1, "text/plain", "reply/here", b"\x00\x01\x02")
    assert p.user_properties == (("k", "1"), ("z", "2"), ("k", "3"))      # order kept (MQTT-3.3.2-18)
    pub.sendall(codec5.encode(Disconnect()))
    sub.sendall(codec5.encode(Disconnect()))
    pub.close()
    sub.close()


def test_paho_reads_what_we_encode(mosquitto):
    """A paho v5 subscriber (its own decoder) gets every property of a PUBLISH
    gw_ext.codec5 encoded, through Mosquitto."""
    messages: queue.Queue = queue.Queue()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"paho-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    subscribed: queue.Queue = queue.Queue()
    client.on_message = lambda c, u, msg: messages.put(msg)
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)
    client.connect(HOST, mosquitto.port)
    client.loop_start()
    try:
        client.subscribe("p/#", qos=1)
        assert subscribed.get(timeout=5)[0].value == 1
        pub, _ = connect(mosquitto, "pub2")
        props = Properties(payload_format_indicator=0, message_expiry_interval=600, content_type="a/b",
                           response_topic="r/t", correlation_data=b"\xff\x00",
                           user_properties=(("x", "é"), ("x", "y")))
        pub.sendall(codec5.encode(Publish("p/1", b"\x00\x01", 1, packet_id=1, properties=props)))
        msg = messages.get(timeout=5)
        pp = msg.properties
        assert (msg.topic, msg.payload, msg.qos) == ("p/1", b"\x00\x01", 1)
        assert (pp.PayloadFormatIndicator, pp.ContentType, pp.ResponseTopic, pp.CorrelationData) == (
            0, "a/b", "r/t", b"\xff\x00")
        assert 590 <= pp.MessageExpiryInterval <= 600
        assert pp.UserProperty == [("x", "é"), ("x", "y")]
        pub.close()
    finally:
        client.disconnect()
        client.loop_stop()


def test_paho_properties_encoder_and_ours_agree():
    """paho's own property encoder (what its client sends) and ours: each
    reads the other's block."""
    pp = PahoProperties(PacketTypes.PUBLISH)
    pp.PayloadFormatIndicator = 1
    pp.MessageExpiryInterval = 70000
    pp.TopicAlias = 3
    pp.ResponseTopic = "re/ply"
    pp.CorrelationData = b"cd"
    pp.UserProperty = [("a", "1"), ("b", "2")]
    pp.SubscriptionIdentifier = 300
    data = packet(0x30, mqtt_str(b"t") + pp.pack() + b"payload")
    p = decoded(data).properties
    assert p == Properties(payload_format_indicator=1, message_expiry_interval=70000, topic_alias=3,
                           response_topic="re/ply", correlation_data=b"cd", user_properties=(("a", "1"), ("b", "2")),
                           subscription_identifiers=(300,))
    ours = codec5.encode(Publish("t", b"payload", properties=p))
    back = PahoProperties(PacketTypes.PUBLISH)
    back.unpack(ours[2 + 3:])          # after the fixed header and the topic
    assert back.json() == pp.json()


# (bytes sent after a successful CONNECT, Mosquitto's answer, ours, the statement that
# decides where they differ: None when they agree)
DIFFERENTIAL = [
    ("unknown property", packet(0x30, mqtt_str(b"a") + b"\x02\x05\x00p"), 0x81, 0x81, None),
    ("subscription options reserved bits", packet(0x82, b"\x00\x01\x00" + mqtt_str(b"a") + b"\x40"), 0x81, 0x81,
     None),
    ("Property Length not minimal", packet(0x30, mqtt_str(b"a") + b"\x80\x00p"), 0x81, 0x81, None),
    ("empty topic without a Topic Alias", packet(0x30, mqtt_str(b"") + b"\x00p"), 0x82, 0x82, None),
    ("packet identifier 0", packet(0x32, mqtt_str(b"a") + b"\x00\x00\x00p"), 0x82, 0x82, None),
    ("Topic Alias 0", packet(0x30, mqtt_str(b"a") + b"\x03\x23\x00\x00p"), 0x81, 0x82,
     "MQTT-3.3.2-8 (a value the protocol does not allow in a packet that parses: section 4.13's Protocol Error)"),
    ("Retain Handling 3", packet(0x82, b"\x00\x01\x00" + mqtt_str(b"a") + b"\x30"), 0x81, 0x82,
     "3.8.3.1: 'It is a Protocol Error to send a Retain Handling value of 3'"),
    ("SUBSCRIBE without a filter", packet(0x82, b"\x00\x01\x00"), 0x81, 0x82,
     "MQTT-3.8.3-2: 'A SUBSCRIBE packet with no Payload is a Protocol Error'"),
]


@pytest.mark.parametrize("name, data, theirs, ours, statement", DIFFERENTIAL, ids=[d[0] for d in DIFFERENTIAL])
def test_bad_packets_against_mosquitto(mosquitto, name, data, theirs, ours, statement):
    s, _ = connect(mosquitto, f"bad-{uuid.uuid4().hex[:6]}")
    s.sendall(data)
    answer = read_one(s)
    assert answer == bytes([0xE0, 1, theirs]), f"Mosquitto answered {answer!r}"
    assert decoded(answer) == Disconnect(theirs)
    for mod in (codec5, ref):
        with pytest.raises((MalformedPacket5, ProtocolError5)) as err:
            mod.decode(data)
        assert err.value.reason_code == ours
    assert (theirs == ours) == (statement is None)
    s.close()
