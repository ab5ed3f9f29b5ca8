"""The state machine of the stateful session tests (tests/test_stateful_*.py):
hypothesis drives raw-socket MQTT clients against a real `gw serve --workers 2`
and checks every packet they receive against the reference model
(tests/mqtt_model.py).

An example is a random sequence of client actions: connect with clean session
0 or 1, with a will or not, on a chosen worker; take over a connected client id
from either worker; DISCONNECT; drop the connection (FIN or RST), or end it in
the middle of a packet; subscribe and unsubscribe with + and #; publish QoS
0/1/2, retained or not, empty or not; release a QoS 2 publish at once or later,
re-send an unreleased one; acknowledge what the broker sent, or not. The
clients write packets whole, several in one write, or cut into fragments, and
parse whatever the socket returns. Client ids, topics and payloads carry the
example's own prefix, so examples sharing one server do not meet.

After every step each connected client must have received exactly what the
model says the broker had to send by then. "By then" is marked by a sentinel:
a probe client on each worker publishes a QoS 0 message that every client
subscribes to; a worker routes it after everything it processed before, and
each step first waits until the server has processed what the step sent (an
acknowledgement, a PINGRESP, the connection's end). What must have arrived: the
QoS 0 messages, the re-sends of a resumed session (DUP=1, original packet ids,
original order, PUBREL for what was PUBRECed), the PUBRELs answering the
client's PUBRECs, and as many QoS 1/2 messages as the in-flight window
(`--max-inflight`) holds. Anything else fails the example: a message the client
has no subscription for, a second copy, a will after DISCONNECT, a message ahead
of an older one from the same publisher, a wrong QoS, RETAIN or DUP flag, a
wrong session-present flag, a takeover that leaves the old connection open.
No worker may die.
"""

from __future__ import annotations

import os
import random
import time
import uuid

import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker_fixtures import (ack_packet, connect_packet_full, publish_packet_full,
                             unsubscribe_packet)
from conftest import GwServer, subscribe_packet, wait_for
from mqtt_model import Delivery, Message, Model, Violation
from mqtt_wire import Wire, WireError, parse_publish
from placement import connect_on, holder

MAX_INFLIGHT = 3            # small, so that examples fill the window and queue behind it
KEEPALIVE = 60
WAIT = 5.0                  # bounded wait for anything that must happen (loopback)
POOL = 3                    # client ids per example
# Below the example's root; few, so that most publishes have a subscriber.
TOPICS = ("", "a", "b", "a/x")
FILTERS = ("#", "+", "a", "a/#", "a/+", "+/x", "b", "")
BODIES = ("short", "short", "long", "empty")                      # long: 3 KB, read in pieces
CLEAN = st.sampled_from((False, False, True))     # persistent sessions have more to get wrong
RETAIN = st.sampled_from((False, False, False, True))   # every SUBSCRIBE re-delivers the retained ones
WILLS = st.none() | st.tuples(st.sampled_from(TOPICS), st.integers(0, 2), RETAIN)


def subscriptions(min_size=0, max_size=3):
    return st.lists(st.tuples(st.sampled_from(FILTERS), st.integers(0, 2)), min_size=min_size, max_size=max_size)


ACK_TYPES = {"puback": 0x40, "pubrec": 0x50, "pubcomp": 0x70}

# gw bugs the generated histories steer around, each until its strict-xfail
# regression test (tests/test_stateful_regressions.py) passes; then its entry
# and its branch below go. GW_STATEFUL_KNOWN_BUGS=all (or names, comma-separated)
# stops steering around them (or those), e.g. to check a fix.
KNOWN_BUGS: dict[str, str] = {}     # none known now; see test_stateful_regressions.py
_exercised = {name.strip() for name in os.environ.get("GW_STATEFUL_KNOWN_BUGS", "").split(",") if name.strip()}
assert _exercised <= set(KNOWN_BUGS) | {"all"}, f"GW_STATEFUL_KNOWN_BUGS: not in {sorted(KNOWN_BUGS)}"
AVOIDED = set() if "all" in _exercised else set(KNOWN_BUGS) - _exercised


def note(what: str) -> None:
    """A hypothesis event (its statistics say what the examples exercised);
    nothing when a regression test replays steps outside hypothesis."""
    try:
        event(what)
    except InvalidArgument:
        pass


class ClientState:
    """What a client keeps of its own session: QoS 2 publishes it has not
    released (PUBREC received, PUBREL not sent) and its packet ids."""

    def __init__(self):
        self.unreleased: dict[int, Message] = {}
        self.awaiting: set[int] = set()     # ids of packets sent and not yet acknowledged
        self.last_pid = 0

    def next_pid(self) -> int:
        """An id not in use (MQTT-2.3.1-2)."""
        while True:
            self.last_pid = self.last_pid % 65535 + 1
            if self.last_pid not in self.unreleased and self.last_pid not in self.awaiting:
                return self.last_pid


class Link:
    """A client connection and what arrived on it that the test waits for."""

    def __init__(self, wire: Wire, cid: str, worker: int, server_inode: int):
        self.wire = wire
        self.cid = cid
        self.worker = worker
        self.server_inode = server_inode            # the server's socket of this connection
        self.connack: bytes | None = None
        self.acks: list[tuple[int, bytes]] = []     # PUBACK/PUBREC/PUBCOMP/SUBACK/UNSUBACK
        self.sentinels: set[bytes] = set()
        self.pongs = 0
        self.stale = False                          # closed or taken over: no message may arrive


class SessionMachine(RuleBasedStateMachine):
    """One example's clients against the module's server, checked against Model."""

    server: GwServer | None = None      # the module's `gw serve --workers 2`, set by its fixture
    avoided: set[str] = AVOIDED         # which KNOWN_BUGS the histories steer around

    def __init__(self):
        super().__init__()
        assert self.server is not None and self.server.alive(), "the module's gw serve is not running"
        self.server.wait_ready(WAIT)    # a worker that an earlier example killed is back
        self.ex = uuid.uuid4().hex[:8]
        self.root = f"st/{self.ex}"
        self.sync_topic = f"{self.root}/sync"
        self.cids = [f"{self.ex}-c{i}" for i in range(POOL)]
        self.model = Model(MAX_INFLIGHT)
        self.clients = {cid: ClientState() for cid in self.cids}
        self.links: dict[str, Link] = {}
        self.probes: list[Link] = []
        self.rng = random.Random(0)
        self.by_payload: dict[bytes, Message] = {}
        self.empty_by_topic: dict[str, Message] = {}
        self.next_mid = 0
        self.syncs = 0
        self.failed = False
        self.start_pids = self.server.worker_pids()
        self.log_offset = len(self.server.log())

    # --- names and messages ------------------------------------------------------------

    def topic(self, rel: str) -> str:
        return f"{self.root}/t" + (f"/{rel}" if rel else "")

    def new_message(self, rel_topic: str, qos: int, retain: bool, body: str, origin: str) -> Message:
        self.next_mid += 1
        mid = self.next_mid
        payload = b"" if body == "empty" else f"{self.ex}/m{mid}/".encode() + (b"x" * 3000 if body == "long" else b"")
        msg = Message(mid, self.topic(rel_topic), payload, qos, retain, origin)
        if payload:
            self.by_payload[payload] = msg
        else:
            self.empty_by_topic[msg.topic] = msg    # empty messages on one topic are interchangeable
        return msg

    def find_message(self, payload: bytes, topic: str) -> Message | None:
        if payload:
            msg = self.by_payload.get(payload)
            return msg if msg is not None and msg.topic == topic else None
        return self.empty_by_topic.get(topic)

    @staticmethod
    def pick(pool, who: int):
        """The who-th (modulo) of a set of client ids, in a stable order."""
        pool = sorted(pool)
        return pool[who % len(pool)]

    # --- failures --------------------------------------------------------------------------

    def diagnosis(self) -> str:
        log = self.server.log()[self.log_offset:]
        return (f"\n[workers at the start {self.start_pids}, now {self.server.worker_pids()}; the server "
                f"{'runs' if self.server.alive() else 'EXITED'}]\n[gw log since this example began]\n"
                + (log[-3000:] or "(empty)"))

    def fail(self, what: str):
        self.failed = True
        raise Violation(what + self.diagnosis())

    def checked(self, call, *args):
        """call(*args) into the model; its Violation gets the server's side of the story."""
        try:
            return call(*args)
        except Violation as exc:
            self.fail(str(exc))

    # --- reading ---------------------------------------------------------------------------

    def handle(self, link: Link, first: int, body: bytes) -> None:
        """One packet from the server on link: into the model, or kept for a waiter."""
        if link.connack is None:
            if first != 0x20 or len(body) != 2:
                self.fail(f"{link.cid}: first packet {first:#x} {body[:10]!r}, not CONNACK (MQTT-3.2.0-1)")
            link.connack = body
            return
        if first >> 4 == 3:
            try:
                topic, payload, qos, dup, retain, pid = parse_publish(first, body)
            except (WireError, UnicodeDecodeError) as exc:
                self.fail(f"{link.cid}: bad PUBLISH from the server: {exc}")
            if topic == self.sync_topic:
                if (qos, dup, retain) != (0, False, False):
                    self.fail(f"{link.cid}: sentinel with QoS {qos} DUP {dup} RETAIN {retain}")
                link.sentinels.add(payload)
                return
            if link.stale:
                self.fail(f"{link.cid}: PUBLISH {topic!r} {payload[:30]!r} on a connection that was closed "
                          f"or taken over")
            d = self.checked(self.model.observe_publish, link.cid, topic, payload, qos, dup, retain, pid,
                             self.find_message)
            note("received: " + ("a re-send (DUP)" if dup else "a retained message" if d.retained
                                  else "a will" if d.msg.origin.startswith("will") else f"QoS {qos}"))
        elif first == 0x62 and len(body) == 2:
            if link.stale:
                self.fail(f"{link.cid}: PUBREL on a connection that was closed or taken over")
            self.checked(self.model.observe_pubrel, link.cid, int.from_bytes(body, "big"))
        elif first in (0x40, 0x50, 0x70, 0xB0) and len(body) == 2 or first == 0x90 and len(body) >= 3:
            link.acks.append((first, body))
        elif first == 0xD0 and not body:
            link.pongs += 1
        else:
            self.fail(f"{link.cid}: unexpected packet from the server: {first:#x} {body[:16]!r}")

    def wait(self, link: Link, done, what: str, timeout: float = WAIT) -> None:
        """Reads link, handling every packet, until done() (or fails at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                for first, body in link.wire.packets():
                    self.handle(link, first, body)
            except WireError as exc:
                self.fail(str(exc))
            if done():
                return
            if link.wire.eof:
                self.fail(f"{link.cid} (worker {link.worker}): the server closed the connection while waiting "
                          f"for {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail(f"{link.cid} (worker {link.worker}): waited {timeout} s in vain for {what}")
            link.wire.fill(min(left, 0.5))

    def wait_ack(self, link: Link, first: int, pid: int, what: str) -> bytes:
        key = pid.to_bytes(2, "big")
        self.wait(link, lambda: any(f == first and b[:2] == key for f, b in link.acks), f"{what} for packet id {pid}")
        i = next(i for i, (f, b) in enumerate(link.acks) if f == first and b[:2] == key)
        return link.acks.pop(i)[1]

    def ping(self, link: Link) -> None:
        """PINGREQ/PINGRESP: whatever the server did for this connection's
        earlier packets was written before the PINGRESP."""
        before = link.pongs
        link.wire.send(b"\xc0\x00")
        self.wait(link, lambda: link.pongs > before, "PINGRESP")

    def wait_closed(self, link: Link, what: str) -> None:
        self.wait(link, lambda: link.wire.eof, what)
        link.wire.close()

    def wait_released(self, link: Link) -> None:
        """The server noticed the connection's end (its worker closed the
        socket), so what the end set off (the will) has been routed."""
        try:
            wait_for(lambda: holder(self.server.worker_pids(), link.server_inode) is None, WAIT, interval=0.005,
                     what=f"the server to close {link.cid}'s dropped connection")
        except AssertionError as exc:
            self.fail(str(exc))

    # --- client actions used by several rules ---------------------------------------------------

    def open_link(self, cid: str, worker: int | None) -> Link:
        """A TCP connection (nothing sent yet) on that worker (any with None)."""
        sock, w, inode = connect_on(self.server.ports["mqtt"], self.server.worker_pids(), worker)
        return Link(Wire(sock, self.rng, cid), cid, w, inode)

    def subscribe_raw(self, link: Link, entries: list[tuple[str, int]]) -> list[int]:
        pid = self.clients[link.cid].next_pid()
        link.wire.send(subscribe_packet(pid, entries))
        return list(self.wait_ack(link, 0x90, pid, "SUBACK")[2:])

    def do_connect(self, cid: str, clean: bool, worker: int, will) -> None:
        old = self.links.pop(cid, None)
        link = self.open_link(cid, worker)
        will_msg = None
        if will is not None:
            rel, qos, retain = will
            will_msg = self.new_message(rel, qos, retain, "short", f"will of {cid}")
        link.wire.send(connect_packet_full(cid, clean=clean, keepalive=KEEPALIVE,
                                           will=None if will_msg is None else
                                           (will_msg.topic, will_msg.payload, will_msg.qos, will_msg.retain)),
                       fragment=True)
        if old is not None:
            old.stale = True
            self.model.close(cid, graceful=False)           # MQTT-3.1.4-2: the broker closes the old one
        present = self.model.connect(cid, clean, will_msg)
        if not present:
            self.clients[cid] = ClientState()               # no session on the server: the client's goes too
        self.links[cid] = link
        self.wait(link, lambda: link.connack is not None, "CONNACK")
        note(f"CONNACK session present {int(present)}" + (" (takeover)" if old is not None else ""))
        if link.connack != bytes([int(present), 0]):
            self.fail(f"{cid}: CONNACK {link.connack!r}, the model says session present {int(present)} and "
                      f"return code 0 (MQTT-3.2.2-1/-2/-3)")
        if old is not None:
            self.wait_closed(old, "the broker to close the taken-over connection (MQTT-3.1.4-2)")
        self.subscribe_raw(link, [(self.sync_topic, 0)])

    def send_ack(self, link: Link, kind: str, d: Delivery | None = None) -> Delivery | None:
        """PUBACK/PUBREC/PUBCOMP for d (default: the oldest waiting for it); a
        PUBREC waits for its PUBREL. The delivery acknowledged, or None."""
        d = self.model.client_ack(link.cid, kind, d)
        if d is None:
            return None
        link.wire.send(ack_packet(ACK_TYPES[kind], d.packet_id))
        if kind == "pubrec":
            online = self.model.sessions[link.cid].online
            self.wait(link, lambda: d.packet_id not in online.awaiting_pubrel,
                      f"PUBREL for our PUBREC {d.packet_id} (MQTT-4.3.3-1)")
        return d

    def do_release(self, link: Link, pid: int) -> None:
        link.wire.send(ack_packet(0x62, pid))
        self.model.inbound_pubrel(link.cid, pid)
        del self.clients[link.cid].unreleased[pid]
        self.wait_ack(link, 0x70, pid, "PUBCOMP")

    def with_unreleased(self) -> list[str]:
        return [cid for cid in self.links if self.clients[cid].unreleased]

    def with_unacked(self) -> list[str]:
        return [cid for cid in self.links if any(d.state != "queued" for d in self.model.sessions[cid].owed)]

    # --- rules ------------------------------------------------------------------------------

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed: int) -> None:
        """The probes, one on each worker; seed: the clients' fragmentation."""
        self.rng = random.Random(seed)
        for w in range(2):
            probe = self.open_link(f"{self.ex}-probe{w}", w)
            probe.wire.send(connect_packet_full(probe.cid, clean=True, keepalive=KEEPALIVE), fragment=False)
            self.wait(probe, lambda: probe.connack is not None, "the probe's CONNACK")
            self.probes.append(probe)

    @rule(who=st.integers(0, POOL - 1), clean=CLEAN, worker=st.integers(0, 1), will=WILLS,
          entries=subscriptions(max_size=2))
    def connect(self, who, clean, worker, will, entries):
        """CONNECT with client id `who`: a new session, a persistent one coming
        back, or a takeover of a connected client (MQTT-3.1.4-2), on either
        worker; then SUBSCRIBE to entries, if any."""
        cid = self.cids[who]
        self.do_connect(cid, clean, worker, will)
        if entries:
            self.do_subscribe(cid, entries)

    @precondition(lambda self: self.links)
    @rule(who=st.integers(0, POOL - 1), how=st.sampled_from(("disconnect", "fin", "rst", "mid-packet")),
          rel=st.sampled_from(TOPICS), cut=st.integers(1, 40))
    def end(self, who, how, rel, cut):
        """The connection ends: DISCONNECT (no will, MQTT-3.1.2-10), or the
        network connection closes without it (FIN, RST, or FIN in the middle
        of a QoS 1 PUBLISH to rel cut after `cut` bytes: that part is no
        message and goes nowhere) and the will goes out (MQTT-3.1.2-8)."""
        cid = self.pick(self.links, who)
        link = self.links.pop(cid)
        link.stale = True
        if how == "disconnect":
            link.wire.send(b"\xe0\x00")
            self.model.close(cid, graceful=True)
            self.wait_closed(link, "the broker to close the connection after DISCONNECT (MQTT-3.14.4-1)")
            return
        if how == "mid-packet":
            self.next_mid += 1
            pkt = publish_packet_full(self.topic(rel), f"{self.ex}/cut{self.next_mid}".encode(), qos=1,
                                      packet_id=self.clients[cid].next_pid())
            link.wire.send(pkt[:min(cut, len(pkt) - 1)])
        link.wire.close(reset=how == "rst")
        self.model.close(cid, graceful=False)
        self.wait_released(link)

    @precondition(lambda self: self.links)
    @rule(who=st.integers(0, POOL - 1), entries=subscriptions(min_size=1, max_size=3))
    def subscribe(self, who, entries):
        self.do_subscribe(self.pick(self.links, who), entries)

    def do_subscribe(self, cid: str, entries) -> None:
        full = [(self.topic(f), q) for f, q in entries]
        granted = self.model.subscribe(cid, full)
        codes = self.subscribe_raw(self.links[cid], full)
        if codes != granted:
            self.fail(f"{cid}: SUBACK {codes} for {full}, the model grants {granted} (MQTT-3.9.3)")

    @precondition(lambda self: self.links)
    @rule(who=st.integers(0, POOL - 1), picks=st.lists(st.integers(0, len(FILTERS) - 1), min_size=1, max_size=2),
          held=st.sampled_from((True, True, True, False)))
    def unsubscribe(self, who, picks, held):
        """UNSUBSCRIBE from filters the client holds (held; picks index its
        filters, sorted) or from any (picks index FILTERS)."""
        cid = self.pick(self.links, who)
        link = self.links[cid]
        pool = sorted(self.model.sessions[cid].subs) if held and self.model.sessions[cid].subs else \
            [self.topic(f) for f in FILTERS]
        full = [pool[i % len(pool)] for i in picks]
        self.model.unsubscribe(cid, full)
        pid = self.clients[cid].next_pid()
        link.wire.send(unsubscribe_packet(pid, full))
        self.wait_ack(link, 0xB0, pid, "UNSUBACK")

    @precondition(lambda self: self.links)
    @rule(who=st.integers(0, POOL - 1),
          messages=st.lists(st.tuples(st.sampled_from(TOPICS), st.integers(0, 2), RETAIN,
                                      st.sampled_from(BODIES), st.booleans()), min_size=1, max_size=4))
    def publish(self, who, messages):
        """PUBLISHes (topic, QoS, retain, body, release), written together;
        then their PUBACKs/PUBRECs, the PUBRELs of those to release at once
        (the others stay unreleased) and their PUBCOMPs, and a PINGRESP."""
        cid = self.pick(self.links, who)
        link, client = self.links[cid], self.clients[cid]
        packets, flows = [], []
        for rel, qos, retain, body, release in messages:
            msg = self.new_message(rel, qos, retain, body, cid)
            pid = client.next_pid() if qos else 0
            if qos:
                client.awaiting.add(pid)
            if qos < 2 or self.model.inbound_qos2(cid, pid):
                self.model.publish(msg)
            packets.append(publish_packet_full(msg.topic, msg.payload, qos, pid, retain))
            flows.append((qos, pid, release, msg))
        link.wire.send(*packets)
        for qos, pid, release, msg in flows:
            if qos:
                self.wait_ack(link, 0x40 if qos == 1 else 0x50, pid, "PUBACK" if qos == 1 else "PUBREC")
                client.awaiting.discard(pid)
            if qos == 2:
                client.unreleased[pid] = msg
        released = [pid for qos, pid, release, _ in flows if qos == 2 and release]
        if released:
            link.wire.send(*(ack_packet(0x62, pid) for pid in released))
            for pid in released:
                self.model.inbound_pubrel(cid, pid)
                del client.unreleased[pid]
                self.wait_ack(link, 0x70, pid, "PUBCOMP")
        self.ping(link)

    @precondition(lambda self: self.with_unreleased())
    @rule(who=st.integers(0, POOL - 1), resend=st.booleans())
    def unreleased(self, who, resend):
        """The oldest unreleased QoS 2 publish: PUBREL (MQTT-4.6.0-4), PUBCOMP;
        or (resend) its PUBLISH again, DUP=1, same packet id: PUBREC again and
        no second delivery (MQTT-4.3.3-2)."""
        cid = self.pick(self.with_unreleased(), who)
        link = self.links[cid]
        pid, msg = next(iter(self.clients[cid].unreleased.items()))
        if not resend:
            self.do_release(link, pid)
            return
        if self.model.inbound_qos2(cid, pid):
            self.model.publish(msg)
        link.wire.send(publish_packet_full(msg.topic, msg.payload, 2, pid, msg.retain, dup=True))
        self.wait_ack(link, 0x50, pid, "PUBREC for the re-sent PUBLISH")

    @precondition(lambda self: self.with_unacked())
    @rule(who=st.integers(0, POOL - 1), kind=st.sampled_from(("puback", "pubrec", "pubcomp", "all")))
    def acknowledge(self, who, kind):
        """Acknowledges the oldest message waiting for that kind of answer, or
        (all) everything in order, including what the acknowledgements let out."""
        cid = self.pick(self.with_unacked(), who)
        link = self.links[cid]
        kinds = tuple(ACK_TYPES) if kind == "all" else (kind,)
        while True:
            acked = [d for k in kinds if (d := self.send_ack(link, k)) is not None]
            self.ping(link)         # what the acknowledgements let out of the queue is in
            if kind != "all" or not acked:
                return

    # --- after every step -----------------------------------------------------------------

    @invariant()
    def no_worker_died(self):
        if self.server.worker_pids() != self.start_pids or "died" in self.server.log()[self.log_offset:]:
            self.fail("a worker died")

    @invariant()
    def everything_owed_arrived(self):
        """A sentinel from the probe on each worker reaches every connected
        client after whatever that worker routed before it; then the model
        checks what each client holds."""
        if not self.links:
            return
        self.syncs += 1
        tokens = set()
        for i, probe in enumerate(self.probes):
            token = f"{self.ex}/sync{self.syncs}/{i}".encode()
            probe.wire.send(publish_packet_full(self.sync_topic, token, 0), fragment=False)
            tokens.add(token)
        for link in self.links.values():
            self.wait(link, lambda: tokens <= link.sentinels, "the sentinels from both workers")
            link.sentinels -= tokens
        for cid in self.links:
            self.checked(self.model.check_settled, cid)
            if any(d.state == "queued" for d in self.model.sessions[cid].owed):
                note("a connected client's in-flight window is full, more queued")

    def teardown(self):
        """Leaves nothing behind (sessions, retained messages); then no worker
        may have died. After a failure: only best-effort clean-up."""
        try:
            for cid, link in list(self.links.items()):
                link.wire.send(b"\xe0\x00", fragment=False)
                link.stale = True
                self.model.close(cid, graceful=True)
                self.wait_closed(link, "the close after DISCONNECT")
            self.links.clear()
            for cid in list(self.model.sessions):
                link = self.open_link(cid, None)
                link.wire.send(connect_packet_full(cid, clean=True), b"\xe0\x00", fragment=False)
                link.stale = True
                self.wait_closed(link, "the close after DISCONNECT")
            if self.probes and self.model.retained:
                probe = self.probes[0]
                for n, topic in enumerate(self.model.retained, start=1):
                    probe.wire.send(publish_packet_full(topic, b"", 1, n, retain=True), fragment=False)
                    self.wait_ack(probe, 0x40, n, "PUBACK of the retained message's clearing")
        except Exception:
            if not self.failed:
                raise
        finally:
            for link in self.probes + list(self.links.values()):
                link.wire.close()
        if not self.failed:
            self.no_worker_died()


# --- the server (a module-scoped fixture: import it into the test module) ---------------

@pytest.fixture(scope="module")
def stateful_server(tmp_path_factory):
    """`gw serve --workers 2` with a small in-flight window, shared by a module's examples."""
    server = GwServer(tmp_path_factory.mktemp("stateful"), workers=2, listeners=("mqtt",),
                      args=["--max-inflight", str(MAX_INFLIGHT), "--sys-interval", "0"])
    server.start()
    SessionMachine.server = server
    yield server
    SessionMachine.server = None
    server.stop()
