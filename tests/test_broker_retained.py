"""Retained messages: set, replace, clear with an empty
payload, delivered on subscribe with RETAIN=1, live deliveries with RETAIN=0,
global across workers (set through one worker, read through the other)."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("broker_fixtures")   # before its import: its asserts report values
from broker_fixtures import brokers  # noqa: E402

pytest_plugins = ["broker_fixtures"]    # the broker_proc and broker fixtures

PUB, SUB = 0, 1


def _marker(broker, pub):
    """A retained sentinel topic: a subscriber that subscribes to it after the
    topic under test has had its retained messages sent when this one arrives."""
    marker = broker.topic("zz-marker")
    pub.publish(marker, b"marker", qos=1, retain=True)
    return marker


def _retained_after_marker(broker, sub, filt, marker, qos=1):
    """Subscribes to filt, then to the marker; waits for the marker (+ GRACE)
    and returns what arrived on filt's topics with RETAIN=1."""
    import time

    from conftest import wait_for

    sub.subscribe(filt, qos)
    sub.subscribe(marker, 1)
    wait_for(lambda: sub.received(marker), sub.wait, what="the retained marker")
    time.sleep(broker.grace)
    return [m for m in sub.received() if m.topic != marker]


def _subscribed_after_retained(broker, t, qos=1, granted=1):
    """A retained b"state" published to t at qos through worker PUB, then a
    subscriber on worker SUB granted `granted` for t: (publisher, subscriber)."""
    pub = broker.connect(PUB)
    pub.publish(t, b"state", qos=qos, retain=True)
    if qos == 0:
        pub.ping()        # QoS 0 has no acknowledgement: a later round trip orders it
    sub = broker.connect(SUB)
    broker.assert_workers((pub, PUB), (sub, SUB))
    assert sub.subscribe(t, granted) == [granted]
    return pub, sub


def _retained_for_new_subscriber(broker, pub, filt, qos=1):
    """What a subscriber connecting now on worker SUB gets with RETAIN=1 when it
    subscribes to filt (pub, on worker PUB, publishes the marker)."""
    marker = _marker(broker, pub)
    sub = broker.connect(SUB)
    broker.assert_workers((pub, PUB), (sub, SUB))
    return _retained_after_marker(broker, sub, filt, marker, qos)


@brokers("retain")
@pytest.mark.parametrize("qos, granted", [(0, 2), (1, 2), (2, 2), (2, 1)],
                         ids=["0", "1", "2", "2-downgraded-to-granted-1"])
def test_retained_delivered_on_subscribe_from_other_worker(broker, qos, granted):
    """MQTT-3.3.1-5/-6/-7/-8: a retained PUBLISH (any QoS) is stored; a later
    subscriber, on the other worker, gets it with RETAIN=1 at min(QoS, granted)
    (MQTT-3.8.4-6 holds for a retained message sent on subscribe too)."""
    t = broker.topic("r")
    _pub, sub = _subscribed_after_retained(broker, t, qos, granted)
    [m] = sub.wait_messages(1, t)
    assert (m.payload, m.retain, m.qos) == (b"state", True, min(qos, granted))


@brokers("retain")
def test_retained_replaced(broker):
    """MQTT-3.3.1-5: a new retained message replaces the one held for the topic;
    a new subscriber gets only the latest."""
    t = broker.topic("r")
    pub = broker.connect(PUB)
    for v in (b"v1", b"v2", b"v3"):
        pub.publish(t, v, qos=1, retain=True)
    got = _retained_for_new_subscriber(broker, pub, t)
    assert [(m.payload, m.retain) for m in got] == [(b"v3", True)]


@brokers("retain")
def test_retained_replaced_from_the_other_worker(broker):
    """Global across workers: set through worker 0, replaced through worker 1,
    read through worker 0 and worker 1: the replacement everywhere."""
    t = broker.topic("r")
    a = broker.connect(0)
    a.publish(t, b"from-0", qos=1, retain=True)
    b = broker.connect(1)
    broker.assert_workers((a, 0), (b, 1))
    b.publish(t, b"from-1", qos=1, retain=True)
    marker = _marker(broker, a)
    for w in (0, 1):
        sub = broker.connect(w)
        broker.assert_workers((sub, w), (a if w else b, 1 - w))
        got = _retained_after_marker(broker, sub, t, marker)
        assert [m.payload for m in got] == [b"from-1"], f"reader on worker {w}"


@brokers("routing", "retain")
def test_retained_cleared_by_empty_payload(broker):
    """MQTT-3.3.1-10/-11: a retained PUBLISH with a zero-length payload removes
    the retained message (and is not itself retained); a subscriber already there
    gets it as a normal message (RETAIN=0, empty payload); a new one gets nothing."""
    t = broker.topic("r")
    pub, live = _subscribed_after_retained(broker, t)
    assert live.wait_messages(1, t)[0].retain is True
    pub.publish(t, b"", qos=1, retain=True)
    second = live.wait_messages(2, t)[1]
    assert (second.payload, second.retain) == (b"", False)
    assert _retained_for_new_subscriber(broker, pub, t) == []


@brokers("retain")
def test_retained_clear_of_unknown_topic_is_harmless(broker):
    """A zero-length retained PUBLISH to a topic without a retained message:
    acknowledged, nothing stored (MQTT-3.3.1-11)."""
    t = broker.topic("never")
    pub = broker.connect(PUB)
    pub.publish(t, b"", qos=1, retain=True)
    assert _retained_for_new_subscriber(broker, pub, t) == []


@brokers("routing", "retain")
def test_live_delivery_has_retain_0(broker):
    """MQTT-3.3.1-9: a retained PUBLISH sent to an established subscription
    carries RETAIN=0; the same message to a new subscription carries RETAIN=1."""
    t = broker.topic("r")
    sub = broker.connect(SUB)
    sub.subscribe(t, 1)
    pub = broker.connect(PUB)
    broker.assert_workers((pub, PUB), (sub, SUB))
    pub.publish(t, b"live", qos=1, retain=True)
    [m] = sub.wait_messages(1, t)
    assert (m.payload, m.retain) == (b"live", False)
    late = broker.connect(SUB)
    late.subscribe(t, 1)
    [m] = late.wait_messages(1, t)
    assert (m.payload, m.retain) == (b"live", True)


@brokers("retain")
def test_non_retained_publish_leaves_retained_message(broker):
    """MQTT-3.3.1-12: a PUBLISH with RETAIN=0 neither stores nor replaces the
    retained message of its topic."""
    t = broker.topic("r")
    pub = broker.connect(PUB)
    pub.publish(t, b"kept", qos=1, retain=True)
    pub.publish(t, b"passing", qos=1, retain=False)
    got = _retained_for_new_subscriber(broker, pub, t)
    assert [(m.payload, m.retain) for m in got] == [(b"kept", True)]


@brokers("retain")
@pytest.mark.parametrize("filt, expected", [
    ("w/#", ["w/a", "w/b/c", "w/d", "w"]),
    ("w/+", ["w/a", "w/d"]),
    ("+/a", ["w/a", "wx/a"]),
    ("w/+/c", ["w/b/c"]),
    ("x/#", []),
], ids=["hash", "plus", "plus-first", "plus-middle", "none"])
def test_retained_on_wildcard_subscribe_returns_all_matching(broker, filt, expected):
    """MQTT-3.3.1-6 with wildcards: every retained message whose topic matches
    the new filter is sent, each once, with RETAIN=1; the others not."""
    pub = broker.connect(PUB)
    for name in ("w", "w/a", "w/b/c", "w/d", "other/x", "wx/a"):
        pub.publish(broker.topic(name), name.encode(), qos=1, retain=True)
    got = _retained_for_new_subscriber(broker, pub, broker.topic(filt))
    assert sorted(m.payload.decode() for m in got) == sorted(expected)
    assert all(m.retain for m in got)


@brokers("retain")
def test_resubscribe_resends_retained(broker):
    """MQTT-3.8.4-3: a SUBSCRIBE replacing an existing subscription re-sends the
    matching retained messages."""
    t = broker.topic("r")
    _pub, sub = _subscribed_after_retained(broker, t)
    sub.wait_messages(1, t)
    sub.subscribe(t, 1)
    got = sub.wait_messages(2, t)
    assert [(m.payload, m.retain) for m in got] == [(b"state", True)] * 2


@brokers("retain")
def test_retained_on_dollar_topic_not_sent_to_leading_wildcard(broker):
    """MQTT-4.7.2-1 for retained messages: a `#` subscription does not receive
    a retained message of a `$` topic; `$bt/<uid>/#` does."""
    uid = broker.prefix.split("/")[1]
    pub = broker.connect(PUB)
    pub.publish(f"$bt/{uid}/r", b"dollar", qos=1, retain=True)
    pub.publish(broker.topic("r"), b"normal", qos=1, retain=True)
    got = _retained_for_new_subscriber(broker, pub, "#", qos=0)
    assert not [m for m in got if m.topic.startswith("$")]
    assert [m.payload for m in got if m.topic == broker.topic("r")] == [b"normal"]
    d = broker.connect(SUB)
    d.subscribe(f"$bt/{uid}/#", 1)
    assert d.wait_messages(1)[0].payload == b"dollar"
