"""Keepalive (MQTT-3.1.2-24), connect timeout, TLS handshake timeout and the
JSON-lines idle timeout. Lower bounds ("still open after X") can only fail if
the server closes early; upper bounds are generous bounded waits."""

from __future__ import annotations

import json
import time

import pytest

from conftest import (PINGREQ, assert_counter_deltas, assert_open_for, client_tls_context, connect_packet,
                      counter_delta, mqtt_client, ping, tcp_connect, tls_connect, wait_closed)


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, args=["--connect-timeout", "0.5", "--json-timeout", "1"])


def test_silent_client_closed_after_one_and_a_half_keepalives(server):
    """MQTT-3.1.2-24: keepalive 1 s, then silence: still open at 1.0 s, closed
    (EOF) within 10 s, counted as closed_timeout."""
    before = server.counters()
    with mqtt_client(server.ports["mqtt"], "silent", keepalive=1) as sock:
        assert_open_for(sock, 1.0)
        assert wait_closed(sock, 10) == b""
    assert_counter_deltas(server, before, {"closed_timeout": 1, "closed_client": 0})


def test_silent_tls_client_closed_by_keepalive(server):
    before = server.counters()
    ctx = client_tls_context(server.ca)
    with mqtt_client(server.ports["mqtts"], "silent-tls", keepalive=1, tls=ctx) as sock:
        assert_open_for(sock, 1.0)
        wait_closed(sock, 10)
    assert counter_delta(before, server.counters(), "closed_timeout") == 1


def test_many_keepalives_expiring_together(server):
    """Several connections time out in the same tick, on both workers; the
    workers survive it (no respawn) and every one is closed."""
    pids = server.worker_pids()
    before = server.counters()
    socks = [mqtt_client(server.ports["mqtt"], f"together-{i}", keepalive=1) for i in range(12)]
    try:
        for sock in socks:
            wait_closed(sock, 10)
    finally:
        for sock in socks:
            sock.close()
    after = server.counters()
    assert counter_delta(before, after, "closed_timeout") == 12
    assert server.worker_pids() == pids
    assert "died" not in server.log()


def test_pings_keep_a_keepalive_1_client_open(server):
    before = server.counters()
    with mqtt_client(server.ports["mqtt"], "pinger", keepalive=1) as sock:
        deadline = time.monotonic() + 3.0           # two cut-off periods
        while time.monotonic() < deadline:
            ping(sock)
            time.sleep(0.4)
        ping(sock)
    assert counter_delta(before, server.counters(), "closed_timeout") == 0


def test_keepalive_zero_disables_the_timeout(server):
    with mqtt_client(server.ports["mqtt"], "forever", keepalive=0) as sock:
        assert_open_for(sock, 2.0)
        ping(sock)


def test_nothing_after_tcp_connect_closed_by_connect_timeout(server):
    before = server.counters()
    with tcp_connect(server.ports["mqtt"]) as sock:
        assert_open_for(sock, 0.3)
        assert wait_closed(sock, 10) == b""
    after = server.counters()
    assert counter_delta(before, after, "closed_connect_timeout") == 1


def test_half_a_connect_closed_by_connect_timeout(server):
    before = server.counters()
    with tcp_connect(server.ports["mqtt"]) as sock:
        sock.sendall(connect_packet(b"slow")[:9])
        wait_closed(sock, 10)
    assert_counter_deltas(server, before, {"closed_connect_timeout": 1, "mqtt_connected": 0})


def test_tls_client_that_never_handshakes(server):
    before = server.counters()
    with tcp_connect(server.ports["mqtts"]) as sock:
        assert_open_for(sock, 0.3)
        wait_closed(sock, 10)
    assert_counter_deltas(server, before, {"closed_connect_timeout": 1, "tls_handshakes": 0})


def test_tls_handshake_but_no_connect(server):
    before = server.counters()
    with tls_connect(server.ports["mqtts"], client_tls_context(server.ca)) as sock:
        wait_closed(sock, 10)
    assert_counter_deltas(server, before, {"closed_connect_timeout": 1, "tls_handshakes": 1})


def _json_connect(port, client_id="dev-1"):
    sock = tcp_connect(port)
    sock.sendall(json.dumps({"client_id": client_id, "message_type": "Connect",
                             "payload": None, "timestamp": time.time()}).encode() + b"\n")
    reply = json.loads(_read_line(sock))
    assert reply["message_type"] == "Connect" and reply["client_id"] == client_id
    return sock


def _read_line(sock, timeout=10):
    sock.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        assert chunk, "closed"
        buf += chunk
    return buf


def test_silent_json_client_closed_after_json_timeout(server):
    before = server.counters()
    with _json_connect(server.ports["json"]) as sock:
        assert_open_for(sock, 0.8)
        assert wait_closed(sock, 10) == b""
    assert counter_delta(before, server.counters(), "closed_timeout") == 1


def test_json_heartbeats_keep_it_open(server):
    before = server.counters()
    with _json_connect(server.ports["json"], "beating") as sock:
        deadline = time.monotonic() + 3.0           # three json_timeouts
        while time.monotonic() < deadline:
            sock.sendall(b'{"client_id": "beating", "message_type": "Heartbeat", "payload": null}\n')
            time.sleep(0.3)
        sock.sendall(b'{"message_type": "Connect"}\n')     # still there: it answers
        assert json.loads(_read_line(sock))["payload"] == "Connected"
    after = server.counters()
    assert counter_delta(before, after, "closed_timeout") == 0
    assert counter_delta(before, after, "json_messages_in") >= 10


def test_json_client_that_never_connects_is_closed(server):
    before = server.counters()
    with tcp_connect(server.ports["json"]) as sock:
        wait_closed(sock, 10)
    assert counter_delta(before, server.counters(), "closed_connect_timeout") == 1


def test_pingreq_bytes_alone_do_not_count_before_connect(server):
    """A PINGREQ as first packet is a protocol violation (MQTT-3.1.0-1), not activity."""
    before = server.counters()
    with tcp_connect(server.ports["mqtt"]) as sock:
        sock.sendall(PINGREQ)
        wait_closed(sock, 10)
    assert_counter_deltas(server, before, {"malformed.protocol": 1, "packets_out.pingresp": 0})


def test_defer_accept_serves_clients_and_still_times_out_silent_ones(gw_factory):
    """defer_accept (TCP_DEFER_ACCEPT on every listener): MQTT, TLS and JSON-lines
    clients, which all speak first, are served as without it; a client that
    sends nothing is still accepted (after the kernel's first SYN-ACK
    retransmission) and closed by connect_timeout, counted."""
    gw = gw_factory(workers=2, args=["--defer-accept", "true", "--connect-timeout", "0.5"])
    for i in range(4):
        with mqtt_client(gw.ports["mqtt"], f"deferred-{i}") as sock:
            ping(sock)
    with tls_connect(gw.ports["mqtts"], client_tls_context(gw.ca)) as sock:
        sock.sendall(connect_packet(b"deferred-tls"))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
    before = gw.counters()
    with tcp_connect(gw.ports["mqtt"]) as sock:
        assert wait_closed(sock, 15) == b""
    after = gw.counters()
    assert counter_delta(before, after, "closed_connect_timeout") == 1
    assert counter_delta(before, after, "mqtt_connected") == 0
