"""The JSON-lines protocol (Connect, Data, Heartbeat, Disconnect; Error answers) on the `json` and
`jsons` (TLS) listeners."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from conftest import (assert_counter_deltas, assert_open_for, client_tls_context, counter_delta, tcp_connect,
                      tls_connect, wait_closed)

MAX_LINE = 2048


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, listeners=("json", "jsons"),
                             args=["--max-packet-size", str(MAX_LINE)])


@pytest.fixture(params=["json", "jsons"])
def connect(request, server):
    """Opens a connection to the plain or the TLS JSON-lines listener."""
    if request.param == "json":
        return lambda: tcp_connect(server.ports["json"])
    ctx = client_tls_context(server.ca)
    return lambda: tls_connect(server.ports["jsons"], ctx)


def send(sock, **msg):
    msg.setdefault("timestamp", time.time())
    sock.sendall(json.dumps(msg).encode() + b"\n")


class Lines:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def next(self, timeout=10):
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def json_connected(sock, client_id: str) -> Lines:
    """Sends a Connect and reads its answer: the lines that come after it."""
    lines = Lines(sock)
    send(sock, message_type="Connect", client_id=client_id)
    reply = lines.next()
    assert (reply["message_type"], reply["payload"]) == ("Connect", "Connected"), reply
    return lines


def test_connect_without_client_id_gets_a_uuid(connect):
    with connect() as sock:
        send(sock, message_type="Connect", client_id=None, payload=None)
        reply = Lines(sock).next()
    assert reply["message_type"] == "Connect"
    assert reply["payload"] == "Connected"
    assert uuid.UUID(reply["client_id"]).version == 4
    assert isinstance(reply["timestamp"], (int, float))


def test_connect_with_client_id_gets_it_back(connect):
    with connect() as sock:
        send(sock, message_type="Connect", client_id="sensor-42", payload=None)
        reply = Lines(sock).next()
    assert reply["message_type"] == "Connect"
    assert reply["client_id"] == "sensor-42"
    assert reply["payload"] == "Connected"


def test_data_and_heartbeat_get_no_reply(server, connect):
    before = server.counters()
    with connect() as sock:
        lines = json_connected(sock, "quiet")
        send(sock, message_type="Data", client_id="quiet", payload={"t": 21.5})
        send(sock, message_type="Heartbeat", client_id="quiet", payload=None)
        send(sock, message_type="Data", client_id="quiet", payload=[1, 2, 3])
        # A marker that is answered: the very next line must be its answer.
        send(sock, message_type="Connect", client_id="quiet")
        assert lines.next()["message_type"] == "Connect"
        assert_open_for(sock, 0.3)
    assert_counter_deltas(server, before, {"msgs_in": 2, "json_messages_in": 5, "json_errors": 0})


@pytest.mark.parametrize("line, reason", [
    (b'{"message_type": "Connect", ', "invalid JSON"),
    (b"not json at all", "invalid JSON"),
    (b'{"message_type": "Subscribe", "client_id": "x"}', "invalid message"),
    (b'{"client_id": "x"}', "invalid message"),
    (b'["Connect"]', "invalid message"),
], ids=["truncated", "not-json", "unknown-type", "no-type", "array"])
def test_invalid_lines_get_an_error_and_are_counted(server, connect, line, reason):
    before = server.counters()
    with connect() as sock:
        lines = json_connected(sock, "err")
        sock.sendall(line + b"\n")
        reply = lines.next()
        assert reply["message_type"] == "Error"
        assert reason in reply["payload"]
        # A connected client stays connected after an error.
        send(sock, message_type="Connect", client_id="err")
        assert lines.next()["payload"] == "Connected"
    assert counter_delta(before, server.counters(), "json_errors") == 1


def test_data_before_connect_gets_an_error_and_is_closed(server, connect):
    before = server.counters()
    with connect() as sock:
        send(sock, message_type="Data", client_id="early", payload=1)
        got = wait_closed(sock, 10)
    reply = json.loads(got)
    assert reply["message_type"] == "Error"
    assert "before Connect" in reply["payload"]
    assert_counter_deltas(server, before, {"json_errors": 1, "msgs_in": 0})


def test_invalid_first_line_is_answered_then_closed(server, connect):
    with connect() as sock:
        sock.sendall(b"{oops\n")
        reply = json.loads(wait_closed(sock, 10))
    assert reply["message_type"] == "Error"


def test_disconnect_closes(server, connect):
    before = server.counters()
    with connect() as sock:
        json_connected(sock, "bye")
        send(sock, message_type="Disconnect", client_id="bye")
        assert wait_closed(sock, 10) == b""
    assert_counter_deltas(server, before, {"closed_client": 1, "sessions_current": 0})


def test_several_lines_in_one_write_and_crlf(server, connect):
    with connect() as sock:
        lines = Lines(sock)
        sock.sendall(b'{"message_type": "Connect", "client_id": "batch"}\r\n'
                     b'{"message_type": "Heartbeat"}\r\n\r\n'
                     b'{"message_type": "Data", "payload": "a"}\n'
                     b'{"message_type": "Connect"}\n')
        assert lines.next()["client_id"] == "batch"
        assert lines.next()["client_id"] == "batch"


def test_line_split_across_writes(server, connect):
    with connect() as sock:
        data = b'{"message_type": "Connect", "client_id": "split"}\n'
        for i in range(0, len(data), 7):
            sock.sendall(data[i:i + 7])
            time.sleep(0.01)
        assert Lines(sock).next()["client_id"] == "split"


def test_line_over_max_packet_size_closes(server, connect):
    before = server.counters()
    with connect() as sock:
        send(sock, message_type="Connect", client_id="long")
        Lines(sock).next()
        send(sock, message_type="Data", payload="x" * (MAX_LINE + 10))
        wait_closed(sock, 10)
    assert counter_delta(before, server.counters(), "packets_too_large") == 1


def test_client_id_not_printable_refused(server, connect):
    with connect() as sock:
        send(sock, message_type="Connect", client_id="bad\u0000id")
        reply = json.loads(wait_closed(sock, 10))
    assert reply["message_type"] == "Error"
