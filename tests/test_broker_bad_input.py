"""Bad input on the broker path, on gw and Mosquitto alike where both agree,
with each broker's own answer where the standard lets them differ (noted), and
gw-only checks that a client which never reads cannot hurt the others. Packets
written in pieces (one byte at a time, or cut at random points and where a
packet is most easily misread) must be handled as if written whole."""

from __future__ import annotations

import socket
import time

import pytest

pytest.register_assert_rewrite("broker_fixtures")   # before its import: its asserts report values
from broker_fixtures import ack_packet, brokers, connect_packet_full, publish_packet_full  # noqa: E402
from conftest import send_fragmented, subscribe_packet, wait_for  # noqa: E402

pytest_plugins = ["broker_fixtures"]    # the broker_proc and broker fixtures


@brokers()
@pytest.mark.parametrize("topic, qos", [("a/+/b", 0), ("a/#", 1), ("+", 2), ("#", 0)])
def test_publish_to_wildcard_topic_disconnects(broker, topic, qos):
    """MQTT-3.3.2-2: a topic name must not contain wildcards; both brokers close
    the connection (no PUBACK/PUBREC)."""
    raw = broker.raw(0)
    raw.send(publish_packet_full(topic, b"x", qos=qos, packet_id=5))
    assert raw.wait_closed_by_broker() == b""


@brokers("routing")
def test_publish_to_wildcard_topic_reaches_nobody(broker):
    """The refused PUBLISH of a wildcard topic is not routed, not even to a `#`
    subscriber; a later valid one is."""
    p = broker.prefix
    sub = broker.connect(1)
    sub.subscribe(f"{p}/#", 1)
    raw = broker.raw(0)
    broker.assert_workers((raw, 0), (sub, 1))
    raw.send(publish_packet_full(f"{p}/+", b"bad", qos=1, packet_id=5))
    raw.wait_closed_by_broker()
    pub = broker.connect(0)
    pub.publish(f"{p}/ok", b"good", qos=1)
    sub.wait_messages(1)
    time.sleep(broker.grace)
    assert [m.payload for m in sub.received()] == [b"good"]


@brokers()
def test_pubrel_for_unknown_packet_id_gets_pubcomp(broker):
    """MQTT-4.3.3-2: the receiver answers a PUBREL with a PUBCOMP with the same
    packet id, even when it holds no state for it (a PUBREL re-sent after a
    reconnect); the connection stays. Both brokers do so."""
    raw = broker.raw(0)
    raw.send(ack_packet(0x62, 77))
    assert raw.read_until(0x70, broker.wait) == b"\x00\x4d"
    raw.ping()


@brokers()
@pytest.mark.parametrize("kind", [0x40, 0x70], ids=["puback", "pubcomp"])
def test_unexpected_ack_is_ignored(broker, kind):
    """A PUBACK or PUBCOMP for a packet id the broker never used is ignored;
    the connection stays (Mosquitto 2.0.11 does the same)."""
    raw = broker.raw(0)
    raw.send(ack_packet(kind, 99))
    raw.ping()


@brokers()
def test_pubrec_for_unknown_packet_id_keeps_connection(broker):
    """A PUBREC for a packet id the broker never used: the connection stays.
    (Mosquitto 2.0.11 answers it with a PUBREL for that id; gw may or may not.)"""
    raw = broker.raw(0)
    raw.send(ack_packet(0x50, 99))
    raw.ping()
    if not broker.is_gw:
        assert (0x62, b"\x00\x63") in raw.backlog


@brokers()
def test_subscribe_qos_3_disconnects(broker):
    """MQTT-3.8.3-4: a requested QoS of 3 is a malformed SUBSCRIBE: closed,
    no SUBACK, on both brokers."""
    raw = broker.raw(0)
    raw.send(subscribe_packet(1, [(broker.topic("q3"), 3)]))
    assert raw.wait_closed_by_broker() == b""


# --- packets written in pieces --------------------------------------------------------------

# How a test writes its packet: one byte at a time, or cut at random points
# (frag_rng, seeded per test; the seed is printed) besides the test's own cut.
PIECES = ["bytewise", "random"]


def _send_in_pieces(raw, data: bytes, pieces: str, rng, cut: int) -> None:
    if pieces == "bytewise":
        send_fragmented(raw.sock, data)
    else:
        send_fragmented(raw.sock, data, rng, cuts=[cut])


@brokers("sessions")
@pytest.mark.parametrize("pieces", ["after-first-byte", "bytewise"])
def test_connect_in_pieces_is_accepted(broker, pieces):
    """A CONNECT whose first byte arrives alone (or every byte alone): CONNACK 0,
    then the connection works. Each client id is used on both gw workers in
    turn, so one of them is the id's home worker (its session settles at once)."""
    for i in range(2):
        cid = broker.client_id(f"split{i}")
        for worker in (0, 1):
            raw = broker.raw(worker, client_id=False)
            data = connect_packet_full(cid, keepalive=30)
            send_fragmented(raw.sock, data, cuts=[1] if pieces == "after-first-byte" else None)
            first, body = raw.read(broker.wait)
            assert (first, body) == (0x20, b"\x00\x00"), f"worker {worker}: {first:#x} {body!r}"
            raw.ping()
            raw.disconnect()


@brokers("routing")
@pytest.mark.parametrize("pieces", PIECES)
def test_publish_split_inside_its_remaining_length(broker, pieces, frag_rng):
    """A QoS 1 PUBLISH whose two-byte remaining length is cut between its bytes:
    PUBACK, and the subscriber on the other worker gets the payload intact."""
    t = broker.topic("split")
    sub = broker.connect(1)
    sub.subscribe(t, 1)
    raw = broker.raw(0)
    broker.assert_workers((raw, 0), (sub, 1))
    payload = bytes(range(200))
    data = publish_packet_full(t, payload, qos=1, packet_id=3)
    assert data[1] & 0x80 and not data[2] & 0x80, "the remaining length must take two bytes"
    _send_in_pieces(raw, data, pieces, frag_rng, cut=2)
    assert raw.read_until(0x40, broker.wait) == b"\x00\x03"
    [m] = sub.wait_messages(1, t)
    assert m.payload == payload
    raw.ping()


@brokers("routing")
@pytest.mark.parametrize("pieces", PIECES)
def test_subscribe_split_inside_a_topic_filter(broker, pieces, frag_rng):
    """A SUBSCRIBE cut in the middle of its second topic filter: SUBACK with both
    grants, and both filters route."""
    a, b = broker.topic("first/+"), broker.topic("second/+/leaf")
    raw = broker.raw(1)
    data = subscribe_packet(7, [(a, 0), (b, 1)])
    middle = data.index(b.encode()) + len(b) // 2
    _send_in_pieces(raw, data, pieces, frag_rng, cut=middle)
    assert raw.read_until(0x90, broker.wait) == b"\x00\x07\x00\x01"
    pub = broker.connect(0)
    broker.assert_workers((raw, 1), (pub, 0))
    pub.publish(broker.topic("second/x/leaf"), b"to-b", qos=1)
    pub.publish(broker.topic("first/y"), b"to-a", qos=1)
    got = sorted((m.topic, m.payload) for m in (raw.read_publish(), raw.read_publish()))
    assert got == [(broker.topic("first/y"), b"to-a"), (broker.topic("second/x/leaf"), b"to-b")]


# Malformed packets whose malformation is their last byte.
MALFORMED_LAST = {
    "publish-topic-ends-in-hash": lambda b: publish_packet_full(b.topic("x") + "/#", b"", qos=0),
    "subscribe-qos-3": lambda b: subscribe_packet(4, [(b.topic("q"), 3)]),
    "remaining-length-5th-byte": lambda b: b"\x30\xff\xff\xff\xff\x01",
}


@brokers()
@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("bad", list(MALFORMED_LAST))
def test_malformation_arriving_last_disconnects(broker, bad, pieces, frag_rng):
    """A malformed packet written in pieces, its malformation (the `#` of a
    PUBLISH topic, a QoS of 3, a fifth remaining-length byte) alone in the last
    one: nothing is answered, the connection is closed (MQTT-4.8.0-1), on both
    brokers; a client on the same worker is unharmed."""
    raw = broker.raw(0)
    other = broker.connect(0)
    broker.assert_workers((raw, 0), (other, 0))
    data = MALFORMED_LAST[bad](broker)
    _send_in_pieces(raw, data, pieces, frag_rng, cut=len(data) - 1)
    assert raw.wait_closed_by_broker() == b""
    other.ping()


# --- a client that never reads ---------------------------------------------------------------

def _flood(sock: socket.socket, data: bytes, total: int, seconds: float,
           stall: float = 2.0) -> tuple[int, str]:
    """Sends `data` repeatedly without ever reading, non-blocking, until `total`
    bytes went out ("total"), `seconds` passed ("deadline"), the broker took
    nothing for `stall` seconds ("stalled": it stopped reading us), or it closed
    the connection ("closed"). Returns (bytes sent, why it stopped)."""
    sock.setblocking(False)
    sent, view, pos = 0, memoryview(data), 0
    now = time.monotonic()
    deadline, last_progress = now + seconds, now
    while sent < total:
        now = time.monotonic()
        if now >= deadline:
            return sent, "deadline"
        if now - last_progress >= stall:
            return sent, "stalled"
        try:
            n = sock.send(view[pos:])
        except BlockingIOError:
            time.sleep(0.002)
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent, "closed"
        sent += n
        pos = (pos + n) % len(data)
        last_progress = now
    return sent, "total"


@brokers(gw_only="gw is specified to bound what it queues for one client (max_outbound), "
                 "then disconnect it; the figures are gw's")
def test_qos1_flood_without_reading_pubacks_does_not_hurt_others(broker):
    """A client floods QoS 1 PUBLISHes (to a topic nobody reads) and never reads
    its PUBACKs: its PUBACKs pile up in gw, bounded by max_outbound (8 MiB), after
    which gw disconnects it or stops reading it. Meanwhile healthy clients on
    both workers, including the flooder's, keep completing QoS 1 round trips, and
    the workers' RSS stays bounded."""
    healthy = [broker.connect(0), broker.connect(1)]
    flooder = broker.raw(0)
    broker.assert_workers((flooder, 0), (healthy[0], 0), (healthy[1], 1))
    flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rss_before = broker.rss()
    # 7-byte PUBLISHes answered by 4-byte PUBACKs: 8 MiB of PUBACKs takes ~15 MB
    # of flood. A one-letter topic nobody subscribes to while this test runs.
    batch = b"".join(publish_packet_full("x", b"", qos=1, packet_id=(i % 65535) + 1) for i in range(100_000))
    done = {}

    def run():
        done["result"] = _flood(flooder.sock, batch, 64 << 20, 20.0)

    import threading
    th = threading.Thread(target=run, daemon=True)
    th.start()
    rounds = 0
    while th.is_alive() or rounds < 5:
        for h in healthy:
            h.ping()                    # a QoS 1 PUBLISH answered by PUBACK, bounded wait
            assert h.is_connected, "a healthy client was disconnected"
        rounds += 1
        if not th.is_alive() and rounds >= 5:
            break
    th.join(30)
    sent, why = done["result"]
    print(f"flood: {sent >> 20} MiB sent, stopped: {why}")
    growth = broker.rss() - rss_before
    assert growth < 96 << 20, f"worker RSS grew by {growth >> 20} MiB during the flood"
    for h in healthy:
        h.ping()
    wait_for(lambda: broker.alive(), 1, what="gw alive")


def _drain(raw, quiet: float = 1.0, limit: float = 30.0) -> tuple[list, bool]:
    """Reads a raw client's PUBLISHes until the broker closes it or it is quiet
    for `quiet` seconds. Returns (messages, closed by the broker)."""
    from broker_fixtures import parse_publish
    from conftest import read_packet

    got, deadline = [], time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            first, body = read_packet(raw.sock, quiet)
        except (socket.timeout, TimeoutError):
            return got, False
        except (EOFError, ConnectionResetError):
            return got, True
        if first >> 4 == 3:
            got.append(parse_publish(first, body))
    return got, False


@brokers("routing", "slow_consumers")
@pytest.mark.parametrize("slow_qos", [0, 1])
def test_slow_consumer_is_bounded_and_does_not_slow_others(broker, slow_qos):
    """A subscriber that never reads (at QoS 1 it never acknowledges either) on
    the topic of a 32 MB QoS 1 stream. The broker bounds what it holds for it:
    it sheds QoS 0 or stops at its in-flight/queue limits for QoS 1 (Mosquitto:
    max_inflight_messages 20, max_queued_messages 1000; gw: soft_outbound,
    max_inflight, max_queued), or disconnects it (gw: max_outbound), and never
    reorders what it does deliver. The publisher gets every PUBACK within a
    bounded wait, subscribers on both workers (one beside the slow one) get every
    message in order (in any order on Mosquitto, which reorders now and then,
    see test_broker_routing.MOSQUITTO_REORDERS), and the broker's RSS stays
    bounded."""
    long_wait = 30.0 if broker.wait > 2 else 5.0
    t = broker.topic("stream")
    slow = broker.raw(1)
    assert slow.subscribe(1, [(t, slow_qos)]) == [slow_qos]
    fast = [broker.connect(0), broker.connect(1)]
    for f in fast:
        f.subscribe(t, 1)
    # paho's own window larger than a chunk (250): it never queues a publish.
    pub = broker.connect(0, max_inflight=1000)
    broker.assert_workers((slow, 1), (fast[0], 0), (fast[1], 1), (pub, 0))
    rss_before = broker.rss()
    # 32 MB: well over what the kernel buffers for the slow socket (~10 MB on
    # loopback) plus gw's max_outbound (8 MiB)
    # Sent in chunks, each waited for by the healthy subscribers, so they never
    # lag more than a chunk (Mosquitto drops QoS 1 for a subscriber more than
    # max_queued_messages 1000 behind, which a Python subscriber can be).
    n, chunk, payload = 4000, 250, b"s" * 8192
    deadline = time.monotonic() + long_wait       # for the whole stream, not per message
    for start in range(0, n, chunk):
        infos = [pub.publish(t, payload[:-8] + b"%08d" % i, qos=1, wait=False)
                 for i in range(start, start + chunk)]
        for i, info in enumerate(infos, start):
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            assert info.is_published(), f"the publisher was held up: message {i} not acknowledged in {long_wait} s"
        for f in fast:
            f.wait_messages(start + chunk, t, timeout=max(0.01, deadline - time.monotonic()))
    for f in fast:
        got = [int(m.payload[-8:]) for m in f.received(t)]
        # Every message exactly once, on both brokers; in order on gw (Mosquitto
        # 2.0.11 reorders now and then, test_broker_routing.MOSQUITTO_REORDERS).
        assert sorted(got) == list(range(n))
        if broker.is_gw:
            assert got == list(range(n)), "a fast subscriber got the stream out of order"
    growth = broker.rss() - rss_before
    assert growth < 96 << 20, f"worker RSS grew by {growth >> 20} MiB"
    got, closed = _drain(slow)
    seq = [int(m.payload[-8:]) for m in got]
    assert seq == sorted(set(seq)), "the slow consumer got messages out of order or twice"
    print(f"slow QoS {slow_qos} consumer: {len(seq)} of {n} messages, "
          f"{'disconnected' if closed else 'still connected'}")
    assert closed or len(seq) < n, "nothing was bounded for the slow consumer"
