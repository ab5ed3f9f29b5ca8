"""The links between workers with a small socket buffer (`--channel-buffer`),
as on a stock kernel (net.core.wmem_max about 208 KiB), not this machine's
4 MiB: frames larger than one datagram (a big PUBLISH forwarded, a session
moving with its queue, the retained store sent to a restarted worker) arrive
whole, in pieces. Real `gw serve --workers 2`, real sockets, raw MQTT clients
placed on the worker each test needs."""

from __future__ import annotations

import os
import signal
import socket
import struct
import uuid

import pytest

from conftest import (connect_packet, publish_packet, read_packet, subscribe_packet, tcp_connect,
                      wait_for)

# SO_SNDBUF asked for: the kernel doubles it (32 KiB), so a link's datagrams are about 16 KiB.
SMALL_BUFFER = 16384


@pytest.fixture
def small_links(gw_factory):
    return gw_factory(workers=2, listeners=("mqtt",), args=["--channel-buffer", str(SMALL_BUFFER)])


def socket_on(server, pid: int) -> socket.socket:
    """A TCP connection to the MQTT port held by worker `pid`, nothing sent yet
    (misplaced attempts are reset before they sent a byte)."""
    for _ in range(80):
        sock = tcp_connect(server.ports["mqtt"])
        if server.which_worker(sock.getsockname()[1]) == pid:
            return sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    raise AssertionError(f"no connection landed on worker {pid}")


def connect_on(server, pid: int, client_id: str, clean: bool = True) -> tuple[socket.socket, int]:
    """An MQTT client on worker `pid`: (socket, session present)."""
    sock = socket_on(server, pid)
    sock.sendall(connect_packet(client_id, clean=clean))
    first, body = read_packet(sock, 20)
    assert first == 0x20 and body[1] == 0, (first, body)
    return sock, body[0] & 1


def subscribe(sock, topic_filter: str, qos: int) -> None:
    sock.sendall(subscribe_packet(1, [(topic_filter, qos)]))
    first, body = read_packet(sock, 20)
    assert first == 0x90 and body[2:] == bytes([qos]), (first, body)


def read_publish(sock, timeout: float = 20.0) -> tuple[int, str, bytes]:
    """The next PUBLISH (acknowledged if QoS 1): (first byte, topic, payload)."""
    while True:
        first, body = read_packet(sock, timeout)
        if first >> 4 == 3:
            break
    tlen = struct.unpack("!H", body[:2])[0]
    topic, rest = body[2:2 + tlen].decode(), body[2 + tlen:]
    if (first >> 1) & 3:
        sock.sendall(b"\x40\x02" + rest[:2])
        rest = rest[2:]
    return first, topic, rest


def puback(sock, packet_id: int) -> None:
    first, body = read_packet(sock, 20)
    assert (first, body) == (0x40, struct.pack("!H", packet_id)), (first, body)


def channel_figures(server) -> tuple[int, int, int]:
    c = server.counters()
    return c["channel_fragmented"], c["channel_drops"], c["channel_malformed"]


def test_a_publish_larger_than_a_datagram_reaches_a_subscriber_on_the_other_worker(small_links):
    server = small_links
    a, b = server.worker_pids()
    topic = f"big/{uuid.uuid4().hex[:6]}"
    payload = os.urandom(900_000)
    sub, _ = connect_on(server, b, "big-sub")
    pub, _ = connect_on(server, a, "big-pub")
    with sub, pub:
        subscribe(sub, topic, 1)
        pub.sendall(publish_packet(topic, payload, qos=1, packet_id=1))
        puback(pub, 1)
        first, got_topic, got = read_publish(sub)
        assert got_topic == topic and len(got) == len(payload) and got == payload
        # and QoS 0, and a small one after them, in order
        pub.sendall(publish_packet(topic, payload[::-1], qos=0) + publish_packet(topic, b"after", qos=0))
        assert read_publish(sub)[2] == payload[::-1]
        assert read_publish(sub)[2] == b"after"
    fragmented, drops, malformed = channel_figures(server)
    assert fragmented >= 2 and drops == 0 and malformed == 0


def test_a_session_with_500_queued_messages_moves_to_the_other_worker_whole(small_links):
    """A clean_session=0 client away with 500 queued 2 KB messages reconnects
    on the other worker: its session (about 1 MB) is sent over, and all 500
    arrive, in order."""
    server = small_links
    a, b = server.worker_pids()
    topic = f"q/{uuid.uuid4().hex[:6]}"
    cid = f"mover-{uuid.uuid4().hex[:6]}"
    sock, present = connect_on(server, a, cid, clean=False)
    with sock:
        assert present == 0
        subscribe(sock, topic, 1)
        sock.sendall(b"\xe0\x00")                  # DISCONNECT: the session stays, away
    wait_for(lambda: server.counters()["sessions_away"] == 1, 10, what="the session away")
    pub, _ = connect_on(server, a, "mover-pub")    # on the session's worker: queued before each PUBACK
    with pub:
        for i in range(500):
            pub.sendall(publish_packet(topic, b"%04d" % i + b"m" * 2044, qos=1, packet_id=i + 1))
            puback(pub, i + 1)
    back, present = connect_on(server, b, cid, clean=False)
    with back:
        assert present == 1
        got = [read_publish(back)[2] for _ in range(500)]
    assert [int(p[:4]) for p in got] == list(range(500))
    assert all(len(p) == 2048 for p in got)
    fragmented, drops, malformed = channel_figures(server)
    assert fragmented >= 1 and drops == 0 and malformed == 0


def test_a_restarted_worker_gets_every_retained_message(small_links):
    """1,000 retained messages of 1 KB: a worker killed and respawned gets the
    whole retained store from its peer (about 1 MB of frames) and answers a
    subscription on it with all of them."""
    server = small_links
    a, b = server.worker_pids()
    prefix = f"r/{uuid.uuid4().hex[:6]}"
    pub, _ = connect_on(server, a, "retain-pub")
    with pub:
        for i in range(1000):
            packet = publish_packet(f"{prefix}/{i}", b"%04d" % i + b"r" * 1020, qos=1, packet_id=i + 1)
            pub.sendall(bytes([packet[0] | 1]) + packet[1:])       # RETAIN
            puback(pub, i + 1)
    # A worker death this test causes on purpose: worker b is killed and respawned.
    server.expect_worker_deaths(1)
    os.kill(b, signal.SIGKILL)

    def after_respawn():
        # One look per poll: between two looks the killed worker may become a
        # zombie, and a list of two still holding it would pass for the respawn.
        pids = server.worker_pids()
        return pids if len(pids) == 2 and b not in pids else None
    respawned = next(p for p in wait_for(after_respawn, 20, what="the killed worker respawned") if p != a)

    def retained_seen():
        sub, _ = connect_on(server, respawned, f"retain-sub-{uuid.uuid4().hex[:4]}")
        with sub:
            subscribe(sub, f"{prefix}/#", 0)
            seen = set()
            try:
                while len(seen) < 1000:
                    first, topic, payload = read_publish(sub, 3)
                    assert first & 1, "not flagged RETAIN"
                    assert payload == b"%04d" % int(topic.rsplit("/", 1)[1]) + b"r" * 1020
                    seen.add(topic)
            except (socket.timeout, TimeoutError):
                pass
        return len(seen) == 1000
    wait_for(retained_seen, 30, interval=0.5, what="all 1,000 retained messages on the restarted worker")
    fragmented, drops, malformed = channel_figures(server)
    assert drops == 0 and malformed == 0
