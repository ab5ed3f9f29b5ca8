"""`gw export` against a real `gw serve`: readings ingested over HTTP (several
devices, metrics, tags, a payload), stored by the pipeline, then exported by
`gw export` run as a subprocess in each format and read back with pyarrow, the
csv module and json: every reading once, in (time, device id) order, with its
values, timestamps, tags and payload; a rollup window as the query API answers
it; the device filter (an id, a pattern); an empty range; bad arguments; a
progress bar only on a terminal; and an export while readings keep coming (one
consistent snapshot: the count, the metric columns and the rows agree)."""

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

from conftest import PYTHON, gw_env, run_gw, wait_for
from http_client import HttpConn
from gw.config import SETTINGS

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
def ingested(gw_module_factory):
    """A server and N readings ingested over HTTP, all in the store. Their times
    start two hours ago on a whole hour (clear of readings stamped now)."""
    server = gw_module_factory(workers=2, listeners=("http",))
    now_s = int(datetime.now(UTC).timestamp())
    base_us = (now_s // 3600 * 3600 - 2 * 3600) * 1_000_000
    readings = [_reading(i, base_us) for i in range(N)]
    conns = [HttpConn(server.ports["http"]) for _ in range(3)]
    try:
        for k, start in enumerate(range(0, N, 50)):
            body = json.dumps([_wire(r) for r in readings[start:start + 50]]).encode()
            resp = conns[k % len(conns)].request("POST", "/v1/ingest", body)
            assert resp.status == 202, resp.body
    finally:
        for c in conns:
            c.close()
    wait_for(lambda: (_stored(server.data_dir, "SELECT count(*) FROM readings") or [(0,)])[0][0] >= N, 60,
             interval=0.2, what="every reading in the store")
    return server, readings, base_us


def _export(server, *args, expect: int = 0) -> subprocess.CompletedProcess:
    proc = run_gw("export", "--data-dir", server.data_dir, *args, timeout=120)
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
                           ("*-?", {"site1-a", "site1-b", "site2-c", "lab-x"}), ("site9-*", set())):
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
def test_a_bad_argument_is_a_usage_error(ingested, tmp_path, args, says):
    server = ingested[0]
    if "--output" not in args and args:
        args = [*args, "--output", str(tmp_path / "x.parquet")]
    proc = _export(server, *args, expect=2)
    assert proc.stderr.startswith("gw: error: ") and says in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_store_itself_is_never_the_output(ingested):
    server = ingested[0]
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


@pytest.mark.skipif("store" not in SETTINGS, reason="the store setting (PostgreSQL) is not in this build")
def test_a_postgresql_store_is_refused_in_one_line_without_its_url(tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text('store = "postgresql://gw:s3cret@127.0.0.1:1/gw"\n')
    proc = run_gw("export", "--config", config, "-o", tmp_path / "x.parquet")
    assert proc.returncode == 2 and "PostgreSQL" in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stderr and proc.stderr.count("\n") == 1


def test_the_progress_bar_shows_on_a_terminal_only(ingested, tmp_path):
    server, _readings, base_us = ingested

    def run(*extra) -> str:
        leader, follower = pty.openpty()
        try:
            proc = subprocess.run([PYTHON, "-m", "gw.cli", "export", "--data-dir", str(server.data_dir),
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
    wait_for(lambda: (_stored(server.data_dir, "SELECT count(*) FROM readings WHERE device_id = 'live-1'")
                      or [(0,)])[0][0] >= total, 60, interval=0.2, what="the live readings in the store")
    out = tmp_path / "live-all.ndjson"
    _export(server, "--from", str(since), "--device", "live-1", "-o", out)
    assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == list(range(total))
