"""Will messages: published when the connection ends other
than by DISCONNECT (keepalive timeout, network error, protocol error, takeover),
not after DISCONNECT; will QoS and will retain honoured. The client with the will
is a raw socket on one worker, the observer a paho client on the other."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("broker_fixtures")   # before its import: its asserts report values
from broker_fixtures import brokers  # noqa: E402

pytest_plugins = ["broker_fixtures"]    # the broker_proc and broker fixtures

DYING, OBSERVER = 0, 1


def _will_client(broker, will_topic, payload=b"gone", qos=1, retain=False, keepalive=60, client_id=None):
    return broker.raw(DYING, client_id=client_id, keepalive=keepalive,
                      will=(will_topic, payload, qos, retain))


def _observer(broker, *filters):
    obs = broker.connect(OBSERVER)
    assert obs.subscribe([(f, 2) for f in filters]) == [2] * len(filters)
    return obs


@brokers("routing", "will")
def test_will_on_keepalive_timeout(broker):
    """MQTT-3.1.2-24 then MQTT-3.1.2-8: a client with keepalive 1 that goes
    silent is disconnected after 1.5 s and its will is published."""
    wt = broker.topic("will")
    obs = _observer(broker, wt)
    dying = _will_client(broker, wt, b"timeout", keepalive=1)
    broker.assert_workers((dying, DYING), (obs, OBSERVER))
    dying.wait_closed_by_broker(1.5 + 10)
    [m] = obs.wait_messages(1, wt)
    assert (m.payload, m.qos, m.retain) == (b"timeout", 1, False)


@brokers("routing", "will")
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_will_on_abrupt_close(broker, how):
    """MQTT-3.1.2-8: the network connection closes without DISCONNECT (a FIN, or
    a reset: an I/O error on the broker's side): the will is published."""
    wt = broker.topic("will")
    obs = _observer(broker, wt)
    dying = _will_client(broker, wt, b"abrupt")
    broker.assert_workers((dying, DYING), (obs, OBSERVER))
    dying.ping()
    dying.close() if how == "fin" else dying.reset()
    [m] = obs.wait_messages(1, wt)
    assert m.payload == b"abrupt"


@brokers("routing", "will")
@pytest.mark.parametrize("garbage", [b"\xf0\x00", b"\x30\xff\xff\xff\xff\x01", b"\x60\x02\x00\x01",
                                     b"\x30\x05\x00\x03a/#"],
                         ids=["reserved-type", "bad-remaining-length", "pubrel-flags-0", "publish-to-wildcard"])
def test_will_on_protocol_error(broker, garbage):
    """MQTT-3.1.2-8 / MQTT-4.8.0-1: the broker closes the connection for a
    protocol error (a malformed packet); the will is published."""
    _check_will_on_protocol_error(broker, garbage)


@brokers("routing", "will", gw_only="Mosquitto 2.0.11 closes the connection on a second CONNECT "
                                     "(protocol error) but drops the will instead of publishing it")
def test_will_on_second_connect(broker):
    """MQTT-3.1.0-2: a second CONNECT is a protocol violation, so the broker
    closes the connection; MQTT-3.1.2-8: the will is then published."""
    from broker_fixtures import connect_packet_full

    _check_will_on_protocol_error(broker, connect_packet_full(broker.client_id("again")))


def _check_will_on_protocol_error(broker, garbage):
    wt = broker.topic("will")
    obs = _observer(broker, wt)
    dying = _will_client(broker, wt, b"malformed")
    broker.assert_workers((dying, DYING), (obs, OBSERVER))
    dying.send(garbage)
    dying.wait_closed_by_broker()
    [m] = obs.wait_messages(1, wt)
    assert m.payload == b"malformed"


@brokers("routing", "will")
def test_no_will_after_disconnect(broker):
    """MQTT-3.1.2-10 / MQTT-3.14.4-3: on DISCONNECT the will is discarded, not
    published, even when the socket closes right after."""
    wt, done = broker.topic("will"), broker.topic("done")
    obs = _observer(broker, wt, done)
    dying = _will_client(broker, wt, b"must-not")
    broker.assert_workers((dying, DYING), (obs, OBSERVER))
    dying.ping()
    dying.disconnect()
    helper = broker.connect(DYING)
    broker.settle(helper, obs, done)
    assert obs.received(wt) == []


@brokers("routing", "will")
def test_no_will_while_connected(broker):
    """The will waits for the connection's end: nothing while the client lives."""
    wt, done = broker.topic("will"), broker.topic("done")
    obs = _observer(broker, wt, done)
    alive = _will_client(broker, wt, b"not-yet")
    broker.assert_workers((alive, DYING), (obs, OBSERVER))
    alive.ping()
    helper = broker.connect(DYING)
    broker.settle(helper, obs, done)
    assert obs.received(wt) == []
    alive.disconnect()


@brokers("routing", "will")
@pytest.mark.parametrize("will_qos", [0, 1, 2])
def test_will_qos_honoured(broker, will_qos):
    """MQTT-3.1.2-14..16 with MQTT-3.8.4-6: the will is published at its will
    QoS (the observer was granted 2); a QoS 1 observer gets min(will QoS, 1)."""
    wt = broker.topic("will")
    obs = _observer(broker, wt)
    obs1 = broker.connect(OBSERVER)
    obs1.subscribe(wt, 1)
    dying = _will_client(broker, wt, b"q", qos=will_qos)
    broker.assert_workers((dying, DYING), (obs, OBSERVER), (obs1, OBSERVER))
    dying.reset()
    [m] = obs.wait_messages(1, wt)
    assert (m.qos, m.payload) == (will_qos, b"q")
    [m1] = obs1.wait_messages(1, wt)
    assert m1.qos == min(will_qos, 1)


@brokers("routing", "will", "retain")
def test_will_retain_honoured(broker):
    """MQTT-3.1.2-17: will retain 1 publishes the will as a retained message:
    the live observer gets it with RETAIN=0 (MQTT-3.3.1-9), a later subscriber on
    either worker gets it with RETAIN=1."""
    wt = broker.topic("will")
    obs = _observer(broker, wt)
    dying = _will_client(broker, wt, b"last-words", qos=1, retain=True)
    broker.assert_workers((dying, DYING), (obs, OBSERVER))
    dying.close()
    [m] = obs.wait_messages(1, wt)
    assert (m.payload, m.retain) == (b"last-words", False)
    for w in (DYING, OBSERVER):
        late = broker.connect(w)
        late.subscribe(wt, 1)
        [m] = late.wait_messages(1, wt)
        assert (m.payload, m.retain, m.qos) == (b"last-words", True, 1)


@brokers("routing", "will", "retain")
def test_will_without_retain_is_not_retained(broker):
    """MQTT-3.1.2-16: will retain 0 publishes it as a non-retained message: a
    later subscriber gets nothing."""
    wt, done = broker.topic("will"), broker.topic("done")
    obs = _observer(broker, wt)
    dying = _will_client(broker, wt, b"fleeting", qos=1, retain=False)
    broker.assert_workers((dying, DYING), (obs, OBSERVER))
    dying.close()
    obs.wait_messages(1, wt)
    late = broker.connect(OBSERVER)
    late.subscribe([(wt, 1), (done, 1)])
    helper = broker.connect(DYING)
    broker.settle(helper, late, done)
    assert late.received(wt) == []


@brokers("routing", "will", "sessions")
def test_will_on_takeover(broker):
    """MQTT-3.1.4-2 then MQTT-3.1.2-8: a second CONNECT with the same client id
    (on the other worker) makes the broker close the first connection without a
    DISCONNECT from it, so the first connection's will is published (Mosquitto
    2.0.11 does so); the new connection has no will."""
    wt = broker.topic("will")
    obs = _observer(broker, wt)
    cid = broker.client_id("takeover-will")
    first = _will_client(broker, wt, b"taken-over", client_id=cid)
    broker.assert_workers((first, DYING), (obs, OBSERVER))
    second = broker.raw(OBSERVER, client_id=cid)
    broker.assert_workers((second, OBSERVER))
    first.wait_closed_by_broker()
    [m] = obs.wait_messages(1, wt)
    assert m.payload == b"taken-over"
    second.ping()


@brokers("routing", "will")
def test_will_published_once_to_many_observers_on_both_workers(broker):
    """The will is one PUBLISH: every matching subscriber, on either worker
    (wildcards included), gets exactly one copy."""
    wt, done = broker.topic("w/dev1/status"), broker.topic("done")
    observers = [(broker.connect(w), w) for w in (0, 1, 0, 1)]
    for (o, _), f in zip(observers, [wt, broker.topic("w/+/status"), broker.topic("w/#"), wt]):
        o.subscribe([(f, 1), (done, 1)])
    dying = _will_client(broker, wt, b"bye", client_id=broker.client_id("dev1"))
    broker.assert_workers((dying, DYING), *observers)
    dying.reset()
    for o, _ in observers:
        o.wait_messages(1, wt)
    helper = broker.connect(DYING)
    broker.settle(helper, [o for o, _ in observers], done)
    for o, _ in observers:
        assert [m.payload for m in o.received(wt)] == [b"bye"]
