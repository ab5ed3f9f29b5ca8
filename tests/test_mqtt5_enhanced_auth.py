"""MQTT 5.0 enhanced authentication (section 4.12): SCRAM-SHA-512 against the
password file's `$7$` entries, the AUTH exchange before the CONNACK, and
re-authentication of a connected client. Real `gw serve` processes (2
workers), password files made by mosquitto_passwd and `gw passwd`, raw
sockets (no client library here speaks AUTH) with packets built by the
reference codec (tests/mqtt5_ref.py) and a SCRAM-SHA-512 client written here
from RFC 5802 with hashlib/hmac, which computes SaltedPassword from the
password itself and checks the server's signature (mutual authentication)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import shutil
import signal
import subprocess
import time

import pytest

import mqtt5_ref as ref
from conftest import client_tls_context, get_counter, run_gw, tcp_connect, tls_connect
from gw import packets5 as p5
from test_mqtt5_connections import V5  # a raw MQTT 5.0 client

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd not installed")

WAIT = 10.0
METHOD = "SCRAM-SHA-512"


# --- the SCRAM-SHA-512 client (RFC 5802) ---------------------------------------------------

def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha512).digest()


class ScramClient:
    def __init__(self, user: str, password: str, gs2: str = "n,,"):
        self.user, self.password, self.gs2 = user, password, gs2
        self.cnonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self.bare = f"n={user.replace('=', '=3D').replace(',', '=2C')},r={self.cnonce}"
        self.expected_v = None

    def first(self) -> bytes:
        return (self.gs2 + self.bare).encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(kv.split("=", 1) for kv in text.split(","))
        assert attrs["r"].startswith(self.cnonce) and len(attrs["r"]) > len(self.cnonce)
        salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
        salted = hashlib.pbkdf2_hmac("sha512", self.password.encode(), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha512(client_key).digest()
        without_proof = f"c={base64.b64encode(self.gs2.encode()).decode()},r={attrs['r']}"
        auth_message = f"{self.bare},{text},{without_proof}".encode()
        proof = bytes(a ^ b for a, b in zip(client_key, _hmac(stored_key, auth_message)))
        self.expected_v = b"v=" + base64.b64encode(_hmac(_hmac(salted, b"Server Key"), auth_message))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def parse_server_first(data: bytes) -> dict:
    return dict(kv.split("=", 1) for kv in data.decode().split(","))


def auth_props(data: bytes | None, method: str = METHOD) -> p5.Properties:
    return p5.Properties(authentication_method=method, authentication_data=data)


def scram_connect(c: V5, sc: ScramClient, client_id: str, fragmented: bool = False, **kw):
    """CONNECT with the client-first; the server's answer (AUTH 0x18 or a CONNACK)."""
    c.send(p5.Connect(client_id=client_id, properties=auth_props(sc.first()), **kw), fragmented)
    return c.read()


def scram_login(c: V5, sc: ScramClient, client_id: str, fragmented: bool = False, **kw) -> p5.Connack:
    """The whole exchange; the CONNACK (its server-final checked when 0)."""
    pkt = scram_connect(c, sc, client_id, fragmented, **kw)
    if isinstance(pkt, p5.Connack):
        return pkt
    assert isinstance(pkt, p5.Auth) and pkt.reason_code == 0x18, pkt
    assert pkt.properties.authentication_method == METHOD
    c.send(p5.Auth(reason_code=0x18, properties=auth_props(sc.final(pkt.properties.authentication_data))),
           fragmented)
    ack = c.read()
    assert isinstance(ack, p5.Connack), ack
    if ack.reason_code == 0:
        assert ack.properties.authentication_method == METHOD
        assert ack.properties.authentication_data == sc.expected_v        # the server knew SaltedPassword
    return ack


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


# --- servers -----------------------------------------------------------------------------------

def make_password_file(path) -> None:
    """alice, eve: mosquitto_passwd ($7$, 101 iterations); bob: `gw passwd --hash
    pbkdf2` ($7$, 210,000); carol: argon2id; dave: $6$ (Mosquitto before 2.0)."""
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "alice-pw"], check=True,
                   capture_output=True, timeout=30)
    subprocess.run(["mosquitto_passwd", "-b", str(path), "eve", "eve-pw"], check=True, capture_output=True,
                   timeout=30)
    assert run_gw("passwd", "-b", "--hash", "pbkdf2", path, "bob", "bob-pw").returncode == 0
    assert run_gw("passwd", "-b", "--hash", "argon2id", path, "carol", "carol-pw").returncode == 0
    salt = secrets.token_bytes(12)
    digest = hashlib.sha512(b"dave-pw" + salt).digest()
    with open(path, "a") as fh:
        fh.write("dave:$6$%s$%s\n" % (base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def secured_server(factory, d, listeners=("mqtt",), args=()):
    pw = d / "passwd"
    make_password_file(pw)
    acl = d / "acl"
    acl.write_text("user alice\ntopic readwrite open/#\n\nuser bob\ntopic readwrite bob/#\n")
    return factory(workers=2, listeners=listeners,
                   args=["--password-file", str(pw), "--acl-file", str(acl), "--allow-anonymous", "false",
                         *args])


@pytest.fixture(scope="module")
def gw(gw_module_factory, tmp_path_factory):
    return secured_server(gw_module_factory, tmp_path_factory.mktemp("scram"))


def client(gw) -> V5:
    return V5(tcp_connect(gw.ports["mqtt"]))


def enhanced(gw) -> dict:
    return gw.counters()["enhanced_auth"]


# --- logins ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
@pytest.mark.parametrize("user", ["alice", "bob"])
def test_scram_login_succeeds_and_the_server_proves_itself(gw, user, fragmented):
    before = enhanced(gw)["scram_ok"]
    c = client(gw)
    sc = ScramClient(user, f"{user}-pw")
    ack = scram_login(c, sc, unique(user), fragmented)
    assert ack.reason_code == 0, ack
    c.send(p5.Pingreq())
    assert isinstance(c.read(), p5.Pingresp)
    c.close()
    assert enhanced(gw)["scram_ok"] >= before + 1


def test_connect_user_name_must_be_the_scram_user(gw):
    c = client(gw)
    assert scram_login(c, ScramClient("alice", "alice-pw"), unique("un"), username="alice").reason_code == 0
    c.close()
    c = client(gw)
    ack = scram_connect(c, ScramClient("alice", "alice-pw"), unique("un"), username="bob")
    assert isinstance(ack, p5.Connack) and ack.reason_code == 0x86
    c.closed()


def test_wrong_password_is_0x86(gw):
    before = enhanced(gw)["scram_failed"]
    c = client(gw)
    assert scram_login(c, ScramClient("alice", "not-it"), unique("wrong")).reason_code == 0x86
    c.closed()
    assert enhanced(gw)["scram_failed"] >= before + 1


def test_unknown_user_looks_like_a_known_one_and_fails_at_the_proof(gw):
    """RFC 5802 section 9: the server-first of an unknown user has the shape of
    a known user's (a 12-byte salt, the file's usual iteration count), the same
    salt every time on every worker, and the login fails like a wrong password."""
    known = []
    for _ in range(2):
        c = client(gw)
        known.append(parse_server_first(scram_connect(c, ScramClient("alice", "x"), unique("k"))
                                        .properties.authentication_data))
        c.close()
    salts = set()
    for _ in range(6):
        c = client(gw)
        pkt = scram_connect(c, ScramClient("nobody", "x"), unique("nobody"))
        assert isinstance(pkt, p5.Auth) and pkt.reason_code == 0x18
        first = parse_server_first(pkt.properties.authentication_data)
        assert sorted(first) == sorted(known[0]) == ["i", "r", "s"]
        assert first["i"] == known[0]["i"] == "101"
        assert len(base64.b64decode(first["s"])) == len(base64.b64decode(known[0]["s"])) == 12
        salts.add(first["s"])
        c.close()
    assert len(salts) == 1                  # the same fake salt whichever worker answered
    c = client(gw)
    assert scram_login(c, ScramClient("nobody", "x"), unique("nobody")).reason_code == 0x86
    c.closed()


@pytest.mark.parametrize("user", ["carol", "dave"], ids=["argon2id", "sha512-6"])
def test_entry_that_cannot_do_scram_is_refused_0x86(gw, user):
    """argon2id and $6$ hashes are not SaltedPassword: even the right password fails."""
    c = client(gw)
    pkt = scram_connect(c, ScramClient(user, f"{user}-pw"), unique(user))
    assert isinstance(pkt, p5.Auth)
    assert parse_server_first(pkt.properties.authentication_data)["i"] == "101"
    c.close()
    c = client(gw)
    assert scram_login(c, ScramClient(user, f"{user}-pw"), unique(user)).reason_code == 0x86
    c.closed()
    # The same user logs in with its password as before.
    c = client(gw)
    c.send(p5.Connect(client_id=unique(user), username=user, password=f"{user}-pw".encode()))
    assert c.read().reason_code == 0
    c.close()


def test_unsupported_method_is_0x8c(gw):
    before = enhanced(gw)["method_unsupported"]
    c = client(gw)
    c.send(p5.Connect(client_id=unique("m"), properties=auth_props(b"x", "SCRAM-SHA-1")))
    assert c.read().reason_code == 0x8C
    c.closed()
    assert enhanced(gw)["method_unsupported"] == before + 1


def test_channel_binding_or_garbage_is_0x87(gw):
    for data in (b"p=tls-unique,,n=alice,r=abc", b"\xff\xfe", b"n,,r=abc,n=alice", b"x" * 2000):
        c = client(gw)
        c.send(p5.Connect(client_id=unique("g"), properties=auth_props(data)))
        pkt = c.read()
        assert isinstance(pkt, p5.Connack) and pkt.reason_code == 0x87, (data, pkt)
        c.closed()


# --- the standard's rules of the exchange ---------------------------------------------------------

def test_auth_without_a_method_in_connect_is_a_protocol_error(gw):
    c = client(gw)
    c.send(p5.Connect(client_id=unique("pw"), username="alice", password=b"alice-pw"))
    assert c.read().reason_code == 0
    c.send(p5.Auth(reason_code=0x19, properties=auth_props(ScramClient("alice", "alice-pw").first())))
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Disconnect, 0x82)]


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
def test_another_method_in_the_continuing_auth_is_a_protocol_error(gw, fragmented):
    c = client(gw)
    sc = ScramClient("alice", "alice-pw")
    pkt = scram_connect(c, sc, unique("am"), fragmented)
    c.send(p5.Auth(reason_code=0x18, properties=auth_props(sc.final(pkt.properties.authentication_data),
                                                           "SCRAM-SHA-256")), fragmented)
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Connack, 0x82)]


@pytest.mark.parametrize("packet", ["publish", "reauth", "subscribe"])
def test_other_packets_during_the_exchange_are_protocol_errors(gw, packet):
    c = client(gw)
    sc = ScramClient("alice", "alice-pw")
    pkt = scram_connect(c, sc, unique("pe"))
    assert isinstance(pkt, p5.Auth)
    if packet == "publish":
        c.send(p5.Publish(topic="open/x", payload=b"early"))
    elif packet == "subscribe":
        c.send(p5.Subscribe(packet_id=1, topics=[("open/#", 0)]))
    else:
        c.send(p5.Auth(reason_code=0x19, properties=auth_props(sc.first())))
    got = c.closed()
    assert [(type(p), p.reason_code) for p in got] == [(p5.Connack, 0x82)]


def test_server_first_past_the_clients_maximum_packet_size_is_not_sent(gw):
    """MQTT-3.1.2-24: an AUTH larger than the client's Maximum Packet Size is
    not sent; the connection closes instead."""
    c = client(gw)
    sc = ScramClient("alice", "alice-pw")
    c.send(p5.Connect(client_id=unique("mps"), properties=p5.Properties(
        authentication_method=METHOD, authentication_data=sc.first(), maximum_packet_size=40)))
    assert c.closed() == []


def test_client_disconnect_during_the_exchange(gw):
    c = client(gw)
    scram_connect(c, ScramClient("alice", "alice-pw"), unique("dc"))
    c.send(p5.Disconnect())
    assert c.closed() == []


def test_connect_timeout_covers_the_exchange(gw_factory, tmp_path):
    server = secured_server(gw_factory, tmp_path, args=["--connect-timeout", "1"])
    c = V5(tcp_connect(server.ports["mqtt"]))
    pkt = scram_connect(c, ScramClient("alice", "alice-pw"), unique("slow"))
    assert isinstance(pkt, p5.Auth)
    assert c.closed(timeout=30) == []           # no client-final: closed without a CONNACK...
    assert get_counter(server.counters(), "closed_connect_timeout") == 1    # ...by the connect timeout


# --- the ACL, re-authentication ----------------------------------------------------------------------

def test_acl_applies_to_the_scram_user(gw):
    c = client(gw)
    assert scram_login(c, ScramClient("bob", "bob-pw"), unique("acl")).reason_code == 0
    c.send(p5.Subscribe(packet_id=1, topics=[("bob/#", 1), ("open/#", 1)]))
    ack = c.read()
    assert isinstance(ack, p5.Suback) and ack.reason_codes == [1, 0x87]
    c.send(p5.Publish(topic="open/x", payload=b"no", qos=1, packet_id=2))
    ack = c.read()
    assert (ack.packet_id, ack.reason_code) == (2, 0x87)
    c.close()


def reauth(c: V5, sc: ScramClient, between=None):
    """AUTH 0x19, 0x18, 0x18; the server's last answer. `between`: packets sent
    after the 0x19, before reading the 0x18 (handled meanwhile)."""
    c.send(p5.Auth(reason_code=0x19, properties=auth_props(sc.first())))
    others = []
    for pkt in between or ():
        c.send(pkt)
    while True:
        pkt = c.read()
        if not isinstance(pkt, p5.Auth):
            others.append(pkt)
            if isinstance(pkt, p5.Disconnect):
                return pkt, others
            continue
        break
    assert pkt.reason_code == 0x18 and pkt.properties.authentication_method == METHOD
    c.send(p5.Auth(reason_code=0x18, properties=auth_props(sc.final(pkt.properties.authentication_data))))
    while True:
        pkt = c.read()
        if isinstance(pkt, (p5.Auth, p5.Disconnect)):
            return pkt, others
        others.append(pkt)


def test_reauthentication_succeeds_while_messages_flow(gw):
    before = enhanced(gw)["reauth_ok"]
    c = client(gw)
    assert scram_login(c, ScramClient("alice", "alice-pw"), unique("re")).reason_code == 0
    c.send(p5.Subscribe(packet_id=1, topics=[("open/re", 1)]))
    assert c.read().reason_codes == [1]
    for round_ in range(2):
        sc = ScramClient("alice", "alice-pw")
        last, others = reauth(c, sc, [p5.Publish(topic="open/re", payload=b"during", qos=1, packet_id=10 + round_)])
        assert isinstance(last, p5.Auth) and last.reason_code == 0, last
        assert last.properties.authentication_method == METHOD
        assert last.properties.authentication_data == sc.expected_v
        # The PUBLISH sent during the exchange was handled: its PUBACK and the message.
        kinds = {type(p) for p in others}
        assert p5.Puback in kinds, others
    c.send(p5.Pingreq())
    while not isinstance(c.read(), p5.Pingresp):
        pass
    c.close()
    assert enhanced(gw)["reauth_ok"] >= before + 2


@pytest.mark.parametrize("how", ["wrong-password", "other-user", "out-of-turn-0x18"])
def test_reauthentication_failure_disconnects(gw, how):
    before = enhanced(gw)["reauth_failed"]
    c = client(gw)
    assert scram_login(c, ScramClient("alice", "alice-pw"), unique("rf")).reason_code == 0
    if how == "out-of-turn-0x18":
        c.send(p5.Auth(reason_code=0x18, properties=auth_props(b"c=biws,r=x,p=AAAA")))
        assert [(type(p), p.reason_code) for p in c.closed()] == [(p5.Disconnect, 0x82)]
        return
    if how == "wrong-password":
        last, _ = reauth(c, ScramClient("alice", "bad"))
    else:
        last, _ = reauth(c, ScramClient("eve", "eve-pw"))
    assert isinstance(last, p5.Disconnect) and last.reason_code == 0x87, last
    assert c.closed() == []
    assert enhanced(gw)["reauth_failed"] >= before + 1


def test_reauthentication_uses_the_password_file_in_force(gw_factory, tmp_path):
    server = secured_server(gw_factory, tmp_path)
    port = server.ports["mqtt"]
    c = V5(tcp_connect(port))
    assert scram_login(c, ScramClient("alice", "alice-pw"), unique("rl")).reason_code == 0
    subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "passwd"), "alice", "new-pw"], check=True,
                   capture_output=True, timeout=30)
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    ok = 0
    while ok < 6:       # every worker has the new file (each new connection lands on one of them)
        assert time.monotonic() < deadline, server.log()
        t = V5(tcp_connect(port))
        ok = ok + 1 if scram_login(t, ScramClient("alice", "new-pw"), unique("n")).reason_code == 0 else 0
        t.close()
    last, _ = reauth(c, ScramClient("alice", "new-pw"))
    assert isinstance(last, p5.Auth) and last.reason_code == 0
    last, _ = reauth(c, ScramClient("alice", "alice-pw"))
    assert isinstance(last, p5.Disconnect) and last.reason_code == 0x87


# --- over TLS ------------------------------------------------------------------------------------------

def test_scram_over_tls(gw_factory, tmp_path):
    server = secured_server(gw_factory, tmp_path, listeners=("mqtts",))
    ctx = client_tls_context(server.ca)
    c = V5(tls_connect(server.ports["mqtts"], ctx))
    sc = ScramClient("alice", "alice-pw")
    assert scram_login(c, sc, unique("tls")).reason_code == 0
    last, _ = reauth(c, ScramClient("alice", "alice-pw"))
    assert isinstance(last, p5.Auth) and last.reason_code == 0
    c.close()
    c = V5(tls_connect(server.ports["mqtts"], ctx))
    assert scram_login(c, ScramClient("alice", "nope"), unique("tls")).reason_code == 0x86
    c.close()


# --- over WebSocket ------------------------------------------------------------------------------------

class V5Ws(V5):
    """The same client in WebSocket binary frames (tests/ws_client.py)."""

    def __init__(self, port: int):
        from ws_client import WsMqtt, ws_connect

        self.ws = WsMqtt(ws_connect(port))
        self.sock = self.ws.sock

    def send(self, packet, fragmented: bool = False) -> None:
        self.ws.send(packet if isinstance(packet, (bytes, bytearray)) else ref.encode(packet))

    def read(self, timeout: float = WAIT):
        first, body = self.ws.read_packet(timeout)
        packets, _ = ref.decode(bytes([first]) + ref._varint(len(body)) + body)
        return packets[0]


def test_scram_over_websocket(gw_factory, tmp_path):
    server = secured_server(gw_factory, tmp_path, listeners=("ws",))
    c = V5Ws(server.ports["ws"])
    assert scram_login(c, ScramClient("bob", "bob-pw"), unique("ws")).reason_code == 0
    last, _ = reauth(c, ScramClient("bob", "bob-pw"))
    assert isinstance(last, p5.Auth) and last.reason_code == 0
    c.close()
    c = V5Ws(server.ports["ws"])
    assert scram_login(c, ScramClient("bob", "nope"), unique("ws")).reason_code == 0x86
    c.close()
