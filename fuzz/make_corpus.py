"""Writes the seed corpus of every target (fuzz/corpus/TARGET/NAME): valid
sessions and the classic troubles (packets cut in two, closes mid-packet,
takeovers, pipelined packets), as programs of the scenario machine
(fuzz/common.py). The files are committed; run this again after a change of
the input format:

    python fuzz/make_corpus.py
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DISCONNECT, FR_CLAIM, FR_EVICT, FR_GRANT, FR_HELLO, FR_PAUSE, FR_PUBLISH,  # noqa: E402
                    FR_REGISTER, FR_RELEASE, FR_RESUME, FR_RETAIN, FR_SESSION, FR_SUB_ADD, FR_SUB_DEL, FR_SUB_SYNC,
                    FR_SUB_SYNCED, PINGREQ, READING, ack_packet, connect_packet, frame, publish_packet,
                    subscribe_packet, unsubscribe_packet)

CORPUS = Path(__file__).resolve().parent / "corpus"
OPEN, RAW, TEMPLATE, SEND, TURN, CLOSE, RESET, SHUT, READ, FLIP, FRAME, DGRAM, RAWDGRAM = range(13)


class Program:
    """A scenario program; clients are named by their index among the open ones."""

    def __init__(self, setup: int):
        self.b = bytearray([setup])

    def open(self, turn=True):
        self.b += bytes([OPEN])
        return self.turn() if turn else self

    def raw(self, c: int, data: bytes, send=True, turn=True):
        for i in range(0, len(data), 255):
            part = data[i:i + 255]
            self.b += bytes([RAW, c, len(part)]) + part
        if send:
            self.send(c)
        return self.turn() if turn else self

    def send(self, c: int, n: int = 0):
        self.b += bytes([SEND, c, n])
        return self

    def turn(self, k: int = 1):
        self.b += bytes([TURN, k - 1])
        return self

    def read(self, c: int):
        self.b += bytes([READ, c])
        return self

    def close(self, c: int):
        self.b += bytes([CLOSE, c])
        return self

    def reset(self, c: int):
        self.b += bytes([RESET, c])
        return self

    def template(self, c: int, operands: bytes):
        self.b += bytes([TEMPLATE, c]) + operands
        return self

    def frame(self, p: int, data: bytes):
        """A peer's frame; the channel target's FRAME op takes its operands, so
        raw frames go as a raw datagram."""
        assert len(data) < 256
        self.b += bytes([RAWDGRAM, p - 1, len(data)]) + data
        return self

    def bytes(self) -> bytes:
        return bytes(self.b)


def write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# --- mqtt ----------------------------------------------------------------------------------

def mqtt_seeds():
    # Setup byte: bit 0 two workers, bits 1-2 limit profile, bit 3 ack sink, bit 4 telemetry off.
    def session(setup, cid=b"c4"):
        p = Program(setup).open()
        p.raw(0, connect_packet(cid)).read(0)
        p.raw(0, subscribe_packet(1, [(b"a/#", 2), (b"telemetry/+", 1)])).read(0)
        p.raw(0, publish_packet(b"a/b", b"hello", 0)).read(0)
        p.raw(0, publish_packet(b"a/b", b"hello", 1, 7)).read(0)
        p.raw(0, ack_packet(4, 1)).read(0)
        p.raw(0, publish_packet(b"a/b", b"hello", 2, 8)).read(0)
        p.raw(0, ack_packet(6, 8) + ack_packet(5, 2)).read(0)
        p.raw(0, ack_packet(7, 2) + PINGREQ).read(0)
        p.raw(0, publish_packet(b"telemetry/dev1", READING % (1, 21), 1, 9)).read(0)
        p.raw(0, unsubscribe_packet(3, [b"a/#"]) + DISCONNECT).read(0)
        return p.bytes()

    yield "session-one-worker", session(0)
    yield "session-two-workers-remote-home", session(1, b"c0")
    yield "session-two-workers-local-home", session(1, b"c4")
    yield "session-ack-sink", session(8)
    yield "session-small-limits", session(6)

    # Two subscribers and a publisher; retained messages delivered on subscribe.
    p = Program(1).open().open().open()
    p.raw(0, connect_packet(b"c4")).raw(1, connect_packet(b"c0")).raw(2, connect_packet(b"c5"))
    p.raw(2, publish_packet(b"a/b", b"kept", 1, 1, retain=True)).read(2)
    p.raw(0, subscribe_packet(1, [(b"#", 1)])).raw(1, subscribe_packet(1, [(b"a/+", 2)]))
    p.raw(2, publish_packet(b"a/b", b"x" * 40, 2, 2)).turn(2).read(0).read(1).read(2)
    yield "fan-out-retained", p.bytes()

    # A CONNECT whose fixed header's first byte arrives alone, then the rest.
    c = connect_packet(b"c0")
    p = Program(1).open()
    p.raw(0, c[:1]).raw(0, c[1:], send=False).send(0).turn().read(0)
    p.raw(0, publish_packet(b"a", b"after", 1, 1)).read(0)
    yield "connect-in-two-segments-remote", p.bytes()

    # A PUBLISH cut in three, and one cut then abandoned (close mid-packet).
    pub = publish_packet(b"a/b", b"y" * 100, 1, 5)
    p = Program(0).open().open()
    p.raw(0, connect_packet(b"c4")).raw(1, connect_packet(b"c5"))
    p.raw(0, pub[:3]).raw(0, pub[3:50]).raw(0, pub[50:]).read(0)
    p.raw(1, pub[:30]).close(1).turn()
    yield "publish-in-fragments-close-mid-packet", p.bytes()

    # Takeover: the same client id twice, persistent session, messages queued while away.
    p = Program(1).open()
    p.raw(0, connect_packet(b"c0", clean=False)).raw(0, subscribe_packet(1, [(b"t/x", 1)])).read(0)
    p.close(0).turn().open()
    p.raw(0, connect_packet(b"c4")).raw(0, publish_packet(b"t/x", b"queued", 1, 1)).read(0)
    p.open().raw(1, connect_packet(b"c0", clean=False)).read(1)
    p.open().raw(2, connect_packet(b"c0", clean=True)).read(1).read(2)
    yield "takeover-persistent-session", p.bytes()

    # Wills: a client with a will is reset; its subscriber gets the will.
    p = Program(0).open().open()
    p.raw(0, connect_packet(b"c4")).raw(0, subscribe_packet(1, [(b"+/b", 1)]))
    p.raw(1, connect_packet(b"c5", will=(b"a/b", b"gone", 1, True))).reset(1).turn(2).read(0)
    yield "will-on-reset", p.bytes()

    # Everything in one segment: CONNECT, SUBSCRIBE, PUBLISH, PINGREQ.
    p = Program(0).open()
    p.raw(0, connect_packet(b"c4") + subscribe_packet(1, [(b"#", 1)]) + publish_packet(b"x", b"z", 1, 2)
          + PINGREQ).turn().read(0)
    yield "pipelined-after-connect", p.bytes()

    # A slow reader under a small outbound limit, a packet over max_packet_size.
    p = Program(6).open().open()
    p.raw(0, connect_packet(b"c4")).raw(0, subscribe_packet(1, [(b"#", 2)]))
    p.raw(1, connect_packet(b"c5"))
    for i in range(6):
        p.raw(1, publish_packet(b"a/b", b"w" * 120, 1 + i % 2, i + 1))
    p.raw(1, publish_packet(b"a/b", b"big" * 200, 0)).turn(3).read(0)
    yield "slow-reader-small-limits", p.bytes()

    # Templates only: the scenario machine's own packets.
    p = Program(1).open()
    p.template(0, bytes([0, 1, 0])).send(0).turn()
    p.template(0, bytes([2, 1, 0, 0, 1])).send(0).turn()
    p.template(0, bytes([1, 1, 2, 9, 3])).send(0).turn().read(0)
    yield "templates", p.bytes()


# --- jsonlines -------------------------------------------------------------------------------

def json_seeds():
    def line(kind, cid=b'"c4"', payload=b"null", ts=b"1758626321.5"):
        return b'{"client_id":%s,"message_type":"%s","payload":%s,"timestamp":%s}\n' % (cid, kind, payload, ts)

    p = Program(0).open()
    p.raw(0, line(b"Connect")).read(0)
    p.raw(0, line(b"Data", payload=b'{"metrics":{"temp_c":21.5},"seq":1}')).read(0)
    p.raw(0, line(b"Data", payload=b'"free text"')).raw(0, line(b"Heartbeat")).read(0)
    p.raw(0, line(b"Disconnect")).read(0)
    yield "session", p.bytes()

    p = Program(0).open().open()
    p.raw(0, line(b"Data")).read(0)                              # before Connect: refused
    p.raw(1, line(b"Connect", cid=b"null").replace(b"\n", b"\r\n")).read(1)
    data = line(b"Data", payload=b'{"metrics":{"temp_c":1},"seq":2}')
    p.raw(1, data[:10]).raw(1, data[10:]).read(1)
    p.raw(1, b"{not json}\n").read(1)
    yield "errors-and-fragments", p.bytes()

    p = Program(1).open()
    p.raw(0, line(b"Connect") + b"x" * 300).read(0)              # a line over max_packet_size
    yield "long-line", p.bytes()


# --- http ------------------------------------------------------------------------------------

def http_seeds():
    body = READING % (1, 21)
    ingest = (b"POST /v1/ingest/dev1 HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    p = Program(0).open()
    p.raw(0, ingest).read(0)
    p.raw(0, b"GET /readyz HTTP/1.1\r\nHost: gw\r\n\r\nGET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n").read(0)
    p.raw(0, b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").read(0)
    yield "keepalive-pipelined", p.bytes()

    chunked = (b"POST /v1/ingest/dev2 HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
               % (10, body[:10], len(body) - 10, body[10:]))
    p = Program(4).open()
    p.raw(0, chunked[:40]).raw(0, chunked[40:90]).raw(0, chunked[90:]).read(0)
    yield "chunked-in-fragments-ack-sink", p.bytes()

    batch = b'[{"device_id":"dev1","metrics":{"x":1},"seq":3},{"device_id":"dev2","metrics":{"y":2}}]'
    cont = (b"POST /v1/ingest HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(batch))
    p = Program(0).open()
    p.raw(0, cont).read(0).raw(0, batch).read(0)
    p.raw(0, b"GET /nowhere HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").read(0)
    yield "batch-100-continue-close", p.bytes()

    p = Program(1).open().open()
    p.raw(0, b"GET / HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n").read(0)
    p.raw(1, ingest[:30]).close(1).turn()
    yield "malformed-and-abandoned", p.bytes()


# --- ws ----------------------------------------------------------------------------------------

def ws_seeds():
    from fuzz_ws import UPGRADES, client_frame

    # The first byte is also the codec half's: bits 0-1 pick its message bound.
    mask = b"\x01\x02\x03\x04"
    p = Program(0).open()
    p.raw(0, UPGRADES[0]).read(0)
    p.raw(0, client_frame(2, connect_packet(b"c4"), mask=mask)).read(0)
    p.raw(0, client_frame(2, subscribe_packet(1, [(b"a/#", 1)]) + publish_packet(b"a/b", b"hi", 1, 7),
                          mask=mask)).read(0)
    p.raw(0, client_frame(9, b"ping", mask=mask)).read(0)
    p.raw(0, client_frame(8, b"\x03\xe8", mask=mask)).read(0)
    yield "session-ping-close", p.bytes()

    whole = connect_packet(b"c1") + publish_packet(b"a/b", b"x" * 40, 1, 3)
    p = Program(1).open()
    p.raw(0, UPGRADES[1] + client_frame(2, whole[:5], fin=False, mask=mask)).read(0)
    p.raw(0, client_frame(10, b"", mask=mask) + client_frame(0, whole[5:], mask=mask)).read(0)
    yield "fragmented-two-workers", p.bytes()

    p = Program(2).open().open()
    p.raw(0, UPGRADES[0] + client_frame(1, b"text", mask=mask)).read(0)
    p.raw(1, UPGRADES[3]).read(1)
    yield "text-frame-and-bad-version", p.bytes()


# --- channel ---------------------------------------------------------------------------------

def channel_seeds():
    # Three workers: c0 homes here (0), c5 at the peer 1, c4 and c1 at peer 2.
    hello = frame(FR_HELLO, b"")
    p = Program(0).open()
    p.frame(1, hello).frame(2, hello + frame(FR_SUB_ADD, b"a/#")).turn()
    p.raw(0, connect_packet(b"c0")).raw(0, subscribe_packet(1, [(b"a/#", 1), (b"t/x", 0)])).read(0)
    p.frame(1, frame(FR_PUBLISH, struct.pack("<Q", 0) + b"a/b" + b"fwd", flags=1, topic_len=3)).turn().read(0)
    p.frame(2, frame(FR_RETAIN, b"t/x" + b"kept", flags=0, topic_len=3) + frame(FR_SUB_DEL, b"a/#")).turn()
    p.frame(1, frame(FR_PAUSE, b"")).turn().frame(1, frame(FR_RESUME, b"")).turn().read(0)
    yield "forward-retain-pause", p.bytes()

    # Another worker takes a client of ours over: EVICT, then the session goes there.
    p = Program(4).open()
    p.raw(0, connect_packet(b"c0", clean=False)).raw(0, subscribe_packet(1, [(b"x", 1)])).read(0)
    p.frame(1, frame(FR_CLAIM, struct.pack("<IB", 1, 0) + b"\0\0\0" + b"c0")).turn()
    p.frame(2, frame(FR_EVICT, struct.pack("<BIB", 2, 9, 0) + b"c0")).turn(2)
    yield "evict-persistent-session", p.bytes()

    # A CONNECT of ours whose previous owner is elsewhere: GRANT naming it, then SESSION.
    state = (struct.pack("<H", 1) + struct.pack("<H", 3) + b"t/x" + b"\x01" + struct.pack("<HI", 5, 1)
             + struct.pack("<HBBHI", 4, 1, 0, 3, 2) + b"t/x" + b"hi" + struct.pack("<H", 1) + struct.pack("<H", 9))
    p = Program(4).open()
    p.raw(0, connect_packet(b"c5", clean=False))
    p.frame(1, frame(FR_GRANT, struct.pack("<Ib", 1, 2) + b"c5")).turn()
    p.frame(2, frame(FR_SESSION, struct.pack("<IBH", 1, 1, 2) + b"c5" + state)).turn(2).read(0)
    yield "grant-and-session-moved", p.bytes()

    p = Program(0).open()
    p.frame(1, frame(FR_REGISTER, b"\x02\0\0\0c0") + frame(FR_RELEASE, b"\x02c0") + frame(FR_SUB_SYNC, struct.pack("<I", 7))
            + frame(FR_SUB_SYNCED, struct.pack("<I", 1))).turn()
    p.raw(0, connect_packet(b"c0")).read(0)
    yield "registry-and-sync", p.bytes()


# --- wal, codec ---------------------------------------------------------------------------------

def wal_seeds():
    # build_segments: base choice, segment count, then per segment its records and the next base.
    def seg(nrec, next_kind=2):
        return bytes([nrec]) + b"".join(bytes([8]) + b"payload%d" % i for i in range(nrec)) + bytes([next_kind])

    yield "one-segment", bytes([1, 0]) + seg(3) + bytes([0, 1, 3, 8]) + b"new"
    yield "two-segments", bytes([1, 1]) + seg(2) + seg(2) + bytes([0, 1, 2, 1]) + b"n"
    # A torn tail: mutate kind 2 (cut) at position 40.
    yield "torn-tail", bytes([1, 0]) + seg(3) + bytes([1, 0, 2, 0, 40, 1, 2])
    # A record's length rewritten, and a flipped CRC byte.
    yield "bad-length-bad-crc", bytes([1, 0]) + seg(4) + bytes([2, 0, 1, 0, 16, 1, 0xFF, 0xFF, 0, 0, 0, 30, 3])
    yield "gap-between-segments", bytes([1, 2]) + seg(2, 0) + b"\x00\x40" + seg(1) + seg(1) + bytes([0, 0])


def codec_seeds():
    from gw_ext import codec
    from gw.packets import (Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec,
                            Pubrel, Suback, Subscribe, Unsuback, Unsubscribe)

    packets = [
        Connect("dev-1", True, 60), Connect("", True, 0, "will/t", b"bye", 1, True, "user", b"pw"),
        Connect("old", False, 10, protocol_level=3), Connack(True, 0), Publish("a/b", b"payload", 0),
        Publish("a/b", b"x" * 200, 1, True, False, 7), Publish("\u00e9/t", b"", 2, False, True, 65535),
        Puback(1), Pubrec(2), Pubrel(3), Pubcomp(4), Subscribe(5, [("a/#", 0), ("+/b", 2)]), Suback(5, [0, 2, 0x80]),
        Unsubscribe(6, ["a/#"]), Unsuback(6), Pingreq(), Pingresp(), Disconnect(),
    ]
    wires = [codec.encode(p) for p in packets]
    for i, (p, w) in enumerate(zip(packets, wires)):
        yield f"{i:02d}-{type(p).__name__.lower()}", b"\x00" + w
    yield "all-in-a-row", b"\x00" + b"".join(wires)
    yield "cut-short", b"\x00" + b"".join(wires)[:-3]
    yield "small-limit", b"\x04" + wires[5]


def tls_records_seeds():
    from gw_ext import loop

    secret = bytes(range(1, 33))
    yield "raw-record", b"\x00" + loop.tls_records_seal(0x1301, secret, b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
    yield "raw-oversized", b"\x01\x17\x03\x03\x48\x00" + b"\x00" * 30
    for suite_bits in range(3):
        yield f"sealed-{suite_bits}", bytes([4 | suite_bits, 8, 0]) + bytes(range(32))
    yield "sealed-big", bytes([4, 255, 0]) + bytes(1020)
    yield "sealed-alert", bytes([4, 1, 2]) + b"\x01\x00\x00\x00"
    yield "sealed-keyupdate", bytes([5, 2, 3]) + b"\x18\x00\x00\x01\x01\x00\x00\x00"
    yield "sealed-flipped", bytes([6, 4, 0]) + bytes(16) + b"\x00" * 9 + b"\x01"


def codec5_seeds():
    from gw_ext import codec5
    from gw.packets5 import (Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Properties, Puback, Pubcomp,
                             Publish, Pubrec, Pubrel, Suback, Subscribe, Unsuback, Unsubscribe)

    every = Properties(payload_format_indicator=1, message_expiry_interval=60, content_type="text/plain",
                       response_topic="re/ply", correlation_data=b"\x01", subscription_identifiers=(1, 300),
                       topic_alias=3, user_properties=(("k", "v"), ("k", "w")))
    packets = [
        Connect("dev-1", True, 60, Properties(session_expiry_interval=3600, receive_maximum=10,
                                              maximum_packet_size=4096, topic_alias_maximum=5,
                                              request_problem_information=1, request_response_information=1,
                                              authentication_method="m", authentication_data=b"d",
                                              user_properties=(("a", "b"),))),
        Connect("", False, 0, will_topic="will/t", will_message=b"bye", will_qos=1, will_retain=True,
                will_properties=Properties(will_delay_interval=5, payload_format_indicator=0), username="u",
                password=b"pw"),
        Connack(True, 0, Properties(assigned_client_identifier="x", server_keep_alive=30, maximum_qos=1,
                                    retain_available=1, wildcard_subscription_available=1,
                                    subscription_identifier_available=1, shared_subscription_available=1,
                                    response_information="r", server_reference="s", reason_string="ok")),
        Connack(False, 0x87), Publish("a/b", b"payload", 0), Publish("a/b", b"x" * 100, 1, True, False, 7, every),
        Publish("", b"p", 2, False, True, 9, Properties(topic_alias=1)),
        Puback(1), Pubrec(2, 0x10), Pubrel(3, 0x92, Properties(reason_string="gone")), Pubcomp(4),
        Subscribe(5, [("a/#", 0x2E), ("$share/g/+/b", 0x01)], Properties(subscription_identifiers=(7,))),
        Suback(5, [0, 2, 0x80, 0xA2]), Unsubscribe(6, ["a/#"]), Unsuback(6, [0, 0x11]), Pingreq(), Pingresp(),
        Disconnect(), Disconnect(0x8E, Properties(session_expiry_interval=0, server_reference="other")),
        Auth(0x18, Properties(authentication_method="SCRAM", authentication_data=b"c")),
    ]
    wires = [codec5.encode(p) for p in packets]
    for i, (p, w) in enumerate(zip(packets, wires)):
        yield f"{i:02d}-{type(p).__name__.lower()}", b"\x00" + w
    yield "all-in-a-row", b"\x00" + b"".join(wires)
    yield "cut-short", b"\x00" + b"".join(wires)[:-3]
    yield "small-limit", b"\x04" + wires[5]
    yield "wrapped-publish-body", b"\x40" + wires[5][:1] + wires[5][2:]


def main() -> None:
    for target, seeds in (("mqtt", mqtt_seeds), ("jsonlines", json_seeds), ("http", http_seeds),
                          ("channel", channel_seeds), ("wal", wal_seeds), ("codec", codec_seeds),
                          ("codec5", codec5_seeds), ("ws", ws_seeds), ("tls_records", tls_records_seeds)):
        for name, data in seeds():
            write(target, name, data)
    print("seed corpus written to", CORPUS)


if __name__ == "__main__":
    main()
