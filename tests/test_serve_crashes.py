"""Regression tests for inputs that once killed a worker.

Each test sends what crashed a worker of `gw serve` on its defaults, checks the
protocol's answer, and that every worker is still the process it was (no
death, no respawn) and still serves a fresh client.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from conftest import (CONNACK_OK, connect_packet, mqtt_client, mqtt_str, packet, ping, publish_packet,
                      read_packet, recv_exact, sanitizer_rss_slack, subscribe_packet, tcp_connect, wait_closed)


def assert_workers_unchanged(server, pids_before: list[int]) -> None:
    """No worker died during the test: the same processes, none respawned."""
    assert server.worker_pids() == pids_before, server.log()[-3000:]
    assert "died" not in server.log(), server.log()[-3000:]


def place_on_worker(server, index: int, attempts: int = 60) -> socket.socket:
    """A TCP connection (nothing sent yet) held by worker `index`; misplaced
    attempts are reset before they sent anything."""
    pids = server.worker_pids()
    for _ in range(attempts):
        sock = tcp_connect(server.ports["mqtt"])
        if server.which_worker(sock.getsockname()[1]) == pids[index]:
            return sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    raise AssertionError(f"no connection landed on worker {index} in {attempts} attempts")


def fresh_client_served(server) -> None:
    sock = mqtt_client(server.ports["mqtt"], client_id=f"fresh-{time.monotonic_ns()}")
    try:
        ping(sock)
    finally:
        sock.close()


# --- a CONNECT in two TCP segments --------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_connect_in_two_segments(gw_factory, workers):
    """The first byte of CONNECT, then the rest a moment later (a slow link, a TLS
    record boundary): CONNACK, and packets sent right after it in the same
    segment are handled too."""
    server = gw_factory(workers=workers, listeners=("mqtt",))
    pids = server.worker_pids()
    for i in range(8):      # with 2 workers, client ids homed on both
        sock = tcp_connect(server.ports["mqtt"])
        try:
            data = connect_packet(f"split-{i}") + b"\xc0\x00"      # CONNECT, then PINGREQ
            sock.sendall(data[:1])
            time.sleep(0.1)
            sock.sendall(data[1:])
            assert read_packet(sock) == CONNACK_OK
            assert read_packet(sock) == (0xD0, b"")
        finally:
            sock.close()
    assert_workers_unchanged(server, pids)
    fresh_client_served(server)


@pytest.mark.parametrize("cut", [1, 2, 5, 13])
def test_connect_and_publish_cut_anywhere(gw_factory, cut):
    """CONNECT + SUBSCRIBE + PUBLISH in one stream cut at `cut`, then byte by byte."""
    server = gw_factory(workers=1, listeners=("mqtt",))
    pids = server.worker_pids()
    stream = (connect_packet(f"cut-{cut}") + subscribe_packet(1, [("cut/t", 1)])
              + publish_packet("cut/t", b"x" * 10, qos=1, packet_id=7))
    sock = tcp_connect(server.ports["mqtt"])
    try:
        sock.sendall(stream[:cut])
        time.sleep(0.05)
        for i in range(cut, len(stream)):
            sock.sendall(stream[i:i + 1])
            time.sleep(0.002)
        assert read_packet(sock) == CONNACK_OK
        kinds = {read_packet(sock)[0] >> 4 for _ in range(3)}
        assert kinds == {9, 3, 4}       # SUBACK, the PUBLISH to itself, PUBACK
    finally:
        sock.close()
    assert_workers_unchanged(server, pids)


# --- QoS 2 ids awaiting PUBREL, and the in-flight window, past 32,768 ----------------------------

def test_qos2_awaiting_pubrel_bound_disconnects(gw_factory):
    """Past max_awaiting_rel the publisher is disconnected (counted), others unharmed."""
    server = gw_factory(workers=1, listeners=("mqtt",), args=["--max-awaiting-rel", "10"])
    pids = server.worker_pids()
    sock = mqtt_client(server.ports["mqtt"], client_id="qos2-bound")
    try:
        sock.sendall(b"".join(publish_packet("q2/t", b"", qos=2, packet_id=i) for i in range(1, 12)))
        got = wait_closed(sock)
        assert got == b"".join(struct.pack("!BBH", 0x50, 2, i) for i in range(1, 11))
    finally:
        sock.close()
    server.wait_counter("limits.awaiting_rel", 1)
    assert_workers_unchanged(server, pids)
    fresh_client_served(server)


def test_inflight_window_past_32768(gw_factory):
    """max_inflight 40,000 and a subscriber that never acknowledges: the window
    grows past 32,768 entries without overflowing."""
    n = 33000
    server = gw_factory(workers=1, listeners=("mqtt",), args=["--max-inflight", "40000",
                                                               "--max-queued", "40000"])
    pids = server.worker_pids()
    sub = mqtt_client(server.ports["mqtt"], client_id="inflight-sub")
    pub = mqtt_client(server.ports["mqtt"], client_id="inflight-pub")
    try:
        sub.sendall(subscribe_packet(1, [("w/t", 1)]))
        assert read_packet(sub)[0] == 0x90
        pub.sendall(b"".join(publish_packet("w/t", b"", qos=1, packet_id=(i % 65535) + 1) for i in range(n)))
        recv_exact(pub, 4 * n)      # every PUBACK
        got = 0
        while got < n:
            first, _ = read_packet(sub)
            assert first >> 4 == 3
            got += 1
        ping(sub)
    finally:
        sub.close()
        pub.close()
    assert_workers_unchanged(server, pids)
    fresh_client_served(server)


# --- Python exceptions on the data path ----------------------------------------------------------

def test_json_lines_nested_5000_deep(gw_factory):
    """A JSON-lines message nested 5,000 deep gets an Error answer; the worker lives."""
    server = gw_factory(workers=1, listeners=("mqtt", "json"))
    pids = server.worker_pids()
    sock = tcp_connect(server.ports["json"])
    try:
        sock.sendall(b'{"message_type":"Connect","client_id":"deep-1"}\n')
        sock.settimeout(10)
        reply = json.loads(sock.makefile("rb").readline())
        assert reply["message_type"] == "Connect"
        deep = b'{"message_type":"Data","payload":' + b"[" * 5000 + b"]" * 5000 + b"}\n"
        sock.sendall(deep)
        line = sock.makefile("rb").readline()
        assert json.loads(line)["message_type"] == "Error"
    finally:
        sock.close()
    assert_workers_unchanged(server, pids)
    fresh_client_served(server)


def test_session_with_70000_subscriptions_moves_between_workers(gw_factory):
    """A persistent session with more than 65,535 subscriptions reconnects on the
    other worker: it moves whole, and a message on its last filter arrives."""
    n = 70000
    server = gw_factory(workers=2, listeners=("mqtt",), args=["--max-subscriptions", str(n + 10)])
    pids = server.worker_pids()
    first = place_on_worker(server, 0)
    first.sendall(connect_packet("many-subs", clean=False))
    assert read_packet(first) == CONNACK_OK
    per_packet = 20000
    for k, start in enumerate(range(0, n, per_packet)):
        filters = [(f"m/{i}", 1) for i in range(start, min(n, start + per_packet))]
        first.sendall(subscribe_packet(k + 1, filters))
        assert read_packet(first, timeout=60)[0] == 0x90
    first.close()
    second = place_on_worker(server, 1)
    try:
        second.sendall(connect_packet("many-subs", clean=False))
        assert read_packet(second, timeout=30) == (0x20, b"\x01\x00")     # session present
        pub = mqtt_client(server.ports["mqtt"], client_id="many-subs-pub")
        pub.sendall(publish_packet(f"m/{n - 1}", b"last", qos=1, packet_id=1))
        assert read_packet(pub)[0] == 0x40
        first_byte, body = read_packet(second, timeout=30)
        assert first_byte >> 4 == 3 and body.endswith(b"last")
        pub.close()
    finally:
        second.close()
    assert_workers_unchanged(server, pids)


# --- bounds on what a client can make the server hold ---------------------------------------------

def send_in_fragments(sock, data: bytes, seed: int) -> None:
    """Writes data cut at random points (1-byte writes included), with pauses."""
    import random

    rng = random.Random(seed)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 1, 2, 3, 7, 64, 1000))
        sock.sendall(data[pos:pos + step])
        pos += step
        if rng.random() < 0.2:
            time.sleep(0.001)


def suback_codes(sock) -> list[int]:
    first, body = read_packet(sock)
    assert first == 0x90
    return list(body[2:])


@pytest.mark.parametrize("fragmented", [False, True])
def test_subscription_bounds(gw_factory, fragmented):
    server = gw_factory(workers=2, listeners=("mqtt",),
                        args=["--max-subscriptions", "3", "--max-topic-levels", "4", "--max-topic-length", "12"])
    pids = server.worker_pids()
    sock = mqtt_client(server.ports["mqtt"], client_id=f"bounds-{fragmented}")
    send = (lambda d: send_in_fragments(sock, d, 7)) if fragmented else sock.sendall
    try:
        send(subscribe_packet(1, [("a/b/c/d/e", 0), ("x" * 13, 0), ("a/b/c/d", 1), ("s/1", 0)]))
        assert suback_codes(sock) == [0x80, 0x80, 1, 0]
        send(subscribe_packet(2, [("s/2", 1), ("s/3", 1), ("s/1", 2)]))
        assert suback_codes(sock) == [1, 0x80, 2]        # a replaced QoS is no new subscription
        ping(sock)
    finally:
        sock.close()
    c = server.wait_counter("limits.subscriptions", 1)
    assert c["closed_limit"] == 0
    assert c["limits"] == {**c["limits"], "topic_levels": 1, "topic_length": 1, "subscriptions": 1}
    assert_workers_unchanged(server, pids)


def test_one_mib_subscribe_of_deep_filters(gw_factory):
    """A SUBSCRIBE of almost 1 MiB: 15 filters of 32,767 levels each (491,000
    trie nodes, about 50 MB in every worker once) is refused filter by filter
    (SUBACK 0x80) without building their nodes in any worker."""
    import psutil

    server = gw_factory(workers=2, listeners=("mqtt",))
    pids = server.worker_pids()
    rss = {p: psutil.Process(p).memory_info().rss for p in pids}
    sock = mqtt_client(server.ports["mqtt"], client_id="deep-filter")
    try:
        deep = "/".join(["a"] * 32_766)
        filters = [(f"{i:x}/{deep}", 1) for i in range(15)]
        send_in_fragments(sock, subscribe_packet(1, filters), 3)
        assert suback_codes(sock) == [0x80] * 15
        ping(sock)
    finally:
        sock.close()
    grown = {p: psutil.Process(p).memory_info().rss - rss[p] for p in pids}
    assert max(grown.values()) < (8 << 20) + sanitizer_rss_slack(), grown
    assert_workers_unchanged(server, pids)


def test_queued_bytes_bound_for_an_away_session(gw_factory):
    server = gw_factory(workers=1, listeners=("mqtt",), args=["--max-queued-bytes", "5000"])
    sub = mqtt_client(server.ports["mqtt"], client_id="qb-sub", keepalive=60)
    sub.close()
    sub = tcp_connect(server.ports["mqtt"])
    sub.sendall(connect_packet("qb-sub", clean=False))
    assert read_packet(sub) == CONNACK_OK
    sub.sendall(subscribe_packet(1, [("qb/t", 1)]))
    assert read_packet(sub)[0] == 0x90
    sub.sendall(b"\xe0\x00")        # DISCONNECT: the session waits, queueing
    sub.close()
    pub = mqtt_client(server.ports["mqtt"], client_id="qb-pub")
    try:
        for i in range(10):
            pub.sendall(publish_packet("qb/t", bytes([i]) * 996, qos=1, packet_id=i + 1))
            assert read_packet(pub)[0] == 0x40
    finally:
        pub.close()
    counters = server.wait_counter("limits.queued_bytes", 5)
    assert counters["dropped_queue_full"] == 5
    sub = tcp_connect(server.ports["mqtt"])
    try:
        sub.sendall(connect_packet("qb-sub", clean=False))
        assert read_packet(sub) == (0x20, b"\x01\x00")
        got = [read_packet(sub)[1][-1] for _ in range(5)]
        assert got == [0, 1, 2, 3, 4]
    finally:
        sub.close()


def test_retained_bytes_bound(gw_factory):
    server = gw_factory(workers=2, listeners=("mqtt",), args=["--max-retained-bytes", "1000",
                                                               "--sys-interval", "0"])
    pub = mqtt_client(server.ports["mqtt"], client_id="rb-pub")
    try:
        def retain(topic, payload):
            body = mqtt_str(topic) + payload
            pub.sendall(packet(0x31, body))
        retain("r/1", b"x" * 400)
        retain("r/2", b"x" * 400)
        retain("r/3", b"x" * 400)       # 1,209 bytes: refused
        retain("r/1", b"x" * 100)       # a smaller replacement fits
        retain("r/3", b"x" * 400)       # and now there is room
        ping(pub)
    finally:
        pub.close()
    server.wait_counter("limits.retained_bytes", 1)
    sub = mqtt_client(server.ports["mqtt"], client_id="rb-sub")
    try:
        sub.sendall(subscribe_packet(1, [("r/#", 0)]))
        assert read_packet(sub)[0] == 0x90
        sizes = sorted(len(read_packet(sub)[1]) - 5 for _ in range(3))
        assert sizes == [100, 400, 400]
    finally:
        sub.close()


def test_answers_held_for_the_log_are_bounded_per_connection(gw_factory):
    """Ack mode sink with a slow group commit: a publisher sending 50,000 QoS 1
    readings without waiting has at most HELD_MAX_PER_CONN answers held (then it
    is not read until they go out); every PUBACK arrives, in order."""
    server = gw_factory(workers=1, listeners=("mqtt",),
                        args=["--ack", "sink", "--wal-batch-ms", "1000", "--max-inflight", "65535"])
    pids = server.worker_pids()
    sock = mqtt_client(server.ports["mqtt"], client_id="held-many")
    try:
        n = 50000
        reading = b'{"metrics":{"t":1}}'
        stream = b"".join(publish_packet("telemetry/held-many", reading, qos=1, packet_id=(i % 65535) + 1)
                          for i in range(n))
        import threading

        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], server.counters()["acks_held"])
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            send_in_fragments(sock, stream[:500], 11)
            sock.sendall(stream[500:])
            got = recv_exact(sock, 4 * n)
        finally:
            done.set()
            sampler.join()
        # 4,096 held, plus what the read that passed the bound brought (at most
        # 256 KiB of these 44-byte PUBLISHes): never all 50,000.
        size = len(stream) // n
        assert size == 44
        assert 0 < peak[0] <= 4096 + 256 * 1024 // size, peak
        ids = [struct.unpack_from("!BBH", got, 4 * i) for i in range(n)]
        assert ids == [(0x40, 2, (i % 65535) + 1) for i in range(n)]
        ping(sock)
    finally:
        sock.close()
    assert server.counters()["acks_held"] == 0
    assert_workers_unchanged(server, pids)
