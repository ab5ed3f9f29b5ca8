"""No leaks: thousands of abusive connections (garbage, oversize packets,
half-sent packets then a close or a reset, TLS garbage, half a ClientHello,
bad JSON lines) leave every worker's RSS and open file descriptors where a
warm-up round of the same size left them, and a healthy client is unaffected."""

from __future__ import annotations

import os
import socket
import ssl
import struct

import psutil
import pytest

from conftest import (CONNACK_OK, PahoClient, client_tls_context, connect_packet, publish_packet,
                      read_packet, tcp_connect, wait_closed, wait_for)

MAX_PACKET = 65536     # large partial packets, so a leaked buffer would show in RSS
ROUND = 2000          # connections per round (warm-up, then measured)
BATCH = 80            # open at once
RSS_MARGIN = 8 << 20
FD_MARGIN = 10


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, args=["--max-packet-size", str(MAX_PACKET),
                                              "--connect-timeout", "5"])


def _client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Abuser:
    """One abusive connection of a given kind: start() sends, finish() ends it."""

    KINDS = 8

    def __init__(self, server, tls_ctx, hello):
        self.server, self.tls_ctx, self.hello = server, tls_ctx, hello
        self.garbage = os.urandom(512)

    def start(self, kind):
        p = self.server.ports
        if kind == 0:                          # garbage on the MQTT port: server closes
            s = tcp_connect(p["mqtt"])
            s.sendall(b"\x00" + self.garbage)
            return s, "server"
        if kind == 1:                          # oversize PUBLISH after CONNECT: server closes
            s = tcp_connect(p["mqtt"])
            s.sendall(connect_packet(b"big") + publish_packet("t", b"x" * (MAX_PACKET * 2))[:2000])
            return s, "server"
        if kind == 2:                          # half a PUBLISH, then the client closes (FIN)
            s = tcp_connect(p["mqtt"])
            s.sendall(connect_packet(b"half") + publish_packet("t", b"y" * 60000)[:20000])
            assert read_packet(s) == CONNACK_OK
            return s, "close"
        if kind == 3:                          # half a CONNECT, then a reset
            s = tcp_connect(p["mqtt"])
            s.sendall(connect_packet(b"reset-me")[:7])
            return s, "reset"
        if kind == 4:                          # TLS garbage: handshake fails, server closes
            s = tcp_connect(p["mqtts"])
            s.sendall(b"\x16\x03\x01\x00\x05" + self.garbage[:5] + self.garbage)
            return s, "server"
        if kind == 5:                          # half a ClientHello, then the client closes
            s = tcp_connect(p["jsons"] if "jsons" in p else p["mqtts"])
            s.sendall(self.hello[: len(self.hello) // 2])
            return s, "close"
        if kind == 6:                          # JSON: invalid line before Connect, then an
            s = tcp_connect(p["json"])         # over-long line: server closes
            s.sendall(b"{not json\n" + b"z" * (MAX_PACKET + 100))
            return s, "server"
        # kind 7: a real TLS session, CONNECT, half a PUBLISH, then a reset
        s = tcp_connect(p["mqtts"])
        s = self.tls_ctx.wrap_socket(s, server_hostname="localhost")
        s.sendall(connect_packet(b"tls-half"))
        assert read_packet(s) == CONNACK_OK
        s.sendall(publish_packet("t", b"w" * 50000)[:10000])
        return s, "reset"

    def run_round(self, n):
        kind = 0
        done = 0
        while done < n:
            batch = []
            for _ in range(min(BATCH, n - done)):
                batch.append(self.start(kind % self.KINDS))
                kind += 1
            for sock, how in batch:
                if how == "server":
                    wait_closed(sock, 15)
                    sock.close()
                elif how == "reset":
                    _reset(sock)
                else:
                    sock.close()
            done += len(batch)


def _settle(server, baseline):
    wait_for(lambda: server.counters()["conns_current"] == baseline, 30,
             what=f"open connections back to {baseline}")


def _measure(pids):
    out = {}
    for pid in pids:
        proc = psutil.Process(pid)
        out[pid] = (proc.memory_info().rss, proc.num_fds())
    return out


@pytest.mark.timeout(240)
def test_abusive_connections_do_not_leak(server):
    with PahoClient(server.ports["mqtt"], client_id="healthy") as healthy:
        baseline = server.counters()["conns_current"]
        assert baseline == 1
        pids = server.worker_pids()
        abuser = Abuser(server, client_tls_context(server.ca), _client_hello())

        abuser.run_round(ROUND)                          # warm-up
        _settle(server, baseline)
        warm = _measure(pids)
        c_warm = server.counters()

        abuser.run_round(ROUND)                          # measured
        _settle(server, baseline)
        after = _measure(pids)
        c_after = server.counters()

        assert server.worker_pids() == pids, "a worker died"
        assert c_after["conns_accepted"] - c_warm["conns_accepted"] == ROUND
        # Each kind was really seen by the server as what it is.
        for name in ("closed_malformed", "packets_too_large", "tls_failures", "json_errors",
                     "closed_client", "closed_error", "tls_handshakes"):
            assert c_after[name] > c_warm[name], name
        for pid in pids:
            rss0, fds0 = warm[pid]
            rss1, fds1 = after[pid]
            assert rss1 - rss0 <= RSS_MARGIN, f"worker {pid}: RSS {rss0} -> {rss1}"
            assert fds1 - fds0 <= FD_MARGIN, f"worker {pid}: fds {fds0} -> {fds1}"
        healthy.check_healthy()
