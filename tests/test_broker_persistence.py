"""Persistence: retained messages and clean-session-0
sessions (subscriptions, queued QoS 1 messages) survive a graceful restart
(SIGTERM, start again on the same port and data). Mosquitto runs with
`persistence true` here; each test has its own broker."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("broker_fixtures")   # before its import: its asserts report values
from broker_fixtures import Broker, Mosquitto, brokers, gw_server  # noqa: E402


class Restartable:
    """A broker of one kind that the test can restart with its state on disk."""

    def __init__(self, kind: str, base):
        self.kind, self.base = kind, base
        self.proc = None
        self.broker: Broker | None = None
        self.start()

    def start(self):
        if self.kind == "mosquitto":
            port = self.proc.port if self.proc else None
            self.proc = Mosquitto(self.base, persistence=True, port=port).start()
        else:
            ports = dict(self.proc.ports) if self.proc else None
            self.proc = gw_server(self.base, ports).start()
        self.broker = Broker(self.proc, self.kind, "persistence")
        return self.broker

    def restart(self) -> Broker:
        """Graceful stop (the broker saves its state), then start on the same port."""
        prefix = self.broker.prefix
        self.broker.close_all()
        self.proc.stop()
        b = self.start()
        b.prefix = prefix          # same topic names and client ids after the restart
        return b

    def stop(self):
        if self.broker is not None:
            self.broker.close_all()
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture
def restartable(request, tmp_path):
    r = Restartable(request.param, tmp_path / request.param)
    yield r
    r.stop()


@brokers("retain", "persistence", argname="restartable")
def test_retained_survives_restart(restartable):
    """A retained message set before the restart is sent (RETAIN=1) to a
    subscriber after it."""
    b = restartable.broker
    t = b.topic("r")
    pub = b.connect(0)
    pub.publish(t, b"kept-across-restart", qos=1, retain=True)
    b = restartable.restart()
    sub = b.connect(1)
    b.assert_workers((sub, 1))
    sub.subscribe(t, 1)
    [m] = sub.wait_messages(1, t)
    assert (m.payload, m.retain) == (b"kept-across-restart", True)


@brokers("routing", "sessions", "persistence", argname="restartable")
def test_clean_session_0_survives_restart(restartable):
    """The subscription and the QoS 1 message queued for the offline client are
    on disk: after the restart the client (on the other worker) gets session
    present 1 and the message, and the subscription still routes."""
    b = restartable.broker
    cid, t = b.client_id("persist"), b.topic("t")
    sub = b.connect(0, client_id=cid, clean_session=False)
    sub.subscribe(t, 1)
    sub.disconnect()
    pub = b.connect(0)
    pub.publish(t, b"queued", qos=1)
    b = restartable.restart()
    back = b.connect(1, client_id=cid, clean_session=False)
    assert back.session_present is True
    assert back.wait_messages(1, t)[0].payload == b"queued"
    pub = b.connect(0)
    b.assert_workers((back, 1), (pub, 0))
    pub.publish(t, b"after-restart", qos=1)
    assert [m.payload for m in back.wait_messages(2, t)] == [b"queued", b"after-restart"]
