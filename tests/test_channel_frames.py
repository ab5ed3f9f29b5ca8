"""Frames between workers (gw_ext/worker/channel.pyx, gw_ext/worker/registry.pyx), checked on a
real Worker (gw_ext/loop.pyx) driven one loop turn at a time (run_once), with
a real SOCK_SEQPACKET link standing for its peer worker: datagrams crafted
by hand, in pieces and whole, well formed and not. A malformed or truncated
frame from a peer is dropped and counted, never read past; a frame larger
than a datagram goes in pieces and comes back whole."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from gw.config import Config
from gw.stats import N_COUNTERS, Counter
from gw.worker import apply_limits
from gw_ext.frames import (FR_CHECK, FR_CHECKED, FR_CLAIM, FR_EVICT, FR_GRANT, FR_HELLO, FR_PIECE, FR_PUBLISH,
                           FR_REGISTER, FR_RELEASE, FR_RETAIN, FR_SESSION, FR_SUB_ADD, PIECE_FIRST, PIECE_LAST,
                           PUB_EXT, publish_frame)
from gw_ext.loop import Worker

LINK_BUFFER = 32768          # SO_SNDBUF asked for: the kernel doubles it; datagrams of about 32 KiB


def frame(ftype: int, body: bytes = b"", flags: int = 0, topic_len: int = 0) -> bytes:
    return struct.pack("<BBHI", ftype, flags, topic_len, len(body)) + body


def retain_frame(topic: bytes, payload: bytes, qos: int = 0, ext: bytes = b"") -> bytes:
    if ext:
        return frame(FR_RETAIN, topic + payload + ext + struct.pack("<I", len(ext)), flags=qos | PUB_EXT,
                     topic_len=len(topic))
    return frame(FR_RETAIN, topic + payload, flags=qos, topic_len=len(topic))


def ext_of(props: bytes, expire_ms: int = 0) -> bytes:
    """An MQTT 5.0 message's extras (gw_ext/loop.pxd, Msg): expiry, property block."""
    return struct.pack("<Q", expire_ms) + props


# Content Type "text/plain", a User Property ("k", "v"), Correlation Data b"\x00\x01".
PROPS = (b"\x03\x00\x0atext/plain" + b"\x26\x00\x01k\x00\x01v" + b"\x09\x00\x02\x00\x01")


def pieces(whole: bytes, size: int) -> list[bytes]:
    out = []
    for at in range(0, len(whole), size):
        part = whole[at:at + size]
        flags = (PIECE_FIRST if at == 0 else 0) | (PIECE_LAST if at + size >= len(whole) else 0)
        out.append(frame(FR_PIECE, part, flags=flags))
    return out


class Linked:
    """Worker 0 of 2, its link to worker 1 (`peer`: the test's end)."""

    def __init__(self):
        self.rows = np.zeros((2, N_COUNTERS), dtype=np.uint64)
        self.worker = Worker(0, self.rows[0], self.rows, 2, None, 65536)
        apply_limits(self.worker, Config())
        mine, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (mine, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LINK_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LINK_BUFFER)
        mine.setblocking(False)
        self.mine = mine
        self.worker.add_peer(1, mine.fileno())
        self.turn()                                 # begin(): the worker's HELLO
        assert self.received() == [frame(FR_HELLO)]

    def send(self, *datagrams: bytes) -> None:
        for d in datagrams:
            self.peer.send(d)
            self.turn()

    def turn(self) -> None:
        self.worker.run_once(50)

    def received(self) -> list[bytes]:
        """The datagrams the worker sent to its peer so far."""
        self.peer.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.peer.recv(1 << 21))
        except BlockingIOError:
            pass
        return out

    @property
    def malformed(self) -> int:
        return int(self.rows[0, Counter.CHANNEL_MALFORMED])

    @property
    def retained(self) -> dict:
        return self.worker.retained_messages

    def close(self) -> None:
        self.mine.close()
        self.peer.close()


@pytest.fixture
def link():
    linked = Linked()
    yield linked
    linked.close()


def test_whole_frames_and_frames_in_pieces_are_taken(link):
    link.send(retain_frame(b"a", b"1") + retain_frame(b"b", b"2"))
    assert link.retained == {b"a": (0, b"1"), b"b": (0, b"2")}
    big = retain_frame(b"big", bytes(range(256)) * 400, qos=1)      # 102 KB
    link.send(*pieces(big, 30000))
    assert link.retained[b"big"] == (1, bytes(range(256)) * 400)
    assert link.malformed == 0


def test_pieces_cut_short_by_the_senders_new_life_are_dropped(link):
    big = retain_frame(b"lost", b"x" * 70000)
    parts = pieces(big, 30000)
    link.send(parts[0], parts[1])                   # the sender dies; its new life says HELLO
    link.send(frame(FR_HELLO) + retain_frame(b"after", b"ok"))
    assert b"lost" not in link.retained and link.retained[b"after"] == (0, b"ok")
    assert link.malformed == 1
    link.send(parts[2])                             # a last piece without its beginning
    assert b"lost" not in link.retained and link.malformed == 2


@pytest.mark.parametrize("case", ["no_first", "over_bound", "too_long", "short_last", "first_without_header",
                                  "piece_of_piece", "piece_not_filling"])
def test_malformed_pieces_are_dropped_and_counted(link, case):
    big = retain_frame(b"p", b"y" * 50000)
    first, second = pieces(big, 30000)
    datagrams = {
        "no_first": [second],
        "over_bound": [frame(FR_PIECE, struct.pack("<BBHI", FR_RETAIN, 0, 1, (64 << 20) + 1) + b"p",
                             flags=PIECE_FIRST)],
        "too_long": [first, frame(FR_PIECE, b"z" * 30000, flags=PIECE_LAST)],
        "short_last": [first, frame(FR_PIECE, b"z" * 10, flags=PIECE_LAST)],
        "first_without_header": [frame(FR_PIECE, b"abc", flags=PIECE_FIRST)],
        "piece_of_piece": [frame(FR_PIECE, frame(FR_PIECE, b"q" * 20), flags=PIECE_FIRST)],
        "piece_not_filling": [first[:4] + struct.pack("<I", 30000 + 10) + first[8:]],
    }[case]
    link.send(*datagrams)
    assert link.malformed >= 1 and link.retained == {}
    link.send(retain_frame(b"next", b"fine"))       # the link goes on
    assert link.retained == {b"next": (0, b"fine")}


@pytest.mark.parametrize("datagram", [
    b"\x05\x00\x01",                                              # a header cut short
    struct.pack("<BBHI", FR_RETAIN, 0, 1, 1000) + b"tiny",         # a body longer than the datagram
    struct.pack("<BBHI", FR_RETAIN, 0, 9, 3) + b"abc",             # a topic longer than the body
    frame(FR_PUBLISH, b"\x00" * 4, topic_len=2),                   # a PUBLISH without its timestamp
    frame(FR_PUBLISH, b"\x00" * 8 + b"t/x", flags=3, topic_len=3),  # QoS 3
    frame(FR_RETAIN, b"tv", flags=3, topic_len=1),                 # QoS 3
    frame(99, b"whatever"),                                        # an unknown type
    frame(FR_REGISTER, bytes([200]) + b"client"),                  # a worker that does not exist
    frame(FR_RELEASE, bytes([64]) + b"client"),
    frame(FR_EVICT, struct.pack("<BIB", 99, 1, 0) + b"client"),
    frame(FR_GRANT, struct.pack("<Ib", 1, 100) + b"client"),
    frame(FR_SESSION, struct.pack("<IBH", 1, 1, 500) + b"short"),  # a client id longer than the frame
    frame(FR_CLAIM, b"abc"),                                       # shorter than its fixed part
    frame(FR_CHECK, struct.pack("<IBI", 1, 77, 1) + b"client"),    # for a worker that does not exist
    frame(FR_CHECK, b"\x01\x00\x00\x00\x00"),                       # shorter than its fixed part
    frame(FR_CHECKED, struct.pack("<IB", 1, 9) + b"client"),       # an answer that is none
    frame(FR_CHECKED, b"\x01\x00"),
    # MQTT 5.0 properties (PUB_EXT): the extras' length last, checked against what the body holds
    frame(FR_PUBLISH, b"\x00" * 8 + b"t" + b"\x00\x00", flags=PUB_EXT, topic_len=1),      # no room for the length
    frame(FR_PUBLISH, b"\x00" * 8 + b"t" + ext_of(b"") + struct.pack("<I", 9), flags=PUB_EXT, topic_len=1),
    frame(FR_PUBLISH, b"\x00" * 8 + b"t" + b"1234" + struct.pack("<I", 4), flags=PUB_EXT, topic_len=1),
    frame(FR_PUBLISH, b"\x00" * 8 + b"t" + ext_of(b"") + struct.pack("<I", 0xFFFFFFFF), flags=PUB_EXT,
          topic_len=1),
    frame(FR_RETAIN, b"t" + ext_of(b"") + struct.pack("<I", 13), flags=PUB_EXT, topic_len=1),
    frame(FR_RETAIN, b"t\x00", flags=PUB_EXT, topic_len=1),
], ids=["header", "body", "topic", "publish_short", "publish_qos3", "retain_qos3", "unknown", "register",
        "release", "evict", "grant", "session", "claim", "check_worker", "check_short", "checked_answer",
        "checked_short", "ext_no_length", "ext_longer", "ext_no_expiry", "ext_huge", "retain_ext_longer",
        "retain_ext_no_length"])
def test_malformed_frames_are_dropped_and_counted(link, datagram):
    link.send(datagram)
    assert link.malformed == 1
    link.send(retain_frame(b"next", b"fine"))
    assert link.retained.get(b"next") == (0, b"fine") and link.malformed == 1


def test_a_datagram_larger_than_any_link_sends_is_dropped_and_counted(link):
    link.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    link.send(retain_frame(b"huge", b"h" * 200_000))
    assert b"huge" not in link.retained and link.malformed == 1
    link.send(retain_frame(b"next", b"fine"))
    assert link.retained[b"next"] == (0, b"fine")


def test_a_frame_larger_than_a_datagram_is_sent_in_pieces(link):
    """The sending side: a PUBLISH forwarded to a peer with interest, larger than
    the link's datagrams, leaves as FR_PIECE datagrams that add up to the frame."""
    link.send(frame(FR_SUB_ADD, b"big/#"))
    link.received()
    payload = bytes(range(251)) * 1000                       # 251 KB
    link.worker.publish(b"big/t", payload, 1, False)
    datagrams = []
    for _ in range(100):                                     # the link holds a few: read as the peer would
        link.turn()
        datagrams += link.received()
        if datagrams and datagrams[-1][1] & PIECE_LAST:
            break
    assert len(datagrams) > 4
    size = max(len(d) for d in datagrams)
    assert size <= (link.mine.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32) // 2
    whole = b""
    for i, d in enumerate(datagrams):
        ftype, flags, _, n = struct.unpack_from("<BBHI", d)
        assert ftype == FR_PIECE and n == len(d) - 8
        assert flags == (PIECE_FIRST if i == 0 else 0) | (PIECE_LAST if i == len(datagrams) - 1 else 0)
        whole += d[8:]
    ftype, flags, topic_len, n = struct.unpack_from("<BBHI", whole)
    assert ftype == FR_PUBLISH and n == len(whole) - 8 and flags & 3 == 1
    assert whole[16:16 + topic_len] == b"big/t" and whole[16 + topic_len:] == payload
    assert int(link.rows[0, Counter.CHANNEL_FRAGMENTED]) == 1


def _session_state(messages: list[tuple], nsubs: int = 0, version: int = 5) -> bytes:
    """session_serialize's layout: version, subscriptions, next packet id, messages (each with its
    MQTT 5.0 extras from version 4 on: (pid, qos, topic, payload[, extras])), QoS 2 ids, user name
    (none: anonymous)."""
    out = struct.pack("<BI", version, nsubs) + struct.pack("<HI", 1, len(messages))
    for pid, qos, topic, payload, *ext in messages:
        out += struct.pack("<HBBHI", pid, qos, 0, len(topic), len(payload)) + topic + payload
        if version >= 4:
            ext = ext[0] if ext else b""
            out += struct.pack("<I", len(ext)) + ext
    out += struct.pack("<I", 0) + b"\0\0\0"
    if version >= 5:
        out += struct.pack("<BIQ", 4, 0, 0)     # the expiry tail: a 3.1.1 session, connected when saved
    return out


def _saved_as(saved: bytes, state: bytes) -> bool:
    """A state saved in the current layout (5) holds what `state` (layout 5 or
    4, or 3 without extras; no subscriptions) held: the same parts, then the
    expiry tail (protocol version, Session Expiry Interval, when its client
    went away: 13 bytes, the last of which a restore sets to its own time)."""
    assert saved[0] == 5 and len(saved) >= 14, saved
    return saved[1:-13] == (state[1:-13] if state[0] >= 5 else state[1:])


def test_a_session_state_cut_short_keeps_what_came_before_the_cut():
    """A saved or transferred session announcing a message longer than what
    follows is not read past its end: the messages before the cut are kept."""
    linked = Linked()
    try:
        whole = _session_state([(0, 1, b"t/a", b"kept"), (0, 1, b"t/b", b"x" * 100)])
        cut = whole[:whole.index(b"t/b") + 3 + 10]            # the second payload: 10 of its 100 bytes
        linked.worker.restore_sessions([(b"cut-client", cut), (b"whole-client", whole)])
        saved = {cid: state for _slot, cid, state in linked.worker.snapshot_sessions()}
        assert _saved_as(saved[b"whole-client"], whole)
        assert _saved_as(saved[b"cut-client"], _session_state([(0, 1, b"t/a", b"kept")]))
        assert linked.malformed == 1
        # a subscription whose filter runs past the end
        linked.worker.restore_sessions([(b"cut-sub", struct.pack("<BIH", 3, 1, 400) + b"a/b")])
        assert linked.malformed == 2
    finally:
        linked.close()


def test_mqtt5_properties_travel_with_retained_messages(link):
    """A retained MQTT 5.0 message's properties (its extras) are kept with it,
    from an FR_RETAIN or a retained FR_PUBLISH, and go to a restarted peer
    with the store; a 3.1.1 message keeps its two-field entry."""
    ext = ext_of(PROPS, expire_ms=(1 << 62))
    link.send(retain_frame(b"v5", b"five", qos=1, ext=ext) + retain_frame(b"v3", b"three"))
    assert link.retained == {b"v5": (1, b"five", ext), b"v3": (0, b"three")}
    pub_ext = ext_of(b"\x01\x01")
    link.send(publish_frame(b"v5/pub", b"p", 1, True, 0, pub_ext))
    assert link.retained[b"v5/pub"] == (1, b"p", pub_ext)
    assert link.malformed == 0
    link.send(frame(FR_HELLO))                        # the peer restarted: it gets the store back
    got = {}
    for d in link.received():
        pos = 0
        while pos < len(d):
            ftype, flags, tlen, n = struct.unpack_from("<BBHI", d, pos)
            body = d[pos + 8:pos + 8 + n]
            pos += 8 + n
            if ftype != FR_RETAIN:
                continue
            if flags & PUB_EXT:
                (xlen,) = struct.unpack_from("<I", body, n - 4)
                got[body[:tlen]] = (flags & 3, body[tlen:n - 4 - xlen], body[n - 4 - xlen:n - 4])
            else:
                got[body[:tlen]] = (flags & 3, body[tlen:])
    assert got == link.retained


def test_mqtt5_retained_message_cleared_and_bounded_with_its_properties(link):
    """Its properties count toward max_retained_bytes; an empty payload clears it."""
    ext = ext_of(PROPS)
    link.send(retain_frame(b"v5", b"five", ext=ext))
    link.send(retain_frame(b"v5", b"", ext=ext))
    assert link.retained == {}
    link.worker.max_retained_bytes = 2 + 4 + len(ext) - 1
    assert not link.worker.retain(b"v5", 0, b"five", ext)
    assert link.worker.retain(b"v5", 0, b"five")
    assert not link.worker.retain(b"v6", 0, b"six", b"short")       # extras shorter than their expiry


def test_a_session_state_keeps_its_messages_properties_and_reads_the_previous_layout():
    """Layout 4 on carries each message's MQTT 5.0 extras (restored, saved again
    byte for byte); layouts 4 and 3 (none) are still read; extras that run past the
    end or are shorter than their expiry are malformed: what came before is kept."""
    linked = Linked()
    try:
        ext = ext_of(PROPS, expire_ms=1 << 60)
        v5 = _session_state([(7, 2, b"t/b", b"three"), (0, 1, b"t/a", b"five", ext)])     # in flight, queued
        v4 = _session_state([(7, 2, b"t/b", b"three"), (0, 1, b"t/a", b"five", ext)], version=4)
        v3 = _session_state([(0, 1, b"t/c", b"old")], version=3)
        good = _session_state([(0, 1, b"t/a", b"ok"), (0, 1, b"t/d", b"x", ext)])
        at = good.index(b"t/dx") + 4                          # the second message's extras length
        bad_len = good[:at] + struct.pack("<I", 1000) + good[at + 4:]
        short = _session_state([(0, 1, b"t/a", b"ok"), (0, 1, b"t/e", b"x", b"1234")])
        linked.worker.restore_sessions([(b"v5", v5), (b"v4", v4), (b"v3", v3), (b"bad-len", bad_len),
                                        (b"short", short)])
        saved = {cid: state for _slot, cid, state in linked.worker.snapshot_sessions()}
        assert _saved_as(saved[b"v5"], v5)
        assert _saved_as(saved[b"v4"], v4)
        assert _saved_as(saved[b"v3"], _session_state([(0, 1, b"t/c", b"old")]))
        assert _saved_as(saved[b"bad-len"], _session_state([(0, 1, b"t/a", b"ok")]))
        assert _saved_as(saved[b"short"], _session_state([(0, 1, b"t/a", b"ok")]))
        assert linked.malformed == 2
    finally:
        linked.close()
