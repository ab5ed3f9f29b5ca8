"""Framing, measured where it runs: a one-worker `gw serve`, one connection
streaming small QoS 0 PUBLISH packets in writes whose sizes do not line up
with packet boundaries, so packets straddle reads and the carry-over path is
exercised. A PINGREQ at the end comes back only after every packet before it
was framed, decoded and handled (packets are processed in order), which is
what each round times.

Reports packets/s and MB/s in extra_info. The client (Python, sendall of
pre-encoded bytes) is usually the slower side, so this is a floor for the
worker, and a regression shows up as a drop against earlier runs.
"""

from __future__ import annotations

import random
import socket

import pytest

from benchutil import gw_harness
from gw.packets import Connect, Pingreq, Publish
from gw_ext import codec

PACKETS = 200_000

# The tests' harness: a real `gw serve` it stops by pid, and a worker death
# during a benchmark fails it like any test.
_harness = gw_harness()
gw_module_factory = _harness.gw_module_factory
no_undeclared_deaths = _harness.no_undeclared_deaths


@pytest.fixture(scope="module")
def one_worker(gw_module_factory):
    server = gw_module_factory(workers=1, listeners=("mqtt",), args=["--log-level", "warning"])
    sock = socket.create_connection(("127.0.0.1", server.ports["mqtt"]), timeout=10)
    sock.sendall(codec.encode(Connect("bench-framing", True, 0)))
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    yield sock
    sock.close()


def stream() -> tuple[list[bytes], int]:
    rng = random.Random(3)
    data = b"".join(codec.encode(Publish(f"sensors/dev{rng.randrange(1000)}/temp", rng.randbytes(rng.randint(16, 64))))
                    for _ in range(PACKETS))
    # Cut into writes of 1-64 KiB at arbitrary offsets.
    chunks, pos = [], 0
    while pos < len(data):
        n = rng.randint(1024, 65536)
        chunks.append(data[pos:pos + n])
        pos += n
    return chunks, len(data)


CHUNKS, SIZE = stream()
PING = codec.encode(Pingreq())


def test_framing_publish_stream(benchmark, one_worker):
    sock = one_worker

    def run():
        for chunk in CHUNKS:
            sock.sendall(chunk)
        sock.sendall(PING)
        assert sock.recv(2) == b"\xd0\x00"

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    benchmark.extra_info["packets"] = PACKETS
    benchmark.extra_info["packets_per_s"] = round(PACKETS / best)
    benchmark.extra_info["mb_per_s"] = round(SIZE / best / 1e6, 1)
