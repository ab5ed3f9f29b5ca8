"""MQTT over WebSocket (the ws and wss listeners): real clients (paho-mqtt with
transport="websockets", mosquitto_sub on TCP) across workers and transports,
and a plain WebSocket client (tests/ws_client.py) for the upgrade, the frames
and every malformed input, each written whole and in fragments: answered with
the right HTTP status or Close code, then closed, counted, the worker alive
(the harness fails a test during which one died)."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest

from conftest import (CONNACK_OK, HOST, PYTHON, client_tls_context, connect_packet, counter_delta, gw_env,
                      publish_packet, read_packet, send_fragmented, subscribe_packet, tcp_connect, wait_closed,
                      wait_for)
from mqtt_bytes import connect_packet as connect_with_will
from ws_client import (WsMqtt, binary, close_frame, frame, header, read_close, read_frame, read_head,
                       status_of, upgrade_request, ws_connect)

MAX_PACKET = 100_000


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, listeners=("mqtt", "ws", "wss"), args=["--max-packet-size", MAX_PACKET])


@pytest.fixture(scope="module")
def guarded(gw_module_factory):
    """A server whose ws listener takes browser pages of two origins only."""
    return gw_module_factory(workers=1, listeners=("ws",),
                             args=["--ws-allowed-origins", "https://dash.example, http://localhost:8080"])


# --- paho-mqtt over WebSocket ---------------------------------------------------------

def raw_socket(client: paho.Client) -> socket.socket:
    sock = client.socket()
    return getattr(sock, "_socket", sock)     # paho's WebSocket wrapper holds the TCP (or TLS) socket


class Paho:
    """A paho-mqtt client (websockets or tcp), connected, its loop running;
    what it receives in `got`."""

    def __init__(self, server, transport: str, client_id: str, *, clean: bool = True, will=None):
        self.got: list = []
        self.cond = threading.Condition()
        tls = transport == "wss"
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                                  transport="tcp" if transport == "tcp" else "websockets")
        if transport != "tcp":
            self.client.ws_set_options(path="/mqtt")
        if tls:
            self.client.tls_set(ca_certs=str(server.ca))
        if will:
            self.client.will_set(*will)
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p=None: self.connected.set() if rc == 0 else None
        port = server.ports["mqtt" if transport == "tcp" else transport]
        self.client.connect("localhost" if tls else HOST, port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(10), f"{client_id}: no CONNACK"
        self.worker = server.which_worker(raw_socket(self.client).getsockname()[1])

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.got.append((msg.topic, msg.payload, msg.qos, msg.retain))
            self.cond.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic, qos)
        assert done.wait(10), "no SUBACK"

    def wait(self, n: int, timeout: float = 15.0) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, timeout), f"got {len(self.got)} of {n}: {self.got}"
            return list(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def paho_on_other_worker(server, transport: str, prefix: str, other: int, **kw) -> Paho:
    """A client connected on another worker than `other` (reconnects until one lands there)."""
    for attempt in range(60):
        p = Paho(server, transport, f"{prefix}-{attempt}", **kw)
        if p.worker != other:
            return p
        p.close()
    raise AssertionError("every connection landed on the same worker")


@pytest.mark.parametrize("sub_transport,pub_transport", [("wss", "ws"), ("ws", "tcp"), ("tcp", "ws"), ("ws", "wss")])
def test_paho_qos1_across_workers_and_transports(server, sub_transport, pub_transport):
    sub = Paho(server, sub_transport, f"sub-{sub_transport}-{pub_transport}")
    pub = paho_on_other_worker(server, pub_transport, f"pub-{sub_transport}-{pub_transport}", sub.worker)
    try:
        topic = f"x/{sub_transport}/{pub_transport}"
        sub.subscribe(topic + "/#", 1)
        # Sizes across the frame length forms (7-bit, 16-bit, 64-bit) and several frames' worth.
        payloads = [b"", b"a", b"b" * 100, b"c" * 126, b"d" * 65000, b"e" * 70000, b"f" * 40000]
        for i, payload in enumerate(payloads):
            info = pub.client.publish(f"{topic}/{i}", payload, qos=1)
            info.wait_for_publish(10)
            assert info.is_published()
        got = sub.wait(len(payloads))
        assert [(t, p, q) for t, p, q, r in got] == [(f"{topic}/{i}", p, 1) for i, p in enumerate(payloads)]
    finally:
        sub.close()
        pub.close()


def test_paho_retained_over_websocket(server):
    pub = Paho(server, "tcp", "ret-pub")
    info = pub.client.publish("ret/ws", b"kept", qos=1, retain=True)
    info.wait_for_publish(10)
    pub.close()
    sub = paho_on_other_worker(server, "ws", "ret-sub", pub.worker)
    try:
        sub.subscribe("ret/#", 1)
        assert sub.wait(1)[0] == ("ret/ws", b"kept", 1, True)
    finally:
        sub.close()
        cleaner = Paho(server, "tcp", "ret-clean")
        cleaner.client.publish("ret/ws", b"", qos=1, retain=True).wait_for_publish(10)
        cleaner.close()


WILL_CLIENT = r"""
import sys, time
import paho.mqtt.client as paho
port, transport, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="will-" + transport, transport="websockets")
c.ws_set_options(path="/mqtt")
if transport == "wss":
    c.tls_set(ca_certs=ca)
c.will_set("will/" + transport, b"gone", qos=1)
c.on_connect = lambda *a: print("connected", flush=True)
c.connect("localhost", port, keepalive=30)
c.loop_forever()
"""


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_paho_will_when_websocket_client_dies(server, transport, tmp_path):
    sub = Paho(server, "tcp", f"will-watch-{transport}")
    sub.subscribe("will/#", 1)
    script = tmp_path / "will_client.py"
    script.write_text(WILL_CLIENT)
    proc = subprocess.Popen([PYTHON, str(script), str(server.ports[transport]), transport, str(server.ca)],
                            stdout=subprocess.PIPE, env=gw_env())
    try:
        assert proc.stdout.readline().strip() == b"connected"
        proc.kill()             # no DISCONNECT, no Close frame: the socket just goes
        proc.wait(10)
        assert sub.wait(1)[0][:3] == (f"will/{transport}", b"gone", 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sub.close()


def test_persistent_session_moves_between_transports(server):
    first = Paho(server, "ws", "roamer", clean=False)
    first.subscribe("roam/#", 1)
    first.close()
    pub = Paho(server, "tcp", "roam-pub")
    pub.client.publish("roam/a", b"while away", qos=1).wait_for_publish(10)
    pub.close()
    back = Paho(server, "wss", "roamer", clean=False)
    try:
        assert back.wait(1)[0][:3] == ("roam/a", b"while away", 1)
    finally:
        back.client.unsubscribe("roam/#")
        back.close()


def test_mosquitto_sub_on_tcp_gets_a_websocket_publish(server):
    proc = subprocess.Popen(["mosquitto_sub", "-h", HOST, "-p", str(server.ports["mqtt"]), "-t", "mosq/ws",
                             "-q", "1", "-C", "1", "-i", "mosq-sub"], stdout=subprocess.PIPE)
    try:
        wait_for(lambda: server.counters()["packets_in"]["subscribe"] >= 1, 10, what="the SUBSCRIBE")
        time.sleep(0.2)
        pub = Paho(server, "ws", "mosq-pub")
        pub.client.publish("mosq/ws", b"over websocket", qos=1).wait_for_publish(10)
        pub.close()
        out, _ = proc.communicate(timeout=15)
        assert out.strip() == b"over websocket"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --- the plain client: MQTT over frames -------------------------------------------------

def test_packets_split_over_frames_and_packed_in_one(server, frag_rng):
    sock = ws_connect(server.ports["ws"])
    try:
        ws = WsMqtt(sock)
        stream = (connect_packet(b"packer") + subscribe_packet(1, [(b"pack/#", 1)])
                  + publish_packet(b"pack/a", b"x" * 300, qos=1, packet_id=7))
        # CONNECT, SUBSCRIBE and PUBLISH cut across frames at random points, a Ping
        # and a fragmented message's pieces among them.
        cuts = sorted(frag_rng.sample(range(1, len(stream)), 8))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        wire = b""
        for i, piece in enumerate(pieces):
            wire += frame(2 if i % 3 == 0 else 0, piece, fin=(i % 3 == 2 or i == len(pieces) - 1))
            if i == 2:
                wire += frame(9, b"ping!")
        send_fragmented(sock, wire, frag_rng)
        answers = {}
        pong = None
        while len(answers) < 4:
            fin, op, payload = read_frame(sock)
            if op == 10:
                pong = payload
                continue
            assert op == 2 and fin
            ws.buf += payload
            while True:
                try:
                    first, body = _take(ws)
                except LookupError:
                    break
                answers[first & 0xF0] = body
        assert pong == b"ping!"
        assert answers[0x20] == CONNACK_OK[1]
        assert answers[0x90] == b"\x00\x01\x01"
        assert answers[0x40] == b"\x00\x07"
        assert answers[0x30].endswith(b"x" * 300)
    finally:
        sock.close()


def _take(ws: WsMqtt) -> tuple[int, bytes]:
    buf = ws.buf
    if len(buf) < 2:
        raise LookupError
    length, shift, i = 0, 0, 1
    while True:
        if i >= len(buf):
            raise LookupError
        b = buf[i]
        length |= (b & 0x7F) << shift
        shift += 7
        i += 1
        if not b & 0x80:
            break
    if len(buf) < i + length:
        raise LookupError
    first, body = buf[0], bytes(buf[i:i + length])
    del buf[:i + length]
    return first, body


def test_answers_of_one_turn_go_in_one_binary_frame(server):
    sock = ws_connect(server.ports["ws"])
    try:
        ws = WsMqtt(sock)
        ws.send(connect_packet(b"oneframe"))
        assert ws.read_packet() == CONNACK_OK
        # Ten QoS 1 PUBLISHes in one frame: their ten PUBACKs come in one frame.
        ws.send(b"".join(publish_packet(b"one/frame", b"p", qos=1, packet_id=i) for i in range(1, 11)))
        for i in range(1, 11):
            assert ws.read_packet() == (0x40, struct.pack("!H", i))
        if not server.fragment:     # (a fragmenting proxy hands the frame over in several reads)
            assert ws.frames[-1] == (True, 2, 40)
        assert all(op == 2 and fin for fin, op, n in ws.frames)
    finally:
        sock.close()


def test_ping_pong_and_clean_close(server):
    before = server.counters()
    sock = ws_connect(server.ports["ws"])
    try:
        sock.sendall(frame(9, b"before connect"))
        assert read_frame(sock) == (True, 10, b"before connect")
        ws = WsMqtt(sock)
        ws.send(connect_packet(b"pinger"))
        assert ws.read_packet() == CONNACK_OK
        sock.sendall(frame(9, b""))
        assert read_frame(sock) == (True, 10, b"")
        sock.sendall(frame(10, b"unsolicited pong"))        # ignored
        sock.sendall(close_frame(1000, b"bye"))
        assert read_close(sock) == 1000
        wait_closed(sock)
    finally:
        sock.close()
    after = server.counters()
    assert counter_delta(before, after, "ws_upgrades") == 1
    assert counter_delta(before, after, "ws_closes.1000") == 1


def test_mqtt_disconnect_over_websocket_ends_with_a_close_frame(server):
    sock = ws_connect(server.ports["ws"], protocols="mqttv3.1, mqtt")
    try:
        ws = WsMqtt(sock)
        ws.send(connect_packet(b"leaver"))
        assert ws.read_packet() == CONNACK_OK
        ws.send(b"\xe0\x00")
        wait_closed(sock)
    finally:
        sock.close()


# --- malformed frames ----------------------------------------------------------------------

BAD_FRAMES = {
    "unmasked": (binary(b"\x10\x00", mask=None), 1002),
    "rsv1": (frame(2, b"x", rsv=4), 1002),
    "rsv3": (frame(2, b"x", rsv=1), 1002),
    "text": (frame(1, b"hello"), 1003),
    "reserved data opcode": (frame(3, b"x"), 1002),
    "reserved control opcode": (frame(0xB, b"x"), 1002),
    "continuation first": (frame(0, b"x"), 1002),
    # (The data before the bad frame is the start of a PUBLISH: the MQTT framing waits for the rest.)
    "binary inside a fragmented message": (frame(2, b"\x30", fin=False) + frame(2, b"\x00"), 1002),
    "text inside a fragmented message": (frame(2, b"\x30", fin=False) + frame(1, b"b"), 1002),
    "fragmented ping": (frame(9, b"x", fin=False), 1002),
    "ping over 125 bytes": (frame(9, b"p" * 126), 1002),
    "close with one byte": (frame(8, b"\x03"), 1002),
    "close code 1005": (close_frame(1005), 1002),
    "close code 999": (close_frame(999), 1002),
    "close code 2000": (close_frame(2000), 1002),
    "close reason not UTF-8": (close_frame(1000, b"\xff\xfe"), 1007),
    "64-bit length with its top bit": (frame(2, b"", length=1 << 63, long_form=8), 1002),
    "frame over max_packet_size": (frame(2, b"", length=MAX_PACKET + 1), 1009),
    "message over max_packet_size": (frame(2, publish_packet(b"t", b"z" * (MAX_PACKET - 20))[:MAX_PACKET // 2],
                                           fin=False) + frame(0, b"z" * (MAX_PACKET // 2 + 1)), 1009),
}


@pytest.mark.parametrize("how", ["whole", "fragments"])
@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_malformed_frame_is_closed_with_its_code(server, name, how, frag_rng):
    data, code = BAD_FRAMES[name]
    before = server.counters()
    sock = ws_connect(server.ports["ws"])
    try:
        ws = WsMqtt(sock)
        ws.send(connect_packet(b"bad-" + name.encode().replace(b" ", b"-")[:20]))
        assert ws.read_packet() == CONNACK_OK
        if how == "whole":
            sock.sendall(data)
        else:
            send_fragmented(sock, data, frag_rng)
        assert read_close(sock) == code
        wait_closed(sock)
    finally:
        sock.close()
    # Our side closed after its FIN, reading away what the client still sent: counted once the client closed.
    after = wait_for(lambda: (lambda c: c if counter_delta(before, c, "closed_malformed") else None)(server.counters()),
                     10, what="the close counted")
    slot = {1002: "1002", 1003: "1003", 1007: "1007", 1009: "1009"}[code]
    assert counter_delta(before, after, f"ws_closes.{slot}") == 1
    assert counter_delta(before, after, "closed_malformed") == 1
    server.wait_log("closed a WebSocket connection: ")     # logged (at most once per 10 s)


def test_oversized_mqtt_packet_in_valid_frames_closes(server):
    before = server.counters()
    sock = ws_connect(server.ports["ws"])
    try:
        ws = WsMqtt(sock)
        ws.send(connect_packet(b"too-big"))
        assert ws.read_packet() == CONNACK_OK
        big = publish_packet(b"big", b"z" * (MAX_PACKET + 10))
        try:
            for i in range(0, len(big), 30000):
                ws.send(big[i:i + 30000])
        except (BrokenPipeError, ConnectionResetError):
            pass                # closed on the PUBLISH's fixed header already
        wait_closed(sock)
    finally:
        sock.close()
    assert counter_delta(before, server.counters(), "packets_too_large") == 1


# --- the upgrade ------------------------------------------------------------------------------

def refused(server, request: bytes, how: str, frag_rng) -> bytes:
    sock = tcp_connect(server.ports["ws"])
    try:
        if how == "whole":
            sock.sendall(request)
        else:
            send_fragmented(sock, request, frag_rng)
        head = read_head(sock)
        wait_closed(sock)
        return head
    finally:
        sock.close()


BAD_UPGRADES = {
    "wrong path": (dict(path="/other"), 404),
    "path with a query is still the path": (dict(path="/other?x=/mqtt"), 404),
    "no subprotocol": (dict(protocols=None), 400),
    "unsupported subprotocol": (dict(protocols="wamp, stomp"), 400),
    "version 8": (dict(version="8"), 426),
    "short key": (dict(key=b"c2hvcnQ="), 400),
}


@pytest.mark.parametrize("how", ["whole", "fragments"])
@pytest.mark.parametrize("name", list(BAD_UPGRADES))
def test_bad_upgrade_is_answered_and_closed(server, name, how, frag_rng):
    kwargs, status = BAD_UPGRADES[name]
    before = server.counters()
    head = refused(server, upgrade_request(**kwargs)[0], how, frag_rng)
    assert status_of(head) == status
    if status == 426:
        assert header(head, "Sec-WebSocket-Version") == "13"
    after = server.counters()
    assert counter_delta(before, after, f"ws_refused.{status}") == 1
    assert counter_delta(before, after, "ws_upgrades") == 0


@pytest.mark.parametrize("request_bytes,status", [
    (b"POST /mqtt HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /mqtt HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", 400),
    (b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n", 400),                           # no upgrade at all
    (b"GET /mqtt HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 17000 + b"\r\n\r\n", 431),
    (b"GET /mqtt HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
])
def test_malformed_upgrade_requests(server, request_bytes, status, frag_rng):
    for how in ("whole", "fragments"):
        assert status_of(refused(server, request_bytes, how, frag_rng)) == status


@pytest.mark.parametrize("how", ["whole", "fragments"])
def test_foreign_origin_is_refused(guarded, how, frag_rng):
    before = guarded.counters()
    head = refused(guarded, upgrade_request(origin="https://evil.example")[0], how, frag_rng)
    assert status_of(head) == 403
    assert counter_delta(before, guarded.counters(), "ws_refused.403") == 1
    guarded.wait_log("Origin https://evil.example is not in ws_allowed_origins")


@pytest.mark.parametrize("origin", ["https://dash.example", "HTTP://LOCALHOST:8080", None])
def test_allowed_origins_and_none_are_let_in(guarded, origin):
    sock = ws_connect(guarded.ports["ws"], origin=origin)
    try:
        ws = WsMqtt(sock)
        ws.send(connect_packet(b"origin-ok"))
        assert ws.read_packet() == CONNACK_OK
    finally:
        sock.close()


def test_upgrade_and_first_frames_in_one_write(server):
    """A client that sends its CONNECT right behind the upgrade request."""
    sock = tcp_connect(server.ports["ws"])
    try:
        req, _ = upgrade_request(protocols="mqttv3.1")
        sock.sendall(req + binary(connect_packet(b"eager")))
        head = read_head(sock)
        assert status_of(head) == 101 and header(head, "Sec-WebSocket-Protocol") == "mqttv3.1"
        assert WsMqtt(sock).read_packet() == CONNACK_OK
    finally:
        sock.close()


def test_wss_plain_client(server):
    sock = ws_connect(server.ports["wss"], tls=client_tls_context(server.ca))
    try:
        ws = WsMqtt(sock)
        ws.send(connect_packet(b"tls-plain"))
        assert ws.read_packet() == CONNACK_OK
        sock.sendall(frame(1, b"text over tls"))
        assert read_close(sock) == 1003
    finally:
        sock.close()


def test_will_published_after_a_protocol_error(server):
    sub = Paho(server, "tcp", "err-will-watch")
    sub.subscribe("errwill/#", 1)
    sock = ws_connect(server.ports["ws"])
    try:
        ws = WsMqtt(sock)
        ws.send(connect_with_will(b"err-will", will=(b"errwill/x", b"dead", 1, False)))
        assert ws.read_packet() == CONNACK_OK
        sock.sendall(binary(b"\xc0\x00", mask=None))       # unmasked: 1002, not the client's DISCONNECT
        assert read_close(sock) == 1002
        assert sub.wait(1)[0][:3] == ("errwill/x", b"dead", 1)
    finally:
        sock.close()
        sub.close()


# --- passwords, the ACL and limits sit above the framing ------------------------------------

def test_passwords_acl_and_limits_apply_over_websocket(gw_factory, tmp_path):
    pwfile = tmp_path / "passwd"
    from conftest import run_gw
    res = run_gw("passwd", "-b", "-c", str(pwfile), "alice", "wonder")
    assert res.returncode == 0, res.stderr
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite a/#\n")
    server = gw_factory(workers=2, listeners=("mqtt", "ws"),
                        args=["--password-file", pwfile, "--acl-file", acl, "--allow-anonymous", "false",
                              "--max-subscriptions", "2"])
    before = server.counters()
    # A wrong password: CONNACK 4, then a Close (1000) and the connection closes.
    sock = ws_connect(server.ports["ws"])
    try:
        ws = WsMqtt(sock)
        ws.send(connect_with_will(b"bad-pw", user=b"alice", password=b"nope"))
        assert ws.read_packet() == (0x20, b"\x00\x04")
        assert read_close(sock) == 1000
    finally:
        sock.close()
    # The right one: in; the ACL refuses b/# (SUBACK 0x80) and allows a/#; max_subscriptions holds.
    sock = ws_connect(server.ports["ws"])
    try:
        ws = WsMqtt(sock)
        ws.send(connect_with_will(b"good-pw", user=b"alice", password=b"wonder"))
        assert ws.read_packet() == CONNACK_OK
        ws.send(subscribe_packet(1, [(b"b/#", 1), (b"a/#", 1), (b"a/x", 0), (b"a/y", 0)]))
        assert ws.read_packet() == (0x90, b"\x00\x01\x80\x01\x00\x80")
    finally:
        sock.close()
    after = server.counters()
    assert counter_delta(before, after, "acl_subscribe_denied") == 1
    assert counter_delta(before, after, "auth_refused_password") == 1
