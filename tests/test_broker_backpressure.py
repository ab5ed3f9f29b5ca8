"""QoS 1 backpressure (gw_ext/worker/backpressure.pyx): a subscriber whose
queue passes max_queued/4 holds every QoS 1/2 publisher (not read, so its
PUBACKs stop) until the queue drains; nothing acknowledged is lost. gw only:
Mosquitto drops past its queue instead."""

from __future__ import annotations

import socket
import struct
import threading
import time

from conftest import CONNACK_OK, connect_packet, publish_packet, read_packet, subscribe_packet, tcp_connect

PUBACK = 0x40


def mqtt_session(port: int, client_id: bytes) -> socket.socket:
    sock = tcp_connect(port)
    sock.sendall(connect_packet(client_id))
    assert read_packet(sock) == CONNACK_OK
    return sock


def pubacks_until_quiet(sock: socket.socket, quiet: float) -> set[int]:
    got = set()
    while True:
        try:
            first, body = read_packet(sock, quiet)
        except (socket.timeout, TimeoutError):
            return got
        assert first == PUBACK, hex(first)
        got.add(struct.unpack("!H", body)[0])


def test_a_publisher_on_a_reused_fd_is_held_and_nothing_is_lost(gw_factory):
    """A publisher whose connection took the fd of an earlier publisher (closed)
    is held all the same: the worker pauses the publishers it knows, not a
    stale entry. While the subscriber reads nothing, the publisher gets PUBACKs
    only for the first chunk it sent (what was read before the hold); once the
    subscriber reads and acknowledges, every message arrives once and every
    PUBLISH is acknowledged."""
    # The window (16) and a queue held past 2 both fill within the first chunk.
    server = gw_factory(workers=1, listeners=("mqtt",), args=["--max-inflight", 16, "--max-queued", 8])
    port = server.ports["mqtt"]
    sub = mqtt_session(port, b"bp-sub")
    sub.sendall(subscribe_packet(1, [(b"bp/#", 1)]))
    assert read_packet(sub)[0] == 0x90

    # An earlier publisher: becomes a publisher, then leaves; its fd is free again.
    early = mqtt_session(port, b"bp-early")
    early.sendall(publish_packet(b"other/x", b"x", qos=1, packet_id=1))
    assert read_packet(early) == (PUBACK, b"\x00\x01")
    early.close()
    time.sleep(0.2)

    pub = mqtt_session(port, b"bp-pub")
    chunk, chunks = 100, 5
    msgs = [publish_packet(b"bp/t", b"%06d" % i + b"p" * 90, qos=1, packet_id=i + 1)
            for i in range(chunk * chunks)]

    def send():
        for k in range(chunks):
            pub.sendall(b"".join(msgs[k * chunk:(k + 1) * chunk]))
            time.sleep(0.2)

    writer = threading.Thread(target=send, daemon=True)
    writer.start()
    # The subscriber reads nothing (for well under the 5 s after which it would
    # count as stalled): its window fills, its queue passes 2, the publisher is held.
    held = pubacks_until_quiet(pub, 1.5)
    writer.join(10)
    assert 0 < len(held) <= chunk, f"{len(held)} PUBACKs while the subscriber read nothing: not held"
    assert server.counters()["backpressure_events"] >= 1

    # The subscriber reads and acknowledges: everything arrives, once, in order.
    payloads = []
    deadline = time.monotonic() + 30
    while len(payloads) < chunk * chunks and time.monotonic() < deadline:
        first, body = read_packet(sub, 10)
        assert first >> 4 == 3 and (first >> 1) & 3 == 1, hex(first)
        tlen = struct.unpack("!H", body[:2])[0]
        pid = body[2 + tlen:4 + tlen]
        payloads.append(body[4 + tlen:4 + tlen + 6])
        sub.sendall(bytes([PUBACK, 2]) + pid)
    assert payloads == [b"%06d" % i for i in range(chunk * chunks)]
    acked = held | pubacks_until_quiet(pub, 2.0)
    assert acked == set(range(1, chunk * chunks + 1))
    assert server.counters()["dropped_queue_full"] == 0
    pub.close()
    sub.close()
