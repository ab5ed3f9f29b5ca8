"""The telemetry record schema (gw/ingest.py): normalisation, every rule's
error code, batches, and hypothesis properties: any valid record round-trips
through the published form; any record breaking exactly one rule gets that
rule's code; the fast path (typed msgspec decoder + Python checks) and the
slow path (`diagnose`, the rules in plain Python) always agree."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gw import ingest
from gw.ingest import (MAX_METRICS, MAX_SEQ, MAX_TAG_VALUE, MAX_TAGS, TS_MAX, Ingest, Ingestor, Invalid, diagnose,
                       loads_generic)
from gw.stats import N_COUNTERS, Counter

UTC = timezone.utc
ING = Ingestor(max_batch=50)
FIELDS = ("device_id", "ts", "seq", "metrics", "tags", "payload")
HUGE = "\x00HUGE\x00"     # placeholder replaced by an out-of-range number literal in the JSON text

settings.register_profile("gw", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gw")


def refused(body: bytes, device_id: str = "dev_1") -> Invalid:
    with pytest.raises(Invalid) as info:
        ING.record(device_id, body)
    return info.value


def published(body: bytes, device_id: str = "dev_1") -> dict:
    return json.loads(ING.encode(ING.record(device_id, body)))


# --- examples --------------------------------------------------------------------------

def test_record_with_every_field_normalised():
    body = b'{"ts":"2025-09-23T11:18:41Z","seq":42,"metrics":{"temp_c":21.5},"tags":{"site":"AAL"},' \
           b'"payload":{"raw":"ok"}}'
    out = ING.encode(ING.record("device_1", body))
    assert out == (b'{"device_id":"device_1","ts":"2025-09-23T11:18:41Z","seq":42,"metrics":{"temp_c":21.5},'
                   b'"tags":{"site":"AAL"},"payload":{"raw":"ok"}}')


def test_minimal_record_gets_server_time_and_every_key():
    before = datetime.now(UTC)
    out = published(b'{"metrics":{"temp_c":21}}')
    after = datetime.now(UTC)
    assert list(out) == list(FIELDS)
    assert out["seq"] is None and out["tags"] == {} and out["payload"] is None
    assert out["metrics"] == {"temp_c": 21.0}
    assert out["ts"].endswith("Z")
    assert before <= datetime.fromisoformat(out["ts"]) <= after


def test_explicit_now_is_used():
    now = datetime(2030, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)
    assert ING.encode(ING.record("d", b'{"metrics":{}}', now)).startswith(
        b'{"device_id":"d","ts":"2030-01-02T03:04:05.006000Z"')


@pytest.mark.parametrize("ts, expected", [
    ('"2025-09-23T11:18:41Z"', "2025-09-23T11:18:41Z"),
    ('"2025-09-23T13:18:41+02:00"', "2025-09-23T11:18:41Z"),
    ('"2025-09-23T11:18:41.5-00:30"', "2025-09-23T11:48:41.500000Z"),
    ('"2025-09-23t11:18:41.123456789z"', "2025-09-23T11:18:41.123457Z"),
    ("1758626321", "2025-09-23T11:18:41Z"),
    ("1758626321.25", "2025-09-23T11:18:41.250000Z"),
    ("0", "1970-01-01T00:00:00Z"),
    ("null", None),
])
def test_ts_forms(ts, expected):
    out = published(b'{"metrics":{},"ts":%s}' % ts.encode())
    if expected is not None:
        assert out["ts"] == expected


@pytest.mark.parametrize("ts", ['"2025-09-23T11:18:41"', '"2025-09-23"', '"yesterday"', '"2025-02-30T00:00:00Z"',
                                '"0001-01-01T00:00:00+01:00"', '"9999-12-31T23:59:59-01:00"', "-1",
                                str(TS_MAX), "1758626321000", "1e999", "true", "[1]", "{}"])
def test_ts_refused(ts):
    assert refused(b'{"metrics":{},"ts":%s}' % ts.encode()).code == "invalid_ts"


@pytest.mark.parametrize("body, code", [
    (b"", "invalid_json"),
    (b"{", "invalid_json"),
    (b'{"metrics":{"a":NaN}}', "invalid_json"),
    (b'{"metrics":{"a":Infinity}}', "invalid_json"),
    (b'{"metrics":{"a":1}} x', "invalid_json"),
    (b'\xff', "invalid_json"),
    (b"[]", "invalid_body"),
    (b'"x"', "invalid_body"),
    (b"null", "invalid_body"),
    (b'{"metric":{"a":1}}', "unknown_field"),
    (b'{"metrics":{},"extra":1}', "unknown_field"),
    (b'{}', "missing_metrics"),
    (b'{"tags":{}}', "missing_metrics"),
    (b'{"metrics":null}', "invalid_metrics"),
    (b'{"metrics":[1]}', "invalid_metrics"),
    (b'{"metrics":{"A":1}}', "invalid_metric_key"),
    (b'{"metrics":{"1a":1}}', "invalid_metric_key"),
    (b'{"metrics":{"a\\n":1}}', "invalid_metric_key"),
    (b'{"metrics":{"a-b":1}}', "invalid_metric_key"),
    (b'{"metrics":{"' + b"a" * 33 + b'":1}}', "invalid_metric_key"),
    (b'{"metrics":{"a":"1"}}', "invalid_metric"),
    (b'{"metrics":{"a":true}}', "invalid_metric"),
    (b'{"metrics":{"a":null}}', "invalid_metric"),
    (b'{"metrics":{"a":1e999}}', "non_finite_metric"),
    (b'{"metrics":{"a":-1e400}}', "non_finite_metric"),
    (b'{"metrics":{"a":' + b"9" * 400 + b'}}', "non_finite_metric"),
    (b'{"metrics":{},"tags":"x"}', "invalid_tags"),
    (b'{"metrics":{},"tags":{"Site":"x"}}', "invalid_tag_key"),
    (b'{"metrics":{},"tags":{"site":1}}', "invalid_tag"),
    (b'{"metrics":{},"tags":{"site":"' + b"x" * 65 + b'"}}', "invalid_tag"),
    (b'{"metrics":{},"tags":{"site":"a\\u0000b"}}', "invalid_tag"),        # U+0000: no store keeps it
    (b'{"metrics":{},"payload":"\\u0000"}', "invalid_payload"),
    (b'{"metrics":{},"payload":{"k\\u0000":1}}', "invalid_payload"),
    (b'{"metrics":{},"payload":["\\\\\\u0000"]}', "invalid_payload"),     # \\ then \u0000
    (b'{"metrics":{},"seq":-1}', "invalid_seq"),
    (b'{"metrics":{},"seq":1.5}', "invalid_seq"),
    (b'{"metrics":{},"seq":"1"}', "invalid_seq"),
    (b'{"metrics":{},"seq":9223372036854775808}', "invalid_seq"),
    (b'{"metrics":{},"device_id":"other"}', "device_id_mismatch"),
    (b'{"metrics":{},"device_id":"bad id"}', "invalid_device_id"),
])
def test_rule_codes(body, code):
    err = refused(body)
    assert (err.status, err.code) == (400, code)
    assert err.message


def test_limits_exactly():
    metrics = {f"m{i}": i for i in range(MAX_METRICS)}
    tags = {f"t{i}": "x" * MAX_TAG_VALUE for i in range(MAX_TAGS)}
    ok = {"metrics": metrics, "tags": tags, "seq": MAX_SEQ, "ts": TS_MAX - 1}
    assert published(json.dumps(ok).encode())["seq"] == MAX_SEQ
    assert refused(json.dumps({**ok, "metrics": {**metrics, "m99": 1}}).encode()).code == "too_many_metrics"
    assert refused(json.dumps({**ok, "tags": {**tags, "t99": ""}}).encode()).code == "too_many_tags"
    # a tag value is measured in characters, not bytes
    assert published(json.dumps({"metrics": {}, "tags": {"t": "é" * MAX_TAG_VALUE}}).encode())["tags"]["t"] \
        == "é" * MAX_TAG_VALUE


def test_body_device_id_equal_to_path_is_accepted():
    assert published(b'{"device_id":"dev_1","metrics":{}}')["device_id"] == "dev_1"


def test_an_escaped_backslash_before_u0000_is_not_a_nul():
    tele = ING.record("d1", b'{"metrics":{},"payload":"x\\\\u0000"}')
    assert bytes(tele.payload) == b'"x\\\\u0000"'


def test_payload_is_passed_through_verbatim():
    out = ING.encode(ING.record("d", b'{"metrics":{},"payload":{"b": [1, 2.50, "\\u00e9"], "a": 1e999}}'))
    assert out.endswith(b'"payload":{"b": [1, 2.50, "\\u00e9"], "a": 1e999}}')


def test_duplicate_keys_last_wins():
    assert published(b'{"metrics":{"a":1,"a":2}}')["metrics"] == {"a": 2.0}


def test_key_cache_does_not_leak_bad_keys():
    for _ in range(3):
        assert published(b'{"metrics":{"good_key":1}}')["metrics"] == {"good_key": 1.0}
        assert refused(b'{"metrics":{"good_key\\n":1}}').code == "invalid_metric_key"


# --- batches -----------------------------------------------------------------------------

def test_batch_accepts_all():
    body = json.dumps([{"device_id": f"d{i}", "seq": i, "metrics": {"x": i}} for i in range(3)]).encode()
    out = ING.batch(body)
    assert [t.device_id for t in out] == ["d0", "d1", "d2"]
    assert len({t.ts for t in out}) == 1      # one server time for the whole batch


def test_batch_lists_every_invalid_record():
    body = json.dumps([
        {"device_id": "ok", "metrics": {}},
        {"metrics": {}},
        {"device_id": "x y", "metrics": {}},
        {"device_id": "ok", "metrics": {"B": 1}},
        "not an object",
        {"device_id": "ok", "metrics": {}, "ts": "nope"},
    ]).encode()
    with pytest.raises(Invalid) as info:
        ING.batch(body)
    err = info.value
    assert (err.status, err.code, err.records) == (400, "invalid_batch", 6)
    assert [(e.index, e.code) for e in err.errors] == [
        (1, "missing_device_id"), (2, "invalid_device_id"), (3, "invalid_metric_key"), (4, "invalid_body"),
        (5, "invalid_ts")]


def test_batch_python_checks_list_every_record_too():
    # records the typed decoder accepts but the Python checks refuse
    body = json.dumps([{"device_id": "a\n", "metrics": {}}, {"device_id": "ok", "metrics": {}},
                       {"device_id": "ok", "metrics": {"Bad": 1}}]).encode()
    with pytest.raises(Invalid) as info:
        ING.batch(body)
    assert [(e.index, e.code) for e in info.value.errors] == [(0, "invalid_device_id"), (2, "invalid_metric_key")]


@pytest.mark.parametrize("body, status, code", [
    (b"[]", 400, "empty_batch"),
    (b"{}", 400, "invalid_body"),
    (b'{"device_id":"a","metrics":{}}', 400, "invalid_body"),
    (b"[", 400, "invalid_json"),
    (b"[" + b",".join([b'{"device_id":"a","metrics":{}}'] * 51) + b"]", 413, "batch_too_large"),
])
def test_batch_refusals(body, status, code):
    with pytest.raises(Invalid) as info:
        ING.batch(body)
    assert (info.value.status, info.value.code) == (status, code)


def test_batch_at_the_limit():
    assert len(ING.batch(b"[" + b",".join([b'{"device_id":"a","metrics":{}}'] * 50) + b"]")) == 50


# --- MQTT ----------------------------------------------------------------------------

def test_mqtt_validation():
    """Ingest.mqtt: the device id is the topic's level after {telemetry_topic}/
    (the worker cuts it off); the normalised reading, or None, counted."""
    counters = np.zeros(N_COUNTERS, np.uint64)
    one = Ingest(50, counters)
    out = one.mqtt(b"dev1", b'{"seq":1,"metrics":{"t":1}}')
    assert json.loads(out)["device_id"] == "dev1"
    assert one.mqtt(b"dev1", out) == out                     # the normalised form is a fixed point
    for device in (b"", b"a/b", b"a b", b"x" * 65):
        assert one.mqtt(device, b'{"metrics":{}}') is None, device
    assert one.mqtt(b"dev1", b'{"metrics":{"t":1e999}}') is None
    assert one.mqtt(b"dev1", b"") is None
    assert one.mqtt(b"dev1", b'{"device_id":"dev2","metrics":{}}') is None
    assert counters[Counter.TELEMETRY_MQTT_ACCEPTED] == 2 and counters[Counter.TELEMETRY_MQTT_REJECTED] == 7


def test_json_lines_data_as_a_reading():
    counters = np.zeros(N_COUNTERS, np.uint64)
    one = Ingest(50, counters)
    doc = json.loads(one.json_data(b"dev1", {"metrics": {"t": 2}, "seq": 3}, 1758626321.0))
    assert (doc["device_id"], doc["metrics"], doc["seq"], doc["ts"]) == ("dev1", {"t": 2.0}, 3, "2025-09-23T11:18:41Z")
    doc = json.loads(one.json_data(b"dev1", "hello", None))
    assert doc["metrics"] == {} and doc["payload"] == "hello"
    assert one.json_data(b"not a device", "hello", None) is None
    assert one.json_data(b"dev1", {"metrics": {"T": 1}}, None) is None
    assert counters[Counter.INGEST_RECORDS_ACCEPTED] == 2 and counters[Counter.INGEST_RECORDS_REJECTED] == 2


# --- hypothesis --------------------------------------------------------------------------

keys = st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True)
device_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                    st.integers(min_value=-(10**300), max_value=10**300))
# Text a valid reading may hold: any but U+0000, which ingest refuses (no store keeps it).
stored_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
tag_values = st.text(stored_chars, max_size=MAX_TAG_VALUE)
aware = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                     timezones=st.builds(lambda m: timezone(timedelta(minutes=m)),
                                         st.integers(min_value=-23 * 60, max_value=23 * 60)))
timestamps = st.one_of(
    st.none(),
    aware.map(lambda d: d.isoformat()),
    aware.map(lambda d: d.astimezone(UTC).isoformat().replace("+00:00", "Z")),
    st.floats(min_value=0, max_value=TS_MAX, exclude_max=True),
    st.integers(min_value=0, max_value=TS_MAX - 1),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(stored_chars, max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(stored_chars, max_size=8), children,
                                                                      max_size=4),
    max_leaves=12)


@st.composite
def records(draw, with_device_id: bool = False):
    rec = {"metrics": draw(st.dictionaries(keys, numbers, max_size=MAX_METRICS))}
    if draw(st.booleans()):
        rec["tags"] = draw(st.none() | st.dictionaries(keys, tag_values, max_size=MAX_TAGS))
    if draw(st.booleans()):
        rec["ts"] = draw(timestamps)
    if draw(st.booleans()):
        rec["seq"] = draw(st.none() | st.integers(min_value=0, max_value=MAX_SEQ))
    if draw(st.booleans()):
        rec["payload"] = draw(json_values)
    if with_device_id:
        rec["device_id"] = draw(device_ids)
    order = draw(st.permutations(list(rec)))
    return {k: rec[k] for k in order}


def expected_ts(ts) -> datetime | None:
    if ts is None:
        return None
    if isinstance(ts, str):
        return msgspec.convert(ts, ingest._TS_TYPE).astimezone(UTC)
    return datetime.fromtimestamp(float(ts), UTC)


def check_published(rec: dict, device_id: str, out: bytes) -> None:
    pub = json.loads(out)
    assert list(pub) == list(FIELDS)
    assert pub["device_id"] == device_id
    assert pub["metrics"] == {k: float(v) for k, v in rec["metrics"].items()}
    assert all(isinstance(v, float) for v in pub["metrics"].values())
    assert pub["tags"] == (rec.get("tags") or {})
    assert pub["seq"] == rec.get("seq")
    assert pub["payload"] == rec.get("payload")
    assert pub["ts"].endswith("Z")
    want = expected_ts(rec.get("ts"))
    if want is not None:
        assert datetime.fromisoformat(pub["ts"]) == want


def ts_in_utc_range(rec: dict) -> bool:
    ts = rec.get("ts")
    if not isinstance(ts, str):
        return True
    try:
        expected_ts(ts)
    except (OverflowError, ValueError):
        return False
    return True


@given(rec=records(), device_id=device_ids, body_id=st.booleans())
def test_valid_records_round_trip(rec, device_id, body_id):
    assume(ts_in_utc_range(rec))
    if body_id:
        rec["device_id"] = device_id
    body = json.dumps(rec).encode()
    out = ING.encode(ING.record(device_id, body))
    check_published(rec, device_id, out)
    diagnose(json.loads(body), batch=False, device_id=device_id)     # the slow path agrees
    # the published form is itself a valid record, normalised to itself
    assert ING.encode(ING.record(device_id, out)) == out


@given(recs=st.lists(records(with_device_id=True), min_size=1, max_size=8))
def test_valid_batches_round_trip(recs):
    assume(all(ts_in_utc_range(r) for r in recs))
    out = ING.batch(json.dumps(recs).encode())
    assert len(out) == len(recs)
    for rec, tele in zip(recs, out):
        check_published(rec, rec["device_id"], ING.encode(tele))


def _not_key(s: str) -> bool:
    return ingest._KEY_RE.fullmatch(s) is None


bad_keys = st.one_of(st.text(max_size=40).filter(_not_key),
                     keys.map(lambda k: k + "\n"), keys.map(str.upper).filter(_not_key),
                     st.just("a" * 33), st.from_regex(r"[0-9_][a-z0-9_]{0,5}", fullmatch=True))
non_numbers = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
huge_literals = st.sampled_from(["1e999", "-1e999", "1e309", "-2e400", "9" * 400, "-" + "1" * 320])


def _bad_ts_string(s: str) -> bool:
    try:
        expected_ts(s)
    except (msgspec.ValidationError, OverflowError, ValueError):
        return True
    return False


bad_ts = st.one_of(
    st.text(max_size=30).filter(_bad_ts_string),
    st.datetimes().map(lambda d: d.isoformat()),                       # no time zone
    st.sampled_from(["0001-01-01T00:00:00+00:01", "2025-13-01T00:00:00Z", "2025-09-23T11:18:41 Z"]),
    st.floats(max_value=0, exclude_max=True, allow_nan=False, allow_infinity=False),
    st.floats(min_value=TS_MAX, allow_nan=False, allow_infinity=False),
    st.integers(max_value=-1), st.integers(min_value=TS_MAX),
    st.booleans(), st.lists(st.integers(), max_size=2), st.dictionaries(keys, st.integers(), max_size=2),
)
bad_seq = st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_SEQ + 1),
                    st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.text(max_size=5),
                    st.lists(st.integers(), max_size=2))


SINGLE_RULES = ("unknown_field", "missing_metrics", "invalid_metrics", "too_many_metrics", "invalid_metric_key",
                "invalid_metric", "non_finite_metric", "invalid_tags", "too_many_tags", "invalid_tag_key",
                "invalid_tag", "invalid_ts", "invalid_seq", "invalid_device_id", "device_id_mismatch")
BATCH_RULES = tuple(r for r in SINGLE_RULES if r != "device_id_mismatch") + ("missing_device_id",)


@st.composite
def broken(draw, code: str, batch: bool = False):
    """(record dict, JSON text): a valid record with exactly the rule `code` broken."""
    rec = draw(records(with_device_id=batch))
    rec.pop("device_id", None)
    if batch:
        rec = {"device_id": draw(device_ids), **rec}
    metrics = rec["metrics"]
    huge = None
    if code == "unknown_field":
        rec[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS))] = draw(json_values)
    elif code == "missing_metrics":
        del rec["metrics"]
    elif code == "invalid_metrics":
        rec["metrics"] = draw(non_numbers.filter(lambda v: not isinstance(v, dict)))
    elif code == "too_many_metrics":
        extra = draw(st.lists(keys, min_size=MAX_METRICS + 1, max_size=MAX_METRICS + 8, unique=True))
        rec["metrics"] = {k: 1 for k in extra}
    elif code in ("invalid_metric_key", "invalid_metric", "non_finite_metric"):
        if len(metrics) >= MAX_METRICS:
            metrics.pop(next(iter(metrics)))
        if code == "invalid_metric_key":
            metrics[draw(bad_keys)] = draw(numbers)
        else:
            key = draw(keys)
            if code == "invalid_metric":
                metrics[key] = draw(non_numbers)
            else:
                metrics[key] = HUGE
                huge = draw(huge_literals)
    elif code == "invalid_tags":
        rec["tags"] = draw(st.one_of(st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                                     numbers))
    elif code == "too_many_tags":
        extra = draw(st.lists(keys, min_size=MAX_TAGS + 1, max_size=MAX_TAGS + 5, unique=True))
        rec["tags"] = {k: "v" for k in extra}
    elif code in ("invalid_tag_key", "invalid_tag"):
        tags = rec.get("tags") or {}
        if len(tags) >= MAX_TAGS:
            tags.pop(next(iter(tags)))
        if code == "invalid_tag_key":
            tags[draw(bad_keys)] = draw(tag_values)
        else:
            tags[draw(keys)] = draw(st.one_of(st.text(min_size=MAX_TAG_VALUE + 1, max_size=MAX_TAG_VALUE + 20),
                                              numbers, st.booleans(), st.lists(st.text(max_size=2), max_size=2)))
        rec["tags"] = tags
    elif code == "invalid_ts":
        rec["ts"] = draw(bad_ts)
    elif code == "invalid_seq":
        rec["seq"] = draw(bad_seq)
    elif code == "invalid_device_id":
        rec["device_id"] = draw(st.one_of(
            st.text(max_size=70).filter(lambda s: ingest._DEVICE_RE.fullmatch(s) is None),
            device_ids.map(lambda d: d + "\n"), st.integers(), st.lists(st.integers(), max_size=1),
            st.just("x" * 65)))
    elif code == "missing_device_id":
        if draw(st.booleans()):
            del rec["device_id"]
        else:
            rec["device_id"] = None
    elif code == "device_id_mismatch":
        rec["device_id"] = draw(device_ids.filter(lambda d: d != "path_dev"))
    if not ts_in_utc_range(rec) and code != "invalid_ts":
        rec["ts"] = None
    text = json.dumps(rec)
    if huge is not None:
        text = text.replace(json.dumps(HUGE), huge)
    return rec, text


@pytest.mark.parametrize("code", SINGLE_RULES)
@settings(max_examples=40)
@given(data=st.data())
def test_one_broken_rule_gets_its_code(code, data):
    rec, text = data.draw(broken(code))
    with pytest.raises(Invalid) as info:
        ING.record("path_dev", text.encode())
    assert (info.value.status, info.value.code) == (400, code), info.value.message
    with pytest.raises(Invalid) as slow:                      # the slow path names the same rule
        diagnose(loads_generic(text.encode()), batch=False, device_id="path_dev")
    assert slow.value.code == code


batch_items = st.tuples(st.booleans(), st.sampled_from(BATCH_RULES).flatmap(
    lambda code: broken(code, batch=True).map(lambda case: (case[1], code))), records(with_device_id=True))


@given(cases=st.lists(batch_items, min_size=1, max_size=6))
def test_batch_reports_every_broken_record(cases):
    items, want = [], []
    for index, (is_bad, (text, code), good) in enumerate(cases):
        if is_bad:
            items.append(text)
            want.append((index, code))
        else:
            if not ts_in_utc_range(good):
                good["ts"] = None
            items.append(json.dumps(good))
    body = ("[" + ",".join(items) + "]").encode()
    if not want:
        assert len(ING.batch(body)) == len(items)
        return
    with pytest.raises(Invalid) as info:
        ING.batch(body)
    assert info.value.code == "invalid_batch"
    assert [(e.index, e.code) for e in info.value.errors] == want


mixed_values = st.one_of(json_values, numbers, huge_literals.map(lambda lit: (HUGE, lit)), bad_ts, bad_seq,
                         timestamps)


def with_literals(obj: dict) -> bytes:
    """JSON of obj where each (HUGE, literal) value is written as that number literal."""
    literals = {}

    def place(value):
        if isinstance(value, tuple):
            marker = f"{HUGE}{len(literals)}"
            literals[json.dumps(marker)] = value[1]
            return marker
        return value

    text = json.dumps({k: place(v) for k, v in obj.items()})
    for marker, literal in literals.items():
        text = text.replace(marker, literal)
    return text.encode()


@given(obj=st.dictionaries(st.sampled_from(FIELDS + ("metric", "x")), mixed_values, max_size=6),
       metrics=st.dictionaries(st.one_of(keys, bad_keys), st.one_of(numbers, non_numbers), max_size=34),
       tags=st.dictionaries(st.one_of(keys, bad_keys), st.one_of(tag_values, non_numbers), max_size=18))
@settings(max_examples=300)
def test_fast_and_slow_paths_agree(obj, metrics, tags):
    """On arbitrary near-miss records both paths accept, or both refuse with the same code."""
    if "metrics" in obj and isinstance(obj["metrics"], dict):
        obj["metrics"] = metrics
    if "tags" in obj and isinstance(obj["tags"], dict):
        obj["tags"] = tags
    body = with_literals(obj)
    try:
        fast = ING.encode(ING.record("path_dev", body))
    except Invalid as err:
        assert err.code != "invalid_record", err.message
        with pytest.raises(Invalid) as slow:
            diagnose(loads_generic(body), batch=False, device_id="path_dev")
        assert slow.value.code == err.code
    else:
        diagnose(loads_generic(body), batch=False, device_id="path_dev")
        assert json.loads(fast)["device_id"] == "path_dev"


def test_finite_helper():
    assert ingest._finite(10**308) and not ingest._finite(10**309) and not ingest._finite(math.inf)
