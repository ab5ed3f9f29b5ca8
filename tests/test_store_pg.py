"""PostgreSQL as the store (`--store postgresql://...`), end to end with real parts:
a real PostgreSQL server (tests/pg_server.py), real `gw serve` processes, real
MQTT and HTTP clients. Every reading acknowledged lands exactly once, through
kill -9 of PostgreSQL and of the pipeline in the middle of a stream, and with
PostgreSQL down when gw starts; the day partitions are created ahead and
dropped by retention; a database of another schema version is refused."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from conftest import GwServer, wait_for
from http_client import HttpConn, ingest_body
from pg_server import pg_server, pg_url  # noqa: F401 (fixtures)
from test_pipeline import T0, reading
from test_serve_pipeline import Publisher

DAY = 86400


def stored(pg, url: str, device: str) -> list[int]:
    """The seqs of a device's readings in the store, one per row ([] while PostgreSQL is down)."""
    try:
        return [r[0] for r in pg.psql("SELECT seq FROM readings WHERE device_id = %s", url.rsplit("/", 1)[1],
                                      (device,))]
    except Exception:          # noqa: BLE001  (down, or no schema yet)
        return []


def wait_exactly_once(pg, url: str, device: str, acked: set[int], timeout: float = 60.0) -> list[int]:
    def done():
        rows = stored(pg, url, device)
        return rows if acked <= set(rows) else None
    try:
        rows = wait_for(done, timeout, interval=0.2, what="every acknowledged reading in PostgreSQL")
    except AssertionError:
        missing = sorted(acked - set(stored(pg, url, device)))
        raise AssertionError(f"{len(missing)} acknowledged readings not in the store: {missing[:20]}") from None
    time.sleep(0.5)               # a doubled batch would land after the last missing one
    rows = stored(pg, url, device)
    assert len(rows) == len(set(rows)), "a reading was stored twice"
    return rows


def metrics(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    with HttpConn(server.ports["http"]) as c:
        text = c.request("GET", "/metrics").body.decode()
    return {(s.name, s.labels.get("sink", "")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def pg_gw(gw_factory, pg_url):
    def make(**kw):
        return gw_factory(workers=2, listeners=("mqtt", "http"),
                          args=["--ack", "sink", "--fsync", "batch", "--store", pg_url, *kw.pop("args", ())], **kw)
    return make


def test_readings_land_exactly_once_and_the_query_api_reads_them(pg_gw, pg_server, pg_url):
    server = pg_gw()
    device = f"pg-{uuid.uuid4().hex[:6]}"
    pub = Publisher(server.ports["mqtt"], device)
    try:
        assert pub.stream(0, 500) == 500
    finally:
        pub.close()
    assert pub.acked == set(range(500))
    rows = wait_exactly_once(pg_server, pg_url, device, pub.acked)
    assert sorted(rows) == list(range(500))
    db = pg_url.rsplit("/", 1)[1]
    assert pg_server.psql("SELECT readings FROM devices WHERE device_id = %s", db, (device,)) == [(500,)]
    assert pg_server.psql("SELECT sum(count) FROM rollups WHERE win = '1d' AND device_id = %s", db,
                          (device,)) == [(500,)]
    assert pg_server.psql("SELECT count(*) FROM samples WHERE device_id = %s", db, (device,)) == [(500,)]
    # the query API of the running workers reads the same database
    with HttpConn(server.ports["http"]) as c:
        doc = c.request("GET", f"/v1/devices/{device}").json()
        assert doc["readings"] == 500 and doc["last_values"] == {"v": 499.0}
        series = c.request("GET", f"/v1/devices/{device}/metrics?metric=v&limit=1000").json()
        assert sorted(p["value"] for p in series["points"]) == [float(i) for i in range(500)]


def test_kill9_of_postgresql_mid_stream_loses_and_doubles_nothing(pg_gw, pg_server, pg_url):
    server = pg_gw()
    device = f"pg-{uuid.uuid4().hex[:6]}"
    pub = Publisher(server.ports["mqtt"], device)
    stop = threading.Event()
    sent = [0]

    def stream():
        sent[0] = pub.stream(0, 1_000_000, stop)
    t = threading.Thread(target=stream, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(stored(pg_server, pg_url, device)) > 200, 30, what="readings stored")
        pg_server.kill9()
        # the log takes readings meanwhile; the store sink retries, its lag grows
        wait_for(lambda: metrics(server).get(("gw_sink_retries_total", ""), 0) > 0, 30,
                 what="the store sink retrying")
        lag_down = wait_for(lambda: metrics(server)[("gw_sink_lag_bytes", "store")] > 0
                            and metrics(server)[("gw_sink_lag_bytes", "store")], 30, what="the lag growing")
        assert lag_down > 0
        time.sleep(1.0)
        pg_server.start()
        time.sleep(1.0)
    finally:
        stop.set()
        t.join(30)
        pub.close()
        if not pg_server.running():
            pg_server.start()            # for the tests after this one
    assert len(pub.acked) > 200
    rows = wait_exactly_once(pg_server, pg_url, device, pub.acked, timeout=90)
    assert set(rows) <= set(range(sent[0]))
    wait_for(lambda: metrics(server)[("gw_sink_lag_bytes", "store")] == 0, 30, what="the lag back to 0")
    assert "store sink failing" in server.wait_log("working again")


def test_kill9_of_the_pipeline_mid_stream_loses_and_doubles_nothing(pg_gw, pg_server, pg_url):
    server = pg_gw()
    device = f"pg-{uuid.uuid4().hex[:6]}"
    pub = Publisher(server.ports["mqtt"], device)
    stop = threading.Event()
    t = threading.Thread(target=lambda: pub.stream(0, 1_000_000, stop), daemon=True)
    t.start()
    try:
        wait_for(lambda: len(stored(pg_server, pg_url, device)) > 200, 30, what="readings stored")
        first = server.pipeline_pid()
        server.expect_pipeline_deaths(1)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: server.pipeline_pid() not in (0, first), 20, what="the pipeline respawned")
        time.sleep(1.0)
    finally:
        stop.set()
        t.join(30)
        pub.close()
    rows = wait_exactly_once(pg_server, pg_url, device, pub.acked, timeout=60)
    assert len(rows) >= len(pub.acked) > 200


def test_postgresql_down_at_start_gw_starts_and_stores_once_it_is_back(tmp_path, pg_server, pg_url):
    pg_server.stop()
    secret_url = pg_url.replace("gw@", "gw:s3cret-pw@")        # trust authentication ignores it
    try:
        server = GwServer(tmp_path / "gw", workers=1, listeners=("http",), args=["--store", secret_url])
        server.start(timeout=30)
        device = f"pg-{uuid.uuid4().hex[:6]}"
        with HttpConn(server.ports["http"]) as c:
            for i in range(30):
                assert c.request("POST", f"/v1/ingest/{device}", ingest_body(seq=i)).status == 202
            # the query API says the store is unavailable, it does not fail
            res = c.request("GET", f"/v1/devices/{device}")
            assert res.status == 503 and res.json()["code"] == "store_unavailable"
        server.wait_log(f"PostgreSQL store {pg_url} cannot be reached now")     # without the password
    finally:
        if not pg_server.running():
            pg_server.start()
    try:
        rows = wait_exactly_once(pg_server, pg_url, device, set(range(30)), timeout=90)
        assert sorted(rows) == list(range(30))
        with HttpConn(server.ports["http"]) as c:
            assert wait_for(lambda: c.request("GET", f"/v1/devices/{device}").status == 200, 10,
                            what="the query API reading PostgreSQL")
        assert "s3cret-pw" not in server.log() and "s3cret-pw" not in server.stdout()
    finally:
        server.stop()


def test_another_schema_version_is_refused_at_start(tmp_path, pg_server, pg_url):
    from gw.pipeline.pgstore import connect, ensure_schema
    conn = connect(pg_url, 5, "test", autocommit=True)
    ensure_schema(conn, "test")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    server = GwServer(tmp_path / "gw", workers=1, listeners=("http",), args=["--store", pg_url])
    with pytest.raises(RuntimeError) as info:
        server.start(timeout=20)
    assert "schema version '99'" in str(info.value)
    assert server.proc.returncode == 1


def test_partitions_are_created_ahead_and_dropped_by_retention(pg_server, pg_url):
    from gw.pipeline.pgstore import PgStoreSink, existing_partitions, partition_name

    now = [T0 + DAY + 3600.0]              # today, 01:00 UTC
    sink = PgStoreSink(pg_url, 1, raw_retention=2 * DAY, rollup_retention={"1m": 3 * DAY, "1h": 10 * DAY},
                       partitions_ahead=2, clock=lambda: now[0])
    sink.open()
    try:
        today = int(now[0] // DAY) * DAY
        sink.poll(time.monotonic())
        parts = existing_partitions(sink.conn)
        for parent in ("readings", "samples", "rollups_1m"):
            assert {today, today + DAY, today + 2 * DAY} <= parts[parent], parent
        # readings of yesterday and the day before: their partitions made for them;
        # one from 30 days ago (past retention) goes to the default partition
        recs, off = [], 0
        for ts in (today - 2 * DAY + 10, today - DAY + 10, today + 10, today - 30 * DAY):
            p = reading("d1", ts, off, {"t": 1.0})
            recs.append((off, p))
            off += 8 + len(p)
        sink.write([(0, recs, off)])
        db = pg_url.rsplit("/", 1)[1]
        assert pg_server.psql("SELECT count(*) FROM readings_default", db) == [(1,)]
        for day in (today - 2 * DAY, today - DAY, today):
            assert pg_server.psql(f"SELECT count(*) FROM {partition_name('readings', day)}", db) == [(1,)]
        # three days later: the partitions past 2 days' retention are dropped, not emptied row by row
        now[0] += 3 * DAY
        dropped = sink.retention_pass()
        parts = existing_partitions(sink.conn)
        new_today = today + 3 * DAY
        assert min(parts["readings"]) == new_today - 2 * DAY and min(parts["samples"]) == new_today - 2 * DAY
        assert dropped >= 6
        assert pg_server.psql("SELECT count(*) FROM readings", db) == [(0,)]
        assert pg_server.psql("SELECT count(*) FROM readings_default", db) == [(0,)]
        # the 1-minute rollups keep 3 days: the day before yesterday's stays until later
        assert min(parts["rollups_1m"]) == new_today - 3 * DAY
        # ahead again from the new today
        sink._next_partitions = 0.0
        sink.poll(time.monotonic())
        assert new_today + 2 * DAY in existing_partitions(sink.conn)["readings"]
        # the 1-hour rollups are deleted past their retention, the 1-day ones kept
        now[0] += 10 * DAY
        sink.retention_pass()
        assert pg_server.psql("SELECT count(*) FROM rollups WHERE win = '1h'", db) == [(0,)]
        assert pg_server.psql("SELECT count(*) FROM rollups WHERE win = '1d'", db) == [(4,)]
    finally:
        sink.close()


def test_a_batch_committed_but_unanswered_is_not_written_twice(pg_server, pg_url):
    """The commit reached PostgreSQL but its answer was lost (the runner then
    replays the batch from the old checkpoints): the records below the
    database's checkpoints are left out."""
    from gw.pipeline.pgstore import PgStoreSink

    sink = PgStoreSink(pg_url, 2)
    sink.open()
    try:
        recs, off = [], 0
        for i in range(100):
            p = reading(f"d{i % 3}", T0 + i, i, {"t": float(i)})
            recs.append((off, p))
            off += 8 + len(p)
        sink.write([(0, recs[:60], recs[60][0])])
        sink.checkpoints[0] = 0            # as if the answer to that commit never came
        sink.write([(0, recs, off)])
        db = pg_url.rsplit("/", 1)[1]
        assert pg_server.psql("SELECT count(*), count(DISTINCT lsn) FROM readings", db) == [(100, 100)]
        assert pg_server.psql("SELECT sum(readings) FROM devices", db) == [(100,)]
        assert pg_server.psql("SELECT sum(count) FROM rollups WHERE win = '1d'", db) == [(100,)]
        assert sink.replayed == 60 and sink.checkpoints[0] == off
    finally:
        sink.close()


def test_backslashes_tabs_and_newlines_reach_the_database_unchanged(pg_server, pg_url):
    """The sink writes COPY's text format itself: its escapes must round-trip."""
    import json

    from gw.pipeline.pgstore import PgStoreSink

    tags = {"note": "a\\b\tc\nd\re \\N", "q": "\"quoted\""}
    payload = b'{\t"raw":\n"x\\\\y\\n"}'
    p = reading("odd_dev-1", T0 + 5, None, {"m": 1.5}, tags, payload=payload)
    sink = PgStoreSink(pg_url, 1)
    sink.open()
    try:
        sink.write([(0, [(0, p)], 8 + len(p))])
    finally:
        sink.close()
    db = pg_url.rsplit("/", 1)[1]
    rows = pg_server.psql("SELECT device_id, seq, tags::text, payload::text, metrics::text FROM readings", db)
    assert len(rows) == 1
    dev, seq, got_tags, got_payload, got_metrics = rows[0]
    assert (dev, seq) == ("odd_dev-1", None)
    assert json.loads(got_tags) == tags
    assert json.loads(got_payload) == json.loads(payload)
    assert json.loads(got_metrics) == {"m": 1.5}
    assert pg_server.psql("SELECT tags->>'note' FROM devices", db) == [(tags["note"],)]


def test_names_with_backslashes_and_tabs_reach_samples_and_rollups_unchanged(pg_server, pg_url):
    """Device ids and metric names go through COPY's text format too (samples,
    rollups, devices), ordered byte-wise; times to the microsecond."""
    from gw.pipeline.pgstore import PgStoreSink

    names = [("dev\\one", "temp\tc"), ("dev\\one", "b\\N"), ("Zed", "m"), ("\u00e9t\u00e9", "\u00b5")]
    recs, off = [], 0
    for i in range(12):
        dev, metric = names[i % len(names)]
        p = reading(dev, T0 + i + 0.123456, i, {metric: i * 0.1})
        recs.append((off, p))
        off += 8 + len(p)
    sink = PgStoreSink(pg_url, 1)
    sink.open()
    try:
        for lo in range(0, len(recs), 5):           # three batches: the rollups are upserted again
            part = recs[lo:lo + 5]
            sink.write([(0, part, part[-1][0] + 8 + len(part[-1][1]))])
    finally:
        sink.close()
    db = pg_url.rsplit("/", 1)[1]
    got = pg_server.psql("SELECT device_id, metric, extract(epoch FROM ts)::numeric(20,6)::text, value "
                         "FROM samples ORDER BY lsn", db)
    want = [(names[i % 4][0], names[i % 4][1], f"{T0 + i + 0.123456:.6f}", i * 0.1) for i in range(12)]
    assert got == want
    rollups = pg_server.psql("SELECT device_id, metric, count, sum FROM rollups WHERE win = '1d' "
                             "ORDER BY device_id, metric", db)
    want = sorted((d, m, 3, sum(i * 0.1 for i in range(k, 12, 4))) for k, (d, m) in enumerate(names))
    assert [r[:3] for r in rollups] == [w[:3] for w in want]
    assert [r[3] for r in rollups] == pytest.approx([w[3] for w in want])
    assert pg_server.psql("SELECT device_id, readings FROM devices ORDER BY device_id", db) == \
        sorted([("dev\\one", 6), ("Zed", 3), ("\u00e9t\u00e9", 3)])


def test_rollup_tables_of_an_earlier_store_get_their_fillfactor(pg_server, pg_url):
    """A store made before the rollup tables had a fillfactor gets it at start
    (same layout otherwise: no new schema version)."""
    from gw.pipeline.pgstore import ROLLUP_FILLFACTOR, PgStoreSink

    sink = PgStoreSink(pg_url, 1)
    sink.open()
    sink.poll(time.monotonic())                      # the day partitions
    sink.close()
    db = pg_url.rsplit("/", 1)[1]
    for table in ("rollups_1h", "rollups_1d", "rollups_1m_default"):
        pg_server.psql(f"ALTER TABLE {table} RESET (fillfactor)", db)
    day = pg_server.psql("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                         "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'rollups_1m' "
                         "AND c.relname <> 'rollups_1m_default' LIMIT 1", db)[0][0]
    pg_server.psql(f"ALTER TABLE {day} RESET (fillfactor)", db)
    sink = PgStoreSink(pg_url, 1)
    sink.open()
    sink.close()
    rows = dict(pg_server.psql("SELECT relname, reloptions FROM pg_class WHERE relname = ANY(%s)", db,
                               (["rollups_1h", "rollups_1d", "rollups_1m_default", day],)))
    assert rows == {t: [f"fillfactor={ROLLUP_FILLFACTOR}"]
                    for t in ("rollups_1h", "rollups_1d", "rollups_1m_default", day)}


def test_a_reading_postgresql_cannot_hold_is_refused_at_ingest_and_the_rest_land(pg_gw, pg_server, pg_url):
    """U+0000 in a tag or the payload: JSON carries it, PostgreSQL's text and jsonb
    cannot. Taken into the log, its batch would fail at every retry and hold every
    reading behind it; ingest refuses it (400) instead, and the store keeps moving."""
    server = pg_gw()
    device = f"pg-{uuid.uuid4().hex[:6]}"
    with HttpConn(server.ports["http"]) as c:
        bad_tag = c.request("POST", f"/v1/ingest/{device}", b'{"seq":0,"metrics":{"v":1},"tags":{"t":"a\\u0000"}}')
        assert (bad_tag.status, bad_tag.json()["code"]) == (400, "invalid_tag")
        bad_payload = c.request("POST", f"/v1/ingest/{device}", b'{"seq":0,"metrics":{"v":1},"payload":"\\u0000"}')
        assert (bad_payload.status, bad_payload.json()["code"]) == (400, "invalid_payload")
        for seq in range(1, 21):
            assert c.request("POST", f"/v1/ingest/{device}", ingest_body({"v": seq}, seq=seq)).status == 200
    rows = wait_exactly_once(pg_server, pg_url, device, set(range(1, 21)))
    assert sorted(rows) == list(range(1, 21))
