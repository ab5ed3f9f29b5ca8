"""bench/connect_wire.py: a capture of 200 real connects to gw splits into
phases that add up (kernel + client + server = total, per connection), and the
stall list holds only server answers over the threshold. Not a timed test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def can_capture() -> bool:
    if not shutil.which("tcpdump"):
        return False
    r = subprocess.run(["tcpdump", "-D"], capture_output=True, timeout=20)
    return r.returncode == 0 and b"lo" in r.stdout


@pytest.mark.skipif(not can_capture(), reason="tcpdump missing or cannot capture on lo")
def test_phases_add_up(tmp_path):
    from connect_wire import parse_pcap, split
    pcap, out = tmp_path / "cap.pcap", tmp_path / "split.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "connect_wire.py"), "--workers", "1",
                        "--clients", "200", "--rampup", "1", "--slow-ms", "0",
                        "--pcap", str(pcap), "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "server" in r.stdout and "kernel" in r.stdout
    res = json.loads(out.read_text())
    # the 200 clients (gw bench may open one more connection of its own)
    assert res["complete"] >= 200, res
    assert set(res["phases"]) == {"kernel", "client", "server", "total"}
    # Per connection the three phases add up to the total.
    conns = parse_pcap(pcap, res["port"])
    full = [c for c in conns.values() if all(k in c for k in ("syn", "synack", "connect", "connack"))]
    assert len(full) == res["complete"]
    for c in full:
        assert c["syn"] <= c["synack"] <= c["connect"] <= c["connack"]
        parts = (c["synack"] - c["syn"]) + (c["connect"] - c["synack"]) + (c["connack"] - c["connect"])
        assert abs(parts - (c["connack"] - c["syn"])) < 1e-9
    ph = res["phases"]
    assert ph["total"]["max"] <= ph["kernel"]["max"] + ph["client"]["max"] + ph["server"]["max"] + 1e-9
    assert ph["server"]["p50"] <= ph["total"]["max"]
    # With a 0 ms threshold every answer is listed; with a huge one none is.
    assert len(res["slow_server"]) == res["complete"]
    assert split(conns, slow_ms=1e9)["slow_server"] == []


@pytest.mark.skipif(not can_capture(), reason="tcpdump missing or cannot capture on lo")
def test_tls_flights_in_order(tmp_path):
    """--tls: each TLS connect splits into its flights, in order on the wire,
    and the phases never add up to more than the total."""
    from connect_wire import TLS_PHASES, parse_pcap, tls_phases
    pcap, out = tmp_path / "cap.pcap", tmp_path / "split.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "connect_wire.py"), "--tls", "--workers", "1",
                        "--clients", "100", "--rampup", "1", "--pcap", str(pcap), "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["complete"] >= 100, res
    assert set(res["phases"]) == {name for name, _, _ in TLS_PHASES}
    assert set(res["slowest_1pct_mean_ms"]) == set(res["phases"])
    flights = [p for p in map(tls_phases, parse_pcap(pcap, res["port"]).values()) if p is not None]
    assert len(flights) == res["complete"]
    for p in flights:
        order = [p[k] for k in ("syn", "synack", "hello", "flight", "finished", "last_in", "done")]
        assert order == sorted(order), p
        parts = sum(p[b] - p[a] for name, a, b in TLS_PHASES if name != "total")
        assert parts <= p["done"] - p["syn"] + 1e-9
