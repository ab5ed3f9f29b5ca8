"""gw's own TLS 1.3 record layer (tls_record_layer = "gw", worker/tls_records.pyx
over gw_ext/tls_records.c): after OpenSSL's handshake the worker seals and opens
the records itself and frees the SSL object. Real clients only: Python's ssl,
`openssl s_client` with each TLS 1.3 suite (and its KeyUpdate commands),
mosquitto_pub/sub, paho; records written byte by byte and cut at random
points; tampered and oversized records; a slow reader; TLS 1.2 on OpenSSL.
A wrong sequence number, key or nonce breaks every connection here."""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import time

import pytest

from conftest import (CONNACK_OK, HOST, PahoClient, client_tls_context, connect_packet, counter_delta, get_counter,
                      mqtt_client, ping, publish_packet, read_packet, subscribe_packet, tcp_connect, wait_closed,
                      wait_for)
from gw_ext import loop

SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, listeners=("mqtt", "mqtts", "wss", "https"),
                             args=["--tls-record-layer", "gw"])


def _ctx(server, version=None):
    ctx = client_tls_context(server.ca)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def _subscribe(sock, topic: str, qos: int = 0, pid: int = 1) -> None:
    sock.sendall(subscribe_packet(pid, [(topic, qos)]))
    first, body = read_packet(sock)
    assert first == 0x90 and body[:2] == struct.pack("!H", pid), (first, body)


def _read_publish(sock, timeout: float = 20.0) -> tuple[str, bytes]:
    first, body = read_packet(sock, timeout)
    assert first & 0xF0 == 0x30, (first, body[:20])
    n = struct.unpack("!H", body[:2])[0]
    pos = 2 + n + (2 if first & 0x06 else 0)
    return body[2:2 + n].decode(), body[pos:]


# --- the parser on its own --------------------------------------------------------

@pytest.mark.parametrize("suite,hlen", [(0x1301, 32), (0x1302, 48), (0x1303, 32)])
def test_records_round_trip_and_refusals(suite, hlen):
    secret = os.urandom(hlen)
    plain = os.urandom(50_000)          # four records
    wire = loop.tls_records_seal(suite, secret, plain)
    assert len(wire) == len(plain) + 4 * 22
    assert loop.tls_records_open(suite, secret, wire) == (len(plain), plain, len(wire))
    # a partial record: nothing yet, nothing consumed past the whole ones
    assert loop.tls_records_open(suite, secret, wire[:100]) == (0, b"", 0)
    n, got, used = loop.tls_records_open(suite, secret, wire[:16384 + 22 + 10])
    assert (n, got, used) == (16384, plain[:16384], 16384 + 22)
    # a flipped bit anywhere in the ciphertext or tag, in the header: refused
    for pos in (5, 100, 16384 + 21, 16384 + 22 + 7):
        bad = bytearray(wire)
        bad[pos] ^= 0x10
        assert loop.tls_records_open(suite, secret, bytes(bad))[0] == -3 or pos == 16384 + 22 + 7
    bad = bytearray(wire)
    bad[3] ^= 0x01                      # the length is authenticated too
    assert loop.tls_records_open(suite, secret, bytes(bad))[0] in (-3, 0)
    # the wrong key, the wrong sequence number
    assert loop.tls_records_open(suite, os.urandom(hlen), wire)[0] == -3
    assert loop.tls_records_open(suite, secret, loop.tls_records_seal(suite, secret, b"x", seq=1))[0] == -3
    # headers: another type, another version, too long, too short
    rec = loop.tls_records_seal(suite, secret, b"hello")
    for header in (b"\x16\x03\x03", b"\x17\x03\x01", b"\x15\x03\x03"):
        assert loop.tls_records_open(suite, secret, header + rec[3:])[0] == -3
    assert loop.tls_records_open(suite, secret, b"\x17\x03\x03\x41\x01" + b"\0" * 20)[0] == -3
    assert loop.tls_records_open(suite, secret, b"\x17\x03\x03\x00\x10" + b"\0" * 16)[0] == -3
    # inner types: close_notify, another alert, an empty record, a bad handshake message
    assert loop.tls_records_open(suite, secret, loop.tls_records_seal(suite, secret, b"\x01\x00", content_type=21))[0] == -1
    assert loop.tls_records_open(suite, secret, loop.tls_records_seal(suite, secret, b"\x02\x28", content_type=21))[0] == -2
    assert loop.tls_records_open(suite, secret, loop.tls_records_seal(suite, secret, b"", content_type=23)) == (0, b"", 22)
    assert loop.tls_records_open(suite, secret, loop.tls_records_seal(suite, secret, b"\x04\x00\x00\x01\x00",
                                                                      content_type=22))[0] == -3
    assert loop.tls_records_open(suite, secret, loop.tls_records_seal(suite, secret, b"ab", content_type=24))[0] == -3
    # a KeyUpdate, then data under the next key
    upd = loop.tls_records_seal(suite, secret, b"\x18\x00\x00\x01\x00", content_type=22)
    assert loop.tls_records_open(suite, secret, upd) == (0, b"", len(upd))


def test_state_per_connection_is_small():
    assert loop.tls_record_state_size() <= 300


# --- real clients ----------------------------------------------------------------

def test_python_client_large_payloads_both_ways(server):
    before = server.counters()
    ctx = _ctx(server)
    sub = mqtt_client(server.ports["mqtts"], "rl-sub", tls=ctx)
    pub = mqtt_client(server.ports["mqtts"], "rl-pub", tls=ctx)
    try:
        assert sub.version() == "TLSv1.3"
        _subscribe(sub, "rl/big")
        payloads = [os.urandom(n) for n in (1, 16383, 16384, 16385, 200_000, 1_000_000)]
        for p in payloads:
            pub.sendall(publish_packet("rl/big", p))
        for p in payloads:
            assert _read_publish(sub) == ("rl/big", p)
        ping(pub)
        ping(sub)
    finally:
        sub.close()
        pub.close()
    after = server.wait_counter("tls_record_layer.gw", get_counter(before, "tls_record_layer.gw") + 2)
    assert counter_delta(before, after, "tls_record_layer.openssl") == 0
    assert counter_delta(before, after, "tls_record_layer.refused") == 0


def _s_client(server, suite: str, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        ["openssl", "s_client", "-connect", f"{HOST}:{server.ports['mqtts']}", "-CAfile", str(server.ca),
         "-servername", "localhost", "-verify_return_error", "-brief", "-tls1_3", "-ciphersuites", suite, *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _read_until(proc, wanted: bytes, buf: bytearray, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while wanted not in buf:
        assert time.monotonic() < deadline, (wanted, bytes(buf[-200:]))
        import select
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            chunk = os.read(fd, 65536)
            assert chunk, (wanted, bytes(buf[-200:]), proc.stderr.read() if proc.poll() is not None else b"")
            buf += chunk


@pytest.mark.parametrize("suite", SUITES)
def test_openssl_s_client_each_suite_and_key_updates(server, suite):
    """Each TLS 1.3 suite; then KeyUpdate both ways: 'K' asks for the server's
    (update_requested), 'k' does not; messages still flow after each."""
    before = server.counters()
    proc = _s_client(server, suite)
    buf = bytearray()
    try:
        proc.stdin.write(connect_packet(f"rl-{suite[-12:]}") + subscribe_packet(1, [("rl/s", 0)]))
        proc.stdin.flush()
        _read_until(proc, b"\x90\x03\x00\x01\x00", buf)
        for i, command in enumerate((b"", b"K\n", b"k\n", b"K\n")):
            if command:
                proc.stdin.write(command)
                proc.stdin.flush()
                time.sleep(0.3)     # its own read of stdin: the command is not data
            marker = f"after-{i}-{suite}".encode() + os.urandom(3).hex().encode()
            proc.stdin.write(publish_packet("rl/s", marker + b"x" * 40000))
            proc.stdin.flush()
            _read_until(proc, marker + b"x" * 40000, buf)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    err = proc.stderr.read().decode(errors="replace")
    assert f"Ciphersuite: {suite}" in err, err
    after = server.wait_counter("tls_record_layer.key_updates_in", get_counter(before, "tls_record_layer.key_updates_in") + 3)
    assert counter_delta(before, after, "tls_record_layer.key_updates_in") == 3
    assert counter_delta(before, after, "tls_record_layer.key_updates_out") == 2
    assert counter_delta(before, after, "tls_record_layer.gw") == 1
    assert counter_delta(before, after, "tls_record_layer.refused") == 0


class _MemClient:
    """A TLS 1.3 client over ssl.MemoryBIO on a raw socket: the test decides how
    the records reach the server (whole, byte by byte, in random pieces, tampered)."""

    def __init__(self, server, send_finished: bool = True):
        """send_finished False: the client's last flight (its Finished) is kept
        in self.finished, for the test to send with what follows."""
        self.sock = tcp_connect(server.ports["mqtts"])
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.buf = bytearray()
        self.tls = _ctx(server).wrap_bio(self.inc, self.out, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.out.read())
                data = self.sock.recv(65536)
                assert data
                self.inc.write(data)
        self.finished = self.out.read()
        if send_finished:
            self.sock.sendall(self.finished)

    def records(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.out.read()

    def read_packet(self, timeout: float = 10.0) -> tuple[int, bytes]:
        self.sock.settimeout(timeout)
        buf = self.buf
        while True:
            try:
                while True:
                    buf += self.tls.read(65536)
            except ssl.SSLWantReadError:
                pass
            if len(buf) >= 2:
                length, shift, i = 0, 0, 1
                while i < len(buf):
                    length |= (buf[i] & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not buf[i - 1] & 0x80:
                        if len(buf) >= i + length:
                            packet = buf[0], bytes(buf[i:i + length])
                            del buf[:i + length]
                            return packet
                        break
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.inc.write(data)


def _data_segments_in(sock: socket.socket) -> int:
    """TCP segments with data this socket has received (struct tcp_info's
    tcpi_data_segs_in, at byte 152 since Linux 4.6)."""
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 152)[0]


@pytest.mark.no_fragment("counts the TCP segments the server sends")
def test_ticket_and_connack_leave_in_one_write(server):
    """The client's Finished and its CONNECT arrive together: the session
    ticket that finishing the handshake writes waits for the CONNACK, and the
    two leave in one send (one segment, the client woken once for both), the
    ticket first. Before, the ticket went out on its own."""
    before = server.counters()
    c = _MemClient(server, send_finished=False)
    try:
        assert _data_segments_in(c.sock) == 1           # the server's flight
        c.sock.sendall(c.finished + c.records(connect_packet("rl-one-write")))
        assert c.read_packet() == CONNACK_OK
        assert c.tls.session is not None and c.tls.session.has_ticket
        segments = _data_segments_in(c.sock)
        assert segments == 2, (segments, {k: counter_delta(before, server.counters(), k)
                                          for k in ("tls_record_layer.gw", "tls_record_layer.openssl",
                                                    "connects_at_once", "tls_handshakes")})
        ping_packet = b"\xc0\x00"
        c.sock.sendall(c.records(ping_packet))
        assert c.read_packet() == (0xD0, b"")
    finally:
        c.sock.close()
    after = server.wait_counter("tls_record_layer.gw", get_counter(before, "tls_record_layer.gw") + 1)
    assert counter_delta(before, after, "tls_record_layer.gw") == 1


@pytest.mark.no_fragment("counts the TCP segments the server sends")
def test_ticket_alone_when_the_connect_comes_later(server):
    """The Finished on its own: the ticket is not held back for a CONNECT that
    may never come; it leaves at the end of that turn, then the CONNACK."""
    c = _MemClient(server, send_finished=False)
    try:
        c.sock.sendall(c.finished)
        wait_for(lambda: _data_segments_in(c.sock) == 2, timeout=10)
        c.sock.sendall(c.records(connect_packet("rl-ticket-first")))
        assert c.read_packet() == CONNACK_OK
        assert c.tls.session is not None and c.tls.session.has_ticket
        assert _data_segments_in(c.sock) == 3
    finally:
        c.sock.close()


@pytest.mark.parametrize("how", ["byte_by_byte", "random_pieces"])
def test_records_in_fragments(server, how):
    c = _MemClient(server)
    rng = random.Random(7)

    def send(wire: bytes) -> None:
        pos = 0
        while pos < len(wire):
            n = 1 if how == "byte_by_byte" and pos < 600 else rng.randint(1, 3000)
            c.sock.sendall(wire[pos:pos + n])
            pos += n
            if n == 1:
                time.sleep(0.001)

    try:
        send(c.records(connect_packet(f"rl-frag-{how}")) + c.records(subscribe_packet(1, [("rl/frag", 0)])))
        assert c.read_packet() == CONNACK_OK
        assert c.read_packet()[0] == 0x90
        big = os.urandom(70_000)
        send(c.records(publish_packet("rl/frag", big)) + c.records(publish_packet("rl/frag", b"after")))
        first, body = c.read_packet()
        assert first == 0x30 and body.endswith(big)
        first, body = c.read_packet()
        assert first == 0x30 and body.endswith(b"after")
    finally:
        c.sock.close()


@pytest.mark.parametrize("damage", ["bit_flip", "oversized", "plaintext_handshake"])
def test_bad_record_closes_that_connection_only(server, damage):
    before = server.counters()
    ctx = _ctx(server)
    bystander = mqtt_client(server.ports["mqtts"], f"rl-by-{damage}", tls=ctx)
    c = _MemClient(server)
    try:
        wire = c.records(connect_packet(f"rl-bad-{damage}"))
        c.sock.sendall(wire)
        assert c.read_packet() == CONNACK_OK
        wire = c.records(publish_packet("rl/bad", b"p" * 300))
        if damage == "bit_flip":
            bad = bytearray(wire)
            bad[len(bad) // 2] ^= 0x04
            wire = bytes(bad)
        elif damage == "oversized":
            wire = b"\x17\x03\x03\x48\x00" + b"\0" * 10
        else:
            wire = b"\x16\x03\x03\x00\x04\x01\x00\x00\x00"
        try:
            for i in range(0, len(wire), 7):        # in pieces
                c.sock.sendall(wire[i:i + 7])
                time.sleep(0.01)
        except OSError:
            pass        # refused on its header already: the rest finds the socket closed
        wait_closed(c.sock)
    finally:
        c.sock.close()
    after = server.wait_counter("tls_record_layer.refused", get_counter(before, "tls_record_layer.refused") + 1)
    assert counter_delta(before, after, "tls_record_layer.refused") == 1
    ping(bystander)
    bystander.close()


def test_slow_reader_gets_everything(server):
    """A subscriber that does not read while 3 MB pile up: partial writes, the
    rest of the ciphertext kept for EPOLLOUT; every byte arrives in order."""
    ctx = _ctx(server)
    raw = socket.create_connection((HOST, server.ports["mqtts"]))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sub = ctx.wrap_socket(raw, server_hostname="localhost")
    sub.sendall(connect_packet("rl-slow"))
    assert read_packet(sub) == CONNACK_OK
    _subscribe(sub, "rl/slow", qos=0)
    pub = mqtt_client(server.ports["mqtts"], "rl-slow-pub", tls=ctx)
    try:
        payloads = [bytes([i]) * 100_000 + os.urandom(8) for i in range(30)]
        for p in payloads:
            pub.sendall(publish_packet("rl/slow", p))
        ping(pub)
        time.sleep(1.0)
        for p in payloads:
            assert _read_publish(sub, 30) == ("rl/slow", p)
            time.sleep(0.01)
    finally:
        pub.close()
        sub.close()


def test_tls12_stays_on_openssl(server):
    before = server.counters()
    sock = mqtt_client(server.ports["mqtts"], "rl-tls12", tls=_ctx(server, ssl.TLSVersion.TLSv1_2))
    try:
        assert sock.version() == "TLSv1.2"
        _subscribe(sock, "rl/12")
        sock.sendall(publish_packet("rl/12", b"z" * 50_000))
        assert _read_publish(sock) == ("rl/12", b"z" * 50_000)
    finally:
        sock.close()
    after = server.wait_counter("tls_record_layer.openssl", get_counter(before, "tls_record_layer.openssl") + 1)
    assert counter_delta(before, after, "tls_record_layer.gw") == 0


def test_resumed_session_on_gw_records(server):
    ctx = _ctx(server)
    with ctx.wrap_socket(tcp_connect(server.ports["mqtts"]), server_hostname="localhost") as tls:
        tls.sendall(connect_packet("rl-res-1"))
        assert read_packet(tls) == CONNACK_OK
        ping(tls)
        session = tls.session
    before = server.counters()
    with ctx.wrap_socket(tcp_connect(server.ports["mqtts"]), server_hostname="localhost",
                         session=session) as tls:
        tls.sendall(connect_packet("rl-res-2"))
        assert read_packet(tls) == CONNACK_OK
        ping(tls)
        assert tls.session_reused
    after = server.wait_counter("tls_record_layer.gw", get_counter(before, "tls_record_layer.gw") + 1)
    assert counter_delta(before, after, "tls_resumed") == 1


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto clients not installed")
def test_mosquitto_clients(server):
    port = str(server.ports["mqtts"])
    sub = subprocess.Popen(["mosquitto_sub", "-h", "localhost", "-p", port, "--cafile", str(server.ca),
                            "-t", "rl/mosq", "-C", "3", "-W", "20", "-i", "rl-mosq-sub"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: get_counter(server.counters(), "tls_record_layer.gw") > 0, 10)
        time.sleep(0.5)
        big = "b" * 100_000
        for msg in ("one", big, "three"):
            subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", port, "--cafile", str(server.ca),
                            "-t", "rl/mosq", "-m", msg, "-i", "rl-mosq-pub"], check=True, timeout=20)
        out, err = sub.communicate(timeout=30)
    finally:
        if sub.poll() is None:
            sub.kill()
    assert out.decode().split("\n")[:3] == ["one", big, "three"], err


def test_paho_client(server):
    with PahoClient(server.ports["mqtts"], ca=server.ca, client_id="rl-paho") as client:
        wait_for(lambda: client.connected.is_set(), 10, what="CONNACK")
        assert client.subscribe("rl/paho", 1) == [1]
        client.publish_qos1("rl/paho", b"small")
        client.publish_qos1("rl/paho", b"L" * 300_000)
        got = client.wait_messages(2, "rl/paho", 20)
        assert [m.payload for m in got] == [b"small", b"L" * 300_000]
        client.check_healthy()
