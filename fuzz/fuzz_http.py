"""Fuzz target `http`: a worker's HTTP listener (gw_ext/worker/http.pyx's framing in
front of gw/http_api.py's HttpApp), driven one loop turn at a time.

Clients write streams of requests (ingest with Content-Length or chunked
bodies, batches, 100-continue, keep-alive and close, the GET routes; raw input
bytes, flipped bits) in fragments the input cuts, pipelined or not, with loop
turns, closes mid-request and resets between them. At the end the worker must
hold no connection and a fresh client's GET /readyz must get its 200.

    ./dev fuzz http 60
"""

from __future__ import annotations

import common  # the import path of the instrumented build first; the fuzzing loop
from common import READING, Scenario, WorkerUnderTest, run_scenario, shared_harness

TARGETS = (b"/v1/ingest/dev1", b"/v1/ingest", b"/healthz", b"/readyz", b"/metrics", b"/docs",
           b"/v1/ingest/bad id", b"/nowhere", b"/v1/ingest/dev2?x=1", b"*", b"/v1/alerts/x/ack")
METHODS = (b"POST", b"GET", b"HEAD", b"PUT", b"DELETE")
HEADERS = (b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"Expect: 100-continue\r\n",
           b"Content-Type: text/plain\r\n", b"Host: other\r\n", b"X-Filler: " + b"f" * 200 + b"\r\n",
           b"Transfer-Encoding: gzip\r\n", b"Content-Length: 3\r\n", b"Expect: something\r\n")
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x")


def body_of(inp, target: bytes) -> bytes:
    seq = inp.byte()
    if target == b"/v1/ingest":
        return b'[{"device_id":"dev1",%s,{"device_id":"dev2","metrics":{"x":1}}]' % (READING % (seq, seq))[1:]
    choice = seq % 4
    if choice == 0:
        return READING % (seq, seq)
    if choice == 1:
        return b'{"metrics":{"temp_c":"warm"}}'
    if choice == 2:
        return b'{"metric":{"temp_c":1}}'
    return b"x" * seq


def chunked(body: bytes, inp) -> bytes:
    out = bytearray()
    step = inp.byte() % 16 + 1
    for i in range(0, len(body), step):
        part = body[i:i + step]
        out += b"%x;ext=1\r\n" % len(part) if inp.byte() & 1 else b"%x\r\n" % len(part)
        out += part + b"\r\n"
    out += b"0\r\n"
    if inp.byte() & 1:
        out += b"X-Trailer: 1\r\n"
    return bytes(out + b"\r\n")


def http_template(inp) -> bytes:
    target = inp.pick(TARGETS)
    method = inp.pick(METHODS)
    version = VERSIONS[0] if inp.byte() % 4 else inp.pick(VERSIONS)
    body = body_of(inp, target) if method in (b"POST", b"PUT") else b""
    head = b"%s %s %s\r\nHost: gw\r\n" % (method, target, version)
    if body and inp.byte() % 3:
        head += b"Content-Type: application/json\r\n"
    head += inp.pick(HEADERS)
    if body and inp.byte() & 1:
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, inp)
    if body or inp.byte() & 1:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


class HttpScenario(Scenario):
    def template(self, inp) -> bytes:
        return http_template(inp)


def ready(received: bytes) -> bool:
    return received.startswith(b"HTTP/1.1 200 ") and b"\r\n\r\n" in received


def TestOneInput(data: bytes) -> None:
    first = data[0] if data else 0
    limits = {}
    if first & 1:
        limits["http_max_body"] = 64
    if first & 2:
        limits.update(max_outbound=700, soft_outbound=350)
    wut = WorkerUnderTest(shared_harness(), protos=("http",), ack_sink=bool(first & 4), limits=limits)
    run_scenario(wut, lambda: HttpScenario(wut, data[1:], "http"),
                 b"GET /readyz HTTP/1.1\r\nHost: gw\r\n\r\n", ready)


def main() -> None:
    common.fuzz(TestOneInput, instrumented=("gw.http_api", "gw.ingest"))


if __name__ == "__main__":
    main()
