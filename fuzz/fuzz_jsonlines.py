"""Fuzz target `jsonlines`: a worker's JSON-lines listener (the protocol of
gw/jsonproto.py behind the newline framing of gw_ext/worker/jsonlines.pyx), driven
one loop turn at a time.

Clients write streams of lines (valid Connect, Data, Heartbeat, Disconnect
messages from a pool of client ids, raw input bytes, flipped bits) in
fragments the input cuts, with loop turns, closes and resets between them.
At the end the worker must hold no connection and a fresh client's Connect
must be answered.

    ./dev fuzz jsonlines 60
"""

from __future__ import annotations

import common  # the import path of the instrumented build first; the fuzzing loop
from common import CLIENT_IDS, Scenario, WorkerUnderTest, run_scenario, shared_harness

KINDS = (b"Connect", b"Data", b"Heartbeat", b"Disconnect", b"Bogus")
PAYLOADS = (b'null', b'"text"', b'{"metrics":{"temp_c":21.5},"seq":%d}', b'{"metrics":{"Bad":1}}', b'[1,2]',
            b'{"metrics":{"temp_c":1e999}}', b'{"metrics":{},"tags":{"site":"AAL"},"seq":%d}', b'123')
TIMESTAMPS = (b'null', b'1758626321.5', b'"2025-09-23T11:18:41Z"', b'"yesterday"', b'-1')
ENDINGS = (b"\n", b"\r\n", b"")


def json_template(inp) -> bytes:
    kind = inp.pick(KINDS)
    cid = inp.byte()
    client = b'"%s"' % CLIENT_IDS[cid % 4] if cid % 6 < 4 else (b'null' if cid % 6 == 4 else b'""')
    payload = inp.pick(PAYLOADS)
    if b"%d" in payload:
        payload = payload % inp.byte()
    shape = inp.byte()
    if shape % 5 == 0:
        line = b'{"message_type":"%s"}' % kind          # only the required field
    elif shape % 5 == 1:
        line = b'{"client_id":%s,"message_type":"%s","payload":%s,"timestamp":%s,"extra":true}' % (
            client, kind, payload, inp.pick(TIMESTAMPS))
    else:
        line = b'{"client_id":%s,"message_type":"%s","payload":%s,"timestamp":%s}' % (
            client, kind, payload, inp.pick(TIMESTAMPS))
    return line + inp.pick(ENDINGS)


class JsonScenario(Scenario):
    def template(self, inp) -> bytes:
        return json_template(inp)


def connected(received: bytes) -> bool:
    return b"\n" in received and b'"Connected"' in received.split(b"\n", 1)[0]


PROFILES = ({}, {"max_packet_size": 200}, {"max_outbound": 400, "soft_outbound": 200})


def TestOneInput(data: bytes) -> None:
    first = data[0] if data else 0
    wut = WorkerUnderTest(shared_harness(), protos=("json",), limits=PROFILES[first % 3])
    run_scenario(wut, lambda: JsonScenario(wut, data[1:], "json"),
                 b'{"client_id":"fresh","message_type":"Connect","payload":null,'
                 b'"timestamp":1758626321.5}\n', connected)


def main() -> None:
    common.fuzz(TestOneInput, instrumented=("gw.http_api", "gw.ingest", "gw.jsonproto"))


if __name__ == "__main__":
    main()
