"""Shared subscriptions, $share/{ShareName}/{filter} (MQTT 5.0 section 4.8.2),
for 3.1.1 clients: each message matching a group's filter goes to exactly one
member of the group, wherever the members are connected; each group gets its
copy, and so does a plain subscription beside them. Each test runs on
Mosquitto 2.0.11 (the reference) and on gw with 2 workers, the members placed
on both workers and the publisher on one of them; what gw is specified to do
beyond Mosquitto (redelivering a leaving member's messages to another member)
runs on gw only, saying so."""

from __future__ import annotations

import struct
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

pytest.register_assert_rewrite("broker_fixtures")   # before its import: its asserts report values
from broker_fixtures import brokers, publish_packet_full, unsubscribe_packet  # noqa: E402
from conftest import wait_for  # noqa: E402

pytest_plugins = ["broker_fixtures"]    # the broker_proc and broker fixtures

W0, W1 = 0, 1
SUBACK_FAILURE = 0x80


def members(broker, group: str, filt: str, qos: int, n: int = 4):
    """n paho members of $share/{group}/{filt}, alternately on workers 0 and 1."""
    out = []
    for i in range(n):
        c = broker.connect(i % 2)
        assert c.subscribe(f"$share/{group}/{filt}", qos) == [qos]
        out.append(c)
    return out


def payloads(clients, topic):
    return [m.payload for c in clients for m in c.received(topic)]


def wait_total(clients, topic, count, timeout=10.0):
    wait_for(lambda: len(payloads(clients, topic)) >= count, timeout,
             what=f"{count} messages across the members (got {len(payloads(clients, topic))})")


@brokers("routing")
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_each_message_goes_to_exactly_one_member(broker, qos):
    """4.8.2: a message matching a shared subscription goes to one member of
    the group; here 4 members on 2 workers, each gets its share."""
    t, g = broker.topic("s"), uuid.uuid4().hex[:8]
    ms = members(broker, g, t, qos)
    pub = broker.connect(W0)
    n = 80
    sent = [f"m{i}".encode() for i in range(n)]
    for p in sent:
        pub.publish(t, p, qos=qos)
    wait_total(ms, t, n)        # QoS 0 too: only a slow reader's are shed, and none is slow here
    time.sleep(broker.grace)
    got = payloads(ms, t)
    assert sorted(got) == sorted(sent), "each message once, to one member"
    counts = [len(c.received(t)) for c in ms]
    assert all(counts), f"every member got some: {counts}"
    if broker.is_gw:
        # The publisher's worker picks round-robin over the 4 members: an even split.
        assert max(counts) - min(counts) <= n // 10, counts


@brokers("routing")
def test_groups_and_a_plain_subscription_each_get_their_copy(broker):
    """4.8.2: several groups on one filter each get the message once; a
    non-shared subscription on it gets its own copy."""
    t = broker.topic("c")
    ga = members(broker, "ga", t, 1, 2)
    gb = members(broker, "gb", t, 1, 2)
    plain = broker.connect(W1)
    assert plain.subscribe(t, 1) == [1]
    pub = broker.connect(W0)
    for i in range(10):
        pub.publish(t, b"%d" % i, qos=1)
    wait_total(ga, t, 10)
    wait_total(gb, t, 10)
    plain.wait_messages(10, t)
    time.sleep(broker.grace)
    assert sorted(payloads(ga, t)) == sorted(b"%d" % i for i in range(10))
    assert sorted(payloads(gb, t)) == sorted(b"%d" % i for i in range(10))
    assert [m.payload for m in plain.received(t)] == [b"%d" % i for i in range(10)]


@brokers("routing")
def test_wildcard_filter_of_a_group(broker):
    """The group's filter may hold wildcards; members on both workers."""
    base = broker.topic("w")
    ms = members(broker, "gw", base + "/+/x", 1, 2)
    pub = broker.connect(W0)
    for i in range(6):
        pub.publish(f"{base}/{i}/x", b"%d" % i, qos=1)
    pub.publish(f"{base}/a/y", b"no", qos=1)
    wait_for(lambda: sum(len(c.received()) for c in ms) >= 6, broker.wait, what="6 messages")
    time.sleep(broker.grace)
    assert sorted(m.payload for c in ms for m in c.received()) == [b"%d" % i for i in range(6)]


@brokers("routing", gw_only="Mosquitto 2.0.11 grants these to a 3.1.1 client (SUBACK 0x01, seen on the "
                            "wire); gw refuses them as MQTT 5.0 4.8.2 defines them malformed, with the 0x80 "
                            "3.1.1 has for a subscription the server will not make")
def test_malformed_share_filters_refused_with_0x80(broker):
    """4.8.2: ShareName at least one character, no '/', '+' or '#'; a filter
    after it. A bad one is refused alone: the other filters of the SUBSCRIBE stand.
    ($share/g#/f is no valid 3.1.1 filter at all: the connection closes, MQTT-4.7.1-2.)"""
    t = broker.topic("m")
    c = broker.raw(W1)
    codes = c.subscribe(1, [("$share//" + t, 1), ("$share/+/" + t, 1),
                            ("$share/g", 1), ("$share/g/", 1), (t, 1), ("$share/ok/" + t, 1)])
    assert codes == [SUBACK_FAILURE] * 4 + [1, 1]
    assert broker.server.counters()["shared_subscriptions"]["refused"] >= 4


@brokers("retain")
def test_retained_messages_not_sent_on_a_shared_subscription(broker):
    """MQTT 5.0 4.8.2 (and 3.8.4 Retain Handling): retained messages are not
    sent to a shared subscription when it is made; a plain one gets them."""
    t, done = broker.topic("r"), broker.topic("rdone")
    pub = broker.connect(W0)
    pub.publish(t, b"kept", qos=1, retain=True)
    shared = broker.connect(W1)
    assert shared.subscribe([(f"$share/g/{t}", 1), (done, 1)]) == [1, 1]
    plain = broker.connect(W1)
    assert plain.subscribe(t, 1) == [1]
    [m] = plain.wait_messages(1, t)
    assert m.retain and m.payload == b"kept"
    broker.settle(pub, shared, done)
    pub.publish(t, b"", qos=1, retain=True)       # clear it
    # A live message on the topic still reaches the group.
    pub.publish(t, b"live", qos=1)
    wait_for(lambda: any(m.payload == b"live" for m in shared.received(t)), broker.wait, what="live message")
    at_subscribe = [m.payload for m in shared.received(t) if m.retain]
    broker.assert_standard(at_subscribe, [], mosquitto_2011=[b"kept"],
                           why="it sends retained messages to a new shared subscription of a 3.1.1 client")


@brokers("routing")
def test_unsubscribe_removes_the_member(broker):
    """UNSUBSCRIBE $share/g/f: that member gets nothing more of the group; the
    others get everything."""
    t, done = broker.topic("u"), broker.topic("udone")
    a, b = members(broker, "g", t, 1, 2)
    assert a.subscribe(done, 1) == [1]
    a.unsubscribe(f"$share/g/{t}")
    pub = broker.connect(W0)
    for i in range(20):
        pub.publish(t, b"%d" % i, qos=1)
    b.wait_messages(20, t)
    broker.settle(pub, a, done)
    assert a.received(t) == []


@brokers("routing", gw_only="Mosquitto 2.0.11 drops the in-flight messages of a clean-session member "
                            "that leaves; gw gives them to another member of the group (the standard allows "
                            "it, MQTT 5.0 4.8.2)")
@pytest.mark.parametrize("how", ["reset", "disconnect"])
def test_member_leaving_with_qos1_in_flight_loses_nothing(broker, how):
    """A member (clean session) that receives QoS 1 messages and never
    acknowledges them leaves mid-stream: the group's other member, on the
    other worker, gets every message the leaver had not acknowledged."""
    t = broker.topic("k")
    keeper = broker.connect(W0)
    assert keeper.subscribe(f"$share/g/{t}", 1) == [1]
    leaver = broker.raw(W1)
    assert leaver.subscribe(1, [(f"$share/g/{t}", 1)]) == [1]
    pub = broker.connect(W0)
    n = 60
    for i in range(n):
        pub.publish(t, b"%d" % i, qos=1, wait=False)
    # The leaver holds some, unacknowledged.
    got = [leaver.read_publish()]
    assert got[0].qos == 1
    for i in range(n):
        pub.publish(t, b"more%d" % i, qos=1, wait=False)
    leaver.reset() if how == "reset" else leaver.disconnect()
    everything = {b"%d" % i for i in range(n)} | {b"more%d" % i for i in range(n)}
    wait_for(lambda: set(m.payload for m in keeper.received(t)) >= everything, broker.wait,
             what=f"every message at the member that stayed (missing "
                  f"{sorted(everything - set(m.payload for m in keeper.received(t)))[:5]}...)")
    if broker.is_gw:
        assert broker.server.counters()["shared_subscriptions"]["redelivered"] >= 1


@brokers("sessions", gw_only="Mosquitto 2.0.11 keeps picking an away member and queues for it; gw gives "
                             "the messages to a connected member when there is one (MQTT 5.0 4.8.2 lets "
                             "the server choose)")
def test_away_persistent_member_is_passed_over_while_another_is_connected(broker):
    t = broker.topic("p")
    cid = broker.client_id("away")
    away = broker.connect(W1, client_id=cid, clean_session=False)
    assert away.subscribe(f"$share/g/{t}", 1) == [1]
    here = broker.connect(W0)
    assert here.subscribe(f"$share/g/{t}", 1) == [1]
    away.disconnect()
    pub = broker.connect(W0)
    for i in range(20):
        pub.publish(t, b"%d" % i, qos=1)
    here.wait_messages(20, t)
    here.disconnect()
    # Nobody connected: the away member's session queues them.
    for i in range(5):
        pub.publish(t, b"q%d" % i, qos=1)
    back = broker.connect(W0, client_id=cid, clean_session=False)     # the session moves to worker 0
    assert back.session_present
    try:
        back.wait_messages(5, t)
    except AssertionError:
        raise AssertionError(f"{broker.server.counters()['shared_subscriptions']} here got "
                             f"{[m.payload for m in here.received(t)][-8:]}")
    assert sorted(m.payload for m in back.received(t)) == sorted(b"q%d" % i for i in range(5))
    # Its shared subscription came with the session.
    pub.publish(t, b"after", qos=1)
    wait_for(lambda: any(m.payload == b"after" for m in back.received(t)), broker.wait, what="after")


@brokers("routing")
def test_publish_on_a_share_topic_reaches_no_group(broker):
    """A topic name starting with $share/ is no shared subscription's topic:
    the group on the filter after it does not get it."""
    t, done = broker.topic("n"), broker.topic("ndone")
    m = broker.connect(W1)
    assert m.subscribe([(f"$share/g/{t}", 1), (done, 1)]) == [1, 1]
    pub = broker.raw(W0)
    pub.send(publish_packet_full(f"$share/g/{t}", b"x", 1, 7))
    assert struct.unpack("!H", pub.read_until(0x40))[0] == 7
    pub2 = broker.connect(W0)
    broker.settle(pub2, m, done)
    assert m.received(f"$share/g/{t}") == [] and m.received(t) == []


@brokers("routing")
def test_same_client_unsubscribing_through_raw_packets(broker):
    """UNSUBSCRIBE of a filter never subscribed, shared or not, is answered."""
    c = broker.raw(W1)
    c.send(unsubscribe_packet(3, ["$share/none/x", "$share/g/" + broker.topic("z")]))
    body = c.read_until(0xB0)
    assert struct.unpack("!H", body)[0] == 3


# --- persistence: a persistent member's shared subscription survives a restart ---------------

@pytest.fixture
def restartable(request, tmp_path):
    from test_broker_persistence import Restartable
    r = Restartable(request.param, tmp_path / request.param)
    yield r
    r.stop()


@brokers("sessions", "persistence", argname="restartable")
def test_shared_subscription_of_a_persistent_session_survives_restart(restartable):
    """clean_session=0 keeps the shared subscription on disk: after a graceful
    restart the member, back on the other worker, gets what was queued for it
    and is a member of its group again (the publisher on the other worker)."""
    b = restartable.broker
    cid, t = b.client_id("shp"), b.topic("sp")
    m = b.connect(0, client_id=cid, clean_session=False)
    assert m.subscribe(f"$share/g/{t}", 1) == [1]
    m.disconnect()
    pub = b.connect(0)
    pub.publish(t, b"queued", qos=1)
    b = restartable.restart()
    back = b.connect(1, client_id=cid, clean_session=False)
    assert back.session_present is True
    assert back.wait_messages(1, t)[0].payload == b"queued"
    pub = b.connect(0)
    b.assert_workers((back, 1), (pub, 0))
    for i in range(5):
        pub.publish(t, b"after%d" % i, qos=1)
    try:
        back.wait_messages(6, t, timeout=None if b.is_gw else 3)
    except AssertionError:
        pass        # the assertion below says what came
    b.assert_standard([m.payload for m in back.received(t)], [b"queued"] + [b"after%d" % i for i in range(5)],
                      mosquitto_2011=[b"queued"],
                      why="a persistent session's shared subscription is not restored after a restart")


# --- the pick, against a model ------------------------------------------------------------------

@brokers("routing", gw_only="the exact split is gw's pick (round-robin over the workers weighted by their "
                            "connected members, then round-robin on each worker); Mosquitto's is its own")
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["join", "leave", "publish"]), st.integers(0, 3), st.integers(1, 2)),
                min_size=3, max_size=8))
def test_pick_against_model(broker, ops):
    """Members join and leave a group (members 0, 2 on worker 0; 1, 3 on worker
    1), a publisher on either worker sends batches of c x (members) QoS 1
    messages. The model: every message of a batch goes to exactly one member
    of the group as it was, and each member gets exactly c of the batch (the
    counts are confirmed everywhere before a batch: a SUBSCRIBE adding
    interest waits for every peer, so a leaver subscribes a fresh topic after
    its UNSUBSCRIBE)."""
    g = uuid.uuid4().hex[:8]
    t = broker.topic("model-" + g)
    clients = [broker.connect(i % 2) for i in range(4)]
    pubs = [broker.connect(0), broker.connect(1)]
    joined: set[int] = set()
    seen = [0] * 4
    batch_no = 0
    try:
        for op, who, c in ops:
            if op == "join" and who not in joined:
                assert clients[who].subscribe(f"$share/{g}/{t}", 1) == [1]
                joined.add(who)
            elif op == "leave" and who in joined:
                clients[who].unsubscribe(f"$share/{g}/{t}")
                assert clients[who].subscribe(broker.topic(uuid.uuid4().hex[:8]), 0) == [0]
                joined.discard(who)
            elif op == "publish" and joined:
                batch_no += 1
                n = c * len(joined)
                for k in range(n):
                    pubs[who % 2].publish(t, b"%d-%d" % (batch_no, k), qos=1, wait=False)
                pubs[who % 2].publish(t, b"", qos=1)      # the last one waited for: all sent
                wait_for(lambda: sum(len(x.received(t)) for x in clients) - sum(seen) >= n + 1, broker.wait,
                         what=f"batch {batch_no}")
                time.sleep(broker.grace)
                now = [len(x.received(t)) for x in clients]
                got = [now[i] - seen[i] for i in range(4)]
                assert sum(got) == n + 1, got
                assert all(got[i] == 0 for i in range(4) if i not in joined), (got, joined)
                # the empty closing message goes to one of them: c each, one c + 1
                assert sorted(got[i] for i in joined) == [c] * (len(joined) - 1) + [c + 1], (got, joined, c)
                seen = now
        everything = [m.payload for x in clients for m in x.received(t)]
        assert len(everything) == len(set(everything)) + max(batch_no - 1, 0), "a message delivered twice"
    finally:
        for x in clients + pubs:
            x.disconnect()
