"""MQTT 5.0 messages in the broker: a message's properties (Payload Format
Indicator, Message Expiry Interval, Content Type, Response Topic, Correlation
Data, User Properties) carried with it (gw_ext/loop.pxd, Msg's extras) into
the retained store, the data dir and sessions' queues, and across workers;
an expired message is not delivered (counted: mqtt5_expired); a 3.1.1
subscriber gets the message without them.

Real server (`gw serve`, 2 workers), real clients (mosquitto_sub)."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time

import msgspec
import pytest

import mqtt5_ref as ref
from test_mqtt5_connections import V5  # first: it registers broker_fixtures for assertion rewriting

from conftest import HOST, GwServer, stop_and_check, tcp_connect  # noqa: I001
from gw import packets5 as p5

# Content Type "text/plain", User Properties ("k", "v") then ("a", "b") in that
# order, Correlation Data b"\x00\x01", Response Topic "re/ply".
PROPS = (b"\x03\x00\x0atext/plain" + b"\x26\x00\x01k\x00\x01v" + b"\x26\x00\x01a\x00\x01b"
         + b"\x09\x00\x02\x00\x01" + b"\x08\x00\x06re/ply")


def ext_of(props: bytes, expire_ms: int = 0) -> bytes:
    """A message's extras as the server keeps them: its expiry (wall-clock ms, 0:
    never), then its property block."""
    return struct.pack("<Q", expire_ms) + props


def sub(port: int, topic: str, count: int, *, version: str = "311", timeout: int = 5) -> list[str]:
    """mosquitto_sub until `count` messages or `timeout` seconds: one line per
    message, "topic payload"."""
    res = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", version, "-t", topic,
                          "-C", str(count), "-W", str(timeout), "-F", "%t %p"],
                         capture_output=True, text=True, timeout=timeout + 10)
    return [line for line in res.stdout.splitlines() if line]


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    return d


def test_retained_properties_kept_across_a_restart_and_expired_ones_not_delivered(tmp_path, data_dir):
    now_ms = int(time.time() * 1000)
    kept = ext_of(PROPS)
    later = ext_of(b"\x01\x01", now_ms + 3_600_000)
    saved = [
        [b"m5/kept", 1, b"K", kept],
        [b"m5/later", 0, b"L", later],
        [b"m5/gone", 0, b"G", ext_of(b"", now_ms - 1000)],     # expired while the server was down: not loaded
        [b"m5/soon", 0, b"S", ext_of(b"", now_ms + 5000)],     # expires while the server runs
        [b"m5/old", 0, b"O"],                                  # a 3.1.1 message, as before
    ]
    (data_dir / "retained.msgpack").write_bytes(msgspec.msgpack.encode(saved))
    server = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt",), data_dir=data_dir).start()
    # A machine so loaded that the start took seconds may have loaded the file
    # after m5/soon expired (then it was never loaded: not counted).
    loaded_in_time = time.time() * 1000 < now_ms + 4000
    try:
        time.sleep(max(0.0, (now_ms + 5100) / 1000 - time.time()))
        got = sorted(sub(server.ports["mqtt"], "m5/#", 4, timeout=3))
        assert got == ["m5/kept K", "m5/later L", "m5/old O"]
        if loaded_in_time:
            assert server.counters()["mqtt5_expired"] == 1     # m5/soon, found expired by the subscription
    finally:
        stop_and_check([server])
    after = {e[0]: e[1:] for e in msgspec.msgpack.decode((data_dir / "retained.msgpack").read_bytes())}
    assert after[b"m5/kept"] == [1, b"K", kept]          # the properties, byte for byte, in order
    assert after[b"m5/later"] == [0, b"L", later]        # the same expiry: no time added by the restart
    assert after[b"m5/old"] == [0, b"O"]
    assert b"m5/gone" not in after


def test_a_saved_session_keeps_its_queued_messages_properties(tmp_path, data_dir):
    """A persistent session's queued MQTT 5.0 message comes back with its
    extras from the data dir (state layout 4) and is delivered; one whose
    expiry passed meanwhile is dropped, counted."""
    now_ms = int(time.time() * 1000)

    def msg(topic: bytes, payload: bytes, ext: bytes) -> bytes:
        return (struct.pack("<HBBHI", 0, 1, 0, len(topic), len(payload)) + topic + payload
                + struct.pack("<I", len(ext)) + ext)

    state = (struct.pack("<BI", 4, 1) + struct.pack("<H", 4) + b"q5/#" + b"\x01"
             + struct.pack("<HI", 1, 3)
             + msg(b"q5/a", b"A", ext_of(PROPS))
             + msg(b"q5/b", b"B", ext_of(b"", now_ms - 1))
             + msg(b"q5/c", b"C", b"")
             + struct.pack("<I", 0) + b"\x00\x00\x00")
    for n in range(2):      # each worker loads the files numbered like it
        (data_dir / f"sessions-{n}.msgpack").write_bytes(msgspec.msgpack.encode(
            {"format": 4, "sessions": [[b"q5-client", state]] if n == 0 else []}))
    server = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt",), data_dir=data_dir).start()
    try:
        res = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(server.ports["mqtt"]), "-V", "311",
                              "-i", "q5-client", "-c", "-q", "1", "-t", "q5/#", "-C", "2", "-W", "5",
                              "-F", "%t %p"], capture_output=True, text=True, timeout=20)
        assert res.stdout.split("\n")[:2] == ["q5/a A", "q5/c C"], res
        assert server.counters()["mqtt5_expired"] == 1
    finally:
        stop_and_check([server])


# --- end to end: paho-mqtt's v5 and 3.1.1 clients, placed on chosen workers -------------------

WAIT = 10.0


class Client:
    """A paho-mqtt client (v5 or 3.1.1) on a socket placed on gw worker `worker`,
    recording (topic, payload, qos, retain, properties) of each message received."""

    def __init__(self, server: GwServer, worker: int, client_id: str, v5: bool = True):
        from broker_fixtures import _placed_client_class
        from conftest import start_paho_thread

        mqtt, placed = _placed_client_class()
        self.mqtt = mqtt
        self.messages: list = []
        self.cond = threading.Condition()
        self.connected = threading.Event()
        sock = place(server, worker)
        c = placed(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                   protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, reconnect_on_failure=False)
        c.presock = sock
        c.on_connect = lambda *a: self.connected.set()
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: self.connected.set()
        self.client = c
        c.connect(HOST, server.ports["mqtt"], 60)
        self.thread = start_paho_thread(c)
        assert self.connected.wait(WAIT), f"{client_id}: no CONNACK"

    def _on_message(self, client, userdata, m):
        with self.cond:
            self.messages.append((m.topic, bytes(m.payload), m.qos, bool(m.retain), m.properties))
            self.cond.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.connected.clear()
        self.client.subscribe(topic, qos)
        assert self.connected.wait(WAIT), "no SUBACK"

    def wait(self, count: int) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.messages) >= count, WAIT), self.messages
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def place(server: GwServer, worker: int):
    """A TCP connection held by worker `worker` (misplaced attempts reset unused)."""
    pids = server.worker_pids()
    for _ in range(60):
        sock = tcp_connect(server.ports["mqtt"])
        if server.which_worker(sock.getsockname()[1]) == pids[worker]:
            return sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    raise AssertionError(f"no connection placed on worker {worker}")


def props_of(mqtt, **kw):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    p = Properties(PacketTypes.PUBLISH)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


@pytest.fixture
def server(tmp_path):
    s = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt",)).start()
    yield s
    stop_and_check([s])


def test_properties_end_to_end_across_workers_and_versions(server):
    """A v5 publisher's properties reach a v5 subscriber on the other worker in
    order (User Properties with a repeated key too), the expiry as what
    remains; a 3.1.1 subscriber gets the same message without them; a 3.1.1
    publisher's message reaches the v5 subscriber with none."""
    pub = Client(server, 0, "p5-pub")
    sub5 = Client(server, 1, "p5-sub5")
    sub3 = Client(server, 1, "p5-sub3", v5=False)
    pub3 = Client(server, 0, "p5-pub3", v5=False)
    try:
        sub5.subscribe("e2e/#")
        sub3.subscribe("e2e/#")
        user = [("k", "v"), ("a", "b"), ("k", "v2")]
        for qos in (0, 1):
            props = props_of(pub.mqtt, PayloadFormatIndicator=1, ContentType="text/plain",
                             ResponseTopic="e2e/reply", CorrelationData=b"\x00\x01\x02",
                             UserProperty=user, MessageExpiryInterval=60)
            pub.client.publish(f"e2e/q{qos}", b"hello", qos, properties=props).wait_for_publish(WAIT)
        pub3.client.publish("e2e/from311", b"plain", 1).wait_for_publish(WAIT)
        got5 = sorted(sub5.wait(3), key=lambda m: m[0])
        got3 = sorted(sub3.wait(3), key=lambda m: m[0])
        assert [(t, p, q) for t, p, q, _r, _p in got3] == [("e2e/from311", b"plain", 1), ("e2e/q0", b"hello", 0),
                                                            ("e2e/q1", b"hello", 1)]
        for topic, payload, qos, retain, p in got5[1:]:
            assert payload == b"hello" and not retain
            assert p.PayloadFormatIndicator == 1 and p.ContentType == "text/plain"
            assert p.ResponseTopic == "e2e/reply" and p.CorrelationData == b"\x00\x01\x02"
            assert p.UserProperty == user
            assert 59 <= p.MessageExpiryInterval <= 60
        plain = got5[0][4]
        assert got5[0][:2] == ("e2e/from311", b"plain")
        assert not hasattr(plain, "UserProperty") and not hasattr(plain, "MessageExpiryInterval")
    finally:
        for c in (pub, sub5, sub3, pub3):
            c.close()


def test_retained_v5_message_keeps_properties_and_expires(server):
    pub = Client(server, 0, "r5-pub")
    try:
        keep = props_of(pub.mqtt, ContentType="application/json", UserProperty=[("x", "1")])
        pub.client.publish("r5/keep", b"{}", 1, retain=True, properties=keep).wait_for_publish(WAIT)
        short = props_of(pub.mqtt, MessageExpiryInterval=1)
        pub.client.publish("r5/short", b"s", 1, retain=True, properties=short).wait_for_publish(WAIT)
        time.sleep(2.2)
        sub = Client(server, 1, "r5-sub")
        try:
            sub.subscribe("r5/#")
            (topic, payload, qos, retain, p), = sub.wait(1)
            assert (topic, payload, retain) == ("r5/keep", b"{}", True)
            assert p.ContentType == "application/json" and p.UserProperty == [("x", "1")]
            time.sleep(0.3)
            assert len(sub.messages) == 1
        finally:
            sub.close()
        assert server.counters()["mqtt5_expired"] >= 1
    finally:
        pub.close()


def test_mosquitto_sub_v5_prints_the_properties(server):
    """mosquitto_pub -V 5 -D ... and mosquitto_sub -V 5 on different connections."""
    port = str(server.ports["mqtt"])
    proc = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-V", "5", "-t", "ms/#", "-C", "1",
                             "-W", "10", "-F", "%t %p %C %R %P"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-V", "5", "-t", "ms/a", "-m", "hi",
                        "-D", "publish", "content-type", "text/x", "-D", "publish", "response-topic", "ms/r",
                        "-D", "publish", "user-property", "u", "1"], check=True, timeout=10)
        out, _ = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert out.strip() == "ms/a hi text/x ms/r u:1"


# --- Topic Alias from clients (topic_alias_maximum) --------------------------------------------

def test_topic_aliases_from_a_client_set_used_and_refused(server):
    """CONNACK announces topic_alias_maximum; a PUBLISH with a topic and an
    alias sets it, one with an empty topic uses it (the subscriber on the other
    worker gets the full topic); an alias over the maximum is DISCONNECT 0x94,
    an alias never set is 0x82. Written whole and in 1-byte fragments."""
    sub = Client(server, 1, "ta-sub")
    try:
        sub.subscribe("ta/#", 1)
        pub = V5(server.ports["mqtt"])
        ack = pub.connect("ta-pub")
        assert ack.reason_code == 0 and ack.properties.topic_alias_maximum == 64
        pub.send(p5.Publish(topic="ta/long/topic", payload=b"1", qos=1, packet_id=1,
                            properties=p5.Properties(topic_alias=3, user_properties=(("n", "1"),))))
        assert pub.read_kind(p5.Puback).packet_id == 1
        data = ref.encode(p5.Publish(topic="", payload=b"2", qos=1, packet_id=2,
                                     properties=p5.Properties(topic_alias=3)))
        for i in range(len(data)):                      # in fragments
            pub.sock.sendall(data[i:i + 1])
            time.sleep(0.001)
        assert pub.read_kind(p5.Puback).packet_id == 2
        got = sub.wait(2)
        assert [(m[0], m[1]) for m in got] == [("ta/long/topic", b"1"), ("ta/long/topic", b"2")]
        assert got[0][4].UserProperty == [("n", "1")] and not hasattr(got[1][4], "TopicAlias")
        pub.send(p5.Publish(topic="ta/x", payload=b"3", properties=p5.Properties(topic_alias=65)))
        assert any(isinstance(p, p5.Disconnect) and p.reason_code == 0x94 for p in pub.closed())
        unset = V5(server.ports["mqtt"])
        assert unset.connect("ta-unset").reason_code == 0
        unset.send(p5.Publish(topic="", payload=b"4", properties=p5.Properties(topic_alias=5)))
        assert any(isinstance(p, p5.Disconnect) and p.reason_code == 0x82 for p in unset.closed())
        assert server.counters()["mqtt5_topic_alias_invalid"] == 2
        assert server.counters()["mqtt5_topic_aliases_set"] == 1
    finally:
        sub.close()


def test_a_v5_will_keeps_its_properties_and_its_expiry_counts_from_publication(server):
    """A will's properties (Content Type, User Properties, Message Expiry) go
    out with it to a v5 subscriber on the other worker; its Message Expiry
    Interval counts from when it is published, not from the CONNECT."""
    sub = Client(server, 1, "w5-sub")
    try:
        sub.subscribe("w5/#", 1)
        victim = V5(server.ports["mqtt"])
        ack = victim.connect("w5-victim", will_topic="w5/will", will_message=b"gone", will_qos=1,
                             will_properties=p5.Properties(content_type="text/plain", message_expiry_interval=30,
                                                           user_properties=(("why", "lost"),)))
        assert ack.reason_code == 0
        time.sleep(2.5)                                  # the expiry must not count this
        victim.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        victim.sock.close()                              # no DISCONNECT: the will goes out
        (topic, payload, qos, retain, p), = sub.wait(1)
        assert (topic, payload, qos) == ("w5/will", b"gone", 1)
        assert p.ContentType == "text/plain" and p.UserProperty == [("why", "lost")]
        assert 29 <= p.MessageExpiryInterval <= 30
    finally:
        sub.close()
