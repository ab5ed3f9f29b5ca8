"""TLS session resumption: a session ticket one worker issued resumes on
another (the master's secret, shared keys), for TLS 1.3 and TLS 1.2, with
Python's ssl and with `openssl s_client -sess_out/-sess_in`; tickets expire
with tls_ticket_lifetime; tls_ticket_lifetime = 0 issues none; a reload that
changes the CRL makes earlier tickets useless (a revoked certificate cannot
resume past its revocation)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import time

import pytest

from conftest import (CONNACK_OK, DISCONNECT, HOST, client_tls_context, connect_packet, counter_delta, ping,
                      read_packet, tcp_connect)


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, listeners=("mqtt", "mqtts"))


def _context(ca, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = client_tls_context(ca)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def _session_from(server, ctx, client_id: str):
    """A first connection, MQTT up to a ping (the TLS 1.3 ticket comes after the
    handshake): (its session, the worker that served it)."""
    with ctx.wrap_socket(tcp_connect(server.ports["mqtts"]), server_hostname="localhost") as tls:
        assert not tls.session_reused
        tls.sendall(connect_packet(client_id))
        assert read_packet(tls) == CONNACK_OK
        ping(tls)
        worker = server.which_worker(tls.getsockname()[1])
        session = tls.session
    return session, worker


def _raw_on(server, want_other_than: int | None = None, want: int | None = None, tries: int = 80):
    """A TCP connection that landed on a worker (SO_REUSEPORT picks it): others are reset."""
    for _ in range(tries):
        raw = tcp_connect(server.ports["mqtts"])
        worker = server.which_worker(raw.getsockname()[1])
        if (want is None or worker == want) and (want_other_than is None or worker != want_other_than):
            return raw, worker
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
    raise AssertionError("no connection landed on the wanted worker")


def _resume(ctx, raw, session, client_id: str) -> bool:
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(connect_packet(client_id))
        assert read_packet(tls) == CONNACK_OK
        ping(tls)
        return tls.session_reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"])
def test_ticket_from_one_worker_resumes_on_the_other(server, version):
    ctx = _context(server.ca, version)
    session, issuer = _session_from(server, ctx, "resume-a")
    assert session is not None and session.has_ticket
    before = server.counters()
    raw, other = _raw_on(server, want_other_than=issuer)
    assert _resume(ctx, raw, session, "resume-b")
    raw, same = _raw_on(server, want=issuer)
    assert _resume(ctx, raw, session, "resume-c")
    after = server.wait_counter("tls_resumed", before["tls_resumed"] + 2)
    assert counter_delta(before, after, "tls_resumed") == 2
    assert counter_delta(before, after, "tls_handshakes") == 2
    from gw.stats import Counter
    rows = server.block().rows[:, Counter.TLS_RESUMED]
    assert (rows > 0).all(), rows       # each worker resumed one


def test_full_handshake_is_not_counted_as_resumed(server):
    before = server.counters()
    ctx = _context(server.ca)
    for i in range(4):
        _session_from(server, ctx, f"full-{i}")
    after = server.wait_counter("tls_handshakes", before["tls_handshakes"] + 4)
    assert counter_delta(before, after, "tls_resumed") == 0


def test_a_forged_ticket_gets_a_full_handshake(server):
    """A session whose ticket the server did not seal (another server's) is not
    resumed: the client gets a full handshake and its connection works."""
    other_ctx = _context(server.ca)
    other = _other_server_session(server, other_ctx)
    raw = tcp_connect(server.ports["mqtts"])
    assert not _resume(other_ctx, raw, other, "forged")


def _other_server_session(server, ctx):
    """A ticket from a second gw with the same certificates but its own secret."""
    from conftest import GwServer
    second = GwServer(server.base / "second", workers=1, listeners=("mqtts",), certs=server.certs_dir).start()
    try:
        with ctx.wrap_socket(tcp_connect(second.ports["mqtts"]), server_hostname="localhost") as tls:
            tls.sendall(connect_packet("elsewhere"))
            assert read_packet(tls) == CONNACK_OK
            ping(tls)
            return tls.session
    finally:
        second.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_openssl_s_client_resumes(server, tmp_path, version):
    """openssl s_client: a session saved by one connection (-sess_out) resumes in
    later ones (-sess_in), on whichever worker they land: the server counted
    resumed handshakes on both workers."""
    from gw.stats import Counter
    sess = tmp_path / "session.pem"
    base = ["openssl", "s_client", "-connect", f"{HOST}:{server.ports['mqtts']}", "-servername", "localhost",
            "-CAfile", str(server.ca), "-verify_return_error", version]
    # -ign_eof and a CONNECT then a DISCONNECT on stdin: s_client reads until the
    # server closes, so it has the TLS 1.3 ticket (sent after the handshake) and
    # the CONNACK; without -ign_eof it may quit at its stdin's end before the ticket.
    # Not under the sanitizer's LD_PRELOAD: openssl is not the code under test.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    base.append("-ign_eof")
    first = subprocess.run(base + ["-sess_out", str(sess)], input=connect_packet("s-client") + DISCONNECT,
                           capture_output=True, timeout=30, env=env)
    assert b"New, TLSv1." in first.stdout, first.stdout[-2000:]
    assert sess.stat().st_size > 0
    start = server.block().rows[:, Counter.TLS_RESUMED].copy()
    for i in range(40):
        again = subprocess.run(base + ["-sess_in", str(sess)], input=connect_packet(f"s-client-{i}") + DISCONNECT,
                               capture_output=True, timeout=30, env=env)
        assert b"Reused, TLSv1." in again.stdout, again.stdout[-2000:]
        if ((server.block().rows[:, Counter.TLS_RESUMED] - start) > 0).all():
            break
    assert ((server.block().rows[:, Counter.TLS_RESUMED] - start) > 0).all()


def test_tickets_expire_with_their_lifetime(gw_factory):
    gw = gw_factory(workers=2, listeners=("mqtts",), args=["--tls-ticket-lifetime", "5"])
    ctx = _context(gw.ca)
    with ctx.wrap_socket(tcp_connect(gw.ports["mqtts"]), server_hostname="localhost") as tls:
        tls.sendall(connect_packet("short"))
        assert read_packet(tls) == CONNACK_OK
        ping(tls)
        session = tls.session
    issued = time.monotonic()
    assert session.has_ticket
    # OpenSSL counts a session's age in whole seconds: well within 5 s it resumes
    # (unless this machine took that long), past it not.
    resumed = _resume(ctx, tcp_connect(gw.ports["mqtts"]), session, "short-again")
    if not resumed and time.monotonic() - issued > 3:
        pytest.skip("the machine took too long to tell")
    assert resumed
    time.sleep(max(0.0, issued + 11 - time.monotonic()))    # past the lifetime and two key periods
    assert not _resume(ctx, tcp_connect(gw.ports["mqtts"]), session, "short-late")


def test_lifetime_zero_issues_no_ticket(gw_factory):
    gw = gw_factory(workers=1, listeners=("mqtts",), args=["--tls-ticket-lifetime", "0"])
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = _context(gw.ca, version)
        session, _ = _session_from(gw, ctx, "no-ticket")
        assert session is None or not session.has_ticket
        assert not _resume(ctx, tcp_connect(gw.ports["mqtts"]), session, "no-ticket-2")
    assert gw.counters()["tls_resumed"] == 0


def test_ticket_keys_not_in_the_log(server):
    """The secret and the keys never leave memory: nothing about them is logged."""
    log = server.log().lower()
    assert "secret" not in log and "ticket key" not in log


@pytest.mark.skipif(bool(os.environ.get("GW_SANITIZE")),
                    reason="AddressSanitizer's allocator replaces glibc's heap, which malloc_trim releases")
def test_release_free_heap_gives_freed_pages_back():
    """The worker's heap trim after a run of handshakes (gw/worker.py): freed
    small blocks (the heap, not mmap) are released, and it says so."""
    from gw_ext.tls import release_free_heap

    def rss_kib():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))

    release_free_heap()
    blocks = [bytearray(600) for _ in range(60000)]    # ~40 MiB of small malloc'd blocks
    above = bytearray(600)      # a live block above them: free() alone cannot shrink the heap
    del blocks
    freed = rss_kib()
    assert release_free_heap() is True
    assert rss_kib() < freed - 10 * 1024
    del above
