"""A store batch decoded into columns: the compiled decoder (gw_ext/storebatch.pyx,
the logged layout read in place) against the reference (batch.decode_python, one
msgspec decode per record), on the records the workers log, on records off that
layout, and on damaged ones (bytes changed, inserted, removed): the same
readings, series, samples, device summaries and bad records."""

from __future__ import annotations

import json
import os
import random
from datetime import datetime, timedelta, timezone

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gw.ingest import Telemetry
from gw.pipeline import batch

storebatch = pytest.importorskip("gw_ext.storebatch")

DECODE = msgspec.json.Decoder(batch.Reading).decode
ENCODE = msgspec.json.Encoder().encode


def logged(i: int, devices: int = 50, t0: float = 1.7e9) -> bytes:
    """A reading as a worker logs it (msgspec's JSON of the normalised Telemetry)."""
    d = i % devices
    ts = datetime.fromtimestamp(t0, timezone.utc) + timedelta(microseconds=i * 1013 - (i % 7) * 500_000)
    metrics = {"temp_c": 20 + (i % 13) / 7, "humidity_pct": float(40 + i % 20)}
    if i % 5 == 0:
        metrics["volts"] = -1.5e-7 * i
    payload = msgspec.Raw(b"null") if i % 3 else msgspec.Raw(ENCODE({"raw": f"x\"{i}\u00e9", "n": [i, None, True]}))
    tags = {"site": "AAL"} if i % 4 else {"site": "B\\\"\u00e5", "rack": str(i % 3)}
    return ENCODE(Telemetry(f"dev-{d:03d}", ts, i if i % 6 else None, metrics, tags, payload))


ODD = [
    # off the logged layout, but readings: the reference decoder takes them
    b'{"device_id":"d","ts":"2026-12-03T10:03:49.1Z","seq":5,"metrics":{"a":1.0,"a":2.0},"tags":{},"payload":null}',
    b'{"device_id":"d","ts":"2026-12-03T10:03:49.1Z","seq":5,"metrics":{"a":1},"tags":{},"payload":null}',
    b'{"device_id":"d","ts":"2026-12-03T10:03:49.1234567Z","seq":5,"metrics":{"a":1e5},"tags":{},"payload":null}',
    b'{"device_id":"d","ts":"2026-12-03T10:03:49+02:00","seq":5,"metrics":{"a":-0.5},"tags":{"x":"\\u00e9"},"payload":"s"}',
    b'{"device_id":"d","ts":"2026-12-03T10:03:49Z","seq":5,"metrics":{"a":1},"tags":{},"payload":null,"extra":1}',
    b'{"ts":"2026-12-03T10:03:49Z","device_id":"d","seq":5,"metrics":{"a":1},"tags":{},"payload":null}',
    b'{"device_id":"d\\u0065","ts":"2026-12-03T10:03:49Z","seq":5,"metrics":{"a":1},"tags":{},"payload":null}',
    b'{"device_id":"e","ts":"2400-02-29T23:59:59.999999Z","seq":5,"metrics":{"b":3.0},"tags":{},"payload":null}',
    b'{"device_id":"d","ts":"1970-01-01T00:00:00.000001Z","seq":0,"metrics":{"a":1.0,"b":2.0},"tags":{"t":"1"},"payload":true}',
    b'{"device_id":"d","ts":"2026-12-03T10:03:48Z","seq":5,"metrics":{"b":3.0},"tags":{},"payload":[{},[],{"a":[1,{"b":null}]}]}',
    # not readings: bad records for both
    b'{"device_id":"d","ts":"2026-02-30T10:03:49.1Z","seq":5,"metrics":{"a":1.0},"tags":{},"payload":null}',
    b'{"device_id":"d","ts":"2026-12-03T10:03:49Z","seq":5,"metrics":{"a":1e999},"tags":{},"payload":null}',
    b'{"device_id":"d","ts":"2026-12-03T10:03:49Z","seq":5,"metrics":{"a":01},"tags":{},"payload":null}',
    b'{"device_id":"d","ts":"2026-12-03T10:03:49Z","seq":5,"metrics":{"a":1.0},"tags":{},"payload":[1,2',
    b'{"device_id":"d\xff","ts":"2026-12-03T10:03:49Z","seq":5,"metrics":{"a":1.0},"tags":{},"payload":null}',
    b'{"device_id":"d","ts":"2026-12-03T10:03:49Z","seq":5,"metrics":{"a":1.0},"tags":{"s":"\\e"},"payload":null}',
    b'{"device_id":"d","ts":"2026-12-03T10:03:49Z","seq":5,"metrics":{"a":1.0},"tags":{},"payload":nul}',
    b"not json",
    b"",
]


def decode_both(records: list[bytes], slots: int = 1):
    parts = [(s, [(i * 1000 + s, r) for i, r in enumerate(records) if i % slots == s], 0) for s in range(slots)]
    out = []
    for f in (batch.decode, batch.decode_python):
        bad = []
        cols = f(parts, DECODE, ENCODE, lambda slot, off, exc: bad.append((slot, off, type(exc).__name__)))
        out.append((cols, bad))
    return out


def assert_same(records: list[bytes], slots: int = 1) -> None:
    (a, bad_a), (r, bad_r) = decode_both(records, slots)
    assert bad_a == bad_r
    # metrics as JSON values: the compiled decoder keeps the record's text ("1" stays "1",
    # msgspec re-encodes "1.0"); for what the workers log the two texts are the same.
    norm = lambda rows: [row[:5] + (json.loads(row[5]),) + row[6:] for row in rows]   # noqa: E731
    assert norm(a.readings) == norm(r.readings)
    assert a.names == r.names
    for col in ("key", "ts", "val", "reading"):
        assert np.array_equal(getattr(a, col), getattr(r, col)), col
        assert getattr(a, col).dtype == getattr(r, col).dtype
    assert a.devices == r.devices
    # in the same order: devices by first appearance, each one's last values by metric
    assert [(d, list(v[2])) for d, v in a.devices.items()] == [(d, list(v[2])) for d, v in r.devices.items()]


def test_logged_records_take_the_fast_path_and_decode_as_the_reference():
    records = [logged(i) for i in range(3000)]
    assert all(storebatch.fast_path(r) for r in records)
    assert_same(records, slots=2)
    (a, _), (r, _) = decode_both(records)
    assert a.readings == r.readings          # the very same text, metrics included


def test_records_off_the_layout_decode_as_the_reference():
    assert not any(storebatch.fast_path(r) for r in ODD[:7])
    assert all(storebatch.fast_path(r) for r in ODD[7:10])
    mixed = [x for pair in zip([logged(i) for i in range(len(ODD))], ODD) for x in pair]
    assert_same(mixed)
    assert_same(ODD)


@pytest.mark.parametrize("seed", range(4))
def test_damaged_records_decode_as_the_reference(seed):
    rng = random.Random(seed)
    base = [logged(i) for i in range(40)] + ODD
    alphabet = b'{}[]",:0123456789.eE-+nulltrZT\\u '
    records = []
    for _ in range(3000):
        x = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 3)):
            op, pos = rng.random(), rng.randrange(len(x) + 1)
            if op < 0.4 and x:
                x[min(pos, len(x) - 1)] = rng.randrange(256) if rng.random() < 0.3 else rng.choice(alphabet)
            elif op < 0.7:
                x.insert(pos, rng.choice(alphabet))
            elif x:
                del x[min(pos, len(x) - 1)]
        records.append(bytes(x))
    for start in range(0, len(records), 300):
        chunk = records[start:start + 300]
        try:
            assert_same(chunk)
        except UnicodeDecodeError:
            # the reference raises on tags that are not UTF-8 (a Raw it does not check);
            # the compiled decoder must raise the same for that chunk
            with pytest.raises(UnicodeDecodeError):
                batch.decode([(0, list(enumerate(chunk)), 0)], DECODE, ENCODE, lambda *a: None)


# Devices and metrics named alike up to a byte, escaped or not, in and off the logged
# layout, at times in and out of order: the compiled decoder's tables of devices and
# series (found by their UTF-8 text) against the reference's dicts.
_NAMES = st.sampled_from(["d", "e", "dé", "d\u00e9", "de", "d\\", "dev-00001", "dev-00010", "\u2603", "x" * 64])
_METRICS = st.sampled_from(["a", "b", "é", "\u00e9", "temp_c", "ab"])


@st.composite
def _record(draw):
    dev = draw(_NAMES)
    sec = draw(st.integers(0, 5))
    frac = draw(st.sampled_from(["", ".5", ".000001", ".25"]))
    seq = draw(st.sampled_from(["null", "0", "7", "123456789012345678"]))
    names = draw(st.lists(_METRICS, max_size=4, unique=True))
    values = draw(st.lists(st.sampled_from(["1.0", "-0.5", "2.25e3", "1", "1e5", "0.1"]),
                           min_size=len(names), max_size=len(names)))
    metrics = ",".join(f'"{m}":{v}' for m, v in zip(names, values))
    tags = draw(st.sampled_from(['{}', '{"site":"AAL"}', '{"s":"\u00e5"}']))
    payload = draw(st.sampled_from(["null", "true", '{"a":[1,null]}']))
    tz = draw(st.sampled_from(["Z", "Z", "Z", "+00:00"]))
    text = (f'{{"device_id":"{dev}","ts":"2026-12-03T10:03:4{sec}{frac}{tz}","seq":{seq},'
            f'"metrics":{{{metrics}}},"tags":{tags},"payload":{payload}}}')
    return text.encode()


@settings(max_examples=300, deadline=None)
@given(st.lists(_record(), max_size=40), st.integers(1, 2))
def test_device_and_series_tables_decode_as_the_reference(records, slots):
    assert_same(records, slots)


# --- the store's per-series rows built in C (storebatch.series_rows) against numpy and msgspec

def test_number_text_reads_back_as_the_same_double():
    rng = np.random.default_rng(3)
    values = [0.0, -0.0, 1.0, -1.0, 20.0, 20.53, -273.15, 0.1 + 0.2, 1e16, 2.0 ** 53, 2.0 ** 53 + 2, 1.5e-7,
              5e-324, 1.7976931348623157e308, -1e-300, 0.05, 123456789.123456789, 1764900000.123456,
              1764900000.1, 1764900000.0, 9007199254.740993]
    values += rng.standard_normal(2000).tolist()
    values += np.round(rng.standard_normal(2000) * 100, 2).tolist()
    values += (1.7e9 + rng.integers(0, 10 ** 12, 2000) / 1e6).tolist()
    values += (rng.standard_normal(500) * 10.0 ** rng.integers(-30, 30, 500)).tolist()
    for v in values:
        text = storebatch.number_text(v)
        back = json.loads(text)
        assert back == v and np.signbit(back) == np.signbit(v), (v, text)
        assert msgspec.json.decode(text.encode()) == v
    assert storebatch.number_text(20.53) == "20.53" and storebatch.number_text(20.0) == "20.0"
    assert storebatch.number_text(0.05) == "0.05" and storebatch.number_text(-0.0) == "-0.0"
    assert storebatch.number_text(1764900000.123456) == "1764900000.123456"
    for v in (float("inf"), float("-inf"), float("nan")):
        assert storebatch.number_text(v) == "null"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_series_rows_are_the_python_rows(tmp_path, seed):
    from gw.pipeline.store import CHUNK_SECONDS, StoreSink, open_store
    from gw.pipeline.rollup import WINDOWS
    rng = np.random.default_rng(seed)
    n = 5000
    names = [(f"dev-{i % 37}", m) for i in range(37) for m in ("a", "b", "c")][:80]
    key = rng.integers(0, len(names), n).astype(np.int64)
    # times around minute, hour and day boundaries, some equal, out of order
    ts = 1_764_892_800.0 - 90.0 + rng.integers(0, 4 * 3600 * 1000, n) / 1000.0
    ts[::50] = 1_764_892_800.0
    val = np.round(rng.standard_normal(n) * 50, int(seed) + 1)
    val[::97] = 0.1 + 0.2
    cols = batch.Columns([], names, key, ts, val, np.arange(n, dtype=np.int64), {})
    sids = rng.permutation(np.arange(1, len(names) + 1)).tolist()
    sink = StoreSink(open_store(tmp_path / "s.sqlite"), 1)
    try:
        got_chunks, got_rollups = sink._samples(cols, sids)
        want_chunks, want_rollups = sink._samples_python(cols, sids)
    finally:
        sink.close()
    assert [c[:4] for c in got_chunks] == [c[:4] for c in want_chunks]
    for g, w in zip(got_chunks, want_chunks):
        assert json.loads(g[4]) == json.loads(w[4]) and json.loads(g[5]) == json.loads(w[5])
    assert [r[:6] for r in got_rollups] == [r[:6] for r in want_rollups]
    for g, w in zip(got_rollups, want_rollups):
        assert g[6] == pytest.approx(w[6], rel=1e-12, abs=1e-9)
        assert g[7] == pytest.approx(w[7], rel=1e-12, abs=1e-9)
    assert sum(r[3] for r in got_rollups) == len(WINDOWS) * n
    assert sum(c[3] for c in got_chunks) == n and CHUNK_SECONDS == 3600.0
    with pytest.raises(ValueError):
        storebatch.series_rows(np.asarray(sids[:3], dtype=np.int64), np.sort(key), np.sort(ts), val,
                               CHUNK_SECONDS, WINDOWS)


def test_the_heap_is_kept_and_given_back():
    """keep_heap's settings are taken by glibc's malloc (AddressSanitizer's, under
    `./dev sanitize`, takes none: False); trim_heap runs (whatever it frees)."""
    assert storebatch.keep_heap() is (not os.environ.get("GW_SANITIZE"))
    big = [bytes(1 << 20) for _ in range(8)]
    del big
    assert storebatch.trim_heap() in (0, 1)
