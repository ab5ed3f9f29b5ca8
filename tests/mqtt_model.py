"""A reference model of an MQTT 3.1.1 broker, for the stateful tests
(tests/test_stateful_sessions.py): pure Python, no sockets.

It keeps what the standard says a broker holds: sessions keyed by client id
(clean session semantics, subscriptions with their granted QoS, the QoS 1/2
messages owed to the client, the inbound QoS 2 packet ids awaiting PUBREL),
the connection's will, the retained messages. The test tells it what the
clients did (connect, publish, subscribe, close, acknowledge) and feeds it what
the clients received; it raises `Violation` when a received packet is one the
standard forbids, and `check_settled` says whether everything that must have
arrived by now did.

Where the standard lets a broker choose, the model takes the choice gw
documents (README, "MQTT") and says so:
- a message matching several subscriptions of one client goes once, at the
  highest granted QoS (MQTT-3.3.5-1 allows further copies);
- QoS 2 messages are routed on PUBLISH, not on PUBREL (4.3.3, method A);
- a retained QoS 0 message is stored (MQTT-3.3.1-7 allows discarding it);
- queued messages of a session survive an UNSUBSCRIBE (MQTT-3.10.4-3 allows it);
- QoS 0 is not queued for a client that is away;
- at most `max_inflight` QoS 1/2 messages are sent and unacknowledged per
  client; the others wait in the session, in order, until an acknowledgement
  makes room (4.4: "the Server MAY limit in-flight messages").
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Violation(AssertionError):
    """gw did something the model (the standard) forbids, or failed to do what it must."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 4.7: does a topic filter match a topic name."""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False                                    # MQTT-4.7.2-1
    for i, level in enumerate(f_levels):
        if level == "#":
            return True                                 # the rest, and the parent level (4.7.1.2)
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


@dataclass(eq=False)
class Message:
    """An application message as it entered the broker."""
    mid: int                # unique within a test run; also in the payload when there is one
    topic: str
    payload: bytes
    qos: int
    retain: bool
    origin: str             # the publishing client id ("will of X" for a will)

    def __str__(self) -> str:
        flags = " retain" if self.retain else ""
        return f"m{self.mid}({self.topic!r} q{self.qos}{flags} from {self.origin})"


@dataclass(eq=False)
class Delivery:
    """One message owed to one session, as the broker must send it."""
    msg: Message
    qos: int                # after the downgrade to the granted QoS
    retained: bool          # sent because of a new subscription: RETAIN=1 (MQTT-3.3.1-8)
    state: str = "queued"   # queued (not sent yet), sent (PUBLISH seen), rel (client's PUBREC answered by PUBREL)
    packet_id: int | None = None
    send_order: int = 0     # when it was first sent, for the order of re-sends

    def __str__(self) -> str:
        return f"{self.msg} as q{self.qos}{' RETAIN' if self.retained else ''} [{self.state}]"


@dataclass(eq=False)
class Online:
    """What the model expects on the session's current connection."""
    will: Message | None
    qos0: list[Delivery] = field(default_factory=list)     # QoS 0 deliveries not seen yet
    resend: list[Delivery] = field(default_factory=list)   # PUBLISH DUP / PUBREL owed after a resume, in order
    awaiting_pubrel: set[int] = field(default_factory=set)  # our PUBREC went out, its PUBREL not seen yet


@dataclass(eq=False)
class Session:
    cid: str
    clean: bool
    subs: dict[str, int] = field(default_factory=dict)      # filter -> granted QoS
    owed: list[Delivery] = field(default_factory=list)      # QoS 1/2, routing order, until PUBACK/PUBCOMP
    qos2_in: set[int] = field(default_factory=set)          # inbound QoS 2 ids awaiting PUBREL
    online: Online | None = None
    done: set[int] = field(default_factory=set)             # mids whose QoS 1/2 delivery completed

    def granted(self, topic: str) -> int | None:
        """The highest QoS among this session's filters matching topic (None: no match)."""
        best = None
        for f, q in self.subs.items():
            if topic_matches(f, topic) and (best is None or q > best):
                best = q
        return best


class Model:
    def __init__(self, max_inflight: int):
        self.max_inflight = max_inflight
        self.sessions: dict[str, Session] = {}
        self.retained: dict[str, Message] = {}
        self.send_counter = 0

    # --- what the clients did ---------------------------------------------------

    def publish(self, msg: Message) -> None:
        """The broker accepted msg (a PUBLISH, or a will): retained store, then routing."""
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg
            else:
                self.retained.pop(msg.topic, None)      # MQTT-3.3.1-10/11
        for s in self.sessions.values():
            granted = s.granted(msg.topic)
            if granted is None:
                continue
            self._deliver(s, msg, min(msg.qos, granted), retained=False)

    def _deliver(self, s: Session, msg: Message, qos: int, retained: bool) -> None:
        d = Delivery(msg, qos, retained)
        if qos == 0:
            if s.online is not None:
                s.online.qos0.append(d)
            return
        s.owed.append(d)

    def connect(self, cid: str, clean: bool, will: Message | None) -> bool:
        """A CONNECT accepted (the caller closed any previous connection of cid
        first, with close()). Returns the session-present flag the CONNACK must carry."""
        s = self.sessions.get(cid)
        if s is not None:
            assert s.online is None, "close the previous connection first"
            if clean or s.clean:
                del self.sessions[cid]                  # MQTT-3.1.2-6
                s = None
        present = s is not None                         # MQTT-3.2.2-1/-2/-3
        if s is None:
            s = self.sessions[cid] = Session(cid, clean)
        s.online = Online(will)
        # MQTT-4.4.0-1: what was sent and not acknowledged goes again, in the
        # order it was first sent (4.6), PUBLISH with DUP=1 or PUBREL.
        s.online.resend = sorted((d for d in s.owed if d.state != "queued"), key=lambda d: d.send_order)
        return present

    def close(self, cid: str, graceful: bool) -> Message | None:
        """The connection of cid ended: DISCONNECT (graceful) or otherwise
        (network error, protocol error, takeover). Returns the will it published."""
        s = self.sessions[cid]
        online, s.online = s.online, None
        will = None
        if online is not None and online.will is not None and not graceful:
            will = online.will                          # MQTT-3.1.2-8; not after DISCONNECT (MQTT-3.1.2-10)
            self.publish(will)
        if s.clean:
            del self.sessions[cid]                      # MQTT-3.1.2-6: ends with the connection
        return will

    def subscribe(self, cid: str, entries: list[tuple[str, int]]) -> list[int]:
        """SUBSCRIBE; the granted QoS per entry. As a sequence of SUBSCRIBEs
        (MQTT-3.8.4-4), each followed by the retained messages its filter
        matches (MQTT-3.3.1-6, re-sent for a replaced subscription, MQTT-3.8.4-3)."""
        s = self.sessions[cid]
        granted = []
        for f, q in entries:
            s.subs[f] = q
            granted.append(q)
        for f, q in entries:
            for topic, msg in self.retained.items():
                if topic_matches(f, topic):
                    self._deliver(s, msg, min(msg.qos, q), retained=True)
        return granted

    def unsubscribe(self, cid: str, filters: list[str]) -> None:
        s = self.sessions[cid]
        for f in filters:
            s.subs.pop(f, None)

    def inbound_qos2(self, cid: str, packet_id: int) -> bool:
        """A QoS 2 PUBLISH from cid: whether it is new (to be routed) or a
        re-send of one not yet released (MQTT-4.3.3-2: not routed again)."""
        s = self.sessions[cid]
        if packet_id in s.qos2_in:
            return False
        s.qos2_in.add(packet_id)
        return True

    def inbound_pubrel(self, cid: str, packet_id: int) -> None:
        self.sessions[cid].qos2_in.discard(packet_id)

    # --- what a client received ---------------------------------------------------

    def observe_publish(self, cid: str, topic: str, payload: bytes, qos: int, dup: bool, retain: bool,
                        packet_id: int | None, find) -> Delivery:
        """A PUBLISH arrived at cid's connection. find(payload, topic) -> Message
        or None (the test's registry of published messages)."""
        s = self.sessions.get(cid)
        if s is None or s.online is None:
            raise Violation(f"{cid}: PUBLISH {topic!r} {payload[:20]!r} on a connection the model has closed")
        online = s.online
        msg = find(payload, topic)
        if msg is None:
            raise Violation(f"{cid}: PUBLISH {topic!r} {payload[:40]!r}: no client published that")
        if qos == 0:
            if dup:
                raise Violation(f"{cid}: QoS 0 PUBLISH with DUP=1: {msg} (MQTT-3.3.1-2)")
            for i, d in enumerate(online.qos0):
                if self._same(d.msg, msg):
                    for earlier in online.qos0[:i]:
                        if earlier.msg.origin == d.msg.origin and not earlier.retained and not d.retained:
                            raise Violation(f"{cid}: {d} arrived before {earlier} from the same publisher "
                                            f"(MQTT-4.6.0-6)")
                    if retain != d.retained:
                        raise Violation(f"{cid}: {d} arrived with RETAIN={int(retain)} (MQTT-3.3.1-8/-9)")
                    del online.qos0[i]
                    return d
            raise Violation(f"{cid}: {msg} arrived at QoS 0, but the model owes it no QoS 0 delivery"
                            f"{self._why_not(s, msg)}")
        if dup:
            if not online.resend or online.resend[0].state != "sent" or not self._same(online.resend[0].msg, msg):
                raise Violation(f"{cid}: re-sent (DUP=1) {msg} q{qos} id {packet_id}, but the next re-send owed is "
                                f"{online.resend[0] if online.resend else 'none'} (MQTT-4.4.0-1, 4.6)")
            d = online.resend.pop(0)
            if packet_id != d.packet_id:
                raise Violation(f"{cid}: {d} re-sent with packet id {packet_id}, first sent with {d.packet_id} "
                                f"(MQTT-4.4.0-1)")
            if qos != d.qos:
                raise Violation(f"{cid}: {d} re-sent at QoS {qos} (MQTT-3.3.1-3)")
            if retain != d.retained:
                raise Violation(f"{cid}: {d} re-sent with RETAIN={int(retain)}, first sent with "
                                f"RETAIN={int(d.retained)} (MQTT-3.3.1-8)")
            return d
        for i, d in enumerate(s.owed):
            if not self._same(d.msg, msg) or d.state != "queued":
                continue
            if d.qos != qos:
                raise Violation(f"{cid}: {d} arrived at QoS {qos} (MQTT-3.8.4-6: the lower of published and "
                                f"granted)")
            if retain != d.retained:
                raise Violation(f"{cid}: {d} arrived with RETAIN={int(retain)} (MQTT-3.3.1-8/-9)")
            for earlier in s.owed[:i]:
                if (earlier.msg.origin == d.msg.origin and earlier.qos == d.qos and not earlier.retained
                        and not d.retained and (earlier.state == "queued" or earlier in online.resend)):
                    raise Violation(f"{cid}: {d} arrived before {earlier} from the same publisher (MQTT-4.6.0-6)")
            in_use = {o.packet_id for o in s.owed if o.state != "queued"}
            if packet_id in in_use:
                raise Violation(f"{cid}: {d} sent with packet id {packet_id}, already in use (MQTT-2.3.1-2)")
            if not packet_id:
                raise Violation(f"{cid}: {d} sent with packet id 0 (MQTT-2.3.1-1)")
            d.state = "sent"
            d.packet_id = packet_id
            self.send_counter += 1
            d.send_order = self.send_counter
            return d
        raise Violation(f"{cid}: {msg} arrived at QoS {qos} but is not owed{self._why_not(s, msg)}")

    @staticmethod
    def _same(a: Message, b: Message) -> bool:
        return a is b or (not a.payload and not b.payload and a.topic == b.topic)

    def _why_not(self, s: Session, msg: Message) -> str:
        if msg.mid in s.done:
            return ": its delivery was already completed (a duplicate)"
        if any(self._same(d.msg, msg) and d.state != "queued" for d in s.owed):
            return ": it was sent already and not acknowledged (a duplicate without DUP)"
        if s.granted(msg.topic) is None:
            return f": no subscription of this session matches {msg.topic!r} ({sorted(s.subs)})"
        return ""

    def observe_pubrel(self, cid: str, packet_id: int) -> None:
        """A PUBREL from the broker: the answer to our PUBREC, or a re-send after a resume."""
        s = self.sessions.get(cid)
        if s is None or s.online is None:
            raise Violation(f"{cid}: PUBREL {packet_id} on a connection the model has closed")
        online = s.online
        if packet_id in online.awaiting_pubrel:
            online.awaiting_pubrel.discard(packet_id)
            for d in s.owed:
                if d.packet_id == packet_id and d.state == "sent" and d.qos == 2:
                    d.state = "rel"
                    return
            return              # a repeated PUBREC's PUBREL
        if online.resend and online.resend[0].state == "rel" and online.resend[0].packet_id == packet_id:
            online.resend.pop(0)
            return
        raise Violation(f"{cid}: PUBREL {packet_id} unasked; re-sends owed: {[str(d) for d in online.resend]}")

    def client_ack(self, cid: str, kind: str, delivery: Delivery | None = None) -> Delivery | None:
        """The client acknowledges a delivery with `kind` (puback, pubrec,
        pubcomp): the given one, or the oldest waiting for that kind, as
        MQTT-4.6.0-2/-3/-4 order them. That delivery, or None when there is none."""
        s = self.sessions[cid]
        want = {"puback": (1, "sent"), "pubrec": (2, "sent"), "pubcomp": (2, "rel")}[kind]
        if delivery is None:
            waiting = sorted((d for d in s.owed if (d.qos, d.state) == want and d not in s.online.resend),
                             key=lambda d: d.send_order)
            if not waiting:
                return None
            delivery = waiting[0]
        assert (delivery.qos, delivery.state) == want and delivery in s.owed, f"cannot {kind} {delivery}"
        if kind == "pubrec":
            s.online.awaiting_pubrel.add(delivery.packet_id)
        else:
            s.owed.remove(delivery)
            s.done.add(delivery.msg.mid)
        return delivery

    # --- what must have arrived ---------------------------------------------------------

    def check_settled(self, cid: str) -> None:
        """Everything the broker had to send cid's connection by now arrived:
        its QoS 0 deliveries, the re-sends of a resume, the PUBRELs answering its
        PUBRECs, and as many QoS 1/2 messages as the in-flight window holds."""
        s = self.sessions[cid]
        online = s.online
        if online.qos0:
            raise Violation(f"{cid}: QoS 0 deliveries missing: {[str(d) for d in online.qos0]}")
        if online.resend:
            raise Violation(f"{cid}: re-sends missing after the resume (MQTT-4.4.0-1): "
                            f"{[str(d) for d in online.resend]}")
        if online.awaiting_pubrel:
            raise Violation(f"{cid}: no PUBREL for our PUBREC of {sorted(online.awaiting_pubrel)} (MQTT-4.3.3-1)")
        in_flight = [d for d in s.owed if d.state != "queued"]
        expected = min(self.max_inflight, len(s.owed))
        if len(in_flight) != expected:
            missing = [str(d) for d in s.owed if d.state == "queued"]
            raise Violation(f"{cid}: {len(in_flight)} QoS 1/2 messages in flight, the window allows {expected}; "
                            f"not sent: {missing}")
