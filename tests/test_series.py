"""The stats series (gw/series.py): the master's ring of a point a second in shared
memory, read by the workers for GET /v1/stats/series; and the route against a
running `gw serve`."""

from __future__ import annotations

import os

import pytest

from conftest import wait_for
from gw.series import GLOBAL_NAMES, SeriesRecorder, SeriesRing, series_answer
from gw.stats import Counter, Layout, StatsBlock
from http_client import HttpConn


@pytest.fixture
def block():
    b = StatsBlock.create(2, os.getpid())
    yield b
    b.close(unlink=True)


def ring_rows(ring, values):
    for v in values:
        ring.append([float(v)] * ring.fields)


def test_ring_keeps_the_last_capacity_points_in_order():
    ring = SeriesRing.create(2, capacity=5)
    assert ring.read(-1) == (0, [])
    ring_rows(ring, range(12))
    first, rows = ring.read(-1)
    # capacity - 1: the oldest row is the one the next write takes.
    assert first == 8 and [r[0] for r in rows] == [8, 9, 10, 11]
    first, rows = ring.read(9)
    assert first == 10 and [r[0] for r in rows] == [10, 11]
    first, rows = ring.read(11)
    assert first == 12 and len(rows) == 0
    # A cursor from before a restart of the master (beyond what was written): everything again.
    first, rows = ring.read(50)
    assert first == 8 and len(rows) == 4
    ring.close()


def test_ring_is_shared_with_a_forked_reader():
    ring = SeriesRing.create(1, capacity=8)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                        # the "worker": reads what the master writes after the fork
        try:
            os.read(r, 1)
            first, rows = ring.read(-1)
            os._exit(0 if (first, [r[0] for r in rows]) == (0, [1.0, 2.0, 3.0]) else 1)
        except BaseException:
            os._exit(2)
    ring_rows(ring, [1, 2, 3])
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    os.close(r)
    os.close(w)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_read_during_writes_drops_what_they_overwrote():
    ring = SeriesRing.create(1, capacity=7)
    ring_rows(ring, range(6))
    real = ring.rows
    writes = iter(range(6, 9))

    class Racing:
        """The rows as the reader copies them, while the master writes three more points."""
        def __getitem__(self, idx):
            out = real[idx]
            for v in writes:
                ring.rows = real
                ring.append([float(v)] * ring.fields)
            return out

    ring.rows = Racing()
    first, rows = ring.read(-1)
    ring.rows = real
    # Points 6, 7, 8 took the rows of 6 - 7 (none), 0 and 1, and the count moved to 9
    # meanwhile; point 9 may be being written over point 2 as the count is read: only 3,
    # 4 and 5 are sure.
    assert first == 3 and [r[0] for r in rows] == [3.0, 4.0, 5.0]


def test_recorder_rates_gauges_and_worker_load(block):
    ring = SeriesRing.create(2, capacity=10)
    rec = SeriesRecorder(block, ring)
    rec.prev_t -= 1.0            # a second ago, as the master's timer makes it
    block.rows[0, Counter.MSGS_IN] += 500
    block.rows[1, Counter.MSGS_IN] += 1500
    block.rows[0, Counter.CONNS_CURRENT] = 7
    block.rows[1, Counter.CONNS_CURRENT] = 3
    block.rows[0, Counter.WAL_APPENDED_OFFSET] = 1000
    block.rows[0, Counter.WAL_DURABLE_OFFSET] = 400
    block.rows[1, Counter.HIST_LOOP_TURN + Layout.HIST_SUM] += 250_000_000      # 0.25 s in turns
    block.header[Layout.H_SINK_LAG] = 4096
    block.header[Layout.H_ALERTS] += 2
    rec.tick()
    answer = series_answer(ring, block, -1)
    cols = answer.columns
    assert set(cols) == set(GLOBAL_NAMES)
    assert 1700 <= cols["msg_in"][0] <= 2000          # 2,000 messages over a little more than a second
    assert cols["connections"] == [10.0]
    assert cols["wal_pending_bytes"] == [600.0]
    assert cols["store_lag_bytes"] == [4096.0]
    assert 1.5 <= cols["alerts"][0] <= 2.0
    assert answer.workers[0].columns["connections"] == [7.0]
    assert 0.2 <= answer.workers[1].columns["busy"][0] <= 0.25
    assert answer.workers[0].columns["busy"] == [0.0]
    assert (answer.first, answer.last) == (0, 0)
    # Counters that went back (a respawned worker's row) count as no change, never negative.
    block.rows[1, Counter.MSGS_IN] = 0
    rec.tick()
    assert series_answer(ring, block, 0).columns["msg_in"] == [0.0]
    ring.close()


def test_route_against_gw_serve(gw_factory):
    server = gw_factory(workers=2, listeners=("http",))
    with HttpConn(server.ports["http"]) as conn:
        first = wait_for(lambda: (lambda a: a if a["last"] >= 2 else None)(
            conn.request("GET", "/v1/stats/series").json()), 20, 0.2, "three points")
        assert len(first["workers"]) == 2 and all(w["pid"] for w in first["workers"])
        assert first["interval"] == 1.0 and first["capacity"] == 900
        n = len(first["columns"]["t"])
        assert n == first["last"] - first["first"] + 1 and n >= 3
        assert all(len(v) == n for v in first["columns"].values())
        t = first["columns"]["t"]
        assert all(0.5 <= b - a <= 2.5 for a, b in zip(t, t[1:])), t
        # The requests just made show up in the HTTP rate of a later point.
        later = wait_for(lambda: (lambda a: a if a["columns"]["t"] and sum(a["columns"]["http"]) > 0 else None)(
            conn.request("GET", f"/v1/stats/series?after={first['last']}").json()), 20, 0.2, "http requests")
        assert later["first"] == first["last"] + 1
        for bad in ("after=x", "after=-2", "after=1&after=2", "limit=3", "after=%C2%B2", "after=" + "9" * 19):
            resp = conn.request("GET", f"/v1/stats/series?{bad}")
            assert resp.status == 400, bad
