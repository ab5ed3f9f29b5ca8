"""The file sink and the upstream MQTT bridge (gw/pipeline/filesink.py,
bridge.py): real files, real logs, Debian's Mosquitto as the upstream broker
(started here on a free loopback port, stopped by pid), including the broker
going away mid-stream and coming back."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from broker_fixtures import MOSQUITTO, Mosquitto
from conftest import HOST, paho_client_class, start_paho_thread, stop_paho_thread
from test_pipeline import Durable, T0, fleet, reading, settings, wait_until, wal_api, write_log
from gw.pipeline import Pipeline, PipelineError
from gw.pipeline.filesink import FileSink

needs_mosquitto = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")


def records_of(payloads, start=0):
    out, off = [], start
    for p in payloads:
        out.append((off, p))
        off += 8 + len(p)
    return out, off


def opened_sink(d: Path) -> FileSink:
    """A file sink of one log in d, opened (it resumes from its checkpoint); a
    1 GiB rotation size, which these tests never reach."""
    sink = FileSink(d, 1, rotate_bytes=1 << 30)
    sink.open()
    return sink


def write_records(sink: FileSink, payloads, start: int = 0) -> int:
    """Writes payloads as log 0's records from offset start; the offset after them."""
    recs, end = records_of(payloads, start)
    sink.write([(0, recs, end)])
    return end


def read_lines(d: Path, completed_only: bool = False) -> list[dict]:
    out = []
    for f in sorted(d.glob("*.ndjson" if completed_only else "*.ndjson*")):
        for line in f.read_bytes().splitlines():
            out.append(json.loads(line))
    return out


# --- file sink -----------------------------------------------------------------------------

def test_file_sink_lines_rotation_by_size_and_checkpoints(tmp_path):
    sink = FileSink(tmp_path / "out", 2, rotate_bytes=8192, rotate_seconds=3600)
    sink.open()
    payloads = [[reading(f"w{w}-d{i % 5}", T0 + i, i, {"x": i}) for i in range(300)] for w in range(2)]
    ends = [0, 0]
    for k in range(0, 300, 40):
        parts = []
        for w in range(2):
            recs, ends[w] = records_of(payloads[w][k:k + 40], ends[w])
            parts.append((w, recs, ends[w]))
        sink.write(parts)
    out = tmp_path / "out"
    done = sorted(out.glob("*.ndjson"))
    assert len(done) >= 4 and all(f.stat().st_size >= 8192 for f in done)
    assert all(f.name.startswith(("w0-", "w1-")) for f in out.glob("*.ndjson*"))
    lines = read_lines(out)
    assert len(lines) == 600
    by_key = {(doc["_worker"], doc["_lsn"]): doc for doc in lines}
    assert len(by_key) == 600
    for w in range(2):
        recs, _ = records_of(payloads[w])
        for off, p in recs:
            doc = dict(by_key[(w, off)])
            del doc["_worker"], doc["_lsn"]
            assert doc == json.loads(p)
    for w in range(2):
        ck = json.loads((out / f"checkpoint-w{w}.json").read_text())
        assert ck["next_offset"] == ends[w] == sink.checkpoints[w]
        if ck["file"]:
            assert (out / ck["file"]).stat().st_size == ck["size"]
    sink.close()


def test_file_sink_rotation_by_age(tmp_path):
    now = [1_000_000.0]
    sink = FileSink(tmp_path, 1, rotate_bytes=1 << 30, rotate_seconds=60, clock=lambda: now[0])
    sink.open()
    write_records(sink, [reading("d", T0, 1, {"x": 1})])
    sink.poll(0)
    assert list(tmp_path.glob("*.ndjson")) == []
    now[0] += 61
    sink.poll(0)
    done = list(tmp_path.glob("*.ndjson"))
    assert len(done) == 1 and done[0].name.startswith("w0-19700112T134640Z-")
    assert json.loads((tmp_path / "checkpoint-w0.json").read_text())["file"] is None
    now[0] += 3600
    sink.poll(0)                          # nothing written: no empty file
    assert len(list(tmp_path.glob("*.ndjson*"))) == 1


def test_file_sink_crash_after_write_before_checkpoint(tmp_path):
    payloads = [reading("d", T0 + i, i, {"x": i}) for i in range(100)]
    sink = opened_sink(tmp_path)
    end = write_records(sink, payloads[:50])
    part = next(tmp_path.glob("*.part"))
    size = part.stat().st_size
    # the process wrote more lines (half of a line too) and died before the checkpoint
    with open(part, "ab") as f:
        f.write(b'{"device_id":"d","ts":"2025-01-01T00:00:00Z","_worker":0,"_lsn":99999}\n{"device_')
    del sink                               # no close: a crash
    sink = opened_sink(tmp_path)
    assert sink.checkpoints[0] == end
    write_records(sink, payloads[50:], end)
    assert part.stat().st_size > size
    lines = read_lines(tmp_path)
    assert [d["_lsn"] for d in lines] == [off for off, _ in records_of(payloads)[0]]
    sink.close()


def test_file_sink_crash_between_rename_and_checkpoint(tmp_path):
    payloads = [reading("d", T0 + i, i, {"x": i}) for i in range(20)]
    sink = opened_sink(tmp_path)
    end = write_records(sink, payloads[:10])
    part = next(tmp_path.glob("*.part"))
    os.rename(part, str(part)[:-len(".part")])          # the rename happened, the checkpoint did not
    sink = opened_sink(tmp_path)
    write_records(sink, payloads[10:], end)
    assert len(list(tmp_path.glob("*.ndjson"))) == 1 and len(list(tmp_path.glob("*.part"))) == 1
    assert [d["seq"] for d in read_lines(tmp_path)] == list(range(20))


def test_file_sink_unwritable_dir_is_a_pipeline_error(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(PipelineError, match="file_sink"):
        Pipeline(settings(tmp_path, file_sink=str(tmp_path / "afile")), 1, Durable(1), wal=wal_api())


def test_file_sink_in_the_pipeline_with_failures(tmp_path, monkeypatch):
    """A file sink that fails for a while retries with backoff, logs once,
    never holds the store back, and catches up: every record once."""
    logs = fleet(2, 1500)
    ends = [write_log(tmp_path, w, p) for w, p in enumerate(logs)]
    durable = Durable(2)
    for w, e in enumerate(ends):
        durable.set(w, e)
    real_write = FileSink.write
    failures = {"left": 4}

    def flaky(self, parts):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        return real_write(self, parts)

    monkeypatch.setattr(FileSink, "write", flaky)
    out = tmp_path / "files"
    pipe = Pipeline(settings(tmp_path, file_sink=str(out), file_sink_rotate_bytes=64 << 10,
                             pipeline_batch=500), 2, durable, wal=wal_api())
    for r in pipe.runners:
        r.backoff.base = 0.01
    pipe.start()
    wait_until(lambda: pipe.runners[0].lag() == 0, 30, "the store")
    wait_until(lambda: pipe.runners[1].lag() == 0, 30, "the file sink")
    st = pipe.stats()["sinks"]
    pipe.shutdown()
    assert st["file"]["retries"] == 4 and st["file"]["written"] == 3000 and not st["file"]["failing"]
    assert st["store"]["retries"] == 0 and st["store"]["written"] == 3000
    lines = read_lines(out)
    assert len(lines) == 3000 and len({(d["_worker"], d["_lsn"]) for d in lines}) == 3000


# --- the bridge ------------------------------------------------------------------------------

class Subscriber:
    """A persistent-session QoS 1 subscriber on the upstream broker that
    reconnects by itself (paho's threaded mode) and records every message."""

    def __init__(self, port: int, topic: str = "up/#", ca=None):
        mqtt, cls = paho_client_class()
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.c = cls(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}",
                     clean_session=False, protocol=mqtt.MQTTv311)
        self.c.reconnect_delay_set(1, 1)
        self.topic = topic
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        if ca:
            self.c.tls_set(ca_certs=str(ca))
        self.c.connect(HOST, port, 30)
        self.thread = start_paho_thread(self.c)
        assert self.connected.wait(10)

    def _on_connect(self, client, userdata, flags, rc, props):
        client.subscribe(self.topic, 1)
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.got.append((msg.topic, msg.payload))

    def keys(self) -> set:
        with self.lock:
            return {(json.loads(p)["device_id"], json.loads(p)["seq"]) for _, p in self.got}

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()
        stop_paho_thread(self.c, self.thread, 5)


def expected_keys(logs) -> set:
    return {(json.loads(p)["device_id"], json.loads(p)["seq"]) for payloads in logs for p in payloads}


@pytest.fixture
def on_exit():
    """Stops what a test registers (on_exit.callback(stop)) when it ends, however
    it ends, the last registered first."""
    with contextlib.ExitStack() as stack:
        yield stack


def bridge_pipeline(tmp_path, port, durable, n=2, scheme="mqtt", **kw):
    pipe = Pipeline(settings(tmp_path, bridge=f"{scheme}://localhost:{port}", bridge_topic="up",
                             bridge_client_id=f"gw-bridge-{uuid.uuid4().hex[:6]}", **kw),
                    n, durable, wal=wal_api())
    for r in pipe.runners:
        r.backoff.base = 0.05
        r.backoff.cap = 0.5
    return pipe


def bridged(tmp_path, on_exit, broker: Mosquitto, workers: int, ca=None, **kw):
    """Starts broker and a Subscriber on it; makes a bridge pipeline to it over
    `workers` logs, not started. Each is stopped when the test ends.
    (subscriber, durable offsets, pipeline)."""
    broker.start()
    on_exit.callback(broker.stop)
    sub = Subscriber(broker.port, ca=ca)
    on_exit.callback(sub.close)
    durable = Durable(workers)
    pipe = bridge_pipeline(tmp_path, broker.port, durable, n=workers, **kw)
    on_exit.callback(pipe.shutdown)
    return sub, durable, pipe


@needs_mosquitto
def test_bridge_forwards_every_reading_qos1(tmp_path, on_exit):
    broker = Mosquitto(tmp_path / "mq", extra=("max_queued_messages 0",))
    sub, durable, pipe = bridged(tmp_path, on_exit, broker, 2)
    logs = fleet(2, 1000)
    pipe.start()
    for w, p in enumerate(logs):
        durable.set(w, write_log(tmp_path, w, p))
    want = expected_keys(logs)
    wait_until(lambda: sub.keys() >= want, 30, "every reading upstream")
    wait_until(lambda: pipe.runners[1].lag() == 0, 10, "the bridge's checkpoints")
    with sub.lock:
        topics = {t for t, _ in sub.got}
        sample = sub.got[0][1]
    assert topics == {f"up/w{w}-d{k}" for w in range(2) for k in range(20)}
    assert sample in set(logs[0]) | set(logs[1])          # the reading unchanged
    st = pipe.stats()["sinks"]["bridge"]
    assert st["written"] == 2000 and st["retries"] == 0 and st["connected"]
    pipe.shutdown()
    ck = {w: json.loads((tmp_path / "pipeline" / f"bridge-w{w}.json").read_text())["next_offset"]
          for w in range(2)}
    assert ck == {w: durable(w) for w in range(2)}


@needs_mosquitto
def test_bridge_outage_and_catch_up(tmp_path, on_exit):
    """The upstream broker stops mid-stream (its persistence keeps the queued
    messages of the subscriber's session) and comes back on the same port:
    the bridge retries with backoff, the store is not held up, and every reading
    arrives upstream (at least once)."""
    mq = Mosquitto(tmp_path / "mq", persistence=True, extra=("max_queued_messages 0",))
    sub, durable, pipe = bridged(tmp_path, on_exit, mq, 2)
    logs = fleet(2, 6000)
    pipe.start()
    first = [write_log(tmp_path, w, p[:3000]) for w, p in enumerate(logs)]
    for w, e in enumerate(first):
        durable.set(w, e)
    wait_until(lambda: len(sub.keys()) >= 500, 30, "the stream to start")
    mq.stop()                                          # mid-stream
    for w, p in enumerate(logs):
        durable.set(w, write_log(tmp_path, w, p[3000:]))
    wait_until(lambda: pipe.runners[0].lag() == 0, 30, "the store, while the bridge is down")
    bridge = pipe.runners[1]
    wait_until(lambda: bridge.failing, 10, "the bridge to notice")
    time.sleep(1.0)
    assert bridge.lag() > 0
    mq.start()                                         # the same broker, port and persistence
    want = expected_keys(logs)
    wait_until(lambda: bridge.lag() == 0, 60, "the bridge to catch up")
    wait_until(lambda: sub.keys() >= want, 60, "every reading upstream")
    st = pipe.stats()["sinks"]["bridge"]
    assert st["retries"] >= 1 and st["connects"] >= 2 and not st["failing"]
    assert st["written"] >= 12000


@needs_mosquitto
def test_bridge_over_tls(tmp_path, on_exit):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    # run as root, Mosquitto drops to its own user, which cannot read pytest's 0700 tmp dirs
    user = ("user root",) if os.geteuid() == 0 else ()
    broker = Mosquitto(tmp_path / "mq", extra=(f"cafile {ca_pem}", f"certfile {cert_pem}",
                                               f"keyfile {key_pem}") + user)
    sub, durable, pipe = bridged(tmp_path, on_exit, broker, 1, ca=ca_pem,
                                 scheme="mqtts", bridge_cafile=str(ca_pem))
    logs = fleet(1, 200)
    durable.set(0, write_log(tmp_path, 0, logs[0]))
    pipe.start()
    wait_until(lambda: sub.keys() >= expected_keys(logs), 30, "every reading upstream over TLS")


def test_bridge_to_nobody_retries_without_holding_the_store(tmp_path, on_exit):
    from conftest import free_ports
    port = free_ports(1)[0]                  # nothing listens there
    logs = fleet(1, 300)
    durable = Durable(1)
    durable.set(0, write_log(tmp_path, 0, logs[0]))
    pipe = bridge_pipeline(tmp_path, port, durable, n=1)
    on_exit.callback(pipe.shutdown)
    pipe.start()
    wait_until(lambda: pipe.runners[0].lag() == 0, 30, "the store")
    wait_until(lambda: pipe.runners[1].retries >= 3, 30, "the bridge's retries")
    st = pipe.stats()["sinks"]["bridge"]
    assert st["failing"] and st["lag"] == durable(0) and "connect" in st["last_error"]


def test_bad_bridge_url(tmp_path):
    with pytest.raises(PipelineError, match="mqtt://host:port"):
        Pipeline(settings(tmp_path, bridge="http://x:1"), 1, Durable(1), wal=wal_api())
