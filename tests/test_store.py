"""The embedded store (gw/pipeline/store.py): the schema contract, refusing a
corrupt or foreign file, rollup math against numpy (hypothesis), the z-score
detector against a reference, devices, retention, anomaly state rebuilt from
the store. Real SQLite files throughout."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from test_pipeline import T0, reading
from gw.pipeline import PipelineError
from gw.pipeline.anomaly import Detector
from gw.pipeline.rollup import WINDOWS, aggregate_numpy, aggregate_python, mean_std
from gw.pipeline.store import STORE_FILE, StoreSink, check_data_dir, open_store

# The logical tables (the query API's and export's contract): their columns, in order.
CONTRACT = {
    "readings": ["worker", "lsn", "device_id", "ts", "seq", "metrics", "tags", "payload"],
    "samples": ["device_id", "metric", "ts", "value"],
    "rollups": ["win", "device_id", "metric", "bucket", "count", "min", "max", "sum", "sumsq"],
    "devices": ["device_id", "first_seen", "last_seen", "last_values", "tags", "readings"],
    "alerts": ["id", "device_id", "metric", "ts", "value", "zscore", "mean", "std", "state", "created", "acked"],
    "checkpoints": ["sink", "worker", "next_offset"],
    "meta": ["key", "value"],
}


def new_sink(path, **kw) -> StoreSink:
    sink = StoreSink(open_store(path / STORE_FILE), kw.pop("nworkers", 1), **kw)
    sink.open()
    return sink


def feed(sink: StoreSink, payloads, slot: int = 0, start: int | None = None, batch: int = 500) -> int:
    """Writes payloads as log records of `slot` (offsets as the log would give) in batches."""
    off = sink.checkpoints.get(slot, 0) if start is None else start
    for i in range(0, len(payloads), batch):
        records = []
        for p in payloads[i:i + batch]:
            records.append((off, p))
            off += 8 + len(p)
        sink.write([(slot, records, off)])
    return off


# --- opening -------------------------------------------------------------------------

def test_schema_is_the_contract(tmp_path):
    conn = open_store(tmp_path / STORE_FILE)
    for table, cols in CONTRACT.items():
        got = [name for _cid, name, _typ, _notnull, _dflt, _pk in conn.execute(f"PRAGMA table_info({table})")]
        assert got == cols, table
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1          # NORMAL
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "3"
    # the layout: appended in arrival order (rowid tables), rollups ordered by time first
    kinds = dict(conn.execute("SELECT name, type FROM sqlite_master WHERE name IN "
                              "('readings', 'sample_chunks', 'rollup', 'samples', 'rollups')"))
    assert kinds == {"readings": "table", "sample_chunks": "table", "rollup": "table",
                     "samples": "view", "rollups": "view"}
    sql = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert not sql["readings"].endswith("WITHOUT ROWID") and not sql["sample_chunks"].endswith("WITHOUT ROWID")
    assert sql["rollup"].endswith("PRIMARY KEY (win, bucket, series)) WITHOUT ROWID")
    conn.close()
    conn = open_store(tmp_path / STORE_FILE)          # opening again keeps it
    conn.close()


def test_the_views_read_and_write_the_logical_tables(tmp_path):
    """INSERT INTO samples / rollups (tools, tests) land in the physical tables and read back."""
    conn = open_store(tmp_path / STORE_FILE)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO samples VALUES ('d', 'm', ?, 21.25)", (T0 + 0.123456,))
    conn.execute("INSERT INTO samples VALUES ('d', 'm', ?, -3.5)", (T0 + 1,))
    for _ in range(2):
        conn.execute("INSERT INTO rollups VALUES ('1m', 'd', 'm', 60.0, 2, 1.0, 3.0, 4.0, 10.0)")
    conn.execute("COMMIT")
    assert conn.execute("SELECT device_id, metric, ts, value FROM samples ORDER BY ts").fetchall() == \
        [("d", "m", T0 + 0.123456, 21.25), ("d", "m", T0 + 1, -3.5)]
    assert conn.execute("SELECT * FROM rollups").fetchall() == [("1m", "d", "m", 60.0, 4, 1.0, 3.0, 8.0, 20.0)]
    assert conn.execute("SELECT count(*) FROM series").fetchone()[0] == 1
    conn.close()


def test_a_garbage_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / STORE_FILE
    junk = os.urandom(8192)
    path.write_bytes(junk)
    with pytest.raises(PipelineError) as err:
        open_store(path)
    msg = str(err.value)
    assert str(path) in msg and "corrupt" in msg and "left as it is" in msg
    assert path.read_bytes() == junk
    assert not (tmp_path / (STORE_FILE + "-wal")).exists()


def test_a_damaged_database_fails_quick_check(tmp_path):
    sink = new_sink(tmp_path)
    feed(sink, [reading(f"d{i % 50}", T0 + i, i, {"temp_c": i, "hum": 1}) for i in range(5000)])
    sink.close()
    path = tmp_path / STORE_FILE
    c = sqlite3.connect(path)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = c.execute("PRAGMA page_size").fetchone()[0]
    root = c.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sample_chunks_series'").fetchone()[0]
    c.close()
    data = bytearray(path.read_bytes())
    # scribble over an index's interior page: cells point to nonsense
    start = (root - 1) * page
    data[start + 8:start + page] = bytes((i * 37) & 0xFF for i in range(page - 8))
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(PipelineError, match="corrupt"):
        open_store(path)
    assert path.read_bytes() == before


def test_a_foreign_database_is_refused(tmp_path):
    path = tmp_path / STORE_FILE
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    c.commit()
    c.close()
    with pytest.raises(PipelineError, match="customers"):
        open_store(path)


def test_a_newer_schema_is_refused(tmp_path):
    open_store(tmp_path / STORE_FILE).execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(PipelineError, match="schema version 99"):
        open_store(tmp_path / STORE_FILE)


def test_unusable_data_dirs(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(PipelineError, match="not a directory"):
        check_data_dir(afile)
    with pytest.raises(PipelineError, match="cannot be created"):
        check_data_dir(afile / "sub")
    assert check_data_dir(tmp_path / "new" / "dir").is_dir()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() != 0:          # root writes anywhere; the probe is real either way
            with pytest.raises(PipelineError, match="not writable"):
                check_data_dir(ro)
    finally:
        ro.chmod(0o700)


def test_store_path_that_is_a_directory(tmp_path):
    (tmp_path / STORE_FILE).mkdir()
    with pytest.raises(PipelineError, match="not a regular file"):
        open_store(tmp_path / STORE_FILE)


# --- rollups ---------------------------------------------------------------------------

def reference_rollups(samples) -> dict:
    """numpy, straight from the definition: {(win, dev, metric, bucket): (count, min, max, sum, sumsq)}."""
    out = {}
    if not samples:
        return out
    dev = np.array([s[0] for s in samples])
    met = np.array([s[1] for s in samples])
    ts = np.array([s[2] for s in samples], dtype=np.float64)
    val = np.array([s[3] for s in samples], dtype=np.float64)
    for win, w in WINDOWS:
        bucket = np.floor(ts / w) * w
        for key in set(zip(dev.tolist(), met.tolist(), bucket.tolist())):
            sel = (dev == key[0]) & (met == key[1]) & (bucket == key[2])
            v = val[sel]
            out[(win,) + key] = (int(sel.sum()), v.min(), v.max(), v.sum(), (v * v).sum())
    return out


sample_st = st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["temp_c", "hum"]),
                      st.floats(0, 3 * 86400), st.floats(-1e6, 1e6, allow_nan=False))


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(samples=st.lists(sample_st, max_size=400), cut=st.integers(1, 400))
def test_rollups_match_numpy(tmp_path_factory, samples, cut):
    """Samples through the store sink in batches of `cut` readings (each batch
    upserts into what the earlier ones left) equal numpy's groupby of them all."""
    path = tmp_path_factory.mktemp("roll")
    sink = new_sink(path)
    payloads = [reading(d, T0 + t, None, {m: v}) for d, m, t, v in samples]
    feed(sink, payloads, batch=cut)
    want = reference_rollups([(d, m, T0 + t, v) for d, m, t, v in samples])
    got = {(w, d, m, b): (n, lo, hi, s, q) for w, d, m, b, n, lo, hi, s, q in
           sink.conn.execute("SELECT * FROM rollups")}
    assert got.keys() == want.keys()
    for k, (n, lo, hi, s, q) in want.items():
        gn, glo, ghi, gs, gq = got[k]
        assert gn == n and glo == lo and ghi == hi
        assert gs == pytest.approx(s, rel=1e-9, abs=1e-6)
        assert gq == pytest.approx(q, rel=1e-9, abs=1e-3)
    sink.close()


@hsettings(max_examples=100, deadline=None)
@given(samples=st.lists(st.tuples(st.integers(0, 30), st.floats(0, 1e5), st.floats(-1e3, 1e3)),
                        max_size=600))
def test_numpy_and_dict_aggregation_agree(samples):
    names = [(f"d{i}", "m") for i in range(31)]
    key = [s[0] for s in samples]
    ts = [T0 + s[1] for s in samples]
    val = [s[2] for s in samples]
    a = {r[:4]: r[4:] for r in aggregate_numpy(names, key, ts, val)}
    b = {r[:4]: r[4:] for r in aggregate_python(names, key, ts, val)}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][:3] == b[k][:3]
        assert a[k][3] == pytest.approx(b[k][3], abs=1e-6)
        assert a[k][4] == pytest.approx(b[k][4], rel=1e-9)


def test_mean_std_from_the_sums():
    v = np.array([21.5, 22.0, 19.25, 20.0])
    mean, std = mean_std(len(v), v.sum(), (v * v).sum())
    assert mean == pytest.approx(v.mean()) and std == pytest.approx(v.std())
    # constant values: sumsq/n - mean^2 is 0 only up to rounding, sometimes below
    # zero; std is then 0, never NaN
    negative = 0
    for x in np.linspace(1000.1, 1001.1, 200):
        v = np.full(7, x)
        total, sumsq = v.sum(), (v * v).sum()
        negative += sumsq / 7 - (total / 7) ** 2 < 0
        m, sd = mean_std(7, total, sumsq)
        assert m == pytest.approx(x) and 0.0 <= sd < 1e-3
    assert negative > 0


def test_bucket_boundaries(tmp_path):
    sink = new_sink(tmp_path)
    day = float(int(T0) // 86400 * 86400)
    feed(sink, [reading("d", day - 0.000001, 1, {"x": 1}), reading("d", day, 2, {"x": 2}),
                reading("d", day + 59.999, 3, {"x": 3}), reading("d", day + 60, 4, {"x": 4})])
    rows = sink.conn.execute("SELECT win, bucket, count, sum FROM rollups ORDER BY win, bucket").fetchall()
    assert rows == [("1d", day - 86400, 1, 1.0), ("1d", day, 3, 9.0),
                    ("1h", day - 3600, 1, 1.0), ("1h", day, 3, 9.0),
                    ("1m", day - 60, 1, 1.0), ("1m", day, 2, 5.0), ("1m", day + 60, 1, 4.0)]


# --- devices and readings ------------------------------------------------------------------

def test_devices_and_readings_rows(tmp_path):
    sink = new_sink(tmp_path)
    feed(sink, [reading("d1", T0 + 10, 1, {"a": 1, "b": 2}, {"site": "AAL"}, b'{"raw":"ok"}'),
                reading("d1", T0 + 20, 2, {"a": 3}, {"site": "CPH"}),
                reading("d1", T0 + 5, 3, {"c": 9}, {"site": "OSL"}),        # older: fills c only
                reading("d2", T0 + 1, None, {})])
    feed(sink, [reading("d1", T0 + 1, 4, {"a": 100, "d": 4}, {"site": "STO"})])   # an older batch
    c = sink.conn
    d1 = c.execute("SELECT first_seen, last_seen, last_values, tags, readings FROM devices "
                   "WHERE device_id = 'd1'").fetchone()
    assert d1[0] == T0 + 1 and d1[1] == T0 + 20 and d1[4] == 4
    assert json.loads(d1[2]) == {"a": 3.0, "b": 2.0, "c": 9.0, "d": 4.0}
    assert json.loads(d1[3]) == {"site": "CPH"}
    assert c.execute("SELECT readings, last_values FROM devices WHERE device_id = 'd2'").fetchone() == (1, "{}")
    r = c.execute("SELECT worker, lsn, device_id, ts, seq, metrics, tags, payload FROM readings "
                  "ORDER BY lsn").fetchall()
    assert r[0][2:] == ("d1", T0 + 10, 1, '{"a":1.0,"b":2.0}', '{"site":"AAL"}', '{"raw":"ok"}')
    assert r[3][4] is None and r[3][7] is None          # seq absent, payload null
    assert c.execute("SELECT count(*) FROM samples").fetchone()[0] == 6


def test_a_record_that_is_not_a_reading_is_skipped(tmp_path):
    sink = new_sink(tmp_path)
    end = feed(sink, [reading("d", T0, 1, {"x": 1}), b"\x00garbage", reading("d", T0 + 1, 2, {"x": 2})])
    assert sink.bad_records == 1
    assert sink.conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 2
    assert sink.checkpoints[0] == end


def test_a_failed_transaction_changes_nothing(tmp_path):
    sink = new_sink(tmp_path)
    end = feed(sink, [reading("d", T0 + i, i, {"x": i}) for i in range(20)])
    before = sink.conn.execute("SELECT (SELECT count(*) FROM readings), (SELECT sum(count) FROM rollups), "
                               "(SELECT readings FROM devices)").fetchone()
    with pytest.raises(sqlite3.IntegrityError):          # the same offsets again: a primary key clash
        feed(sink, [reading("d", T0 + 100 + i, 100 + i, {"x": i}) for i in range(5)], start=0)
    after = sink.conn.execute("SELECT (SELECT count(*) FROM readings), (SELECT sum(count) FROM rollups), "
                              "(SELECT readings FROM devices)").fetchone()
    assert after == before
    assert sink.checkpoints[0] == end
    assert not sink.conn.in_transaction


def test_a_large_batch_inserts_its_readings_on_a_thread_and_fails_whole(tmp_path):
    """Batches of OVERLAP_FROM readings or more insert their readings rows on a
    thread of their own: the same rows as one thread, and a failure there (a
    clash of log offsets) rolls the whole transaction back, new series too."""
    from gw.pipeline import store as store_mod
    n = store_mod.OVERLAP_FROM + 100
    payloads = [reading(f"d{i % 300}", T0 + i * 0.01, i, {"x": i % 7, "y": 1.5}) for i in range(n)]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = new_sink(tmp_path / "one")
    saved = store_mod.OVERLAP_FROM
    store_mod.OVERLAP_FROM = 1 << 62
    try:
        feed(one, payloads, batch=n)
    finally:
        store_mod.OVERLAP_FROM = saved
    two = new_sink(tmp_path / "two")
    end = feed(two, payloads, batch=n)
    for q in ("SELECT * FROM readings ORDER BY rowid", "SELECT * FROM sample_chunks ORDER BY rowid",
              "SELECT * FROM rollup ORDER BY win, bucket, series", "SELECT * FROM devices ORDER BY device_id",
              "SELECT * FROM series ORDER BY id"):
        assert one.conn.execute(q).fetchall() == two.conn.execute(q).fetchall()
    count = "SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM series), (SELECT sum(readings) FROM devices)"
    before = two.conn.execute(count).fetchone()
    assert before == (n, 600, n)
    # new devices (new series) whose readings clash with stored offsets, in one large batch
    clash = [reading(f"new{i % 50}", T0 + 500 + i * 0.01, i, {"z": 1}) for i in range(n)]
    with pytest.raises(sqlite3.IntegrityError):
        feed(two, clash, start=0, batch=n)
    assert two.conn.execute(count).fetchone() == before
    assert not two.conn.in_transaction
    assert two.checkpoints[0] == end
    assert ("new0", "z") not in two._series
    end = feed(two, clash, batch=n)                     # at the right offsets it goes in
    assert two.conn.execute(count).fetchone() == (2 * n, 650, 2 * n)
    assert two.checkpoints[0] == end


# --- retention ---------------------------------------------------------------------------

def test_retention(tmp_path):
    now = time.time()
    sink = new_sink(tmp_path, raw_retention=7 * 86400.0,
                    rollup_retention={"1m": 30 * 86400.0, "1h": 365 * 86400.0}, clock=lambda: now)
    ages = [400 * 86400, 100 * 86400, 10 * 86400, 8 * 86400, 3 * 86400, 60]
    sink.retention_pass()
    feed(sink, [reading("d", now - a, i, {"x": 1, "y": 2}) for i, a in enumerate(ages)])
    deleted = sink.retention_pass()
    c = sink.conn
    kept = sorted(now - t for (t,) in c.execute("SELECT ts FROM readings"))
    assert kept == pytest.approx([60, 3 * 86400], abs=1)
    assert c.execute("SELECT count(*) FROM samples").fetchone()[0] == 4
    def buckets(win):
        return sorted(c.execute("SELECT bucket FROM rollups WHERE win = ? AND metric = 'x'", (win,)))
    assert len(buckets("1d")) == 6                         # kept forever
    assert len(buckets("1h")) == 5                         # all but the 400-day-old one
    assert len(buckets("1m")) == 4                         # within 30 days
    assert deleted == 4 * 3 + (1 + 1) * 2 + 2 * 1          # raw rows + 1m rows + 1h rows
    assert c.execute("SELECT readings FROM devices").fetchone()[0] == 6   # the device's totals stay


def test_retention_in_small_chunks(tmp_path):
    now = time.time()
    sink = new_sink(tmp_path, clock=lambda: now)
    feed(sink, [reading(f"d{i % 7}", now - 10 * 86400 + i, i, {"x": i}) for i in range(3500)], batch=2000)
    sink._delete_raw(now - 7 * 86400)               # one step: 1000 readings (and up to 1000 sample chunks)
    assert sink.conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 2500
    sink.retention_pass()
    assert sink.conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 0


# --- the detector --------------------------------------------------------------------------

def reference_detector(values, window, threshold):
    """The documented rules, naively: numpy over a list every time."""
    win: list = []
    run: list = []
    k = min(10, window)
    out = []
    for v in values:
        if len(win) >= k:
            a = np.array(win)
            mean, std = a.mean(), a.std()
            if std > 0 and abs((v - mean) / std) > threshold:
                out.append(((v - mean) / std, mean, std))
                run.append(v)
                if len(run) >= k:
                    win = run[-window:]
                    run = []
                continue
        out.append(None)
        win.append(v)
        win = win[-window:]
        run = []
    return out


# Readings to nine decimals: values like 1e-274, whose squares underflow, make the
# running sums and the reference's two-pass std disagree about which window is flat.
READING = st.floats(-100, 100).map(lambda v: round(v, 9))
SPIKE = st.floats(-1e4, 1e4).map(lambda v: round(v, 9))


@hsettings(max_examples=200, deadline=None)
@given(base=st.lists(READING, min_size=1, max_size=300),
       spikes=st.lists(st.tuples(st.integers(0, 299), SPIKE), max_size=20),
       window=st.integers(2, 80), threshold=st.floats(1.0, 6.0), offset=st.sampled_from([0.0, 1e6]))
def test_detector_matches_the_reference(base, spikes, window, threshold, offset):
    values = [v + offset for v in base]
    for i, v in spikes:
        if i < len(values):
            values[i] = v + offset
    det = Detector(window, threshold)
    got = [det.observe("d", "m", v) for v in values]
    want = reference_detector(values, window, threshold)
    for i, (g, w) in enumerate(zip(got, want)):
        # Running sums give the std to about eps * range^2 / std: a window whose std is
        # below 1e-4 of the values' range is flat to within rounding, and from there on
        # the two may judge differently (both rightly).
        spread = max(values[:i + 1]) - min(values[:i + 1])
        if w is not None and w[2] < 1e-4 * spread:
            return
        if (w is None) != (g is None):
            z = (w or g)[0]
            assert abs(abs(z) - threshold) < 1e-6 * max(1.0, abs(z)), (i, g, w)   # at the threshold
            return
        if w is None:
            continue
        assert g[0] == pytest.approx(w[0], rel=1e-6, abs=1e-6)
        assert g[1] == pytest.approx(w[1], rel=1e-9, abs=1e-6)
        assert g[2] == pytest.approx(w[2], rel=1e-6, abs=1e-6)


@hsettings(max_examples=200, deadline=None)
@given(base=st.lists(st.floats(-100, 100), min_size=1, max_size=300),
       spikes=st.lists(st.tuples(st.integers(0, 299), st.floats(-1e4, 1e4)), max_size=40),
       window=st.integers(1, 80), threshold=st.floats(0.5, 6.0), offset=st.sampled_from([0.0, 1e6]),
       cuts=st.lists(st.integers(1, 50), min_size=1, max_size=10), flat=st.booleans())
def test_detector_compiled_loop_is_the_python_loop(base, spikes, window, threshold, offset, cuts, flat):
    """observe_many through gw_ext/storebatch.pyx's observe_run and through its Python
    loop: the same alerts and the same state, bit for bit, whatever the values and
    however the batches cut them."""
    pytest.importorskip("gw_ext.storebatch")
    values = [(round(v) if flat else v) + offset for v in base]
    for i, v in spikes:
        if i < len(values):
            values[i] = v + offset
    compiled, python = Detector(window, threshold), Detector(window, threshold)
    python.compiled = False
    i = j = 0
    while i < len(values):
        step = cuts[j % len(cuts)]
        got = compiled.observe_many("d", "m", values[i:i + step])
        want = python.observe_many("d", "m", values[i:i + step])
        assert got == want
        a, b = compiled.keys[("d", "m")], python.keys[("d", "m")]
        assert (list(a.values), a.run, a.s, a.q, a.shift, a.since) == \
            (list(b.values), b.run, b.s, b.q, b.shift, b.since)
        i += step
        j += 1


@hsettings(max_examples=150, deadline=None)
@given(samples=st.lists(st.tuples(st.integers(0, 5), st.floats(-100, 100)), max_size=400),
       spikes=st.lists(st.integers(0, 399), max_size=30), window=st.integers(1, 40),
       threshold=st.floats(0.5, 6.0), cuts=st.lists(st.integers(1, 150), min_size=1, max_size=5))
def test_detect_compiled_runs_are_the_python_loop(samples, spikes, window, threshold, cuts):
    """batch.detect through gw_ext/storebatch.pyx's detect_runs (every series' run in
    C) and through its Python loop: the same alerts in the same order, and the same
    detector state, over batches of several series in any arrival order."""
    pytest.importorskip("gw_ext.storebatch")
    from gw.pipeline import batch
    samples = list(samples)
    for i in spikes:
        if i < len(samples):
            samples[i] = (samples[i][0], samples[i][1] * 50 + 1e3)
    names = [(f"d{k % 3}", f"m{k}") for k in range(6)]
    compiled, python = Detector(window, threshold), Detector(window, threshold)
    python.compiled = False
    i = j = 0
    while i < len(samples):
        part = samples[i:i + cuts[j % len(cuts)]]
        key = np.array([k for k, _v in part], dtype=np.int64)
        val = np.array([v for _k, v in part], dtype=np.float64)
        ts = np.arange(len(part), dtype=np.float64) + i
        cols = batch.Columns([], names, key, ts, val, np.arange(len(part), dtype=np.int64), {})
        assert batch.detect(cols, compiled) == batch.detect(cols, python)
        for nk, a in compiled.keys.items():
            b = python.keys[nk]
            assert (list(a.values), a.run, a.s, a.q, a.shift, a.since) == \
                (list(b.values), b.run, b.s, b.q, b.shift, b.since)
        assert compiled.keys.keys() == python.keys.keys()
        i += len(part)
        j += 1


def test_detector_rules():
    det = Detector(window=60, threshold=4.0)
    vals = [20.0 + 0.1 * ((i * 7) % 5) for i in range(30)]
    assert all(det.observe("d", "t", v) is None for v in vals)
    z = det.observe("d", "t", 30.0)
    assert z is not None and z[0] > 4
    # the spike did not enter the window: the same spike again is still an anomaly
    assert det.observe("d", "t", 30.0) is not None
    assert det.observe("d", "t", 20.1) is None
    # a level shift: 10 alerts in a row, then the new level is normal
    shifted = [det.observe("d", "t", 50.0 + 0.1 * (i % 3)) for i in range(15)]
    assert all(s is not None for s in shifted[:10]) and all(s is None for s in shifted[10:])
    # fewer than 10 samples: no decision; a flat window: no decision
    det2 = Detector(window=60, threshold=4.0)
    assert [det2.observe("x", "m", v) for v in [1, 1, 1, 1, 1, 1, 1, 1, 1, 1000]] == [None] * 10
    assert det2.observe("y", "m", 5.0) is None
    assert all(det2.observe("z", "m", 7.0) is None for _ in range(12))
    assert det2.observe("z", "m", 9.0) is None              # std 0: cannot judge
    # a small window
    det3 = Detector(window=3, threshold=1.0)
    assert [det3.observe("k", "m", v) is None for v in [1, 2, 3, 100]] == [True, True, True, False]


def test_anomaly_state_is_rebuilt_from_the_store(tmp_path):
    sink = new_sink(tmp_path, anomaly_window=20)
    vals = [20 + 0.2 * math.sin(i) for i in range(40)] + [80.0]
    feed(sink, [reading("d", T0 + i, i, {"t": v}) for i, v in enumerate(vals)])
    assert sink.conn.execute("SELECT count(*) FROM alerts").fetchone()[0] == 1
    sink.close()
    # a new process: the window comes from the store (the 20 last samples that raised no
    # alert), so the very next spike is caught without 10 samples of warm-up
    sink = new_sink(tmp_path, anomaly_window=20)
    feed(sink, [reading("d", T0 + 100, 100, {"t": 80.0})])
    rows = sink.conn.execute("SELECT value, mean FROM alerts ORDER BY id").fetchall()
    assert len(rows) == 2
    want = np.array(vals[20:40])
    assert rows[1][1] == pytest.approx(want.mean())
    assert sink.detector.keys[("d", "t")].values.maxlen == 20


# --- migration from schema version 1 ---------------------------------------------------------

# Schema version 1, as gw wrote it before the layout of version 2.
SCHEMA_V1 = """
CREATE TABLE readings (worker INTEGER NOT NULL, lsn INTEGER NOT NULL, device_id TEXT NOT NULL, ts REAL NOT NULL, seq INTEGER, metrics TEXT NOT NULL, tags TEXT NOT NULL, payload TEXT, PRIMARY KEY (worker, lsn)) WITHOUT ROWID;
CREATE TABLE samples (device_id TEXT NOT NULL, metric TEXT NOT NULL, ts REAL NOT NULL, value REAL NOT NULL, worker INTEGER NOT NULL, lsn INTEGER NOT NULL, PRIMARY KEY (device_id, metric, ts, worker, lsn)) WITHOUT ROWID;
CREATE TABLE rollups (win TEXT NOT NULL, device_id TEXT NOT NULL, metric TEXT NOT NULL, bucket REAL NOT NULL, count INTEGER NOT NULL, min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL, sumsq REAL NOT NULL, PRIMARY KEY (win, device_id, metric, bucket)) WITHOUT ROWID;
CREATE TABLE devices (device_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL, last_values TEXT NOT NULL, tags TEXT NOT NULL, readings INTEGER NOT NULL);
CREATE TABLE alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, metric TEXT NOT NULL, ts REAL NOT NULL, value REAL NOT NULL, zscore REAL NOT NULL, mean REAL NOT NULL, std REAL NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, acked REAL);
CREATE TABLE checkpoints (sink TEXT NOT NULL, worker INTEGER NOT NULL, next_offset INTEGER NOT NULL, PRIMARY KEY (sink, worker));
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX readings_device_ts ON readings (device_id, ts);
CREATE INDEX readings_ts ON readings (ts);
CREATE INDEX rollups_win_bucket ON rollups (win, bucket);
CREATE INDEX alerts_device ON alerts (device_id, metric, ts);
CREATE INDEX alerts_state ON alerts (state, ts);
CREATE INDEX alerts_device_id ON alerts (device_id, id);
INSERT INTO meta VALUES ('schema_version', '1');
"""
V1_RAW = ("SELECT ts, value FROM samples WHERE device_id = ? AND metric = ? AND ts >= ? AND ts < ? "
          "ORDER BY ts LIMIT ?")
V1_ROLLUP = ("SELECT bucket, count, min, max, sum, sumsq FROM rollups WHERE win = ? AND device_id = ? "
             "AND metric = ? AND bucket >= ? AND bucket < ? ORDER BY bucket LIMIT ?")


def make_v1_store(path, devices=4, hours=3):
    """A version 1 store filled as its sink did: readings, samples, rollups, devices, alerts, checkpoints."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.executescript(SCHEMA_V1)
    rng = np.random.default_rng(5)
    day = float(int(T0) // 86400 * 86400)
    c.execute("BEGIN")
    lsn = 0
    roll: dict = {}
    for i in range(hours * 3600 // 7):
        for d in range(devices):
            ts = day + i * 7 + d * 0.25 + 0.123456
            lsn += 100
            vals = {"temp_c": round(20 + float(rng.standard_normal()), 3), "rssi": float(-60 - d)}
            c.execute("INSERT INTO readings VALUES (?,?,?,?,?,?,?,NULL)",
                      (d % 2, lsn, f"dev{d}", ts, i, json.dumps(vals), '{"site":"AAL"}'))
            for m, v in vals.items():
                c.execute("INSERT INTO samples VALUES (?,?,?,?,?,?)", (f"dev{d}", m, ts, v, d % 2, lsn))
                for win, w in WINDOWS:
                    a = roll.setdefault((win, f"dev{d}", m, math.floor(ts / w) * w), [0, v, v, 0.0, 0.0])
                    a[0] += 1
                    a[1] = min(a[1], v)
                    a[2] = max(a[2], v)
                    a[3] += v
                    a[4] += v * v
    c.executemany("INSERT INTO rollups VALUES (?,?,?,?,?,?,?,?,?)", [(*k, *a) for k, a in roll.items()])
    for d in range(devices):
        c.execute("INSERT INTO devices VALUES (?,?,?,?,?,?)", (f"dev{d}", day, day + hours * 3600,
                                                              '{"temp_c":20.5,"rssi":-60.0}', '{"site":"AAL"}', 7))
    c.execute("INSERT INTO alerts (device_id, metric, ts, value, zscore, mean, std, state, created) "
              "VALUES ('dev1', 'temp_c', ?, 80.0, 9.0, 20.0, 1.0, 'open', ?)", (day + 700, day + 701))
    c.executemany("INSERT INTO checkpoints VALUES ('store', ?, ?)", [(0, lsn + 100), (1, lsn)])
    c.execute("COMMIT")
    return c, day


def test_a_version_1_store_is_migrated_and_answers_the_same(tmp_path, caplog):
    from gw import query as q

    path = tmp_path / STORE_FILE
    c, day = make_v1_store(path)
    queries = [("raw", "dev1", "temp_c", day + 600, day + 4000, 10001), ("raw", "dev3", "rssi", day, day + 86400, 50),
               ("1m", "dev2", "temp_c", day, day + 7200, 10001), ("1h", "dev0", "rssi", day, day + 86400, 10001),
               ("1d", "dev1", "temp_c", day - 86400, day + 86400, 10001)]
    want = [c.execute(V1_RAW, (dev, m, a, b, lim)).fetchall() if win == "raw" else
            c.execute(V1_ROLLUP, (win, dev, m, a, b, lim)).fetchall() for win, dev, m, a, b, lim in queries]
    counts = [c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("readings", "samples", "rollups")]
    c.close()
    with caplog.at_level("WARNING", logger="gw.pipeline.store"):
        conn = open_store(path)
    assert "migrating" in caplog.text and "schema version 1" in caplog.text
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "3"
    assert [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("readings", "samples", "rollups")] == counts
    assert not conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'v1_%'").fetchall()
    conn.close()
    api = q.Query(tmp_path)
    for (win, dev, m, a, b, lim), rows in zip(queries, want):
        assert rows, (win, dev, m)
        assert api._series_rows(dev, m, win, a, b, lim) == rows, (win, dev, m)
    api.close()
    # the sink goes on from the migrated checkpoints and state
    sink = new_sink(tmp_path, nworkers=2)
    assert sink.checkpoints == {0: counts[0] * 100 + 100, 1: counts[0] * 100}
    assert len(sink._warm("dev1", "temp_c")) == 60
    feed(sink, [reading("dev1", day + 5 * 3600, 1, {"temp_c": 20.0})], slot=0)
    assert sink.conn.execute("SELECT readings FROM devices WHERE device_id = 'dev1'").fetchone()[0] == 8
    sink.close()


def test_a_failed_migration_leaves_the_version_1_store_as_it_was(tmp_path):
    path = tmp_path / STORE_FILE
    c, _day = make_v1_store(path, devices=2, hours=1)
    # a stray table in the way of version 2's sample chunks: the copy fails half-way,
    # after the readings and series were copied
    c.execute("CREATE TABLE sample_chunks (x)")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    before = path.read_bytes()
    with pytest.raises(PipelineError, match="cannot be initialised"):
        open_store(path, quick_check=False)
    c = sqlite3.connect(path)
    assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    assert {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == \
        {"readings", "samples", "rollups", "devices", "alerts", "checkpoints", "meta", "sqlite_sequence",
         "sample_chunks"}
    assert c.execute("SELECT count(*) FROM samples").fetchone()[0] == 2 * 2 * (3600 // 7)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    assert path.read_bytes() == before


def test_raw_ranges_over_chunks_of_late_and_early_batches(tmp_path):
    """Readings of one series arriving out of time order, over many batches (chunks that
    overlap in time): the raw query answers every sample in time order, page by page."""
    from gw import query as q

    sink = new_sink(tmp_path, anomaly_window=5)
    rng = np.random.default_rng(11)
    times = T0 + rng.permutation(3000) * 1.5          # every 1.5 s over 75 minutes, shuffled
    payloads = [reading("d", float(t), i, {"x": float(i)}) for i, t in enumerate(times)]
    feed(sink, payloads, batch=97)
    assert sink.conn.execute("SELECT count(*) FROM sample_chunks").fetchone()[0] > 60
    sink.close()
    want = sorted((float(t), float(i)) for i, t in enumerate(times))
    api = q.Query(tmp_path, now=lambda: T0 + 86400)
    got = []
    start = q._dt(T0 - 10).isoformat().replace("+00:00", "Z")
    to = q._dt(T0 + 5000).isoformat().replace("+00:00", "Z")
    while True:
        page = api.series(b"d", f"metric=x&from={start}&to={to}&limit=700".encode())
        got.extend((p.ts.timestamp(), p.value) for p in page.points)
        if page.next is None:
            break
        start = page.next.isoformat().replace("+00:00", "Z")
    assert [v for _t, v in got] == [v for _t, v in want]
    assert [t for t, _v in got] == pytest.approx([t for t, _v in want], abs=1e-6)
    # a range inside: exactly the samples in it
    rows = api._series_rows("d", "x", "raw", T0 + 1000.5, T0 + 2000, 10001)
    assert rows == [p for p in want if T0 + 1000.5 <= p[0] < T0 + 2000]
    api.close()
    from gw.pipeline.store import CHUNK_SECONDS
    assert q.CHUNK_SECONDS == CHUNK_SECONDS          # the reader's notion of a chunk's span is the writer's


# --- schema version 3: readings without a ts index, found by their spans

def _export_rows(path, start, end, device=None):
    from gw.export import Selection, SqliteSource
    src = SqliteSource(path)
    try:
        sel = Selection(start=start, end=end, device=device, window="raw")
        with src.snapshot():
            n = src.count(sel)
            rows = [r for b in src.batches(sel, rows=7) for r in zip(b.device_id, b.ts, b.seq)]
    finally:
        src.close()
    return n, rows


def _brute(conn, start, end, device=None):
    sql = "SELECT device_id, ts, seq FROM readings WHERE ts >= ? AND ts < ?" + (" AND device_id = ?" if device else "")
    rows = conn.execute(sql + " ORDER BY ts, device_id, worker, lsn",
                        (start, end) + ((device,) if device else ())).fetchall()
    return rows


def _mixed_store(tmp_path):
    """Batches whose times overlap (late readings), from two logs, and rows written by another writer."""
    sink = new_sink(tmp_path, nworkers=2)
    for b in range(12):
        base = T0 + b * 10
        late = [reading(f"d{k % 5}", base - 25 + k, 1000 * b + k, {"v": float(k)}) for k in range(3)]
        now = [reading(f"d{k % 5}", base + k * 0.5, 1000 * b + 100 + k, {"v": float(k)}) for k in range(20)]
        feed(sink, now[:10] + late, slot=b % 2)
        feed(sink, now[10:], slot=(b + 1) % 2)
    sink.conn.execute("INSERT INTO readings VALUES (7, 1, 'other', ?, 5, '{}', '{}', NULL)", (T0 + 33.25,))
    return sink


def test_readings_have_no_ts_index_and_each_batch_a_span(tmp_path):
    sink = _mixed_store(tmp_path)
    c = sink.conn
    assert "readings_ts" not in {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    spans = c.execute("SELECT first, last, t0, t1 FROM reading_spans ORDER BY first").fetchall()
    assert len(spans) == 24
    for f, l, t0, t1 in spans:
        lo, hi, n = c.execute("SELECT min(ts), max(ts), count(*) FROM readings WHERE rowid BETWEEN ? AND ?",
                              (f, l)).fetchone()
        assert (lo, hi, n) == (t0, t1, l - f + 1)
    assert sum(l - f + 1 for f, l, _a, _b in spans) == c.execute("SELECT count(*) FROM readings").fetchone()[0] - 1
    sink.close()


@pytest.mark.parametrize("device", [None, "d3"])
def test_export_finds_a_time_range_by_spans_in_time_order(tmp_path, device):
    sink = _mixed_store(tmp_path)
    path = tmp_path / STORE_FILE
    for start, end in [(T0 - 100, T0 + 1000), (T0 + 12, T0 + 47.5), (T0 + 33.25, T0 + 33.26), (T0 + 500, T0 + 600),
                       (T0 - 25, T0 - 24)]:
        want = _brute(sink.conn, start, end, device)
        n, got = _export_rows(path, start, end, device)
        assert got == want and n == len(want), (start, end)
    assert len(_brute(sink.conn, T0 - 100, T0 + 1000)) == 12 * 23 + 1
    sink.close()


def test_retention_drops_the_spans_of_deleted_readings(tmp_path):
    now = T0 + 10 * 86400
    sink = new_sink(tmp_path, raw_retention=86400.0, clock=lambda: now)
    feed(sink, [reading("d", T0 + i, i, {"v": 1.0}) for i in range(100)], batch=10)
    feed(sink, [reading("d", now - 5 + i * 0.01, 100 + i, {"v": 1.0}) for i in range(50)], batch=10)
    sink.retention_pass()
    assert sink.conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 50
    assert sink.conn.execute("SELECT count(*) FROM reading_spans").fetchone()[0] == 5
    n, got = _export_rows(tmp_path / STORE_FILE, 0.0, now + 10)
    assert n == 50 and [s for _d, _t, s in got] == list(range(100, 150))
    sink.close()


def _as_version_2(path):
    """The store at `path` (this version's, closed) as schema version 2 wrote it:
    the same tables with the readings' ts index, no reading_spans."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("BEGIN")
    c.execute("DROP TABLE reading_spans")
    c.execute("CREATE INDEX readings_ts ON readings (ts)")
    c.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    c.execute("COMMIT")
    c.close()


def test_a_version_2_store_is_migrated_and_exports_the_same(tmp_path, caplog, monkeypatch):
    from gw.pipeline import store as store_mod

    monkeypatch.setattr(store_mod, "SPAN_ROWS", 16)
    sink = _mixed_store(tmp_path)
    path = tmp_path / STORE_FILE
    tables = ("readings", "sample_chunks", "rollup", "series", "devices", "alerts", "checkpoints")
    before = {t: sink.conn.execute(f"SELECT * FROM {t} ORDER BY rowid" if t not in ("rollup", "checkpoints")
                                   else f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall() for t in tables}
    sink.close()
    _as_version_2(path)
    # export reads a version 2 store (not yet migrated) by its ts index
    n2, got2 = _export_rows(path, T0 - 100, T0 + 1000)
    with caplog.at_level("WARNING", logger="gw.pipeline.store"):
        conn = open_store(path)
    assert "schema version 3" in caplog.text
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "3"
    assert "readings_ts" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    after = {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid" if t not in ("rollup", "checkpoints")
                             else f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall() for t in tables}
    assert after == before
    nspans = conn.execute("SELECT count(*) FROM reading_spans").fetchone()[0]
    assert nspans == math.ceil((len(before["readings"]) + 1) / 16)
    want = _brute(conn, T0 - 100, T0 + 1000)
    conn.close()
    n3, got3 = _export_rows(path, T0 - 100, T0 + 1000)
    assert got2 == got3 == want and n2 == n3 == len(want) == 12 * 23 + 1
    # the sink goes on from the migrated store
    sink = new_sink(tmp_path, nworkers=2)
    feed(sink, [reading("d1", T0 + 900, 99999, {"v": 1.0})], slot=0)
    assert _export_rows(path, T0 + 899, T0 + 901)[0] == 1
    sink.close()
