"""Tests of the load generator, `gwbench` / `gw bench` (gwbench/, gwbench/_ext/),
against a real Mosquitto started here on a free loopback port. Counts and
correctness decide; timing never does (the machine is shared)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest

from conftest import counter_delta
from gwbench.histogram import GROWTH, Histogram

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "mosquitto_sub"

needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (apt-get install mosquitto)")


# The extensions are built by `pip install -e .`: one that does not import must
# fail these tests, not skip them. The decorators below only label the tests
# that drive the compiled engine or the Cython TLS clients.
import gwbench._ext.pubsub_engine  # noqa: E402,F401
import gwbench._ext.tls_clients  # noqa: E402,F401


def needs_engine(test):
    return test


needs_tls_clients = needs_engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, tmp: Path, extra: str = "", listener_extra: str = ""):
        self.port = free_port()
        self.conf = tmp / f"mosquitto-{self.port}.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n{listener_extra}allow_anonymous true\n"
            f"max_connections -1\nlog_type error\nlog_dest stderr\n{extra}"
            # As root, Mosquitto drops to user "mosquitto", who cannot read
            # files under pytest's private tmp dir.
            + ("user root\n" if os.geteuid() == 0 else ""))
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not start listening")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@contextlib.contextmanager
def each_stopped(make):
    """A function that starts a server (make(**kw)); every server it started
    is stopped at the end."""
    started = []

    def start(**kw):
        s = make(**kw)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            s.stop()


@pytest.fixture
def broker(tmp_path):
    with each_stopped(lambda **kw: Broker(tmp_path, **kw)) as start:
        yield start


def run_bench(args, tmp_path: Path, timeout: float = 90.0):
    out = tmp_path / f"result-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "gwbench", *map(str, args), "--json", str(out), "--quiet"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    result = json.loads(out.read_text()) if out.exists() else None
    return p, result


def pubsub_counts_exact(port: int, tmp_path: Path, qos: int, topic_mode: str = "per-publisher",
                        extra=()) -> dict:
    """3 publishers -> 2 subscribers at a modest 3,000 messages/s for 2 s: the
    broker delivers everything, and the tool must count each message exactly
    once. Returns the result."""
    p, r = run_bench(["pubsub", "-p", 3, "-S", 2, "--qos", qos, "--rate", 3000, "--size", 100,
                      "--duration", 2, "--topic-mode", topic_mode, "--server", f"127.0.0.1:{port}", *extra],
                     tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    m, d = r["messages"], r["delivery"]
    assert m["sent"] > 0 and d["expected"] == m["sent"] * 2
    assert d["unique"] == d["expected"] and m["received"] == d["unique"]
    assert d["duplicates"] == 0 and d["foreign"] == 0
    return r


def pubsub_lossless_flat_out(port: int, tmp_path: Path, qos: int, extra=()) -> dict:
    """4 publishers -> 2 subscribers, QoS 1/2 flat out with 32 in flight each:
    every publish acknowledged and delivered once to each subscriber. Returns
    the result."""
    p, r = run_bench(["pubsub", "-p", 4, "-S", 2, "--qos", qos, "--inflight", 32, "--duration", 2,
                      "--server", f"127.0.0.1:{port}", *extra], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    m, d = r["messages"], r["delivery"]
    assert m["sent"] > 0 and m["acked"] == m["sent"]
    assert d["expected"] == m["sent"] * 2 == d["unique"]
    assert d["lost"] == 0 and d["duplicates"] == 0
    return r


# -- histogram ---------------------------------------------------------------

@pytest.mark.parametrize("dist", ["lognormal", "exponential", "uniform", "bimodal"])
def test_histogram_percentiles_within_bucket_precision(dist):
    rng = np.random.default_rng(1234)
    n = 200_000
    if dist == "lognormal":
        v = rng.lognormal(mean=np.log(2e6), sigma=1.0, size=n)       # ~2 ms median
    elif dist == "exponential":
        v = rng.exponential(scale=5e5, size=n) + 2_000                # > 1 us
    elif dist == "uniform":
        v = rng.uniform(1e4, 1e9, size=n)
    else:
        v = np.concatenate([rng.normal(1e5, 1e4, n // 2), rng.normal(5e7, 5e6, n // 2)])
        v = np.abs(v) + 1_000
    h = Histogram()
    h.record_many(v)
    assert h.total == n
    tol = GROWTH - 1.0 + 1e-9   # the bucket's relative width bounds the error
    for q in (1, 10, 50, 90, 99, 99.9):
        exact = np.percentile(v, q, method="inverted_cdf")
        got = h.percentile(q)
        assert abs(got - exact) / exact <= tol, (q, got, exact)
    assert h.percentile(100) == v.max()
    assert h.min_ns == v.min() and h.max_ns == v.max()


def test_histogram_merge_and_roundtrip():
    rng = np.random.default_rng(7)
    v = rng.lognormal(np.log(1e6), 0.5, 30_000)
    whole = Histogram()
    whole.record_many(v)
    parts = [Histogram() for _ in range(3)]
    for i, x in enumerate(v):
        parts[i % 3].record(x)    # the scalar path must agree with the vector one
    merged = Histogram()
    for p in parts:
        merged.merge(Histogram.from_dict(json.loads(json.dumps(p.to_dict()))))
    assert np.array_equal(merged.counts, whole.counts)
    assert merged.total == whole.total
    for q in (50, 99, 99.9):
        assert merged.percentile(q) == whole.percentile(q)


def test_histogram_extremes():
    h = Histogram()
    h.record_many([10.0, 500.0, 2e11])   # under 1 us and over 100 s
    assert h.counts[0] == 2 and h.counts[-1] == 1
    assert h.percentile(100) == 2e11
    assert 10.0 <= h.percentile(50) <= 1000.0
    assert np.isnan(Histogram().percentile(50))


# -- plan checks ---------------------------------------------------------------

def test_refuses_more_than_19000_sockets_per_process(tmp_path):
    p, _ = run_bench(["--clients", 40_000, "--procs", 2, "--server", "127.0.0.1:1"], tmp_path, timeout=30)
    assert p.returncode == 2
    assert "--procs 3" in p.stderr


def test_needs_source_ips_past_ephemeral_ports(tmp_path):
    p, _ = run_bench(["--clients", 100_000, "--procs", 6, "--server", "127.0.0.1:1"], tmp_path, timeout=30)
    assert p.returncode == 2
    assert "--source-ips" in p.stderr


def test_unreachable_server_fails_fast_and_clearly(tmp_path):
    port = free_port()   # nothing listens there
    t0 = time.monotonic()
    p, _ = run_bench(["--clients", 10, "--server", f"127.0.0.1:{port}", "--duration", 60], tmp_path, timeout=60)
    assert p.returncode != 0
    assert "connection refused" in p.stderr
    assert time.monotonic() - t0 < 50   # far below --duration: it did not wait


# -- connection scenario ---------------------------------------------------------

@needs_mosquitto
def test_connection_scenario_counts_exact(broker, tmp_path):
    b = broker()
    p, r = run_bench(["--clients", 200, "--rampup", 1, "--duration", 2, "--keepalive", 1,
                      "--messages", 2, "--qos", 1, "--server", f"127.0.0.1:{b.port}",
                      "--server-pid", b.pid, "--procs", 2], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert r["clients"] == 200 and r["connected"] == 200 and r["failed"] == 0
    assert r["disconnected"] == 200 and r["dropped"] == 0
    assert r["connect_ms"]["count"] == 200
    m = r["messages"]
    assert m["sent"] == 400 and m["acked"] == 400 and m["unacked"] == 0
    assert r["errors"] == {}
    assert r["server"]["rss_before"] > 0 and "rss_per_connection" in r["server"]
    assert r["timeseries"] and max(pt["connected"] for pt in r["timeseries"]) <= 200
    assert "Success Rate: 100.0%" in p.stdout


@needs_mosquitto
def test_broker_dying_mid_run_reports_partial_results(broker, tmp_path):
    b = broker(extra="sys_interval 1\n")
    out = tmp_path / "dying.json"
    cmd = [sys.executable, "-m", "gwbench", "--clients", 50, "--duration", 40, "--keepalive", 5,
           "--server", f"127.0.0.1:{b.port}", "--json", out, "--quiet", "--procs", 1]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        # The broker stops once it has every client connected (its own count,
        # $SYS/broker/clients/connected, which includes the client asking), not
        # after a fixed sleep: a loaded machine may take longer to connect 50.
        connected = 0
        deadline = time.monotonic() + 60
        while connected < 51 and time.monotonic() < deadline and proc.poll() is None:
            sub = subprocess.run([MOSQUITTO_SUB, "-p", str(b.port), "-t", "$SYS/broker/clients/connected",
                                  "-C", "2", "-W", "5"], capture_output=True, text=True)
            values = [int(v) for v in sub.stdout.split() if v.isdigit()]
            connected = max(values, default=0)
        assert connected >= 51, f"the broker saw {connected} clients connected"
        b.stop()
        stdout, stderr = proc.communicate(timeout=60)   # ends long before 40 s + grace
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stdout + stderr
    r = json.loads(out.read_text())
    assert r["connected"] == 50
    assert r["dropped"] == 50
    assert r["errors"].get("closed_by_server", 0) + r["errors"].get("ECONNRESET", 0) == 50
    assert "Result: FAILED" in stdout


# -- TLS ---------------------------------------------------------------------------

def mosquitto_tls(tmp_path: Path, *identities: str) -> tuple[Path, str]:
    """A trustme CA and a server certificate for Mosquitto: (the CA file,
    the listener lines that serve the certificate)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert(*identities)
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    return ca_pem, f"cafile {ca_pem}\ncertfile {cert_pem}\nkeyfile {key_pem}\n"

@needs_mosquitto
def test_tls_with_trustme_ca_and_wrong_ca(broker, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca_pem, listener = mosquitto_tls(tmp_path, "localhost", "127.0.0.1")
    b = broker(listener_extra=listener)
    p, r = run_bench(["--clients", 60, "--rampup", 0.5, "--duration", 1, "--tls", "--cafile", ca_pem,
                      "--server", f"127.0.0.1:{b.port}", "--procs", 2], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert r["connected"] == 60 and r["disconnected"] == 60
    assert r["connect_phases_ms"]["tls"]["count"] == 60

    other = trustme.CA()
    wrong = tmp_path / "wrong-ca.pem"
    other.cert_pem.write_to_path(str(wrong))
    p, _ = run_bench(["--clients", 10, "--tls", "--cafile", wrong, "--server", f"127.0.0.1:{b.port}"],
                     tmp_path, timeout=60)
    assert p.returncode != 0
    assert "certificate verify failed" in p.stderr

    # Plain MQTT against the TLS port: a clear failure too, not a hang.
    p, _ = run_bench(["--clients", 10, "--server", f"127.0.0.1:{b.port}", "--connect-timeout", 3],
                     tmp_path, timeout=60)
    assert p.returncode != 0
    assert "gwbench:" in p.stderr


@needs_mosquitto
@needs_engine
def test_pubsub_tls_counts_exact(broker, tmp_path):
    ca_pem, listener = mosquitto_tls(tmp_path, "127.0.0.1")
    b = broker(listener_extra=listener,
               extra="max_queued_messages 0\n")
    p, r = run_bench(["pubsub", "-p", 2, "-S", 2, "--qos", 1, "--rate", 4000, "--duration", 2, "--tls",
                      "--cafile", ca_pem, "--server", f"127.0.0.1:{b.port}"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    d = r["delivery"]
    assert d["lost"] == 0 and d["duplicates"] == 0 and d["unique"] == d["expected"] > 0


# -- throughput scenario ---------------------------------------------------------------

@needs_mosquitto
@needs_engine
@pytest.mark.parametrize("topic_mode", ["per-publisher", "shared"])
def test_pubsub_qos0_counts_exact(broker, tmp_path, topic_mode):
    b = broker()
    r = pubsub_counts_exact(b.port, tmp_path, 0, topic_mode)
    assert r["histograms"]["latency"]["total"] == r["messages"]["received"]
    assert r["connected"] == 5 and r["disconnected"] == 5


@needs_mosquitto
@needs_engine
@pytest.mark.parametrize("qos", [1, 2])
def test_pubsub_qos_lossless_flat_out(broker, tmp_path, qos):
    b = broker(extra="max_queued_messages 0\nmax_inflight_messages 0\n")
    r = pubsub_lossless_flat_out(b.port, tmp_path, qos)
    assert r["histograms"]["ack"]["total"] == r["messages"]["sent"]


@needs_mosquitto
@needs_engine
def test_pubsub_fan_out_and_fan_in(broker, tmp_path):
    b = broker(extra="max_queued_messages 0\n")
    p, r = run_bench(["pubsub", "-p", 1, "-S", 5, "--qos", 1, "--rate", 2000, "--duration", 1,
                      "--server", f"127.0.0.1:{b.port}"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert r["delivery"]["unique"] == r["messages"]["sent"] * 5
    p, r = run_bench(["pubsub", "-p", 6, "-S", 1, "--qos", 1, "--rate", 3000, "--duration", 1,
                      "--server", f"127.0.0.1:{b.port}"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert r["delivery"]["unique"] == r["messages"]["sent"]


# -- JSON line protocol ------------------------------------------------------------

class JsonLineServer:
    """A minimal server of gw's newline-delimited JSON protocol, counting what
    it receives so the bench's own counts can be checked against it."""

    def __init__(self):
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.counts: dict[str, int] = {}
        self.ids: set = set()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        import uuid
        f = c.makefile("rb")
        try:
            for line in f:
                try:
                    msg = json.loads(line)
                    kind = msg["message_type"]
                except (ValueError, KeyError, TypeError):
                    c.sendall(b'{"client_id": null, "message_type": "Error", "payload": "invalid", "timestamp": 0}\n')
                    continue
                with self.lock:
                    self.counts[kind] = self.counts.get(kind, 0) + 1
                    if kind == "Connect":
                        self.ids.add(msg["client_id"])
                if kind == "Connect":
                    cid = msg["client_id"] or str(uuid.uuid4())
                    c.sendall(json.dumps({"client_id": cid, "message_type": "Connect", "payload": "Connected",
                                          "timestamp": time.time()}).encode() + b"\n")
                elif kind == "Disconnect":
                    break
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.closed = True
        self.sock.close()


def test_json_protocol_counts_exact(tmp_path):
    srv = JsonLineServer()
    try:
        p, r = run_bench(["--protocol", "json", "--clients", 40, "--rampup", 0.5, "--duration", 2,
                          "--keepalive", 1, "--messages", 3, "--client-prefix", "jt-",
                          "--server", f"127.0.0.1:{srv.port}", "--procs", 2], tmp_path)
        assert p.returncode == 0, p.stdout + p.stderr
        assert r["connected"] == 40 and r["disconnected"] == 40
        assert r["messages"]["sent"] == 120
        deadline = time.monotonic() + 5
        while srv.counts.get("Disconnect", 0) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The preflight client connects and disconnects once too.
        assert srv.counts["Connect"] == 41 and srv.counts["Disconnect"] == 41
        assert srv.counts["Data"] == 120
        assert srv.counts["Heartbeat"] == r["counters"]["pings"]
        assert srv.ids >= {f"jt-{i}" for i in range(40)}
    finally:
        srv.close()


@needs_mosquitto
def test_source_ips_round_robin(broker, tmp_path):
    import psutil
    b = broker()
    out = tmp_path / "src.json"
    cmd = [sys.executable, "-m", "gwbench", "--clients", 60, "--source-ips", "127.0.0.2-127.0.0.4",
           "--duration", 4, "--server", f"127.0.0.1:{b.port}", "--procs", 1, "--json", out, "--quiet"]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(seen.values()) < 60 and proc.poll() is None:
            time.sleep(0.3)
            seen = {}
            for c in psutil.Process(b.pid).net_connections(kind="tcp"):
                if c.raddr and c.status == psutil.CONN_ESTABLISHED:
                    seen[c.raddr.ip] = seen.get(c.raddr.ip, 0) + 1
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stdout + stderr
    assert seen == {"127.0.0.2": 20, "127.0.0.3": 20, "127.0.0.4": 20}
    r = json.loads(out.read_text())
    assert r["connected"] == 60 and r["disconnected"] == 60


# -- agreement between the pieces -----------------------------------------------------

@needs_engine
def test_engine_histogram_buckets_match_python():
    from gwbench import histogram as H
    from gwbench._ext.pubsub_engine import Engine

    rng = np.random.default_rng(99)
    v = np.concatenate([rng.lognormal(np.log(5e5), 2.0, 50_000), [0.0, 999.0, 1000.0, 1e11, 5e11]])
    eng = Engine(0, 16, 1, 1, 0, H.MIN_NS, H.GROWTH, H.NBUCKETS, 1)
    eng.record_latency(v.tolist())
    d = eng.latency_hist()
    h = Histogram()
    h.record_many(v)
    # Identical up to values that sit on a bucket edge within float rounding.
    diff = np.abs(d["counts"] - h.counts).sum()
    assert diff <= 2
    assert d["total"] == h.total


def test_bench_mqtt_encoder_agrees_with_project_codec():
    codec = pytest.importorskip("gw_ext.codec")
    from gw import packets as P
    from gwbench import mqtt

    data = (mqtt.connect(b"gwbench-1", 30, b"user", b"pw") + mqtt.publish(b"a/b", b"x" * 300, 1, 7)
            + mqtt.subscribe(3, b"a/+", 2) + mqtt.ack(mqtt.PUBREL, 9) + mqtt.PINGREQ_BYTES
            + mqtt.DISCONNECT_BYTES)
    pkts, used = codec.decode(data)
    assert used == len(data)
    assert isinstance(pkts[0], P.Connect) and pkts[0].client_id == "gwbench-1" and pkts[0].keepalive == 30
    assert pkts[0].username == "user" and pkts[0].password == b"pw"
    assert pkts[1] == P.Publish(topic="a/b", payload=b"x" * 300, qos=1, packet_id=7)
    assert isinstance(pkts[2], P.Subscribe)
    assert pkts[3] == P.Pubrel(packet_id=9)
    assert isinstance(pkts[4], P.Pingreq) and isinstance(pkts[5], P.Disconnect)
    # and the splitter reads what the codec writes
    buf = bytearray(codec.encode(P.Connack(return_code=0)) + codec.encode(P.Suback(packet_id=1, return_codes=[1]))
                    + codec.encode(P.Puback(packet_id=5)))
    got = mqtt.split(buf)
    assert [f >> 4 for f, _ in got] == [mqtt.CONNACK, mqtt.SUBACK, mqtt.PUBACK] and not buf


@needs_mosquitto
def test_plot_or_a_clear_error_without_matplotlib(broker, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        p, _ = run_bench(["--clients", 1, "--plot", tmp_path / "x.png", "--server", "127.0.0.1:1"], tmp_path,
                         timeout=30)
        assert p.returncode == 2 and "matplotlib" in p.stderr
        return
    b = broker()
    png = tmp_path / "run.png"
    p, r = run_bench(["--clients", 20, "--duration", 1, "--plot", png, "--server", f"127.0.0.1:{b.port}"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_accepts_100k_with_source_ips_and_procs(tmp_path):
    p, _ = run_bench(["--clients", 100_000, "--rampup", 30, "--procs", 6, "--source-ips", "127.0.0.1-127.0.0.8",
                      "--dry-run"], tmp_path, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "16,667 sockets each" in p.stdout and "8 (12,500 connections each" in p.stdout


# -- the commands: gwbench and gw bench -------------------------------------------------

def test_gw_bench_and_gwbench_are_the_same_command(tmp_path):
    """`gw bench` (a command of gw), `gwbench` (its own script) and `python -m
    gwbench` make the same plan; a plan error names the command typed."""
    script = Path(sys.executable).parent / "gwbench"
    commands = {"gw bench": [sys.executable, "-m", "gw.cli", "bench"], "gwbench": [str(script)],
                "python -m gwbench": [sys.executable, "-m", "gwbench"]}
    plans = {}
    for name, cmd in commands.items():
        p = subprocess.run([*cmd, *map(str, ["--clients", 5000, "--rampup", 10, "--procs", 2, "--client-prefix",
                                             "dev-", "--dry-run"])],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, name + p.stdout + p.stderr
        plans[name] = p.stdout
    assert plans["gw bench"] == plans["gwbench"] == plans["python -m gwbench"]
    assert "connection scenario: 5,000 clients" in plans["gwbench"] and "dev-0 .. dev-4999" in plans["gwbench"]

    too_many = list(map(str, ["--clients", 40_000, "--procs", 2, "--server", "127.0.0.1:1"]))
    for name in ("gw bench", "gwbench"):
        p = subprocess.run([*commands[name], *too_many], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and p.stderr.startswith(f"{name}: ") and "--procs 3" in p.stderr, p.stderr


@contextlib.contextmanager
def running_gw(tmp_path, python_flags=(), stderr=subprocess.PIPE):
    """`gw serve --workers 2` with an MQTT and a JSON listener (so deliveries
    cross workers), stopped by its pid on the way out."""
    mqtt_port, json_port = free_port(), free_port()
    cmd = [sys.executable, *python_flags, "-m", "gw.cli", "serve", "--workers", "2",
           "--mqtt", f"127.0.0.1:{mqtt_port}", "--json", f"127.0.0.1:{json_port}",
           "--mqtts", "off", "--jsons", "off", "--http", "off", "--https", "off", "--ws", "off", "--wss", "off", "--stats-interval", "0",
           "--data-dir", str(tmp_path / "gwdata")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 20
        up = False
        while time.monotonic() < deadline and proc.poll() is None and not up:
            try:
                socket.create_connection(("127.0.0.1", mqtt_port), timeout=0.2).close()
                socket.create_connection(("127.0.0.1", json_port), timeout=0.2).close()
                up = True
            except OSError:
                time.sleep(0.1)
        if not up:
            why = "timeout"
            if proc.poll() is not None:
                why = proc.stderr.read()[-500:] if proc.stderr else f"exit code {proc.returncode}"
            pytest.fail("gw serve did not start: " + why)
        yield mqtt_port, json_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_gw_serve_never_imports_the_load_generator(tmp_path):
    """gw imports gwbench only for `gw bench`: a `gw serve` (master, workers,
    pipeline) serving load imports none of it. Python's import log (-X
    importtime) of every process of the server tells; the same log of
    `gw bench` shows it."""
    log = tmp_path / "serve-imports.txt"
    with open(log, "w") as err, running_gw(tmp_path, ("-X", "importtime"), stderr=err) as (mqtt_port, json_port):
        for proto, port in (("mqtt", mqtt_port), ("json", json_port)):
            p, r = run_bench(["--protocol", proto, "--clients", 20, "--duration", 0.5, "--messages", 1,
                              "--server", f"127.0.0.1:{port}"], tmp_path)
            assert p.returncode == 0 and r["connected"] == 20, proto + p.stdout + p.stderr
    served = log.read_text()
    assert "gw_ext.loop" in served and "gw.pipeline" in served     # the workers' and pipeline's imports are logged
    assert "gwbench" not in served

    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "gw.cli", "bench", "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "gwbench.command" in p.stderr, p.stderr[-2000:]


# -- against gw itself ------------------------------------------------------------------

@pytest.fixture
def gw_server(tmp_path):
    """A running `gw serve --workers 2` (running_gw): its MQTT and JSON ports."""
    with running_gw(tmp_path) as ports:
        yield ports


def test_connection_scenario_against_gw_mqtt_and_json(gw_server, tmp_path):
    mqtt_port, json_port = gw_server
    for proto, port in (("mqtt", mqtt_port), ("json", json_port)):
        p, r = run_bench(["--protocol", proto, "--clients", 100, "--rampup", 0.5, "--duration", 1.5,
                          "--keepalive", 1, "--messages", 2, "--server", f"127.0.0.1:{port}"], tmp_path)
        assert p.returncode == 0, proto + p.stdout + p.stderr
        assert r["connected"] == 100 and r["disconnected"] == 100 and r["messages"]["sent"] == 200


# -- the Cython engine on a socketpair (exact accounting, no broker) -----------------------

def _publish(topic: bytes, pub_id: int, seq: int, qos: int = 0, pid: int = 0, size: int = 16) -> bytes:
    from gwbench import mqtt, payload
    return mqtt.publish(topic, payload.make(pub_id, seq, size), qos, pid)


@needs_engine
def test_engine_counts_unique_duplicates_out_of_order_and_foreign():
    from gwbench import histogram as H
    from gwbench._ext.pubsub_engine import Engine

    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        eng = Engine(1, 16, 2, 8, 0, H.MIN_NS, H.GROWTH, H.NBUCKETS, 1)
        eng.add(a.fileno(), a, True, 0, b"", b"", False)
        data = b"".join(_publish(b"t/p/0", 0, s, 1, i + 1) for i, s in enumerate([0, 1, 2, 2, 5, 3, 4]))
        data += _publish(b"t/p/1", 1, 0) + _publish(b"t/p/1", 1, 0)
        data += _publish(b"t/p/7", 7, 0)                       # publisher id out of range
        data += b"\x30\x05\x00\x01xab"                          # payload too short for a bench message
        b.sendall(data)
        eng.run(time.monotonic_ns() + 300_000_000)
        assert eng.received == 11
        assert eng.unique == 7 and eng.duplicates == 2 and eng.out_of_order == 2 and eng.foreign == 2
        assert eng.subscribers_missing([6, 1]) == 0
        assert eng.subscribers_missing([8, 2]) == 3
        assert eng.latency_hist()["total"] == 9
        b.settimeout(2)
        acks = b""
        while len(acks) < 7 * 4:
            acks += b.recv(4096)
        assert acks == b"".join(bytes((0x40, 2, 0, i + 1)) for i in range(7))   # a PUBACK per QoS 1 PUBLISH
    finally:
        a.close()
        b.close()


@needs_engine
def test_engine_publisher_keeps_the_inflight_window():
    from gwbench import histogram as H
    from gwbench import mqtt
    from gwbench._ext.pubsub_engine import Engine

    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(2)
    try:
        eng = Engine(1, 32, 1, 4, 0, H.MIN_NS, H.GROWTH, H.NBUCKETS, 1)
        eng.add(a.fileno(), a, False, 0, b"t/p/0", b"", False)
        eng.start(time.monotonic_ns(), 0.0)          # flat out
        eng.run(time.monotonic_ns() + 200_000_000)
        buf = bytearray()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                b.setblocking(False)
                buf += b.recv(65536)
            except BlockingIOError:
                break
        pkts = mqtt.split(buf)
        assert len(pkts) == 4 and eng.published == 4           # the window, no more
        assert [int.from_bytes(body[7:9], "big") for _, body in pkts] == [1, 2, 3, 4]
        b.sendall(mqtt.ack(mqtt.PUBACK, 1) + mqtt.ack(mqtt.PUBACK, 2))
        eng.run(time.monotonic_ns() + 200_000_000)
        assert eng.acked == 2 and eng.published == 6 and eng.unacked() == 4
        eng.stop_publishing()
        assert eng.publisher_counts() == {0: 6}
        assert not eng.publishers_idle()
    finally:
        a.close()
        b.close()


@needs_mosquitto
def test_username_password(broker, tmp_path):
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.skip("mosquitto_passwd is not installed")
    pw = tmp_path / "pw.txt"
    pw.write_text("")
    subprocess.run([passwd, "-b", str(pw), "alice", "s3cret"], check=True, timeout=10)
    b = broker(extra=f"password_file {pw}\n")
    # allow_anonymous true is in every Broker config; a password file still
    # makes Mosquitto check the credentials that are given.
    p, r = run_bench(["--clients", 20, "--duration", 0.5, "--username", "alice", "--password", "s3cret",
                      "--server", f"127.0.0.1:{b.port}"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert r["connected"] == 20
    p, _ = run_bench(["--clients", 20, "--duration", 0.5, "--username", "alice", "--password", "wrong",
                      "--server", f"127.0.0.1:{b.port}"], tmp_path)
    assert p.returncode == 2
    assert "bad user name or password" in p.stderr or "not authorized" in p.stderr


@needs_engine
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_pubsub_against_gw_counts_exact(gw_server, tmp_path, qos):
    """The same exact counting against gw (two workers, so most deliveries cross
    between them): at a modest rate everything arrives, each message once."""
    mqtt_port, _ = gw_server
    r = pubsub_counts_exact(mqtt_port, tmp_path, qos)
    assert r["delivery"]["out_of_order"] == 0
    assert r["connected"] == 5 and r["disconnected"] == 5


@needs_engine
@pytest.mark.parametrize("qos", [1, 2])
def test_pubsub_against_gw_lossless_flat_out(gw_server, tmp_path, qos):
    """QoS 1/2 flat out into gw: publishers are held back, nothing is lost."""
    mqtt_port, _ = gw_server
    pubsub_lossless_flat_out(mqtt_port, tmp_path, qos)


def test_server_pid_auto_finds_the_gw_master(gw_server):
    """--server-pid auto: the process listening on the port, climbed to gw's
    master (which holds its workers' sockets), so all workers are sampled."""
    import psutil
    from gwbench.command import resolve_server_pid

    mqtt_port, _ = gw_server
    pid = resolve_server_pid("auto", "127.0.0.1", mqtt_port)
    proc = psutil.Process(pid)
    assert "serve" in proc.cmdline()
    # The fixture's two workers and the pipeline process. The port answers as soon
    # as the master listens, before it forks them: a moment later they are there.
    deadline = time.monotonic() + 30
    while len(proc.children()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(proc.children()) == 3
    assert resolve_server_pid("auto", "127.0.0.1", mqtt_port) == pid
    with pytest.raises(click.BadParameter):
        resolve_server_pid("auto", "127.0.0.1", free_port())


# -- TLS clients on OpenSSL from Cython (gwbench/_ext/tls_clients.pyx) ---------------------


# Run in a subprocess: tls_clients.use_legacy_ec_keys() changes how the whole
# process decodes EC keys, so it must not leak into pytest's own process. The
# checks run twice, with it on and off: the same answers either way.
_TLS_CLIENTS_CHECKS = r'''
import json, select, socket, ssl, sys, threading
from gwbench._ext import tls_clients

legacy = sys.argv[1] == "1"
certs = json.loads(sys.argv[2])
if legacy:
    assert tls_clients.use_legacy_ec_keys()


class Server:
    """TLS echo server (Python's ssl) recording the SNI it was sent."""

    def __init__(self, cert, key, max_version=None):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        if max_version:
            self.ctx.maximum_version = max_version
        self.sni = []
        self.ctx.sni_callback = lambda sock, name, ctx: self.sni.append(name)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.echo, args=(c,), daemon=True).start()

    def echo(self, c):
        try:
            with self.ctx.wrap_socket(c, server_side=True) as t:
                data = t.recv(100)
                t.sendall(b"echo:" + data)
                t.recv(1)
        except (OSError, ssl.SSLError):
            pass


def client(ctx, port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    t = ctx.wrap(s.fileno())
    try:
        while True:
            r = t.handshake()
            if r == tls_clients.DONE:
                break
            select.select([s] if r == tls_clients.WANT_READ else [], [s] if r == tls_clients.WANT_WRITE else [], [], 5)
        assert t.send(b"hi") == 2
        data = None
        while not data:
            select.select([s], [], [], 5)
            data = t.recv()
        return t.version(), data
    finally:
        t.close()
        s.close()


def kind(ctx, port):
    try:
        client(ctx, port)
    except tls_clients.TLSError as e:
        return e.kind
    return "ok"


ca = certs["ca"]
good = Server(certs["good"], certs["good_key"])
tls12 = Server(certs["good"], certs["good_key"], ssl.TLSVersion.TLSv1_2)
forged = Server(certs["forged"], certs["forged_key"])     # names the CA as issuer, signed by another key
named = Server(certs["named"], certs["named_key"])        # for localhost only
rsa = Server(certs["rsa"], certs["rsa_key"])              # RSA leaf from an RSA CA

ctx = tls_clients.ClientContext(ca, False, "127.0.0.1")
assert client(ctx, good.port) == ("TLSv1.3", b"echo:hi")
assert client(ctx, tls12.port) == ("TLSv1.2", b"echo:hi")
assert good.sni == [None]                                  # no SNI for an IP address, as Python's ssl
assert kind(ctx, forged.port) == "tls_verify_failed"      # the signature is checked
assert kind(ctx, named.port) == "tls_verify_failed"       # 127.0.0.1 is not in its names
assert kind(tls_clients.ClientContext(certs["other_ca"], False, "127.0.0.1"), good.port) == "tls_verify_failed"
by_name = tls_clients.ClientContext(ca, False, "localhost")
assert client(by_name, named.port)[1] == b"echo:hi"
assert named.sni == [None, "localhost"]                # the IP-address client sent none
assert kind(by_name, good.port) == "tls_verify_failed"
insecure = tls_clients.ClientContext(None, True, None)
assert client(insecure, forged.port)[1] == b"echo:hi" and client(insecure, named.port)[1] == b"echo:hi"
assert client(tls_clients.ClientContext(certs["rsa_ca"], False, "127.0.0.1"), rsa.port)[1] == b"echo:hi"
assert kind(ctx, rsa.port) == "tls_verify_failed"

# A plain TCP server that closes at once: a TLS error with a name, not a hang.
plain = socket.socket()
plain.bind(("127.0.0.1", 0))
plain.listen(4)
def shut():
    c, _ = plain.accept()
    c.recv(4096)
    c.close()
threading.Thread(target=shut, daemon=True).start()
assert kind(ctx, plain.getsockname()[1]).startswith("tls_")

# epoll_wait: events as select.epoll.poll gives them, [] on timeout.
ep = select.epoll()
a, b = socket.socketpair()
ep.register(a.fileno(), select.EPOLLIN)
assert tls_clients.epoll_wait(ep.fileno(), 0.002) == []
b.send(b"x")
assert tls_clients.epoll_wait(ep.fileno(), 1.0) == [(a.fileno(), select.EPOLLIN)]
print("ok")
'''


def _write_test_certs(tmp_path: Path) -> dict:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    out = {}

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, issuer, key, signer, san=None, ca=False):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signer, hashes.SHA256())

    def write(label, c, key=None):
        p = tmp_path / f"{label}.pem"
        p.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        out[label] = str(p)
        if key is not None:
            k = tmp_path / f"{label}-key.pem"
            k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
            out[label + "_key"] = str(k)

    ip = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    write("ca", cert("gw test CA", "gw test CA", ca_key, ca_key, ca=True))
    write("other_ca", cert("gw other CA", "gw other CA", other_key, other_key, ca=True))
    k = ec.generate_private_key(ec.SECP256R1())
    write("good", cert("server", "gw test CA", k, ca_key, ip), k)
    k = ec.generate_private_key(ec.SECP256R1())
    write("forged", cert("server", "gw test CA", k, other_key, ip), k)
    k = ec.generate_private_key(ec.SECP256R1())
    write("named", cert("localhost", "gw test CA", k, ca_key, [x509.DNSName("localhost")]), k)
    rsa_ca_key, k = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    write("rsa_ca", cert("gw RSA CA", "gw RSA CA", rsa_ca_key, rsa_ca_key, ca=True))
    write("rsa", cert("server", "gw RSA CA", k, rsa_ca_key, ip), k)
    return out


@needs_tls_clients
@pytest.mark.parametrize("legacy_ec", ["1", "0"])
def test_tls_clients_verify_as_python_ssl_does(tmp_path, legacy_ec):
    """The Cython TLS clients make the handshake Python's ssl makes: TLS 1.3 and
    1.2, chain and signature checked against the CA, IP address or host name
    checked (SNI only for names), nothing checked with --insecure; with
    OpenSSL's built-in EC decoding (the default in gwbench) or without."""
    pytest.importorskip("cryptography")
    certs = _write_test_certs(tmp_path)
    p = subprocess.run([sys.executable, "-c", _TLS_CLIENTS_CHECKS, legacy_ec, json.dumps(certs)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr


@needs_mosquitto
@needs_tls_clients
def test_tls_connection_scenario_phases_and_python_ssl_fallback(broker, tmp_path):
    """The connection scenario over the Cython TLS clients and over Python's ssl
    (GW_BENCH_TLS=python): the same counts, every phase timed."""
    ca_pem, listener = mosquitto_tls(tmp_path, "127.0.0.1")
    b = broker(listener_extra=listener)
    for how in ("openssl", "python"):
        out = tmp_path / f"{how}.json"
        cmd = [sys.executable, "-m", "gwbench", "--clients", 40, "--rampup", 0.5, "--duration", 1, "--keepalive", 1,
               "--messages", 2, "--qos", 1, "--tls", "--cafile", ca_pem, "--server", f"127.0.0.1:{b.port}",
               "--procs", 2, "--json", out, "--quiet"]
        p = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=90,
                           env=dict(os.environ, GW_BENCH_TLS=how))
        assert p.returncode == 0, how + p.stdout + p.stderr
        r = json.loads(out.read_text())
        assert r["connected"] == 40 and r["disconnected"] == 40 and r["errors"] == {}, how
        assert r["messages"]["sent"] == 80 and r["messages"]["acked"] == 80, how
        ph = r["connect_phases_ms"]
        assert ph["tcp"]["count"] == ph["tls"]["count"] == ph["connack"]["count"] == 40, how
        assert ph["tls"]["min_ms"] > 0, how   # the handshake's end is timed when it ends


# -- MQTT over WebSocket (--transport ws) ------------------------------------------------

def test_websocket_transport_against_gw(gw_factory, tmp_path):
    """The load generator speaks MQTT over WebSocket (ws and wss): the
    connection scenario and the throughput engine count exactly, and gw saw
    the upgrades."""
    server = gw_factory(workers=2, listeners=("mqtt", "ws", "wss"))
    before = server.counters()
    p, r = run_bench(["--transport", "ws", "--clients", 100, "--rampup", 0.5, "--duration", 1.5, "--keepalive", 1,
                      "--messages", 2, "--qos", 1, "--server", f"127.0.0.1:{server.ports['ws']}"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert r["connected"] == 100 and r["disconnected"] == 100 and r["messages"]["acked"] == 200
    assert r["plan"]["transport"] == "ws" and r["plan"]["ws_path"] == "/mqtt"
    p, r = run_bench(["--transport", "ws", "--tls", "--cafile", server.ca, "--clients", 20, "--duration", 0.5,
                      "--messages", 1, "--server", f"localhost:{server.ports['wss']}"], tmp_path)
    assert p.returncode == 0 and r["connected"] == 20, p.stdout + p.stderr
    p, r = run_bench(["pubsub", "--transport", "ws", "-p", 3, "-S", 2, "--qos", 0, "--rate", 3000, "--size", 100,
                      "--duration", 2, "--server", f"127.0.0.1:{server.ports['ws']}"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    d = r["delivery"]
    assert d["expected"] == r["messages"]["sent"] * 2 == d["unique"] and d["duplicates"] == 0
    p, r = run_bench(["pubsub", "--transport", "ws", "-p", 4, "-S", 2, "--qos", 1, "--inflight", 32, "--size", 3000,
                      "--duration", 2, "--server", f"127.0.0.1:{server.ports['ws']}"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    m, d = r["messages"], r["delivery"]
    assert m["acked"] == m["sent"] > 0 and d["expected"] == m["sent"] * 2 == d["unique"] and d["lost"] == 0
    after = server.counters()
    assert counter_delta(before, after, "ws_upgrades") >= 100 + 20 + 5 + 6
    assert counter_delta(before, after, "closed_malformed") == 0


# -- MQTT 5.0 clients (--mqtt-version 5) ---------------------------------------------------

V5 = ("--mqtt-version", "5")


def _v5_decode(data: bytes) -> list:
    """The MQTT 5.0 packets in data (whole ones), decoded by the project's codec."""
    from gw_ext import codec5

    packets, consumed = codec5.decode(data)
    assert consumed == len(data)
    return packets


def _v5_one(data: bytes):
    (packet,) = _v5_decode(data)
    return packet


def _drain(sock) -> bytes:
    sock.setblocking(False)
    buf = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return buf
        if not chunk:
            return buf
        buf += chunk


@needs_engine
@pytest.mark.parametrize("alias_max", [0, 10])
def test_engine_v5_publisher_topic_alias_and_receive_maximum(alias_max):
    """An MQTT 5.0 publisher: with a Topic Alias Maximum from the server, the
    topic goes once with Topic Alias 1, then the alias alone (an empty topic);
    without one, the topic every time and no properties. The server's Receive
    Maximum (3) caps the window (8). A PUBACK with reason code 0x87 ends that
    publish as rejected, not acknowledged; one with 0x10 (No matching
    subscribers, a success) acknowledges it."""
    from gwbench import histogram as H
    from gwbench import mqtt
    from gwbench._ext.pubsub_engine import Engine

    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        eng = Engine(1, 32, 1, 8, 0, H.MIN_NS, H.GROWTH, H.NBUCKETS, 1, 5)
        eng.add(a.fileno(), a, False, 0, b"t/p/0", b"", False, topic_alias_maximum=alias_max, receive_maximum=3)
        assert eng.windows() == {0: 3}
        eng.start(time.monotonic_ns(), 0.0)
        eng.run(time.monotonic_ns() + 200_000_000)
        pkts = _v5_decode(_drain(b))
        assert len(pkts) == 3 and eng.published == 3                  # the server's Receive Maximum
        assert [p.packet_id for p in pkts] == [1, 2, 3]
        if alias_max:
            assert [p.topic for p in pkts] == ["t/p/0", "", ""]
            assert all(p.properties.topic_alias == 1 for p in pkts)
        else:
            assert [p.topic for p in pkts] == ["t/p/0"] * 3
            assert all(p.properties.topic_alias is None for p in pkts)
        # 0x87 Not authorized, then 0x10 No matching subscribers (a success), then the short form.
        b.sendall(bytes((0x40, 3, 0, 1, 0x87)) + bytes((0x40, 4, 0, 2, 0x10, 0)) + mqtt.ack(mqtt.PUBACK, 3))
        eng.run(time.monotonic_ns() + 200_000_000)
        assert eng.rejected == 1 and eng.acked == 2
        assert eng.published == 6 and eng.unacked() == 3 and eng.errors() == {}
        more = _v5_decode(_drain(b))
        assert [p.packet_id for p in more] == [4, 5, 6]
        assert [p.topic for p in more] == (["", "", ""] if alias_max else ["t/p/0"] * 3)
        # The server's DISCONNECT: the connection is lost, counted by its reason code.
        b.sendall(bytes((0xE0, 1, 0x8B)))
        eng.run(time.monotonic_ns() + 200_000_000)
        assert eng.dropped == 1 and eng.errors() == {"disconnect_0x8b": 1}
    finally:
        a.close()
        b.close()


@needs_engine
def test_engine_v5_subscriber_counts_and_acks():
    """An MQTT 5.0 subscriber: PUBLISH packets with properties (a Topic Alias, a
    User Property) are counted as the 3.1.1 ones are; each QoS 1 one gets a PUBACK."""
    from gwbench import histogram as H
    from gwbench import payload
    from gwbench._ext.pubsub_engine import Engine
    from gw_ext import codec5
    from gw.packets5 import Properties, Publish

    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        eng = Engine(1, 16, 2, 8, 0, H.MIN_NS, H.GROWTH, H.NBUCKETS, 1, 5)
        eng.add(a.fileno(), a, True, 0, b"", b"", False)
        data = b""
        for i, (pub, seq) in enumerate([(0, 0), (0, 1), (1, 0), (0, 1)]):
            props = Properties(topic_alias=2, user_properties=(("k", "v"),)) if i % 2 else Properties()
            data += codec5.encode(Publish(topic="t/p/0" if i != 3 else "", qos=1, packet_id=i + 1,
                                          payload=payload.make(pub, seq, 16), properties=props))
        b.sendall(data)
        eng.run(time.monotonic_ns() + 300_000_000)
        assert eng.received == 4 and eng.unique == 3 and eng.duplicates == 1
        b.settimeout(2)
        acks = b""
        while len(acks) < 4 * 4:
            acks += b.recv(4096)
        assert acks == b"".join(bytes((0x40, 2, 0, i + 1)) for i in range(4))
    finally:
        a.close()
        b.close()


@needs_engine
@pytest.mark.parametrize("qos", [0, 1])
def test_v5_pubsub_against_gw_counts_exact(gw_factory, tmp_path, qos):
    """MQTT 5.0 clients against gw (two workers): exact counts, every client
    counted by gw as MQTT 5.0, and one Topic Alias set per publisher (the
    topic went once; every later publish carried the alias alone)."""
    server = gw_factory(workers=2, listeners=("mqtt",))
    before = server.counters()
    r = pubsub_counts_exact(server.ports["mqtt"], tmp_path, qos, extra=V5)
    assert r["plan"]["mqtt_version"] == "5"
    assert r["connected"] == 5 and r["disconnected"] == 5 and r["delivery"]["out_of_order"] == 0
    after = server.counters()
    assert counter_delta(before, after, "mqtt5_connected") == 6        # the preflight's client and the 5
    assert counter_delta(before, after, "mqtt5_topic_aliases_set") == 3
    assert counter_delta(before, after, "packets_in.publish") == r["messages"]["sent"]
    if qos:
        assert r["messages"]["acked"] == r["messages"]["sent"] and r["messages"]["rejected"] == 0


@needs_engine
def test_v5_pubsub_against_gw_lossless_flat_out(gw_factory, tmp_path):
    server = gw_factory(workers=2, listeners=("mqtt",))
    r = pubsub_lossless_flat_out(server.ports["mqtt"], tmp_path, 1, extra=V5)
    assert r["messages"]["rejected"] == 0 and r["errors"] == {}


@needs_engine
def test_v5_publishes_refused_by_gw_are_rejected_not_acked(gw_factory, tmp_path):
    """gw's ACL refuses the publishers (an MQTT 5.0 PUBACK 0x87): each publish is
    counted rejected, none acknowledged, and the run fails."""
    acl = tmp_path / "acl"
    acl.write_text("topic read gwbench/#\n")
    server = gw_factory(workers=2, listeners=("mqtt",), args=["--acl-file", str(acl)])
    p, r = run_bench(["pubsub", "-p", 2, "-S", 1, "--qos", 1, "--rate", 1000, "--duration", 1,
                      "--server", f"127.0.0.1:{server.ports['mqtt']}", *V5], tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    m = r["messages"]
    assert m["sent"] > 0 and m["rejected"] == m["sent"] and m["acked"] == 0 and m["unacked"] == 0
    assert r["delivery"]["unique"] == 0
    assert "rejected (reason code >= 0x80)" in p.stdout


def test_v5_connection_scenario_against_gw(gw_factory, tmp_path):
    server = gw_factory(workers=2, listeners=("mqtt",))
    before = server.counters()
    p, r = run_bench(["--clients", 100, "--rampup", 0.5, "--duration", 1.5, "--keepalive", 1, "--messages", 3,
                      "--qos", 1, "--server", f"127.0.0.1:{server.ports['mqtt']}", *V5], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert r["connected"] == 100 and r["disconnected"] == 100 and r["errors"] == {}
    assert r["messages"]["sent"] == 300 and r["messages"]["acked"] == 300 and r["messages"]["rejected"] == 0
    after = server.counters()
    assert counter_delta(before, after, "mqtt5_connected") == 101
    assert counter_delta(before, after, "mqtt5_topic_aliases_set") == 100     # a topic once per client
    assert "(mqtt 5)" in p.stdout


@needs_mosquitto
def test_v5_connection_scenario_against_mosquitto(broker, tmp_path):
    b = broker()
    p, r = run_bench(["--clients", 200, "--rampup", 1, "--duration", 2, "--keepalive", 1,
                      "--messages", 2, "--qos", 1, "--server", f"127.0.0.1:{b.port}", "--procs", 2, *V5], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert r["connected"] == 200 and r["disconnected"] == 200 and r["errors"] == {}
    assert r["messages"]["sent"] == 400 and r["messages"]["acked"] == 400


@needs_mosquitto
@needs_engine
def test_v5_pubsub_against_mosquitto_counts_exact(broker, tmp_path):
    """Mosquitto 2.0 speaks MQTT 5.0 (its Topic Alias Maximum: 10)."""
    b = broker()
    r = pubsub_counts_exact(b.port, tmp_path, 0, extra=V5)
    assert r["connected"] == 5 and r["disconnected"] == 5


@needs_mosquitto
@needs_engine
def test_v5_pubsub_against_mosquitto_lossless_flat_out(broker, tmp_path):
    b = broker(extra="max_queued_messages 0\nmax_inflight_messages 0\n")
    r = pubsub_lossless_flat_out(b.port, tmp_path, 1, extra=V5)
    assert r["messages"]["rejected"] == 0 and r["errors"] == {}


@needs_mosquitto
@needs_engine
def test_v5_keeps_to_mosquittos_receive_maximum(broker, tmp_path):
    """Mosquitto announces max_inflight_messages as its Receive Maximum and
    refuses a QoS 1 publish beyond it (PUBACK 0x97 Quota exceeded): the
    publishers keep 4 in flight, not --inflight's 32, and nothing is refused."""
    b = broker(extra="max_queued_messages 0\nmax_inflight_messages 4\n")
    p, r = run_bench(["pubsub", "-p", 2, "-S", 1, "--qos", 1, "--inflight", 32, "--duration", 1.5,
                      "--server", f"127.0.0.1:{b.port}", *V5], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    m = r["messages"]
    assert m["sent"] > 0 and m["acked"] == m["sent"] and m["rejected"] == 0
    assert r["delivery"]["unique"] == m["sent"]
    assert any("Receive Maximum (4)" in n for n in r["notes"]), r["notes"]


def test_v5_refused_where_it_does_not_apply(tmp_path):
    for args in (["--protocol", "json", *V5], ["ingest", "--transport", "mqtt", *V5]):
        p, _ = run_bench([*args, "--server", "127.0.0.1:1", "--dry-run"], tmp_path, timeout=30)
        assert p.returncode == 2 and "--mqtt-version 5" in p.stderr, p.stderr
    p, _ = run_bench(["pubsub", *V5, "--server", "127.0.0.1:1", "--dry-run"], tmp_path, timeout=30)
    assert p.returncode == 0 and "(mqtt 5)" in p.stdout


def test_v5_mqtt_encoder_agrees_with_project_codec():
    """gwbench/mqtt.py's MQTT 5.0 packets decode with the project's codec as meant."""
    from gw_ext import codec5
    from gwbench import mqtt

    c = _v5_one(mqtt.connect(b"cid", 30, b"u", b"p", version=5))
    assert (c.client_id, c.keepalive, c.username, c.password, c.clean_start) == ("cid", 30, "u", b"p", True)
    p = _v5_one(mqtt.publish(b"a/b", b"xyz", 1, 7, version=5, alias=1))
    assert (p.topic, p.packet_id, p.payload, p.properties.topic_alias) == ("a/b", 7, b"xyz", 1)
    p = _v5_one(mqtt.publish(b"", b"xyz", 0, version=5, alias=1))
    assert (p.topic, p.properties.topic_alias) == ("", 1)
    p = _v5_one(mqtt.publish(b"a/b", b"xyz", 0, version=5))
    assert (p.topic, p.properties.topic_alias) == ("a/b", None)
    s = _v5_one(mqtt.subscribe(3, b"a/+", 1, version=5))
    assert s.packet_id == 3 and s.topics == [("a/+", 1)]
    from gw.packets5 import Connack, Properties, Suback
    rc, props = mqtt.connack5(codec5.encode(Connack(reason_code=0, properties=Properties(
        topic_alias_maximum=64, receive_maximum=20, maximum_packet_size=1 << 20)))[2:])
    assert rc == 0 and props[mqtt.P_TOPIC_ALIAS_MAXIMUM] == 64 and props[mqtt.P_RECEIVE_MAXIMUM] == 20
    assert mqtt.suback5_codes(codec5.encode(Suback(packet_id=1, reason_codes=[0x87]))[2:]) == b"\x87"


def test_client_process_sizes_its_descriptor_table_up_front():
    """A client process grows its descriptor table for all its sockets before
    the ramp (a doubling during it stalls every client of the process)."""
    code = ("import resource\n"
            "from gwbench.client_process import FD_HEADROOM, _raise_nofile, _reserve_fd_table\n"
            "def fdsize():\n"
            "    return int(next(l for l in open('/proc/self/status') if l.startswith('FDSize:')).split()[1])\n"
            "before = fdsize()\n"
            "_raise_nofile()\n"
            "_reserve_fd_table(5000)\n"
            "print(before, fdsize(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], FD_HEADROOM)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    before, after, limit, headroom = map(int, out)
    assert before < 5000
    assert after >= min(5000 + headroom, limit)
