"""The write-ahead log and the pipeline end to end against `gw serve`: acknowledgement means durable.

In ack mode sink a QoS 1 PUBACK (and an HTTP 200) is sent only once the
reading's batch of the worker's write-ahead log is on disk; the pipeline
process then puts every reading into the embedded store exactly once. Tested
here with kill -9 of a worker and of the whole server in the middle of a
stream, a full disk (RLIMIT_FSIZE on the worker, raised again while it runs),
a corrupt store at start, and the anomaly detector's alerts reaching MQTT
subscribers and the query API."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import struct
import threading
import time
import uuid

import psutil
import pytest

from conftest import (HOST, GwServer, mqtt_client, publish_packet, read_packet, subscribe_packet, wait_closed,
                      wait_for)
from http_client import HttpConn, ingest_body

WINDOW = 64     # QoS 1 publishes in flight


def store_rows(server, device: str) -> list[int]:
    """The seqs of a device's readings in the store, one entry per row."""
    path = server.data_dir / "store.sqlite"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in conn.execute("SELECT seq FROM readings WHERE device_id = ?", (device,))]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def wait_stored(server, device: str, acked: set[int], timeout: float = 30.0) -> list[int]:
    def done():
        rows = store_rows(server, device)
        return rows if acked <= set(rows) else None
    try:
        return wait_for(done, timeout, interval=0.2, what="every acknowledged reading in the store")
    except AssertionError:
        missing = sorted(acked - set(store_rows(server, device)))
        raise AssertionError(f"{len(missing)} acknowledged readings not in the store: {missing[:20]}") from None


class Publisher:
    """A raw MQTT client streaming QoS 1 readings with seq = packet order,
    WINDOW in flight, recording which were acknowledged."""

    def __init__(self, port: int, device: str):
        self.cm = mqtt_client(port, f"pub-{uuid.uuid4().hex[:8]}")
        self.sock = self.cm.__enter__()
        self.device = device
        self.topic = f"telemetry/{device}"
        self.acked: set[int] = set()
        self.inflight: dict[int, int] = {}      # packet id -> seq
        self.next_pid = 1

    def send(self, seq: int) -> None:
        pid = self.next_pid
        self.next_pid = pid % 65535 + 1
        body = json.dumps({"seq": seq, "metrics": {"v": float(seq)}}).encode()
        self.sock.sendall(publish_packet(self.topic, body, qos=1, packet_id=pid))
        self.inflight[pid] = seq

    def read_acks(self, timeout: float) -> None:
        first, body = read_packet(self.sock, timeout)
        assert first == 0x40, hex(first)
        seq = self.inflight.pop(struct.unpack("!H", body)[0])
        self.acked.add(seq)

    def stream(self, start: int, count: int, stop: threading.Event | None = None) -> int:
        """Sends seqs start.. until count or the connection breaks; returns the next seq."""
        seq = start
        try:
            while seq < start + count and not (stop and stop.is_set()):
                while len(self.inflight) >= WINDOW:
                    self.read_acks(10)
                self.send(seq)
                seq += 1
            while self.inflight:
                self.read_acks(10)
        except (OSError, EOFError, AssertionError, socket.timeout):
            pass
        return seq

    def close(self) -> None:
        try:
            self.cm.__exit__(None, None, None)
        except OSError:
            pass


@pytest.fixture
def sink_server(gw_factory):
    def make(**kw):
        return gw_factory(workers=2, listeners=("mqtt", "http"), args=["--ack", "sink", "--fsync", "batch"], **kw)
    return make


def kill_whole_server(server, workers: int) -> None:
    """A crash of the whole server (deliberate: every process of it is killed,
    its `workers` workers and the pipeline counted as expected deaths). The
    master goes first, so it counts no death; should it reap a child before
    its own end, that death is this kill's."""
    procs = [psutil.Process(server.pid)] + psutil.Process(server.pid).children()
    server.expect_worker_deaths(workers)
    server.expect_pipeline_deaths(1)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_puback_waits_for_the_log_and_the_reading_reaches_the_store(sink_server):
    server = sink_server()
    device = f"d-{uuid.uuid4().hex[:6]}"
    pub = Publisher(server.ports["mqtt"], device)
    try:
        assert pub.stream(0, 500) == 500
        assert pub.acked == set(range(500))
    finally:
        pub.close()
    rows = wait_stored(server, device, pub.acked)
    assert sorted(rows) == list(range(500))          # each exactly once
    counters = server.counters()
    assert counters["wal_records"] >= 500 and counters["wal_fsyncs"] >= 1
    with HttpConn(server.ports["http"]) as c:
        resp = c.request("POST", f"/v1/ingest/{device}", ingest_body(seq=1000))
        assert resp.status == 200, resp.body           # ack mode sink: 200, once durable
        resp = c.request("GET", f"/v1/devices/{device}/metrics?metric=v&window=1m")
        assert resp.status == 200, resp.body
        assert sum(p["count"] for p in resp.json()["points"]) >= 500

    from prometheus_client.parser import text_string_to_metric_families

    def figures():
        with HttpConn(server.ports["http"]) as c:
            text = c.request("GET", "/metrics").body.decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}
    wait_for(lambda: figures()[("gw_sink_records_total", (("sink", "store"),))] >= 501, 10,
             what="the store sink's figures in /metrics")
    got = figures()
    assert got[("gw_pipeline_up", ())] == 1
    assert got[("gw_wal_records_total", ())] >= 501 and got[("gw_wal_fsyncs_total", ())] >= 1


def test_kill9_of_a_worker_mid_stream_loses_no_acknowledged_reading(sink_server):
    server = sink_server()
    device = f"k-{uuid.uuid4().hex[:6]}"
    pub = Publisher(server.ports["mqtt"], device)
    victim = server.which_worker(pub.sock.getsockname()[1])
    stop = threading.Event()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("next", pub.stream(0, 1_000_000, stop)), daemon=True)
    t.start()
    wait_for(lambda: len(pub.acked) >= 2000, 30, what="2,000 acknowledged readings")
    server.expect_worker_deaths(1)
    os.kill(victim, signal.SIGKILL)
    t.join(20)
    stop.set()
    assert not t.is_alive()
    acked = set(pub.acked)
    pub.close()
    assert len(acked) >= 2000
    # The worker is respawned (its log recovered); a new stream lands on any worker.
    wait_for(lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids(), 20,
             what="the killed worker respawned")
    pub2 = Publisher(server.ports["mqtt"], device)
    try:
        assert pub2.stream(2_000_000, 200) == 2_000_200
    finally:
        pub2.close()
    rows = wait_stored(server, device, acked | pub2.acked)
    assert len(rows) == len(set(rows)), "a reading was stored twice"


def test_kill9_of_the_whole_server_mid_stream_loses_no_acknowledged_reading(tmp_path):
    ports = dict(zip(("mqtt", "http"), __import__("conftest").free_ports(2)))
    args = ["--ack", "sink", "--fsync", "batch"]
    server = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt", "http"), ports=ports, args=args).start()
    device = f"w-{uuid.uuid4().hex[:6]}"
    try:
        pub = Publisher(server.ports["mqtt"], device)
        stop = threading.Event()
        t = threading.Thread(target=lambda: pub.stream(0, 1_000_000, stop), daemon=True)
        t.start()
        wait_for(lambda: len(pub.acked) >= 2000, 30, what="2,000 acknowledged readings")
        kill_whole_server(server, workers=2)
        t.join(20)
        stop.set()
        acked = set(pub.acked)
        pub.close()
    finally:
        server.stop(timeout=5)
    # The same data dir and ports: the logs are recovered, the pipeline resumes
    # from the store's checkpoints.
    again = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt", "http"), ports=ports, args=args,
                     data_dir=server.data_dir).start()
    try:
        rows = wait_stored(again, device, acked)
        assert len(rows) == len(set(rows)), "a reading was stored twice"
    finally:
        again.stop()


def test_a_full_disk_stops_acknowledgements_and_the_gateway_recovers_by_itself(gw_factory):
    """RLIMIT_FSIZE on the worker stands for a full disk: its writes fail (EFBIG),
    readings are refused with 503 (HTTP) and not acknowledged (MQTT: the
    publisher is disconnected), a line says why; raising the limit again, with
    nothing restarted, lets everything through, and nothing acknowledged is lost."""
    server = gw_factory(workers=1, listeners=("mqtt", "http"), args=["--ack", "sink", "--fsync", "always"])
    [worker] = server.worker_pids()
    device = f"f-{uuid.uuid4().hex[:6]}"
    seg = max((server.data_dir / "wal" / "0").glob("*.wal"))
    limit = seg.stat().st_size + 8192
    resource.prlimit(worker, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    statuses = []
    acked = set()
    try:
        for i in range(200):
            # A reading taken just before the disk filled waits for its 200 (ack
            # mode sink) until the disk has room again: that client times out.
            with HttpConn(server.ports["http"], timeout=2) as c:
                try:
                    resp = c.request("POST", f"/v1/ingest/{device}", ingest_body(seq=i, payload="x" * 200))
                except TimeoutError:
                    statuses.append("waiting")
                    continue
            statuses.append(resp.status)
            if resp.status == 200:
                acked.add(i)
            else:
                assert resp.status == 503 and resp.headers["retry-after"], (resp.status, resp.body)
                assert resp.json()["code"] == "log_unavailable"
            if statuses[-3:] == [503] * 3:
                break
        assert statuses[-3:] == [503] * 3 and 200 in statuses, statuses
        # MQTT: no PUBACK; the publisher is closed (it keeps its reading to send again).
        with mqtt_client(server.ports["mqtt"], "full-disk") as mq:
            mq.sendall(publish_packet(f"telemetry/{device}", b'{"seq": 9999, "metrics": {"v": 1}}', qos=1,
                                      packet_id=1))
            assert wait_closed(mq) == b""
        server.wait_log("cannot take readings")
    finally:
        resource.prlimit(worker, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    def accepted_again():
        with HttpConn(server.ports["http"]) as c:
            resp = c.request("POST", f"/v1/ingest/{device}", ingest_body(seq=500))
            return resp.status == 200
    wait_for(accepted_again, 15, interval=0.5, what="ingest accepted again after the disk has room")
    acked.add(500)
    rows = wait_stored(server, device, acked)
    assert len(rows) == len(set(rows))
    assert server.counters()["wal_errors"] >= 1


def test_a_corrupt_store_is_reported_at_start_and_left_alone(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    garbage = b"this is not an SQLite database" * 100
    (data / "store.sqlite").write_bytes(garbage)
    server = GwServer(tmp_path / "gw", workers=1, listeners=("mqtt",), data_dir=data)
    with pytest.raises(RuntimeError) as info:
        server.start(timeout=20)
    assert "store" in str(info.value) and "corrupt" in str(info.value)
    assert server.proc.returncode == 1
    assert (data / "store.sqlite").read_bytes() == garbage


def test_anomalies_raise_alerts_on_mqtt_and_in_the_query_api(gw_factory):
    server = gw_factory(workers=2, listeners=("mqtt", "http"),
                        args=["--anomaly-window", "20", "--anomaly-threshold", "4"])
    device = f"a-{uuid.uuid4().hex[:6]}"
    with mqtt_client(server.ports["mqtt"], "alert-watch") as sub:
        sub.sendall(subscribe_packet(1, [("alerts/+", 0)]))
        assert read_packet(sub)[0] == 0x90
        with HttpConn(server.ports["http"]) as c:
            for i in range(40):
                value = 20.0 + (i % 5) * 0.1
                assert c.request("POST", f"/v1/ingest/{device}",
                                 ingest_body({"temp_c": value}, seq=i)).status == 202
            assert c.request("POST", f"/v1/ingest/{device}", ingest_body({"temp_c": 95.0}, seq=40)).status == 202
        first, body = read_packet(sub, 20)
        assert first >> 4 == 3
        tlen = struct.unpack("!H", body[:2])[0]
        assert body[2:2 + tlen].decode() == f"alerts/{device}"
        alert = json.loads(body[2 + tlen:])
        assert alert["metric"] == "temp_c" and alert["value"] == 95.0 and alert["state"] == "open"
    with HttpConn(server.ports["http"]) as c:
        resp = c.request("GET", f"/v1/alerts?device_id={device}")
        assert resp.status == 200
        [listed] = resp.json()["alerts"]
        assert listed["id"] == alert["id"]
        resp = c.request("POST", f"/v1/alerts/{alert['id']}/ack", b"{}")
        assert resp.status == 200 and resp.json()["state"] == "acked"
        resp = c.request("GET", f"/v1/alerts?device_id={device}&state=open")
        assert resp.json()["alerts"] == []


def _read_line(sock) -> bytes:
    """One JSON line from the server, however the stream was cut."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"closed after {line!r}"
        line += chunk
    return line


def test_json_lines_data_messages_are_readings_too(gw_factory):
    """JSON-lines Data messages are telemetry of the device named by the
    client id: logged, in the store, and on telemetry/{client_id} (a string
    payload becomes the reading's payload, with no metrics)."""
    server = gw_factory(workers=1, listeners=("mqtt", "json", "http"))
    device = f"j-{uuid.uuid4().hex[:8]}"
    with mqtt_client(server.ports["mqtt"], "json-watch") as sub:
        sub.sendall(subscribe_packet(1, [(f"telemetry/{device}", 0)]))
        assert read_packet(sub)[0] == 0x90
        with socket.create_connection((HOST, server.ports["json"]), timeout=10) as js:
            js.sendall(json.dumps({"client_id": device, "message_type": "Connect"}).encode() + b"\n")
            assert json.loads(_read_line(js))["payload"] == "Connected"
            js.sendall(json.dumps({"client_id": device, "message_type": "Data",
                                   "payload": "Sensor reading: temperature=23.5", "timestamp": 1674472800}
                                  ).encode() + b"\n")
            js.sendall(json.dumps({"client_id": device, "message_type": "Data",
                                   "payload": {"seq": 7, "metrics": {"temp_c": 23.5}}}).encode() + b"\n")
            got = []
            while len(got) < 2:
                first, body = read_packet(sub, 10)
                tlen = struct.unpack("!H", body[:2])[0]
                got.append(json.loads(body[2 + tlen:]))
    assert got[0]["payload"] == "Sensor reading: temperature=23.5" and got[0]["ts"] == "2023-01-23T11:20:00Z"
    assert got[1]["metrics"] == {"temp_c": 23.5} and got[1]["seq"] == 7
    rows = wait_stored(server, device, {7})
    assert sorted(rows, key=lambda r: (r is None, r)) == [7, None]


def test_a_killed_pipeline_process_is_respawned_and_catches_up(gw_factory):
    server = gw_factory(workers=1, listeners=("mqtt", "http"))
    first = wait_for(server.pipeline_pid, 10, what="the pipeline process")
    server.expect_pipeline_deaths(1)
    os.kill(first, signal.SIGKILL)
    device = f"p-{uuid.uuid4().hex[:6]}"
    with HttpConn(server.ports["http"]) as c:
        for i in range(50):       # accepted into the log while no pipeline runs
            assert c.request("POST", f"/v1/ingest/{device}", ingest_body(seq=i)).status == 202
    second = wait_for(lambda: server.pipeline_pid() not in (0, first) and server.pipeline_pid(), 10,
                      what="the pipeline respawned")
    assert second != first
    assert sorted(wait_stored(server, device, set(range(50)))) == list(range(50))
    assert "pipeline process" in server.log() and "died" in server.log()
    stats = server.stats()
    assert (stats["pipeline_deaths"], stats["worker_deaths"]) == (1, 0)
    from prometheus_client.parser import text_string_to_metric_families

    with HttpConn(server.ports["http"]) as c:
        text = c.request("GET", "/metrics").body.decode()
    figures = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert (figures["gw_pipeline_deaths_total"], figures["gw_worker_deaths_total"]) == (1, 0)


def test_an_unusable_data_dir_is_reported_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    server = GwServer(tmp_path / "gw", workers=1, listeners=("mqtt",), data_dir=blocker / "data")
    with pytest.raises(RuntimeError) as info:
        server.start(timeout=20)
    assert "data_dir" in str(info.value) and "not writable" in str(info.value)
    assert server.proc.returncode == 1


def _records(segment) -> list[tuple[int, int, int]]:
    """(file position, record size, seq) of every record of a log segment file."""
    data = segment.read_bytes()
    out, pos = [], 16
    while pos + 8 <= len(data):
        n = struct.unpack_from("<I", data, pos)[0]
        out.append((pos, 8 + n, json.loads(data[pos + 8:pos + 8 + n])["seq"]))
        pos += 8 + n
    return out


def test_damage_in_the_middle_of_a_log_is_skipped_and_counted(tmp_path):
    """Records damaged on disk (bit rot, not a crash mid-write) in the middle of
    a worker's log: the readings after them still reach the store, the damaged
    ones are counted as lost (in `gw stats --json` and /metrics) and logged,
    the log is not cut, and the pipeline and retention go on."""
    ports = dict(zip(("http",), __import__("conftest").free_ports(1)))
    # Two sinks meet the damage: it is counted and logged once all the same.
    args = ["--ack", "sink", "--fsync", "batch", "--wal-segment-bytes", str(1 << 16),
            "--file-sink", str(tmp_path / "files")]
    server = GwServer(tmp_path / "gw", workers=1, listeners=("http",), ports=ports, args=args).start()
    device = f"c-{uuid.uuid4().hex[:6]}"
    try:
        # The pipeline is held, so the readings are in the log and not yet in the store.
        pipeline = wait_for(server.pipeline_pid, 10, what="the pipeline process")
        os.kill(pipeline, signal.SIGSTOP)
        with HttpConn(server.ports["http"]) as c:
            for first in range(0, 400, 50):
                body = json.dumps([{"device_id": device, "seq": i, "metrics": {"v": float(i)},
                                    "payload": "x" * 600} for i in range(first, first + 50)]).encode()
                resp = c.request("POST", "/v1/ingest", body)
                assert resp.status == 200, resp.body
        # A crash of the whole server, with the readings durable in the log and
        # not read by the pipeline.
        kill_whole_server(server, workers=1)
    finally:
        server.stop(timeout=5)
    wal = server.data_dir / "wal" / "0"
    segments = sorted(wal.glob("*.wal"))
    assert len(segments) >= 4
    # One record damaged in the middle of the second segment, one in the middle of
    # the last (the one the worker recovers when it starts): a payload byte flipped.
    damaged = {}
    for seg in (segments[1], segments[-1]):
        pos, size, seq = _records(seg)[len(_records(seg)) // 2]
        data = bytearray(seg.read_bytes())
        data[pos + 8 + 20] ^= 0x01
        seg.write_bytes(bytes(data))
        damaged[seq] = size
    last_size = segments[-1].stat().st_size
    again = GwServer(tmp_path / "gw", workers=1, listeners=("http",), ports=ports, args=args,
                     data_dir=server.data_dir).start()
    try:
        assert segments[-1].stat().st_size == last_size, "the recovery cut the log at the damage"
        with HttpConn(again.ports["http"]) as c:         # and the log goes on after it
            assert c.request("POST", f"/v1/ingest/{device}", ingest_body(seq=1000)).status == 200
        want = set(range(400)) - set(damaged) | {1000}
        rows = wait_stored(again, device, want)
        assert sorted(rows) == sorted(want)

        def filed():
            seqs = [json.loads(line)["seq"] for f in (tmp_path / "files").glob("*.ndjson*")
                    for line in f.read_text().splitlines() if line]
            return seqs if want <= set(seqs) else None
        assert set(wait_for(filed, 30, interval=0.2, what="the file sink past the damage")) == want
        lost = sum(damaged.values())
        again.wait_counter("wal_corrupt", lost)
        assert again.counters()["wal_corrupt"] == lost
        assert again.stats()["counters"]["wal_corrupt"] == lost
        with HttpConn(again.ports["http"]) as c:
            metrics = c.request("GET", "/metrics").body.decode()
        assert f"gw_wal_corrupt_bytes_total {lost}" in metrics
        log_text = again.log()
        assert log_text.count("damaged records") == 2, log_text
    finally:
        again.stop()


def test_a_resent_qos2_publish_is_acknowledged_only_once_its_reading_is_durable(gw_factory):
    """Ack mode sink, QoS 2: the client's connection breaks before its PUBREC,
    it reconnects (clean_session=0) and sends the PUBLISH again with DUP. The
    session knows the packet id (the reading is not routed twice), and the
    second PUBREC, like the first, waits until the reading is on disk.
    RLIMIT_FSIZE on the worker holds the log's writes back (a full disk)."""
    server = gw_factory(workers=1, listeners=("mqtt", "http"), args=["--ack", "sink", "--fsync", "always"])
    [worker] = server.worker_pids()
    device = f"q-{uuid.uuid4().hex[:6]}"
    reading = publish_packet(f"telemetry/{device}", b'{"seq": 1, "metrics": {"v": 1}}', qos=2, packet_id=7)
    resent = bytes([reading[0] | 0x08]) + reading[1:]          # DUP

    def connect(sock):
        sock.sendall(__import__("conftest").connect_packet(f"q2-{device}", clean=False))
        first, body = read_packet(sock)
        assert first == 0x20 and body[1] == 0, (first, body)
        return body[0] & 1                                    # session present

    seg = max((server.data_dir / "wal" / "0").glob("*.wal"))
    resource.prlimit(worker, resource.RLIMIT_FSIZE, (seg.stat().st_size, resource.RLIM_INFINITY))
    try:
        with socket.create_connection((HOST, server.ports["mqtt"]), timeout=10) as first:
            connect(first)
            first.sendall(reading + b"\xc0\x00")               # PUBLISH, PINGREQ
            # The PINGRESP comes; the PUBREC waits for the log.
            assert read_packet(first) == (0xD0, b"")
        wait_for(lambda: server.counters()["sessions_away"] == 1, 10, what="the session kept, its client away")
        with socket.create_connection((HOST, server.ports["mqtt"]), timeout=20) as again:
            assert connect(again) == 1
            again.sendall(resent + b"\xc0\x00")
            assert read_packet(again) == (0xD0, b""), "the PUBREC of the resent PUBLISH did not wait"
            resource.prlimit(worker, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            assert read_packet(again, 20) == (0x50, b"\x00\x07")  # PUBREC, once the disk takes it
            again.sendall(b"\x62\x02\x00\x07")                   # PUBREL
            assert read_packet(again) == (0x70, b"\x00\x07")     # PUBCOMP
    finally:
        resource.prlimit(worker, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    with HttpConn(server.ports["http"]) as c:      # after it in the same log: once this is stored, all is
        assert c.request("POST", f"/v1/ingest/{device}", ingest_body(seq=2)).status == 200
    assert sorted(wait_stored(server, device, {1, 2})) == [1, 2]


def test_a_retry_of_a_reading_lost_before_its_fsync_is_stored_exactly_once(gw_factory):
    """Ack mode sink: the worker took the reading, its log never made it
    durable (RLIMIT_FSIZE: every write fails), and the worker is killed, so the
    client never gets its 200. The retry, after the respawn, is not a
    duplicate of a reading that was never stored: it is taken, and stored once."""
    server = gw_factory(workers=1, listeners=("http",), args=["--ack", "sink", "--fsync", "always"])
    [worker] = server.worker_pids()
    device = f"r-{uuid.uuid4().hex[:6]}"
    seg = max((server.data_dir / "wal" / "0").glob("*.wal"))
    resource.prlimit(worker, resource.RLIMIT_FSIZE, (seg.stat().st_size, resource.RLIM_INFINITY))
    with HttpConn(server.ports["http"]) as c:
        c.request("POST", f"/v1/ingest/{device}", ingest_body(seq=5), send_only=True)
        server.wait_counter("ingest_records_accepted", 1)       # taken, its 200 held for the log
        # A worker death this test causes on purpose: killed before its log is durable.
        server.expect_worker_deaths(1)
        os.kill(worker, signal.SIGKILL)
        c.wait_closed()
    wait_for(lambda: (lambda pids: len(pids) == 1 and worker not in pids)(server.worker_pids()), 20,
             what="the killed worker respawned")

    def retry():
        with HttpConn(server.ports["http"]) as c:
            return c.request("POST", f"/v1/ingest/{device}", ingest_body(seq=5))
    resp = retry()
    assert resp.status == 200 and resp.json()["duplicates"] == 0, (resp.status, resp.body)
    assert retry().json()["duplicates"] == 1                   # now it is a duplicate
    with HttpConn(server.ports["http"]) as c:                  # later in the same log: once it is stored, all is
        assert c.request("POST", f"/v1/ingest/{device}", ingest_body(seq=6)).status == 200
    assert sorted(wait_stored(server, device, {5, 6})) == [5, 6]


# --- restarts: the checkpoints and the logs ----------------------------------------

LOG_RESET = re.compile(r"checkpoint (\d+) of worker (\d+)'s log is past its durable offset (\d+)")


def ingest_stored(server, device: str, seqs) -> None:
    """Readings over HTTP (several connections, so both workers take some), in the store."""
    seqs = list(seqs)
    conns = [HttpConn(server.ports["http"]) for _ in range(4)]
    try:
        for i, seq in enumerate(seqs):
            resp = conns[i % len(conns)].request("POST", f"/v1/ingest/{device}", ingest_body(seq=seq))
            assert resp.status == 202, resp.body
    finally:
        for c in conns:
            c.close()
    wait_stored(server, device, set(seqs))


def test_an_ordinary_restart_does_not_report_a_reset_log(tmp_path):
    """At start the pipeline runs before the workers have recovered their logs
    and published where they end: a checkpoint past the 0 it reads then is no
    sign of a reset."""
    server = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt", "http"))
    device = f"r-{uuid.uuid4().hex[:6]}"
    try:
        for run in range(3):
            server.start()
            ingest_stored(server, device, range(run * 40, run * 40 + 40))
            server.stop()
    finally:
        server.stop()
    log = server.log()
    assert log.count("listening on") == 3 and log.count("gw.master: stopped") == 3
    assert not LOG_RESET.search(log), LOG_RESET.search(log).group(0)


def test_a_log_that_was_really_reset_stops_gw_serve_at_start(tmp_path):
    """The log's files removed while the store keeps what it read of them:
    readings taken from then on would land at offsets the store holds already
    and never be stored, so gw serve refuses to start, saying what to do."""
    server = GwServer(tmp_path / "gw", workers=1, listeners=("mqtt", "http"))
    device = f"z-{uuid.uuid4().hex[:6]}"
    try:
        server.start()
        ingest_stored(server, device, range(40))
        server.stop()
        shutil.rmtree(server.data_dir / "wal")      # the store keeps its checkpoints
        with pytest.raises(RuntimeError, match="exited with 1"):
            server.start()
    finally:
        server.stop()
    assert "worker 0's write-ahead log" in server.log() and "move the store aside" in server.log()
    assert not LOG_RESET.search(server.log())