"""Tests of `gwbench ingest` (gwbench/ingest_scenario.py,
gwbench/_ext/ingest_engine.pyx) against a small HTTP ingest server started
here on a free loopback port: the server counts what it received and how it
answered, and the bench must report the same numbers. Counts decide; timing
never does beyond generous bounds (the machine is shared)."""
from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from gwbench import histogram as H
from gwbench import ingest_scenario
from test_bench_tool import each_stopped, free_port, run_bench as run_gwbench

# The extension is built by `pip install -e .`: not importing it must fail
# these tests, not skip them.
import gwbench._ext.ingest_engine  # noqa: E402,F401
from gwbench._ext.ingest_engine import IngestEngine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def is_anomaly(temp: float) -> bool:
    # normal readings are 14.5 .. 30.5 C; anomalies are 40 C off that
    return temp > 45.0 or temp < 0.0


class IngestServer:
    """A selectors HTTP/1.1 server in a thread: keep-alive, pipelining,
    Content-Length bodies. It answers request number n (counted over the
    whole server, from 1) with the first matching rule of `answer(n)`:
    a status code; 202 by default. It counts requests, answers by status,
    anomalies in the bodies, and checks each device's seq increases."""

    def __init__(self, answer=None, chunked: bool = False, close_every: int = 0, delay_s: float = 0.0,
                 silent: bool = False):
        self.answer = answer or (lambda n: 202)
        self.silent = silent
        self.chunked = chunked
        self.close_every = close_every
        self.delay_s = delay_s
        self.requests = 0
        self.bad = 0
        self.by_status = Counter()
        self.anomalies = 0
        self.anomaly_keys: set = set()
        self.last_seq: dict = {}
        self.seq_errors = 0
        self.connections = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.running = True
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        bufs: dict = {}
        while self.running:
            for key, _ in self.sel.select(0.05):
                if key.data is None:
                    try:
                        c, _ = self.sock.accept()
                    except BlockingIOError:
                        continue
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.sel.register(c, selectors.EVENT_READ, "c")
                    bufs[c] = bytearray()
                    self.connections += 1
                    continue
                c = key.fileobj
                try:
                    data = c.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.sel.unregister(c)
                    c.close()
                    bufs.pop(c, None)
                    continue
                buf = bufs[c]
                buf += data
                out, close = self._handle(buf)
                if out:
                    if self.delay_s:
                        time.sleep(self.delay_s)
                    c.setblocking(True)
                    try:
                        c.sendall(out)
                    except OSError:
                        close = True
                    c.setblocking(False)
                if close:
                    self.sel.unregister(c)
                    c.close()
                    bufs.pop(c, None)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()

    def _handle(self, buf: bytearray) -> tuple[bytes, bool]:
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return b"".join(out), False
            head = bytes(buf[:end]).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            n = int(headers.get("content-length", "0"))
            if len(buf) < end + 4 + n:
                return b"".join(out), False
            body = bytes(buf[end + 4:end + 4 + n])
            del buf[:end + 4 + n]
            method, path, _ = head[0].split(" ")
            with self.lock:
                self.requests += 1
                number = self.requests
            if self.silent:
                continue
            status = 202
            try:
                assert method == "POST" and path.startswith("/v1/ingest/dev-")
                assert headers.get("content-type") == "application/json"
                rec = json.loads(body)
                dev = path.rsplit("/", 1)[1]
                temp = rec["metrics"]["temp_c"]
                if is_anomaly(temp):
                    self.anomalies += 1
                    self.anomaly_keys.add((dev, rec.get("seq")))
                if "seq" in rec:
                    if rec["seq"] != self.last_seq.get(dev, -1) + 1:
                        self.seq_errors += 1
                    self.last_seq[dev] = rec["seq"]
                status = self.answer(number)
            except (AssertionError, ValueError, KeyError):
                self.bad += 1
                status = 400
            self.by_status[status] += 1
            close = bool(self.close_every and number % self.close_every == 0)
            out.append(self._response(status, close))
            if close:
                return b"".join(out), True

    def _response(self, status: int, close: bool) -> bytes:
        reason = {200: "OK", 202: "Accepted", 400: "Bad Request", 503: "Service Unavailable"}.get(status, "X")
        body = b'{"accepted":1}' if status < 300 else b'{"error":"no"}'
        head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json"]
        if status == 503:
            head.append("Retry-After: 1")
        if close:
            head.append("Connection: close")
        if self.chunked:
            head.append("Transfer-Encoding: chunked")
            payload = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:])
        else:
            head.append(f"Content-Length: {len(body)}")
            payload = body
        return ("\r\n".join(head) + "\r\n\r\n").encode() + payload

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def server():
    with each_stopped(IngestServer) as start:
        yield start


def run_bench(args, tmp_path: Path, timeout: float = 90.0):
    """`gwbench ingest` with args: (the finished process, its JSON result, the
    seconds it took)."""
    t = time.monotonic()
    p, result = run_gwbench(["ingest", *args], tmp_path, timeout)
    return p, result, time.monotonic() - t


def _plan(**kw):
    from gwbench.plan import Plan
    d = dict(scenario="ingest", host="127.0.0.1", port=8080, family=socket.AF_INET,
             sockaddr=("127.0.0.1", 8080), clients=4, devices=10, seed=42, topic_prefix="telemetry")
    d.update(kw)
    return Plan(**d)


def _engine(plan, pipeline=1, opener=None):
    tpl, off = ingest_scenario.build_template(plan)
    eng = IngestEngine(ingest_scenario.TRANSPORTS[plan.transport], 1, pipeline, plan.clients, plan.devices,
                       H.MIN_NS, H.GROWTH, H.NBUCKETS)
    eng.set_template(tpl, off, plan.seed, plan.anomalies, plan.anomaly_fraction,
                     time.time_ns() - time.monotonic_ns())
    if opener is not None:
        eng.configure(5.0, 0, opener)
    return eng


# -- the records, without a server --------------------------------------------------

@pytest.mark.parametrize("transport", ["http", "mqtt"])
@pytest.mark.parametrize("seq", [True, False])
def test_records_are_json_and_agree_with_the_python_reading(transport, seq):
    from gwbench import mqtt

    plan = _plan(transport=transport, seq=seq, anomalies=True, anomaly_fraction=0.1, devices=123_456)
    eng = _engine(plan)
    lengths = set()
    anomalies = 0
    for d in (0, 1, 7, 99_999, 123_455):
        for s in (0, 1, 2, 999, 4_294_967_295):
            data, anomaly = eng.sample(d, s, time.monotonic_ns(), 0x1234)
            lengths.add(len(data))
            dev = f"dev-{d:06d}"   # 123,456 devices: six digits
            if transport == "http":
                head, body = data.split(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                assert lines[0] == f"POST /v1/ingest/{dev} HTTP/1.1"
                assert "Content-Type: application/json" in lines
                assert f"Content-Length: {len(body)}" in lines
            else:
                (first, pkt), = mqtt.split(bytearray(data))
                assert first == 0x32   # PUBLISH, QoS 1
                tl = int.from_bytes(pkt[:2], "big")
                assert pkt[2:2 + tl] == f"telemetry/{dev}".encode()
                assert pkt[2 + tl:4 + tl] == b"\x12\x34"
                body = pkt[4 + tl:]
            rec = json.loads(body)
            ref = ingest_scenario.reading(plan.seed, plan.anomaly_fraction, d, s)
            assert ("seq" in rec) == seq and rec.get("seq", s) == s
            assert rec["metrics"] == {"temp_c": ref["temp_c"], "humidity_pct": ref["humidity_pct"]}
            assert rec["tags"] == {"site": ref["site"]}
            assert anomaly == ref["anomaly"] == is_anomaly(ref["temp_c"])
            assert abs(ref["temp_c"] - ref["normal_temp_c"]) <= (40.5 if anomaly else 0.5)
            assert rec["ts"].endswith("Z") and len(rec["ts"]) == 24
            anomalies += anomaly
    assert len(lengths) == 1          # fixed-width fields: one template length
    assert anomalies > 0


def test_anomaly_fraction_is_about_right_and_off_without_the_flag():
    plan = _plan(devices=100, anomalies=True, anomaly_fraction=0.01)
    n = sum(ingest_scenario.reading(plan.seed, 0.01, d, s)["anomaly"] for d in range(100) for s in range(200))
    assert 100 < n < 300            # 1% of 20,000, loosely
    eng = _engine(_plan(devices=100, anomalies=False))
    assert not any(eng.sample(d, s)[1] for d in range(100) for s in range(50))


def test_engine_histogram_buckets_match_python():
    import numpy as np

    rng = np.random.default_rng(7)
    v = np.concatenate([rng.lognormal(np.log(5e5), 2.0, 20_000), [0.0, 999.0, 1000.0, 1e11]])
    eng = _engine(_plan())
    eng.record_latency(v.tolist())
    d = eng.latency_hist()
    h = H.Histogram()
    h.record_many(v)
    assert np.abs(d["counts"] - h.counts).sum() <= 2 and d["total"] == h.total


# -- the response parser, on a socketpair ---------------------------------------------

def _read_requests(sock, n, timeout=5.0) -> int:
    """Reads until n complete requests arrived; returns how many bytes."""
    buf = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.05)
    while buf.count(b"\r\n\r\n") < n and time.monotonic() < deadline:
        try:
            buf += sock.recv(65536)
        except socket.timeout:
            pass
    return buf.count(b"\r\n\r\n")


def test_parser_interim_chunked_no_body_retry_after_close_and_garbage():
    pairs = [socket.socketpair() for _ in range(2)]
    ends = [a.detach() for a, _ in pairs]
    opened = []

    def opener(g):
        opened.append(g)
        return ends.pop(0) if ends else -111   # then: connection refused

    eng = _engine(_plan(clients=1, devices=3), pipeline=4, opener=opener)
    eng.add(0, 3, b"")
    eng.open_all()

    def run(ms=30):
        eng.run(time.monotonic_ns() + ms * 1_000_000)

    run()
    assert eng.ready_count() == 1
    now = time.monotonic_ns()
    eng.start(now, now + 60_000_000_000, 0.0)   # closed loop, 4 outstanding
    run()
    peer = pairs[0][1]
    assert _read_requests(peer, 4) == 4
    responses = [
        # an interim 100 before the real answer, fed one byte at a time
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}",
        # chunked, with a chunk extension and a trailer
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n1A\r\n"
        + b"z" * 26 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n",
        # header names in any case
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\ncontent-length: 3\r\n\r\nbye",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ]
    for k, byte in enumerate(responses[0]):
        peer.send(bytes([byte]))
        if k % 8 == 0:
            run(2)
    run()
    assert eng.answered == 1
    peer.send(b"".join(responses[1:]))
    run()
    assert eng.answered == 4
    assert eng.status_counts() == {"200": 1, "202": 1, "204": 1, "503": 1}
    assert eng.retry_after == 1 and eng.ok == 3
    # The closed loop refilled the pipeline; a 400 that closes the connection
    # loses the 3 requests behind it, and the engine reconnects.
    assert _read_requests(peer, 4) == 4
    peer.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnope!")
    run(50)
    assert eng.status_counts()["400"] == 1
    assert eng.lost == 3 and eng.errors() == {"closed_by_server": 1}
    assert opened == [0, 0] and eng.ready_count() == 1
    # Not HTTP: a malformed response, the connection dropped, reconnects refused.
    peer2 = pairs[1][1]
    assert _read_requests(peer2, 4) == 4
    peer2.send(b"SPDY/9 200 what\r\n\r\n")
    run(400)   # the reconnect comes after a 100 ms back-off
    assert eng.errors()["malformed_response"] == 1
    assert eng.errors()["connect_failed"] >= 1 and eng.ready_count() == 0
    assert eng.sent == eng.answered + eng.lost + eng.outstanding()
    eng.close_all()
    for _, b in pairs:
        b.close()


# -- against the test server ------------------------------------------------------------

def test_counts_exact_with_status_codes(server, tmp_path):
    s = server(answer=lambda n: 400 if n % 10 == 0 else 503 if n % 7 == 0 else 202)
    p, r, _ = run_bench(["--server", f"127.0.0.1:{s.port}", "--clients", 8, "--devices", 40,
                         "--duration", 1.5], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    q = r["requests"]
    assert q["answered"] == s.requests == q["sent"] > 0
    assert r["status"] == {str(k): v for k, v in s.by_status.items()}
    assert set(r["status"]) == {"202", "400", "503"}
    assert q["ok_2xx"] == s.by_status[202] and q["non_2xx"] == s.by_status[400] + s.by_status[503]
    assert q["retry_after"] == s.by_status[503]
    assert q["unanswered"] == 0 and r["errors"] == {} and r["connected"] == 8
    assert s.bad == 0 and s.seq_errors == 0            # valid records, each device's seq in order
    assert s.connections == 8 + 1                       # the clients, and the preflight connect
    assert len(s.last_seq) == 40                        # every device sent
    assert r["latency_ms"]["count"] == q["answered"]
    assert r["timeseries"] and all("in_per_s" in x for x in r["timeseries"])
    assert "Status: 202" in p.stdout and "400" in p.stdout and "Result: OK" in p.stdout


def test_two_processes_pipelined_counts_exact(server, tmp_path):
    s = server()
    p, r, _ = run_bench(["--server", f"127.0.0.1:{s.port}", "--clients", 6, "--devices", 30,
                         "--pipeline", 4, "--procs", 2, "--duration", 1.5], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert r["plan"]["procs"] == 2
    assert r["requests"]["answered"] == s.requests == r["requests"]["sent"] == r["status"]["202"]
    assert s.seq_errors == 0 and s.bad == 0 and len(s.last_seq) == 30


def test_rate_is_held(server, tmp_path):
    rate, duration = 1000, 3
    s = server()
    p, r, _ = run_bench(["--server", f"127.0.0.1:{s.port}", "--clients", 10, "--devices", 100,
                         "--rate", rate, "--duration", duration], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    q = r["requests"]
    assert q["answered"] == s.requests == q["sent"]
    # The schedule is rate x duration requests; generous bounds.
    assert 0.8 * rate * duration <= q["sent"] <= 1.1 * rate * duration
    assert q["scheduled"] == q["sent"]
    assert 0.7 * rate <= q["sent_per_s"] <= 1.2 * rate
    # per device: 10 requests/s, seq in order
    assert s.seq_errors == 0 and len(s.last_seq) == 100
    assert r["send_lag_ms"]["count"] == q["sent"] and "Service time" in p.stdout


def test_anomalies_injected_as_reported(server, tmp_path):
    s = server()
    p, r, _ = run_bench(["--server", f"127.0.0.1:{s.port}", "--clients", 4, "--devices", 20,
                         "--duration", 1, "--anomalies", "--anomaly-fraction", 0.02, "--seed", 1234],
                        tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    a = r["anomalies"]
    assert a["enabled"] and a["seed"] == 1234 and a["list_complete"]
    assert a["injected"] == s.anomalies > 0
    assert {(d, q) for d, q in a["list"]} == s.anomaly_keys
    for d, q in a["list"][:50]:       # the seed tells which records they were
        assert ingest_scenario.reading(1234, 0.02, int(d[4:]), q)["anomaly"]
    assert "Anomalies:" in p.stdout
    # and none without the flag
    s2 = server()
    p, r, _ = run_bench(["--server", f"127.0.0.1:{s2.port}", "--clients", 2, "--devices", 4, "--duration", 0.5],
                        tmp_path)
    assert p.returncode == 0 and r["anomalies"]["injected"] == 0 == s2.anomalies and s2.requests > 0


def test_chunked_answers_and_connection_close_reconnect(server, tmp_path):
    s = server(chunked=True, close_every=25)
    p, r, _ = run_bench(["--server", f"127.0.0.1:{s.port}", "--clients", 4, "--devices", 8,
                         "--duration", 1], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert r["requests"]["answered"] == s.requests == r["requests"]["sent"]
    assert r["reconnects"] >= 1 and r["server_closes"] >= 1 and r["errors"] == {}
    assert s.seq_errors == 0


def test_stops_by_itself_when_the_server_never_answers(server, tmp_path):
    s = server(silent=True)   # reads requests, never answers
    p, r, elapsed = run_bench(["--server", f"127.0.0.1:{s.port}", "--clients", 2, "--devices", 2,
                               "--duration", 1], tmp_path, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    q = r["requests"]
    assert q["sent"] == 2 == s.requests and q["answered"] == 0 and q["unanswered"] == 2
    assert "unanswered" in " ".join(r["notes"]) and "Result: FAILED" in p.stdout
    assert elapsed < 40   # duration + the drain deadline, and out


def test_plan_errors_and_unreachable_server(tmp_path):
    port = free_port()
    p, _, elapsed = run_bench(["--server", f"127.0.0.1:{port}", "--duration", 1], tmp_path)
    assert p.returncode == 2 and "connection refused" in p.stderr and elapsed < 20
    p, _, _ = run_bench(["--clients", 10, "--devices", 5], tmp_path)
    assert p.returncode == 2 and "--devices" in p.stderr
    p, _, _ = run_bench(["--tls"], tmp_path)
    assert p.returncode == 2 and "plain HTTP" in p.stderr
    p = subprocess.run([sys.executable, "-m", "gwbench", "ingest", "--dry-run", "--rate", "10000",
                        "--devices", "10000", "--anomalies", "--seed", "5"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "10,000 requests/s (open loop, 1/s per device)" in p.stdout
    assert "127.0.0.1:8080" in p.stdout and "seed 5" in p.stdout


# -- MQTT transport --------------------------------------------------------------------

class Subscriber:
    """A raw MQTT subscriber to telemetry/# at QoS 1, counting records."""

    def __init__(self, port: int):
        from gwbench import mqtt
        self.mqtt = mqtt
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(mqtt.connect(b"ingest-test-sub", 60) + mqtt.subscribe(1, b"telemetry/#", 1))
        self.received = 0
        self.anomalies = 0
        self.suback = threading.Event()
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        assert self.suback.wait(5)

    def _loop(self) -> None:
        mqtt = self.mqtt
        buf = bytearray()
        self.sock.settimeout(0.1)
        while self.running:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            buf += data
            acks = []
            for first, body in mqtt.split(buf):
                if first >> 4 == mqtt.SUBACK:
                    self.suback.set()
                elif first >> 4 == mqtt.PUBLISH:
                    tl = int.from_bytes(body[:2], "big")
                    qos = (first >> 1) & 3
                    payload = body[2 + tl + (2 if qos else 0):]
                    if qos:
                        acks.append(mqtt.ack(mqtt.PUBACK, int.from_bytes(body[2 + tl:4 + tl], "big")))
                    self.received += 1
                    self.anomalies += is_anomaly(json.loads(payload)["metrics"]["temp_c"])
            if acks:
                self.sock.sendall(b"".join(acks))

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (apt-get install mosquitto)")
def test_mqtt_transport_against_mosquitto(tmp_path):
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n"
                    f"log_type error\nlog_dest stderr\n" + ("user root\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sub = None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "mosquitto did not start"
                time.sleep(0.05)
        sub = Subscriber(port)
        p, r, _ = run_bench(["--transport", "mqtt", "--server", f"127.0.0.1:{port}", "--clients", 4,
                             "--devices", 20, "--rate", 500, "--duration", 1, "--anomalies",
                             "--anomaly-fraction", 0.05], tmp_path)
        assert p.returncode == 0, p.stdout + p.stderr
        q = r["requests"]
        assert q["sent"] == q["answered"] == r["status"]["puback"] == q["ok_2xx"] > 0
        deadline = time.monotonic() + 5
        while sub.received < q["sent"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sub.received == q["sent"]
        assert sub.anomalies == r["anomalies"]["injected"] > 0
        assert r["transport"] == "mqtt" and "MQTT QoS 1 to telemetry/{device_id}" in p.stdout
    finally:
        if sub:
            sub.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
