"""`$SYS/broker/...` topics, as Mosquitto publishes them
(here with `sys_interval 1`): clients/connected, messages/received, uptime,
version; figures for the whole broker (both gw workers), and never matched by
a leading wildcard (MQTT-4.7.2-1)."""

from __future__ import annotations

import re

import pytest

pytest.register_assert_rewrite("broker_fixtures")   # before its import: its asserts report values
from broker_fixtures import brokers  # noqa: E402
from conftest import wait_for  # noqa: E402

pytest_plugins = ["broker_fixtures"]    # the broker_proc and broker fixtures

REQUIRED = ("$SYS/broker/clients/connected", "$SYS/broker/messages/received",
            "$SYS/broker/uptime", "$SYS/broker/version")
SYS_WAIT = 15.0      # a few publication intervals


def _sys_wait(broker) -> float:
    return SYS_WAIT if broker.wait > 2 else broker.wait


def _latest(client, topic):
    got = client.received(topic)
    return got[-1].payload.decode() if got else None


@brokers("sys")
def test_sys_topics_exist(broker):
    """Subscribing to `$SYS/#` yields at least clients/connected,
    messages/received, uptime and version, each in Mosquitto's format."""
    sub = broker.connect(0)
    assert sub.subscribe("$SYS/#", 0) == [0]
    wait_for(lambda: all(sub.received(t) for t in REQUIRED), _sys_wait(broker),
             what=f"{REQUIRED}, got {sorted({m.topic for m in sub.received()})}")
    assert re.fullmatch(r"\d+", _latest(sub, "$SYS/broker/clients/connected"))
    assert re.fullmatch(r"\d+", _latest(sub, "$SYS/broker/messages/received"))
    assert re.fullmatch(r"\d+ seconds", _latest(sub, "$SYS/broker/uptime"))
    assert _latest(sub, "$SYS/broker/version").strip()


@brokers("sys")
def test_sys_clients_connected_counts_every_worker(broker):
    """clients/connected is the broker's total: with the subscriber and two more
    clients on the other worker, it reaches at least 3."""
    sub = broker.connect(0)
    others = [broker.connect(1), broker.connect(1)]
    broker.assert_workers((sub, 0), (others[0], 1), (others[1], 1))
    sub.subscribe("$SYS/broker/clients/connected", 0)
    wait_for(lambda: any(int(m.payload) >= 3 for m in sub.received()), _sys_wait(broker),
             what=f"clients/connected >= 3, got {[m.payload for m in sub.received()]}")


@brokers("sys")
def test_sys_uptime_and_messages_received_advance(broker):
    """uptime grows; messages/received grows after messages came in through the
    other worker."""
    sub = broker.connect(0)
    sub.subscribe([("$SYS/broker/uptime", 0), ("$SYS/broker/messages/received", 0)])
    pub = broker.connect(1)
    broker.assert_workers((sub, 0), (pub, 1))
    wait_for(lambda: sub.received("$SYS/broker/messages/received") and sub.received("$SYS/broker/uptime"),
             _sys_wait(broker), what="the first figures")
    first_rx = int(_latest(sub, "$SYS/broker/messages/received"))
    first_up = int(_latest(sub, "$SYS/broker/uptime").split()[0])
    for i in range(20):
        pub.publish(broker.topic("count"), b"x", qos=1)
    wait_for(lambda: int(_latest(sub, "$SYS/broker/messages/received")) >= first_rx + 20,
             _sys_wait(broker), what=f"messages/received >= {first_rx + 20}")
    wait_for(lambda: int(_latest(sub, "$SYS/broker/uptime").split()[0]) > first_up,
             _sys_wait(broker), what=f"uptime > {first_up}")


@brokers("sys")
def test_sys_not_matched_by_hash(broker):
    """MQTT-4.7.2-1: a `#` subscriber gets none of the `$SYS` messages that a
    `$SYS/#` subscriber gets meanwhile."""
    hash_sub = broker.connect(0)
    hash_sub.subscribe("#", 0)
    hash_sub.subscribe("+/broker/uptime", 0)
    sys_sub = broker.connect(1)
    sys_sub.subscribe("$SYS/broker/uptime", 0)
    broker.assert_workers((hash_sub, 0), (sys_sub, 1))
    wait_for(lambda: len(sys_sub.received()) >= 2, _sys_wait(broker), what="two uptime messages")
    assert not [m.topic for m in hash_sub.received() if m.topic.startswith("$")]
