"""The ACL file (acl_file, Mosquitto's format) and its enforcement.

The file's parser and its meaning against plain-Python references
(hypothesis); then real `gw serve` processes with 2 workers, publisher and
subscriber placed on different workers, raw MQTT clients that give a user
name in CONNECT (no password file: the name is taken as given, as Mosquitto
does with allow_anonymous and an acl_file). A message that must not arrive is
shown not to by a sentinel published after it by the same publisher: the
subscriber's next message is the sentinel (a publisher's messages arrive in
order)."""

from __future__ import annotations

import os
import signal
import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

pytest.register_assert_rewrite("broker_fixtures")   # before its import: its asserts report values
from broker_fixtures import RawClient, publish_packet_full  # noqa: E402
from conftest import run_gw, tcp_connect, wait_for  # noqa: E402
import mqtt_bytes  # noqa: E402

from gw.acl import DENY, READ, WRITE, AclError, AclFile, parse_acl  # noqa: E402
from gw_ext.acl import AclRules, AclSession  # noqa: E402

PUB, SUB = 0, 1          # worker indexes: publishers on one worker, subscribers on the other
SUBACK_FAILURE = 0x80


# --- references: plain Python, written from the format's description -----------------

def ref_matches(filt: str, topic: str) -> bool:
    """MQTT 4.7: does a topic filter match a topic name."""
    f, t = filt.split("/"), topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def ref_parse(text: str):
    """(anonymous, users, patterns) of an ACL text, or the line number of its first bad line."""
    anonymous, users, patterns = [], {}, []
    current = anonymous
    words = {"read": "r", "write": "w", "readwrite": "rw", "deny": "d"}
    for n, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(" ", 1)
        if parts[0] == "user" and len(parts) == 2 and parts[1].strip():
            current = users.setdefault(parts[1].strip(), [])
            continue
        if parts[0] not in ("topic", "pattern") or len(parts) < 2:
            return n
        rest = parts[1].strip()
        first, _, after = rest.partition(" ")
        if first in words:
            if not after.strip():
                return n
            access, filt = words[first], after.strip()
        else:
            access, filt = "rw", rest
        levels = filt.split("/")
        if any(("#" in lv and (lv != "#" or i != len(levels) - 1)) or ("+" in lv and lv != "+")
               for i, lv in enumerate(levels)):
            return n
        (patterns if parts[0] == "pattern" else current).append((access, filt))
    return anonymous, users, patterns


def ref_allowed(parsed, user: str | None, cid: str, topic: str, want: str) -> bool:
    anonymous, users, patterns = parsed
    rules = list(anonymous if user is None else users.get(user, []))
    wildcard = any(ch in cid + (user or "") for ch in "+#")
    for access, p in patterns:
        if ("%u" in p and user is None) or wildcard:
            continue
        rules.append((access, p.replace("%c", cid).replace("%u", user or "")))
    matching = [access for access, f in rules if ref_matches(f, topic)]
    if "d" in matching:
        return False
    return any(want in access for access in matching)


LEVELS = ["a", "b", "c", "$SYS", "x y"]
FILTER_LEVELS = LEVELS + ["+", "%c", "%u"]


@st.composite
def filters(draw, levels=FILTER_LEVELS, max_depth=3):
    parts = draw(st.lists(st.sampled_from(levels), min_size=1, max_size=max_depth))
    if draw(st.booleans()):
        parts.append("#")
    return "/".join(parts)


@st.composite
def acl_texts(draw):
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["topic", "topic", "pattern", "user", "comment", "blank"]))
        if kind == "user":
            lines.append("user " + draw(st.sampled_from(["alice", "bob", "eve"])))
        elif kind == "comment":
            lines.append(draw(st.sampled_from(["# a comment", "  # indented", "#topic read a"])))
        elif kind == "blank":
            lines.append(draw(st.sampled_from(["", "   "])))
        else:
            access = draw(st.sampled_from(["", "read ", "write ", "readwrite ", "deny "]))
            lines.append(f"{kind} {access}{draw(filters())}")
    return "\n".join(lines)


# --- the file's format ------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(acl_texts())
def test_parser_agrees_with_reference(text):
    want = ref_parse(text)
    acl = parse_acl(text)

    def mine(rules):
        names = {READ: "r", WRITE: "w", READ | WRITE: "rw", DENY: "d"}
        return [(names[a], f.decode()) for a, f in rules]

    assert isinstance(want, tuple), "the reference refused a generated file"
    assert mine(acl.anonymous) == want[0]
    assert {u.decode(): mine(r) for u, r in acl.users.items()} == want[1]
    assert mine(acl.patterns) == want[2]


@settings(max_examples=200, deadline=None)
@given(acl_texts(), st.integers(0, 12),
       st.sampled_from(["topic read a/#/b", "topic a+", "user", "topic read", "subscribe a",
                        "pattern deny", "topic write a/b#", "toppic a"]))
def test_a_bad_line_refuses_the_file_naming_it(text, where, bad):
    lines = text.split("\n") if text else []
    where = min(where, len(lines))
    lines.insert(where, bad)
    with pytest.raises(AclError, match=rf"line {where + 1}:"):
        parse_acl("\n".join(lines))


@settings(max_examples=300, deadline=None)
@given(acl_texts(), st.sampled_from([None, "alice", "bob", "eve"]), st.sampled_from(["c1", "a", "c+", "b"]),
       st.lists(st.sampled_from(LEVELS + ["c1", "alice", "bob"]), min_size=1, max_size=4),
       st.sampled_from(["r", "w"]))
def test_matcher_agrees_with_reference(text, user, cid, levels, want):
    topic = "/".join(levels)
    rules = AclRules(parse_acl(text))
    got = rules.check(user.encode() if user else None, cid.encode(), topic.encode(),
                      READ if want == "r" else WRITE)
    assert got == ref_allowed(ref_parse(text), user, cid, topic, want)


@settings(max_examples=150, deadline=None)
@given(acl_texts(), acl_texts(), st.sampled_from([None, "alice", "bob"]),
       st.lists(st.tuples(st.sampled_from(["a", "b", "a/b", "c/d", "$SYS/x", "bob/a", "x" * 60, "a/" + "y" * 60]),
                          st.sampled_from([READ, WRITE]), st.integers(0, 30)), min_size=1, max_size=60))
def test_session_cache_agrees_with_fresh_checks_across_a_reload(text, text2, user, ops):
    """The per-session cache (topics longer than an entry too) answers what a
    fresh check does; a new version of the rules (a reload) is seen at once."""
    rules, reloaded = AclRules(parse_acl(text)), AclRules(parse_acl(text2))
    u = user.encode() if user else None
    session = AclSession(rules, u, b"c1")
    for topic, access, when in ops:
        if when == 0:
            session.rules = reloaded if session.rules is rules else rules
        assert session.allowed(topic.encode(), access) == session.rules.check(u, b"c1", topic.encode(), access)


def _universe(depth: int):
    # Every topic up to `depth` levels over the rules' names and one they never name.
    names = ["a", "b", "$SYS", "z"]
    out, frontier = [], [""]
    for _ in range(depth):
        frontier = [f"{p}/{n}" if p else n for p in frontier for n in names]
        out += frontier
    return out


UNIVERSE = _universe(4)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([READ, WRITE, READ | WRITE, DENY]),
                          filters(levels=["a", "b", "$SYS", "+"])), max_size=6),
       filters(levels=["a", "b", "$SYS", "+"]))
def test_subscribe_rule_against_brute_force(rules, filt):
    """A SUBSCRIBE filter is refused when a deny line covers every topic it
    matches, or no read line shares a topic with it (checked on every topic of
    up to 4 levels over the names used and one never used)."""
    acl = AclFile(anonymous=[(a, f.encode()) for a, f in rules])
    topics = [t for t in UNIVERSE if ref_matches(filt, t)]
    covered = any(a & DENY and all(ref_matches(f, t) for t in topics) for a, f in rules)
    overlaps = any(a & READ and any(ref_matches(f, t) for t in topics) for a, f in rules)
    assert acl.may_subscribe(None, b"c", filt.encode()) == (not covered and overlaps)


# --- the server --------------------------------------------------------------------------

ACL = """\
# Anonymous clients.
topic read public/#
topic write anon/in
topic write q/#
topic write other/#

user alice
topic readwrite alice/#
topic deny alice/secret
topic read shared/#
topic read $SYS/#

user bob
topic readwrite bob/#
topic write shared/#
topic write users/#
topic read clients/#
topic read anon/#
topic write $SYS/hack

# Every client.
pattern readwrite clients/%c/#
pattern read users/%u/inbox
"""


def connect_bytes(client_id: str, user: str | None = None, *, clean: bool = True, will=None) -> bytes:
    return mqtt_bytes.connect_packet(client_id, clean, will=will, user=user)


class Clients:
    def __init__(self, server):
        self.server = server
        self.open: list[RawClient] = []

    def connect(self, worker: int, client_id: str, user: str | None = None, *, clean: bool = True,
                will=None, present: bool | None = None) -> RawClient:
        c = RawClient(self.socket_on(worker), worker)
        self.open.append(c)
        c.send(connect_bytes(client_id, user, clean=clean, will=will))
        body = c.read_until(0x20)
        assert body[1] == 0, f"CONNACK {body!r}"
        if present is not None:
            assert bool(body[0] & 1) == present
        return c

    def socket_on(self, worker: int):
        """A TCP connection held by that worker (through the fragmenting proxy too);
        misplaced attempts are reset before they sent a byte."""
        wait_for(lambda: len(self.server.worker_pids()) == 2, 10, what="2 workers")
        pids = self.server.worker_pids()
        for _ in range(60):
            sock = tcp_connect(self.server.ports["mqtt"])
            if self.server.which_worker(sock.getsockname()[1]) == pids[worker]:
                return sock
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        raise AssertionError(f"could not place a connection on worker {worker}")

    def close(self):
        for c in self.open:
            c.close()


@pytest.fixture(scope="module")
def acl_server(gw_module_factory, tmp_path_factory):
    path = tmp_path_factory.mktemp("acl") / "acl"
    path.write_text(ACL)
    return gw_module_factory(workers=2, args=["--acl-file", str(path)])


@pytest.fixture
def clients(acl_server):
    cs = Clients(acl_server)
    yield cs
    cs.close()


def publish(c: RawClient, topic: str, payload: bytes = b"x", qos: int = 0, pid: int = 1, retain: bool = False):
    """Publishes; for QoS 1/2 waits for its PUBACK/PUBREC (given also when refused)."""
    c.send(publish_packet_full(topic, payload, qos, pid, retain))
    if qos == 1:
        assert struct.unpack("!H", c.read_until(0x40))[0] == pid
    elif qos == 2:
        assert struct.unpack("!H", c.read_until(0x50))[0] == pid
        c.send(bytes([0x62, 2]) + struct.pack("!H", pid))
        c.read_until(0x70)


def next_topics(c: RawClient, until: str) -> list[str]:
    """Topics of the messages the client receives, up to and with `until`."""
    got = []
    while not got or got[-1] != until:
        m = c.read_publish()
        if m.qos == 1:
            c.send(bytes([0x40, 2]) + struct.pack("!H", m.packet_id))
        got.append(m.topic)
    return got


def counter(server, name: str) -> int:
    return server.counters()[name]


def test_publish_denied_is_acknowledged_and_dropped(acl_server, clients):
    before = counter(acl_server, "acl_publish_denied")
    alice = clients.connect(SUB, "alice-1", "alice")
    assert alice.subscribe(1, [("shared/#", 1), ("alice/#", 1)]) == [1, 1]
    anon = clients.connect(PUB, "anon-1")
    eve = clients.connect(PUB, "eve-1", "eve")            # a user with no lines: nothing granted
    bob = clients.connect(PUB, "bob-1", "bob")
    for qos in (0, 1, 2):
        publish(anon, "shared/anon", b"no", qos, pid=10 + qos)
        publish(eve, "shared/eve", b"no", qos, pid=20 + qos)
        publish(bob, "alice/x", b"no", qos, pid=30 + qos)   # alice's topic: bob may not write it
    publish(bob, "shared/bob", b"yes", 1, pid=40)
    assert next_topics(alice, "shared/bob") == ["shared/bob"]
    wait_for(lambda: counter(acl_server, "acl_publish_denied") >= before + 9, 10, what="9 publishes denied")


def test_subscribe_gets_0x80_for_the_denied_filter_only(acl_server, clients):
    before = counter(acl_server, "acl_subscribe_denied")
    alice = clients.connect(SUB, "alice-2", "alice")
    codes = alice.subscribe(2, [("alice/#", 1), ("bob/#", 1), ("alice/secret", 0), ("shared/+", 2),
                                ("#", 0), ("users/bob/inbox", 0), ("users/alice/inbox", 0)])
    # '#' is wider than her grants: granted, each message checked at delivery (Mosquitto 2.0).
    assert codes == [1, SUBACK_FAILURE, SUBACK_FAILURE, 2, 0, SUBACK_FAILURE, 0]
    anon = clients.connect(SUB, "anon-2")
    assert anon.subscribe(3, [("public/#", 0), ("users/+/inbox", 0), ("anon/in", 0)]) == [
        0, SUBACK_FAILURE, SUBACK_FAILURE]
    assert counter(acl_server, "acl_subscribe_denied") >= before + 5


def test_shared_subscription_judged_by_the_filter_after_the_share_name(acl_server, clients):
    """$share/{name}/{filter}: the ACL reads the filter after $share/{name}/
    (Mosquitto 2.0.11 grants every SUBSCRIBE and checks only at delivery; gw
    refuses a filter its client may read nothing of, shared or not). Each
    delivery to the member picked is checked against its topic."""
    alice = clients.connect(SUB, "alice-sh", "alice")
    assert alice.subscribe(5, [("$share/g/shared/#", 1), ("$share/g/bob/#", 1), ("$share/alice/x", 1),
                               ("$share/h/#", 1)]) == [1, SUBACK_FAILURE, SUBACK_FAILURE, 1]
    bob = clients.connect(PUB, "bob-sh", "bob")
    publish(bob, "bob/private", b"no", 1, pid=1)          # '#' group: alice may not read it
    publish(bob, "shared/x", b"yes", 1, pid=2)
    got = next_topics(alice, "shared/x")
    # shared/x matches both of her groups ($share/g/shared/# and $share/h/#): one copy each.
    assert got == ["shared/x"]
    assert next_topics(alice, "shared/x") == ["shared/x"]


def test_wide_subscription_gets_only_what_it_may_read(acl_server, clients):
    before = counter(acl_server, "acl_delivery_denied")
    alice = clients.connect(SUB, "alice-3", "alice")
    assert alice.subscribe(1, [("#", 1)]) == [1]
    bob = clients.connect(PUB, "bob-3", "bob")
    publish(bob, "bob/private", b"no", 1, pid=1)          # bob may write, alice may not read
    publish(bob, "users/alice/inbox", b"yes", 0)          # %u: alice reads her inbox
    publish(bob, "users/eve/inbox", b"no", 0)
    publish(bob, "shared/done", b"yes", 1, pid=2)
    assert next_topics(alice, "shared/done") == ["users/alice/inbox", "shared/done"]
    wait_for(lambda: counter(acl_server, "acl_delivery_denied") >= before + 2, 10, what="deliveries denied")


def test_client_id_pattern(acl_server, clients):
    bob = clients.connect(SUB, "bob-4", "bob")
    assert bob.subscribe(1, [("clients/#", 0)]) == [0]
    dev = clients.connect(PUB, "dev1")
    publish(dev, "clients/dev2/up", b"no", 1, pid=1)      # %c is its own id only
    publish(dev, "clients/dev1/up", b"yes", 1, pid=2)
    assert next_topics(bob, "clients/dev1/up") == ["clients/dev1/up"]
    # A client id with a wildcard gets no pattern (it would widen them), its topic lines only.
    odd = clients.connect(PUB, "dev+")
    assert odd.subscribe(4, [("clients/#", 0), ("public/#", 0)]) == [SUBACK_FAILURE, 0]
    publish(dev, "clients/dev1/done", b"yes", 0)
    assert next_topics(bob, "clients/dev1/done") == ["clients/dev1/done"]


def test_retained_messages_checked_both_ways(acl_server, clients):
    bob = clients.connect(PUB, "bob-5", "bob")
    anon = clients.connect(PUB, "anon-5")
    publish(bob, "shared/r5", b"kept", 1, pid=1, retain=True)
    publish(bob, "bob/r5", b"bob only", 1, pid=2, retain=True)
    publish(anon, "shared/r5-anon", b"refused", 1, pid=3, retain=True)   # not retained either
    publish(bob, "$SYS/hack", b"refused", 1, pid=4, retain=True)          # never, whatever the ACL says
    bob.ping()
    alice = clients.connect(SUB, "alice-5", "alice")
    assert alice.subscribe(1, [("shared/#", 0)]) == [0]
    assert alice.subscribe(2, [("#", 0)]) == [0]
    assert alice.subscribe(3, [("$SYS/hack", 0)]) == [0]
    publish(bob, "shared/done5", b"", 0)
    got = next_topics(alice, "shared/done5")
    assert "shared/r5" in got
    assert not {"bob/r5", "shared/r5-anon", "$SYS/hack"} & set(got), got
    assert counter(acl_server, "acl_sys_publish_refused") >= 1


def test_sys_publish_refused_even_when_granted(acl_server, clients):
    before = counter(acl_server, "acl_sys_publish_refused")
    alice = clients.connect(SUB, "alice-6", "alice")
    assert alice.subscribe(1, [("$SYS/hack", 0), ("shared/done6", 0)]) == [0, 0]
    bob = clients.connect(PUB, "bob-6", "bob")
    for qos in (0, 1, 2):
        publish(bob, "$SYS/hack", b"no", qos, pid=qos + 1)
    publish(bob, "shared/done6", b"", 0)
    assert next_topics(alice, "shared/done6") == ["shared/done6"]
    assert counter(acl_server, "acl_sys_publish_refused") >= before + 3


def test_will_messages(acl_server, clients):
    before = counter(acl_server, "acl_publish_denied")
    bob = clients.connect(SUB, "bob-7", "bob")
    assert bob.subscribe(1, [("anon/#", 1)]) == [1]
    refused = clients.connect(PUB, "anon-7a", will=("anon/other", b"refused will", 1, False))
    granted = clients.connect(PUB, "anon-7b", will=("anon/in", b"will", 1, False))
    assert counter(acl_server, "acl_publish_denied") >= before + 1   # counted at CONNECT
    refused.reset()
    clients.connect(PUB, "anon-7c").ping()      # the worker saw the reset before this connection
    granted.reset()
    [m] = [bob.read_publish()]
    assert (m.topic, m.payload) == ("anon/in", b"will")


@pytest.fixture
def reload_server(gw_factory, tmp_path):
    path = tmp_path / "acl"
    path.write_text("topic write q/#\ntopic write other/#\nuser carol\ntopic read q/#\ntopic read other/#\n")
    server = gw_factory(workers=2, args=["--acl-file", str(path), "--log-level", "info"])
    return server, path


def reloaded(server, times: int):
    """SIGHUP to the master; waits until every worker loaded the ACL `times` times in all."""
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: server.log().count(": ACL ") >= 2 * times, 15, what="both workers reloaded the ACL")


def test_reload_revokes_for_a_queued_session_and_keeps_the_old_on_error(reload_server):
    server, path = reload_server
    cs = Clients(server)
    try:
        carol = cs.connect(SUB, "carol", "carol", clean=False)
        assert carol.subscribe(1, [("q/#", 1), ("other/#", 1)]) == [1, 1]
        carol.disconnect()
        anon = cs.connect(PUB, "anon-r")
        publish(anon, "q/queued", b"before the reload", 1, pid=1)
        anon.ping()
        path.write_text("topic write q/#\ntopic write other/#\nuser carol\ntopic read other/#\n")
        before = counter(server, "acl_delivery_denied")
        reloaded(server, 1)
        carol = cs.connect(SUB, "carol", "carol", clean=False, present=True)
        publish(anon, "other/after", b"sentinel", 1, pid=2)
        assert next_topics(carol, "other/after") == ["other/after"]     # the queued q/queued is not
        assert counter(server, "acl_delivery_denied") >= before + 1
        # A file that does not parse: refused with its line, the one in force stays.
        path.write_text("topic write q/#\nuser carol\ntopic read q/#/x\n")
        os.kill(server.pid, signal.SIGHUP)
        wait_for(lambda: "line 3" in server.log(), 15, what="the reload refused, naming line 3")
        assert carol.subscribe(2, [("q/#", 1)]) == [SUBACK_FAILURE]
        publish(anon, "other/still", b"", 1, pid=3)
        assert next_topics(carol, "other/still") == ["other/still"]
    finally:
        cs.close()


def test_broken_file_refused_at_start(tmp_path):
    path = tmp_path / "acl"
    path.write_text("# fine\ntopic read a/#\nuser x\ntopic read a/#/b\n")
    res = run_gw("serve", "--acl-file", str(path), "--workers", "1", "--mqtt", "127.0.0.1:0", "--mqtts", "off",
                 "--json", "off", "--jsons", "off", "--http", "off", "--https", "off", "--ws", "off", "--wss", "off",
                 "--data-dir", str(tmp_path / "data"), timeout=60)
    assert res.returncode != 0
    assert "line 4" in res.stderr and str(path) in res.stderr, res.stderr


def test_an_away_session_keeps_its_user_name_across_a_restart_and_a_move(gw_factory, tmp_path):
    """Messages for an away persistent session are checked against its user's
    grants, so the user name is part of its saved and transferred state: carol
    may read q/#, a client without a user name may not."""
    path = tmp_path / "acl"
    path.write_text("topic write q/#\nuser carol\ntopic read q/#\n")
    data_dir = tmp_path / "data"
    args = ["--acl-file", str(path)]
    server = gw_factory(workers=2, data_dir=data_dir, args=args)
    cs = Clients(server)
    try:
        carol = cs.connect(SUB, "carol-away", "carol", clean=False)
        assert carol.subscribe(1, [("q/#", 1)]) == [1]
        carol.disconnect()
    finally:
        cs.close()
    assert server.stop() == 0             # the final snapshot holds the away session
    server = gw_factory(workers=2, data_dir=data_dir, args=args)
    cs = Clients(server)
    try:
        anon = cs.connect(PUB, "anon-away")
        publish(anon, "q/while-away", b"queued for carol", 1, pid=1)
        publish(anon, "q/while-away-2", b"queued for carol", 1, pid=2)
        # Back on the other worker than the one holding the session: it moves with its queue.
        carol = cs.connect(PUB, "carol-away", "carol", clean=False, present=True)
        assert next_topics(carol, "q/while-away-2") == ["q/while-away", "q/while-away-2"]
    finally:
        cs.close()


def test_a_respawned_worker_enforces_the_version_in_force(gw_factory, tmp_path):
    """The file broken on disk after the start (its reload refused): a worker
    respawned after a crash enforces what the others do, not nothing, and not
    everything."""
    path = tmp_path / "acl"
    path.write_text("topic write q/#\nuser carol\ntopic read q/#\n")
    server = gw_factory(workers=2, args=["--acl-file", str(path)])
    path.write_text("topic read #\ntopic write #\nnot a line\n")
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: "line 3" in server.log(), 15, what="the reload refused, naming line 3")
    victim = server.worker_pids()[SUB]
    server.expect_worker_deaths(1)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids(), 15,
             what="the worker respawned")
    cs = Clients(server)
    try:
        carol = cs.connect(SUB, "carol-respawn", "carol")
        anon = cs.connect(SUB, "anon-respawn")
        assert carol.subscribe(1, [("q/#", 1), ("other/#", 1)]) == [1, SUBACK_FAILURE]
        assert anon.subscribe(1, [("q/#", 1)]) == [SUBACK_FAILURE]
        publisher = cs.connect(PUB, "anon-respawn-pub")
        publish(publisher, "q/after", b"", 1, pid=1)
        assert next_topics(carol, "q/after") == ["q/after"]
    finally:
        cs.close()
