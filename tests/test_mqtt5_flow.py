"""MQTT 5.0 flow from the server to a client: the client's CONNECT decides
what the server may send it.

- Receive Maximum: at most that many QoS 1/2 PUBLISHes unacknowledged
  (the window is min(Receive Maximum, max_inflight)); the rest wait in the
  session's queue, none dropped; a resumed session sends again only what
  the new connection's window takes, the rest as acknowledgements come.
- Maximum Packet Size: a PUBLISH larger (with the properties the server
  would send) is not sent to that client, counted (mqtt5_too_large_dropped),
  and for QoS 1/2 does not stay in the window; other subscribers get it.
- Topic Alias Maximum: the server gives aliases to the first topics it sends
  (up to min(the client's maximum, topic_alias_maximum_out)): the topic and the
  alias first, then an empty topic and the alias; aliases are the network
  connection's, so a resumed session's PUBLISHes sent again start afresh.
- Topic aliases from a client are checked against the maximum its own
  CONNACK announced, whatever a reload sets later.

Real server (`gw serve`, 2 workers: publisher and subscriber on different
workers), raw MQTT 5.0 sockets (tests/mqtt5_ref.py) where the wire itself is
checked or acknowledgements are withheld, paho-mqtt's v5 client beside them
(neither paho-mqtt nor libmosquitto 2.0 resolves aliases a server sends: the
aliases are checked on the wire). Under GW_TEST_FRAGMENT=1 every byte stream
goes through the fragmenting proxy (conftest.GwServer)."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

import mqtt5_ref as ref
from test_mqtt5_connections import V5  # first: it registers broker_fixtures for assertion rewriting
from test_mqtt5_messages import Client, place

from conftest import GwServer, stop_and_check, wait_for  # noqa: I001
from gw import packets5 as p5

QUIET = 0.6         # seconds in which nothing more must arrive


@pytest.fixture
def server(tmp_path):
    s = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt",)).start()
    yield s
    stop_and_check([s])


def v5_on(server: GwServer, worker: int) -> V5:
    """A raw MQTT 5.0 client on a socket held by worker `worker`."""
    c = V5.__new__(V5)
    c.sock = place(server, worker)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.backlog = []
    return c


def connect(c: V5, client_id: str, clean_start: bool = True, **props) -> p5.Connack:
    ack = c.connect(client_id, clean_start=clean_start, properties=p5.Properties(**props))
    assert ack.reason_code == 0, ack
    return ack


def subscribe(c: V5, flt: str, qos: int, pid: int = 1) -> None:
    c.send(p5.Subscribe(packet_id=pid, topics=[(flt, qos)]))
    ack = c.read_kind(p5.Suback)
    assert ack.reason_codes == [qos], ack


def take(c: V5, n: int, timeout: float = 10.0) -> list[p5.Publish]:
    """The next n PUBLISHes (kept in backlog order)."""
    deadline = time.monotonic() + timeout
    while sum(isinstance(p, p5.Publish) for p in c.backlog) < n:
        c.backlog.append(c.read(max(0.1, deadline - time.monotonic())))
    got, rest = [], []
    for p in c.backlog:
        (got if isinstance(p, p5.Publish) and len(got) < n else rest).append(p)
    c.backlog = rest
    return got


def nothing_more(c: V5, quiet: float = QUIET) -> None:
    """No PUBLISH arrives within `quiet` seconds."""
    try:
        extra = c.read(quiet)
    except (TimeoutError, socket.timeout, AssertionError):
        return
    raise AssertionError(f"unexpected packet {extra}")


def publish_qos1(pub: V5, topic: str, payloads, first_pid: int = 1, **props) -> None:
    for i, payload in enumerate(payloads):
        pub.send(p5.Publish(topic=topic, payload=payload, qos=1, packet_id=first_pid + i,
                            properties=p5.Properties(**props)))
        assert pub.read_kind(p5.Puback).packet_id == first_pid + i


class PahoV5(Client):
    """test_mqtt5_messages.Client (paho-mqtt v5 on a chosen worker) with CONNECT
    properties (paho's names: ReceiveMaximum, MaximumPacketSize, ...)."""

    def __init__(self, server: GwServer, worker: int, client_id: str, **props):
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from broker_fixtures import _placed_client_class
        from conftest import HOST, start_paho_thread

        mqtt, placed = _placed_client_class()
        self.mqtt = mqtt
        self.messages = []
        self.cond = threading.Condition()
        self.connected = threading.Event()
        c = placed(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                   reconnect_on_failure=False)
        c.presock = place(server, worker)
        c.on_connect = lambda *a: self.connected.set()
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: self.connected.set()
        self.client = c
        cp = Properties(PacketTypes.CONNECT)
        for k, v in props.items():
            setattr(cp, k, v)
        c.connect(HOST, server.ports["mqtt"], 60, properties=cp)
        self.thread = start_paho_thread(c)
        assert self.connected.wait(10), f"{client_id}: no CONNACK"


def counter(server: GwServer, name: str) -> int:
    return server.counters()[name]


# --- Receive Maximum -----------------------------------------------------------------------------

def test_receive_maximum_caps_what_is_in_flight_and_the_rest_waits(server):
    """A subscriber saying Receive Maximum 3 gets 3 QoS 1 PUBLISHes while it
    withholds its PUBACKs, one more for each PUBACK, then all of the 10 in
    order: none dropped. The publisher is on the other worker."""
    sub = v5_on(server, 1)
    connect(sub, "rm-sub", receive_maximum=3)
    subscribe(sub, "rm/#", 1)
    pub = v5_on(server, 0)
    connect(pub, "rm-pub")
    publish_qos1(pub, "rm/t", [b"%d" % i for i in range(10)])
    window = take(sub, 3)
    assert [p.payload for p in window] == [b"0", b"1", b"2"]
    nothing_more(sub)
    assert counter(server, "mqtt5_receive_max_held") >= 1
    seen = list(window)
    while len(seen) < 10:
        sub.send(p5.Puback(packet_id=window.pop(0).packet_id))
        (n,) = take(sub, 1)                 # one more for each PUBACK...
        seen.append(n)
        window.append(n)
        if len(seen) == 4:
            nothing_more(sub)               # ...and only one
    assert [p.payload for p in seen] == [b"%d" % i for i in range(10)]
    assert len({p.packet_id for p in window}) == 3
    for p in window:
        sub.send(p5.Puback(packet_id=p.packet_id))
    nothing_more(sub)
    sub.close()
    pub.close()


def test_receive_maximum_of_a_resumed_session_holds_what_was_in_flight(server):
    """A persistent session with 6 QoS 1 messages in flight (Receive Maximum
    10, none acknowledged) comes back with Receive Maximum 2: 2 are sent again
    (DUP), and each PUBACK lets one more go, the held ones first (in order),
    then the queue; QoS 2 flows through the same window."""
    sub = v5_on(server, 1)
    connect(sub, "rr-sub", receive_maximum=10, session_expiry_interval=300)
    subscribe(sub, "rr/#", 2)
    pub = v5_on(server, 0)
    connect(pub, "rr-pub")
    publish_qos1(pub, "rr/t", [b"%d" % i for i in range(6)])
    before = take(sub, 6)
    assert [p.payload for p in before] == [b"%d" % i for i in range(6)]
    sub.close()
    wait_for(lambda: counter(server, "sessions_away") == 1, 10, what="the session to be away")
    pub.send(p5.Publish(topic="rr/t", payload=b"q", qos=2, packet_id=50))
    assert pub.read_kind(p5.Pubrec).packet_id == 50
    pub.send(p5.Pubrel(packet_id=50))
    assert pub.read_kind(p5.Pubcomp).packet_id == 50

    back = v5_on(server, 1)
    ack = connect(back, "rr-sub", clean_start=False, receive_maximum=2, session_expiry_interval=300)
    assert ack.session_present
    got = take(back, 2)
    assert [(p.payload, p.dup) for p in got] == [(b"0", True), (b"1", True)]
    nothing_more(back)
    seen = list(got)
    window = list(got)
    while len(seen) < 7:
        p = window.pop(0)
        back.send(p5.Puback(packet_id=p.packet_id) if p.qos == 1 else p5.Pubrec(packet_id=p.packet_id))
        if p.qos == 2:
            assert back.read_kind(p5.Pubrel).packet_id == p.packet_id
            back.send(p5.Pubcomp(packet_id=p.packet_id))
        (n,) = take(back, 1)
        seen.append(n)
        window.append(n)
        assert len(window) == 2
    assert [p.payload for p in seen] == [b"0", b"1", b"2", b"3", b"4", b"5", b"q"]
    assert all(p.dup for p in seen[:6]) and not seen[6].dup and seen[6].qos == 2
    back.close()
    pub.close()


def test_receive_maximum_with_paho(server):
    """paho-mqtt's v5 client with ReceiveMaximum 1 on the other worker gets all
    of 20 QoS 1 messages, in order."""
    sub = PahoV5(server, 1, "rm-paho", ReceiveMaximum=1)
    try:
        sub.subscribe("rp/#", 1)
        pub = v5_on(server, 0)
        connect(pub, "rp-pub")
        publish_qos1(pub, "rp/t", [b"%d" % i for i in range(20)])
        got = sub.wait(20)
        assert [m[1] for m in got] == [b"%d" % i for i in range(20)]
        pub.close()
    finally:
        sub.close()


# --- Maximum Packet Size -------------------------------------------------------------------------

def test_a_publish_too_large_for_a_client_is_not_sent_to_it(server):
    """A subscriber with Maximum Packet Size 120 (and Receive Maximum 1, so a
    QoS 1 message left in the window would block all after it) does not get
    the PUBLISHes that would exceed it, QoS 0 or 1, counted; it gets the next
    ones; a subscriber without a limit gets all. The size counts the
    properties the server sends (User Properties here)."""
    small = v5_on(server, 1)
    connect(small, "mp-small", maximum_packet_size=120, receive_maximum=1)
    subscribe(small, "mp/#", 1)
    big = v5_on(server, 1)
    connect(big, "mp-big")
    subscribe(big, "mp/#", 1)
    pub = v5_on(server, 0)
    connect(pub, "mp-pub")
    before = counter(server, "mqtt5_too_large_dropped")
    pub.send(p5.Publish(topic="mp/a", payload=b"s0", qos=0))
    pub.send(p5.Publish(topic="mp/a", payload=b"L" * 200, qos=0))
    publish_qos1(pub, "mp/a", [b"L" * 200], first_pid=1)
    # The payload fits, the user property would not: the whole PUBLISH counts.
    publish_qos1(pub, "mp/a", [b"x"], first_pid=2, user_properties=(("k", "v" * 150),))
    publish_qos1(pub, "mp/a", [b"s1"], first_pid=3)
    got = take(small, 2)
    assert [(p.payload, p.qos) for p in got] == [(b"s0", 0), (b"s1", 1)]
    small.send(p5.Puback(packet_id=got[1].packet_id))
    nothing_more(small)
    allgot = take(big, 5)
    assert [p.payload for p in allgot] == [b"s0", b"L" * 200, b"L" * 200, b"x", b"s1"]
    assert counter(server, "mqtt5_too_large_dropped") - before == 3
    for c in (small, big, pub):
        c.close()


def test_a_publish_without_properties_is_sized_to_the_byte(server):
    """A message with nothing to carry (its publisher sent a Topic Alias and
    no other property) goes to an MQTT 5.0 subscriber as the 3.1.1 PUBLISH
    plus a Property Length of 0: for the 4-byte topic, 21 bytes with a
    10-byte payload at QoS 1, 19 at QoS 0. A Maximum Packet Size of exactly
    the PUBLISH's size takes it, one byte less does not (counted), whether the
    publisher gave the topic or the alias alone, QoS 0 or 1."""
    exact = v5_on(server, 1)
    connect(exact, "mb-exact", maximum_packet_size=21)
    subscribe(exact, "mb/#", 1)
    short = v5_on(server, 1)
    connect(short, "mb-short", maximum_packet_size=20)
    subscribe(short, "mb/#", 1)
    pub = v5_on(server, 0)
    connect(pub, "mb-pub")
    before = counter(server, "mqtt5_too_large_dropped")
    alias = p5.Properties(topic_alias=1)
    pub.send(p5.Publish(topic="mb/t", payload=b"A" * 10, qos=1, packet_id=1, properties=alias))    # 21
    assert pub.read_kind(p5.Puback).packet_id == 1
    pub.send(p5.Publish(topic="", payload=b"B" * 10, qos=0, properties=alias))                     # 19
    pub.send(p5.Publish(topic="", payload=b"C" * 9, qos=1, packet_id=2, properties=alias))         # 20
    assert pub.read_kind(p5.Puback).packet_id == 2
    pub.send(p5.Publish(topic="mb/t", payload=b"D" * 12, qos=0))                                   # 21
    got = take(exact, 4)
    assert [(p.topic, p.payload, p.qos) for p in got] == [
        ("mb/t", b"A" * 10, 1), ("mb/t", b"B" * 10, 0), ("mb/t", b"C" * 9, 1), ("mb/t", b"D" * 12, 0)]
    assert all(p.properties == p5.Properties() for p in got)
    got = take(short, 2)
    assert [(p.payload, p.qos) for p in got] == [(b"B" * 10, 0), (b"C" * 9, 1)]
    nothing_more(short)
    assert counter(server, "mqtt5_too_large_dropped") - before == 2
    for c in (exact, short, pub):
        c.close()


def test_a_message_in_flight_too_large_for_the_resumed_connection_leaves_the_window(server):
    """A persistent session's unacknowledged QoS 1 message of 300 bytes is not
    sent again to the same client back with Maximum Packet Size 100 (and
    Receive Maximum 1): it leaves the window, the small one after it comes."""
    sub = v5_on(server, 1)
    connect(sub, "mr-sub", session_expiry_interval=300)
    subscribe(sub, "mr/#", 1)
    pub = v5_on(server, 0)
    connect(pub, "mr-pub")
    publish_qos1(pub, "mr/t", [b"B" * 300, b"ok"])
    assert [p.payload for p in take(sub, 2)] == [b"B" * 300, b"ok"]
    sub.close()
    wait_for(lambda: counter(server, "sessions_away") == 1, 10, what="the session to be away")
    before = counter(server, "mqtt5_too_large_dropped")
    back = v5_on(server, 1)
    assert connect(back, "mr-sub", clean_start=False, maximum_packet_size=100, receive_maximum=1,
                   session_expiry_interval=300).session_present
    (p,) = take(back, 1)
    assert (p.payload, p.dup) == (b"ok", True)
    back.send(p5.Puback(packet_id=p.packet_id))
    nothing_more(back)
    assert counter(server, "mqtt5_too_large_dropped") - before == 1
    back.close()
    pub.close()


def test_the_servers_disconnect_leaves_out_a_reason_string_that_would_not_fit(server):
    """DISCONNECT 0x94 (a Topic Alias over the maximum) carries its Reason
    String, but not to a client whose Maximum Packet Size it would exceed
    (MQTT-3.14.2-3)."""
    for limit, with_reason in ((1000, True), (10, False)):
        c = v5_on(server, 0)
        connect(c, f"ds-{limit}", maximum_packet_size=limit)
        c.send(p5.Publish(topic="ds/x", payload=b"1", properties=p5.Properties(topic_alias=1000)))
        (d,) = [p for p in c.closed() if isinstance(p, p5.Disconnect)]
        assert d.reason_code == 0x94
        assert (d.properties.reason_string is not None) == with_reason
        c.close()


# --- Topic aliases toward a client ---------------------------------------------------------------

def test_topic_aliases_given_by_the_server_on_the_wire(server):
    """A client with Topic Alias Maximum 2 gets aliases for the first two topics
    the server sends it: the topic and the alias first, then an empty topic and
    the alias (QoS 0 and 1 alike); a third topic goes in full, without one. A
    client without a Topic Alias Maximum gets topics only."""
    sub = v5_on(server, 1)
    connect(sub, "ao-sub", topic_alias_maximum=2)
    subscribe(sub, "ao/#", 1)
    plain = v5_on(server, 1)
    connect(plain, "ao-plain")
    subscribe(plain, "ao/#", 1)
    pub = v5_on(server, 0)
    connect(pub, "ao-pub")
    before = server.counters()
    sent = [("ao/first/topic", 0), ("ao/second/topic", 1), ("ao/first/topic", 1), ("ao/third", 0),
            ("ao/second/topic", 0), ("ao/third", 1), ("ao/first/topic", 0)]
    for i, (topic, qos) in enumerate(sent):
        pub.send(p5.Publish(topic=topic, payload=b"%d" % i, qos=qos, packet_id=i + 1 if qos else 0,
                            properties=p5.Properties(user_properties=(("n", str(i)),))))
        if qos:
            assert pub.read_kind(p5.Puback).packet_id == i + 1
    got = take(sub, len(sent))
    wire = [(p.topic, p.properties.topic_alias, p.payload) for p in got]
    assert wire == [("ao/first/topic", 1, b"0"), ("ao/second/topic", 2, b"1"), ("", 1, b"2"),
                    ("ao/third", None, b"3"), ("", 2, b"4"), ("ao/third", None, b"5"), ("", 1, b"6")]
    assert [[tuple(kv) for kv in p.properties.user_properties] for p in got] == [[("n", str(i))]
                                                                                 for i in range(len(sent))]
    for p in got:
        if p.qos:
            sub.send(p5.Puback(packet_id=p.packet_id))
    assert [(p.topic, p.properties.topic_alias) for p in take(plain, len(sent))] == [(t, None) for t, _ in sent]
    after = server.counters()
    assert after["mqtt5_topic_aliases_out"] - before["mqtt5_topic_aliases_out"] == 2
    assert after["mqtt5_topic_alias_out_hits"] - before["mqtt5_topic_alias_out_hits"] == 3
    for c in (sub, plain, pub):
        c.close()


def test_topic_aliases_start_afresh_on_a_resumed_connection(server):
    """Aliases belong to the network connection: a persistent session's QoS 1
    messages sent again (DUP) on the new connection carry the topic with the
    alias first, then the alias alone, whatever the old connection had."""
    sub = v5_on(server, 1)
    connect(sub, "ar-sub", topic_alias_maximum=5, session_expiry_interval=300)
    subscribe(sub, "ar/#", 1)
    pub = v5_on(server, 0)
    connect(pub, "ar-pub")
    publish_qos1(pub, "ar/t", [b"a", b"b"])
    old = take(sub, 2)
    assert [(p.topic, p.properties.topic_alias) for p in old] == [("ar/t", 1), ("", 1)]
    sub.close()
    wait_for(lambda: counter(server, "sessions_away") == 1, 10, what="the session to be away")
    publish_qos1(pub, "ar/u", [b"c"], first_pid=3)
    back = v5_on(server, 1)
    assert connect(back, "ar-sub", clean_start=False, topic_alias_maximum=5,
                   session_expiry_interval=300).session_present
    got = take(back, 3)
    assert [(p.topic, p.properties.topic_alias, p.payload, p.dup) for p in got] == [
        ("ar/t", 1, b"a", True), ("", 1, b"b", True), ("ar/u", 2, b"c", False)]
    for p in got:
        back.send(p5.Puback(packet_id=p.packet_id))
    nothing_more(back)
    back.close()
    pub.close()


def test_topic_aliases_limited_by_topic_alias_maximum_out(tmp_path):
    """topic_alias_maximum_out bounds what a client asking for more gets; 0 gives none."""
    for limit, expect in ((1, [("ta/a", 1), ("ta/b", None), ("", 1)]),
                          (0, [("ta/a", None), ("ta/b", None), ("ta/a", None)])):
        s = GwServer(tmp_path / f"gw{limit}", workers=2, listeners=("mqtt",),
                     args=("--topic-alias-maximum-out", str(limit))).start()
        try:
            sub = v5_on(s, 1)
            connect(sub, "tl-sub", topic_alias_maximum=100)
            subscribe(sub, "ta/#", 0)
            pub = v5_on(s, 0)
            connect(pub, "tl-pub")
            for t in ("ta/a", "ta/b", "ta/a"):
                pub.send(p5.Publish(topic=t, payload=b"x"))
            assert [(p.topic, p.properties.topic_alias) for p in take(sub, 3)] == expect
            sub.close()
            pub.close()
        finally:
            stop_and_check([s])


# --- Topic aliases from a client, across a reload --------------------------------------------------

def _reload(server: GwServer) -> None:
    log = server.log()
    counts = [log.count(f"worker {i}: reloaded") for i in range(2)]
    server.signal(signal.SIGHUP)
    wait_for(lambda: all(server.log().count(f"worker {i}: reloaded") > counts[i] for i in range(2)), 10,
             what="both workers to reload")


def test_client_aliases_follow_the_maximum_their_connack_announced_across_a_reload(tmp_path):
    """A connection keeps the Topic Alias Maximum of its CONNACK: after a reload
    raising topic_alias_maximum from 4 to 100, an older connection's alias 50
    is DISCONNECT 0x94 (its table is not indexed past its size), while a new
    connection may use it; after a reload lowering it to 2, that connection's
    alias 50 still works."""
    cfg = tmp_path / "gw.toml"
    cfg.write_text('topic_alias_maximum = 4\nlog_level = "debug"\n')
    s = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt",), config=cfg).start()
    try:
        sub = v5_on(s, 1)
        connect(sub, "ra-sub")
        subscribe(sub, "ra/#", 0)
        old = v5_on(s, 0)
        assert connect(old, "ra-old").properties.topic_alias_maximum == 4
        old.send(p5.Publish(topic="ra/one", payload=b"1", qos=1, packet_id=1,
                            properties=p5.Properties(topic_alias=4)))
        assert old.read_kind(p5.Puback).packet_id == 1
        cfg.write_text('topic_alias_maximum = 100\nlog_level = "debug"\n')
        _reload(s)
        new = v5_on(s, 0)
        assert connect(new, "ra-new").properties.topic_alias_maximum == 100
        new.send(p5.Publish(topic="ra/two", payload=b"2", qos=1, packet_id=1,
                            properties=p5.Properties(topic_alias=50)))
        assert new.read_kind(p5.Puback).packet_id == 1
        new.send(p5.Publish(topic="", payload=b"3", qos=1, packet_id=2, properties=p5.Properties(topic_alias=50)))
        assert new.read_kind(p5.Puback).packet_id == 2
        old.send(p5.Publish(topic="ra/x", payload=b"x", qos=1, packet_id=2,
                            properties=p5.Properties(topic_alias=50)))
        assert [p.reason_code for p in old.closed() if isinstance(p, p5.Disconnect)] == [0x94]
        cfg.write_text('topic_alias_maximum = 2\nlog_level = "debug"\n')
        _reload(s)
        new.send(p5.Publish(topic="", payload=b"4", qos=1, packet_id=3, properties=p5.Properties(topic_alias=50)))
        assert new.read_kind(p5.Puback).packet_id == 3
        assert [(p.topic, p.payload) for p in take(sub, 4)] == [("ra/one", b"1"), ("ra/two", b"2"),
                                                                 ("ra/two", b"3"), ("ra/two", b"4")]
        nothing_more(sub)
        for c in (sub, new):
            c.close()
    finally:
        stop_and_check([s])
