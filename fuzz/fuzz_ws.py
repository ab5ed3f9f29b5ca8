"""Fuzz target `ws`: MQTT over WebSocket, at two levels per input.

1. The frame codec (gw_ext/wsframe.pyx's decoder, the C function the worker
   runs) against a pure-Python reading of RFC 6455 (tests/ws_ref.py): the
   input's bytes, fed in the pieces the input cuts, give the same events
   (data, message ends, pings, pongs, the Close or the error and its code)
   as the reference fed them whole.
2. A worker's ws listener (gw_ext/worker/websocket.pyx in front of the MQTT
   framing), driven one loop turn at a time like the mqtt target: clients
   write upgrade requests (valid, or with a bad path, version, key, no
   subprotocol), masked frames carrying valid MQTT packets cut anywhere,
   control frames, malformed frames, raw bytes and flipped bits, in fragments
   the input cuts, with loop turns, closes and resets. At the end every client
   goes, the worker must hold no connection and no session, and a fresh
   client's upgrade and CONNECT must get 101 and a CONNACK.

    ./dev fuzz ws 60
"""

from __future__ import annotations

import os
import struct
import sys

import common  # the import path of the instrumented build first; the fuzzing loop
from common import Scenario, WorkerUnderTest, connect_packet, run_scenario, shared_harness
from fuzz_mqtt import PROFILES, mqtt_template

sys.path.insert(1, str(common.REPO / "tests"))     # the reference decoder, a test oracle

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
UPGRADES = (
    b"GET /mqtt HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
    b"GET /mqtt?x=1 HTTP/1.1\r\nHost: gw\r\nupgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\n"
    b"sec-websocket-key: " + KEY + b"\r\nsec-websocket-version: 13\r\nsec-websocket-protocol: x, mqttv3.1\r\n"
    b"Origin: http://a\r\n\r\n",
    b"GET /other HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET /mqtt HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
    b"GET /mqtt HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /mqtt HTTP/1.0\r\n\r\n",
)


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x11\x22\x33\x44",
                 rsv: int = 0, masked: bool = True) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | (opcode & 0xF)
    bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


def ws_template(inp) -> bytes:
    kind = inp.byte() % 12
    if kind == 0:
        return inp.pick(UPGRADES)
    if kind <= 5:
        # Valid MQTT packets in binary frames, cut at a point the input picks, maybe fragmented.
        data = mqtt_template(inp)
        cut = inp.byte() % (len(data) + 1)
        mask = inp.take(4).ljust(4, b"\0")
        if inp.byte() & 1:
            return client_frame(2, data, mask=mask)
        return client_frame(2, data[:cut], fin=False, mask=mask) + client_frame(0, data[cut:], mask=mask)
    if kind == 6:
        return client_frame(9, inp.take(inp.byte() % 130))        # a ping, maybe too long
    if kind == 7:
        return client_frame(10, inp.take(inp.byte() % 8))
    if kind == 8:
        code = inp.pick((1000, 1001, 1005, 999, 3000, 4999, 5000, 1015))
        return client_frame(8, struct.pack("!H", code) + inp.take(inp.byte() % 4))
    if kind == 9:
        # Any opcode and flags, masked or not.
        b = inp.byte()
        return client_frame(b & 0xF, inp.take(inp.byte() % 16), fin=bool(b & 0x80), rsv=(b >> 4) & 7,
                            masked=bool(inp.byte() & 1))
    if kind == 10:
        # A declared length that is large or has the top bit (the payload never comes in full).
        return struct.pack("!BBQ", 0x82, 0xFF, inp.pick((1 << 63, 1 << 40, 70000, 300))) + b"\1\2\3\4" + b"z" * 8
    return client_frame(1, b"text")


class WsScenario(Scenario):
    def template(self, inp) -> bytes:
        return ws_template(inp)


def served(received: bytes) -> bool:
    """101, then a binary frame holding CONNACK accepted, no session present."""
    head, sep, rest = received.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 101 ") and sep != b"" and rest[:6] == b"\x82\x04\x20\x02\x00\x00"


def codec_check(data: bytes) -> None:
    import ws_ref
    from gw_ext import wsframe

    if not data:
        return
    limit = (125, 300, 70000, 1 << 20)[data[0] & 3]
    data = data[1:]
    want = ws_ref.decode(data, limit)
    dec = wsframe.Decoder(limit, True)
    got = []
    pos = 0
    i = 0
    while pos < len(data) and not dec.done:
        step = (data[i % len(data)] % 23) + 1 if data else 1
        i += 1
        got += dec.feed(data[pos:pos + step])
        pos += step
    if not dec.done and pos < len(data):
        got += dec.feed(data[pos:])
    if ws_ref.merge(got) != want:
        raise AssertionError(f"decoder {ws_ref.merge(got)!r}, reference {want!r}")


def TestOneInput(data: bytes) -> None:
    codec_check(data)
    first = data[0] if data else 0
    wut = WorkerUnderTest(shared_harness(), protos=("ws",), nworkers=2 if first & 1 else 1,
                          limits=PROFILES[(first >> 1) & 3])
    run_scenario(wut, lambda: WsScenario(wut, data[1:], "ws"),
                 UPGRADES[0] + client_frame(2, connect_packet(b"fresh", clean=True), mask=os.urandom(4)), served)


def main() -> None:
    common.fuzz(TestOneInput)


if __name__ == "__main__":
    main()
