"""The Receive Maximum gw announces to an MQTT 5.0 client (max_awaiting_rel)
bounds the QoS 1/2 PUBLISHes the client may have unanswered (MQTT-3.3.4-7);
one more is DISCONNECT 0x93 (section 3.3.4). Unanswered: a QoS 2 message
until its PUBCOMP, and in ack mode sink a QoS 1 reading until its PUBACK,
which waits for the write-ahead log to be durable (gw_ext/worker/
durable_ack.pyx). Held PUBACKs count; PUBACKs already sent do not.

Real server (`gw serve --ack sink`, fsync batch of 1 s: after one group
commit the next waits a second, so the readings that follow it have their
PUBACKs held that long), a raw MQTT 5.0 socket (tests/mqtt5_ref.py), every
publish also written in fragments."""

from __future__ import annotations

import pytest

from test_mqtt5_connections import V5, unique  # first: it registers broker_fixtures for assertion rewriting
from test_mqtt5_conformance import _send, pub

from conftest import GwServer, get_counter, stop_and_check  # noqa: I001
from gw import packets5 as p5


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    s = GwServer(tmp_path_factory.mktemp("gw"), workers=1, listeners=("mqtt",),
                 args=["--ack", "sink", "--fsync", "batch", "--wal-batch-ms", "1000",
                       "--max-awaiting-rel", "2"]).start()
    yield s
    stop_and_check([s])


def reading(seq: int) -> bytes:
    return b'{"seq": %d, "metrics": {"v": 1}}' % seq


def primed(server: GwServer, device: str) -> V5:
    """A connected client whose first reading was acknowledged: the log's
    group commit just ran, so the next readings wait about a second for the
    next one, their PUBACKs held meanwhile."""
    c = V5(server.ports["mqtt"])
    ack = c.connect(device)
    assert ack.reason_code == 0 and ack.properties.receive_maximum == 2
    c.send(pub(f"telemetry/{device}".encode(), qos=1, pid=100, payload=reading(0)))
    got = c.read()
    assert (type(got), got.packet_id, got.reason_code) == (p5.Puback, 100, 0)
    return c


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
@pytest.mark.parametrize("second_qos", [1, 2])
def test_held_pubacks_count_against_the_receive_maximum(sink, fragmented, second_qos, frag_rng):
    """Receive Maximum 2: a QoS 1 reading whose PUBACK is held, a QoS 1 or 2
    one after it (2 unanswered), then a third: DISCONNECT 0x93, nothing
    else (the held PUBACKs of a closed connection are dropped)."""
    device = unique("rmin")
    topic = f"telemetry/{device}".encode()
    c = primed(sink, device)
    before = sink.counters()
    data = (pub(topic, qos=1, pid=1, payload=reading(1)) + pub(topic, qos=second_qos, pid=2, payload=reading(2))
            + pub(topic, qos=1, pid=3, payload=reading(3)))
    _send(c, data, fragmented, frag_rng)
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, 0x93)]
    after = sink.counters()
    assert after["mqtt5_disconnects"]["receive_maximum"] == before["mqtt5_disconnects"]["receive_maximum"] + 1
    assert get_counter(after, "limits.awaiting_rel") == get_counter(before, "limits.awaiting_rel") + 1


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
def test_a_client_within_the_receive_maximum_stays(sink, fragmented, frag_rng):
    """Receive Maximum 2, kept: a held QoS 1 reading and a QoS 2 one (its
    PUBREC held too) are answered once durable; with both flows complete
    (PUBCOMP), two more are taken again: no DISCONNECT, every reading
    answered."""
    device = unique("rmok")
    topic = f"telemetry/{device}".encode()
    c = primed(sink, device)
    for k in range(3):
        _send(c, pub(topic, qos=1, pid=1, payload=reading(2 * k + 1)) + pub(topic, qos=2, pid=2,
                                                                           payload=reading(2 * k + 2)),
              fragmented, frag_rng)
        got = c.read()
        assert (type(got), got.packet_id, got.reason_code) == (p5.Puback, 1, 0)
        got = c.read()
        assert (type(got), got.packet_id, got.reason_code) == (p5.Pubrec, 2, 0)
        c.send(p5.Pubrel(packet_id=2))
        got = c.read()
        assert (type(got), got.packet_id, got.reason_code) == (p5.Pubcomp, 2, 0)
    c.send(p5.Disconnect())
    assert c.closed() == []
