"""MQTT 5.0 connections on the broker: the CONNECT and its CONNACK, every later
packet read by the MQTT 5.0 codec, the answers in MQTT 5.0 (reason codes),
3.1.1 and 5.0 clients talking to each other, Session Expiry, the DISCONNECT
with a reason code wherever the server closes a v5 connection, and bad input
(whole and in fragments). Real `gw serve` processes (2 workers), raw sockets
with packets built by the reference codec (tests/mqtt5_ref.py), paho-mqtt's v5
client and mosquitto_pub/mosquitto_sub -V 5; where Mosquitto 2.0.11 does what
the standard says, the same test runs against it too."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

import mqtt5_ref as ref
from conftest import HOST, connect_packet, free_ports, get_counter, read_packet, send_fragmented, tcp_connect, wait_for
from gw import packets5 as p5

pytest.register_assert_rewrite("broker_fixtures")
from broker_fixtures import Mosquitto  # noqa: E402

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
WAIT = 10.0


# --- a raw MQTT 5.0 client ----------------------------------------------------------------

class V5:
    """A socket speaking MQTT 5.0 with packets made and read by the reference codec."""

    def __init__(self, port_or_sock):
        """A new connection to a loopback port, or a connected socket (TLS too)."""
        self.sock = tcp_connect(port_or_sock) if isinstance(port_or_sock, int) else port_or_sock
        if not hasattr(self.sock, "version"):       # an ssl.SSLSocket has its own
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.backlog: list = []

    def send(self, packet, fragmented: bool = False) -> None:
        data = packet if isinstance(packet, (bytes, bytearray)) else ref.encode(packet)
        if fragmented:
            send_fragmented(self.sock, data)
        else:
            self.sock.sendall(data)

    def read(self, timeout: float = WAIT):
        first, body = read_packet(self.sock, timeout)
        data = bytes([first]) + ref._varint(len(body)) + body
        packets, _ = ref.decode(data)
        return packets[0]

    def read_kind(self, kind, timeout: float = WAIT):
        """The next packet of that class; PUBLISHes met meanwhile are kept in backlog."""
        deadline = time.monotonic() + timeout
        while True:
            pkt = self.read(max(0.1, deadline - time.monotonic()))
            if isinstance(pkt, kind):
                return pkt
            self.backlog.append(pkt)

    def connect(self, client_id: str = "", **kw) -> p5.Connack:
        self.send(p5.Connect(client_id=client_id, **kw))
        return self.read_kind(p5.Connack)

    def closed(self, timeout: float = WAIT) -> list:
        """Reads until the server closes; the packets that came before."""
        got = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "connection still open"
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:         # reset, or a TLS socket's close
                break
            if not chunk:
                break
            got += chunk
        packets, _ = ref.decode(bytes(got))
        return packets

    def close(self) -> None:
        self.sock.close()


def connected(port: int, client_id: str = "", **kw) -> V5:
    c = V5(port)
    ack = c.connect(client_id, **kw)
    assert ack.reason_code == 0, ack
    return c


def subscribe(c: V5, flt: str, qos: int = 0, pid: int = 1) -> list[int]:
    c.send(p5.Subscribe(packet_id=pid, topics=[(flt, qos)]))
    ack = c.read_kind(p5.Suback)
    assert ack.packet_id == pid
    return ack.reason_codes


def publishes(c: V5, n: int, timeout: float = WAIT) -> list:
    deadline = time.monotonic() + timeout
    while sum(isinstance(p, p5.Publish) for p in c.backlog) < n:
        c.backlog.append(c.read(max(0.1, deadline - time.monotonic())))
    got = [p for p in c.backlog if isinstance(p, p5.Publish)]
    c.backlog = [p for p in c.backlog if not isinstance(p, p5.Publish)]
    return got


# --- servers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gw(gw_module_factory):
    return gw_module_factory(workers=2, listeners=("mqtt",), args=["--max-packet-size", "65536"])


@pytest.fixture(scope="module")
def mosq(tmp_path_factory):
    m = Mosquitto(tmp_path_factory.mktemp("mosq")).start()
    yield m
    m.stop()


@pytest.fixture(params=["mosquitto", "gw"])
def port(request, gw, mosq):
    """Both brokers, for what Mosquitto 2.0.11 does as the standard says."""
    return mosq.port if request.param == "mosquitto" else gw.ports["mqtt"]


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


# --- CONNECT, CONNACK ---------------------------------------------------------------------

def test_connack_v5_announces_what_the_server_supports(gw):
    c = V5(gw.ports["mqtt"])
    ack = c.connect(unique("props"))
    assert ack.reason_code == 0 and not ack.session_present
    pr = ack.properties
    assert pr.maximum_packet_size == 65536
    assert pr.subscription_identifier_available is None     # absent: available (tests/test_mqtt5_subscriptions.py)
    assert pr.shared_subscription_available is None   # absent: available (shared subscriptions)
    assert pr.topic_alias_maximum == 64           # topic_alias_maximum
    assert pr.receive_maximum == 1000              # max_awaiting_rel
    assert pr.assigned_client_identifier is None
    c.send(p5.Pingreq()) if hasattr(p5, "Pingreq") else c.send(b"\xc0\x00")
    assert isinstance(c.read(), p5.Pingresp)
    c.close()


def test_empty_client_id_is_assigned(port):
    """MQTT-3.1.3-6/-7: an empty id gets one, named in the CONNACK; both brokers."""
    c = V5(port)
    ack = c.connect("", clean_start=True)
    assert ack.reason_code == 0
    assert ack.properties.assigned_client_identifier
    c.close()


def test_authentication_method_refused_with_0x8c(gw):
    c = V5(gw.ports["mqtt"])
    ack = c.connect(unique("am"), properties=p5.Properties(authentication_method="SCRAM-SHA-1"))
    assert ack.reason_code == 0x8C
    c.closed()


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
def test_malformed_connect_refused_in_connack(gw, fragmented, frag_rng):
    """A CONNECT with a property not allowed there: CONNACK 0x81 (MQTT-3.1.4-1,
    3.2.2.2 lets the server say so), closed."""
    good = ref.encode(p5.Connect(client_id="bad-props"))
    # A Topic Alias (0x23) is not a CONNECT property: splice one into the block.
    body_at = 2
    props_at = body_at + 10
    assert good[props_at] == 0
    bad = bytearray(good[:props_at]) + bytes([3, 0x23, 0, 1]) + good[props_at + 1:]
    bad[1] += 3
    c = V5(gw.ports["mqtt"])
    if fragmented:
        send_fragmented(c.sock, bytes(bad), frag_rng)
    else:
        c.send(bytes(bad))
    got = c.closed()
    assert [type(p) for p in got] == [p5.Connack] and got[0].reason_code == 0x81


# --- mixed versions ------------------------------------------------------------------------

def paho_v5(port, client_id, messages, protocol):
    import paho.mqtt.client as mqtt
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    c.on_message = lambda cl, ud, m: messages.append((m.topic, m.payload, m.qos))
    c.connect(HOST, port)
    c.loop_start()
    wait_for(c.is_connected, WAIT, what="paho connected")
    return c


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_v5_and_311_clients_exchange_messages(port, qos):
    """A 3.1.1 and a v5 subscriber both get what a 3.1.1 and a v5 publisher send."""
    import paho.mqtt.client as mqtt
    topic = unique("mixed")
    got5, got3 = [], []
    sub5 = paho_v5(port, unique("s5"), got5, mqtt.MQTTv5)
    sub3 = paho_v5(port, unique("s3"), got3, mqtt.MQTTv311)
    pub5 = paho_v5(port, unique("p5"), [], mqtt.MQTTv5)
    pub3 = paho_v5(port, unique("p3"), [], mqtt.MQTTv311)
    try:
        for s in (sub5, sub3):
            r = s.subscribe(topic + "/#", qos)
            assert r[0] == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.5)
        props = mqtt.Properties(mqtt.PacketTypes.PUBLISH)
        props.UserProperty = [("k", "v")]
        infos = [pub5.publish(topic + "/5", b"from5", qos, properties=props),
                 pub3.publish(topic + "/3", b"from3", qos)]
        for i in infos:
            i.wait_for_publish(WAIT)
        wait_for(lambda: len(got5) >= 2 and len(got3) >= 2, WAIT, what="both messages at both subscribers")
        time.sleep(0.3)
        for got in (got5, got3):
            assert sorted(got) == sorted([(topic + "/5", b"from5", qos), (topic + "/3", b"from3", qos)])
    finally:
        for c in (sub5, sub3, pub5, pub3):
            c.loop_stop()
            c.disconnect()


@pytest.mark.skipif(not (MOSQUITTO_PUB and MOSQUITTO_SUB), reason="mosquitto-clients not installed")
def test_mosquitto_clients_v5(gw):
    port = str(gw.ports["mqtt"])
    topic = unique("mosq")
    sub = subprocess.Popen([MOSQUITTO_SUB, "-V", "5", "-h", HOST, "-p", port, "-t", topic, "-q", "1",
                            "-C", "2", "-W", "20", "-v"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        for v in ("5", "311"):
            r = subprocess.run([MOSQUITTO_PUB, "-V", v, "-h", HOST, "-p", port, "-t", topic, "-q", "1",
                                "-m", f"hello-{v}", "-D", "publish", "user-property", "a", "b"] if v == "5" else
                               [MOSQUITTO_PUB, "-V", v, "-h", HOST, "-p", port, "-t", topic, "-q", "1",
                                "-m", f"hello-{v}"],
                               capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, r.stderr
        out, err = sub.communicate(timeout=30)
        assert sub.returncode == 0, err
        assert out.splitlines() == [f"{topic} hello-5", f"{topic} hello-311"]
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()


def test_v5_acks_and_unsuback_codes(port):
    """QoS 1 and 2 flows with v5 acknowledgements; UNSUBACK 0x00 and 0x11."""
    topic = unique("acks")
    c = connected(port, unique("acks"))
    assert subscribe(c, topic, 2) == [2]
    c.send(p5.Publish(topic=topic, payload=b"one", qos=1, packet_id=7))
    c.send(p5.Publish(topic=topic, payload=b"two", qos=2, packet_id=8))
    ack = c.read_kind(p5.Puback)
    assert ack.packet_id == 7 and ack.reason_code in (0, 0x10)
    rec = c.read_kind(p5.Pubrec)
    assert rec.packet_id == 8 and rec.reason_code in (0, 0x10)
    c.send(p5.Pubrel(packet_id=8))
    assert c.read_kind(p5.Pubcomp).packet_id == 8
    msgs = publishes(c, 2)
    assert sorted(m.payload for m in msgs) == [b"one", b"two"]
    for m in msgs:
        if m.qos == 1:
            c.send(p5.Puback(packet_id=m.packet_id))
        else:
            c.send(p5.Pubrec(packet_id=m.packet_id))
            assert c.read_kind(p5.Pubrel).packet_id == m.packet_id
            c.send(p5.Pubcomp(packet_id=m.packet_id))
    c.send(p5.Unsubscribe(packet_id=9, topics=[topic, topic + "/none"]))
    un = c.read_kind(p5.Unsuback)
    assert un.packet_id == 9 and un.reason_codes == [0, 0x11]
    c.send(p5.Disconnect())
    assert c.closed() == []


# --- sessions ------------------------------------------------------------------------------

def test_session_expiry_keeps_the_session(port):
    cid, topic = unique("keep"), unique("keep-t")
    c = V5(port)
    ack = c.connect(cid, clean_start=True, properties=p5.Properties(session_expiry_interval=60))
    assert ack.reason_code == 0 and not ack.session_present
    assert subscribe(c, topic, 1) == [1]
    c.send(p5.Disconnect())
    c.closed()
    pub = connected(port, unique("pub"))
    pub.send(p5.Publish(topic=topic, payload=b"while away", qos=1, packet_id=1))
    pub.read_kind(p5.Puback)
    c = V5(port)
    ack = c.connect(cid, clean_start=False, properties=p5.Properties(session_expiry_interval=60))
    assert ack.session_present
    assert [m.payload for m in publishes(c, 1)] == [b"while away"]
    # Clean Start: the session goes.
    c.close()
    c = V5(port)
    time.sleep(0.3)
    ack = c.connect(cid, clean_start=True)
    assert not ack.session_present
    c.close()


def test_session_expiry_zero_ends_the_session(port):
    cid = unique("zero")
    c = connected(port, cid, clean_start=False)
    subscribe(c, unique("z"), 1)
    c.send(p5.Disconnect())
    c.closed()
    c = V5(port)
    ack = c.connect(cid, clean_start=False)
    assert ack.reason_code == 0 and not ack.session_present
    c.close()


def test_session_expiry_interval_elapses(gw):
    cid = unique("short")
    c = connected(gw.ports["mqtt"], cid, clean_start=False, properties=p5.Properties(session_expiry_interval=1))
    subscribe(c, unique("s"), 1)
    c.send(p5.Disconnect())
    c.closed()
    time.sleep(3.5)     # the expiry is checked once a second
    c = V5(gw.ports["mqtt"])
    assert not c.connect(cid, clean_start=False, properties=p5.Properties(session_expiry_interval=1)).session_present
    c.close()


def test_session_expiry_set_at_disconnect(gw):
    """A session whose CONNECT said 60 s and whose DISCONNECT says 0 ends."""
    cid = unique("dis0")
    c = connected(gw.ports["mqtt"], cid, properties=p5.Properties(session_expiry_interval=60))
    subscribe(c, unique("d"), 1)
    c.send(p5.Disconnect(properties=p5.Properties(session_expiry_interval=0)))
    c.closed()
    c = V5(gw.ports["mqtt"])
    assert not c.connect(cid, clean_start=False).session_present
    c.close()


def test_session_expiry_from_zero_at_disconnect_is_a_protocol_error(port):
    """MQTT-3.14.2-2: 0 in the CONNECT, non-zero in the DISCONNECT: Protocol
    Error. Mosquitto 2.0.11 answers DISCONNECT 0x82 too."""
    c = connected(port, unique("from0"))
    c.send(p5.Disconnect(properties=p5.Properties(session_expiry_interval=30)))
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, 0x82)]


def test_takeover_answered_with_0x8e(gw):
    """MQTT-3.1.4-3: the existing client gets DISCONNECT 0x8E. (Mosquitto
    2.0.11 closes it without one: gw only.)"""
    port = gw.ports["mqtt"]
    workers = set()
    for _ in range(6):      # 2 workers: the old and new connection on one worker and on two
        cid = unique("take")
        old = connected(port, cid)
        old_worker = gw.which_worker(old.sock.getsockname()[1])
        new = connected(port, cid)
        got = old.closed()
        workers.add((old_worker, gw.which_worker(new.sock.getsockname()[1])))
        assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, 0x8E)]
        assert got[0].properties.reason_string
        new.send(b"\xc0\x00")
        assert isinstance(new.read(), p5.Pingresp)
        new.close()
    print("placements (old worker, new worker):", workers)


def test_keepalive_timeout_answered_with_0x8d(gw):
    c = connected(gw.ports["mqtt"], unique("ka"), keepalive=1)
    got = c.closed(timeout=6)
    assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, 0x8D)]


def test_packet_too_large_answered_with_0x95(gw):
    c = connected(gw.ports["mqtt"], unique("big"))
    c.send(p5.Publish(topic="big", payload=b"x" * 70000, qos=0))
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, 0x95)]


# --- bad input after the CONNACK ----------------------------------------------------------

def _pub_with_props(props: bytes, topic: bytes = b"t", qos: int = 0) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00\x01" if qos else b"") + ref._varint(len(props)) + props
    return bytes([0x30 | (qos << 1)]) + ref._varint(len(body)) + body


BAD = {
    # name: (bytes after CONNACK, expected reason code)
    "second_connect": (ref.encode(p5.Connect(client_id="again")), 0x82),
    "pingresp_from_client": (b"\xd0\x00", 0x82),
    "auth_without_method": (b"\xf0\x00", 0x82),
    "reserved_type_0": (b"\x00\x00", 0x81),
    "publish_qos3": (b"\x36\x04\x00\x01t\x00", 0x81),
    "publish_bad_utf8": (b"\x30\x05\x00\x02\xc3\x28\x00", 0x81),
    "publish_props_past_end": (_pub_with_props(b"\x01"), 0x81),
    "publish_unknown_property": (_pub_with_props(b"\x7f\x00"), 0x81),
    "publish_duplicate_property": (_pub_with_props(b"\x01\x00\x01\x01"), 0x82),
    "publish_subscription_id": (_pub_with_props(b"\x0b\x01"), 0x82),
    "publish_topic_alias_0": (_pub_with_props(b"\x23\x00\x00"), 0x82),
    "publish_topic_alias_unannounced": (_pub_with_props(b"\x23\x00\x41"), 0x94),    # over topic_alias_maximum
    "subscribe_reserved_options": (b"\x82\x07\x00\x01\x00\x00\x01t\xc0", 0x81),
    "subscribe_no_filter": (b"\x82\x03\x00\x01\x00", 0x82),
    "subscribe_retain_handling_3": (b"\x82\x07\x00\x01\x00\x00\x01t\x30", 0x82),
    "puback_bad_reason": (b"\x40\x03\x00\x01\x05", 0x82),
    "pubrel_bad_flags": (b"\x60\x02\x00\x01", 0x81),
    "disconnect_bad_reason": (b"\xe0\x01\x03", 0x82),
    "remaining_length_not_minimal": (b"\xc0\x80\x00", 0x81),
}


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
def test_bad_packet_answered_with_disconnect(gw, name, fragmented, frag_rng):
    data, code = BAD[name]
    before = gw.counters()
    c = connected(gw.ports["mqtt"], unique("bad"))
    if fragmented:
        send_fragmented(c.sock, data, frag_rng)
    else:
        c.send(data)
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, code)]
    after = gw.counters()
    counter = "mqtt5_malformed" if code == 0x81 else "mqtt5_protocol_errors"
    assert get_counter(after, counter) > get_counter(before, counter)
    # The worker lives on: a new client gets in.
    connected(gw.ports["mqtt"], unique("after")).close()


@pytest.mark.parametrize("name", ["publish_qos3", "second_connect", "subscribe_reserved_options",
                                  "disconnect_bad_reason"])
def test_bad_packet_mosquitto_agrees(mosq, name):
    """Mosquitto 2.0.11 closes on the same packets (its DISCONNECT's reason code
    is its own, 2.0.11 sends none for some)."""
    data, code = BAD[name]
    c = connected(mosq.port, unique("bad"))
    c.send(data)
    got = c.closed()
    assert all(isinstance(p, p5.Disconnect) for p in got)


# --- authentication, the ACL ------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(gw_module_factory, tmp_path_factory):
    d = tmp_path_factory.mktemp("sec")
    pw = d / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "alice", "s3cret"], check=True,
                   capture_output=True, timeout=30)
    acl = d / "acl"
    acl.write_text("user alice\ntopic readwrite open/#\ntopic read ro/#\n")
    return gw_module_factory(workers=2, listeners=("mqtt",),
                             args=["--password-file", str(pw), "--acl-file", str(acl),
                                   "--allow-anonymous", "false"])


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd not installed")
def test_bad_password_is_0x86_anonymous_0x87(secured):
    port = secured.ports["mqtt"]
    c = V5(port)
    assert c.connect(unique("pw"), username="alice", password=b"wrong").reason_code == 0x86
    c.closed()
    c = V5(port)
    assert c.connect(unique("anon")).reason_code == 0x87
    c.closed()


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd not installed")
def test_acl_denials_in_v5_reason_codes(secured):
    port = secured.ports["mqtt"]
    c = connected(port, unique("alice"), username="alice", password=b"s3cret")
    c.send(p5.Subscribe(packet_id=1, topics=[("open/#", 1), ("secret/#", 1), ("ro/x", 1)]))
    assert c.read_kind(p5.Suback).reason_codes == [1, 0x87, 1]
    c.send(p5.Publish(topic="ro/x", payload=b"no", qos=1, packet_id=2))
    ack = c.read_kind(p5.Puback)
    assert (ack.packet_id, ack.reason_code) == (2, 0x87)
    c.send(p5.Publish(topic="ro/x", payload=b"no", qos=2, packet_id=3))
    rec = c.read_kind(p5.Pubrec)
    assert (rec.packet_id, rec.reason_code) == (3, 0x87)
    c.send(p5.Publish(topic="open/x", payload=b"yes", qos=1, packet_id=4))
    ack = c.read_kind(p5.Puback)
    assert (ack.packet_id, ack.reason_code) == (4, 0)
    assert [m.payload for m in publishes(c, 1)] == [b"yes"]
    c.close()


def test_shared_subscription_v5_members_each_message_once_with_its_properties(gw):
    """$share/{name}/{filter} for MQTT 5.0 clients: each message to one member,
    its properties with it (a member on the other worker gets them through
    the shared-delivery frame)."""
    members = [connected(gw.ports["mqtt"], unique(f"share-{i}")) for i in range(2)]
    for m in members:
        assert subscribe(m, "$share/g5/v5/shared", 1) == [1]
    pub = connected(gw.ports["mqtt"], unique("share-pub"))
    n = 20
    for i in range(n):
        pub.send(p5.Publish(topic="v5/shared", payload=b"%d" % i, qos=1, packet_id=i + 1,
                            properties=p5.Properties(user_properties=(("k", str(i)),))))
        assert pub.read_kind(p5.Puback).packet_id == i + 1
    got = []
    deadline = time.monotonic() + WAIT
    while len(got) < n and time.monotonic() < deadline:
        for m in members:
            try:
                pkt = m.read(0.2)
            except (socket.timeout, TimeoutError):
                continue
            if isinstance(pkt, p5.Publish):
                got.append(pkt)
    assert sorted(int(p.payload) for p in got) == list(range(n))       # each once, none lost
    assert all(p.properties.user_properties == (("k", p.payload.decode()),) for p in got)


# --- the server going away -------------------------------------------------------------------

def test_drain_answered_with_0x8b(gw_factory):
    server = gw_factory(workers=1, listeners=("mqtt",))
    c = connected(server.ports["mqtt"], unique("drain"))
    server.signal(signal.SIGTERM)
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, 0x8B)]
    server.wait_exit(20)


def test_stats_name_the_mqtt5_counters(gw):
    """`gw stats --json` groups the DISCONNECTs by code and the refused packets by
    rule, their names as gw/packets5.py's."""
    from gw.stats import R5_NAMES
    assert R5_NAMES == tuple(p5.REASONS[r][0] for r in range(1, 20))
    c = connected(gw.ports["mqtt"], unique("stats"))
    c.send(b"\x36\x04\x00\x01t\x00")       # QoS 3: R5_QOS
    c.closed()
    def seen():
        s = gw.stats()["counters"]
        return s if s["mqtt5_bad_packets"]["qos"] >= 1 and s["mqtt5_disconnects"]["malformed"] >= 1 else None
    wait_for(seen, WAIT, what="the counters")


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd not installed")
@pytest.mark.parametrize("problem", [None, 1, 0])
def test_reason_string_honours_request_problem_information(secured, problem):
    """A refused publish's PUBACK says why in a Reason String, unless the client
    set Request Problem Information to 0 (MQTT-3.1.2-29); a DISCONNECT may carry
    one either way."""
    port = secured.ports["mqtt"]
    c = connected(port, unique("rp"), username="alice", password=b"s3cret",
                  properties=p5.Properties(request_problem_information=problem))
    c.send(p5.Publish(topic="ro/x", payload=b"no", qos=1, packet_id=2))
    ack = c.read_kind(p5.Puback)
    assert ack.reason_code == 0x87
    if problem == 0:
        assert ack.properties.reason_string is None
    else:
        assert ack.properties.reason_string
    c.send(p5.Disconnect(properties=p5.Properties(session_expiry_interval=5)))   # 0 -> 5: 0x82
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, 0x82)]
    assert got[0].properties.reason_string == "protocol error"


def test_reason_string_left_out_past_the_clients_maximum_packet_size(gw):
    c = connected(gw.ports["mqtt"], unique("mps"), properties=p5.Properties(maximum_packet_size=16))
    c.send(p5.Disconnect(properties=p5.Properties(session_expiry_interval=5)))
    got = c.closed()
    assert [(type(p), p.reason_code, p.properties.reason_string) for p in got] == [(p5.Disconnect, 0x82, None)]


def test_disconnect_with_will_message_publishes_the_will(port):
    """Reason code 0x04: the will goes out (section 3.14.2.1); 0x00 discards it."""
    topic = unique("will")
    sub = connected(port, unique("wsub"))
    subscribe(sub, topic + "/#", 1)
    for code, name in ((0x04, "sent"), (0x00, "discarded")):
        c = connected(port, unique("w"), will_topic=f"{topic}/{name}", will_message=name.encode(), will_qos=1)
        c.send(p5.Disconnect(reason_code=code))
        c.closed()
    sub.send(p5.Publish(topic=topic + "/end", payload=b"end", qos=1, packet_id=1))
    got = []
    while not got or got[-1].payload != b"end":
        got += publishes(sub, 1)
    assert [m.payload for m in got] == [b"sent", b"end"]


def test_v5_over_websocket_meets_v311_over_tcp(gw_factory):
    """paho's v5 client over the ws listener and a 3.1.1 one over TCP, on a
    server of 2 workers: each gets the other's messages."""
    import paho.mqtt.client as mqtt
    server = gw_factory(workers=2, listeners=("mqtt", "ws"))
    topic = unique("ws5")
    got_ws, got_tcp = [], []
    ws = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique("ws"), protocol=mqtt.MQTTv5,
                     transport="websockets")
    ws.ws_set_options(path="/mqtt")
    ws.on_message = lambda cl, ud, m: got_ws.append(m.payload)
    ws.connect(HOST, server.ports["ws"])
    ws.loop_start()
    tcp = paho_v5(server.ports["mqtt"], unique("tcp"), got_tcp, mqtt.MQTTv311)
    try:
        wait_for(ws.is_connected, WAIT, what="ws connected")
        for c in (ws, tcp):
            c.subscribe(topic, 1)
        time.sleep(0.5)
        ws.publish(topic, b"from-ws", 1).wait_for_publish(WAIT)
        tcp.publish(topic, b"from-tcp", 1).wait_for_publish(WAIT)
        wait_for(lambda: len(got_ws) >= 2 and len(got_tcp) >= 2, WAIT, what="both ways")
        assert sorted(got_ws) == sorted(p for _t, p, _q in got_tcp) == [b"from-tcp", b"from-ws"]
    finally:
        for c in (ws, tcp):
            c.loop_stop()
            c.disconnect()
