"""The security identity matrix: who a client is {anonymous, a user proved by
a password (a file made by mosquitto_passwd), a user proved by a client
certificate (use_identity_as_username)} x which ACL lines grant it {plain
topic lines of its section, `%c` patterns, `%u` patterns} x what it does
{publish, subscribe, live delivery, retained delivery on subscribe, wills, a
persistent session's queue taken back on the other worker, and after a
reload that revokes}.

One `gw serve --workers 2` per kind of identity (module-scoped), the
publisher always on one worker and the subscriber on the other. Raw MQTT
clients over TCP or TLS (placed on a worker by their connection), plus
paho-mqtt and mosquitto_pub with passwords. Every case shows what is
allowed arriving and what is refused not arriving: a message that must not
arrive is shown not to by a sentinel the same publisher sends after it (a
publisher's messages arrive in order), and the refusal is counted."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
from dataclasses import dataclass

import pytest

pytest.register_assert_rewrite("broker_fixtures")   # before its import: its asserts report values
from broker_fixtures import RawClient, publish_packet_full  # noqa: E402
from conftest import HOST, PahoClient, tcp_connect, wait_for  # noqa: E402
import mqtt_bytes  # noqa: E402
from test_security_tls import issue, tls_context  # noqa: E402

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
MOSQUITTO_PUB = shutil.which("mosquitto_pub")

PUB, SUB = 0, 1          # worker indexes: publishers on one worker, subscribers on the other
SUBACK_FAILURE = 0x80
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}
RULES = ["plain", "%c", "%u"]

# The subscriber acts as alice, the publisher as bob (or both anonymous). A
# section's topic lines: `ok` both ways, `ro` read only for the subscriber,
# `wo` write only for the publisher. The `rev` and `wrev` lines are what the
# reload test revokes (REVOKED below): a read grant for a persistent
# session's queue, a write grant for a will.
ACL = """\
# Clients without a user name.
topic readwrite done/#
topic readwrite plain/anon/ok/#
topic read plain/anon/ro/#
topic write plain/anon/wo/#
topic readwrite rev/anon/#
topic readwrite wrev/anon/#

user alice
topic readwrite done/#
topic read plain/users/ok/#
topic read plain/users/ro/#
topic read rev/users/#
topic read wrev/users/#

user bob
topic readwrite done/#
topic write plain/users/ok/#
topic write plain/users/wo/#
topic write rev/users/#
topic write wrev/users/#

# Every client.
pattern write cpair/%c/#
pattern read cpair/+/%c/#
pattern write upair/%u/#
pattern read upair/+/%u/#
pattern write crev/%c/#
pattern read crev/+/%c/#
pattern write urev/%u/#
pattern read urev/+/%u/#
pattern write cwrev/%c/#
pattern read cwrev/+/%c/#
pattern write uwrev/%u/#
pattern read uwrev/+/%u/#
"""

# The reload: the queue's read grants and the wills' write grants revoked.
REVOKED = (ACL.replace("topic readwrite rev/anon/#", "topic write rev/anon/#")
           .replace("topic readwrite wrev/anon/#", "topic read wrev/anon/#")
           .replace("topic read rev/users/#\n", "")
           .replace("topic write wrev/users/#\n", "")
           .replace("pattern read crev/+/%c/#\n", "")
           .replace("pattern read urev/+/%u/#\n", "")
           .replace("pattern write cwrev/%c/#\n", "")
           .replace("pattern write uwrev/%u/#\n", ""))
assert REVOKED.count("\n") == ACL.count("\n") - 6

_ids = itertools.count(1)


@dataclass
class Identity:
    kind: str                     # anonymous, password, certificate
    sub_user: str | None          # who the subscriber is for the ACL
    pub_user: str | None

    @property
    def anonymous(self) -> bool:
        return self.sub_user is None


@dataclass
class Case:
    """Topics of one (identity, rule) case, for one subscriber and publisher.
    ok: the publisher may write it and the subscriber read it; write_refused:
    the subscriber may read it but the publisher not write it; read_refused:
    the publisher may write it, the subscriber not read it; wide: a filter
    the subscriber is granted that matches all three; filter_refused: one
    it may read nothing of. None where the rule grants this identity nothing
    (`%u` for anonymous clients): then every filter of it is refused."""
    ok: str | None
    write_refused: str
    read_refused: str | None
    wide: str
    filter_refused: str


def case(ident: Identity, rule: str, pub_id: str, sub_id: str, tag: str) -> Case:
    if rule == "plain":
        base = "plain/anon" if ident.anonymous else "plain/users"
        return Case(f"{base}/ok/{tag}", f"{base}/ro/{tag}", f"{base}/wo/{tag}", f"{base}/#",
                    # the other section's lines are not this identity's
                    "plain/users/ok/#" if ident.anonymous else "plain/anon/ok/#")
    if rule == "%c":
        return Case(f"cpair/{pub_id}/{sub_id}/{tag}", f"cpair/{pub_id}-x/{sub_id}/{tag}",
                    f"cpair/{pub_id}/{sub_id}-x/{tag}", "cpair/#",
                    f"cpair/+/{sub_id}-x/#")
    if ident.anonymous:       # %u names no one: nothing granted
        return Case(None, f"upair/{pub_id}/{sub_id}/{tag}", None, "upair/#", f"upair/+/{sub_id}/#")
    return Case(f"upair/{ident.pub_user}/{ident.sub_user}/{tag}", f"upair/eve/{ident.sub_user}/{tag}",
                f"upair/{ident.pub_user}/eve/{tag}", "upair/#", "upair/+/eve/#")


# --- servers, one per kind of identity ---------------------------------------------------

@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """The ACL file, a password file made by mosquitto_passwd, certificates for alice and bob."""
    base = tmp_path_factory.mktemp("matrix")
    acl = base / "acl"
    acl.write_text(ACL)
    passwd = base / "passwd"
    if MOSQUITTO_PASSWD:
        for i, (user, password) in enumerate(PASSWORDS.items()):
            subprocess.run([MOSQUITTO_PASSWD, *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                           check=True, timeout=30, capture_output=True)
    certs = base / "certs"
    for name in ("alice", "bob"):
        issue(certs, name)
    return {"acl": acl, "passwd": passwd, "certs": certs}


class Matrix:
    """A server for one kind of identity, and its clients, placed on a worker."""

    def __init__(self, ident: Identity, server, certs, acl):
        self.ident = ident
        self.server = server
        self.certs = certs
        self.acl = acl
        self.open: list[RawClient] = []
        self.listener = "mqtts" if ident.kind == "certificate" else "mqtt"

    def socket_on(self, worker: int, role: str):
        wait_for(lambda: len(self.server.worker_pids()) == 2, 10, what="2 workers")
        pids = self.server.worker_pids()
        for _ in range(60):
            sock = tcp_connect(self.server.ports[self.listener])
            if self.server.which_worker(sock.getsockname()[1]) == pids[worker]:
                if self.ident.kind == "certificate":
                    ctx = tls_context(self.certs / "ca.pem", self.certs / f"{role}.pem",
                                      self.certs / f"{role}-key.pem")
                    sock = ctx.wrap_socket(sock, server_hostname="localhost")
                return sock
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        raise AssertionError(f"could not place a connection on worker {worker}")

    def connect(self, worker: int, role: str, client_id: str, *, clean: bool = True, will=None,
                present: bool | None = None) -> RawClient:
        """role: "sub" (alice) or "pub" (bob), as this server proves them."""
        user = self.ident.sub_user if role == "sub" else self.ident.pub_user
        c = RawClient(self.socket_on(worker, user or role), worker)
        self.open.append(c)
        password = PASSWORDS[user] if self.ident.kind == "password" else None
        c.send(mqtt_bytes.connect_packet(client_id, clean, will=will,
                                         user=user if self.ident.kind == "password" else None,
                                         password=password))
        body = c.read_until(0x20)
        assert body[1] == 0, f"CONNACK {body!r}"
        if present is not None:
            assert bool(body[0] & 1) == present
        return c

    def close(self):
        for c in self.open:
            c.close()
        self.open.clear()


IDENTITIES = {
    "anonymous": Identity("anonymous", None, None),
    "password": Identity("password", "alice", "bob"),
    "certificate": Identity("certificate", "alice", "bob"),
}


@pytest.fixture(scope="module", params=list(IDENTITIES))
def matrix_server(request, gw_module_factory, material):
    kind = request.param
    if kind == "password" and not MOSQUITTO_PASSWD:
        pytest.skip("mosquitto_passwd is not installed")
    acl = ["--acl-file", material["acl"]]
    if kind == "anonymous":
        server = gw_module_factory(workers=2, listeners=("mqtt",), args=acl)
    elif kind == "password":
        server = gw_module_factory(workers=2, listeners=("mqtt",),
                                   args=acl + ["--password-file", material["passwd"], "--allow-anonymous", "false"])
    else:
        certs = material["certs"]
        server = gw_module_factory(workers=2, listeners=("mqtts",), certs=certs,
                                   args=acl + ["--require-certificate", "true", "--client-cafile", certs / "ca.pem",
                                               "--use-identity-as-username", "true"])
    return server, IDENTITIES[kind]


@pytest.fixture
def m(matrix_server, material):
    server, ident = matrix_server
    mx = Matrix(ident, server, material["certs"], material["acl"])
    yield mx
    mx.close()


def ids(tag: str) -> tuple[str, str, str]:
    """Fresh (publisher id, subscriber id, tag) for one test: no state of an earlier one applies."""
    n = next(_ids)
    return f"pub{n}", f"sub{n}", f"t{n}"


def publish(c: RawClient, topic: str, payload: bytes = b"x", qos: int = 1, pid: int = 1, retain: bool = False):
    """Publishes; QoS 1 waits for its PUBACK (sent for a refused publish too)."""
    c.send(publish_packet_full(topic, payload, qos, pid, retain))
    if qos == 1:
        assert struct.unpack("!H", c.read_until(0x40))[0] == pid


def received(c: RawClient, until: str) -> list:
    """The messages the client receives up to and with one on `until`."""
    got = []
    while not got or got[-1].topic != until:
        msg = c.read_publish()
        if msg.qos == 1:
            c.send(bytes([0x40, 2]) + struct.pack("!H", msg.packet_id))
        got.append(msg)
    return got


def topics(c: RawClient, until: str, tag: str | None = None) -> list[str]:
    """Topics received up to `until`; with tag, only those of this test."""
    return [msg.topic for msg in received(c, until) if tag is None or tag in msg.topic]


def counters(m: Matrix) -> dict:
    return m.server.counters()


def grew(m: Matrix, before: dict, name: str, by: int = 1) -> None:
    m.server.wait_counter(name, before[name] + by)


def subscriber(m: Matrix, sub_id: str, filters: list[str]) -> tuple[RawClient, list[int]]:
    sub = m.connect(SUB, "sub", sub_id)
    return sub, sub.subscribe(1, [(f, 1) for f in filters])


# --- the matrix --------------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
def test_publish(m, rule):
    """A refused PUBLISH (QoS 0 and 1) is acknowledged, then dropped and
    counted: the subscriber, which may read its topic, never gets it."""
    pub_id, sub_id, tag = ids(rule)
    cs = case(m.ident, rule, pub_id, sub_id, tag)
    done = f"done/{tag}"
    sub, codes = subscriber(m, sub_id, [cs.wide, done])
    assert codes == [SUBACK_FAILURE if cs.ok is None else 1, 1]
    pub = m.connect(PUB, "pub", pub_id)
    before = counters(m)
    publish(pub, cs.write_refused, b"refused", qos=0)
    publish(pub, cs.write_refused, b"refused", qos=1, pid=1)
    if cs.ok is not None:
        publish(pub, cs.ok, b"allowed", qos=1, pid=2)
    publish(pub, done, b"", qos=1, pid=3)
    assert topics(sub, done) == ([cs.ok] if cs.ok else []) + [done]
    grew(m, before, "acl_publish_denied", 2)


@pytest.mark.parametrize("rule", RULES)
def test_subscribe(m, rule):
    """SUBACK 0x80 for the filter the identity may read nothing of; the others granted."""
    pub_id, sub_id, tag = ids(rule)
    cs = case(m.ident, rule, pub_id, sub_id, tag)
    before = counters(m)
    sub, codes = subscriber(m, sub_id, [f"done/{tag}", cs.filter_refused, cs.wide])
    assert codes == [1, SUBACK_FAILURE, SUBACK_FAILURE if cs.ok is None else 1]
    grew(m, before, "acl_subscribe_denied", 1 if cs.ok is not None else 2)


@pytest.mark.parametrize("rule", RULES)
def test_live_delivery(m, rule):
    """A message the subscriber's wide filter matches but it may not read is
    not delivered (counted); one it may read is."""
    pub_id, sub_id, tag = ids(rule)
    cs = case(m.ident, rule, pub_id, sub_id, tag)
    if cs.ok is None:
        pytest.skip("%u grants an anonymous client nothing to read (test_subscribe, test_publish)")
    done = f"done/{tag}"
    sub, codes = subscriber(m, sub_id, [cs.wide, done])
    assert codes == [1, 1]
    pub = m.connect(PUB, "pub", pub_id)
    before = counters(m)
    publish(pub, cs.read_refused, b"not for sub", qos=1, pid=1)
    publish(pub, cs.read_refused, b"not for sub", qos=0)
    publish(pub, cs.ok, b"for sub", qos=1, pid=2)
    publish(pub, done, b"", qos=0)
    assert topics(sub, done) == [cs.ok, done]
    grew(m, before, "acl_delivery_denied", 2)


@pytest.mark.parametrize("rule", RULES)
def test_retained_delivery(m, rule):
    """Retained messages: one the publisher may not write is not kept; one
    the subscriber may not read is kept but not delivered on subscribe; one
    both may is delivered with RETAIN=1."""
    pub_id, sub_id, tag = ids(rule)
    cs = case(m.ident, rule, pub_id, sub_id, tag)
    done = f"done/{tag}"
    sub, codes = subscriber(m, sub_id, [done])
    pub = m.connect(PUB, "pub", pub_id)
    before = counters(m)
    publish(pub, cs.write_refused, b"never kept", pid=1, retain=True)
    if cs.ok is not None:
        publish(pub, cs.read_refused, b"kept, not for sub", pid=2, retain=True)
        publish(pub, cs.ok, b"kept for sub", pid=3, retain=True)
    publish(pub, done, b"1", pid=4)
    assert topics(sub, done) == [done]     # the retained messages reached the subscriber's worker
    grew(m, before, "acl_publish_denied")
    try:
        assert sub.subscribe(2, [(cs.wide, 1)]) == [SUBACK_FAILURE if cs.ok is None else 1]
        publish(pub, done, b"2", pid=5)
        got = [msg for msg in received(sub, done) if tag in msg.topic]
        assert [(msg.topic, msg.payload, msg.retain) for msg in got] == (
            [(cs.ok, b"kept for sub", True)] if cs.ok else []) + [(done, b"2", False)]
        if cs.ok is not None:
            grew(m, before, "acl_delivery_denied")        # the retained read_refused one
    finally:
        if cs.ok is not None:                              # the module's later tests subscribe wide too
            publish(pub, cs.read_refused, b"", pid=6, retain=True)
            publish(pub, cs.ok, b"", pid=7, retain=True)


@pytest.mark.parametrize("rule", RULES)
def test_wills(m, rule):
    """A will on a topic its client may not write: accepted with the CONNECT,
    counted then, never published; a will it may write is published to the
    subscriber on the other worker."""
    pub_id, sub_id, tag = ids(rule)
    refused_cs = case(m.ident, rule, pub_id + "a", sub_id, tag)
    granted_cs = case(m.ident, rule, pub_id + "b", sub_id, tag)
    done = f"done/{tag}"
    sub, codes = subscriber(m, sub_id, [refused_cs.wide, done])
    before = counters(m)
    refused = m.connect(PUB, "pub", pub_id + "a", will=(refused_cs.write_refused, b"refused will", 1, False))
    grew(m, before, "acl_publish_denied")                  # counted at CONNECT
    granted = None
    if granted_cs.ok is not None:
        granted = m.connect(PUB, "pub", pub_id + "b", will=(granted_cs.ok, b"granted will", 1, False))
    refused.reset()
    m.connect(PUB, "pub", pub_id + "c").ping()            # the worker saw the reset before this connection
    if granted is not None:
        granted.reset()
    last = m.connect(PUB, "pub", pub_id + "d")
    if granted is not None:
        [msg] = received(sub, granted_cs.ok)
        assert msg.payload == b"granted will"
    publish(last, done, b"", pid=1)
    assert topics(sub, done) == [done]


@pytest.mark.parametrize("rule", RULES)
def test_persistent_session_moves_to_the_publishers_worker(m, rule):
    """A persistent session away on one worker, its queue filled by the
    publisher on the other, taken back on the publisher's worker: the session
    and its queue move, and what leaves the queue is checked for the user
    it connects as (the read_refused message never arrives)."""
    pub_id, sub_id, tag = ids(rule)
    cs = case(m.ident, rule, pub_id, sub_id, tag)
    if cs.ok is None:
        pytest.skip("%u grants an anonymous client nothing to read (test_subscribe, test_publish)")
    done = f"done/{tag}"
    away = m.connect(SUB, "sub", sub_id, clean=False)
    assert away.subscribe(1, [(cs.wide, 1), (done, 1)]) == [1, 1]
    away.disconnect()
    pub = m.connect(PUB, "pub", pub_id)
    before = counters(m)
    publish(pub, cs.read_refused, b"not for sub", pid=1)
    publish(pub, cs.ok, b"for sub", pid=2)
    publish(pub, done, b"", pid=3)
    pub.ping()
    back = m.connect(PUB, "sub", sub_id, clean=False, present=True)
    assert topics(back, done) == [cs.ok, done]
    grew(m, before, "acl_delivery_denied")
    back.disconnect()
    m.connect(SUB, "sub", sub_id, clean=True).disconnect()     # the session ends


def test_reload_revokes_a_queued_message_and_a_will(m):
    """A SIGHUP reload revokes read grants (plain, %c, %u) while messages
    wait in a persistent session's queue, and write grants while wills wait
    for their publication: neither goes out, both counted; what the reload
    left granted is delivered. Then the file is restored."""
    pub_id, sub_id, tag = ids("reload")
    base = "anon" if m.ident.anonymous else "users"
    rules = ["plain", "%c"] + ([] if m.ident.anonymous else ["%u"])
    u_pub, u_sub = m.ident.pub_user, m.ident.sub_user
    queued = {"plain": f"rev/{base}/{tag}", "%c": f"crev/{pub_id}/{sub_id}/{tag}",
              "%u": f"urev/{u_pub}/{u_sub}/{tag}"}
    queue_filters = {"plain": f"rev/{base}/#", "%c": f"crev/+/{sub_id}/#", "%u": f"urev/+/{u_sub}/#"}
    wills = {"plain": f"wrev/{base}/{tag}", "%c": f"cwrev/{pub_id}w/{sub_id}/{tag}",
             "%u": f"uwrev/{u_pub}/{u_sub}/{tag}"}
    will_filters = {"plain": f"wrev/{base}/#", "%c": f"cwrev/+/{sub_id}/#", "%u": f"uwrev/+/{u_sub}/#"}
    kept = f"done/{tag}/kept"          # still granted after the reload
    done = f"done/{tag}"

    away = m.connect(SUB, "sub", sub_id + "q", clean=False)
    assert away.subscribe(1, [(queue_filters[r].replace(sub_id, sub_id + "q"), 1) for r in rules]
                          + [(f"{done}/#", 1)]) == [1] * (len(rules) + 1)
    away.disconnect()
    live, codes = subscriber(m, sub_id, [will_filters[r] for r in rules] + [done, f"{done}/will"])
    assert codes == [1] * (len(rules) + 2)
    pub = m.connect(PUB, "pub", pub_id)
    for k, r in enumerate(rules):
        publish(pub, queued[r].replace(sub_id, sub_id + "q"), b"queued, then revoked", pid=10 + k)
    publish(pub, kept, b"queued, still granted", pid=20)
    will_clients = [m.connect(PUB, "pub", pub_id + "w", will=(wills["plain"], b"revoked", 1, False))]
    if "%u" in rules:
        will_clients.append(m.connect(PUB, "pub", pub_id + "u", will=(wills["%u"], b"revoked", 1, False)))
    # %c: the will's topic names its own client id
    will_clients.append(m.connect(PUB, "pub", pub_id + "w2",
                                  will=(wills["%c"].replace(f"{pub_id}w/", f"{pub_id}w2/"), b"revoked", 1, False)))
    granted_will = m.connect(PUB, "pub", pub_id + "g", will=(f"{done}/will", b"still granted", 1, False))
    before = counters(m)
    try:
        m.acl.write_text(REVOKED)
        reload(m, 1)
        for c in will_clients:
            c.reset()
        m.connect(PUB, "pub", pub_id + "p").ping()
        granted_will.reset()
        [msg] = received(live, f"{done}/will")
        assert msg.payload == b"still granted"
        publish(pub, done, b"", pid=30)
        assert topics(live, done) == [done]          # no revoked will before the sentinel
        grew(m, before, "acl_publish_denied", len(will_clients))

        back = m.connect(SUB, "sub", sub_id + "q", clean=False, present=True)
        publish(pub, f"{done}/after", b"", pid=31)
        # Queued while away: kept, the granted will, the sentinel; not the revoked ones.
        assert topics(back, f"{done}/after") == [kept, f"{done}/will", done, f"{done}/after"]
        grew(m, before, "acl_delivery_denied", len(rules))
    finally:
        m.acl.write_text(ACL)
        reload(m, 2)


def reload(m: Matrix, times: int) -> None:
    """SIGHUP to the master; waits until both workers loaded the ACL once more."""
    seen = m.server.log().count(": ACL ")
    os.kill(m.server.pid, signal.SIGHUP)
    wait_for(lambda: m.server.log().count(": ACL ") >= seen + 2, 15, what="both workers reloaded the ACL")


def test_password_clients_of_the_mosquitto_tools(m):
    """The password identity with the usual clients: paho-mqtt subscribing as
    alice (username_pw_set), mosquitto_pub publishing as bob (-u/-P). Where
    each lands is the kernel's choice here; the raw clients above are placed."""
    if m.ident.kind != "password":
        pytest.skip("passwords only")
    if not MOSQUITTO_PUB:
        pytest.skip("mosquitto_pub is not installed")
    _, _, tag = ids("tools")
    cs = case(m.ident, "plain", "", "", tag)
    done = f"done/{tag}"
    sub = PahoClient(m.server.ports["mqtt"], username="alice", password=PASSWORDS["alice"])
    try:
        assert sub.subscribe(cs.wide, 1) == [1]
        assert sub.subscribe(done, 1) == [1]
        before = counters(m)
        for topic in (cs.write_refused, cs.ok, done):
            res = subprocess.run([MOSQUITTO_PUB, "-h", HOST, "-p", str(m.server.ports["mqtt"]), "-u", "bob",
                                  "-P", PASSWORDS["bob"], "-t", topic, "-m", "x", "-q", "1"],
                                 capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
            assert res.returncode == 0, res.stderr          # the refused one is acknowledged too
        sub.wait_messages(1, done)
        assert [msg.topic for msg in sub.received if tag in msg.topic] == [cs.ok, done]
        grew(m, before, "acl_publish_denied")
        res = subprocess.run([MOSQUITTO_PUB, "-h", HOST, "-p", str(m.server.ports["mqtt"]), "-u", "bob",
                              "-P", "wrong", "-t", done, "-m", "x", "-q", "1"],
                             capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert res.returncode != 0
    finally:
        sub.close()
