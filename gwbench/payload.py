"""Layout of a bench message payload, shared by every engine.

    0  uint32 LE  publisher id (0..P-1 in a run)
    4  uint32 LE  sequence number of that publisher, from 0
    8  uint64 LE  send time, CLOCK_MONOTONIC ns (time.perf_counter_ns())
   16  padding up to --size bytes

CLOCK_MONOTONIC is one clock for every process on the machine, so a
subscriber in another worker process computes end-to-end latency directly.
"""
import struct
import time

HEADER = struct.Struct("<IIQ")
HEADER_SIZE = HEADER.size  # 16
MIN_SIZE = HEADER_SIZE


def make(pub_id: int, seq: int, size: int, ts_ns: int | None = None) -> bytes:
    if ts_ns is None:
        ts_ns = time.perf_counter_ns()
    head = HEADER.pack(pub_id, seq & 0xFFFFFFFF, ts_ns)
    return head + b"\x00" * (size - HEADER_SIZE) if size > HEADER_SIZE else head


def parse(payload: bytes):
    return HEADER.unpack_from(payload, 0)
