"""Telemetry records (the ingest schema): msgspec types, validation, normalisation, batches.

A record is `{ts?, seq?, metrics, tags?, payload?}`, posted to
`/v1/ingest/{device_id}` (gw/http_api.py) or published over MQTT on
`{telemetry_topic}/{device_id}`; a batch (`POST /v1/ingest`) is a JSON array of
records that each carry their `device_id`. Every accepted record becomes one
normalised JSON message `{"device_id","ts","seq","metrics","tags","payload"}`
(`Telemetry`), always with all six keys, published on `{telemetry_topic}/{device_id}`.

Rules (each broken rule has its own error code, see CODES):

- `device_id`: `^[A-Za-z0-9_-]{1,64}$`. In a single record it may appear in the
  body too (so the published form can be posted or published again), and must
  then equal the one of the path or topic.
- `metrics` (required): an object of at most 32 keys matching
  `^[a-z][a-z0-9_]{0,31}$`, each value a finite number (JSON integer or float;
  published as a double, `21` becomes `21.0`). An empty object is allowed.
- `tags` (optional): an object of at most 16 keys (same pattern), each value a
  string of at most 64 characters (code points). Published as `{}` when absent.
- `ts` (optional): an RFC 3339 date-time with a time zone (`Z` or `+hh:mm`;
  fractions of a second are kept to the microsecond), or a number of Unix
  seconds in [0, 253402300800) (so a timestamp in milliseconds by mistake is
  refused rather than stored in the year 55000). Published as RFC 3339 in UTC
  with `Z`, with six fraction digits only when the microseconds are not zero.
  The server fills in its own time when `ts` is absent or null.
- `seq` (optional): an integer in [0, 2**63-1], the idempotency key together
  with the device id.
- `payload` (optional): any JSON value, passed through byte for byte (not
  re-encoded); `null` when absent.
- Any other field is refused (`unknown_field`): a typo such as `metric` would
  otherwise lose the data silently. `null` counts as absent for the optional
  fields.

Speed: the typed msgspec decoder checks everything its `Meta` constraints can
express (in C). For batches and MQTT readings, gw_ext/telemetry_json.pyx then
checks the rest (key and device id patterns, U+0000) and writes each record's
published JSON in C, byte for byte what msgspec writes for the `Telemetry`
(0.8 us a reading with the decoding, against 1.8-2.6 us through the Python
objects); a record off its common path sends the request through the Python
path here (`Ingestor.normalise_batch`, `normalise_record`: the reference),
which checks the key patterns through a cache of keys already seen valid and
normalises `ts`. Only when the typed decoder refuses a body does `diagnose`
re-read it generically and apply every rule in Python to name the one broken,
so the error path is slower but the accepting path stays under a microsecond.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Callable

import msgspec
from msgspec import Meta, Raw, Struct, field

from gw_ext.telemetry_json import normalise_batch, normalise_record

UTC = timezone.utc

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
KEY_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
MAX_METRICS = 32
MAX_TAGS = 16
MAX_TAG_VALUE = 64           # characters (code points)
MAX_SEQ = 2**63 - 1
TS_MAX = 253402300800        # 10000-01-01T00:00:00Z in Unix seconds (exclusive)
DBL_MAX = 1.7976931348623157e308

# `re.fullmatch`, not the patterns above with `search`: `$` also matches before
# a final newline, so "temp\n" would pass.
_DEVICE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DEVICE_RE_B = re.compile(rb"[A-Za-z0-9_-]{1,64}")
_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")

# Every error code a record or a batch can get (400 unless said otherwise).
CODES = {
    "invalid_json": "the body is not valid JSON (NaN and Infinity are not JSON)",
    "invalid_body": "the body is valid JSON of the wrong kind (an object for a record, an array for a batch)",
    "unknown_field": "a field the schema does not have (typo?)",
    "invalid_device_id": f"device_id does not match {DEVICE_ID_PATTERN}",
    "missing_device_id": "a batch record without device_id",
    "device_id_mismatch": "the body's device_id differs from the path's (or the topic's)",
    "missing_metrics": "no metrics field",
    "invalid_metrics": "metrics is not a JSON object",
    "too_many_metrics": f"more than {MAX_METRICS} metrics",
    "invalid_metric_key": f"a metric key does not match {KEY_PATTERN}",
    "invalid_metric": "a metric value is not a number",
    "non_finite_metric": "a metric value is out of the range of a double (such as 1e999)",
    "invalid_tags": "tags is not a JSON object",
    "too_many_tags": f"more than {MAX_TAGS} tags",
    "invalid_tag_key": f"a tag key does not match {KEY_PATTERN}",
    "invalid_tag": f"a tag value is not a string of at most {MAX_TAG_VALUE} characters",
    "invalid_ts": "ts is neither an RFC 3339 date-time with a time zone nor Unix seconds in range",
    "invalid_seq": f"seq is not an integer in [0, {MAX_SEQ}]",
    "invalid_record": "the record breaks the schema (fallback; should not happen)",
    "invalid_batch": "a batch with at least one invalid record (see errors; nothing was published)",
    "empty_batch": "a batch without records",
    "batch_too_large": "more records than max_batch (413)",
}


class Invalid(Exception):
    """A refused record or batch: HTTP status, error code, message, per-record errors."""

    __slots__ = ("status", "code", "message", "errors", "records")

    def __init__(self, code: str, message: str, status: int = 400, errors: list | None = None,
                 records: int = 1):
        super().__init__(code, message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.records = records      # how many records the refused request held (1 when unknown)


# --- types ---------------------------------------------------------------------------

DeviceId = Annotated[str, Meta(min_length=1, max_length=64,
                               description="device identifier",
                               extra_json_schema={"pattern": DEVICE_ID_PATTERN},
                               examples=["device_1"])]
_KEY_SCHEMA = {"propertyNames": {"pattern": KEY_PATTERN, "maxLength": 32}}
MetricValue = Annotated[float, Meta(ge=-DBL_MAX, le=DBL_MAX, description="a finite number")]
Metrics = Annotated[dict[str, MetricValue], Meta(
    max_length=MAX_METRICS, extra_json_schema=_KEY_SCHEMA,
    description=f"numeric readings: at most {MAX_METRICS} keys matching {KEY_PATTERN}, "
                "finite numbers (published as doubles)",
    examples=[{"temp_c": 21.5}])]
TagValue = Annotated[str, Meta(max_length=MAX_TAG_VALUE)]
Tags = Annotated[dict[str, TagValue], Meta(
    max_length=MAX_TAGS, extra_json_schema=_KEY_SCHEMA,
    description=f"labels: at most {MAX_TAGS} keys matching {KEY_PATTERN}, "
                f"string values of at most {MAX_TAG_VALUE} characters",
    examples=[{"site": "AAL"}])]
TsString = Annotated[datetime, Meta(tz=True, description="RFC 3339 date-time with a time zone")]
TsNumber = Annotated[float, Meta(ge=0, lt=TS_MAX, description="Unix seconds")]
Ts = Annotated[TsString | TsNumber | None, Meta(
    description="when the reading was taken: RFC 3339 with a time zone, or Unix seconds; "
                "the server's time when absent",
    examples=["2025-09-23T11:18:41Z"])]
SeqValue = Annotated[int, Meta(ge=0, le=MAX_SEQ)]
Seq = Annotated[SeqValue | None, Meta(description="sequence number: (device_id, seq) is the idempotency key",
                                      examples=[42])]
Payload = Annotated[Raw, Meta(description="any JSON value, passed through unchanged",
                              examples=[{"raw": "ok"}])]


def _null() -> Raw:
    return Raw(b"null")


class Record(Struct, forbid_unknown_fields=True, kw_only=True):
    """One telemetry record: the body of POST /v1/ingest/{device_id}, and the
    payload of an MQTT PUBLISH on {telemetry_topic}/{device_id}."""

    device_id: Annotated[DeviceId | None, Meta(
        description="optional; when present it must equal the path's (or topic's) device id")] = None
    ts: Ts = None
    seq: Seq = None
    metrics: Metrics
    tags: Tags | None = None
    payload: Payload = field(default_factory=_null)


class BatchRecord(Struct, forbid_unknown_fields=True, kw_only=True):
    """One record of a batch (POST /v1/ingest): a record with its device_id."""

    device_id: DeviceId
    ts: Ts = None
    seq: Seq = None
    metrics: Metrics
    tags: Tags | None = None
    payload: Payload = field(default_factory=_null)


class Telemetry(Struct, forbid_unknown_fields=True):
    """The normalised record, published as JSON on {telemetry_topic}/{device_id}."""

    device_id: DeviceId
    ts: Annotated[datetime, Meta(tz=True, description="RFC 3339 in UTC (Z)", examples=["2025-09-23T11:18:41Z"])]
    seq: int | None
    metrics: dict[str, float]
    tags: dict[str, str]
    payload: Payload


class Error(Struct, forbid_unknown_fields=True):
    """Every error answer: a machine-readable code and a message for people."""

    code: Annotated[str, Meta(examples=["too_many_metrics"])]
    message: Annotated[str, Meta(examples=[f"metrics has 40 keys, at most {MAX_METRICS} allowed"])]


class ItemError(Struct, forbid_unknown_fields=True):
    index: Annotated[int, Meta(ge=0, description="position of the record in the batch")]
    code: str
    message: str


class BatchError(Struct, forbid_unknown_fields=True):
    """A refused batch: every invalid record with its index; nothing was published."""

    code: Annotated[str, Meta(examples=["invalid_batch"])]
    message: str
    errors: list[ItemError]


class IngestAck(Struct, forbid_unknown_fields=True):
    """Answer to a single record (202, or 200 with ack mode sink)."""

    accepted: Annotated[int, Meta(description="records acknowledged (always 1 here)")]
    duplicates: Annotated[int, Meta(description="1 when (device_id, seq) was seen within the "
                                                "idempotency window: acknowledged, not published again")]
    device_id: str
    ts: Annotated[datetime, Meta(tz=True, description="the normalised timestamp, RFC 3339 in UTC "
                                                      "(the server's time when the record had none)")]
    seq: int | None


class BatchAck(Struct, forbid_unknown_fields=True):
    """Answer to a batch (202, or 200 with ack mode sink)."""

    accepted: Annotated[int, Meta(description="records acknowledged (all of the batch)")]
    duplicates: Annotated[int, Meta(description="of which already seen within the idempotency "
                                                "window: acknowledged, not published again")]


# --- checks ------------------------------------------------------------------------

_GOOD_KEYS: set[str] = set()      # keys already seen to match KEY_PATTERN
_GOOD_KEYS_MAX = 8192


def _show(value: Any, limit: int = 64) -> str:
    """A value for an error message: JSON, cut short."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit] + "..."
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit + 8 else text[:limit] + "..."


def _check_keys(mapping: dict, what: str) -> None:
    good = _GOOD_KEYS
    for key in mapping:
        if key not in good:
            if _KEY_RE.fullmatch(key) is None:
                raise Invalid(f"invalid_{what}_key", f"{what} key {_show(key)} does not match {KEY_PATTERN}")
            if len(good) < _GOOD_KEYS_MAX:
                good.add(key)


# U+0000 in a tag value or in the payload: JSON can carry it, PostgreSQL's text and
# jsonb cannot, so a store there could never take the reading (its batch would be
# retried forever, holding every other reading behind it). Refused at ingest, for
# either store, so where a reading is kept does not change what is accepted.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def _check_no_nul(tags: dict, payload: Raw) -> None:
    for key, value in tags.items():
        if "\x00" in value:
            raise Invalid("invalid_tag", f"tag {key} holds the character U+0000, which the store cannot keep")
    if len(payload) < 6:
        return                      # no room for \u0000 (most readings: "null")
    raw = bytes(payload)
    if b"u0000" in raw and _NUL_ESCAPE.search(raw) is not None:
        raise Invalid("invalid_payload", "the payload holds the character U+0000 (\\u0000), which the "
                                         "store cannot keep")


def _checked_tags(rec: Record | BatchRecord) -> dict:
    """A decoded record's tags ({} when absent), its tag keys and its tags and
    payload checked for what the typed decoder cannot check; raises Invalid."""
    tags = rec.tags
    if tags is None:
        tags = {}
    elif tags:
        _check_keys(tags, "tag")
    _check_no_nul(tags, rec.payload)
    return tags


def check_device_id(device_id: Any) -> str:
    if not isinstance(device_id, str) or _DEVICE_RE.fullmatch(device_id) is None:
        raise Invalid("invalid_device_id", f"device_id {_show(device_id)} does not match {DEVICE_ID_PATTERN}")
    return device_id


def check_path_device_id(raw: bytes) -> str:
    """The device id of a path or topic (bytes, not percent-decoded)."""
    if _DEVICE_RE_B.fullmatch(raw) is None:
        raise Invalid("invalid_device_id",
                      f"device_id {_show(raw.decode('utf-8', 'replace'))} does not match {DEVICE_ID_PATTERN}")
    return raw.decode("ascii")


def _ts_from_number(value: float) -> datetime:
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, ValueError, OSError):
        raise Invalid("invalid_ts", f"ts {_show(value)} is out of range") from None


def _ts_to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise Invalid("invalid_ts", f"ts {value.isoformat()} is out of range in UTC") from None


def normalise_ts(ts: datetime | float | None, now: datetime | None) -> datetime:
    """The typed decoder's ts (already range-checked) as an aware UTC datetime."""
    if ts is None:
        return now if now is not None else datetime.now(UTC)
    if type(ts) is float:
        return _ts_from_number(ts)
    if ts.tzinfo is not UTC:
        return _ts_to_utc(ts)
    return ts


_TS_TYPE = Annotated[datetime, Meta(tz=True)]
_RECORD_FIELDS = frozenset(("device_id", "ts", "seq", "metrics", "tags", "payload"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    if isinstance(value, int):
        return -DBL_MAX <= value <= DBL_MAX
    return math.isfinite(value)


def diagnose(obj: Any, *, batch: bool, device_id: str | None = None) -> None:
    """Every rule, in Python, on a generically decoded record: raises Invalid
    naming the first rule broken (in a fixed order), returns None if it is valid.
    The error path's oracle, and the tests' reference for the typed decoder."""
    if not isinstance(obj, dict):
        raise Invalid("invalid_body", f"a record must be a JSON object, got {_json_kind(obj)}")
    for key in obj:
        if key not in _RECORD_FIELDS:
            raise Invalid("unknown_field", f"unknown field {_show(key)}; the fields are "
                                           "device_id, ts, seq, metrics, tags, payload")
    if batch:
        if obj.get("device_id") is None:
            raise Invalid("missing_device_id", "every record of a batch needs a device_id")
        check_device_id(obj["device_id"])
    elif obj.get("device_id") is not None:
        check_device_id(obj["device_id"])
        if device_id is not None and obj["device_id"] != device_id:
            raise Invalid("device_id_mismatch",
                          f"device_id {_show(obj['device_id'])} differs from {_show(device_id)}")
    if "metrics" not in obj:
        raise Invalid("missing_metrics", "the metrics field is required")
    _diagnose_keyed(obj["metrics"], "metrics", "metric", MAX_METRICS, _diagnose_metric)
    if obj.get("tags") is not None:
        _diagnose_keyed(obj["tags"], "tags", "tag", MAX_TAGS, _diagnose_tag)
    ts = obj.get("ts")
    if ts is not None:
        if isinstance(ts, str):
            try:
                _ts_to_utc(msgspec.convert(ts, _TS_TYPE))
            except msgspec.ValidationError:
                raise Invalid("invalid_ts", f"ts {_show(ts)} is not an RFC 3339 date-time with a "
                                            "time zone (such as 2025-09-23T11:18:41Z)") from None
        elif _is_number(ts):
            if not (_finite(ts) and 0 <= ts < TS_MAX):
                raise Invalid("invalid_ts", f"ts {_show(ts)} is out of range: Unix seconds in [0, {TS_MAX})")
            _ts_from_number(float(ts))
        else:
            raise Invalid("invalid_ts", f"ts must be an RFC 3339 string or a number of Unix seconds, "
                                        f"got {_json_kind(ts)}")
    seq = obj.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ):
        raise Invalid("invalid_seq", f"seq must be an integer in [0, {MAX_SEQ}], got {_show(seq)}")


def _diagnose_keyed(value: Any, field: str, entry: str, most: int,
                    diagnose_entry: Callable[[str, Any], None]) -> None:
    """The rules metrics and tags share: a JSON object of at most `most` keys,
    each matching KEY_PATTERN, then each entry's own rule, key by key (the
    first rule broken, in that order). Their codes: invalid_{field},
    too_many_{field}, invalid_{entry}_key."""
    if not isinstance(value, dict):
        raise Invalid(f"invalid_{field}", f"{field} must be a JSON object, got {_json_kind(value)}")
    if len(value) > most:
        raise Invalid(f"too_many_{field}", f"{field} has {len(value)} keys, at most {most} allowed")
    for key, item in value.items():
        if _KEY_RE.fullmatch(key) is None:
            raise Invalid(f"invalid_{entry}_key", f"{entry} key {_show(key)} does not match {KEY_PATTERN}")
        diagnose_entry(key, item)


def _diagnose_metric(key: str, value: Any) -> None:
    if not _is_number(value):
        raise Invalid("invalid_metric", f"metric {key} must be a number, got {_json_kind(value)}")
    if not _finite(value):
        raise Invalid("non_finite_metric", f"metric {key} is not a finite number")


def _diagnose_tag(key: str, value: Any) -> None:
    if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
        raise Invalid("invalid_tag", f"tag {key} must be a string of at most {MAX_TAG_VALUE} "
                                     f"characters, got {_show(value)}")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def loads_generic(body: bytes) -> Any:
    """A body msgspec's typed decoder refused, decoded without a schema.
    msgspec refuses numbers beyond a double's range (1e999) even untyped; the
    standard library's parser then reads them as inf so the rule can be named."""
    try:
        return msgspec.json.decode(body)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        raise Invalid("invalid_json", f"invalid JSON: {exc}") from None
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise Invalid("invalid_json", f"invalid JSON: {exc}") from None


# --- the ingestor ----------------------------------------------------------------------

class Ingestor:
    """Decodes, validates and normalises records; no I/O. One per worker."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self._record = msgspec.json.Decoder(Record)
        self._batch = msgspec.json.Decoder(Annotated[list[BatchRecord], Meta(max_length=max_batch)])
        self._encoder = msgspec.json.Encoder()
        self.encode = self._encoder.encode

    # single records (HTTP path or MQTT topic gives the device id)

    def record(self, device_id: str, body: bytes, now: datetime | None = None) -> Telemetry:
        """One record for `device_id` (already checked): the Telemetry to publish, or raises Invalid."""
        return self.normalise_record(device_id, self.decode_record(body, device_id), now)

    def decode_record(self, body: bytes, device_id: str | None = None) -> Record:
        """One record, typed (not yet checked past the types); raises Invalid."""
        try:
            return self._record.decode(body)
        except msgspec.ValidationError as exc:
            self._explain(body, exc, device_id)
        except msgspec.DecodeError as exc:
            raise Invalid("invalid_json", f"invalid JSON: {exc}") from None

    def normalise_record(self, device_id: str, rec: Record, now: datetime | None = None) -> Telemetry:
        """decode_record's record checked and normalised (the reference for
        gw_ext/telemetry_json.pyx); raises Invalid."""
        if rec.device_id is not None and rec.device_id != device_id:
            check_device_id(rec.device_id)
            raise Invalid("device_id_mismatch", f"device_id {_show(rec.device_id)} differs from {_show(device_id)}")
        metrics = rec.metrics
        _check_keys(metrics, "metric")
        return Telemetry(device_id, normalise_ts(rec.ts, now), rec.seq, metrics, _checked_tags(rec), rec.payload)

    def _explain(self, body: bytes, exc: Exception, device_id: str | None):
        obj = loads_generic(body)
        diagnose(obj, batch=False, device_id=device_id)
        raise Invalid("invalid_record", f"invalid record: {exc}")

    # batches

    def batch(self, body: bytes, now: datetime | None = None) -> list[Telemetry]:
        """A whole batch, all or nothing: the Telemetry list, or raises Invalid (400 or 413)."""
        return self.normalise_batch(self.decode_batch(body), now)

    def decode_batch(self, body: bytes) -> list[BatchRecord]:
        """A batch's records, typed (not yet checked past the types); raises Invalid."""
        try:
            recs = self._batch.decode(body)
        except msgspec.ValidationError as exc:
            self._explain_batch(body, exc)
        except msgspec.DecodeError as exc:
            raise Invalid("invalid_json", f"invalid JSON: {exc}") from None
        if not recs:
            raise Invalid("empty_batch", "a batch needs at least one record")
        return recs

    def normalise_batch(self, recs: list[BatchRecord], now: datetime | None = None) -> list[Telemetry]:
        """decode_batch's records checked and normalised (the reference for
        gw_ext/telemetry_json.pyx); raises Invalid naming every invalid record."""
        out = []
        errors = None
        if now is None:
            now = datetime.now(UTC)
        for index, rec in enumerate(recs):
            try:
                device_id = check_device_id(rec.device_id)
                _check_keys(rec.metrics, "metric")
                out.append(Telemetry(device_id, normalise_ts(rec.ts, now), rec.seq, rec.metrics,
                                     _checked_tags(rec), rec.payload))
            except Invalid as err:
                if errors is None:
                    errors = []
                errors.append(ItemError(index, err.code, err.message))
        if errors:
            raise self._batch_error(errors, len(recs))
        return out

    def ts_json(self, ts: datetime | float) -> bytes | None:
        """A record's ts, normalised, as its quoted JSON text; None when out of range."""
        try:
            return self.encode(normalise_ts(ts, None))
        except Invalid:
            return None

    def _batch_error(self, errors: list, total: int) -> Invalid:
        return Invalid("invalid_batch", f"{len(errors)} of {total} records are invalid; "
                                        "nothing was accepted", errors=errors, records=total)

    def _explain_batch(self, body: bytes, exc: Exception):
        items = loads_generic(body)
        if not isinstance(items, list):
            raise Invalid("invalid_body", f"a batch must be a JSON array of records, got {_json_kind(items)}")
        if len(items) > self.max_batch:
            raise Invalid("batch_too_large", f"the batch has {len(items)} records, at most "
                                             f"{self.max_batch} allowed; split it", status=413,
                          records=len(items))
        errors = []
        for index, item in enumerate(items):
            try:
                diagnose(item, batch=True)
            except Invalid as err:
                errors.append(ItemError(index, err.code, err.message))
        if not errors:
            errors.append(ItemError(0, "invalid_record", f"invalid record: {exc}"))
        raise self._batch_error(errors, len(items))


# --- one worker's validation, whatever the transport -------------------------------------

class Accepted:
    """The readings of one HTTP request that passed the schema, normalised, for
    the worker to take (gw_ext/worker/ingest.pyx: idempotency, the log,
    routing); the HTTP app then words the answer from it (`single`: the record
    of a single-record request, whose answer echoes its ts and seq; None for a
    batch)."""

    __slots__ = ("records", "single")

    def __init__(self, records: list, single: Telemetry | None):
        self.records = records      # [(device_id bytes, seq or None, normalised JSON bytes)]
        self.single = single


_shared: list = []        # [Ingestor]: the one shared_ingestor made last


def shared_ingestor(max_batch: int) -> Ingestor:
    """An Ingestor for max_batch, made once per process and value (it holds
    no state of its own): the master makes the workers' before forking them
    (gw.worker.preload), so a worker's start takes it from shared pages instead
    of building its decoders again (msgspec and typing looking up the types
    run in the worker's own pages)."""
    if not _shared or _shared[0].max_batch != max_batch:
        _shared[:] = [Ingestor(max_batch)]
    return _shared[0]


class Ingest:
    """The Python half of taking a reading, one per worker: the schema
    (msgspec, `Ingestor`) and the normalised JSON, for every transport. It
    never logs, deduplicates or routes: the worker does, with what it returns
    (gw_ext/worker/ingest.pyx). MQTT and JSON-lines readings are counted here
    (accepted or rejected by the schema); HTTP requests by the HTTP app, which
    answers them."""

    def __init__(self, max_batch: int, counters):
        from gw.stats import Counter

        self.ingestor = shared_ingestor(max_batch)
        self._encode = self.ingestor.encode
        self._c = counters
        self._mqtt_accepted = int(Counter.TELEMETRY_MQTT_ACCEPTED)
        self._mqtt_rejected = int(Counter.TELEMETRY_MQTT_REJECTED)
        self._json_accepted = int(Counter.INGEST_RECORDS_ACCEPTED)
        self._json_rejected = int(Counter.INGEST_RECORDS_REJECTED)

    @property
    def max_batch(self) -> int:
        return self.ingestor.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        if value != self.ingestor.max_batch:
            self.ingestor = shared_ingestor(value)
            self._encode = self.ingestor.encode

    def one(self, device_id: str, raw_id: bytes, body: bytes) -> Accepted:
        """POST /v1/ingest/{device_id}; raises Invalid."""
        tele = self.ingestor.record(device_id, body)
        return Accepted([(raw_id, tele.seq, self._encode(tele))], tele)

    def batch(self, body: bytes) -> Accepted:
        """POST /v1/ingest, all or nothing; raises Invalid. The records are
        normalised in C (gw_ext/telemetry_json.pyx); a batch off its common path
        (an invalid record among them) takes the Python path, which words the errors."""
        ingestor = self.ingestor
        encode = self._encode
        recs = ingestor.decode_batch(body)
        now = datetime.now(UTC)
        records = normalise_batch(recs, now, ingestor.ts_json, encode)
        if records is None:
            records = [(tele.device_id.encode(), tele.seq, encode(tele))
                       for tele in ingestor.normalise_batch(recs, now)]
        return Accepted(records, None)

    def mqtt(self, device_id: bytes, payload: bytes) -> bytes | None:
        """A PUBLISH on {telemetry_topic}/{device_id}: the normalised reading, or
        None if it breaks the schema (counted either way)."""
        ingestor = self.ingestor
        try:
            device = check_path_device_id(device_id)
            rec = ingestor.decode_record(payload, device)
            now = datetime.now(UTC)
            reading = normalise_record(device_id, rec, now, ingestor.ts_json, self._encode)
            if reading is None:         # off the common path: the Python path decides
                reading = self._encode(ingestor.normalise_record(device, rec, now))
        except Invalid:
            self._c[self._mqtt_rejected] += 1
            return None
        self._c[self._mqtt_accepted] += 1
        return reading

    def json_data(self, client_id: bytes, payload: Any, timestamp: float | None) -> bytes | None:
        """A JSON-lines Data message as a reading of device client_id: its
        payload's record fields when it is an object with `metrics`, else
        `{"metrics": {}, "payload": <payload>}`; `ts` from its timestamp. The
        normalised reading, or None when the client id is not a device id or
        the record breaks the schema (counted either way)."""
        if isinstance(payload, dict) and "metrics" in payload:
            record = dict(payload)
        else:
            record = {"metrics": {}, "payload": payload}
        if timestamp is not None and "ts" not in record:
            record["ts"] = timestamp
        try:
            tele = self.ingestor.record(check_path_device_id(client_id), self._encode(record))
        except Invalid:
            self._c[self._json_rejected] += 1
            return None
        self._c[self._json_accepted] += 1
        return self._encode(tele)
