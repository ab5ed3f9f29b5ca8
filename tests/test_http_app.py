"""gw/http_api.py: routes, status codes, headers, ingest with idempotency and
batches, counters, draining, MQTT telemetry. What Python answers alone is
called directly; an ingest request whose records pass the schema goes to a real
worker (tests/ingest_worker.py), which takes them on the one ingest path and
answers over a real socket."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gw.http_api import HttpApp, http_status_index, is_json_content_type
from gw.ingest import Accepted, Ingest
from gw.stats import Counter
from ingest_worker import IngestWorker, cfg

DEDUP_FULL = int(Counter.DEDUP_FULL)
INGEST_RECORDS_ACCEPTED = int(Counter.INGEST_RECORDS_ACCEPTED)
INGEST_RECORDS_DUPLICATE = int(Counter.INGEST_RECORDS_DUPLICATE)
INGEST_RECORDS_PENDING = int(Counter.INGEST_RECORDS_PENDING)
INGEST_RECORDS_REJECTED = int(Counter.INGEST_RECORDS_REJECTED)
INGEST_REQUESTS = int(Counter.INGEST_REQUESTS)
TELEMETRY_MQTT_ACCEPTED = int(Counter.TELEMETRY_MQTT_ACCEPTED)
TELEMETRY_MQTT_REJECTED = int(Counter.TELEMETRY_MQTT_REJECTED)

JSON = b"application/json"
BODY = b'{"ts":"2025-09-23T11:18:41Z","seq":42,"metrics":{"temp_c":21.5},"tags":{"site":"AAL"},' \
       b'"payload":{"raw":"ok"}}'


def full_dedup():
    """A small real table filled up: every probe window is live."""
    from gw_ext.dedup import DedupTable

    dedup = DedupTable(1024, 60.0)
    results = [dedup.seen(b"filler", i) for i in range(20_000)]
    assert results.count(0) <= 1024 and results[-200:] == [-1] * 200
    return dedup


_OPEN: list = []


@pytest.fixture(autouse=True)
def close_apps():
    """Every App a test made is closed after it (its worker, log and sockets)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


class App:
    """The HTTP app of a real worker (IngestWorker); its metrics and health
    answer are given by the test, what it routes recorded by a subscriber."""

    def __init__(self, config=None, dedup=None, health=None, **wal):
        self.health_answer = (True, {"workers": {"ok": True, "alive": 2, "expected": 2}})
        self.worker = IngestWorker(config, dedup=dedup, health=health or (lambda: self.health_answer),
                                   render_metrics=lambda: b"# TYPE x counter\nx 1\n", **wal)
        _OPEN.append(self)
        self.app = self.worker.app
        self.counters = self.worker.counters
        self.dedup = self.worker.dedup

    @property
    def published(self) -> list:
        return self.worker.published()

    def __call__(self, method, target, body=b"", content_type=JSON, listener="http"):
        answer = self.app.handle(method, target, content_type, body)
        if isinstance(answer, Accepted):
            # Readings that passed the schema: the worker takes them and answers.
            answer = self.worker.request(method, target, body, content_type, listener)
        status, ctype, rbody, extra = answer
        assert isinstance(status, int) and isinstance(ctype, bytes)
        assert isinstance(rbody, bytes) and isinstance(extra, bytes)
        assert extra == b"" or (extra.endswith(b"\r\n") and b": " in extra)
        return status, ctype, rbody, extra

    def post(self, target, body=BODY, content_type=JSON, listener="http"):
        return self(b"POST", target, body, content_type, listener)

    def count(self, index) -> int:
        return int(self.counters[index])

    def requests(self, status) -> int:
        return self.count(INGEST_REQUESTS + http_status_index(status))

    def close(self) -> None:
        self.worker.close()


@pytest.fixture
def app():
    return App()


def error_of(answer) -> str:
    status, ctype, body, _ = answer
    assert ctype == JSON
    doc = json.loads(body)
    assert set(doc) >= {"code", "message"} and doc["message"]
    return doc["code"]


# --- single ingest --------------------------------------------------------------------------

def test_ingest_accepted_and_published(app):
    status, ctype, body, extra = app.post(b"/v1/ingest/device_1")
    assert (status, ctype, extra) == (202, JSON, b"")
    assert json.loads(body) == {"accepted": 1, "duplicates": 0, "device_id": "device_1",
                                "ts": "2025-09-23T11:18:41Z", "seq": 42}
    assert app.published == [(b"telemetry/device_1",
                              b'{"device_id":"device_1","ts":"2025-09-23T11:18:41Z","seq":42,'
                              b'"metrics":{"temp_c":21.5},"tags":{"site":"AAL"},"payload":{"raw":"ok"}}', 1, False)]
    assert app.dedup.seen(b"device_1", 42) == 1            # recorded in the table: a repeat is a duplicate
    assert app.requests(202) == 1 and app.count(INGEST_RECORDS_ACCEPTED) == 1


def test_server_fills_ts(app):
    status, _, body, _ = app.post(b"/v1/ingest/d", b'{"metrics":{"x":1}}')
    assert status == 202
    ack = json.loads(body)
    assert ack["seq"] is None and ack["ts"].endswith("Z")
    assert json.loads(app.published[0][1])["ts"] == ack["ts"]
    assert app.dedup.live() == 0          # no seq: no idempotency record


def test_ack_sink_answers_200():
    a = App(cfg(ack="sink"))
    assert a.post(b"/v1/ingest/d")[0] == 200
    assert a.post(b"/v1/ingest", b'[{"device_id":"d","metrics":{}}]')[0] == 200
    assert a.requests(200) == 2


def test_duplicate_acknowledged_not_published(app):
    first = app.post(b"/v1/ingest/dev")
    second = app.post(b"/v1/ingest/dev")
    assert first[0] == second[0] == 202
    assert json.loads(second[2])["duplicates"] == 1
    assert len(app.published) == 1
    assert app.count(INGEST_RECORDS_ACCEPTED) == 1 and app.count(INGEST_RECORDS_DUPLICATE) == 1
    # another device, same seq: not a duplicate
    assert json.loads(app.post(b"/v1/ingest/other")[2])["duplicates"] == 0
    assert len(app.published) == 2


def test_dedup_table_full_accepts_and_counts():
    a = App(dedup=full_dedup())
    assert a.post(b"/v1/ingest/d")[0] == 202
    assert len(a.published) == 1 and a.count(DEDUP_FULL) == 1 and a.count(INGEST_RECORDS_ACCEPTED) == 1


@pytest.mark.parametrize("body, code", [
    (b"not json", "invalid_json"),
    (b"", "invalid_json"),
    (b'{"metrics":{"a":NaN}}', "invalid_json"),
    (b'{"metrics":{"temp_c":1e999}}', "non_finite_metric"),
    (b'{"metric":{"temp_c":1}}', "unknown_field"),
    (b'{"seq":1}', "missing_metrics"),
    (b'{"metrics":{"' + b",".join(b'"m%d":1' % i for i in range(33))[1:] + b'}}', "too_many_metrics"),
    (b'{"metrics":{"Temp":1}}', "invalid_metric_key"),
    (b'{"metrics":{},"tags":{"site":"' + b"x" * 65 + b'"}}', "invalid_tag"),
    (b'{"metrics":{},"ts":"2025-09-23T11:18:41"}', "invalid_ts"),
    (b"[]", "invalid_body"),
])
def test_ingest_refused(app, body, code):
    answer = app.post(b"/v1/ingest/d", body)
    assert answer[0] == 400 and error_of(answer) == code
    assert app.published == [] and app.dedup.live() == 0
    assert app.requests(400) == 1 and app.count(INGEST_RECORDS_REJECTED) == 1


@pytest.mark.parametrize("target", [b"/v1/ingest/", b"/v1/ingest/a%20b", b"/v1/ingest/a/b", b"/v1/ingest/a.b",
                                    b"/v1/ingest/" + b"x" * 65, b"/v1/ingest/\xc3\xa9"])
def test_invalid_device_id(app, target):
    answer = app.post(target)
    assert answer[0] == 400 and error_of(answer) == "invalid_device_id"


def test_device_id_limits(app):
    assert app.post(b"/v1/ingest/" + b"x" * 64)[0] == 202
    assert app.post(b"/v1/ingest/A-z_0")[0] == 202


@pytest.mark.parametrize("ctype, ok", [
    (b"application/json", True),
    (b"application/json; charset=utf-8", True),
    (b"application/json;charset=UTF-8", True),
    (b'Application/JSON; Charset="utf-8"', True),
    (b"application/json ; charset=utf8", True),
    (b"application/json; foo=bar", True),
    (None, False),
    (b"", False),
    (b"text/plain", False),
    (b"application/json; charset=latin-1", False),
    (b"application/jsonx", False),
    (b"application/x-www-form-urlencoded", False),
    (b"application/json; garbage", False),
])
def test_content_type(app, ctype, ok):
    assert is_json_content_type(ctype) is ok
    single = app.post(b"/v1/ingest/d", content_type=ctype)
    batch = app.post(b"/v1/ingest", b'[{"device_id":"d","metrics":{}}]', content_type=ctype)
    if ok:
        assert single[0] == 202 and batch[0] == 202
    else:
        assert single[0] == batch[0] == 415
        assert error_of(single) == error_of(batch) == "unsupported_media_type"
        assert app.published == []


# --- batches -------------------------------------------------------------------------------

def test_batch_accepted(app):
    body = json.dumps([{"device_id": "a", "seq": 1, "metrics": {"x": 1}},
                       {"device_id": "b", "metrics": {"y": 2}, "ts": 1758626321},
                       {"device_id": "a", "seq": 1, "metrics": {"x": 1}}]).encode()   # repeat within the batch
    status, ctype, rbody, _ = app.post(b"/v1/ingest", body)
    assert status == 202 and json.loads(rbody) == {"accepted": 3, "duplicates": 1}
    assert [t for t, _, _, _ in app.published] == [b"telemetry/a", b"telemetry/b"]
    assert json.loads(app.published[1][1])["ts"] == "2025-09-23T11:18:41Z"
    assert app.count(INGEST_RECORDS_ACCEPTED) == 2 and app.count(INGEST_RECORDS_DUPLICATE) == 1
    # the whole batch again: every record with a seq is a duplicate
    assert json.loads(app.post(b"/v1/ingest", body)[2]) == {"accepted": 3, "duplicates": 2}


def test_batch_all_or_nothing(app):
    body = json.dumps([{"device_id": "a", "metrics": {"x": 1}}, {"device_id": "b", "metrics": {"X": 1}},
                       {"metrics": {}}]).encode()
    status, _, rbody, _ = app.post(b"/v1/ingest", body)
    doc = json.loads(rbody)
    assert status == 400 and doc["code"] == "invalid_batch" and doc["message"]
    assert [(e["index"], e["code"]) for e in doc["errors"]] == [(1, "invalid_metric_key"), (2, "missing_device_id")]
    assert app.published == [] and app.dedup.live() == 0
    assert app.count(INGEST_RECORDS_REJECTED) == 3


def test_batch_limit():
    a = App(cfg(max_batch=3))
    one = b'{"device_id":"a","metrics":{}}'
    assert a.post(b"/v1/ingest", b"[" + b",".join([one] * 3) + b"]")[0] == 202
    answer = a.post(b"/v1/ingest", b"[" + b",".join([one] * 4) + b"]")
    assert answer[0] == 413 and error_of(answer) == "batch_too_large"
    assert a.requests(413) == 1 and a.count(INGEST_RECORDS_REJECTED) == 4


@pytest.mark.parametrize("body, code", [(b"[]", "empty_batch"), (b"{}", "invalid_body"), (b"[", "invalid_json"),
                                        (BODY, "invalid_body")])
def test_batch_refused(app, body, code):
    answer = app.post(b"/v1/ingest", body)
    assert answer[0] == 400 and error_of(answer) == code


# --- draining, shedding, failures ---------------------------------------------------------------

def test_draining(app):
    app.app.draining = True
    for target, body in ((b"/v1/ingest/d", BODY), (b"/v1/ingest", b'[{"device_id":"d","metrics":{}}]')):
        answer = app.post(target, body)
        assert answer[0] == 503 and answer[3] == b"Retry-After: 1\r\n" and error_of(answer) == "draining"
    ready = app(b"GET", b"/readyz")
    assert ready[0] == 503 and b"Retry-After: 1\r\n" in ready[3] and error_of(ready) == "draining"
    health = app(b"GET", b"/healthz")
    assert health[0] == 200 and json.loads(health[2])["draining"] is True
    assert app.published == [] and app.requests(503) == 2
    app.app.draining = False
    assert app.post(b"/v1/ingest/d")[0] == 202 and app(b"GET", b"/readyz")[0] == 200


def test_shedding(app):
    app.app.shedding = True
    answer = app.post(b"/v1/ingest/d")
    assert answer[0] == 503 and answer[3] == b"Retry-After: 1\r\n" and error_of(answer) == "overloaded"
    assert app(b"GET", b"/readyz")[0] == 200


def test_ingest_failure_is_a_500_json(app, caplog):
    def boom(*args):
        raise RuntimeError("validation exploded")
    app.app.ingest.one = boom
    answer = app.post(b"/v1/ingest/d")
    assert answer[0] == 500 and error_of(answer) == "internal_error"
    assert app.requests(500) == 1


# --- health, ready, metrics ----------------------------------------------------------------------

def test_healthz(app):
    status, ctype, body, extra = app(b"GET", b"/healthz")
    doc = json.loads(body)
    assert (status, ctype) == (200, JSON) and b"Cache-Control: no-store" in extra
    assert doc == {"status": "ok", "worker": 3, "draining": False, "components": app.health_answer[1]}
    app.health_answer = (False, {"data_dir": {"ok": False, "path": Path("/x")}})   # not JSON-native: str()
    status, _, body, _ = app(b"GET", b"/healthz")
    assert status == 503
    assert json.loads(body)["components"] == {"data_dir": {"ok": False, "path": "/x"}}
    assert json.loads(body)["status"] == "unavailable"


def test_healthz_check_failing():
    def broken():
        raise OSError("disk on fire")
    a = App(health=broken)
    status, _, body, _ = a(b"GET", b"/healthz")
    assert status == 503 and "error" in json.loads(body)["components"]


def test_readyz(app):
    status, ctype, body, extra = app(b"GET", b"/readyz")
    assert (status, ctype) == (200, JSON) and json.loads(body) == {"status": "ready", "worker": 3}
    assert b"Cache-Control: no-store" in extra


def test_metrics(app):
    assert app(b"GET", b"/metrics") == (200, b"text/plain; version=0.0.4; charset=utf-8",
                                        b"# TYPE x counter\nx 1\n", b"")
    assert app(b"HEAD", b"/metrics")[0] == 200


# --- routing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [b"/x", b"/v1", b"/v1/ingestx", b"/v2/ingest/d", b"/healthz/", b"/metricsx",
                                    b"/docs/x.js", b"/dashboard/x.js", b"/v1/stats", b"*", b"\xff\xfe"])
def test_not_found(app, target):
    answer = app(b"GET", target)
    assert answer[0] == 404 and error_of(answer) == "not_found"


@pytest.mark.parametrize("method, target, allow", [
    (b"GET", b"/v1/ingest/d", b"Allow: POST\r\n"),
    (b"PUT", b"/v1/ingest", b"Allow: POST\r\n"),
    (b"HEAD", b"/v1/ingest/d", b"Allow: POST\r\n"),
    (b"POST", b"/healthz", b"Allow: GET, HEAD\r\n"),
    (b"DELETE", b"/readyz", b"Allow: GET, HEAD\r\n"),
    (b"POST", b"/metrics", b"Allow: GET, HEAD\r\n"),
    (b"OPTIONS", b"/docs", b"Allow: GET, HEAD\r\n"),
    (b"POST", b"/docs/openapi.json", b"Allow: GET, HEAD\r\n"),
])
def test_method_not_allowed(app, method, target, allow):
    answer = app(method, target)
    assert answer[0] == 405 and answer[3] == allow and error_of(answer) == "method_not_allowed"


def test_wrong_method_on_ingest_is_counted(app):
    app(b"GET", b"/v1/ingest/d")
    assert app.requests(405) == 1


def test_query_string_and_absolute_form(app):
    assert app.post(b"/v1/ingest/d?x=1&y")[0] == 202
    assert app(b"GET", b"/readyz?verbose")[0] == 200
    # The absolute form (the framing refuses it, 400; the app still routes it by its path)
    taken = app.app.handle(b"POST", b"http://example.com/v1/ingest/e", JSON, BODY)
    assert isinstance(taken, Accepted) and [r[0] for r in taken.records] == [b"e"]
    assert app(b"GET", b"HTTPS://example.com:8443/healthz")[0] == 200
    assert app(b"GET", b"http://example.com")[:2] == (200, b"text/html; charset=utf-8")    # "/": the dashboard
    assert app(b"GET", b"http://example.com/nothing")[0] == 404
    assert app.published[0][0] == b"telemetry/d"


def test_error_body(app):
    body = app.app.error_body(413, "body_too_large", 'the body exceeds 1048576 bytes "quoted"')
    assert json.loads(body) == {"code": "body_too_large", "message": 'the body exceeds 1048576 bytes "quoted"'}


LONE_APP = HttpApp(cfg(), worker_index=0, ingest=Ingest(1000, np.zeros(int(Counter.N_COUNTERS), np.uint64)),
                   render_metrics=lambda: b"", health=lambda: (True, {}),
                   counters=np.zeros(int(Counter.N_COUNTERS), np.uint64))


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"X"]),
       target=st.one_of(st.binary(max_size=40), st.sampled_from([b"/v1/ingest", b"/v1/ingest/", b"/healthz"])
                        .flatmap(lambda p: st.binary(max_size=20).map(lambda tail: p + tail))),
       ctype=st.one_of(st.none(), st.binary(max_size=40), st.just(JSON)),
       body=st.one_of(st.binary(max_size=200), st.just(BODY), st.just(b"[" + BODY + b"]")))
def test_handle_never_fails(method, target, ctype, body):
    answer = LONE_APP.handle(method, target, ctype, body)
    if isinstance(answer, Accepted):
        # Readings for the worker: each a device id, a seq, its normalised JSON.
        for device, seq, reading in answer.records:
            doc = json.loads(reading)
            assert doc["device_id"].encode() == device and doc["seq"] == seq
        return
    status, rtype, rbody, extra = answer
    assert status in (200, 202, 400, 404, 405, 413, 415, 503)
    if rtype == JSON:
        doc = json.loads(rbody)
        if status >= 400:
            assert doc["code"] and doc["message"]
    if status == 405:
        assert extra.startswith(b"Allow: ")


# --- configuration ------------------------------------------------------------------------------

def test_telemetry_topic_setting():
    a = App(cfg(telemetry_topic="site/42/telemetry"))
    a.post(b"/v1/ingest/d")
    assert a.published[0][0] == b"site/42/telemetry/d"
    # MQTT: readings on the configured topics go through the schema (normalised), others are routed as sent
    a.worker.subscriber.publish(b"site/42/telemetry/d", b'{"metrics":{}}')
    a.worker.subscriber.publish(b"telemetry/d", b'{"metrics":{}}')
    topic, payload, _, _ = a.published[1]
    assert topic == b"site/42/telemetry/d" and json.loads(payload)["device_id"] == "d"
    assert a.published[2][:2] == (b"telemetry/d", b'{"metrics":{}}')
    assert a.count(TELEMETRY_MQTT_ACCEPTED) == 1


def test_reload_applies_new_settings(app):
    app.worker.reload(cfg(max_batch=1, telemetry_topic="t"))
    assert app.post(b"/v1/ingest/d")[0] == 202
    assert app.published[-1][0] == b"t/d"
    assert app.post(b"/v1/ingest", b'[{"device_id":"a","metrics":{}},{"device_id":"a","metrics":{}}]')[0] == 413


def test_works_with_the_real_config():
    from gw.config import load_config
    a = App(load_config())
    assert a.post(b"/v1/ingest/d")[0] in (200, 202)


def test_config_without_the_new_settings():
    a = App(SimpleNamespace())          # a Config from before these settings: the defaults
    assert a.post(b"/v1/ingest/d")[0] == 202 and a.published[0][0] == b"telemetry/d"


# --- MQTT telemetry ----------------------------------------------------------------------------

def test_mqtt_telemetry(app):
    """MQTT publishes on telemetry/{device_id} are validated and routed normalised;
    the normalised form is a fixed point; what breaks the schema is not routed."""
    mqtt = app.worker.subscriber
    mqtt.publish(b"telemetry/dev1", b'{"seq":5,"metrics":{"t":1}}')
    (topic, out, _, _), = app.published
    doc = json.loads(out)
    assert topic == b"telemetry/dev1"
    assert doc["device_id"] == "dev1" and doc["metrics"] == {"t": 1.0} and doc["ts"].endswith("Z")
    mqtt.publish(b"telemetry/dev1", out)
    assert app.published[1][1] == out
    for payload in (b'{"metrics":{"t":1e999}}', b"", b'{"metric":{}}'):
        mqtt.publish(b"telemetry/dev1", payload)
    mqtt.publish(b"telemetry/a/b", b'{"metrics":{}}')       # not a telemetry topic (two levels): as sent
    assert app.published[2:] == [(b"telemetry/a/b", b'{"metrics":{}}', 0, False)]
    assert app.count(TELEMETRY_MQTT_ACCEPTED) == 2 and app.count(TELEMETRY_MQTT_REJECTED) == 3
    assert app.dedup.live() == 0                             # MQTT has its own redelivery: no idempotency record


# --- ack mode sink: a reading counts as seen once it is durable -------------------------------

def test_sink_a_repeat_waits_for_the_first_copy_in_this_workers_log():
    # fsync batch with a 10 s group: after the first group, nothing is durable until flush()
    a = App(cfg(ack="sink"), fsync="batch", batch_ms=10_000.0)
    w = a.worker
    a.dedup.attach(0, w.wal.durable_offset)
    group = w.send(b"POST", b"/v1/ingest/first_group", b'{"metrics":{}}')
    w.make_durable()
    assert w.answer(group)[0] == 200
    first = w.send(b"POST", b"/v1/ingest/d", BODY)
    assert w.answer(first, turns=20) is None                 # held: the log is not durable past it
    assert a.dedup.pending == 1
    repeat = w.send(b"POST", b"/v1/ingest/d", BODY)
    assert w.answer(repeat, turns=20) is None                # a duplicate whose first copy is not durable: held
    w.make_durable()                                         # the first copy is on disk
    status, _, body, _ = w.answer(first)
    assert status == 200 and json.loads(body)["duplicates"] == 0
    status, _, body, _ = w.answer(repeat)
    assert status == 200 and json.loads(body)["duplicates"] == 1
    assert a.dedup.pending == 0
    third = w.send(b"POST", b"/v1/ingest/d", BODY)            # nothing to wait for: answered at once
    status, _, body, _ = w.answer(third, turns=20)
    assert status == 200 and json.loads(body)["duplicates"] == 1
    assert [t for t, *_ in a.published] == [b"telemetry/first_group", b"telemetry/d"]


def test_sink_a_repeat_of_a_reading_another_worker_has_not_made_durable_is_refused():
    """Another worker took (device_1, 42) and its log is not durable past it (it
    may yet crash and lose it): no 200 for the repeat, a 503 to retry; in
    ack mode enqueue (202: in a log's buffer, as the first copy was) a duplicate."""
    import multiprocessing

    sink = App(cfg(ack="sink"))
    sink.dedup.attach(0, sink.worker.wal.durable_offset)

    def other_worker():
        sink.dedup.attach(1)
        assert sink.dedup.seen(b"device_1", 42) == 0
        sink.dedup.commit_at(1000)                          # appended, not durable

    p = multiprocessing.get_context("fork").Process(target=other_worker)
    p.start()
    p.join(30)
    assert p.exitcode == 0
    status, _, body, extra = sink.post(b"/v1/ingest/device_1")
    assert status == 503 and error_of((status, JSON, body, extra)) == "in_progress"
    assert extra == b"Retry-After: 1\r\n"
    assert sink.count(INGEST_RECORDS_PENDING) == 1 and sink.published == []
    status, _, body, extra = sink.post(b"/v1/ingest", b'[{"device_id":"device_2","seq":1,"metrics":{}},'
                                                      b'{"device_id":"device_1","seq":42,"metrics":{}}]')
    assert status == 503 and error_of((status, JSON, body, extra)) == "in_progress"
    assert [t for t, *_ in sink.published] == [b"telemetry/device_2"]   # before it in the batch: taken
    assert sink.count(INGEST_RECORDS_PENDING) == 2 and sink.count(INGEST_RECORDS_ACCEPTED) == 1
    # the same table, an enqueue listener
    status, _, body, _ = sink.post(b"/v1/ingest/device_1", listener="enqueue")
    assert status == 202 and json.loads(body)["duplicates"] == 1


def test_a_reading_the_log_refuses_is_not_left_recorded():
    a = App(cfg(ack="sink"))
    w = a.worker
    a.dedup.attach(0, w.wal.durable_offset)
    # The log's next write fails: it refuses readings until its retry (1 s later) succeeds.
    w.wal._inject_errors(write_errno=errno.EIO, write_count=1, retry_s=1.0)
    first = w.send(b"POST", b"/v1/ingest/other", b'{"metrics":{}}')
    for _ in range(400):
        w.turn()
        if w.wal.error:
            break
    assert w.wal.error
    answer = a.post(b"/v1/ingest/d")
    assert answer[0] == 503 and error_of(answer) == "log_unavailable" and answer[3] == b"Retry-After: 1\r\n"
    assert a.dedup.pending == 0 and a.dedup.live() == 0
    assert w.answer(first, turns=2000)[0] == 200             # kept, written once the log writes again
    assert json.loads(a.post(b"/v1/ingest/d")[2])["duplicates"] == 0


def test_idempotency_off_means_no_table():
    a = App(cfg(ack="sink"), dedup=False)                     # idempotency_window = 0
    assert a.post(b"/v1/ingest/d")[0] == 200
    assert a.post(b"/v1/ingest", b'[{"device_id":"d","seq":42,"metrics":{}}]')[0] == 200
    assert len(a.published) == 2
