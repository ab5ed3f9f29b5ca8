"""The [stats] log line and `gw stats` (shared-memory counters read from outside)."""

from __future__ import annotations

import re

import pytest

from conftest import (STATS_LINE, mqtt_client, publish_packet, read_packet, run_gw, wait_for)
from gw.stats import Layout

NCLIENTS = 20
MEMORY_LINE = re.compile(r"\[memory\] PSS \d+\.\d MB, RSS \d+\.\d MB \| master \d+\.\d / \d+\.\d"
                         r"( \| worker \d+ \d+\.\d / \d+\.\d)+ \| pipeline \d+\.\d / \d+\.\d \(MB, PSS / RSS\)")


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, listeners=("mqtt", "json"), stats_interval=0.2)


def test_stats_line_in_the_log(server):
    lines = wait_for(lambda: (m if len(m := [l for l in server.log().splitlines()
                                             if "[stats]" in l]) >= 3 else None),
                     10, what="three [stats] lines")
    for line in lines:
        assert STATS_LINE.search(line), line


def test_twenty_clients_counted(server):
    socks = [mqtt_client(server.ports["mqtt"], f"s{i}") for i in range(NCLIENTS)]
    try:
        socks[0].sendall(publish_packet("t", b"x", qos=1, packet_id=1))
        assert read_packet(socks[0]) == (0x40, b"\x00\x01")
        stats = server.stats(as_json=True)
        assert stats["clients"] == NCLIENTS
        assert stats["peak"] >= NCLIENTS
        assert stats["memory_mb"] > 0
        counters = stats["counters"]
        assert counters["packets_in"]["connect"] >= NCLIENTS
        assert counters["packets_out"]["connack"] >= NCLIENTS
        assert counters["mqtt_connected"] >= NCLIENTS
        assert counters["sessions_current"] == NCLIENTS
        assert counters["msgs_in"] >= 1
        assert set(counters["malformed"]) >= {"fixed_header", "remaining_length", "utf8",
                                              "protocol", "topic"}
        # The master's line reports them too.
        wait_for(lambda: re.search(rf"\[stats\] clients: {NCLIENTS} \| peak: \d+", server.log()),
                 10, what=f"a [stats] line with clients: {NCLIENTS}")
        # `gw stats` without --json: the [stats] line, the sinks' line, the memory line.
        out = server.stats(as_json=False)
        lines = out.strip().splitlines()
        assert len(lines) == 3, out
        assert STATS_LINE.fullmatch(lines[0]), out
        assert re.fullmatch(r"\[sinks\] store: lag \d+\.\d MB, \d+\.\d s \| written \d+", lines[1]), out
        assert MEMORY_LINE.fullmatch(lines[2]), out
        assert f"clients: {NCLIENTS} |" in out
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: server.stats()["clients"] == 0, 20, what="clients back to 0")


def test_gw_stats_shows_pss_beside_rss_per_process(server):
    """`gw stats --json`: each process of the server (the master, every worker,
    the pipeline) with its RSS, PSS and USS from /proc/PID/smaps_rollup, and their
    sums; a page shared by several processes is counted whole in each RSS and
    divided in the PSS, so PSS <= RSS, and USS (its own pages) <= PSS."""
    memory = server.stats(as_json=True)["memory"]
    header = server.block().header
    expected = {"master": server.pid, "pipeline": header[Layout.H_PIPELINE_PID],
                **{f"worker {slot}": pid for slot, pid in
                   enumerate(header[Layout.H_WORKER_PIDS:Layout.H_WORKER_PIDS + 2].tolist())}}
    assert {p["process"]: p["pid"] for p in memory["processes"]} == expected
    for p in memory["processes"]:
        assert 0 < p["uss_bytes"] <= p["pss_bytes"] <= p["rss_bytes"], p
    for kind in ("rss", "pss", "uss"):
        assert memory[f"{kind}_bytes"] == sum(p[f"{kind}_bytes"] for p in memory["processes"])
    # The workers share the pages the master filled before forking: the sum of
    # the PSS is below the sum of the RSS.
    assert memory["pss_bytes"] < memory["rss_bytes"]


def test_gw_stats_when_the_master_has_not_logged_yet(gw_factory):
    """Regression: with clients above the peak the master last recorded (here the
    master never logs: --stats-interval 0), `gw stats` tried to store the peak in
    its read-only mapping and crashed."""
    gw = gw_factory(workers=1, listeners=("mqtt",), stats_interval=0)
    with mqtt_client(gw.ports["mqtt"], "only"):
        stats = gw.stats()
        assert stats["clients"] == 1
        assert stats["peak"] >= 1
        assert "clients: 1 | peak: 1 |" in gw.stats(as_json=False)


def test_gw_stats_without_a_server(tmp_path):
    for args in (["stats"], ["stats", "--json"]):
        res = run_gw(*args, "--data-dir", tmp_path / "nothing", "--interval", "0.1")
        assert res.returncode != 0
        assert res.stdout == ""
        assert "no running gw" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_gw_stats_with_a_stale_pid_file(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    data = tmp_path / "data"
    data.mkdir()
    (data / "gw.pid").write_text(f"{dead.pid}\n")
    res = run_gw("stats", "--data-dir", data, "--interval", "0.1")
    assert res.returncode != 0
    assert "no running gw" in res.stderr and str(dead.pid) in res.stderr
