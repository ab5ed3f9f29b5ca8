"""The write-ahead log (gw_ext/wal.pyx): the on-disk format, CRC-32C, round
trips across segments, recovery from torn and corrupt tails, kill -9 of a
writing process in each fsync mode, a full disk (RLIMIT_FSIZE) that comes back,
injected I/O errors, retention and the reader's errors. Real files in tmp_path,
real processes."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gw_ext import wal as walmod
from gw_ext.wal import (OffsetBeyondEndError, OffsetDeletedError, OffsetMisalignedError, Wal, WalReader,
                        crc32c, crc32c_table, frame, list_segments, retain_dir, segment_name)

REPO = Path(__file__).resolve().parent.parent
MODES = ("off", "batch", "always")
# Stats row indices (the numbers the brief gives; gw.stats.Counter names them too).
WAL_RECORDS, WAL_BYTES, WAL_FSYNCS, WAL_DURABLE_OFFSET, WAL_APPENDED_OFFSET = 138, 139, 140, 141, 142
WAL_TRUNCATED, WAL_ERRORS, WAL_REFUSED = 143, 144, 145
INTACT = {"corrupt_bytes": 0, "corrupt_regions": []}      # recover(): no damage in the middle


def payload(i: int) -> bytes:
    """Record i of the deterministic sequence the child processes write: a JSON
    reading of 100 to 500 bytes."""
    head = b'{"device_id":"dev-%05d","seq":%d,"v":"' % (i % 997, i)
    return head + b"abcdefghij"[i % 10:i % 10 + 1] * (60 + (i * 37) % 400) + b'"}'


def ends_of(payloads, start: int = 0) -> list[int]:
    out, off = [], start
    for p in payloads:
        off += 8 + len(p)
        out.append(off)
    return out


def crc32c_bitwise(data: bytes) -> int:
    """The reference: bit by bit, reflected polynomial 0x82F63B78."""
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 & -(c & 1))
    return c ^ 0xFFFFFFFF


def parse_dir(path) -> list[tuple[int, bytes]]:
    """An independent reader of the format (struct, and the bitwise CRC for
    small records), checking every rule of the contract on the way."""
    out = []
    expect = None
    for base, name in list_segments(path):
        data = Path(path, name).read_bytes()
        assert data[:8] == b"GWWAL001" and struct.unpack("<Q", data[8:16])[0] == base
        assert expect is None or base == expect, "segments are contiguous"
        pos = 16
        while pos < len(data):
            n, crc = struct.unpack_from("<II", data, pos)
            assert 1 <= n <= 16 << 20
            body = data[pos + 8:pos + 8 + n]
            assert len(body) == n and (crc32c_bitwise(body) if n <= 64 else crc32c(body)) == crc
            out.append((base + pos - 16, body))
            pos += 8 + n
        expect = base + pos - 16
    return out


def make(path, mode="off", **kw) -> Wal:
    w = Wal(str(path), fsync=mode, **kw)
    w.recover()
    return w


def read_all(path, start=0, up_to=None, max_records=1 << 30):
    r = WalReader(str(path))
    try:
        if up_to is None:
            up_to = r.end_offset()
        return r.read(start, up_to, max_records=max_records)
    finally:
        r.close()


# --- CRC-32C ------------------------------------------------------------------

@pytest.mark.parametrize("fn", [crc32c, crc32c_table])
def test_crc32c_known_vectors(fn):
    assert fn(b"123456789") == 0xE3069283
    assert fn(b"") == 0
    # RFC 3720 (iSCSI) B.4
    assert fn(bytes(32)) == 0x8A9136AA
    assert fn(b"\xff" * 32) == 0x62A8AB43
    assert fn(bytes(range(32))) == 0x46DD794E
    assert fn(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_crc32c_implementations_agree_at_every_length_and_alignment():
    rnd = random.Random(1)
    blob = rnd.randbytes(4096)
    for start in range(0, 9):
        for n in list(range(0, 70)) + [255, 256, 1000, 4000]:
            data = memoryview(blob)[start:start + n]
            assert crc32c(data) == crc32c_table(data)
    assert crc32c(blob[:100]) == crc32c_bitwise(blob[:100])
    # chaining, as zlib.crc32
    assert crc32c(blob[1000:], crc32c(blob[:1000])) == crc32c(blob)
    assert crc32c_table(blob[7:], crc32c_table(blob[:7])) == crc32c(blob)
    assert walmod.crc32c_implementation() in ("sse4.2", "table")


# --- format and round trips ---------------------------------------------------------

def test_format_on_disk(tmp_path):
    w = make(tmp_path, "always", segment_bytes=1000)
    payloads = [payload(i) for i in range(20)]
    ends = [w.append(p) for p in payloads]
    assert ends == ends_of(payloads)
    assert w.flush(10)
    assert w.durable_offset == w.appended_offset == ends[-1]
    w.close()
    recs = parse_dir(tmp_path)
    assert [p for _, p in recs] == payloads
    assert [o for o, _ in recs] == [0] + ends[:-1]
    segs = list_segments(tmp_path)
    assert len(segs) > 3
    for (base, name), nxt in zip(segs, [b for b, _ in segs[1:]] + [None]):
        assert name == f"{base:020d}.wal" == segment_name(base)
        size = (tmp_path / name).stat().st_size
        first = [p for o, p in recs if o == base]
        assert first, "a segment starts with a record"
        assert size <= 1000 or size == 16 + 8 + len(first[0])      # only a lone big record passes it
        if nxt is not None:
            assert size == 16 + nxt - base
            # it was full: the next record would have passed segment_bytes
            nxt_rec = [p for o, p in recs if o == nxt][0]
            assert size + 8 + len(nxt_rec) > 1000
    assert walmod.frame(b"abc") == struct.pack("<II", 3, crc32c(b"abc")) + b"abc"


def test_round_trip_across_many_segments_and_every_offset(tmp_path):
    rnd = random.Random(7)
    payloads = [rnd.randbytes(rnd.randint(1, 700)) for _ in range(3000)]
    w = make(tmp_path, "batch", segment_bytes=4096, batch_ms=0.5)
    ends = [w.append(p) for p in payloads]
    assert w.flush(10)
    w.close()
    assert len(list_segments(tmp_path)) > 100
    offsets = [0] + ends[:-1]
    assert parse_dir(tmp_path) == list(zip(offsets, payloads))
    r = WalReader(str(tmp_path))
    assert r.end_offset() == ends[-1]
    recs, nxt = r.read(0, ends[-1], max_records=10 ** 6)
    assert recs == list(zip(offsets, payloads)) and nxt == ends[-1]
    # chunked, as the pipeline reads: from each next_offset
    pos, got = 0, []
    while pos < ends[-1]:
        recs, pos = r.read(pos, ends[-1], max_records=rnd.randint(1, 50))
        got.extend(recs)
    assert got == list(zip(offsets, payloads))
    # from arbitrary record boundaries (a fresh reader: nothing cached), up to arbitrary ends
    for _ in range(200):
        a = rnd.randrange(len(payloads))
        b = rnd.randrange(a, len(payloads))
        fresh = WalReader(str(tmp_path))
        recs, nxt = fresh.read(offsets[a], ends[b], max_records=10 ** 6)
        assert recs == list(zip(offsets[a:b + 1], payloads[a:b + 1])) and nxt == ends[b]
        fresh.close()
    # up_to inside a record: stops before it
    recs, nxt = r.read(0, ends[10] - 1)
    assert len(recs) == 10 and nxt == ends[9]
    recs, nxt = r.read(ends[-1], ends[-1] + 100)          # at the end: nothing more yet
    assert recs == [] and nxt == ends[-1]
    r.close()


def test_big_records_take_their_own_segment_and_the_16_mib_maximum(tmp_path):
    big = random.Random(3).randbytes(16 << 20)
    w = make(tmp_path, "batch", segment_bytes=4096)
    ends = [w.append(b"small"), w.append(big), w.append(b"x" * 5000), w.append(b"after")]
    assert w.flush(30)
    w.close()
    recs, nxt = read_all(tmp_path)
    assert [p for _, p in recs] == [b"small", big, b"x" * 5000, b"after"] and nxt == ends[-1]
    assert [b for b, _ in list_segments(tmp_path)] == [0, ends[0], ends[1], ends[2]]
    with pytest.raises(ValueError):
        Wal(str(tmp_path / "x")).append(b"")                  # checked before anything else
    w = make(tmp_path / "y")
    with pytest.raises(ValueError):
        w.append(b"")
    with pytest.raises(ValueError):
        w.append(bytes((16 << 20) + 1))
    assert not w.room(0) and not w.room((16 << 20) + 1) and w.room(100)
    w.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(st.binary(min_size=1, max_size=600), min_size=0, max_size=60),
       segment_bytes=st.integers(64, 3000), chunk=st.integers(1, 20))
def test_any_payloads_read_back_equal(payloads, segment_bytes, chunk):
    d = tempfile.mkdtemp(prefix="gw-wal-")
    try:
        w = make(d, "off", segment_bytes=segment_bytes)
        ends = [w.append(p) for p in payloads]
        assert ends == ends_of(payloads)
        assert w.flush(10)
        w.close()
        offsets = [0] + ends[:-1]
        assert parse_dir(d) == list(zip(offsets, payloads))
        r = WalReader(d)
        end = r.end_offset()
        assert end == (ends[-1] if ends else 0)
        pos, got = 0, []
        while True:
            recs, pos = r.read(pos, end, max_records=chunk)
            if not recs:
                break
            got.extend(recs)
        assert got == list(zip(offsets, payloads)) and pos == end
        r.close()
        last_base = list_segments(d)[-1][0]
        again = Wal(d, fsync="off", segment_bytes=segment_bytes)
        assert again.recover() == {"records": len([o for o in offsets[:len(payloads)] if o >= last_base]),
                                   "truncated_bytes": 0, "end_offset": end, **INTACT}
        again.close()
    finally:
        shutil.rmtree(d)


# --- the reader's errors ---------------------------------------------------------------

def test_reader_errors(tmp_path):
    payloads = [payload(i) for i in range(40)]
    w = make(tmp_path, "off", segment_bytes=2000)
    ends = [w.append(p) for p in payloads]
    assert w.flush(10)
    r = WalReader(str(tmp_path))
    with pytest.raises(OffsetMisalignedError, match="not at a record boundary"):
        r.read(ends[3] + 1, ends[-1])
    with pytest.raises(OffsetMisalignedError):
        r.read(1, ends[-1])
    with pytest.raises(OffsetBeyondEndError, match="past the records on disk"):
        r.read(ends[-1] + 8, ends[-1] + 100)
    with pytest.raises(ValueError):
        r.read(0, 10, max_records=0)
    segs = list_segments(tmp_path)
    w.retain(segs[2][0], 0, None)                  # deletes the first two segments
    assert r.first_offset() == segs[2][0]
    with pytest.raises(OffsetDeletedError, match="deleted segment"):
        r.read(0, ends[-1])
    with pytest.raises(OffsetDeletedError):
        WalReader(str(tmp_path)).read(ends[0], ends[-1])
    recs, nxt = r.read(segs[2][0], ends[-1], max_records=1000)
    assert recs[0][0] == segs[2][0] and nxt == ends[-1]
    # both are ValueErrors too, and WalOffsetErrors
    assert issubclass(OffsetDeletedError, ValueError) and issubclass(OffsetMisalignedError, walmod.WalOffsetError)
    w.close()
    # a directory without segments yet: offset 0 reads nothing
    (tmp_path / "empty").mkdir()
    assert WalReader(str(tmp_path / "empty")).read(0, 0) == ([], 0)
    assert WalReader(str(tmp_path / "empty")).end_offset() == 0


def test_reader_follows_a_live_writer_across_segments(tmp_path):
    """The pipeline's loop: read up to the durable offset while the writer
    appends and rolls segments."""
    payloads = [payload(i) for i in range(4000)]
    w = make(tmp_path, "batch", segment_bytes=8192, batch_ms=0.2)
    r = WalReader(str(tmp_path))
    got, pos, i = [], 0, 0
    deadline = time.monotonic() + 30
    while len(got) < len(payloads):
        assert time.monotonic() < deadline
        for _ in range(random.randint(0, 60)):
            if i < len(payloads) and w.append(payloads[i]) > 0:
                i += 1
        recs, pos = r.read(pos, w.poll(), max_records=random.randint(1, 100))
        got.extend(recs)
        if not recs:
            time.sleep(0.0005)
    assert [p for _, p in got] == payloads
    w.close()


# --- recovery -------------------------------------------------------------------

def build_log(path, n=30, segment_bytes=2500, mode="off"):
    payloads = [payload(i) for i in range(n)]
    w = make(path, mode, segment_bytes=segment_bytes)
    ends = [w.append(p) for p in payloads]
    assert w.flush(10)
    w.close()
    return payloads, ends


def test_recovery_cuts_the_last_record_torn_at_every_byte(tmp_path):
    src = tmp_path / "src"
    payloads, ends = build_log(src)
    base, name = list_segments(src)[-1]
    last_start = ends[-2]
    in_last = len([e for e in ends if e > base])
    size = (src / name).stat().st_size
    assert size == 16 + ends[-1] - base
    for cut in range(16 + last_start - base, size):     # every length that tears the last record
        d = tmp_path / f"cut{cut}"
        shutil.copytree(src, d)
        os.truncate(d / name, cut)
        row = np.zeros(256, dtype=np.uint64)
        w = Wal(str(d), fsync="off", segment_bytes=2500, counters=row)
        got = w.recover()
        assert got == {"records": in_last - 1, "truncated_bytes": cut - (16 + last_start - base),
                       "end_offset": last_start, **INTACT}
        assert row[WAL_TRUNCATED] == got["truncated_bytes"]
        assert (d / name).stat().st_size == 16 + last_start - base
        # the log continues right there
        assert w.append(b"next") == last_start + 8 + 4
        assert w.flush(10)
        w.close()
        recs, nxt = read_all(d)
        assert [p for _, p in recs] == payloads[:-1] + [b"next"]
        shutil.rmtree(d)


def test_recovery_of_an_intact_log_cuts_nothing(tmp_path):
    payloads, ends = build_log(tmp_path)
    w = Wal(str(tmp_path), fsync="batch", segment_bytes=2500)
    got = w.recover()
    assert got["truncated_bytes"] == 0 and got["end_offset"] == ends[-1] and got["records"] > 0
    assert w.durable_offset == w.appended_offset == ends[-1]
    w.close()


def damage(path, name, pos, how):
    """Corrupts segment file `name` at file position pos: one bit flipped, or
    a block of bytes zeroed or replaced by random garbage."""
    f = Path(path, name)
    data = bytearray(f.read_bytes())
    if how == "bit":
        data[pos] ^= 0x40
    elif how == "zeros":
        data[pos:pos + 300] = bytes(300)
    else:
        data[pos:pos + 300] = random.Random(pos).randbytes(300)
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("where,how", [("payload", "bit"), ("length", "bit"), ("crc", "bit"),
                                       ("length", "zeros"), ("payload", "garbage")])
def test_corruption_mid_segment_is_kept_and_skipped_not_cut(tmp_path, where, how):
    """Damage followed by valid records is not a crash mid-write: recovery keeps
    what follows (only a torn tail is cut), readers skip the damaged records and
    say which offsets they lost, and the log goes on after it."""
    payloads, ends = build_log(tmp_path, n=40, segment_bytes=1 << 20)     # one segment
    k = 17                                                               # record 17 of 40
    start = ends[k - 1]
    at = start + {"payload": 8 + 50, "length": 1, "crc": 5}[where]
    damage(tmp_path, segment_name(0), 16 + at, how)
    size = (tmp_path / segment_name(0)).stat().st_size
    hit = at + (1 if how == "bit" else 300)             # damaged offsets: [at, hit)
    lost = [i for i in range(40) if ends[i] > at and (ends[i - 1] if i else 0) < hit]
    resumed = ends[lost[-1]]
    kept = [p for i, p in enumerate(payloads) if i not in lost]
    # a reader skips it (no error, no stall) and names the range it skipped
    r = WalReader(str(tmp_path))
    recs, nxt = r.read(0, ends[-1], max_records=1000)
    assert [p for _, p in recs] == kept and nxt == ends[-1]
    assert r.take_skips() == [(start, resumed)] and r.take_skips() == []
    # in small steps, as the pipeline reads
    r2, pos, got = WalReader(str(tmp_path)), 0, []
    while pos < ends[-1]:
        recs, pos = r2.read(pos, ends[-1], max_records=3)
        got.extend(recs)
    assert [p for _, p in got] == kept and r2.take_skips() == [(start, resumed)]
    # from a checkpoint past it (a fresh reader walks the segment: the damage is on the way)
    for i in (lost[-1] + 1, 39):
        fresh = WalReader(str(tmp_path))
        recs, nxt = fresh.read(ends[i - 1], ends[-1])
        assert [p for _, p in recs] == payloads[i:] and fresh.take_skips() == []
        with pytest.raises(OffsetMisalignedError):
            WalReader(str(tmp_path)).read(ends[i - 1] + 3, ends[-1])
        fresh.close()
    assert WalReader(str(tmp_path)).end_offset() == ends[-1]
    # recovery keeps every valid record after it, cuts nothing, names the damage
    row = np.zeros(256, dtype=np.uint64)
    w = Wal(str(tmp_path), fsync="always", counters=row)
    got = w.recover()
    assert got == {"records": 40 - len(lost), "truncated_bytes": 0, "end_offset": ends[-1],
                   "corrupt_bytes": resumed - start, "corrupt_regions": [(start, resumed)]}
    assert (tmp_path / segment_name(0)).stat().st_size == size and row[WAL_TRUNCATED] == 0
    assert w.append(b"after") == ends[-1] + 8 + 5 and w.flush(10)
    w.close()
    recs, nxt = read_all(tmp_path)
    assert [p for _, p in recs] == kept + [b"after"]


def test_a_corrupt_last_record_is_a_torn_tail_and_is_cut(tmp_path):
    payloads, ends = build_log(tmp_path, n=40, segment_bytes=1 << 20)
    damage(tmp_path, segment_name(0), 16 + ends[-2] + 8 + 20, "bit")
    recs, nxt = read_all(tmp_path, up_to=ends[-1])
    assert len(recs) == 39 and nxt == ends[-2]          # nothing after it yet: the reader waits there
    w = Wal(str(tmp_path), fsync="always")
    assert w.recover() == {"records": 39, "truncated_bytes": ends[-1] - ends[-2], "end_offset": ends[-2],
                           **INTACT}
    w.close()


def test_a_record_before_a_bogus_length_mid_segment_is_skipped_by_recovery_and_readers_alike(tmp_path):
    """A bad CRC, a valid record, a record whose length runs past the file, a
    valid record: the bogus length is not a torn tail (a record follows it), so
    the valid record before it cannot be vouched for by what follows; the
    reader skips it, and recovery must count the log as the reader reads it
    (it once kept it, taking the bogus length for a torn tail)."""
    x, y, z = frame(b"damaged!!"), frame(b"kept only if vouched"), frame(b"last")
    x = x[:4] + bytes([x[4] ^ 0xFF]) + x[5:]                 # a bad CRC
    bogus = struct.pack("<I", 0xFF00) + b"QS}R" + b"\0"       # a sane length, past the file's end
    body = x + y + bogus + z
    (tmp_path / segment_name(0)).write_bytes(b"GWWAL001" + struct.pack("<Q", 0) + body)
    end = len(body)
    r = WalReader(str(tmp_path))
    assert r.end_offset() == end
    recs, nxt = r.read(0, end)
    assert [p for _, p in recs] == [b"last"] and nxt == end
    assert r.take_skips() == [(0, end - len(z))]
    r.close()
    w = Wal(str(tmp_path), fsync="off")
    found = w.recover()
    assert (found["records"], found["end_offset"], found["truncated_bytes"]) == (1, end, 0)
    assert found["corrupt_regions"] == [(0, end - len(z))]
    w.close()


def test_a_valid_run_before_a_torn_tail_is_kept(tmp_path):
    """The other side of the rule above: corruption, then valid records, then a
    record the file's end cuts (a torn write): the run is kept, the torn record
    cut, and the reader reads the run."""
    x, y1, y2 = frame(b"damaged!!"), frame(b"one"), frame(b"two")
    x = x[:4] + bytes([x[4] ^ 0xFF]) + x[5:]
    torn = frame(b"torn by a power cut")[:13]
    body = x + y1 + y2 + torn
    (tmp_path / segment_name(0)).write_bytes(b"GWWAL001" + struct.pack("<Q", 0) + body)
    w = Wal(str(tmp_path), fsync="off")
    found = w.recover()
    end = len(body) - len(torn)
    assert (found["records"], found["end_offset"], found["truncated_bytes"]) == (2, end, len(torn))
    w.close()
    r = WalReader(str(tmp_path))
    recs, nxt = r.read(0, end)
    assert [p for _, p in recs] == [b"one", b"two"] and nxt == end
    r.close()


def test_damage_in_an_older_segment_and_at_a_segments_end_is_skipped(tmp_path):
    """Recovery only scans the last segment; the reader meets damage anywhere.
    A damaged last record of a complete segment: the reader goes on at the next
    segment. Several damaged places: each skipped, each reported once."""
    payloads, ends = build_log(tmp_path, n=120, segment_bytes=3000)
    segs = list_segments(tmp_path)
    assert len(segs) >= 6
    offsets = [0] + ends[:-1]
    index = {o: i for i, o in enumerate(offsets)}
    # the second record of segment 1, and the last record of segment 3
    b1, name1 = segs[1]
    a = index[ends[index[b1]]]
    damage(tmp_path, name1, 16 + offsets[a] - b1 + 3, "bit")
    b3, name3 = segs[3]
    last3 = index[segs[4][0]] - 1
    damage(tmp_path, name3, 16 + offsets[last3] - b3 + 8 + 2, "bit")
    r = WalReader(str(tmp_path))
    pos, got = 0, []
    while pos < ends[-1]:
        recs, pos = r.read(pos, ends[-1], max_records=7)
        got.extend(recs)
    assert [o for o, _ in got] == [o for i, o in enumerate(offsets) if i not in (a, last3)]
    assert r.take_skips() == [(offsets[a], ends[a]), (offsets[last3], segs[4][0])]
    w = Wal(str(tmp_path), fsync="off", segment_bytes=3000)
    assert w.recover()["corrupt_bytes"] == 0              # the last segment is intact
    w.close()


def test_garbage_never_passes_for_a_record(tmp_path):
    """Resynchronisation needs a sane length, a matching CRC and a valid record
    (or the end of the data) after the candidate: random garbage across many
    records never yields a record that was not written."""
    rnd = random.Random(11)
    payloads = [rnd.randbytes(rnd.randint(1, 300)) for _ in range(400)]
    w = make(tmp_path, "off", segment_bytes=1 << 20)
    ends = [w.append(p) for p in payloads]
    assert w.flush(10)
    w.close()
    name = list_segments(tmp_path)[0][1]
    f = tmp_path / name
    clean = f.read_bytes()
    written = set(payloads)
    for trial in range(40):
        data = bytearray(clean)
        pos = rnd.randrange(16, len(data) - 2000)
        data[pos:pos + 1500] = rnd.randbytes(1500)
        f.write_bytes(bytes(data))
        r = WalReader(str(tmp_path))
        recs, nxt = r.read(0, ends[-1], max_records=10 ** 6)
        assert nxt == ends[-1]
        assert all(p in written for _, p in recs)
        assert len(recs) >= 400 - 1500 // 9 - 2
        r.close()
    f.write_bytes(clean)


def test_recovery_of_a_torn_segment_header(tmp_path):
    payloads, ends = build_log(tmp_path)
    segs = list_segments(tmp_path)
    last_base, last_name = segs[-1]
    prev_end = last_base
    # a segment created by a roll, its header cut short: dropped, the log ends at the previous one
    os.truncate(tmp_path / last_name, 7)
    w = Wal(str(tmp_path), fsync="always", segment_bytes=2500)
    got = w.recover()
    assert got["end_offset"] == prev_end and got["truncated_bytes"] == 7
    assert not (tmp_path / last_name).exists()
    assert w.append(payloads[-1]) > 0 and w.flush(10)
    w.close()
    # a first segment with a torn header: a fresh header, an empty log
    d = tmp_path / "first"
    d.mkdir()
    (d / segment_name(0)).write_bytes(b"GWWAL0")
    w = Wal(str(d))
    assert w.recover() == {"records": 0, "truncated_bytes": 6, "end_offset": 0, **INTACT}
    w.close()
    assert (d / segment_name(0)).read_bytes() == b"GWWAL001" + bytes(8)


def test_recovery_drops_segments_after_a_gap(tmp_path):
    """The previous segment lost its tail (fsync off and a power cut): what comes
    after the gap is not replayed."""
    payloads, ends = build_log(tmp_path)
    segs = list_segments(tmp_path)
    prev_base, prev_name = segs[-2]
    last_base, last_name = segs[-1]
    prev_size = (tmp_path / prev_name).stat().st_size
    last_size = (tmp_path / last_name).stat().st_size
    os.truncate(tmp_path / prev_name, prev_size - 3)          # its last record torn
    w = Wal(str(tmp_path), fsync="off", segment_bytes=2500)
    got = w.recover()
    kept = [e for e in ends if e <= last_base - 1]
    assert got["end_offset"] == kept[-1]
    assert got["truncated_bytes"] == last_size + (prev_size - 3 - (16 + kept[-1] - prev_base))  # whole files dropped
    assert not (tmp_path / last_name).exists()
    w.close()
    recs, nxt = read_all(tmp_path)
    assert [p for _, p in recs] == payloads[:len(kept)] and nxt == kept[-1]


def test_new_log_creates_directories_and_first_segment(tmp_path):
    d = tmp_path / "data" / "wal" / "3"
    row = np.zeros(256, dtype=np.uint64)
    w = Wal(str(d), counters=row)
    assert w.recover() == {"records": 0, "truncated_bytes": 0, "end_offset": 0, **INTACT}
    assert (d / segment_name(0)).read_bytes() == b"GWWAL001" + bytes(8)
    with pytest.raises(RuntimeError):
        w.recover()
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.append(b"x")
    with pytest.raises(RuntimeError, match="recover"):
        Wal(str(d)).append(b"x")
    with pytest.raises(ValueError):
        Wal(str(d), fsync="sometimes")
    with pytest.raises(ValueError):
        Wal(str(d), counters=np.zeros(100, dtype=np.uint64))


# --- the writer: group commit, back-pressure, eventfd, counters ---------------------------

def test_always_groups_records_appended_during_an_fsync(tmp_path):
    row = np.zeros(256, dtype=np.uint64)
    w = make(tmp_path, "always", counters=row)
    ends = [w.append(payload(i)) for i in range(3000)]
    assert w.flush(30)
    st = w.stats()
    assert 1 <= st["fsyncs"] < 3000 // 2          # far fewer than records: groups
    assert w.poll() == ends[-1]
    assert row[WAL_FSYNCS] == st["fsyncs"] and row[WAL_DURABLE_OFFSET] == ends[-1]
    assert row[WAL_RECORDS] == 3000 and row[WAL_BYTES] == ends[-1] == row[WAL_APPENDED_OFFSET]
    w.close()


def test_batch_fsyncs_at_most_every_batch_ms(tmp_path):
    w = make(tmp_path, "batch", batch_ms=25.0)
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < 0.5:
        w.append(payload(n))
        n += 1
        if n % 100 == 0:
            time.sleep(0.001)
    elapsed = time.monotonic() - t0
    fsyncs = w.stats()["fsyncs"]
    assert 2 <= fsyncs <= elapsed / 0.025 + 3
    assert w.flush(10)
    w.close()
    recs, nxt = read_all(tmp_path)
    assert len(recs) == n


def test_off_makes_records_durable_without_fsync(tmp_path):
    w = make(tmp_path, "off")
    end = [w.append(payload(i)) for i in range(500)][-1]
    assert w.flush(10) and w.durable_offset == end
    assert w.stats()["fsyncs"] == 0 and w.stats()["writes"] >= 1
    w.close()


def test_appends_refused_past_max_pending_then_taken_again(tmp_path):
    row = np.zeros(256, dtype=np.uint64)
    # batch_ms long: after its first write the flusher waits 10 s before the next
    w = make(tmp_path, "batch", batch_ms=10_000.0, max_pending=4096, counters=row)
    assert w.append(b"first") > 0 and w.flush(10)
    accepted = 0
    while (end := w.append(payload(accepted))) > 0:
        accepted += 1
        assert accepted < 100
    assert w.error == 0 and accepted >= 1
    assert w.pending_bytes <= 4096 and w.pending_bytes + 8 + len(payload(accepted)) > 4096
    assert not w.room(len(payload(accepted))) and w.room(1) == (w.pending_bytes + 9 <= 4096)
    assert row[WAL_REFUSED] == 1
    assert w.flush(10)                            # forces the write now
    assert w.append(payload(accepted)) > 0
    w.close()
    assert [p for _, p in parse_dir(tmp_path)] == [b"first"] + [payload(i) for i in range(accepted + 1)]


def test_eventfd_readable_when_durable_advances(tmp_path):
    w = make(tmp_path, "always")
    fd = w.fileno()
    assert select.select([fd], [], [], 0)[0] == []
    end = w.append(b"hello")
    assert select.select([fd], [], [], 5)[0] == [fd]
    assert w.poll() == end == w.durable_offset
    assert select.select([fd], [], [], 0)[0] == []          # drained
    w.close()
    with pytest.raises(ValueError):
        w.fileno()


def test_injected_fsync_failures_rewrite_and_recover(tmp_path, caplog):
    """fdatasync fails (EIO): nothing is reported durable, appends are refused,
    the flusher writes the unsynced bytes again and syncs until it succeeds,
    then the state clears by itself; every record is on disk exactly once."""
    caplog.set_level(logging.INFO, logger="gw.wal")
    row = np.zeros(256, dtype=np.uint64)
    w = make(tmp_path, "always", segment_bytes=3000, counters=row)
    first = [w.append(payload(i)) for i in range(5)][-1]
    assert w.flush(10) and w.poll() == first
    w._inject_errors(fsync_errno=errno.EIO, fsync_count=3, retry_s=0.2)
    ends = []
    deadline = time.monotonic() + 5
    while w.error == 0 and len(ends) < 30:
        assert time.monotonic() < deadline
        end = w.append(payload(5 + len(ends)))
        if end < 0:
            break                                  # the error state was entered meanwhile
        ends.append(end)
        time.sleep(0.0005)
    while w.error == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert w.error == errno.EIO and ends
    assert w.append(b"refused") == -1 and not w.room(10)
    assert w.poll() < ends[-1]
    assert w.flush(10)                             # the retries succeed by themselves
    assert w.durable_offset == ends[-1] and w.error == 0
    assert w.append(b"again") > 0 and w.flush(10)
    assert row[WAL_ERRORS] == 3 and row[WAL_REFUSED] >= 1
    w.close()
    assert [p for _, p in parse_dir(tmp_path)] == [payload(i) for i in range(5 + len(ends))] + [b"again"]
    assert w.stats()["writes"] > 2 + 3                # the unsynced bytes written again after each failure
    lines = [r for r in caplog.records if r.name == "gw.wal"]
    assert [r.levelname for r in lines] == ["ERROR", "WARNING"], [r.getMessage() for r in lines]
    assert "Input/output error" in lines[0].getMessage()


@pytest.mark.parametrize("mode", MODES)
def test_random_injected_write_and_fsync_failures_lose_and_repeat_nothing(tmp_path, mode):
    """Failures at random points (segment creation, headers, partial groups,
    syncs): after each the flusher continues from where it stopped."""
    rnd = random.Random(MODES.index(mode))
    w = make(tmp_path, mode, segment_bytes=1500, batch_ms=0.3)
    w._inject_errors(write_errno=errno.ENOSPC, write_count=1, retry_s=0.002)
    accepted = []
    i = 0
    deadline = time.monotonic() + 60
    while len(accepted) < 1500:
        assert time.monotonic() < deadline
        if rnd.random() < 0.02:
            if rnd.random() < 0.5:
                w._inject_errors(write_errno=rnd.choice([errno.ENOSPC, errno.EIO]), write_count=rnd.randint(1, 3))
            else:
                w._inject_errors(fsync_errno=errno.EIO, fsync_count=rnd.randint(1, 2))
        p = payload(i)
        i += 1
        if w.append(p) > 0:
            accepted.append(p)
        elif rnd.random() < 0.3:
            time.sleep(0.001)
    assert w.flush(30)
    assert w.stats()["errors"] > 0
    w.close()
    assert [p for _, p in parse_dir(tmp_path)] == accepted
    again = Wal(str(tmp_path), fsync=mode, segment_bytes=1500)
    assert again.recover()["truncated_bytes"] == 0
    again.close()


def test_a_forked_child_refuses_appends(tmp_path):
    w = make(tmp_path, "always")
    assert w.append(b"parent") > 0
    pid = os.fork()
    if pid == 0:                                     # the flusher thread is not in the child
        code = 0 if (w.append(b"child") == -1 and not w.room(5) and w.flush(1) is False) else 1
        w.close()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert w.append(b"parent again") > 0 and w.flush(10)
    w.close()
    assert [p for _, p in parse_dir(tmp_path)] == [b"parent", b"parent again"]


# --- kill -9 ---------------------------------------------------------------------

CHILD_PRELUDE = f"""
import json, os, select, sys, time
sys.path.insert(0, {str(REPO)!r})
from gw_ext.wal import Wal
def payload(i):
    head = b'{{"device_id":"dev-%05d","seq":%d,"v":"' % (i % 997, i)
    return head + b"abcdefghij"[i % 10:i % 10 + 1] * (60 + (i * 37) % 400) + b'"}}'
"""

CHILD_APPEND = CHILD_PRELUDE + """
d, mode = sys.argv[1], sys.argv[2]
w = Wal(d, fsync=mode, segment_bytes=256 << 10, batch_ms=1.0)
start = w.recover()["end_offset"]
assert start == 0
fd = w.fileno()
i = 0
last = 0
while True:
    for _ in range(40):
        if w.append(payload(i)) < 0:
            break
        i += 1
    if select.select([fd], [], [], 0.001)[0]:
        durable = w.poll()
        if durable != last:
            last = durable
            print(durable, flush=True)
"""


def child_env():
    from conftest import gw_env      # the build this run tests (./dev sanitize's, under it)

    return gw_env()


@pytest.mark.parametrize("mode", MODES)
def test_kill_9_keeps_every_record_below_the_last_durable_offset(tmp_path, mode):
    rnd = random.Random()
    proc = subprocess.Popen([sys.executable, "-c", CHILD_APPEND, str(tmp_path), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env(), text=True)
    printed = []
    try:
        deadline = time.monotonic() + 30
        target = rnd.randint(600_000, 2_000_000)       # bytes: several segments
        while not printed or printed[-1] < target:
            assert time.monotonic() < deadline, "the child did not advance its durable offset"
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            printed.append(int(line))
        time.sleep(rnd.uniform(0, 0.02))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    printed += [int(x) for x in proc.stdout.read().split()]     # anything printed before it died
    proc.stdout.close()
    proc.stderr.close()
    assert printed == sorted(printed)
    durable = printed[-1]
    ends = ends_of(payload(i) for i in range(200_000))
    assert durable in ends                                     # a record's end
    n = ends.index(durable) + 1
    recs, nxt = read_all(tmp_path, up_to=durable)
    assert nxt == durable and len(recs) == n
    assert all(p == payload(i) for i, (_, p) in enumerate(recs))
    # recovery keeps all of that (and perhaps more written after), cuts any torn tail
    w = Wal(str(tmp_path), fsync=mode, segment_bytes=256 << 10)
    got = w.recover()
    assert got["end_offset"] >= durable and got["end_offset"] in ends
    w.close()
    recs, nxt = read_all(tmp_path)
    assert nxt == got["end_offset"] and all(p == payload(i) for i, (_, p) in enumerate(recs))


# --- a full disk ------------------------------------------------------------------

CHILD_FULL = CHILD_PRELUDE + """
import logging, resource, signal
import numpy as np
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
d, mode, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
row = np.zeros(256, dtype=np.uint64)
w = Wal(d, fsync=mode, segment_bytes=8 << 20, max_pending=48 << 10, batch_ms=1.0, counters=row)
w.recover()
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
i = end = refused = 0
deadline = time.monotonic() + 20
while w.error == 0:
    assert time.monotonic() < deadline, "no error state"
    r = w.append(payload(i))
    if r < 0:
        refused += 1
        select.select([w.fileno()], [], [], 0.005)
        w.poll()
        continue
    end = r
    i += 1
w.poll()
assert w.append(payload(i)) == -1            # the error state refuses
print(json.dumps({"accepted": i, "end": end, "error": w.error, "durable": w.durable_offset,
                  "refused_pending": refused}), flush=True)
sys.stdin.readline()                          # the parent looked at the file
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
t0 = time.monotonic()
while w.poll() < end or w.error:              # no flush(): the flusher recovers by itself
    assert time.monotonic() - t0 < 10, "did not recover"
    select.select([w.fileno()], [], [], 0.2)
print(json.dumps({"durable": w.durable_offset, "after_s": time.monotonic() - t0}), flush=True)
for _ in range(10):
    end = w.append(payload(i))
    assert end > 0
    i += 1
assert w.flush(10)
w.poll()
names = ["WAL_RECORDS", "WAL_BYTES", "WAL_FSYNCS", "WAL_DURABLE_OFFSET", "WAL_APPENDED_OFFSET",
         "WAL_TRUNCATED", "WAL_ERRORS", "WAL_REFUSED"]
print(json.dumps({"accepted": i, "end": end, "counters": dict(zip(names, map(int, row[138:146])))}), flush=True)
w.close()
"""


@pytest.mark.parametrize("mode", MODES)
def test_full_disk_refuses_then_recovers_by_itself(tmp_path, mode):
    ends = ends_of(payload(i) for i in range(10_000))
    k = next(k for k, e in enumerate(ends) if e > 150_000)
    limit = 16 + ends[k - 1] + 100                   # the failing write is a partial one: 100 bytes of a record
    proc = subprocess.Popen([sys.executable, "-c", CHILD_FULL, str(tmp_path), mode, str(limit)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(), text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        full = json.loads(line)
        assert full["error"] == errno.EFBIG
        assert full["end"] == ends[full["accepted"] - 1]
        assert full["durable"] < limit - 16 < full["end"]
        seg = tmp_path / segment_name(0)
        assert seg.stat().st_size == limit           # written up to the limit, byte for byte
        proc.stdin.write("raise\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        back = json.loads(line)
        assert back["durable"] == full["end"] and back["after_s"] < 5
        last = json.loads(proc.stdout.readline())
        assert proc.wait(20) == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    n = last["accepted"]
    assert n == full["accepted"] + 10
    recs, nxt = read_all(tmp_path)
    assert [p for _, p in recs] == [payload(i) for i in range(n)]     # nothing lost, nothing twice
    assert nxt == last["end"] == ends[n - 1] and seg.stat().st_size == 16 + nxt
    c = last["counters"]
    assert c["WAL_RECORDS"] == n and c["WAL_BYTES"] == nxt == c["WAL_APPENDED_OFFSET"] == c["WAL_DURABLE_OFFSET"]
    assert c["WAL_ERRORS"] >= 1 and c["WAL_REFUSED"] >= 1 and c["WAL_TRUNCATED"] == 0
    assert (c["WAL_FSYNCS"] > 0) == (mode != "off")
    wal_lines = [ln for ln in err.splitlines() if ln.startswith("gw.wal")]
    assert len(wal_lines) == 2, err                  # one error line (< 10 s), one when it clears
    assert wal_lines[0].startswith("gw.wal ERROR") and "File too large" in wal_lines[0]
    assert wal_lines[1].startswith("gw.wal WARNING") and "succeed again" in wal_lines[1]


# --- retention ------------------------------------------------------------------------

def aged_log(path, n=60, segment_bytes=2000):
    payloads, ends = build_log(path, n=n, segment_bytes=segment_bytes)
    segs = list_segments(path)
    now = time.time()
    for k, (base, name) in enumerate(segs):          # oldest an hour old, one minute apart
        t = now - 3600 + 60 * k
        os.utime(path / name, (t, t))
    return payloads, ends, segs


def sizes(path):
    return {name: (path / name).stat().st_size for _, name in list_segments(path)}


def test_retention_deletes_only_what_every_sink_has_read_and_is_old_or_over_budget(tmp_path):
    payloads, ends, segs = aged_log(tmp_path)
    assert len(segs) >= 8
    before = sizes(tmp_path)
    # nothing is below min_offset = the second segment's base - 1
    assert retain_dir(tmp_path, segs[1][0] - 1, 0, 0) == 0
    # min_offset at segment 4's base: segments 0..3 may go; age: older than 50 min = segments 0..9
    freed = retain_dir(tmp_path, segs[4][0], 50 * 60, None)
    assert freed == sum(before[name] for _, name in segs[:4])
    assert [b for b, _ in list_segments(tmp_path)] == [b for b, _ in segs[4:]]
    # younger than max_age and under max_bytes: kept
    assert retain_dir(tmp_path, ends[-1], 7200, 10 ** 9) == 0
    # over max_bytes: the oldest go until the total is under it
    total = sum(sizes(tmp_path).values())
    budget = total - before[segs[4][1]] - 1
    freed = retain_dir(tmp_path, ends[-1], None, budget)
    assert freed == before[segs[4][1]] + before[segs[5][1]]
    assert sum(sizes(tmp_path).values()) <= budget
    # everything read, everything old: all but the newest (the one being written)
    retain_dir(tmp_path, ends[-1] + 10 ** 6, 0, 0)
    assert [b for b, _ in list_segments(tmp_path)] == [segs[-1][0]]
    recs, nxt = read_all(tmp_path, start=segs[-1][0], up_to=ends[-1])
    assert nxt == ends[-1] and [p for _, p in recs] == payloads[len(payloads) - len(recs):]


def test_wal_retain_never_deletes_the_segment_being_written(tmp_path):
    payloads, ends, segs = aged_log(tmp_path)
    w = Wal(str(tmp_path), fsync="off", segment_bytes=2000)
    w.recover()
    assert w.segment_base == segs[-1][0]
    freed = w.retain(10 ** 12, 0, 0)
    assert freed > 0 and [b for b, _ in list_segments(tmp_path)] == [segs[-1][0]]
    # while it appends: old segments go, the log stays readable from its first kept offset
    for i in range(200):
        assert w.append(payload(i)) > 0
        if i % 20 == 0:
            w.flush(10)
            retain_dir(tmp_path, w.durable_offset, 0, None)
    assert w.flush(10)
    assert w.retain(w.durable_offset, 0, None) >= 0
    assert len(list_segments(tmp_path)) == 1
    recs, nxt = read_all(tmp_path, start=WalReader(str(tmp_path)).first_offset(), up_to=w.durable_offset)
    assert nxt == w.durable_offset and recs
    w.close()
