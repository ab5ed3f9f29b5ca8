"""Signals: a worker killed with SIGKILL is respawned while the other worker's
clients carry on; SIGHUP reloads the config file and certificates without
dropping connections; SIGTERM/SIGINT drain and exit cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import time

import pytest
import trustme

from conftest import (CONNACK_OK, client_tls_context, connect_packet, counter_delta,
                      mqtt_client, ping, publish_packet, read_packet, tcp_connect, tls_connect,
                      wait_closed, wait_for)


# --- kill -9 of a worker ---------------------------------------------------------

def test_sigkill_worker_is_respawned_and_others_unaffected(gw_factory):
    gw = gw_factory(workers=2, listeners=("mqtt",))
    port = gw.ports["mqtt"]
    by_worker: dict[int, list] = {}
    for i in range(200):
        sock = mqtt_client(port, f"k{i}")
        by_worker.setdefault(gw.which_worker(sock.getsockname()[1]), []).append(sock)
        if len(by_worker) == 2 and all(len(v) >= 3 for v in by_worker.values()):
            break
    assert len(by_worker) == 2, "the kernel never gave a connection to the second worker"
    victim, survivor = sorted(by_worker, key=lambda pid: pid)
    try:
        gw.expect_worker_deaths(1)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        # New connections succeed within 2 s of the kill (those hashed to the dead
        # worker's socket wait in its backlog until the respawn).
        deadline = killed_at + 2.0
        ok = None
        while ok is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                sock = tcp_connect(port, timeout=left)
                sock.sendall(connect_packet(b"after-kill"))
                if read_packet(sock, timeout=max(left, 0.05)) == CONNACK_OK:
                    ok = sock
                else:
                    sock.close()
            except (OSError, EOFError):
                time.sleep(0.05)
        assert ok is not None, "no new connection got CONNACK within 2 s of the kill"
        ok.close()

        # The master respawned the slot: a new pid among its children.
        new = wait_for(lambda: (set(gw.worker_pids()) - {survivor, victim}
                                if len(gw.worker_pids()) == 2 else None), 5,
                       what="a respawned worker")
        assert victim not in gw.worker_pids() and survivor in gw.worker_pids()
        assert len(new) == 1
        assert f"(pid {victim}) died: signal 9 (SIGKILL)" in gw.log()
        assert gw.stats()["worker_deaths"] == 1

        # The survivor's clients are still connected and answer pings; the
        # victim's were closed with it.
        for sock in by_worker[survivor]:
            ping(sock)
        for sock in by_worker[victim]:
            wait_closed(sock, 10)
        # The dead worker's gauge was reset: only the survivor's clients count.
        wait_for(lambda: gw.counters()["conns_current"] == len(by_worker[survivor]), 10,
                 what="conns_current == the survivors")
        # And the respawned worker serves: keep connecting until one lands on it.
        (respawned,) = new
        for i in range(200):
            sock = mqtt_client(port, f"n{i}")
            if gw.which_worker(sock.getsockname()[1]) == respawned:
                ping(sock)
                sock.close()
                break
            sock.close()
        else:
            pytest.fail("no connection reached the respawned worker")
    finally:
        for socks in by_worker.values():
            for sock in socks:
                sock.close()


# --- SIGHUP ----------------------------------------------------------------------

@pytest.fixture
def hup_server(gw_factory, tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text('max_packet_size = 100000\nlog_level = "debug"\n')
    gw = gw_factory(workers=2, config=cfg)
    return gw


def _reload(gw):
    """SIGHUP the master and wait until both workers logged their reload."""
    log = gw.log()
    counts = [log.count(f"worker {i}: reloaded") for i in range(gw.workers)]
    gw.signal(signal.SIGHUP)
    wait_for(lambda: all(gw.log().count(f"worker {i}: reloaded") > counts[i]
                         for i in range(gw.workers)), 10, what="both workers to reload")


def _json(sock, **msg):
    sock.sendall(json.dumps(msg).encode() + b"\n")


def _json_reply(sock):
    sock.settimeout(10)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        assert chunk, "closed"
        buf += chunk
    return json.loads(buf)


def test_sighup_keeps_established_connections(hup_server):
    gw = hup_server
    pids = gw.worker_pids()
    tls_ctx = client_tls_context(gw.ca)
    plain = mqtt_client(gw.ports["mqtt"], "hup-plain")
    secure = mqtt_client(gw.ports["mqtts"], "hup-tls", tls=tls_ctx)
    js = tcp_connect(gw.ports["json"])
    _json(js, message_type="Connect", client_id="hup-json")
    assert _json_reply(js)["payload"] == "Connected"
    try:
        before = gw.counters()
        _reload(gw)
        _reload(gw)
        ping(plain)
        ping(secure)
        _json(js, message_type="Connect", client_id="hup-json")   # answered when connected
        assert _json_reply(js)["client_id"] == "hup-json"
        after = gw.counters()
        assert gw.worker_pids() == pids
        assert after["conns_current"] == 3
        for name in ("closed_client", "closed_server", "closed_error", "closed_timeout"):
            assert counter_delta(before, after, name) == 0, name
        assert "reloaded configuration and certificates" in gw.log()
    finally:
        for s in (plain, secure, js):
            s.close()


def test_sighup_applies_a_new_max_packet_size(hup_server):
    gw = hup_server
    port = gw.ports["mqtt"]
    a = mqtt_client(port, "old-a")
    b = mqtt_client(port, "old-b")
    try:
        a.sendall(publish_packet("t", b"x" * 2000, qos=1, packet_id=1))
        assert read_packet(a) == (0x40, b"\x00\x01")
        gw.config.write_text('max_packet_size = 1000\nlog_level = "debug"\n')
        _reload(gw)
        before = gw.counters()
        # On an established connection, the next packet is held to the new limit...
        a.sendall(publish_packet("t", b"x" * 2000, qos=1, packet_id=2))
        assert wait_closed(a, 10) == b""
        # ...while packets within it are fine.
        b.sendall(publish_packet("t", b"x" * 500, qos=1, packet_id=3))
        assert read_packet(b) == (0x40, b"\x00\x03")
        # And on new connections.
        with mqtt_client(port, "new-c") as c:
            c.sendall(publish_packet("t", b"x" * 2000, qos=1, packet_id=4))
            assert wait_closed(c, 10) == b""
        assert counter_delta(before, gw.counters(), "packets_too_large") == 2
        # A config file with a bad value is refused and the running one kept.
        gw.config.write_text('max_packet_size = "huge"\n')
        gw.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in gw.log(), 10, what="the refusal")
        ping(b)
        with mqtt_client(port, "new-d") as d:
            d.sendall(publish_packet("t", b"x" * 2000, qos=1, packet_id=5))
            assert wait_closed(d, 10) == b""
    finally:
        a.close()
        b.close()


def test_sighup_reloads_certificates(hup_server):
    gw = hup_server
    old_ctx = client_tls_context(gw.ca)
    old_conn = mqtt_client(gw.ports["mqtts"], "old-tls", tls=old_ctx)
    old_der = old_conn.getpeercert(binary_form=True)
    try:
        ca = trustme.CA(organization_name="second CA")
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        (gw.certs_dir / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        (gw.certs_dir / "key.pem").write_bytes(leaf.private_key_pem.bytes())
        _reload(gw)
        new_ctx = ssl.create_default_context()
        ca.configure_trust(new_ctx)
        new_der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
        assert new_der != old_der
        # Both workers serve the new certificate (the kernel spreads the connections).
        for i in range(6):
            with tls_connect(gw.ports["mqtts"], new_ctx) as conn:
                assert conn.getpeercert(binary_form=True) == new_der
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_connect(gw.ports["mqtts"], client_tls_context(gw.ca)).close()
        # The connection made before the reload keeps working on the old one.
        ping(old_conn)
        old_conn.sendall(publish_packet("t", b"still here", qos=1, packet_id=7))
        assert read_packet(old_conn) == (0x40, b"\x00\x07")
    finally:
        old_conn.close()


def test_a_worker_dying_while_the_server_stops_is_a_death(gw_factory):
    """The master's own stop ends each worker with exit code 0; a worker that
    ends otherwise while draining (SIGKILL here, as a crash would) is a death:
    counted and logged as one."""
    gw = gw_factory(workers=2, listeners=("mqtt", "http"))
    victim = gw.worker_pids()[0]
    # An idle HTTP connection on the victim keeps it draining a moment (the
    # grace for a request on its way), so it is alive when the kill lands.
    held = []
    for _ in range(200):
        sock = tcp_connect(gw.ports["http"])
        held.append(sock)
        if gw.which_worker(sock.getsockname()[1]) == victim:
            break
    else:
        raise AssertionError("no HTTP connection landed on the first worker")
    try:
        gw.expect_worker_deaths(1)
        gw.signal(signal.SIGTERM)
        wait_for(lambda: "draining" in gw.log(), 10, what="the master draining")
        os.kill(victim, signal.SIGKILL)
        assert gw.wait_exit(30) == 0
    finally:
        for sock in held:
            sock.close()
    gw.stop()
    assert re.search(rf"worker \d \(pid {victim}\) died while stopping: signal 9 \(SIGKILL\)", gw.log())
    assert gw.deaths() == {"worker_deaths": 1, "pipeline_deaths": 0}


# --- SIGTERM / SIGINT --------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_stop(gw_factory, sig):
    drain = 3.0
    gw = gw_factory(workers=2, args=["--drain-timeout", str(drain)])
    tls_ctx = client_tls_context(gw.ca)
    clients = [mqtt_client(gw.ports["mqtt"], f"d{i}") for i in range(4)]
    clients.append(mqtt_client(gw.ports["mqtts"], "d-tls", tls=tls_ctx))
    js = tcp_connect(gw.ports["json"])
    _json(js, message_type="Connect")
    assert _json_reply(js)["payload"] == "Connected"
    clients.append(js)
    shm, pidfile = gw.shm, gw.pidfile
    assert shm.exists() and pidfile.exists()
    try:
        gw.signal(sig)
        for sock in clients:
            wait_closed(sock, drain + 10)
        assert gw.wait_exit(drain + 10) == 0
    finally:
        for sock in clients:
            sock.close()
    assert not pidfile.exists()
    assert not shm.exists()
    assert "stopped" in gw.log()
    assert "killed" not in gw.log()          # everything drained within drain_timeout
    for name, port in gw.listen_ports.items():     # gw's own (behind the proxies under GW_TEST_FRAGMENT)
        with pytest.raises(ConnectionRefusedError):
            tcp_connect(port, timeout=5).close()


def test_a_second_server_on_a_taken_port_refuses_to_start(gw_factory, tmp_path):
    """The workers' sockets use SO_REUSEPORT, which would let a second gw on the
    same port share it silently (the kernel splitting connections between the
    two): it refuses to start, saying so, and the first goes on serving."""
    from conftest import GwServer, tcp_connect, read_packet
    first = gw_factory(workers=1, listeners=("mqtt",), fragment=False)
    second = GwServer(tmp_path / "second", workers=1, listeners=("mqtt",), ports=dict(first.ports), fragment=False)
    with pytest.raises(RuntimeError, match="another process listens there"):
        second.start(timeout=30)
    sock = tcp_connect(first.ports["mqtt"])
    try:
        sock.sendall(connect_packet("still-first"))
        assert read_packet(sock) == CONNACK_OK
    finally:
        sock.close()
