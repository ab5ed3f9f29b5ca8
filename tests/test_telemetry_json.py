"""gw_ext/telemetry_json.pyx: decoded records normalised to their published
JSON in C, held to the Python path (gw/ingest.py's Ingestor and msgspec's
encoder) byte for byte, and to its errors: the compiled path answers the
reference's answer or None (then the reference runs), never a third one."""

from __future__ import annotations

import json
import struct
from datetime import datetime, timezone

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gw.ingest import Ingest, Ingestor, Invalid
from gw.stats import N_COUNTERS
from gw_ext.telemetry_json import f64_text, normalise_batch, normalise_record, utc_text
from test_ingest_schema import BATCH_RULES, SINGLE_RULES, broken, device_ids, records, ts_in_utc_range

UTC = timezone.utc
ING = Ingestor(1000)
ENCODE = msgspec.json.encode


def reference_batch(recs, now):
    return [(t.device_id.encode(), t.seq, ENCODE(t)) for t in ING.normalise_batch(recs, now)]


def fast_batch(recs, now):
    return normalise_batch(recs, now, ING.ts_json, ENCODE)


def eligible(rec: dict) -> bool:
    """What the compiled path must take itself: anything valid whose payload
    does not hold the text u0000 (the Python path decides whether that is an escape)."""
    return b"u0000" not in json.dumps(rec.get("payload")).encode()


# --- numbers and times ---------------------------------------------------------------------

EDGES = [0.0, -0.0, 1e-5, 1e-4, 9.999e-5, 0.00001234, 1e-7, 1e15, 1e16, 9999999999999998.0, 1125899906842623.5,
         1125899906842624.5, 2.0**53, 2.0**53 + 2, 1e300, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
         0.1 + 0.2, 20.1, 100.0, 123456.789, 0.05, 1e21, 1e22, 12345678.9, 1e-9, 123456789.123456789]


@pytest.mark.parametrize("v", EDGES + [-v for v in EDGES])
def test_number_text_is_msgspecs(v):
    assert f64_text(v) == ENCODE(v)


@given(st.floats(allow_nan=False, allow_infinity=False))
@settings(max_examples=3000)
def test_any_double_is_written_as_msgspec_writes_it(v):
    assert f64_text(v) == ENCODE(v)


@given(st.integers(min_value=0, max_value=2**64 - 1))
@settings(max_examples=3000)
def test_any_bit_pattern_is_written_as_msgspec_writes_it(bits):
    v = struct.unpack("<d", bits.to_bytes(8, "little"))[0]
    assume(v == v and abs(v) != float("inf"))
    assert f64_text(v) == ENCODE(v)


@given(st.integers(min_value=-10**9, max_value=10**9), st.integers(min_value=0, max_value=9))
@settings(max_examples=2000)
def test_sensor_decimals_are_written_as_msgspec_writes_them(units, places):
    v = units / 10**places
    assert f64_text(v) == ENCODE(v)


def test_not_finite_is_null():
    assert f64_text(float("inf")) == f64_text(float("nan")) == b"null"


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)))
def test_utc_time_is_written_as_msgspec_writes_it(dt):
    assert utc_text(dt) == ENCODE(dt)


def test_now_must_be_aware_utc():
    with pytest.raises(ValueError):
        utc_text(datetime(2025, 1, 1))
    with pytest.raises(ValueError):
        fast_batch(ING.decode_batch(b'[{"device_id":"d","metrics":{}}]'), datetime(2025, 1, 1))


# --- valid records: the same bytes, and taken by the compiled path ------------------------------

@given(recs=st.lists(records(with_device_id=True), min_size=1, max_size=8))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_valid_batches_are_the_references_bytes(recs):
    assume(all(ts_in_utc_range(r) for r in recs))
    decoded = ING.decode_batch(json.dumps(recs).encode())
    now = datetime.now(UTC)
    fast = fast_batch(decoded, now)
    if all(eligible(r) for r in recs):
        assert fast is not None
    if fast is not None:
        assert fast == reference_batch(decoded, now)


@given(rec=records(), device_id=device_ids)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_valid_records_are_the_references_bytes(rec, device_id):
    assume(ts_in_utc_range(rec))
    decoded = ING.decode_record(json.dumps(rec).encode(), device_id)
    now = datetime.now(UTC)
    fast = normalise_record(device_id.encode(), decoded, now, ING.ts_json, ENCODE)
    if eligible(rec):
        assert fast is not None
    if fast is not None:
        assert fast == ENCODE(ING.normalise_record(device_id, decoded, now))


def test_the_common_reading():
    body = (b'[{"device_id":"dev-00042","seq":7,"metrics":{"temp_c":20.1,"humidity_pct":45},"tags":{"site":"AAL"}},'
            b'{"device_id":"d","ts":"2025-09-23T11:18:41.5+02:00","metrics":{"x":1e-7},"tags":{"q":"a\\"b\\n"},'
            b'"payload":{"raw":[1, 2.50]}},{"device_id":"d","ts":1758626321.25,"metrics":{}}]')
    now = datetime(2026, 12, 4, 16, 0, 0, 123, tzinfo=UTC)
    fast = fast_batch(ING.decode_batch(body), now)
    assert fast == reference_batch(ING.decode_batch(body), now)
    assert fast[0] == (b"dev-00042", 7, b'{"device_id":"dev-00042","ts":"2026-12-04T16:00:00.000123Z","seq":7,'
                                        b'"metrics":{"temp_c":20.1,"humidity_pct":45.0},"tags":{"site":"AAL"},'
                                        b'"payload":null}')
    assert b'"ts":"2025-09-23T09:18:41.500000Z"' in fast[1][2]
    assert b'"tags":{"q":"a\\"b\\n"}' in fast[1][2]
    assert b'"payload":{"raw":[1, 2.50]}}' in fast[1][2]          # passed through byte for byte
    assert b'"ts":"2025-09-23T11:18:41.250000Z"' in fast[2][2]


# --- off the common path: None, and Ingest answers as the reference does ---------------------------

@pytest.mark.parametrize("payload", [b'"\\u0000"', b'"\\\\u0000"', b'["u0000"]'])
def test_a_payload_with_u0000_goes_to_the_python_path(payload):
    body = b'[{"device_id":"d","metrics":{},"payload":' + payload + b"}]"
    decoded = ING.decode_batch(body)
    assert fast_batch(decoded, datetime.now(UTC)) is None
    ingest = Ingest(1000, [0] * N_COUNTERS)
    try:
        want = [(t.device_id.encode(), t.seq) for t in ING.batch(body)]
    except Invalid as err:
        with pytest.raises(Invalid) as info:
            ingest.batch(body)
        assert info.value.code == err.code
    else:
        assert [(d, s) for d, s, _ in ingest.batch(body).records] == want


def test_a_body_device_id_goes_to_the_python_path():
    decoded = ING.decode_record(b'{"device_id":"d","metrics":{}}', "d")
    assert normalise_record(b"d", decoded, datetime.now(UTC), ING.ts_json, ENCODE) is None


@given(data=st.data(), code=st.sampled_from(BATCH_RULES))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_a_batch_with_a_broken_record_is_refused_as_the_reference_refuses_it(data, code):
    good = data.draw(st.lists(records(with_device_id=True), max_size=3))
    assume(all(ts_in_utc_range(r) for r in good))
    bad_rec, text = data.draw(broken(code, batch=True))
    at = data.draw(st.integers(min_value=0, max_value=len(good)))
    parts = [json.dumps(r) for r in good]
    parts.insert(at, text)
    body = ("[" + ",".join(parts) + "]").encode()
    with pytest.raises(Invalid) as ref:
        ING.batch(body)
    with pytest.raises(Invalid) as got:
        Ingest(1000, [0] * N_COUNTERS).batch(body)
    assert (got.value.code, got.value.status, got.value.message) == (ref.value.code, ref.value.status,
                                                                     ref.value.message)
    assert [(e.index, e.code, e.message) for e in got.value.errors or []] == \
           [(e.index, e.code, e.message) for e in ref.value.errors or []]


@given(data=st.data(), code=st.sampled_from(SINGLE_RULES))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_a_broken_mqtt_reading_is_refused_and_counted(data, code):
    _, text = data.draw(broken(code))
    counters = [0] * N_COUNTERS
    ingest = Ingest(1000, counters)
    assert ingest.mqtt(b"dev_1", text.encode()) is None
    assert sum(counters) == 1


@given(rec=records(), device_id=device_ids)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_mqtt_readings_are_the_references(rec, device_id):
    assume(ts_in_utc_range(rec))
    payload = json.dumps(rec).encode()
    got = Ingest(1000, [0] * N_COUNTERS).mqtt(device_id.encode(), payload)
    want = ENCODE(ING.record(device_id, payload))
    if rec.get("ts") is None:            # the server's time: equal but for it
        got, want = json.loads(got), json.loads(want)
        got.pop("ts")
        want.pop("ts")
    assert got == want
