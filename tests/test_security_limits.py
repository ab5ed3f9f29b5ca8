"""Rate limits enforced by backpressure (gw_ext/worker/rate_limits.pyx): a
client over max_messages_rate / max_bytes_rate is read more slowly and loses
nothing; other clients are not slowed; a paused client's keepalive does not
run out; max_connections_per_ip counts across workers; max_conn_rate slows a
burst of connects without refusing any. Real `gw serve`, real sockets; bounds
are on counts, never on timing."""

from __future__ import annotations

import socket
import struct
import threading
import time
import urllib.request

import pytest

from conftest import (CONNACK_OK, PINGREQ, connect_packet, publish_packet, read_packet, run_gw,
                      send_fragmented, subscribe_packet, tcp_connect, wait_for)
from gw.stats import Counter

PUBACK = 0x40


def mqtt_session(port: int, client_id: bytes, keepalive: int = 60) -> socket.socket:
    sock = tcp_connect(port)
    sock.sendall(connect_packet(client_id, keepalive=keepalive))
    assert read_packet(sock) == CONNACK_OK
    return sock


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the server closed (EOF or reset) without sending anything."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def metrics_text(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['http']}/metrics", timeout=10) as res:
        return res.read().decode()


def metric_value(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in /metrics")


def test_message_rate_slows_a_publisher_and_loses_nothing(gw_factory, frag_rng):
    """max_messages_rate 20/s, burst 10: 120 QoS 1 publishes written at once (in
    fragments, so packets are cut across the pauses) reach a subscriber at
    most at burst + rate x elapsed (with slack), then all of them, in order,
    each acknowledged."""
    rate, burst, total = 20, 10, 120
    server = gw_factory(workers=2, listeners=("mqtt", "http"),
                        args=["--max-messages-rate", rate, "--max-messages-burst", burst])
    port = server.ports["mqtt"]
    sub = mqtt_session(port, b"rate-sub")
    sub.sendall(subscribe_packet(1, [(b"rate/t", 1)]))
    assert read_packet(sub)[0] == 0x90
    pub = mqtt_session(port, b"rate-pub")
    data = b"".join(publish_packet(b"rate/t", b"m%03d" % i, qos=1, packet_id=i + 1) for i in range(total))
    started = time.monotonic()
    # The server stops reading the publisher: write from a thread.
    writer = threading.Thread(target=send_fragmented, args=(pub, data, frag_rng), kwargs={"pause": 0.0005})
    writer.start()
    got = []
    checked = False
    while len(got) < total:
        first, body = read_packet(sub, timeout=30)
        assert first & 0xF0 == 0x30, first
        tlen = struct.unpack("!H", body[:2])[0]
        pid = struct.unpack("!H", body[2 + tlen:4 + tlen])[0]
        got.append(body[4 + tlen:])
        sub.sendall(bytes([PUBACK, 2]) + struct.pack("!H", pid))
        if not checked and len(got) >= 30:
            # The server read at most burst + rate x (time since the first byte was
            # sent): 30 messages take at least (30 - 10) / 20 = 1 s. Slack: 5 messages.
            elapsed = time.monotonic() - started
            assert len(got) <= burst + rate * elapsed + 5, (len(got), elapsed)
            checked = True
    writer.join(30)
    assert got == [b"m%03d" % i for i in range(total)]      # every one, once, in order
    acks = [read_packet(pub, timeout=30) for _ in range(total)]
    assert acks == [(PUBACK, struct.pack("!H", i + 1)) for i in range(total)]
    counters = server.stats()["counters"]
    assert counters["rate_limits"]["pauses"]["max_messages_rate"] >= 1
    assert counters["closed_timeout"] == 0
    wait_for(lambda: server.counters()["rate_limits"]["clients_paused"] == 0, 10,
             what="no client paused any more")
    text = metrics_text(server)
    assert metric_value(text, 'gw_rate_limit_pauses_total{limit="max_messages_rate"}') >= 1
    assert metric_value(text, "gw_rate_limited_clients") == 0


def test_a_paused_client_does_not_slow_another_one(gw_factory):
    """One worker: while a publisher over max_messages_rate is not read, another
    client of the same worker gets its PINGRESP."""
    server = gw_factory(workers=1, listeners=("mqtt",),
                        args=["--max-messages-rate", 1, "--max-messages-burst", 1])
    port = server.ports["mqtt"]
    pub = mqtt_session(port, b"slowed")
    pub.sendall(b"".join(publish_packet(b"slow/t", b"x", qos=0) for _ in range(30)))
    wait_for(lambda: server.counters()["rate_limits"]["clients_paused"] >= 1, 10, what="the publisher paused")
    other = mqtt_session(port, b"other")
    other.sendall(PINGREQ)
    assert read_packet(other) == (0xD0, b"")
    assert server.counters()["rate_limits"]["clients_paused"] >= 1      # the publisher still waits
    assert server.counters()["rate_limits"]["pauses"]["max_messages_rate"] >= 1


def test_keepalive_does_not_expire_while_the_server_pauses_the_client(gw_factory):
    """max_bytes_rate 200 B/s, burst 1024 (= max_packet_size): two 1000-byte
    publishes leave the client owing about 1000 bytes, about 5 s of pause,
    longer than 1.5 x its 2 s keepalive. The third publish is cut across the
    pause. The client then says nothing for 4 s: it is not closed for its
    keepalive, and its PINGREQ is answered once it is read again."""
    server = gw_factory(workers=1, listeners=("mqtt",),
                        args=["--max-packet-size", 1024, "--max-bytes-rate", 200, "--max-bytes-burst", 1024])
    port = server.ports["mqtt"]
    pub = mqtt_session(port, b"paused", keepalive=2)
    big = [publish_packet(b"ka/t", bytes([65 + i]) * 990, qos=0) for i in range(3)]
    pub.sendall(big[0] + big[1] + big[2][:500])
    wait_for(lambda: server.counters()["rate_limits"]["clients_paused"] >= 1, 10, what="the client paused")
    time.sleep(0.5)
    pub.sendall(big[2][500:])
    time.sleep(4.0)             # over 1.5 x keepalive, all of it paused: no PINGREQ from the client
    pub.sendall(PINGREQ)
    assert read_packet(pub, timeout=30) == (0xD0, b"")
    counters = server.counters()
    assert counters["closed_timeout"] == 0
    assert counters["rate_limits"]["pauses"]["max_bytes_rate"] >= 1
    assert counters["packets_in"]["publish"] == 3


def test_max_connections_per_ip_across_workers(gw_factory):
    """max_connections_per_ip 3 with 2 workers: three connections from 127.0.0.1
    are served; a fourth is closed right after accept, on whichever worker it
    lands (both refuse: the count is shared); once one of the three closes, a
    new one is served."""
    server = gw_factory(workers=2, listeners=("mqtt", "http"), args=["--max-connections-per-ip", 3])
    port = server.ports["mqtt"]
    held = [mqtt_session(port, b"ip-%d" % i) for i in range(3)]

    def refused_per_worker():
        return [int(row[Counter.PER_IP_REFUSED]) for row in server.block().rows]

    attempts = 0
    while not all(refused_per_worker()):
        attempts += 1
        assert attempts <= 60, refused_per_worker()
        extra = tcp_connect(port)
        try:
            extra.sendall(connect_packet(b"ip-extra"))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_by_server(extra)
        extra.close()
    for sock in held:       # still served
        sock.sendall(PINGREQ)
        assert read_packet(sock) == (0xD0, b"")
    held.pop().close()

    def served_again():
        sock = tcp_connect(port)
        try:
            sock.sendall(connect_packet(b"ip-again"))
            return sock if read_packet(sock, timeout=5) == CONNACK_OK else None
        except (EOFError, ConnectionResetError, BrokenPipeError, socket.timeout):
            sock.close()
            return None

    held.append(wait_for(served_again, 15, interval=0.2, what="a connection served after one closed"))
    counters = server.stats()["counters"]
    assert counters["rate_limits"]["per_ip_refused"] >= 2
    server.wait_log("max_connections_per_ip")
    for sock in held:
        sock.close()
    # /metrics comes from 127.0.0.1 too: once the MQTT connections are gone.
    text = wait_for(lambda: try_metrics(server), 15, interval=0.2, what="/metrics served")
    assert metric_value(text, "gw_connections_per_ip_refused_total") >= 2


def try_metrics(server):
    try:
        return metrics_text(server)
    except OSError:
        return None


def test_connection_rate_slows_a_burst_without_refusing(gw_factory):
    """max_conn_rate 40/s, burst 10, 2 workers: 200 clients connecting at once
    all get their CONNACK (the backlog holds them), none refused, and the
    listeners paused."""
    server = gw_factory(workers=2, listeners=("mqtt", "http"),
                        args=["--max-conn-rate", 40, "--max-conn-burst", 10, "--connect-timeout", 60])
    port = server.ports["mqtt"]
    socks = []
    for i in range(200):
        sock = tcp_connect(port, timeout=60)
        sock.sendall(connect_packet(b"burst-%d" % i))
        socks.append(sock)
    for sock in socks:
        assert read_packet(sock, timeout=60) == CONNACK_OK
    counters = server.stats()["counters"]
    assert counters["rate_limits"]["pauses"]["max_conn_rate"] >= 1
    assert counters["conns_rejected"] == 0
    assert counters["mqtt_connected"] == 200
    assert metric_value(metrics_text(server), 'gw_rate_limit_pauses_total{limit="max_conn_rate"}') >= 1
    for sock in socks:
        sock.close()


def test_byte_burst_below_max_packet_size_is_refused(tmp_path):
    res = run_gw("serve", "--max-bytes-rate", "1000", "--max-bytes-burst", "100", "--data-dir", tmp_path / "data",
                 "--certs", tmp_path / "certs", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "'max_bytes_burst'" in res.stderr and "max_packet_size" in res.stderr


def test_a_dead_workers_connections_no_longer_count_for_their_address(gw_factory):
    """max_connections_per_ip 2, one worker: it holds two connections from
    127.0.0.1 and is killed; the master gives their counts back, so the
    respawned worker serves two new ones."""
    import os
    import signal

    server = gw_factory(workers=1, listeners=("mqtt",), args=["--max-connections-per-ip", 2])
    port = server.ports["mqtt"]
    held = [mqtt_session(port, b"dead-%d" % i) for i in range(2)]
    refused = tcp_connect(port)
    assert closed_by_server(refused)
    old = server.worker_pids()
    server.expect_worker_deaths(1)
    os.kill(old[0], signal.SIGKILL)
    wait_for(lambda: server.worker_pids() and server.worker_pids() != old, 20, what="the worker respawned")
    for sock in held + [refused]:
        sock.close()
    fresh = [wait_for(lambda i=i: try_session(port, b"new-%d" % i), 20, interval=0.2, what="served again")
             for i in range(2)]
    for sock in fresh:
        sock.close()


def try_session(port: int, client_id: bytes):
    try:
        return mqtt_session(port, client_id)
    except (EOFError, OSError):
        return None


def test_rate_limits_reload_with_sighup(gw_factory, tmp_path):
    """A SIGHUP with max_messages_rate set in the config file: from then on a
    publisher over it is paused (no restart, connections kept)."""
    import signal

    config = tmp_path / "gw.toml"
    config.write_text("max_messages_rate = 0\n")
    server = gw_factory(workers=1, listeners=("mqtt",), config=config)
    port = server.ports["mqtt"]
    pub = mqtt_session(port, b"reload-pub")
    pub.sendall(b"".join(publish_packet(b"r/t", b"x", qos=0) for _ in range(20)))
    pub.sendall(PINGREQ)
    assert read_packet(pub) == (0xD0, b"")
    assert server.counters()["rate_limits"]["pauses"]["max_messages_rate"] == 0
    config.write_text("max_messages_rate = 1\nmax_messages_burst = 1\n")
    server.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in server.log(), 10, what="the reload")

    def paused():
        pub.sendall(publish_packet(b"r/t", b"y", qos=0) * 5)
        return server.counters()["rate_limits"]["pauses"]["max_messages_rate"] >= 1

    wait_for(paused, 20, interval=0.5, what="the publisher paused after the reload")


@pytest.mark.parametrize("listener", ["json", "jsons"])
def test_message_rate_on_json_lines_keeps_every_line(gw_factory, listener):
    """JSON lines (plain and TLS) over max_messages_rate 10/s, burst 5: 40 lines
    that each get an answer (an Error), written at once, are answered at most
    at burst + rate x elapsed (with slack), and every one of them is."""
    import json

    from conftest import client_tls_context, tls_connect

    rate, burst, total = 10, 5, 40
    server = gw_factory(workers=1, listeners=("json", "jsons"),
                        args=["--max-messages-rate", rate, "--max-messages-burst", burst])
    if listener == "json":
        sock = tcp_connect(server.ports["json"])
    else:
        sock = tls_connect(server.ports["jsons"], client_tls_context(server.ca))
    started = time.monotonic()
    sock.sendall(json.dumps({"message_type": "Connect", "client_id": "lines", "timestamp": time.time()}).encode()
                 + b"\n" + b'["not a message"]\n' * total)
    answers, buf, checked = [], b"", False
    sock.settimeout(30)
    while len(answers) < total + 1:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            answers.append(json.loads(line))
        if not checked and len(answers) >= 20:
            elapsed = time.monotonic() - started
            assert len(answers) <= burst + rate * elapsed + 3, (len(answers), elapsed)
            checked = True
    assert answers[0]["payload"] == "Connected"
    assert all(a["message_type"] == "Error" for a in answers[1:])
    counters = server.counters()
    assert counters["json_errors"] == total
    assert counters["rate_limits"]["pauses"]["max_messages_rate"] >= 1
    sock.close()


def test_message_rate_on_http_ingest_answers_every_request(gw_factory):
    """HTTP ingest over max_messages_rate 4/s, burst 2 (each request body a
    message): 12 pipelined requests on one connection are all answered 202,
    in order, after the connection was paused; its http_timeout does not cut
    the requests waiting meanwhile."""
    from http_client import HttpConn, ingest_body

    server = gw_factory(workers=1, listeners=("http",),
                        args=["--max-messages-rate", 4, "--max-messages-burst", 2, "--http-timeout", 1])
    conn = HttpConn(server.ports["http"], timeout=30)
    rate, burst, total = 4, 2, 12
    started = time.monotonic()
    for seq in range(total):
        conn.request("POST", "/v1/ingest/rate-dev", ingest_body(seq=seq), send_only=True)
    answers = [conn.read_response(timeout=30) for _ in range(8)]
    elapsed = time.monotonic() - started        # 8 answers take at least (8 - 2) / 4 = 1.5 s
    assert len(answers) <= burst + rate * elapsed + 2, elapsed
    answers += [conn.read_response(timeout=30) for _ in range(total - 8)]
    assert [a.status for a in answers] == [202] * total
    counters = server.counters()
    assert counters["rate_limits"]["pauses"]["max_messages_rate"] >= 1
    assert counters["ingest_records_accepted"] == total
    assert counters["http_timeouts"] == 0


def test_a_paused_client_is_not_read(gw_factory):
    """While a rate limit pauses a publisher, the server does not read its
    socket (no EPOLLIN): of 16 MiB the publisher tries to write, the server's
    received bytes grow by no more than a little per resume, not by what
    the client keeps sending; what was read waits, unprocessed."""
    server = gw_factory(workers=1, listeners=("mqtt",),
                        args=["--max-messages-rate", 2, "--max-messages-burst", 1])
    pub = mqtt_session(server.ports["mqtt"], b"flood")
    packet = publish_packet(b"flood/t", b"p" * 1000, qos=0)
    data = packet * (16 * 1024 * 1024 // len(packet))
    stop = threading.Event()

    def flood():
        try:
            pub.settimeout(60)
            pub.sendall(data)
        except OSError:
            pass        # closed at the end of the test
        stop.set()

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    wait_for(lambda: server.counters()["rate_limits"]["clients_paused"] >= 1, 10, what="the publisher paused")
    before, t0 = server.counters()["bytes_in"], time.monotonic()
    time.sleep(1.0)
    grown, elapsed = server.counters()["bytes_in"] - before, time.monotonic() - t0
    # Each resume (2/s) reads at most one read buffer (256 KiB); unpaused, the
    # loop would read the whole 16 MiB at once.
    assert grown <= 300 * 1024 * (1 + 2 * elapsed), (grown, elapsed)
    assert not stop.is_set()        # the publisher is still blocked writing
    assert server.counters()["packets_in"]["publish"] <= 1 + 2 * (time.monotonic() - t0 + 10)
    pub.close()
    writer.join(10)


def test_pauses_are_logged_once_per_reason_not_per_message(gw_factory):
    """Two publishers kept over their limits for seconds, one by
    max_messages_rate (small messages), one by max_bytes_rate (large ones),
    and a burst of connections over max_conn_rate: each is paused many times,
    and each reason is logged once (at most once per 10 s), naming the setting
    and the client's id and address, or the listener."""
    server = gw_factory(workers=1, listeners=("mqtt",),
                        args=["--max-messages-rate", 10, "--max-messages-burst", 5, "--max-packet-size", 1024,
                              "--max-bytes-rate", 2000, "--max-bytes-burst", 1024, "--max-conn-rate", 10,
                              "--max-conn-burst", 2, "--connect-timeout", 60])
    port = server.ports["mqtt"]
    started = time.monotonic()
    small = mqtt_session(port, b"many-small")
    large = mqtt_session(port, b"few-large")
    sends = [(small, [publish_packet(b"log/s", b"s" * 20, qos=1, packet_id=i + 1) for i in range(30)]),
             (large, [publish_packet(b"log/l", b"L" * 900, qos=1, packet_id=i + 1) for i in range(6)])]
    writers = [threading.Thread(target=sock.sendall, args=(b"".join(packets),)) for sock, packets in sends]
    for t in writers:
        t.start()
    more = []
    for i in range(12):                 # over the listener's burst: it pauses
        sock = tcp_connect(port, timeout=60)
        sock.sendall(connect_packet(b"conn-%d" % i))
        more.append(sock)
    for sock in more:
        assert read_packet(sock, timeout=60) == CONNACK_OK
        sock.close()
    for sock, packets in sends:         # every publish read and acknowledged
        assert [read_packet(sock, timeout=60)[0] for _ in packets] == [PUBACK] * len(packets)
    for t in writers:
        t.join(30)
    elapsed = time.monotonic() - started
    pauses = server.counters()["rate_limits"]["pauses"]
    assert pauses["max_messages_rate"] >= 3 and pauses["max_bytes_rate"] >= 3, pauses
    assert pauses["max_conn_rate"] >= 1, pauses
    log = server.log()
    once = 1 + int(elapsed // 10)       # at most one line per reason per 10 s
    lines = {reason: [line for line in log.splitlines() if f"paused: over {reason}" in line]
             for reason in ("max_messages_rate", "max_bytes_rate")}
    lines["max_conn_rate"] = [line for line in log.splitlines() if "paused: max_conn_rate" in line]
    for reason, found in lines.items():
        assert 1 <= len(found) <= once, (reason, found, elapsed)
    (message_line, *_), (byte_line, *_) = lines["max_messages_rate"], lines["max_bytes_rate"]
    assert "client 'many-small'" in message_line and "max_messages_rate (10 per second" in message_line
    assert f"127.0.0.1:{server.peer_port(small.getsockname()[1])}" in message_line
    assert "client 'few-large'" in byte_line and "max_bytes_rate (2000 bytes per second" in byte_line
    assert f"127.0.0.1:{server.peer_port(large.getsockname()[1])}" in byte_line
    assert f"listener mqtt 127.0.0.1:{server.listen_ports['mqtt']} paused" in lines["max_conn_rate"][0]
    small.close()
    large.close()
