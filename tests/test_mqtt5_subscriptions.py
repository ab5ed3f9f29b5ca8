"""MQTT 5.0 subscription options and Subscription Identifiers (MQTT 5.0
sections 3.8.3.1, 3.3.4): No Local, Retain As Published, Retain Handling
0/1/2, a SUBSCRIBE's Subscription Identifier delivered with each matching
message (several when several subscriptions match), kept in a session that
moves to another worker or is saved; bad input (an identifier of 0, two in one
SUBSCRIBE, No Local on a shared subscription) answered with DISCONNECT 0x82,
whole and in fragments, counted.

Real servers: `gw serve` with 2 workers (clients placed on both), and where
Mosquitto 2.0.11 does what the standard says, Mosquitto too; real clients:
paho-mqtt's v5 client (SubscribeOptions, Properties), raw packets built by
hand for what no client sends. Under GW_TEST_FRAGMENT=1 every byte goes
through the fragmenting proxy."""

from __future__ import annotations

import struct
import threading
import time
import uuid

import pytest

pytest.register_assert_rewrite("broker_fixtures")
from broker_fixtures import WAIT, _placed_client_class, brokers  # noqa: E402
from conftest import HOST, get_counter, send_fragmented, start_paho_thread, stop_paho_thread, wait_for  # noqa: E402
from gw import packets5 as p5  # noqa: E402
from test_mqtt5_connections import V5  # noqa: E402

pytest_plugins = ["broker_fixtures"]    # the broker_proc and broker fixtures

W0, W1 = 0, 1
GRACE = 0.3


class V5Msg:
    def __init__(self, m):
        self.topic = m.topic
        self.payload = bytes(m.payload)
        self.qos = m.qos
        self.retain = bool(m.retain)
        props = getattr(m, "properties", None)
        ids = getattr(props, "SubscriptionIdentifier", None) if props is not None else None
        self.ids = sorted(ids) if ids else []

    def __repr__(self):
        return f"V5Msg({self.topic!r}, {self.payload!r}, qos={self.qos}, retain={self.retain}, ids={self.ids})"


class PahoV5:
    """paho-mqtt's MQTT 5.0 client on a placed socket, on its own network
    thread, recording what it receives (with RETAIN and Subscription Identifiers)."""

    def __init__(self, broker, worker, *, client_id=None, clean_start=True, session_expiry=0):
        mqtt, placed = _placed_client_class()
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        self.mqtt = mqtt
        self.Properties = Properties
        self.PacketTypes = PacketTypes
        sock, self.worker = broker.socket_on(worker)
        self.local_port = sock.getsockname()[1]
        self.client_id = client_id or f"s5-{uuid.uuid4().hex[:8]}"
        self.cond = threading.Condition()
        self.messages: list[V5Msg] = []
        self.subacks: dict[int, list[int]] = {}
        self.connected = threading.Event()
        self.session_present = None
        c = placed(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5,
                   reconnect_on_failure=False)
        c.presock = sock
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        props = None
        if session_expiry:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
        self.client = c
        c.connect(HOST, broker.port, 60, clean_start=clean_start, properties=props)
        self._thread = start_paho_thread(c)
        assert self.connected.wait(WAIT), "no CONNACK"
        broker.clients.append(self)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.session_present = bool(flags.session_present)
        self.connected.set()

    def _on_message(self, client, userdata, m):
        with self.cond:
            self.messages.append(V5Msg(m))
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks[mid] = [rc.value for rc in reason_codes]
            self.cond.notify_all()

    def subscribe(self, flt, qos=0, *, no_local=False, rap=False, rh=0, subid=None) -> list[int]:
        opts = self.mqtt.SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=rap, retainHandling=rh)
        props = None
        if subid is not None:
            props = self.Properties(self.PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = subid
        rc, mid = self.client.subscribe(flt, options=opts, properties=props)
        assert rc == 0
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, WAIT), "no SUBACK"
        return self.subacks[mid]

    def publish(self, topic, payload, qos=0, retain=False):
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(WAIT)
            assert info.is_published()

    def received(self, topic=None) -> list[V5Msg]:
        with self.cond:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def wait_for(self, payload: bytes, topic=None) -> V5Msg:
        with self.cond:
            assert self.cond.wait_for(lambda: any(m.payload == payload for m in self.messages
                                                  if topic is None or m.topic == topic), WAIT), \
                f"{self.client_id}: no {payload!r} on {topic} (got {self.messages})"
            return [m for m in self.messages if m.payload == payload and (topic is None or m.topic == topic)][0]

    def close(self):
        try:
            if self.client.is_connected():
                self.client.disconnect()
        finally:
            stop_paho_thread(self.client, self._thread, WAIT)

    disconnect = close


def settle(publisher: PahoV5, subscribers, topic: str) -> None:
    """A sentinel each subscriber (subscribed to topic without No Local) must get,
    then GRACE: what was to arrive before it has."""
    payload = f"sentinel-{uuid.uuid4().hex[:8]}".encode()
    publisher.publish(topic, payload, qos=1)
    for s in subscribers:
        s.wait_for(payload, topic)
    time.sleep(GRACE)


# --- No Local ---------------------------------------------------------------------------

@brokers("routing")
@pytest.mark.parametrize("qos", [0, 1])
def test_no_local_keeps_a_clients_own_messages_from_it(broker, qos):
    """A client's PUBLISH is not delivered to its own subscription with No Local
    (MQTT-3.8.3-3), but to everyone else's, on either worker; what others
    publish reaches it. An overlapping subscription without No Local still
    delivers its own message to it."""
    t = broker.topic("nl")
    a = PahoV5(broker, W0)
    b = PahoV5(broker, W1)
    c = PahoV5(broker, W0)
    assert a.subscribe(t, qos, no_local=True) == [qos]
    assert b.subscribe(t, qos) == [qos]
    assert c.subscribe(t, qos) == [qos]
    a.publish(t, b"from-a", qos)
    b.wait_for(b"from-a")
    c.wait_for(b"from-a")
    b.publish(t, b"from-b", qos)
    a.wait_for(b"from-b")
    settle(b, [a, c], t)
    assert [m.payload for m in a.received() if m.payload == b"from-a"] == []
    # the same client with a second subscription, without No Local, matching it
    assert a.subscribe(broker.topic("#"), qos) == [qos]
    a.publish(t, b"again", qos)
    a.wait_for(b"again")
    settle(b, [a, c], t)
    assert [m.payload for m in a.received() if m.payload == b"again"] == [b"again"]
    if broker.is_gw:
        wait_for(lambda: get_counter(broker.server.counters(), "mqtt5_no_local_skipped") >= 1, WAIT,
                 what="mqtt5_no_local_skipped")


# --- Retain As Published ----------------------------------------------------------------

@brokers("retain")
@pytest.mark.parametrize("qos", [0, 1])
def test_retain_as_published(broker, qos):
    """Retain As Published 1: a live message keeps the RETAIN flag it was
    published with (MQTT-3.3.1-13); 0: RETAIN is 0 on live delivery
    (MQTT-3.3.1-12). The publisher on the other worker."""
    t = broker.topic("rap")
    keep = PahoV5(broker, W0)
    clear = PahoV5(broker, W1)
    pub = PahoV5(broker, W1)
    assert keep.subscribe(t, qos, rap=True) == [qos]
    assert clear.subscribe(t, qos) == [qos]
    pub.publish(t, b"retained", qos, retain=True)
    pub.publish(t, b"plain", qos, retain=False)
    assert keep.wait_for(b"retained").retain is True
    assert keep.wait_for(b"plain").retain is False
    assert clear.wait_for(b"retained").retain is False
    assert clear.wait_for(b"plain").retain is False
    pub.publish(t, b"", 0, retain=True)         # cleared


@brokers("retain")
@pytest.mark.parametrize("qos", [0, 1])
def test_retain_as_published_on_shared_subscriptions(broker, qos):
    """Retain As Published applies to a shared subscription too (only No Local
    is refused there, MQTT-3.8.3-4): a member with it gets the RETAIN flag as
    published (MQTT-3.3.1-13), one without it 0, on the publisher's worker and
    on the other (the message passed between workers keeps the flag)."""
    t = broker.topic("srap")
    tag = uuid.uuid4().hex[:6]
    pub = PahoV5(broker, W1)
    far = PahoV5(broker, W0)        # each the only member of its group: it gets every message
    near = PahoV5(broker, W1)
    clear = PahoV5(broker, W0)
    assert far.subscribe(f"$share/far{tag}/{t}", qos, rap=True) == [qos]
    assert near.subscribe(f"$share/near{tag}/{t}", qos, rap=True) == [qos]
    assert clear.subscribe(f"$share/clear{tag}/{t}", qos) == [qos]
    time.sleep(GRACE)               # the groups' counts reach the other worker
    pub.publish(t, b"retained", qos, retain=True)
    pub.publish(t, b"plain", qos, retain=False)
    for member in (far, near):
        assert member.wait_for(b"retained").retain is True, member.worker
        assert member.wait_for(b"plain").retain is False, member.worker
    assert clear.wait_for(b"retained").retain is False
    assert clear.wait_for(b"plain").retain is False
    pub.publish(t, b"", 0, retain=True)         # cleared


@brokers("retain", gw_only="which member gets a departed member's messages is gw's pick")
def test_retain_as_published_on_a_shared_message_given_to_another_member(broker):
    """A member that leaves without acknowledging gives its QoS 1 message to
    the group again (worker/shared.pyx): the member on the other worker that
    gets it, subscribed with Retain As Published, gets the RETAIN flag it was
    published with."""
    t = broker.topic("srapre")
    group = f"$share/re{uuid.uuid4().hex[:6]}/{t}"
    sock, _ = broker.socket_on(W0)
    first = V5.__new__(V5)
    first.sock = sock
    first.backlog = []
    assert first.connect(f"first-{uuid.uuid4().hex[:6]}").reason_code == 0
    first.send(p5.Subscribe(packet_id=1, topics=[(group, 1 | 0x08)]))     # QoS 1, Retain As Published
    assert first.read_kind(p5.Suback).reason_codes == [1]
    time.sleep(GRACE)
    pub = PahoV5(broker, W1)
    pub.publish(t, b"kept", 1, retain=True)
    got = first.read_kind(p5.Publish)
    assert (got.payload, got.retain) == (b"kept", True)      # not acknowledged
    second = PahoV5(broker, W1)
    assert second.subscribe(group, 1, rap=True) == [1]
    time.sleep(GRACE)
    first.close()                                           # its session ends: the message goes to second
    m = second.wait_for(b"kept")
    assert m.retain is True
    pub.publish(t, b"", 0, retain=True)         # cleared


# --- Retain Handling --------------------------------------------------------------------

@brokers("retain")
def test_retain_handling(broker):
    """Retain Handling 0: the retained messages at every SUBSCRIBE; 1: only when
    the subscription did not exist; 2: never (MQTT-3.3.1-9/-10/-11). A 3.1.1
    subscriber behaves as 0."""
    t = broker.topic("rh")
    pub = PahoV5(broker, W1)
    pub.publish(t, b"kept", 1, retain=True)
    s = PahoV5(broker, W0)
    assert s.subscribe(t, 1, rh=1) == [1]            # new: sent
    m = s.wait_for(b"kept")
    assert m.retain is True
    assert s.subscribe(t, 1, rh=1) == [1]            # existed: not sent
    assert s.subscribe(t, 1, rh=0) == [1]            # always: sent
    wait_for(lambda: len(s.received(t)) >= 2, WAIT, what="the second retained copy")
    n = PahoV5(broker, W1)
    assert n.subscribe(t, 1, rh=2) == [1]            # never
    settle(pub, [n, s], t)
    assert [m.payload for m in s.received(t) if m.payload == b"kept"] == [b"kept", b"kept"]
    assert [m.payload for m in n.received(t) if m.payload == b"kept"] == []
    # Live messages are delivered whatever the Retain Handling.
    pub.publish(t, b"live", 1)
    n.wait_for(b"live")
    pub.publish(t, b"", 1, retain=True)
    if broker.is_gw:
        assert get_counter(broker.server.counters(), "mqtt5_retain_handling_skipped") >= 2


# --- Subscription Identifiers -----------------------------------------------------------

@brokers("routing", gw_only="Mosquitto 2.0.11 sends a copy per overlapping subscription, each with its "
                             "own identifier (3.3.4 allows it); gw sends one copy with all of them")
@pytest.mark.parametrize("qos", [0, 1])
def test_subscription_identifiers_with_each_matching_message(broker, qos):
    """Each PUBLISH carries the identifiers of every matching subscription of
    its subscriber (MQTT-3.3.4-3, -4), the publisher on the other worker; a
    subscription without one adds none; one replaced without an identifier
    loses it; a 3.1.1-like subscriber without identifiers gets none."""
    base = broker.topic("sid")
    s = PahoV5(broker, W0)
    other = PahoV5(broker, W0)
    pub = PahoV5(broker, W1)
    assert s.subscribe(f"{base}/+", qos, subid=7) == [qos]
    assert s.subscribe(f"{base}/#", qos, subid=268435455) == [qos]
    assert s.subscribe(f"{base}/x", qos) == [qos]
    assert other.subscribe(f"{base}/#", qos) == [qos]
    pub.publish(f"{base}/x", b"one", qos)
    pub.publish(f"{base}/y/z", b"two", qos)
    assert s.wait_for(b"one").ids == [7, 268435455]
    assert s.wait_for(b"two").ids == [268435455]
    assert other.wait_for(b"two").ids == []
    assert other.wait_for(b"one").ids == []
    assert s.subscribe(f"{base}/+", qos) == [qos]     # replaced, without an identifier
    pub.publish(f"{base}/x", b"three", qos)
    assert s.wait_for(b"three").ids == [268435455]
    if broker.is_gw:
        counters = broker.server.counters()
        assert get_counter(counters, "mqtt5_subscription_ids") >= 2
        assert get_counter(counters, "mqtt5_subid_publishes") >= 3


@brokers("retain")
def test_subscription_identifier_on_retained_messages(broker):
    """A retained message sent on subscribe carries the new subscription's identifier."""
    t = broker.topic("sidr")
    pub = PahoV5(broker, W1)
    pub.publish(t, b"r", 1, retain=True)
    s = PahoV5(broker, W0)
    assert s.subscribe(t, 1, subid=42) == [1]
    m = s.wait_for(b"r")
    assert (m.retain, m.ids) == (True, [42])
    pub.publish(t, b"", 1, retain=True)


@brokers("routing")
def test_subscription_identifier_of_a_shared_subscription(broker):
    """A member of a shared group gets the group's messages with its
    subscription's identifier, the publisher on the other worker."""
    t = broker.topic("sids")
    m = PahoV5(broker, W0)
    assert m.subscribe(f"$share/g{uuid.uuid4().hex[:6]}/{t}", 1, subid=5) == [1]
    pub = PahoV5(broker, W1)
    pub.publish(t, b"shared", 1)
    assert m.wait_for(b"shared").ids == [5]


@brokers("sessions", gw_only="a session resumed on the other worker moves there (FR_SESSION)")
def test_options_and_identifiers_survive_a_session_moving_to_the_other_worker(broker):
    """A session with Session Expiry resumed on the other worker keeps its
    subscriptions' options and identifiers (the session state's layout 5)."""
    t = broker.topic("move")
    cid = broker.client_id("mover")
    s = PahoV5(broker, W0, client_id=cid, session_expiry=300)
    assert s.subscribe(t, 1, no_local=True, rap=True, subid=99) == [1]
    s.close()
    s = PahoV5(broker, W1, client_id=cid, clean_start=False, session_expiry=300)
    assert s.session_present
    pub = PahoV5(broker, W0)
    pub.publish(t, b"moved", 1, retain=True)
    m = s.wait_for(b"moved")
    assert (m.ids, m.retain) == ([99], True)      # identifier and Retain As Published kept
    s.publish(t, b"own", 1)                        # No Local kept
    assert s.subscribe(broker.topic("sentinel"), 1) == [1]
    settle(pub, [s], broker.topic("sentinel"))
    assert [m.payload for m in s.received(t) if m.payload == b"own"] == []
    pub.publish(t, b"", 1, retain=True)


# --- bad input --------------------------------------------------------------------------

def _subscribe_raw(props: bytes, entries: list[tuple[bytes, int]], pid: int = 3) -> bytes:
    body = struct.pack(">H", pid) + bytes([len(props)]) + props
    for f, o in entries:
        body += struct.pack(">H", len(f)) + f + bytes([o])
    assert len(body) < 128
    return bytes([0x82, len(body)]) + body


BAD = {
    "subscription_identifier_0": _subscribe_raw(b"\x0b\x00", [(b"a/b", 0)]),
    "subscription_identifier_twice": _subscribe_raw(b"\x0b\x01\x0b\x02", [(b"a/b", 0)]),
    "no_local_on_shared": _subscribe_raw(b"", [(b"a/b", 0), (b"$share/g/a/b", 0x04)]),
}


@brokers("routing", gw_only="gw's counters; Mosquitto's DISCONNECTs for these differ")
@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("fragmented", [False, True])
def test_bad_subscribe_is_a_protocol_error(broker, name, fragmented, frag_rng):
    """DISCONNECT 0x82 (MQTT 5.0 3.8.2.1.2: an identifier of 0, or twice, is a
    Protocol Error; MQTT-3.8.3-4: No Local on a shared subscription), the
    connection closed, nothing subscribed, counted; whole and in fragments."""
    before = broker.server.counters()
    sock, _ = broker.socket_on(W0)
    c = V5.__new__(V5)
    c.sock = sock
    c.backlog = []
    assert c.connect(f"bad-{uuid.uuid4().hex[:6]}").reason_code == 0
    data = BAD[name]
    if fragmented:
        send_fragmented(c.sock, data, frag_rng)
    else:
        c.send(data)
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, 0x82)]
    after = broker.server.counters()
    assert get_counter(after, "mqtt5_protocol_errors") > get_counter(before, "mqtt5_protocol_errors")
    # The worker lives on.
    ok = PahoV5(broker, W0)
    assert ok.subscribe(broker.topic("after"), 0, subid=1) == [0]


# --- the session state's layout ---------------------------------------------------------

def _state(subs: list[tuple], version: int = 5) -> bytes:
    """session_serialize's layout with subscriptions (filter, qos[, options, identifier]) and
    no messages, no QoS 2 ids, no user name (layout 5: then the expiry tail of a 3.1.1
    session, connected when saved)."""
    out = struct.pack("<BI", version, len(subs))
    for f, qos, *more in subs:
        out += struct.pack("<H", len(f)) + f + bytes([qos])
        if version >= 5:
            opts, subid = more if more else (0, 0)
            out += struct.pack("<BI", opts, subid)
    out += struct.pack("<HI", 1, 0) + struct.pack("<I", 0) + b"\0\0\0"
    return out + struct.pack("<BIQ", 4, 0, 0) if version >= 5 else out


def test_session_state_keeps_options_and_identifiers_and_reads_layout_4():
    """Layout 5 holds each subscription's options (No Local 1, Retain As
    Published 2) and Subscription Identifier, restored and saved again byte for
    byte (a shared subscription's too); layout 4 (none) is still read; a
    subscription cut short is malformed, what came before is kept."""
    from test_channel_frames import Linked
    linked = Linked()
    try:
        v5 = _state([(b"a/+", 1, 1, 7), (b"b/#", 2, 2, 268435455), (b"c", 0, 0, 0), (b"$share/g/d", 1, 0, 9)])
        v4 = _state([(b"a/+", 1), (b"c", 0)], version=4)
        cut = v5[:v5.index(b"b/#") + 3 + 2]            # its options, not its identifier
        linked.worker.restore_sessions([(b"v5", v5), (b"v4", v4), (b"cut", cut)])
        saved = {cid: state for _slot, cid, state in linked.worker.snapshot_sessions()}
        assert sorted_subs(saved[b"v5"]) == sorted_subs(v5)
        # (then the expiry tail, which layout 4 did not have: session_state.pyx)
        assert saved[b"v4"][:-13] == _state([(b"a/+", 1, 0, 0), (b"c", 0, 0, 0)])[:-13]
        assert sorted_subs(saved[b"cut"]) == [(b"a/+", 1, 1, 7)]
        assert linked.malformed == 1
    finally:
        linked.close()


def sorted_subs(state: bytes) -> list[tuple]:
    """The subscriptions of a layout 5 state, sorted (the index's order is its own)."""
    (n,) = struct.unpack_from("<I", state, 1)
    pos, out = 5, []
    for _ in range(n):
        (flen,) = struct.unpack_from("<H", state, pos)
        f = state[pos + 2:pos + 2 + flen]
        qos, opts, subid = struct.unpack_from("<BBI", state, pos + 2 + flen)
        out.append((f, qos, opts, subid))
        pos += 2 + flen + 6
    return sorted(out)


class _Server:
    """What PahoV5 needs of a broker, for a GwServer of a test's own."""

    def __init__(self, server):
        self.port = server.ports["mqtt"]
        self.clients: list = []

    def socket_on(self, worker=None):
        from conftest import tcp_connect
        return tcp_connect(self.port), None

    def close_all(self):
        for c in self.clients:
            try:
                c.close()
            except Exception:
                pass


def test_options_and_identifiers_survive_a_restart(tmp_path):
    """A persistent session's subscription options and identifier are saved in
    the data dir (layout 5) and in force after a restart."""
    from conftest import GwServer, stop_and_check
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    cid = f"keep-{uuid.uuid4().hex[:6]}"
    server = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt",), data_dir=data_dir).start()
    b = _Server(server)
    try:
        s = PahoV5(b, None, client_id=cid, session_expiry=3600)
        assert s.subscribe("keep/t", 1, no_local=True, rap=True, subid=11) == [1]
        assert s.subscribe("keep/sentinel", 1) == [1]
        s.close()
    finally:
        b.close_all()
        stop_and_check([server])
    server = GwServer(tmp_path / "gw2", workers=2, listeners=("mqtt",), data_dir=data_dir).start()
    b = _Server(server)
    try:
        s = PahoV5(b, None, client_id=cid, clean_start=False, session_expiry=3600)
        assert s.session_present
        pub = PahoV5(b, None)
        pub.publish("keep/t", b"after", 1, retain=True)
        m = s.wait_for(b"after")
        assert (m.ids, m.retain) == ([11], True)
        s.publish("keep/t", b"own", 1)
        settle(pub, [s], "keep/sentinel")
        assert [m.payload for m in s.received("keep/t") if m.payload == b"own"] == []
        pub.publish("keep/t", b"", 1, retain=True)
    finally:
        b.close_all()
        stop_and_check([server])
