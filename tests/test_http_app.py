"""gw/http_api.py called directly (no sockets): routes, status codes, headers,
ingest with idempotency and batches, counters, draining, MQTT telemetry."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gw import http_api
from gw.http_api import (DEDUP_FULL, INGEST_RECORDS_ACCEPTED, INGEST_RECORDS_DUPLICATE, INGEST_RECORDS_PENDING,
                         INGEST_RECORDS_REJECTED, INGEST_REQUESTS, TELEMETRY_MQTT_ACCEPTED, TELEMETRY_MQTT_REJECTED, HttpApp,
                         http_status_index, is_json_content_type)

JSON = b"application/json"
BODY = b'{"ts":"2025-09-23T11:18:41Z","seq":42,"metrics":{"temp_c":21.5},"tags":{"site":"AAL"},' \
       b'"payload":{"raw":"ok"}}'


class RecordingDedup:
    """The real shared idempotency table (gw_ext.dedup), recording the app's calls."""

    def __init__(self, capacity: int = 1 << 16):
        from gw_ext.dedup import DedupTable

        self.table = DedupTable(capacity, 60.0)
        self.calls: list = []

    def seen(self, device_id: bytes, seq: int, now_ms: int) -> int:
        assert isinstance(device_id, bytes) and isinstance(seq, int) and isinstance(now_ms, int)
        self.calls.append((device_id, seq))
        return self.table.seen(device_id, seq, now_ms)

    def __getattr__(self, name):
        return getattr(self.table, name)        # commit_at, abandon, attach, durable: the table's own


def full_dedup() -> RecordingDedup:
    """A small real table filled up: every probe window is live."""
    dedup = RecordingDedup(capacity=1024)
    results = [dedup.table.seen(b"filler", i) for i in range(20_000)]
    assert results.count(0) <= 1024 and results[-200:] == [-1] * 200
    dedup.calls.clear()
    return dedup


def cfg(**values):
    base = dict(http_api.DEFAULTS)
    base.update(values)
    return SimpleNamespace(**base)


class App:
    """An HttpApp with the real idempotency table; what it publishes, its metrics
    and its health answer are recorded or given by the test."""

    def __init__(self, config=None, dedup=None, health=None):
        self.published: list = []
        self.counters = np.zeros(512, dtype=np.uint64)
        self.dedup = dedup or RecordingDedup()
        self.health_answer = (True, {"workers": {"ok": True, "alive": 2, "expected": 2}})
        self.app = HttpApp(config if config is not None else cfg(), worker_index=3, publish=self.publish,
                           dedup=self.dedup, render_metrics=lambda: b"# TYPE x counter\nx 1\n",
                           health=health or (lambda: self.health_answer), counters=self.counters)

    def publish(self, topic, payload, qos, retain):
        assert isinstance(topic, bytes) and isinstance(payload, bytes)
        self.published.append((topic, payload, qos, retain))

    def __call__(self, method, target, body=b"", content_type=JSON):
        status, ctype, rbody, extra = self.app.handle(method, target, content_type, body)
        assert isinstance(status, int) and isinstance(ctype, bytes)
        assert isinstance(rbody, bytes) and isinstance(extra, bytes)
        assert extra == b"" or (extra.endswith(b"\r\n") and b": " in extra)
        return status, ctype, rbody, extra

    def post(self, target, body=BODY, content_type=JSON):
        return self(b"POST", target, body, content_type)

    def count(self, index) -> int:
        return int(self.counters[index])

    def requests(self, status) -> int:
        return self.count(INGEST_REQUESTS + http_status_index(status))


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
    assert app.dedup.calls == [(b"device_1", 42)]
    assert app.requests(202) == 1 and app.count(INGEST_RECORDS_ACCEPTED) == 1


def test_server_fills_ts(app):
    status, _, body, _ = app.post(b"/v1/ingest/d", b'{"metrics":{"x":1}}')
    assert status == 202
    ack = json.loads(body)
    assert ack["seq"] is None and ack["ts"].endswith("Z")
    assert json.loads(app.published[0][1])["ts"] == ack["ts"]
    assert app.dedup.calls == []          # no seq: no idempotency check


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
    assert app.published == [] and app.dedup.calls == []
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
    assert app.published == [] and app.dedup.calls == []
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


def test_publish_failure_is_a_500_json(app, caplog):
    def boom(*args):
        raise RuntimeError("router exploded")
    app.app.publish = boom
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

@pytest.mark.parametrize("target", [b"/", b"/v1", b"/v1/ingestx", b"/v2/ingest/d", b"/healthz/", b"/metricsx",
                                    b"/docs/x.js", b"*", b"\xff\xfe"])
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
    assert app.post(b"http://example.com/v1/ingest/d")[0] == 202
    assert app(b"GET", b"HTTPS://example.com:8443/healthz")[0] == 200
    assert app(b"GET", b"http://example.com")[0] == 404
    assert app.published[0][0] == b"telemetry/d"


def test_error_body(app):
    body = app.app.error_body(413, "body_too_large", 'the body exceeds 1048576 bytes "quoted"')
    assert json.loads(body) == {"code": "body_too_large", "message": 'the body exceeds 1048576 bytes "quoted"'}


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"X"]),
       target=st.one_of(st.binary(max_size=40), st.sampled_from([b"/v1/ingest", b"/v1/ingest/", b"/healthz"])
                        .flatmap(lambda p: st.binary(max_size=20).map(lambda tail: p + tail))),
       ctype=st.one_of(st.none(), st.binary(max_size=40), st.just(JSON)),
       body=st.one_of(st.binary(max_size=200), st.just(BODY), st.just(b"[" + BODY + b"]")))
def test_handle_never_fails(method, target, ctype, body):
    a = App()
    status, rtype, rbody, extra = a(method, target, body, ctype)
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
    assert a.app.validate_mqtt_telemetry(b"site/42/telemetry/d", b'{"metrics":{}}') is not None
    assert a.app.validate_mqtt_telemetry(b"telemetry/d", b'{"metrics":{}}') is None


def test_reload_applies_new_settings(app):
    app.app.cfg = cfg(ack="sink", max_batch=1, telemetry_topic="t")
    assert app.post(b"/v1/ingest/d")[0] == 200
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

def test_validate_mqtt_telemetry(app):
    out = app.app.validate_mqtt_telemetry(b"telemetry/dev1", b'{"seq":5,"metrics":{"t":1}}')
    doc = json.loads(out)
    assert doc["device_id"] == "dev1" and doc["metrics"] == {"t": 1.0} and doc["ts"].endswith("Z")
    assert app.app.validate_mqtt_telemetry(b"telemetry/dev1", out) == out
    for topic, payload in ((b"telemetry/dev1", b'{"metrics":{"t":1e999}}'), (b"telemetry/dev1", b""),
                           (b"telemetry/a/b", b'{"metrics":{}}'), (b"telemetry/dev1", b'{"metric":{}}')):
        assert app.app.validate_mqtt_telemetry(topic, payload) is None
    assert app.count(TELEMETRY_MQTT_ACCEPTED) == 2 and app.count(TELEMETRY_MQTT_REJECTED) == 4
    assert app.published == [] and app.dedup.calls == []


# --- ack mode sink: a reading counts as seen once it is durable -------------------------------

class Log:
    """The worker's side of the log as the app sees it: appends return growing
    end offsets; nothing is durable until the test says so."""

    def __init__(self, app: App):
        self.end = 64
        app.app.wal_room = lambda n: True
        app.app.wal_append = self.append
        app.app.wal_end = lambda: self.end

    def append(self, reading: bytes) -> int:
        self.end += 8 + len(reading)
        return self.end


def test_sink_a_repeat_waits_for_the_first_copy_in_this_workers_log():
    a = App(cfg(ack="sink"))
    a.dedup.attach(0)
    log = Log(a)
    a.app.durable_needed = 0
    assert a.post(b"/v1/ingest/d")[0] == 200
    first_end = a.app.durable_needed
    assert first_end == log.end and a.dedup.pending == 1
    log.append(b"x" * 40)                                   # another reading after it
    a.app.durable_needed = 0
    status, _, body, _ = a.post(b"/v1/ingest/d")
    assert status == 200 and json.loads(body)["duplicates"] == 1
    assert a.app.durable_needed == log.end                  # its 200 waits for the log, past the first copy
    a.dedup.durable(first_end)                              # the first copy is on disk
    a.app.durable_needed = 0
    assert json.loads(a.post(b"/v1/ingest/d")[2])["duplicates"] == 1
    assert a.app.durable_needed == 0                        # nothing to wait for
    assert len(a.published) == 1


def test_sink_a_repeat_of_a_reading_another_worker_has_not_made_durable_is_refused():
    """Another worker took (device_1, 42) and its log is not durable past it (it
    may yet crash and lose it): no 200 for the repeat, a 503 to retry; in
    ack mode enqueue (202: in a log's buffer, as the first copy was) a duplicate."""
    import multiprocessing

    sink = App(cfg(ack="sink"))
    sink.dedup.attach(0)
    Log(sink)

    def other_worker():
        sink.dedup.attach(1)
        assert sink.dedup.seen(b"device_1", 42, http_api._now_ms()) == 0
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
    sink.app.cfg = cfg(ack="enqueue")
    status, _, body, _ = sink.post(b"/v1/ingest/device_1")
    assert status == 202 and json.loads(body)["duplicates"] == 1


def test_a_reading_the_log_refuses_after_all_is_not_left_recorded():
    a = App(cfg(ack="sink"))
    a.dedup.attach(0)
    log = Log(a)
    a.app.wal_append = lambda reading: -1                  # the log failed between the check and the append
    assert a.post(b"/v1/ingest/d")[0] == 503
    assert a.dedup.pending == 0
    a.app.wal_append = log.append
    assert json.loads(a.post(b"/v1/ingest/d")[2])["duplicates"] == 0


def test_idempotency_off_means_no_table():
    a = App(cfg(ack="sink"))
    a.app.dedup = None                                      # idempotency_window = 0
    assert a.post(b"/v1/ingest/d")[0] == 200
    assert a.post(b"/v1/ingest", b'[{"device_id":"d","seq":1,"metrics":{}}]')[0] == 200
    assert len(a.published) == 2
