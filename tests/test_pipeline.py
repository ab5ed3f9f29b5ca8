"""The pipeline process (gw/pipeline): real write-ahead log files, a real SQLite
store, real child processes killed with SIGKILL.

Also the shared helpers of tests/test_store.py, tests/test_sinks.py and
bench/bench_store.py: logs written with gw_ext/wal's writer, readings in the
normalised form the workers log, a stand-in for the stats block's durable
offsets.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gw.ingest import Telemetry                     # noqa: E402
from gw.pipeline import Pipeline, PipelineError, Settings   # noqa: E402
from gw.pipeline.source import worker_dir          # noqa: E402

def wal_api():
    """The write-ahead log module (gw_ext/wal.pyx): its writer makes the tests'
    logs, its reader is what the pipeline reads them with."""
    import gw_ext.wal as wal
    return wal


# --- readings and logs ------------------------------------------------------------------

_ENCODE = msgspec.json.Encoder().encode
# Yesterday, 00:00 UTC: within every retention period (the store deletes old data
# by the wall clock as soon as it starts).
T0 = float(int(time.time()) // 86400 * 86400 - 86400)


def reading(device_id: str, ts: float, seq: int | None, metrics: dict, tags: dict | None = None,
            payload: bytes = b"null") -> bytes:
    """A normalised reading, encoded as gw/ingest.py publishes (and the workers log) it."""
    return _ENCODE(Telemetry(device_id, datetime.fromtimestamp(ts, timezone.utc), seq,
                             {k: float(v) for k, v in metrics.items()}, tags or {},
                             msgspec.Raw(payload)))


def write_log(data_dir, slot: int, payloads, wal=None, segment_bytes: int = 64 << 20) -> int:
    """Appends payloads to worker `slot`'s log with the real writer; returns the
    log's end offset (everything durable: fsync off means written)."""
    wal = wal or wal_api()
    d = worker_dir(data_dir, slot)
    w = wal.Wal(str(d), fsync="off", segment_bytes=segment_bytes, max_pending=1 << 30)
    end = w.recover()["end_offset"]
    for p in payloads:
        end = w.append(p)
        assert end >= 0, "the log refused a record"
    assert w.close(60)
    return int(end)


def fleet(nworkers: int, per_worker: int, devices_per_worker: int = 20, spike_every: int = 0,
          rate_hz: float = 1.0, start: float = T0) -> list[list[bytes]]:
    """Readings per worker log: device `w{w}-d{k}` lives on worker w (as a
    device's connection does), readings round-robin over its devices at
    rate_hz per device; two metrics, smooth; every `spike_every`-th reading of
    a device (if set) is a +40 spike in temp_c."""
    rng = np.random.default_rng(12345)
    out = []
    for w in range(nworkers):
        payloads = []
        for i in range(per_worker):
            k = i % devices_per_worker
            n = i // devices_per_worker
            ts = start + n / rate_hz + k * 1e-3
            temp = 20.0 + 0.5 * float(rng.standard_normal())
            if spike_every and n % spike_every == spike_every - 1:
                temp += 40.0
            payloads.append(reading(f"w{w}-d{k}", ts, n, {"temp_c": round(temp, 3),
                                                          "humidity_pct": round(45 + float(rng.random()), 2)},
                                    {"site": "AAL"}))
        out.append(payloads)
    return out


class Durable:
    """The durable offsets as the stats block carries them (block.rows[slot, 141])."""

    def __init__(self, nworkers: int):
        from gw.pipeline.core import durable_index
        from gw.stats import N_COUNTERS
        self.index = durable_index()
        self.rows = np.zeros((nworkers, N_COUNTERS), dtype=np.uint64)

    def set(self, slot: int, offset: int) -> None:
        self.rows[slot, self.index] = offset

    def __call__(self, slot: int) -> int:
        return int(self.rows[slot, self.index])


def settings(data_dir, **kw) -> Settings:
    kw.setdefault("pipeline_poll_interval", 0.005)
    kw.setdefault("pipeline_retain_interval", 0.2)
    return Settings(data_dir=str(data_dir), **kw)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def run_until_caught_up(pipe: Pipeline, timeout: float = 60.0, sinks=None) -> None:
    """Runs pipe's main loop in this thread until every (or the named) sink has no
    lag; sinks whose thread was not started turn here, in this thread."""
    runners = [r for r in pipe.runners if sinks is None or r.sink.name in sinks]
    deadline = time.monotonic() + timeout
    while any(r.lag() for r in runners):
        for r in runners:
            if r.thread is None:
                r.turn()
        pipe.tick()
        if time.monotonic() > deadline:
            raise AssertionError(f"not caught up after {timeout} s: {pipe.stats()}")
        time.sleep(0.005)
    pipe.tick()


def db(data_dir) -> sqlite3.Connection:
    return sqlite3.connect(str(Path(data_dir) / "store.sqlite"))


def store_checkpoints(data_dir) -> dict:
    path = Path(data_dir) / "store.sqlite"
    if not path.exists():
        return {}
    try:
        c = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return dict(c.execute("SELECT worker, next_offset FROM checkpoints WHERE sink = 'store'"))
        finally:
            c.close()
    except sqlite3.Error:
        return {}


def check_store_consistent(data_dir, logs: list[list[bytes]], ends: list[int]) -> None:
    """Every record of the logs is in the store exactly once, with its samples,
    and the rollups and the devices table count every sample / reading once."""
    c = db(data_dir)
    expected = {}
    nsamples = 0
    for w, payloads in enumerate(logs):
        off = 0
        for p in payloads:
            expected[(w, off)] = p
            off += 8 + len(p)
            nsamples += len(json.loads(p)["metrics"])
    rows = c.execute("SELECT worker, lsn, device_id, ts, seq, metrics FROM readings").fetchall()
    assert len(rows) == len(expected), (len(rows), len(expected))
    assert {(w, lsn) for w, lsn, *_ in rows} == set(expected)
    for w, lsn, dev, ts, seq, metrics in rows[:: max(1, len(rows) // 500)]:
        doc = json.loads(expected[(w, lsn)])
        assert dev == doc["device_id"] and seq == doc["seq"]
        assert json.loads(metrics) == doc["metrics"]
        assert ts == pytest.approx(datetime.fromisoformat(doc["ts"]).timestamp(), abs=1e-6)
    assert c.execute("SELECT count(*) FROM samples").fetchone()[0] == nsamples
    for win in ("1m", "1h", "1d"):
        assert c.execute("SELECT sum(count) FROM rollups WHERE win = ?", (win,)).fetchone()[0] == nsamples
    # per key too: rollup counts equal the raw counts
    raw = dict(((d, m), n) for d, m, n in c.execute(
        "SELECT device_id, metric, count(*) FROM samples GROUP BY device_id, metric"))
    day = dict(((d, m), n) for d, m, n in c.execute(
        "SELECT device_id, metric, sum(count) FROM rollups WHERE win = '1d' GROUP BY device_id, metric"))
    assert raw == day
    devs = dict(c.execute("SELECT device_id, readings FROM devices"))
    per_dev = dict(c.execute("SELECT device_id, count(*) FROM readings GROUP BY device_id"))
    assert devs == per_dev
    ck = dict(c.execute("SELECT worker, next_offset FROM checkpoints WHERE sink = 'store'"))
    assert ck == {w: e for w, e in enumerate(ends)}
    c.close()


# --- the store sink over the logs ----------------------------------------------------------

def test_reads_only_up_to_the_durable_offset(tmp_path):
    logs = fleet(2, 300)
    ends = [write_log(tmp_path, w, p) for w, p in enumerate(logs)]
    durable = Durable(2)
    pipe = Pipeline(settings(tmp_path), 2, durable, wal=wal_api())
    # half of worker 0's log durable, none of worker 1's
    half = sum(8 + len(p) for p in logs[0][:150])
    durable.set(0, half)
    run_until_caught_up(pipe)
    c = db(tmp_path)
    assert c.execute("SELECT count(*) FROM readings").fetchone()[0] == 150
    assert c.execute("SELECT max(lsn) FROM readings WHERE worker = 0").fetchone()[0] < half
    durable.set(0, ends[0])
    durable.set(1, ends[1])
    run_until_caught_up(pipe)
    pipe.shutdown()
    check_store_consistent(tmp_path, logs, ends)
    st = pipe.stats()["sinks"]["store"]
    assert st["written"] == 600 and st["lag"] == 0 and st["retries"] == 0


def test_the_store_checkpoint_is_published_in_each_workers_row(tmp_path):
    """What each worker compares with its durable offset (max_sink_lag_bytes):
    the store sink's committed checkpoint in its log, plus one (0: none yet)."""
    from gw.stats import Counter

    logs = fleet(2, 200)
    ends = [write_log(tmp_path, w, p) for w, p in enumerate(logs)]
    durable = Durable(2)
    pipe = Pipeline(settings(tmp_path), 2, durable, wal=wal_api(), rows=durable.rows)
    word = int(Counter.STORE_CHECKPOINT)
    assert durable.rows[:, word].tolist() == [0, 0]
    pipe.publish_checkpoints()
    assert durable.rows[:, word].tolist() == [1, 1]          # checkpoint 0, published
    durable.set(0, ends[0])
    run_until_caught_up(pipe)
    pipe.tick()
    assert durable.rows[:, word].tolist() == [ends[0] + 1, 1]
    pipe.shutdown()


def test_a_disk_too_small_for_the_lag_bound_is_warned_about_at_start(tmp_path, caplog):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    for bound, warned in ((free, True), (free // 4, False), (0, False)):
        caplog.clear()
        pipe = Pipeline(settings(tmp_path, max_sink_lag_bytes=bound), 2, Durable(2), wal=wal_api())
        with caplog.at_level("WARNING", logger="gw.pipeline"):
            pipe.check_disk()
        pipe.shutdown()
        assert any("max_sink_lag_bytes" in r.getMessage() for r in caplog.records) == warned, bound


def test_lag_clock_tells_how_long_the_oldest_unread_byte_waited():
    from gw.pipeline.core import LagClock

    clock = LagClock(1)
    clock.note(0, 100.0, 1000, 0)
    clock.note(0, 101.0, 1000, 0)          # not moved: no note
    clock.note(0, 102.0, 3000, 0)
    assert clock.age(0, 105.0, 0, 3000) == 5.0        # byte 0 durable since the first note
    assert clock.age(0, 105.0, 1000, 3000) == 3.0     # past 1000: durable since the note of 3000
    assert clock.age(0, 105.0, 3000, 3000) == 0.0     # nothing waits
    clock.note(0, 106.0, 4000, 1000)                  # every sink past 1000: that note goes
    assert [o for _, o in clock.notes[0]] == [3000, 4000]
    clock.note(0, 107.0, 10, 0)                       # the log was reset
    assert list(clock.notes[0]) == [(107.0, 10)]
    for i in range(LagClock.MAX_NOTES + 10):
        clock.note(0, 200.0 + i, 100 + i, 0)
    assert len(clock.notes[0]) == LagClock.MAX_NOTES


def test_restart_resumes_from_the_checkpoints(tmp_path):
    logs = fleet(2, 400)
    durable = Durable(2)
    ends = [write_log(tmp_path, w, p[:200]) for w, p in enumerate(logs)]
    for w, e in enumerate(ends):
        durable.set(w, e)
    pipe = Pipeline(settings(tmp_path), 2, durable, wal=wal_api())
    run_until_caught_up(pipe)
    pipe.shutdown()
    ends = [write_log(tmp_path, w, p[200:]) for w, p in enumerate(logs)]
    for w, e in enumerate(ends):
        durable.set(w, e)
    pipe = Pipeline(settings(tmp_path), 2, durable, wal=wal_api())
    assert pipe.runners[0].sink.checkpoints == {0: pytest.approx(ends[0] // 2, rel=0.1),
                                                1: pytest.approx(ends[1] // 2, rel=0.1)}
    run_until_caught_up(pipe)
    pipe.shutdown()
    check_store_consistent(tmp_path, logs, ends)


def test_batches_stay_as_large_as_what_piles_up_under_a_sustained_rate(tmp_path):
    """Behind, the next batch takes what is waiting (up to twice the records the
    bytes left hold at this batch's record size), at least twice the last; once
    one took everything durable, the next may take up to twice as much (what
    piled up during the write), not pipeline_batch again; idle, they start again
    from pipeline_batch."""
    logs = fleet(1, 800, devices_per_worker=10)
    durable = Durable(1)
    durable.set(0, write_log(tmp_path, 0, logs[0][:500]))
    pipe = Pipeline(settings(tmp_path, pipeline_batch=10), 1, durable, wal=wal_api())
    runner = pipe.runners[0]
    try:
        counts = []
        while True:
            _parts, count, full = runner.gather()
            counts.append(count)
            if not full:
                break
        assert counts == [10, 490]                      # not 10, 20, 40, ... 190
        assert runner.cur_batch == 980
        durable.set(0, write_log(tmp_path, 0, logs[0][500:]))
        _parts, count, full = runner.gather()
        assert (count, full) == (300, False)            # not 10 again, then doubling up
        assert runner.cur_batch == 600
        _parts, count, full = runner.gather()
        assert (count, full) == (0, False)
        assert runner.cur_batch == 10
    finally:
        pipe.shutdown()


def test_an_idle_sink_is_told_once_per_idle_spell(tmp_path, monkeypatch):
    """IDLE_AFTER seconds after its last records the sink's idle() runs once (the
    store gives its batches' memory back), and again only after more records."""
    from gw.pipeline import runner as runner_mod
    monkeypatch.setattr(runner_mod, "IDLE_AFTER", 0.05)
    logs = fleet(1, 300, devices_per_worker=10)
    durable = Durable(1)
    durable.set(0, write_log(tmp_path, 0, logs[0][:100]))
    pipe = Pipeline(settings(tmp_path), 1, durable, wal=wal_api())
    runner = pipe.runners[0]
    told = []
    idle = runner.sink.idle
    runner.sink.idle = lambda now: (told.append(now), idle(now))
    try:
        runner.turn()
        assert runner.sink.written == 100 and told == []
        time.sleep(0.08)
        runner.turn()
        runner.turn()
        assert len(told) == 1                   # once, not every idle turn
        durable.set(0, write_log(tmp_path, 0, logs[0][100:]))
        runner.turn()
        assert runner.sink.written == 300 and len(told) == 1
        time.sleep(0.08)
        runner.turn()
        assert len(told) == 2
    finally:
        pipe.shutdown()


def test_threads_run_and_stop(tmp_path):
    """start() runs the sinks in their threads; shutdown() ends them after the
    batch in hand, checkpoints committed."""
    logs = fleet(2, 2000)
    durable = Durable(2)
    pipe = Pipeline(settings(tmp_path), 2, durable, wal=wal_api())
    pipe.start()
    ends = []
    for w, p in enumerate(logs):
        ends.append(write_log(tmp_path, w, p))
        durable.set(w, ends[-1])
    wait_until(lambda: pipe.runners[0].lag() == 0, 60, "the store sink to catch up")
    assert pipe.shutdown() == 0
    assert all(not r.thread.is_alive() for r in pipe.runners)
    check_store_consistent(tmp_path, logs, ends)


def test_wal_retention_keeps_what_a_sink_needs(tmp_path):
    wal = wal_api()
    logs = fleet(1, 3000)
    ends = [write_log(tmp_path, 0, logs[0], wal, segment_bytes=16 << 10)]
    durable = Durable(1)
    calls = []
    real = wal.retain_dir

    class Spy:
        Wal, WalReader = wal.Wal, wal.WalReader
        OffsetDeletedError = wal.OffsetDeletedError

        @staticmethod
        def retain_dir(d, min_offset, age, nbytes):
            calls.append((d, min_offset, age, nbytes))
            return real(d, min_offset, age, nbytes)

    fdir = tmp_path / "files"
    pipe = Pipeline(settings(tmp_path, file_sink=str(fdir), wal_retention_age=123.0,
                             wal_retention_bytes=456), 1, durable, wal=Spy)
    segs_before = len(list(worker_dir(tmp_path, 0).glob("*.wal")))
    assert segs_before > 3
    durable.set(0, ends[0])
    # only the store runs: the file sink's checkpoint stays 0, so nothing may go
    store = pipe.runners[0]
    while store.lag():
        store.turn()
    pipe.retain_wal()
    assert calls[-1] == (str(worker_dir(tmp_path, 0)), 0, 123.0, 456)
    assert len(list(worker_dir(tmp_path, 0).glob("*.wal"))) == segs_before
    filesink = pipe.runners[1]
    while filesink.lag():
        filesink.turn()
    pipe.retain_wal()
    assert calls[-1][1] == ends[0]
    # over wal_retention_bytes and read by every sink: all but the newest segment go
    assert len(list(worker_dir(tmp_path, 0).glob("*.wal"))) == 1
    pipe.shutdown()


def test_missing_wal_module_is_a_pipeline_error(tmp_path, monkeypatch):
    import gw.pipeline.core as core

    def missing():
        raise ModuleNotFoundError("No module named 'gw_ext.wal'")

    monkeypatch.setattr(core, "load_wal_module", missing)
    with pytest.raises(PipelineError, match="gw_ext.wal"):
        Pipeline(settings(tmp_path), 1, Durable(1))


# --- alerts -------------------------------------------------------------------------------

def test_alerts_are_stored_and_published_once(tmp_path):
    logs = fleet(1, 20 * 120, devices_per_worker=20, spike_every=50)
    durable = Durable(1)
    ends = [write_log(tmp_path, 0, logs[0])]
    durable.set(0, ends[0])
    published = []
    pipe = Pipeline(settings(tmp_path), 1, durable, publish=lambda t, p: published.append((t, p)),
                    wal=wal_api())
    run_until_caught_up(pipe)
    pipe.shutdown()
    c = db(tmp_path)
    rows = c.execute("SELECT id, device_id, metric, ts, value, zscore, mean, std, state FROM alerts "
                     "ORDER BY id").fetchall()
    # every device's spikes (n = 49, 99) raised one alert each; the noise may
    # raise a few more (|z| > 4 on a 10..60-sample window)
    spikes = [r for r in rows if r[4] > 50]
    assert sorted((r[1], r[2]) for r in spikes) == sorted((f"w0-d{k}", "temp_c") for k in range(20)
                                                          for _ in range(2))
    assert len(rows) < len(spikes) + 10
    assert len(published) == len(rows)
    for (topic, payload), row in zip(published, rows):
        doc = json.loads(payload)
        assert topic == f"alerts/{row[1]}".encode()
        assert set(doc) == {"id", "device_id", "metric", "ts", "value", "zscore", "mean", "std", "state"}
        assert doc["id"] == row[0] and doc["state"] == "open" == row[8]
        assert doc["value"] == row[4] and doc["zscore"] == pytest.approx(row[5]) and doc["zscore"] > 4.0
        assert datetime.fromisoformat(doc["ts"].replace("Z", "+00:00")).timestamp() == pytest.approx(row[3])


# --- kill -9 mid-stream: exactly once --------------------------------------------------------

CHILD = r"""
import sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
import test_pipeline as t
from gw.pipeline import Pipeline
durable = t.Durable({n})
for w, e in enumerate({ends!r}):
    durable.set(w, e)
pipe = Pipeline(t.settings({data!r}, pipeline_batch={batch}), {n}, durable, wal=t.wal_api())
# Batches of at most 4 x {batch} records, so the kills land between many commits
# (behind, the store would otherwise take the whole log in a few transactions).
for sink in pipe.sinks:
    sink.catchup = min(sink.catchup, 4)
pipe.start()
print("started", flush=True)
while True:
    pipe.tick()
    time.sleep(0.005)
"""


def _spawn_child(data_dir, ends, batch=300) -> subprocess.Popen:
    code = CHILD.format(repo=str(REPO), tests=str(TESTS), n=len(ends), ends=list(ends),
                        data=str(data_dir), batch=batch)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_kill_9_mid_stream_then_every_record_exactly_once(tmp_path):
    logs = fleet(2, 15_000, devices_per_worker=25, spike_every=40)
    ends = [write_log(tmp_path / "a", w, p) for w, p in enumerate(logs)]
    total = sum(ends)
    # the same logs, processed without interruption: the reference for the alerts
    ref_durable = Durable(2)
    for w, e in enumerate(ends):
        ref_durable.set(w, e)
    for w, p in enumerate(logs):
        write_log(tmp_path / "ref", w, p)
    ref = Pipeline(settings(tmp_path / "ref"), 2, ref_durable, wal=wal_api())
    run_until_caught_up(ref)
    ref.shutdown()

    progress = []
    for fraction in (0.15, 0.45, 0.75):
        proc = _spawn_child(tmp_path / "a", ends)
        try:
            wait_until(lambda: sum(store_checkpoints(tmp_path / "a").values()) >= fraction * total
                       or proc.poll() is not None, 60, f"{fraction:.0%} of the logs committed")
            assert proc.poll() is None, proc.stderr.read().decode()
        finally:
            _kill(proc)
        done = sum(store_checkpoints(tmp_path / "a").values())
        progress.append(done)
        assert done < total, "the child finished before it was killed: nothing was tested"
    assert progress == sorted(progress)

    durable = Durable(2)
    for w, e in enumerate(ends):
        durable.set(w, e)
    pipe = Pipeline(settings(tmp_path / "a"), 2, durable, wal=wal_api())
    run_until_caught_up(pipe)
    pipe.shutdown()
    check_store_consistent(tmp_path / "a", logs, ends)
    q = "SELECT device_id, metric, ts, value FROM alerts ORDER BY device_id, ts"
    got = db(tmp_path / "a").execute(q).fetchall()
    want = db(tmp_path / "ref").execute(q).fetchall()
    assert len(want) > 100
    assert got == want


# --- pipeline_main in its own process ----------------------------------------------------------

MAIN_CHILD = r"""
import sys, types
sys.path[:0] = [{repo!r}, {tests!r}]
import test_pipeline as t
durable = t.Durable({n})
for w, e in enumerate({ends!r}):
    durable.set(w, e)
import numpy
from gw.stats import HEADER_WORDS
block = types.SimpleNamespace(matrix=durable.rows, header=numpy.zeros(HEADER_WORDS, dtype=numpy.int64))  # the parts it reads
cfg = types.SimpleNamespace(data_dir={data!r}, pipeline_batch=200)
out = open({out!r}, "ab", buffering=0)
def publish(topic, payload):
    out.write(topic + b" " + payload + b"\n")
from gw.pipeline import pipeline_main
print("running", flush=True)
sys.exit(pipeline_main(cfg, block, {n}, publish))
"""


def test_pipeline_main_runs_until_sigterm_and_exits_0(tmp_path):
    logs = fleet(2, 3000, devices_per_worker=10, spike_every=60)
    ends = [write_log(tmp_path, w, p) for w, p in enumerate(logs)]
    out = tmp_path / "published.txt"
    code = MAIN_CHILD.format(repo=str(REPO), tests=str(TESTS), n=2, ends=ends, data=str(tmp_path),
                             out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: sum(store_checkpoints(tmp_path).values()) == sum(ends) or proc.poll() is not None,
                   60, "the pipeline to store everything")
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read().decode()
    finally:
        _kill(proc)
    check_store_consistent(tmp_path, logs, ends)
    lines = out.read_bytes().splitlines()
    n_alerts = db(tmp_path).execute("SELECT count(*) FROM alerts").fetchone()[0]
    spikes = db(tmp_path).execute("SELECT count(*) FROM alerts WHERE value > 50").fetchone()[0]
    assert spikes == 2 * 10 * 5 and len(lines) == n_alerts
    assert all(line.startswith(b"alerts/w") for line in lines)


def test_pipeline_main_refuses_a_corrupt_store(tmp_path):
    (tmp_path / "store.sqlite").write_bytes(b"this is not a database" * 100)
    code = MAIN_CHILD.format(repo=str(REPO), tests=str(TESTS), n=1, ends=[0], data=str(tmp_path),
                             out=str(tmp_path / "out"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert res.returncode != 0
    assert b"PipelineError" in res.stderr and b"corrupt" in res.stderr
    assert (tmp_path / "store.sqlite").read_bytes() == b"this is not a database" * 100
