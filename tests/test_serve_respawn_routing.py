"""Routing survives a worker's crash: the respawned worker says HELLO,
its peers forget the interests of its previous life and tell it theirs, and
send it the retained store; a client of the crashed worker reconnects and is
routed as before. Raw sockets, two workers, clients placed on both."""

from __future__ import annotations

import os
import signal
import uuid

from conftest import (connect_packet, packet, publish_packet, read_packet, subscribe_packet,
                      tcp_connect, wait_for)


def connect(port, client_id):
    sock = tcp_connect(port)
    sock.sendall(connect_packet(client_id.encode()))
    ptype, body = read_packet(sock)
    assert ptype >> 4 == 2 and body[1] == 0
    return sock


def on_worker(server, want_pid, client_id):
    """A connection held by the worker with pid want_pid (reconnect until it is)."""
    for _ in range(200):
        sock = connect(server.ports["mqtt"], client_id)
        if server.which_worker(sock.getsockname()[1]) == want_pid:
            return sock
        sock.close()
    raise AssertionError(f"could not place a client on worker {want_pid}")


def subscribe(sock, topic_filter, qos=0):
    sock.sendall(subscribe_packet(1, [(topic_filter, qos)]))
    ptype, body = read_packet(sock)
    assert ptype >> 4 == 9 and body[2] == qos


def retained_publish(topic: str, payload: bytes) -> bytes:
    """PUBLISH QoS 0 with RETAIN=1."""
    return packet(0x31, len(topic).to_bytes(2, "big") + topic.encode() + payload)


def expect_publish(sock, topic, payload):
    ptype, body = read_packet(sock)
    assert ptype >> 4 == 3, f"expected PUBLISH, got type {ptype >> 4}"
    tlen = int.from_bytes(body[:2], "big")
    assert body[2:2 + tlen].decode() == topic
    assert body[2 + tlen:] == payload


def test_routing_and_retained_after_a_worker_is_killed(gw_factory):
    server = gw_factory(workers=2, listeners=("mqtt",))
    a, b = server.worker_pids()
    prefix = f"crash/{uuid.uuid4().hex[:8]}"
    # A subscriber on worker a; a retained message set from worker b.
    sub = on_worker(server, a, "sub-a")
    subscribe(sub, f"{prefix}/#")
    pub = on_worker(server, b, "pub-b")
    pub.sendall(retained_publish(f"{prefix}/kept", b"retained-before"))
    expect_publish(sub, f"{prefix}/kept", b"retained-before")
    # Kill worker b: its publisher's connection dies with it.
    server.expect_worker_deaths(1)
    os.kill(b, signal.SIGKILL)
    new = wait_for(lambda: [p for p in server.worker_pids() if p not in (a, b)], 10,
                   what="a respawned worker")[0]
    # A publisher on the respawned worker reaches the subscriber on a...
    pub2 = on_worker(server, new, "pub-new")
    pub2.sendall(publish_packet(f"{prefix}/after", b"hello-from-new"))
    expect_publish(sub, f"{prefix}/after", b"hello-from-new")
    # ...and a subscriber on the respawned worker gets live messages from a,
    # and the retained message its new process learnt from its peers.
    sub2 = on_worker(server, new, "sub-new")
    subscribe(sub2, f"{prefix}/#")
    ptype, body = read_packet(sub2)
    assert ptype >> 4 == 3 and ptype & 1, "the retained message, RETAIN=1 (MQTT-3.3.1-6)"
    assert body.endswith(b"retained-before")
    pub_a = on_worker(server, a, "pub-a")
    pub_a.sendall(publish_packet(f"{prefix}/live", b"from-a"))
    expect_publish(sub2, f"{prefix}/live", b"from-a")
    for s in (sub, pub2, sub2, pub_a):
        s.close()
