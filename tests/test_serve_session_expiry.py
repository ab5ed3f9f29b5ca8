"""session_expiry: a clean_session=0 session whose client stays away longer is
ended (counted); one whose client returns in time is resumed."""

from __future__ import annotations

from conftest import connect_packet, read_packet, tcp_connect


def connect(port, client_id: bytes, clean: bool) -> tuple[object, int]:
    sock = tcp_connect(port)
    sock.sendall(connect_packet(client_id, clean=clean))
    ptype, body = read_packet(sock)
    assert ptype >> 4 == 2 and body[1] == 0
    return sock, body[0] & 1          # session present (MQTT-3.2.2-2)


def test_session_expiry(gw_factory):
    server = gw_factory(workers=2, listeners=("mqtt",), args=["--session-expiry", "1"])
    port = server.ports["mqtt"]
    sock, present = connect(port, b"expiring", clean=False)
    assert present == 0
    sock.close()
    server.wait_counter("sessions_expired", 1, timeout=15)
    sock, present = connect(port, b"expiring", clean=False)
    assert present == 0, "the session expired: nothing to resume"
    sock.close()


def test_session_resumed_before_expiry(gw_factory):
    server = gw_factory(workers=2, listeners=("mqtt",), args=["--session-expiry", "600"])
    port = server.ports["mqtt"]
    sock, _ = connect(port, b"returning", clean=False)
    sock.close()
    server.wait_counter("sessions_away", 1, timeout=10)
    sock, present = connect(port, b"returning", clean=False)
    assert present == 1
    sock.close()
