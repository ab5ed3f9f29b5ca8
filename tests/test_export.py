"""`gw export` against a real `gw serve` on each store (the embedded one and
PostgreSQL, tests/pg_server.py): readings ingested over HTTP (several devices,
metrics, tags, a payload), stored by the pipeline, then exported by `gw export`
run as a subprocess in each format and read back with pyarrow, the csv module
and json: every reading once, in (time, device id) order, with its values,
timestamps, tags and payload; a rollup window as the query API answers it; the
device filter (an id, a pattern); an empty range; bad arguments; a progress bar
only on a terminal; an export while readings keep coming (one consistent
snapshot: the count, the metric columns and the rows agree); the same readings
exported from both stores alike; a PostgreSQL store that cannot be reached, has
no gw schema, or drops the connection mid-export."""

from __future__ import annotations

import csv
import json
import os
import pty
import subprocess
import threading
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PYTHON, free_ports, gw_env, run_gw, wait_for
from http_client import HttpConn
from gw.export_pg import like_pattern
from pg_server import pg_server  # noqa: F401 (a fixture)

UTC = timezone.utc
N = 600                      # readings ingested
STEP_MS = 1_250              # between two readings: 12.5 minutes in all, so several 1m windows
DEVICES = ("site1-a", "site1-b", "site2-c", "lab-x")
LIVE_MAX = 80_000            # readings the live test sends at most


def _rfc3339(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _reading(i: int, base_us: int) -> dict:
    """Reading i: its device, time (milliseconds apart, none shared), metrics
    (rh on site1 devices only, volt on every 7th), tags and, now and then, a payload."""
    device = DEVICES[i % len(DEVICES)]
    metrics = {"temp_c": round(20 + (i % 23) * 0.37 - 3.1, 3)}
    if device.startswith("site1"):
        metrics["rh"] = float(40 + i % 19)
    if i % 7 == 0:
        metrics["volt"] = 3.3 - i / 10_000
    tags = {"site": device.split("-")[0]}
    if i % 5 == 0:
        tags["batch"] = f"b{i // 5}"
    return {"device_id": device, "ts_us": base_us + i * STEP_MS * 1000, "seq": i, "metrics": metrics,
            "tags": tags, "payload": {"raw": f"r{i}", "n": [i, None]} if i % 11 == 0 else None}


def _wire(r: dict) -> dict:
    rec = {"device_id": r["device_id"], "ts": _rfc3339(r["ts_us"]), "seq": r["seq"], "metrics": r["metrics"],
           "tags": r["tags"]}
    if r["payload"] is not None:
        rec["payload"] = r["payload"]
    return rec


class Stored:
    """A `gw serve` and its store, as `gw export` is pointed at it."""

    def __init__(self, server, url: str | None = None):
        self.server = server
        self.url = url                        # None: the embedded store
        self.kind = "sqlite" if url is None else "postgresql"

    @property
    def ports(self) -> dict:
        return self.server.ports

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir

    def export_args(self) -> list:
        return ["--data-dir", self.data_dir, *(["--store", self.url] if self.url else [])]

    def count(self, where: str = "") -> int:
        """Readings in the store (`where`: an SQL condition both stores read alike)."""
        sql = "SELECT count(*) FROM readings" + (f" WHERE {where}" if where else "")
        if self.url is None:
            return (_stored(self.data_dir, sql) or [(0,)])[0][0]
        import psycopg
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                return conn.execute(sql).fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0                          # the pipeline has not created the schema yet


def _stored(data_dir: Path, sql: str, params=()) -> list:
    import sqlite3
    path = data_dir / "store.sqlite"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


@pytest.fixture(scope="module")
def plan():
    """N readings whose times start two hours ago on a whole hour (clear of
    readings stamped now): the same for every store."""
    now_s = int(datetime.now(UTC).timestamp())
    base_us = (now_s // 3600 * 3600 - 2 * 3600) * 1_000_000
    return [_reading(i, base_us) for i in range(N)], base_us


def _ingest(stored: Stored, readings: list[dict]) -> None:
    """The readings over HTTP, in posts of 50 on three connections; returns once all are in the store."""
    conns = [HttpConn(stored.ports["http"]) for _ in range(3)]
    try:
        for k, start in enumerate(range(0, len(readings), 50)):
            body = json.dumps([_wire(r) for r in readings[start:start + 50]]).encode()
            resp = conns[k % len(conns)].request("POST", "/v1/ingest", body)
            assert resp.status == 202, resp.body
    finally:
        for c in conns:
            c.close()
    wait_for(lambda: stored.count() >= len(readings), 60, interval=0.2, what="every reading in the store")


@pytest.fixture(scope="module")
def sqlite_ingested(gw_module_factory, plan):
    """A server on the embedded store, the planned readings ingested over HTTP."""
    readings, base_us = plan
    stored = Stored(gw_module_factory(workers=2, listeners=("http",)))
    _ingest(stored, readings)
    return stored, readings, base_us


@pytest.fixture(scope="module")
def postgresql_ingested(gw_module_factory, plan, pg_server):
    """The same on a PostgreSQL store (a database of its own on the session's server)."""
    readings, base_us = plan
    url = pg_server.database()
    stored = Stored(gw_module_factory(workers=2, listeners=("http",), args=["--store", url]), url)
    _ingest(stored, readings)
    yield stored, readings, base_us
    stored.server.stop()                    # before its database goes
    pg_server.drop(url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ingested(request):
    """Each store in turn: a server, N readings ingested over HTTP, all in the store."""
    return request.getfixturevalue(f"{request.param}_ingested")


def _export(stored: Stored, *args, expect: int = 0) -> subprocess.CompletedProcess:
    proc = run_gw("export", *stored.export_args(), *args, timeout=120)
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def _range(base_us: int) -> list[str]:
    """--from/--to around every ingested reading: RFC 3339 from, Unix seconds to."""
    return ["--from", _rfc3339(base_us), "--to", str(base_us // 1_000_000 + N * STEP_MS // 1000 + 1)]


def _in_order(readings: list[dict]) -> list[dict]:
    return sorted(readings, key=lambda r: (r["ts_us"], r["device_id"]))


def _metric_names(readings) -> list[str]:
    return sorted({m for r in readings for m in r["metrics"]})


def _no_leftovers(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if p.name.endswith(".part")] == []


def test_parquet_holds_every_reading_once_in_time_order_with_typed_columns(ingested, tmp_path):
    server, readings, base_us = ingested
    out = tmp_path / "readings.parquet"
    proc = _export(server, *_range(base_us), "--format", "parquet", "--output", out)
    assert f"wrote {N} readings" in proc.stderr

    assert os.stat(out).st_mode & 0o777 == 0o600
    _no_leftovers(tmp_path)
    meta = pq.ParquetFile(out).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    table = pq.read_table(out)
    names = _metric_names(readings)
    assert table.schema.names == ["device_id", "ts", "seq", *[f"metric_{m}" for m in names], "tags", "payload"]
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("seq").type == pa.int64()
    assert all(table.schema.field(f"metric_{m}").type == pa.float64() for m in names)
    assert table.schema.field("tags").type == pa.map_(pa.string(), pa.string())

    expected = _in_order(readings)
    rows = table.to_pylist()
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected):
        assert got["device_id"] == want["device_id"]
        assert got["ts"] == datetime.fromtimestamp(want["ts_us"] // 1_000_000, UTC).replace(
            microsecond=want["ts_us"] % 1_000_000)
        assert got["seq"] == want["seq"]
        assert {m: got[f"metric_{m}"] for m in names} == {m: want["metrics"].get(m) for m in names}
        assert dict(got["tags"]) == want["tags"]
        assert (None if got["payload"] is None else json.loads(got["payload"])) == want["payload"]


def test_csv_has_a_header_rfc3339_times_and_empty_cells_for_absent_metrics(ingested, tmp_path):
    server, readings, base_us = ingested
    out = tmp_path / "readings.csv"
    _export(server, *_range(base_us), "--output", out)       # the format from the suffix

    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = _metric_names(readings)
    assert list(rows[0]) == ["device_id", "ts", "seq", *[f"metric_{m}" for m in names], "tags", "payload"]
    expected = _in_order(readings)
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected):
        assert got["device_id"] == want["device_id"]
        assert got["ts"] == _rfc3339(want["ts_us"])
        assert int(got["seq"]) == want["seq"]
        for m in names:
            cell = got[f"metric_{m}"]
            assert (float(cell) if cell else None) == want["metrics"].get(m), (m, got)
        assert json.loads(got["tags"]) == want["tags"]
        assert (json.loads(got["payload"]) if got["payload"] else None) == want["payload"]
    _no_leftovers(tmp_path)


def test_ndjson_keeps_each_readings_shape(ingested, tmp_path):
    server, readings, base_us = ingested
    out = tmp_path / "readings.ndjson"
    _export(server, *_range(base_us), "--format", "ndjson", "-o", out)

    lines = out.read_text().splitlines()
    expected = [{"device_id": r["device_id"], "ts": _rfc3339(r["ts_us"]), "seq": r["seq"], "metrics": r["metrics"],
                 "tags": r["tags"], "payload": r["payload"]} for r in _in_order(readings)]
    assert [json.loads(line) for line in lines] == expected


@pytest.mark.parametrize("window", ["1m", "1h"])
def test_rollup_windows_are_what_the_query_api_answers(ingested, tmp_path, window):
    server, readings, base_us = ingested
    out = tmp_path / f"rollup-{window}.parquet"
    start, end = _range(base_us)[1], _range(base_us)[3]
    _export(server, "--from", start, "--to", end, "--window", window, "-o", out)
    table = pq.read_table(out)
    assert table.schema.names == ["window", "bucket", "device_id", "metric", "count", "min", "max", "mean", "std"]
    assert table.schema.field("bucket").type == pa.timestamp("us", tz="UTC")
    rows = table.to_pylist()
    assert {r["window"] for r in rows} == {window}
    keys = [(r["bucket"], r["device_id"], r["metric"]) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)

    end_rfc = _rfc3339(int(end) * 1_000_000)
    answered = 0
    with HttpConn(server.ports["http"]) as http:
        for device in DEVICES:
            for metric in _metric_names(r for r in readings if r["device_id"] == device):
                resp = http.request("GET", f"/v1/devices/{device}/metrics?metric={metric}&window={window}"
                                           f"&from={quote(start)}&to={quote(end_rfc)}&limit=1000")
                assert resp.status == 200, resp.body
                points = resp.json()["points"]
                mine = [r for r in rows if r["device_id"] == device and r["metric"] == metric]
                assert [(r["bucket"], r["count"], r["min"], r["max"]) for r in mine] == \
                    [(datetime.fromisoformat(p["ts"]), p["count"], p["min"], p["max"]) for p in points]
                assert [(r["mean"], r["std"]) for r in mine] == [(p["mean"], p["std"]) for p in points]
                answered += len(points)
    assert answered == len(rows)
    assert sum(r["count"] for r in rows) == sum(len(r["metrics"]) for r in readings)


def test_a_device_id_or_a_pattern_selects_devices(ingested, tmp_path):
    server, readings, base_us = ingested
    for device, wanted in (("site1-b", {"site1-b"}), ("site1-*", {"site1-a", "site1-b"}),
                           ("*-?", {"site1-a", "site1-b", "site2-c", "lab-x"}), ("site9-*", set()),
                           ("site1_*", set())):         # _ is a character of device ids, not a wildcard
        out = tmp_path / "some.ndjson"
        _export(server, *_range(base_us), "--device", device, "-o", out)
        got = [json.loads(line) for line in out.read_text().splitlines()]
        expected = [r for r in _in_order(readings) if r["device_id"] in wanted]
        assert [(g["device_id"], g["seq"]) for g in got] == [(r["device_id"], r["seq"]) for r in expected], device


def test_an_empty_range_writes_an_empty_file_with_the_schema_and_says_so(ingested, tmp_path):
    server, _readings, _base = ingested
    span = ["--from", "2001-01-01T00:00:00Z", "--to", "2001-01-02T00:00:00+02:00"]
    proc = _export(server, *span, "-o", tmp_path / "none.parquet")
    assert "no readings in the range" in proc.stderr
    table = pq.read_table(tmp_path / "none.parquet")
    assert table.num_rows == 0
    assert table.schema.names == ["device_id", "ts", "seq", "tags", "payload"]
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")

    proc = _export(server, *span, "--window", "1h", "-o", tmp_path / "none.csv")
    assert "no 1h windows in the range" in proc.stderr
    assert (tmp_path / "none.csv").read_text().splitlines() == [
        '"window","bucket","device_id","metric","count","min","max","mean","std"']
    _export(server, *span, "-o", tmp_path / "none.ndjson")
    assert (tmp_path / "none.ndjson").read_bytes() == b""
    assert os.stat(tmp_path / "none.ndjson").st_mode & 0o777 == 0o600


@pytest.mark.parametrize("args, says", [
    (["--from", "yesterday"], "neither RFC 3339"),
    (["--from", "2026-01-01T00:00:00"], "no time zone"),
    (["--from", "2026-01-02T00:00:00Z", "--to", "2026-01-01T00:00:00Z"], "is not before --to"),
    (["--window", "5m"], "'5m' is not one of"),
    (["--format", "xlsx"], "'xlsx' is not one of"),
    (["--device", "site1/a"], "is not a device id or a pattern"),
    (["--output", "out.txt"], "give --format"),
    ([], "Missing option '--output'"),
])
def test_a_bad_argument_is_a_usage_error(sqlite_ingested, tmp_path, args, says):
    server = sqlite_ingested[0]          # refused before any store is opened: one store is enough
    if "--output" not in args and args:
        args = [*args, "--output", str(tmp_path / "x.parquet")]
    proc = _export(server, *args, expect=2)
    assert proc.stderr.startswith("gw: error: ") and says in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_store_itself_is_never_the_output(sqlite_ingested):
    server = sqlite_ingested[0]
    store = server.data_dir / "store.sqlite"
    before = store.stat().st_size
    for target in (store, server.data_dir / "store.sqlite-wal", server.data_dir / "." / "store.sqlite"):
        proc = _export(server, "--format", "csv", "-o", target, expect=2)
        assert "is a file of the store itself" in proc.stderr, proc.stderr
    assert store.stat().st_size >= before
    assert [p.name for p in server.data_dir.iterdir() if p.name.endswith(".part")] == []


def test_no_store_is_an_error_and_writes_nothing(tmp_path):
    proc = run_gw("export", "--data-dir", tmp_path / "nothing", "-o", tmp_path / "x.parquet")
    assert proc.returncode == 1 and "no store at" in proc.stderr, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_file_that_is_not_a_store_is_an_error_and_the_output_stays(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "store.sqlite").write_bytes(b"not a database, " * 512)
    out = tmp_path / "old.parquet"
    out.write_bytes(b"an earlier export")
    proc = run_gw("export", "--data-dir", data, "-o", out)
    assert proc.returncode == 1 and "store" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "old.parquet"]


def test_a_postgresql_store_that_cannot_be_reached_is_one_line_without_its_password(tmp_path):
    port = free_ports(1)[0]                      # nothing listens there
    config = tmp_path / "gw.toml"
    config.write_text(f'store = "postgresql://gw:s3cret@127.0.0.1:{port}/gw"\n')
    for how in (["--config", config], ["--store", f"postgresql://gw:s3cret@127.0.0.1:{port}/gw"]):
        proc = run_gw("export", *how, "-o", tmp_path / "x.parquet")
        assert proc.returncode == 1, (proc.returncode, proc.stderr)
        assert proc.stderr.startswith(f"gw: error: cannot connect to the store postgresql://gw@127.0.0.1:{port}/gw")
        assert "s3cret" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    # A URL libpq cannot read: its message would quote the part it stopped at.
    proc = run_gw("export", "--store", "postgresql://gw:s3cr%zz@127.0.0.1:1/gw", "-o", tmp_path / "x.parquet")
    assert proc.returncode == 2 and "the store's URL does not parse" in proc.stderr, proc.stderr
    assert "s3cr" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw.toml"]


def test_a_postgresql_database_without_the_gw_schema_is_an_error(tmp_path, pg_server):
    url = pg_server.database()
    try:
        proc = run_gw("export", "--store", url, "-o", tmp_path / "x.parquet")
    finally:
        pg_server.drop(url)
    assert proc.returncode == 1 and "has no devices or meta or readings or rollups or samples table" \
        in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_postgresql_connection_lost_mid_export_fails_in_one_line_and_keeps_the_old_file(tmp_path, pg_server):
    """The export waits for a lock another session holds on readings; its backend is
    terminated meanwhile (as a server restart or an administrator would)."""
    import psycopg
    from gw.pipeline.pgstore import ensure_schema

    url = pg_server.database()
    out = tmp_path / "old.csv"
    out.write_bytes(b"an earlier export")
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gw-export' "
               "AND wait_event_type = 'Lock'")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            ensure_schema(conn, "the test's database")
        with psycopg.connect(url) as locker:
            locker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
            proc = subprocess.Popen([PYTHON, "-m", "gw.cli", "export", "--store", url, "--from", "0", "-o", str(out)],
                                    env=gw_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            try:
                wait_for(lambda: pg_server.psql(waiting, url.rsplit("/", 1)[1])[0][0] == 1, 30,
                         what="the export waiting for the lock")
                pg_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = 'gw-export'", url.rsplit("/", 1)[1])
                _stdout, stderr = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        pg_server.drop(url)
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert stderr.startswith(f"gw: error: cannot read the store {url}: "), stderr      # no password in it
    assert stderr.count("\n") == 1, stderr
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"]


def test_the_progress_bar_shows_on_a_terminal_only(ingested, tmp_path):
    server, _readings, base_us = ingested

    def run(*extra) -> str:
        leader, follower = pty.openpty()
        try:
            proc = subprocess.run([PYTHON, "-m", "gw.cli", "export", *map(str, server.export_args()),
                                   *_range(base_us), "-o", str(tmp_path / "p.parquet"), *extra],
                                  env=gw_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=follower, timeout=120)
            os.close(follower)
            follower = -1
            out = b""
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:          # EIO: the terminal's other side is closed
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            if follower >= 0:
                os.close(follower)
            os.close(leader)
        assert proc.returncode == 0, out
        return out.decode()

    shown = run()
    assert "exporting" in shown and f"{N}/{N}" in shown and "100%" in shown, shown
    assert f"wrote {N} readings" in shown
    assert run("--quiet") == ""
    # Not a terminal (captured): the summary only.
    assert _export(server, *_range(base_us), "-o", tmp_path / "p.parquet").stderr == \
        f"gw: wrote {N} readings to {tmp_path / 'p.parquet'} (parquet, 3 metric columns)\n"


def test_an_export_while_readings_keep_coming_is_one_consistent_snapshot(ingested, tmp_path):
    """One connection sends readings in batches one after another (one worker's
    log, so the store always holds a prefix of them), new metric names coming
    now and then; 30,000 are sent first so that an export takes long enough for
    the pipeline to commit more in the middle of it. Every export has a prefix
    without gaps or repeats, its count agrees with its rows (gw export checks)
    and it has exactly the metric columns of its rows."""
    server = ingested[0]
    stop = threading.Event()
    sent = [0]
    errors = []

    def post(http, first: int, count: int) -> bool:
        body = json.dumps([{"device_id": "live-1", "seq": i, "metrics": {"temp_c": float(i), f"m{i // 500}": 1.0}}
                           for i in range(first, first + count)]).encode()
        resp = http.request("POST", "/v1/ingest", body)
        if resp.status != 202:
            errors.append(resp)
            return False
        sent[0] = first + count
        return True

    def send(http):
        try:
            while not stop.is_set() and sent[0] < LIVE_MAX and post(http, sent[0], 20):
                pass
        except Exception as exc:       # noqa: BLE001  (reported by the test)
            errors.append(exc)

    since = int(datetime.now(UTC).timestamp()) - 5
    http = HttpConn(server.ports["http"])
    for _ in range(60):
        assert post(http, sent[0], 500)
    sender = threading.Thread(target=send, args=(http,), daemon=True)
    sender.start()
    seen = []
    try:
        for k in range(5):
            out = tmp_path / f"live{k}.parquet"
            _export(server, "--from", str(since), "--device", "live-1", "-o", out)
            table = pq.read_table(out)
            seqs = table.column("seq").to_pylist()
            assert seqs == list(range(len(seqs))), "not a prefix, or out of order"
            metric_columns = sorted(n for n in table.schema.names if n.startswith("metric_"))
            assert metric_columns == sorted({"metric_temp_c"} | {f"metric_m{s // 500}" for s in seqs})
            assert table.column("metric_temp_c").to_pylist() == [float(s) for s in seqs]
            seen.append(len(seqs))
    finally:
        stop.set()
        sender.join(30)
        http.close()
    assert not errors, errors
    assert seen == sorted(seen) and seen[-1] > seen[0], seen
    # Once the rest is stored, all of it, once.
    total = sent[0]
    wait_for(lambda: server.count("device_id = 'live-1'") >= total, 60, interval=0.2,
             what="the live readings in the store")
    out = tmp_path / "live-all.ndjson"
    _export(server, "--from", str(since), "--device", "live-1", "-o", out)
    assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == list(range(total))


def _json_cells(rows: list[dict], columns=("tags", "payload")) -> list[dict]:
    """Rows with their JSON text cells parsed: PostgreSQL's jsonb keeps an object's
    keys in its own order (shortest first), the embedded store in the sender's."""
    return [{k: (json.loads(v) if k in columns and isinstance(v, str) and v else v) for k, v in r.items()}
            for r in rows]


def test_both_stores_export_the_same_files(sqlite_ingested, postgresql_ingested, tmp_path):
    """The same readings ingested into each store export to the same columns, types and rows
    in every format, raw and rolled up, whole and by device."""
    sqlite_store, readings, base_us = sqlite_ingested
    pg_store = postgresql_ingested[0]
    assert postgresql_ingested[1] == readings
    for name, args in (("all.parquet", []), ("site1.parquet", ["--device", "site1-*"]),
                       ("all.csv", []), ("all.ndjson", []), ("lab.ndjson", ["--device", "lab-x"]),
                       ("1m.parquet", ["--window", "1m"]), ("1h.csv", ["--window", "1h"]),
                       ("1m.ndjson", ["--window", "1m", "--device", "site?-*"])):
        outs = {}
        for stored in (sqlite_store, pg_store):
            outs[stored.kind] = tmp_path / f"{stored.kind}-{name}"
            _export(stored, *_range(base_us), *args, "-o", outs[stored.kind])
        if name.endswith(".parquet"):
            tables = {k: pq.read_table(p) for k, p in outs.items()}
            assert tables["sqlite"].schema == tables["postgresql"].schema, name
            rows = {k: t.to_pylist() for k, t in tables.items()}
            if "tags" in tables["sqlite"].schema.names:
                for k in rows:
                    rows[k] = [dict(r, tags=dict(r["tags"])) for r in rows[k]]
        elif name.endswith(".csv"):
            rows = {k: list(csv.DictReader(open(p, newline=""))) for k, p in outs.items()}
            assert list(rows["sqlite"][0]) == list(rows["postgresql"][0]), name
        else:
            rows = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in outs.items()}
        got, want = _json_cells(rows["postgresql"]), _json_cells(rows["sqlite"])
        assert len(got) == len(want) > 0, name
        if "--window" in args:
            # The sums behind mean and std add the same values, in batches the two pipelines
            # cut differently: equal to the last bits or so.
            for g, w in zip(got, want):
                assert {k: v for k, v in g.items() if k not in ("mean", "std")} == \
                    {k: v for k, v in w.items() if k not in ("mean", "std")}, name
                assert float(g["mean"]) == pytest.approx(float(w["mean"]), rel=1e-12), name
                assert float(g["std"]) == pytest.approx(float(w["std"]), rel=1e-9, abs=1e-12), name
        else:
            assert got == want, name


def test_a_device_pattern_is_a_like_pattern_with_like_s_own_wildcards_escaped():
    assert like_pattern("site1-*") == "site1-%"
    assert like_pattern("dev_?") == "dev\\__"
    assert like_pattern("*") == "%"
