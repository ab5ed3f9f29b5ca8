"""What subscriptions cost in a running `gw serve --workers 2`, read from each
worker's subscription-index gauge: a filter's first subscriber adds it to its
own worker's index and, as peer interest, to the other's; unsubscribing,
a clean session's end and a persistent session's end return every byte on
both workers; 2,000 filters of 128 levels cost about their own bytes, not a
node per level."""

from __future__ import annotations

import socket

from conftest import HOST, packet, mqtt_str, subscribe_packet, wait_for
from broker_fixtures import RawClient

FILTERS = ["/".join(f"f{k}" if j == 3 else f"level{j}" for j in range(128)) for k in range(2000)]


def index_bytes(server) -> list[int]:
    from gw.stats import Counter
    return [int(v) for v in server.block().rows[:, Counter.SUBSCRIPTION_INDEX_BYTES]]


def raw(server) -> RawClient:
    return RawClient(socket.create_connection((HOST, server.ports["mqtt"]), 10), None)


def send_in_fragments(client: RawClient, data: bytes, size: int = 7919) -> None:
    for i in range(0, len(data), size):
        client.send(data[i:i + size])


def unsubscribe_packet(packet_id: int, filters) -> bytes:
    return packet(0xA2, packet_id.to_bytes(2, "big") + b"".join(mqtt_str(f) for f in filters))


def test_subscriptions_cost_their_bytes_and_return_them_on_both_workers(gw_factory):
    server = gw_factory(workers=2, listeners=("mqtt",))
    baseline = index_bytes(server)
    size = sum(len(f) for f in FILTERS)
    for clean in (True, False):
        client = raw(server)
        client.connect(b"memory-%d" % clean, clean=clean)
        for pid, part in ((1, FILTERS[:1000]), (2, FILTERS[1000:])):    # each under max_packet_size
            send_in_fragments(client, subscribe_packet(pid, [(f, 1) for f in part]))
            assert client.read_until(0x90, 30)[2:] == bytes([1]) * len(part)
        # The SUBACK waits for the peer: both indexes hold every filter now.
        wait_for(lambda: all(b > b0 + size for b, b0 in zip(index_bytes(server), baseline)), 10,
                 what="both workers' indexes grown")
        grown = [b - b0 for b, b0 in zip(index_bytes(server), baseline)]
        assert max(grown) < size + len(FILTERS) * 250, grown     # not ~128 nodes of ~100 bytes each
        send_in_fragments(client, unsubscribe_packet(3, FILTERS[:1000]))
        client.read_until(0xB0, 30)
        client.disconnect()
        if not clean:                  # a persistent session keeps its subscriptions while away
            wait_for(lambda: server.counters()["sessions_away"] == 1, 10, what="the session away")
            assert index_bytes(server) != baseline
            ender = raw(server)
            ender.connect(b"memory-0", clean=True)      # ends the persistent session
            ender.disconnect()
        wait_for(lambda: index_bytes(server) == baseline, 10,
                 what=f"every byte back on both workers ({index_bytes(server)} vs {baseline})")
        assert server.counters()["subscriptions_current"] == 0
