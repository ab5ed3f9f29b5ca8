"""Fuzz target `channel`: frames between workers. A worker of three (slots 1
and 2 played by the harness over real SOCK_SEQPACKET socketpairs registered
with Worker.add_peer) gets datagrams of frames as a peer worker would send
them (gw_ext/frames.pxd): forwarded PUBLISHes, interest, retained updates, HELLO,
claims, grants, evictions, owner checks (CHECK) and their answers (CHECKED),
moved sessions, pauses, subscription syncs, and frames whose lengths lie;
meanwhile MQTT clients (the `mqtt` target's ops) connect, subscribe and
publish, so that what the frames name exists. At the
end the worker must hold no connection and a fresh client must get its
CONNACK.

    ./dev fuzz channel 60
"""

from __future__ import annotations

import struct

import common  # the import path of the instrumented build first; the fuzzing loop
from common import (CLIENT_IDS, FILTERS, FR_CHECK, FR_CHECKED, FR_CLAIM, FR_EVICT, FR_GRANT, FR_HELLO,
                    FR_PAUSE, FR_PUBLISH, FR_REGISTER, FR_RELEASE, FR_RESUME, FR_RETAIN, FR_SESSION, FR_SUB_ADD,
                    FR_SHARED_COUNT, FR_SHARED_PUBLISH, FR_SUB_DEL, FR_SUB_SYNC, FR_SUB_SYNCED, TOPICS,
                    WorkerUnderTest, connack_new, connect_packet, frame,
                    run_scenario, shared_harness)
from fuzz_mqtt import MqttScenario

# Frame types up to FR_SHARED_PUBLISH; 0 and FR_PIECE (cut frames: the channel's own
# reassembly) stand for "any bytes" (types the worker does not know, lengths that lie).
FRAME_KINDS = FR_SHARED_PUBLISH + 1


def session_state(inp) -> bytes:
    """A moved session (gw_ext/worker/session_state.pyx's layout), its counts and lengths from the
    input: consistent, or lying about what follows."""
    nsubs = inp.byte() % 3
    out = bytearray(struct.pack("<H", nsubs if inp.byte() % 4 else inp.u16()))
    for _ in range(nsubs):
        f = inp.pick(FILTERS)
        out += struct.pack("<H", len(f) if inp.byte() % 4 else inp.u16()) + f + bytes([inp.byte() % 4])
    nmsgs = inp.byte() % 3
    out += struct.pack("<HI", inp.u16(), nmsgs if inp.byte() % 4 else inp.u16() << 16 | inp.u16())
    for _ in range(nmsgs):
        topic = inp.pick(TOPICS)
        payload = b"m" * (inp.byte() % 8)
        lie = inp.byte() % 4 == 0
        out += struct.pack("<HBBHI", inp.u16(), inp.byte() % 4, inp.byte() % 3, len(topic),
                           (inp.u16() << 16 | inp.u16()) if lie else len(payload)) + topic + payload
    nq2 = inp.byte() % 3
    out += struct.pack("<H", nq2) + b"".join(struct.pack("<H", inp.u16()) for _ in range(nq2))
    return bytes(out)


def peer_frame(inp) -> bytes:
    kind = inp.byte() % FRAME_KINDS
    cid = inp.pick(CLIENT_IDS + (b"fresh", b""))
    if kind == FR_PUBLISH:
        topic = inp.pick(TOPICS)
        payload = b"f" * inp.byte()
        return frame(FR_PUBLISH, struct.pack("<Q", inp.u16()) + topic + payload, flags=inp.byte() & 7,
                     topic_len=len(topic))
    if kind in (FR_SUB_ADD, FR_SUB_DEL):
        return frame(kind, inp.pick(FILTERS))
    if kind == FR_RETAIN:
        topic = inp.pick(TOPICS)
        payload = b"r" * (inp.byte() % 4)
        return frame(FR_RETAIN, topic + payload, flags=inp.byte() & 3, topic_len=len(topic))
    if kind == FR_CLAIM:
        return frame(FR_CLAIM, struct.pack("<IB", inp.byte(), inp.byte() & 1) + cid)
    if kind == FR_GRANT:
        return frame(FR_GRANT, struct.pack("<Ib", inp.byte() % 8, (inp.byte() % 5) - 1) + cid)
    if kind == FR_EVICT:
        return frame(FR_EVICT, struct.pack("<BIB", inp.byte(), inp.byte() % 8, inp.byte() & 1) + cid)
    if kind == FR_SESSION:
        return frame(FR_SESSION, struct.pack("<IBH", inp.byte() % 8, inp.byte() & 1, len(cid)) + cid
                     + session_state(inp))
    if kind == FR_CHECK:
        # check id, claimant (sometimes no worker at all), token, client id
        return frame(FR_CHECK, struct.pack("<IBI", inp.byte() % 8, inp.byte() % 5, inp.byte() % 8) + cid)
    if kind == FR_CHECKED:
        # check id, held (2: no such answer), client id
        return frame(FR_CHECKED, struct.pack("<IB", inp.byte() % 8, inp.byte() % 3) + cid)
    if kind == FR_SHARED_COUNT:
        # slot, gen, online, total (online > total sometimes), the group's key
        online, total = inp.byte() % 4, inp.byte() % 4
        return frame(FR_SHARED_COUNT, struct.pack("<IIII", inp.byte() % 4, inp.byte() % 4, online, total)
                     + inp.pick(FILTERS + (b"$share/g/a/+", b"$share/h/t/x")))
    if kind == FR_SHARED_PUBLISH:
        topic = inp.pick(TOPICS)
        payload = b"s" * (inp.byte() % 8)
        return frame(FR_SHARED_PUBLISH, struct.pack("<IIBQ", inp.byte() % 4, inp.byte() % 4, inp.byte() % 4,
                                                    inp.u16()) + topic + payload,
                     flags=inp.byte() & 3, topic_len=len(topic) if inp.byte() % 4 else inp.u16())
    if kind in (FR_RELEASE, FR_REGISTER):
        return frame(kind, bytes([inp.byte()]) + cid)
    if kind in (FR_SUB_SYNC, FR_SUB_SYNCED):
        return frame(kind, struct.pack("<I", inp.byte() % 8))
    if kind in (FR_HELLO, FR_PAUSE, FR_RESUME):
        return frame(kind, b"")
    # Any type, flags and lengths: the header may claim more (or less) than follows.
    ftype, flags, tlen = inp.byte(), inp.byte(), inp.u16()
    body = inp.take(inp.byte())
    blen = len(body) if inp.byte() % 2 else inp.u16() << 16 | inp.u16()
    return struct.pack("<BBHI", ftype, flags, tlen, blen) + body


class ChannelScenario(MqttScenario):
    """The mqtt ops, and: FRAME (append one to a peer's datagram), DGRAM (send it)."""

    N_EXTRA = 3

    def __init__(self, wut, data):
        super().__init__(wut, data, "mqtt")
        self.pending = {p: bytearray() for p in wut.peers}

    def extra_op(self, op: int, inp) -> None:
        p = 1 + inp.byte() % len(self.pending)
        if op == self.N_OPS:
            self.pending[p] += peer_frame(inp)
        elif op == self.N_OPS + 1:
            if self.pending[p]:
                self.wut.peers[p].send(bytes(self.pending[p]))
                self.pending[p].clear()
        else:
            self.wut.peers[p].send(inp.take(inp.byte()))        # a raw datagram


def TestOneInput(data: bytes) -> None:
    first = data[0] if data else 0
    wut = WorkerUnderTest(shared_harness(), nworkers=3, protos=("mqtt",), ack_sink=bool(first & 1),
                          limits={"max_queued": 4, "queue_high": 1, "queue_low": 0} if first & 2 else {},
                          peer_answers=not first & 4)
    run_scenario(wut, lambda: ChannelScenario(wut, data[1:]),
                 connect_packet(b"fresh", clean=True), connack_new)


def main() -> None:
    common.fuzz(TestOneInput)


if __name__ == "__main__":
    main()
