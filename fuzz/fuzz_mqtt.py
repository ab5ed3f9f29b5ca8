"""Fuzz target `mqtt`: a worker's MQTT listener, driven one loop turn at a time.

An input is a program (fuzz/common.py, Scenario): its first byte picks the
worker's set-up (one worker, or two with the harness playing the other, which
is the home of half the client ids; small limits; ack mode sink; the telemetry
schema), then client connections sharing four client ids write byte streams
(raw input bytes and valid packets, bits flipped) in fragments the input cuts,
with loop turns, closes mid-packet and resets in between. At the end every
client goes, the worker must hold no connection and no session, and a fresh
client must get its CONNACK.

    ./dev fuzz mqtt 60
"""

from __future__ import annotations

import common  # the import path of the instrumented build first; the fuzzing loop
from common import (CLIENT_IDS, DISCONNECT, FILTERS, PINGREQ, READING, TOPICS, Scenario,
                    WorkerUnderTest, ack_packet, connack_new, connect_packet, publish_packet, run_scenario,
                    shared_harness, subscribe_packet, unsubscribe_packet)

# Limit profiles the first byte picks: the defaults, small packets, a tight
# outbound buffer and windows (closes from inside the handlers), both.
PROFILES = (
    {},
    {"max_packet_size": 300},
    {"max_outbound": 600, "soft_outbound": 300, "max_inflight": 2, "max_queued": 4, "queue_high": 1,
     "queue_low": 0},
    {"max_packet_size": 300, "max_outbound": 600, "soft_outbound": 300, "max_inflight": 1, "max_queued": 2,
     "queue_high": 1, "queue_low": 0, "max_retained": 2},
)


def mqtt_template(inp) -> bytes:
    """A valid MQTT packet from the pools (it may still break the session's rules)."""
    kind = inp.byte() % 13
    if kind in (0, 11):
        will = None
        if kind == 11:
            will = (inp.pick(TOPICS), b"gone", inp.byte() % 3, bool(inp.byte() & 1))
        cid = inp.pick(CLIENT_IDS + (b"",))
        flags = inp.byte()
        return connect_packet(cid, clean=not (flags & 1), keepalive=(flags >> 1) & 3, will=will,
                              level=3 if flags & 0x80 else 4)
    if kind in (1, 12):
        qos = inp.byte() % 3
        topic = inp.pick(TOPICS)
        size = inp.byte()
        payload = READING % (size, size) if topic.startswith(b"telemetry/") and size & 1 else b"p" * size
        return publish_packet(topic, payload, qos, inp.byte() + 1, retain=bool(size & 2), dup=bool(size & 4))
    if kind == 2:
        n = inp.byte() % 3 + 1
        return subscribe_packet(inp.byte() + 1, [(inp.pick(FILTERS), inp.byte() % 3) for _ in range(n)])
    if kind == 3:
        return unsubscribe_packet(inp.byte() + 1, [inp.pick(FILTERS) for _ in range(inp.byte() % 2 + 1)])
    if 4 <= kind <= 7:
        return ack_packet(kind, inp.byte() % 8 + 1)     # PUBACK, PUBREC, PUBREL, PUBCOMP
    if kind == 8:
        return PINGREQ
    if kind == 9:
        return DISCONNECT
    # A CONNECT with packets right behind it, read together.
    return (connect_packet(inp.pick(CLIENT_IDS), clean=True) + subscribe_packet(1, [(b"#", 1)])
            + publish_packet(inp.pick(TOPICS), b"x", 1, 2) + PINGREQ)


class MqttScenario(Scenario):
    def template(self, inp) -> bytes:
        return mqtt_template(inp)


def setup_of(first: int) -> dict:
    return dict(nworkers=2 if first & 1 else 1, limits=PROFILES[(first >> 1) & 3], ack_sink=bool(first & 8),
                telemetry=not first & 16)


def TestOneInput(data: bytes) -> None:
    first = data[0] if data else 0
    wut = WorkerUnderTest(shared_harness(), protos=("mqtt",), **setup_of(first))
    run_scenario(wut, lambda: MqttScenario(wut, data[1:], "mqtt"),
                 connect_packet(b"fresh", clean=True), connack_new)


def main() -> None:
    common.fuzz(TestOneInput)


if __name__ == "__main__":
    main()
