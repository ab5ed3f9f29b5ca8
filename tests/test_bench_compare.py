"""bench/compare.py with a third broker (`--peer NAME=HOST:PORT[:PID]`): a real
Mosquitto started here stands for the user's broker. Not a timed test: it checks
that the peer ran the same load and has its rows in the printed table."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker_fixtures import MOSQUITTO, Mosquitto

ROOT = Path(__file__).resolve().parent.parent

needs_mosquitto = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto is not installed")


def compare(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| scenario")]


@needs_mosquitto
def test_peer_gets_the_same_load_and_its_rows(tmp_path):
    peer = Mosquitto(tmp_path / "peer", extra=("max_connections -1",)).start()
    try:
        r = compare("--only", "idle-1k-plain", "--only", "idle-1k-tls",
                    "--peer", f"other-broker=127.0.0.1:{peer.port}:{peer.pid}")
        assert peer.alive(), "compare.py must leave the peer running"
    finally:
        peer.stop()
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout)
    by_broker = {}
    for row in rows:
        by_broker.setdefault(row[1], []).append(row)
    assert set(by_broker) == {"gw", "mosquitto", "other-broker"}, r.stdout
    # The plain scenario for each of the three; the TLS one skips the peer.
    assert [row[0] for row in by_broker["other-broker"]] == ["1,000 idle plain connections over 2 s"], r.stdout
    assert len(by_broker["gw"]) == len(by_broker["mosquitto"]) == 2, r.stdout
    scenario, _, connected, p50, p99, rss = by_broker["other-broker"][0]
    assert connected == "1,000/1,000 (100%)", r.stdout
    float(p50), float(p99)
    float(rss)      # measured: the PID was given


@needs_mosquitto
def test_peer_without_pid_has_no_memory_figure(tmp_path):
    peer = Mosquitto(tmp_path / "peer").start()
    try:
        r = compare("--only", "idle-1k-plain", "--peer", f"nopid=127.0.0.1:{peer.port}")
    finally:
        peer.stop()
    assert r.returncode == 0, r.stderr
    rows = [row for row in table_rows(r.stdout) if row[1] == "nopid"]
    assert len(rows) == 1 and rows[0][2] == "1,000/1,000 (100%)", r.stdout
    assert rows[0][5] == "-", r.stdout


@pytest.mark.parametrize("spec", ["noequals", "gw=127.0.0.1:1883", "x=127.0.0.1", "x=127.0.0.1:0",
                                  "x=127.0.0.1:70000", "x=127.0.0.1:1883:abc", "x=:1883", "a b=127.0.0.1:1"])
def test_bad_peer_specs_are_refused(spec):
    r = compare("--peer", spec, "--list", timeout=60)
    assert r.returncode == 2 and "--peer" in r.stderr, (r.returncode, r.stderr)


def test_peer_spec_forms():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import compare as cmp
    finally:
        sys.path.pop(0)
    p = cmp.parse_peer("emqx=10.0.0.5:1883:4242")
    assert (p.name, p.host, p.port, p.pid) == ("emqx", "10.0.0.5", 1883, 4242)
    p = cmp.parse_peer("v6=[::1]:1884")
    assert (p.name, p.host, p.port, p.pid) == ("v6", "::1", 1884, None)
