"""The fragmenting proxy (tests/fragproxy.py) itself, between a real client
socket and a real server socket on loopback: both directions arrive intact but
re-cut, closes (FIN, half-close, reset) pass through as they came, and the
harness can tell which upstream connection serves a client."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from conftest import HOST, free_ports, wait_for
from fragproxy import FragProxy, cut_sizes

WAIT = 10.0


class Upstream:
    """A listening socket; accept() hands over the server side of the next connection."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.sock.settimeout(WAIT)
        self.port = self.sock.getsockname()[1]

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        conn.settimeout(WAIT)
        return conn

    def close(self):
        self.sock.close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


def pair(proxy: FragProxy, upstream: Upstream) -> tuple[socket.socket, socket.socket]:
    """A client connected through the proxy, and the server side of its upstream connection."""
    client = socket.create_connection((HOST, proxy.port), timeout=WAIT)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server = upstream.accept()
    return client, server


def read_exactly(sock: socket.socket, n: int) -> tuple[bytes, list[int]]:
    """n bytes, and the size of each recv that brought them."""
    got, reads = bytearray(), []
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
        reads.append(len(chunk))
    return bytes(got), reads


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the connection ends: (bytes, "eof" or "reset")."""
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(got), "reset"
        if not chunk:
            return bytes(got), "eof"
        got += chunk


def piece_log(proxy: FragProxy, client: socket.socket, up: int, down: int) -> tuple[list[int], list[int]]:
    """The proxy's piece sizes for the client's connection (to the server, to the
    client), once it logged up and down bytes (it logs a piece when send()
    returned, which may be after the reader had it)."""
    port = client.getsockname()[1]

    def complete():
        to_up, to_down = proxy.pieces(port)
        return (to_up, to_down) if (sum(to_up), sum(to_down)) == (up, down) else None
    return wait_for(complete, WAIT, what=f"the proxy to log {up} + {down} bytes")


def wait_relays_ended(proxy: FragProxy) -> None:
    wait_for(lambda: proxy.open_relays() == 0, WAIT, what="the relay to end")


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_cut_sizes_cover_the_chunk():
    import random

    rng = random.Random(7)
    seen_single = False
    for n in list(range(1, 200)) + [4096, 65536]:
        for _ in range(5):
            sizes = cut_sizes(n, rng)
            assert sum(sizes) == n and all(s > 0 for s in sizes)
            seen_single |= len(sizes) > 1 and 1 in sizes
    assert seen_single


def test_both_directions_arrive_intact_and_recut(upstream):
    """40 messages each way, each written whole: each arrives intact, and on each
    side some arrive in several reads, single bytes among them. Every piece
    waits at least 1 ms so the reader sees the cuts."""
    with FragProxy(upstream.port, seed="recut", min_delay=0.001, pause_chance=1.0) as proxy:
        client, server = pair(proxy, upstream)
        with client, server:
            up_reads, down_reads = [], []
            for i in range(40):
                msg = bytes((i + k) & 0xFF for k in range(100))
                client.sendall(msg)
                data, reads = read_exactly(server, 100)
                assert data == msg
                up_reads.append(reads)
                answer = msg[::-1]
                server.sendall(answer)
                data, reads = read_exactly(client, 100)
                assert data == answer
                down_reads.append(reads)
            for side, reads in (("to the server", up_reads), ("to the client", down_reads)):
                assert any(len(r) > 1 for r in reads), f"nothing arrived cut {side}: {reads}"
                assert any(1 in r for r in reads), f"no single byte arrived alone {side}: {reads}"
            to_up, to_down = piece_log(proxy, client, 4000, 4000)
            assert len(to_up) > 40 and len(to_down) > 40


def test_same_seed_cuts_the_same_way(upstream):
    """A connection's cuts follow from the proxy's seed and the connection's number."""
    logs = []
    for seed in ("a", "a", "b"):
        with FragProxy(upstream.port, seed=seed, pause_chance=1.0, min_delay=0.0005) as proxy:
            client, server = pair(proxy, upstream)
            with client, server:
                for i in range(20):
                    client.sendall(bytes([i]) * 50)
                    read_exactly(server, 50)
                logs.append(piece_log(proxy, client, 1000, 0)[0])
    assert logs[0] == logs[1]
    assert logs[0] != logs[2]


def test_upstream_port_is_the_servers_view_of_the_client(upstream):
    with FragProxy(upstream.port) as proxy:
        client, server = pair(proxy, upstream)
        with client, server:
            assert proxy.upstream_port(client.getsockname()[1]) == server.getpeername()[1]
            assert proxy.upstream_port(client.getsockname()[1]) != client.getsockname()[1]


def test_client_half_close_then_server_answers_then_closes(upstream):
    """Client FIN after its data: the server reads the data then EOF, and can
    still answer; the server's close then reaches the client as EOF."""
    with FragProxy(upstream.port) as proxy:
        client, server = pair(proxy, upstream)
        with client, server:
            client.sendall(b"request")
            client.shutdown(socket.SHUT_WR)
            assert read_to_end(server) == (b"request", "eof")
            server.sendall(b"answer after the client's FIN")
            server.close()
            assert read_to_end(client) == (b"answer after the client's FIN", "eof")
        wait_relays_ended(proxy)


def test_server_close_reaches_client_after_its_data(upstream):
    """The server writes, then closes: the client gets every byte, then EOF;
    the client's own close then ends the relay."""
    with FragProxy(upstream.port) as proxy:
        client, server = pair(proxy, upstream)
        with client:
            payload = bytes(range(256)) * 64
            server.sendall(payload)
            server.close()
            assert read_to_end(client) == (payload, "eof")
        wait_relays_ended(proxy)


@pytest.mark.parametrize("resetting, byte", [("client", b"x"), ("server", b"y")], ids=["client", "server"])
def test_reset_reaches_the_other_end_as_reset(upstream, resetting, byte):
    """One end writes a byte, then resets: the other end reads the byte, then the reset."""
    with FragProxy(upstream.port) as proxy:
        client, server = pair(proxy, upstream)
        resetter, other = (client, server) if resetting == "client" else (server, client)
        with other:
            resetter.sendall(byte)
            assert read_exactly(other, 1)[0] == byte
            reset(resetter)
            assert read_to_end(other) == (b"", "reset")
        wait_relays_ended(proxy)


def test_writing_to_a_server_that_closed_resets_the_client(upstream):
    """The server closed; the client did not notice and writes: the server's
    kernel answers with a reset, and so the client is reset, as without the proxy."""
    with FragProxy(upstream.port) as proxy:
        client, server = pair(proxy, upstream)
        with client:
            server.close()
            assert read_to_end(client) == (b"", "eof")

            def client_reset():
                try:
                    client.sendall(b"are you there?")
                    client.settimeout(0.2)
                    return client.recv(1) == b"" and None
                except (ConnectionResetError, BrokenPipeError):
                    return True
                except (socket.timeout, TimeoutError):
                    return None
            wait_for(client_reset, WAIT, what="the client to be reset")
        wait_relays_ended(proxy)


def test_refused_upstream_resets_the_client():
    [port] = free_ports(1)       # nothing listens there
    with FragProxy(port) as proxy:
        try:
            client = socket.create_connection((HOST, proxy.port), timeout=WAIT)
        except ConnectionResetError:
            # The proxy's reset can land before connect() looked at the socket
            # (a timed connect is non-blocking + poll + SO_ERROR): the same answer.
            return
        with client:
            assert read_to_end(client) == (b"", "reset")


def test_stop_closes_open_connections(upstream):
    proxy = FragProxy(upstream.port)
    client, server = pair(proxy, upstream)
    with client, server:
        proxy.stop()
        assert read_to_end(client) == (b"", "eof")
        assert read_to_end(server) == (b"", "eof")
    with pytest.raises(OSError):
        socket.create_connection((HOST, proxy.port), timeout=WAIT).close()


def test_backpressure_reaches_the_writer(upstream):
    """A server that does not read stops the proxy reading the client: the
    proxy holds a bounded amount, so the client's writes block, as without it."""
    with FragProxy(upstream.port, max_delay=0.0) as proxy:
        client, server = pair(proxy, upstream)
        with client, server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.setblocking(False)
            sent, stalled = 0, 0
            while sent < 256 << 20 and stalled < 50:      # 50 refusals in a row, 20 ms apart
                try:
                    sent += client.send(b"z" * 65536)
                    stalled = 0
                except BlockingIOError:
                    stalled += 1
                    time.sleep(0.02)
            assert stalled >= 50, f"the client wrote {sent >> 20} MiB to a server that reads nothing"
