"""Fuzz target `wal`: recovery and reading of the write-ahead log
(gw_ext/wal.pyx) on segment files the input makes: valid segments (records
framed as the writer frames them, bases that follow each other or not), then
mutated (bytes flipped, length fields rewritten, files cut or extended, a
header broken). The reader reads them before and after `recover()`; the
recovered log must agree with the reader (its end offset, its records), and
take and give back new records.

    ./dev fuzz wal 60
"""

from __future__ import annotations

import os
import shutil
import struct

import common  # the import path of the instrumented build first; the fuzzing loop
from common import Input

MAGIC = b"GWWAL001"
HEADER = 16


def build_segments(inp: Input) -> dict[int, bytearray]:
    from gw_ext.wal import frame

    segs: dict[int, bytearray] = {}
    base = 0 if inp.byte() % 4 else inp.u16() << 16 | inp.u16()
    for _ in range(inp.byte() % 3 + 1):
        data = bytearray(MAGIC + struct.pack("<Q", base))
        for _ in range(inp.byte() % 6):
            size = inp.byte() % 40 + 1
            payload = inp.take(size).ljust(size, b".")
            data += frame(payload)
        segs[base] = data
        how = inp.byte() % 8
        if how == 0:
            base += inp.u16()                       # a gap, or a base inside the previous segment
        elif how == 1:
            base = max(0, base - inp.byte())
        else:
            base += len(data) - HEADER              # the next one starts where this one ends
    return segs


def mutate(inp: Input, segs: dict[int, bytearray]) -> None:
    bases = sorted(segs)
    for _ in range(inp.byte() % 6):
        data = segs[bases[inp.byte() % len(bases)]]
        kind = inp.byte() % 6
        at = inp.u16() % (len(data) + 1)
        if kind == 0 and at < len(data):
            data[at] ^= 1 << (inp.byte() & 7)
        elif kind == 1 and at + 4 <= len(data):
            data[at:at + 4] = struct.pack("<I", inp.u16() if inp.byte() & 1 else inp.u16() << 16 | inp.u16())
        elif kind == 2:
            del data[at:]                           # a torn tail (or a torn header)
        elif kind == 3:
            data += inp.take(inp.byte())            # garbage after the records
        elif kind == 4 and at < len(data):
            data[at:at + 1] = b""                   # a byte lost
        elif kind == 5:
            data[8:16] = struct.pack("<Q", inp.u16())   # a header naming another base


def read_all(reader, start: int, up_to: int, step: int):
    from gw_ext.wal import WalOffsetError

    out = []
    pos = start
    for _ in range(64):
        try:
            records, nxt = reader.read(pos, up_to, step)
        except WalOffsetError:
            return out, pos
        out += records
        if nxt == pos:
            break
        pos = nxt
    return out, pos


COUNTER = [0]
WORKDIR = None


def TestOneInput(data: bytes) -> None:
    global WORKDIR
    from gw_ext.wal import Wal, WalOffsetError, WalReader, crc32c, segment_name

    if WORKDIR is None:
        WORKDIR = common.Harness(nworkers=1, wal=False).dir
    inp = Input(data)
    COUNTER[0] += 1
    path = WORKDIR / f"log{COUNTER[0]}"
    path.mkdir()
    try:
        segs = build_segments(inp)
        mutate(inp, segs)
        for base, content in segs.items():
            (path / segment_name(base)).write_bytes(content)
        if inp.byte() % 8 == 0:
            (path / "00000000000000000007.wal.tmp").write_bytes(b"not a segment")
        step = inp.byte() % 5 + 1

        # Reading what is there, from the start and from an offset the input picks.
        reader = WalReader(path)
        end_before = reader.end_offset()
        read_all(reader, reader.first_offset(), end_before, step)
        try:
            reader.read(inp.u16(), end_before + inp.byte(), step)
        except WalOffsetError:
            pass
        reader.close()

        wal = Wal(path, segment_bytes=64 + inp.byte() * 8, fsync="off", batch_ms=0.0)
        try:
            found = wal.recover()
            end = found["end_offset"]
            reader = WalReader(path)
            if reader.end_offset() != end:
                raise AssertionError(f"recover() ends the log at {end}, the reader at {reader.end_offset()}")
            last = reader.segments()[-1][0]
            records, nxt = read_all(reader, last, end, 10000)
            if nxt != end or len(records) != found["records"]:
                raise AssertionError(f"the recovered segment from {last}: recover() counts {found['records']} "
                                     f"records ending at {end}; the reader reads {len(records)} ending at {nxt}")
            for offset, payload in records:
                assert payload and crc32c(payload) is not None and offset < end
            # The recovered log takes new records, and gives them back.
            new = [inp.take(inp.byte() % 30 + 1) or b"n" for _ in range(inp.byte() % 4 + 1)]
            ends = [wal.append(p) for p in new]
            if not wal.flush(5.0):
                raise AssertionError("the recovered log did not make new records durable")
            got, nxt = read_all(reader, end, ends[-1], 10000)
            if [p for _, p in got] != new or nxt != ends[-1]:
                raise AssertionError(f"appended {new!r} after {end}, read back {got!r} ending at {nxt}")
            reader.close()
        finally:
            wal.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    common.fuzz(TestOneInput)


if __name__ == "__main__":
    main()
