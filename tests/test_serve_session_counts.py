"""A session's 16-bit counts cannot wrap, whatever a client sends: QoS 2
packet ids awaiting their PUBREL past 32,768 (where a doubling 16-bit
capacity used to wrap to 0: the list was freed under the session, then freed
again when the session ended)."""

from __future__ import annotations

import socket

from conftest import HOST, wait_for
from broker_fixtures import RawClient, ack_packet, publish_packet_full


def test_qos2_awaiting_pubrel_past_32768(gw_factory):
    """With max_awaiting_rel at its largest (every packet id)."""
    server = gw_factory(workers=1, listeners=("mqtt",), args=["--max-awaiting-rel", "65535"])
    [worker] = server.worker_pids()
    client = RawClient(socket.create_connection((HOST, server.ports["mqtt"]), 10), None)
    client.connect(b"qos2-many")
    count = 33_000
    stream = b"".join(publish_packet_full("q2/t", b"x", qos=2, packet_id=pid) for pid in range(1, count + 1))
    for i in range(0, len(stream), 4093):                  # fragments cutting packets anywhere
        client.send(stream[i:i + 4093])
    for pid in range(1, count + 1):
        body = client.read_until(0x50, 30)                 # PUBREC for each, in order
        assert int.from_bytes(body[:2], "big") == pid
    client.ping()
    for pid in range(1, 101):                              # some complete, the rest stay held
        client.send(ack_packet(0x62, pid))
        assert int.from_bytes(client.read_until(0x70, 10)[:2], "big") == pid
    client.disconnect()                                    # the session ends: its lists are freed once
    other = RawClient(socket.create_connection((HOST, server.ports["mqtt"]), 10), None)
    other.connect(b"after-qos2")
    other.ping()
    other.disconnect()
    wait_for(lambda: server.counters()["sessions_current"] == 0, 10, what="both sessions ended")
    assert server.worker_pids() == [worker]                # no crash, no respawn
    assert "Traceback" not in server.log()
