"""HTTP API tokens and file modes, against real `gw serve` processes.

Tokens are made by `gw token create` (a real tokens file), presented by curl,
urllib and raw sockets (the 401 path's head also written in fragments), over
HTTP and HTTPS, on both workers; reloads by SIGHUP; the modes of everything a
short run creates in data_dir and of the stats block.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import (HOST, client_tls_context, connect_packet, free_ports, mqtt_client, publish_packet,
                      read_packet, run_gw, send_fragmented, subscribe_packet, wait_for, GwServer)
from http_client import HttpConn, Response, ingest_body
from placement import connect_on

FORM = "application/x-www-form-urlencoded"


def make_token(tokens_file: Path, name: str, *scopes: str, devices: str | None = None) -> str:
    args = ["token", "create", name, "--http-tokens-file", tokens_file]
    for scope in scopes:
        args += ["--scope", scope]
    if devices is not None:
        args += ["--devices", devices]
    res = run_gw(*args)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gw_"), res.stdout      # the token alone, once
    assert lines[0] not in res.stderr
    return lines[0]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


class PlacedConn(HttpConn):
    """An HttpConn on a connection held by a given worker (tests/placement.py)."""

    def __init__(self, server: GwServer, worker: int):
        self.sock, _, _ = connect_on(server.listen_ports["http"], server.worker_pids(), worker)
        self.local_port = self.sock.getsockname()[1]
        self.buf = b""


def ingest(conn: HttpConn, device: str, token: str | None, body: bytes | None = None) -> Response:
    return conn.request("POST", f"/v1/ingest/{device}", body or ingest_body(),
                        headers=bearer(token) if token else None)


def assert_401(resp: Response) -> None:
    assert resp.status == 401, resp
    assert resp.headers["www-authenticate"].startswith("Bearer")
    doc = resp.json()
    assert set(doc) == {"code", "message"} and doc["code"] == "unauthorized"


def assert_403(resp: Response) -> dict:
    assert resp.status == 403, resp
    doc = resp.json()
    assert set(doc) == {"code", "message"} and doc["code"] == "forbidden"
    return doc


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokens")


@pytest.fixture(scope="module")
def tokens(tokens_dir) -> dict:
    path = tokens_dir / "tokens"
    return {"path": path,
            "site1": make_token(path, "site1", "ingest", devices="site1-*"),
            "ingest": make_token(path, "any-ingest", "ingest"),
            "reader": make_token(path, "reader", "read"),
            "admin": make_token(path, "admin", "admin")}


@pytest.fixture(scope="module")
def server(gw_module_factory, tokens) -> GwServer:
    return gw_module_factory(workers=2, listeners=("http", "https", "mqtt"),
                             args=["--http-auth", "token", "--http-tokens-file", tokens["path"]])


def test_tokens_file_holds_hashes_only(tokens):
    path = tokens["path"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    for key in ("site1", "ingest", "reader", "admin"):
        assert tokens[key] not in text
    entries = [json.loads(line) for line in text.splitlines()]
    assert [e["name"] for e in entries] == ["site1", "any-ingest", "reader", "admin"]
    assert entries[0]["devices"] == "site1-*" and entries[0]["scopes"] == ["ingest"]
    listed = run_gw("token", "list", "--http-tokens-file", path)
    assert listed.returncode == 0
    assert "site1-*" in listed.stdout and "reader" in listed.stdout
    for e in entries:
        assert e["sha256"] not in listed.stdout


def test_curl_ingests_with_a_token(server, tokens):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    url = f"http://{HOST}:{server.ports['http']}/v1/ingest/site1-a"
    # curl is not built with the sanitizer: without the runtime ./dev sanitize preloads.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    res = subprocess.run([curl, "-sS", "-i", "-X", "POST", url, "-H", "Content-Type: application/json",
                          "-H", f"Authorization: Bearer {tokens['site1']}", "--data-binary", ingest_body().decode()],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("HTTP/1.1 202"), res.stdout
    res = subprocess.run([curl, "-sS", "-i", "-X", "POST", url, "-H", "Content-Type: application/json",
                          "--data-binary", ingest_body().decode()], capture_output=True, text=True, timeout=30,
                         env=env)
    assert res.stdout.startswith("HTTP/1.1 401"), res.stdout
    assert "WWW-Authenticate: Bearer" in res.stdout


def test_urllib_ingests_with_a_token_and_is_refused_without(server, tokens):
    url = f"http://{HOST}:{server.ports['http']}/v1/ingest/site1-b"
    req = urllib.request.Request(url, data=ingest_body(), method="POST",
                                 headers={"Content-Type": "application/json", **bearer(tokens["site1"])})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202
    req = urllib.request.Request(url, data=ingest_body(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 401 and info.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(info.value.read())["code"] == "unauthorized"


@pytest.mark.parametrize("worker", [0, 1])
def test_refusals_on_each_worker(server, tokens, worker):
    before = server.counters()
    with PlacedConn(server, worker) as conn:
        assert_401(ingest(conn, "site1-a", None))                              # no token
        assert_401(ingest(conn, "site1-a", tokens["site1"] + "x"))             # not in the file
        assert_401(conn.request("GET", "/v1/devices", headers={"Authorization": f"Basic {tokens['admin']}"}))
        assert_401(conn.request("GET", "/v1/devices", headers={"Authorization": "Bearer"}))
        doc = assert_403(conn.request("GET", "/v1/devices", headers=bearer(tokens["site1"])))   # scope
        assert "read" in doc["message"]
        doc = assert_403(ingest(conn, "site2-a", tokens["site1"]))             # device pattern
        assert "site2-a" in doc["message"]
        assert_403(ingest(conn, "site1-a", tokens["reader"]))                  # read cannot ingest
        # the connection stays usable: refusals are answers, not closes
        assert ingest(conn, "site1-z", tokens["site1"]).status == 202
        assert ingest(conn, "anything", tokens["ingest"]).status == 202
        assert ingest(conn, "anything", tokens["admin"]).status == 202
    after = server.counters()
    assert after["http_unauthorized"] - before["http_unauthorized"] == 4
    assert after["http_forbidden"] - before["http_forbidden"] == 3


def test_batch_with_one_device_outside_the_pattern_is_refused_whole(server, tokens):
    batch = json.dumps([{"device_id": "site1-a", "seq": 1, "metrics": {"t": 1}},
                        {"device_id": "site9-x", "seq": 1, "metrics": {"t": 2}}]).encode()
    before = server.counters()
    with HttpConn(server.ports["http"]) as conn:
        doc = assert_403(conn.request("POST", "/v1/ingest", batch, headers=bearer(tokens["site1"])))
        assert "site9-x" in doc["message"]
        ok = json.dumps([{"device_id": "site1-a", "metrics": {"t": 1}},
                         {"device_id": "site1-b", "metrics": {"t": 2}}]).encode()
        resp = conn.request("POST", "/v1/ingest", ok, headers=bearer(tokens["site1"]))
        assert resp.status == 202 and resp.json()["accepted"] == 2
    after = server.counters()
    # nothing of the refused batch was taken
    assert after["ingest_records_accepted"] - before["ingest_records_accepted"] == 2


def test_401_with_the_head_written_in_fragments(server, tokens, frag_rng):
    body = ingest_body()
    head = (f"POST /v1/ingest/site1-a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {tokens['site1']}z\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    for rng in (None, frag_rng):
        with HttpConn(server.ports["http"]) as conn:
            cut = head.index(b"Authorization") + 20                  # inside the header's value
            sent = send_fragmented(conn.sock, head[:cut + 1] + (b"" if rng is None else head[cut + 1:]), rng)
            assert sent > 0
            if rng is None:
                send_fragmented(conn.sock, head[cut + 1:], cuts=[5, 17, 30])
            conn.send(body)
            # (refused on its head alone, or once the body came with its last piece)
            assert_401(conn.read_response())
        with HttpConn(server.ports["http"]) as conn:
            # a good request, its header cut too
            good = head.replace(tokens["site1"].encode() + b"z", tokens["site1"].encode())
            send_fragmented(conn.sock, good + body, rng, cuts=[good.index(b"Bearer") + 3, len(good) - 1])
            assert conn.read_response().status == 202


@pytest.mark.parametrize("framing", ["length", "chunked", "continue"])
def test_refused_before_the_body_is_read(server, tokens, framing):
    """A request whose body has not come yet is refused on its head: the client
    is not read a body it may not send (nor told 100 Continue), and reads the answer."""
    head = "POST /v1/ingest/site1-a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += ("Transfer-Encoding: chunked\r\n" if framing == "chunked" else "Content-Length: 900000\r\n")
    if framing == "continue":
        head += "Expect: 100-continue\r\n"
    before = server.counters()
    for auth, check in (("", assert_401), (f"Authorization: Bearer {tokens['reader']}\r\n", assert_403)):
        with HttpConn(server.ports["http"]) as conn:
            send_fragmented(conn.sock, (head + auth + "\r\n").encode() + (b"4\r\n{\"me" if framing == "chunked"
                                                                          else b'{"metrics": {'), cuts=[10, 40])
            resp = conn.read_response()
            check(resp)                                   # not a 100 Continue first
            assert resp.headers["connection"] == "close"
            conn.wait_closed()
    # a device outside the token's pattern, on its head too
    with HttpConn(server.ports["http"]) as conn:
        conn.send((head.replace("site1-a", "site2-a") + f"Authorization: Bearer {tokens['site1']}\r\n\r\n").encode())
        assert_403(conn.read_response())
    after = server.counters()
    assert after["http_unauthorized"] - before["http_unauthorized"] == 1
    assert after["http_forbidden"] - before["http_forbidden"] == 2
    # with a good token the body is read and taken
    body = ingest_body()
    with HttpConn(server.ports["http"]) as conn:
        conn.send((f"POST /v1/ingest/site1-a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"
                   f"Authorization: Bearer {tokens['site1']}\r\n\r\n").encode())
        assert conn.read_response().status == 100
        conn.send(body)
        assert conn.read_response().status == 202


def test_open_routes_and_metrics(server, tokens):
    with HttpConn(server.ports["http"]) as conn:
        assert conn.request("GET", "/healthz").status == 200
        assert conn.request("GET", "/readyz").status == 200
        assert conn.request("GET", "/docs").status == 200
        assert conn.request("GET", "/docs/openapi.json").status == 200
        assert_401(conn.request("GET", "/metrics"))
        assert_403(conn.request("GET", "/metrics", headers=bearer(tokens["ingest"])))
        resp = conn.request("GET", "/metrics", headers=bearer(tokens["reader"]))
        assert resp.status == 200 and b"gw_http_unauthorized_total" in resp.body
        assert b"gw_http_forbidden_total" in resp.body
        assert_401(conn.request("GET", "/no/such/path"))
        assert conn.request("GET", "/no/such/path", headers=bearer(tokens["reader"])).status == 404


def test_dashboard_page_open_its_data_needs_read(server, tokens):
    """The page and its files hold no data (the page asks for a token); what it reads needs one."""
    with HttpConn(server.ports["http"]) as conn:
        for path in ("/", "/dashboard/app.js", "/dashboard/app.css", "/dashboard/vendor/mqtt.min.js",
                     "/dashboard/vendor/uPlot.iife.min.js", "/dashboard/vendor/uPlot.min.css"):
            assert conn.request("GET", path).status == 200, path
        for path in ("/v1/stats/series", "/v1/stats/series?after=3", "/v1/dashboard"):
            assert_401(conn.request("GET", path))
            assert_403(conn.request("GET", path, headers=bearer(tokens["ingest"])))
            resp = conn.request("GET", path, headers=bearer(tokens["reader"]))
            assert resp.status == 200, (path, resp.body)
        config = conn.request("GET", "/v1/dashboard", headers=bearer(tokens["admin"])).json()
        assert config["tokens_required"] is True and config["workers"] == 2
        series = conn.request("GET", "/v1/stats/series", headers=bearer(tokens["reader"])).json()
        assert len(series["workers"]) == 2 and len(series["columns"]["t"]) == series["last"] - series["first"] + 1


def test_alert_ack_needs_admin_and_json(server, tokens):
    with HttpConn(server.ports["http"]) as conn:
        assert_401(conn.request("POST", "/v1/alerts/1/ack", b"a=1", content_type=FORM))
        assert_403(conn.request("POST", "/v1/alerts/1/ack", b"{}", headers=bearer(tokens["reader"])))
        for ctype in (FORM, "text/plain", "multipart/form-data; boundary=x"):
            resp = conn.request("POST", "/v1/alerts/1/ack", b"a=1", content_type=ctype,
                                headers=bearer(tokens["admin"]))
            assert resp.status == 415 and resp.json()["code"] == "unsupported_media_type", ctype
        resp = conn.request("POST", "/v1/alerts/1/ack", b"", content_type=None, headers=bearer(tokens["admin"]))
        assert resp.status == 415
        # declared JSON: it reaches the store (no such alert, or the store not made yet)
        resp = conn.request("POST", "/v1/alerts/1/ack", b"{}", headers=bearer(tokens["admin"]))
        assert resp.status in (404, 503) and resp.json()["code"] in ("unknown_alert", "store_unavailable")


def test_https_too(server, tokens):
    ctx = client_tls_context(server.ca)
    with HttpConn(server.ports["https"], tls_context=ctx) as conn:
        assert_401(ingest(conn, "site1-a", None))
        assert_403(ingest(conn, "site3-a", tokens["site1"]))
        assert ingest(conn, "site1-a", tokens["site1"]).status == 202


def test_logs_refusals_with_the_address_never_the_token(server, tokens):
    with HttpConn(server.ports["http"]) as conn:
        assert_401(ingest(conn, "site1-a", tokens["admin"] + "0"))
    log = server.log()
    assert "refused: 401" in log and f"{HOST}:" in log
    for key in ("site1", "ingest", "reader", "admin"):
        assert tokens[key] not in log
    assert tokens["admin"][3:] not in log


def test_openapi_declares_the_scheme_and_scopes(server, tmp_path):
    served = HttpConn(server.ports["http"]).request("GET", "/docs/openapi.json").json()
    config = tmp_path / "gw.toml"
    config.write_text('http_auth = "token"\n')
    res = run_gw("openapi", "--config", config)
    assert res.returncode == 0
    # Without tokens on (the defaults: every listener on loopback) the token is optional.
    loopback = json.loads(run_gw("openapi").stdout)
    for doc in (served, json.loads(res.stdout), loopback):
        scheme = doc["components"]["securitySchemes"]["bearerAuth"]
        assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
        paths = doc["paths"]

        def needs(scope):
            return [{"bearerAuth": [scope]}, {}] if doc is loopback else [{"bearerAuth": [scope]}]

        assert paths["/v1/ingest/{device_id}"]["post"]["security"] == needs("ingest")
        assert paths["/v1/ingest"]["post"]["security"] == needs("ingest")
        assert paths["/v1/devices"]["get"]["security"] == needs("read")
        assert paths["/metrics"]["get"]["security"] == needs("read")
        assert paths["/v1/alerts/{alert_id}/ack"]["post"]["security"] == needs("admin")
        assert "415" in paths["/v1/alerts/{alert_id}/ack"]["post"]["responses"]
        assert paths["/healthz"]["get"]["security"] == []
        for op in (paths["/v1/ingest"]["post"], paths["/v1/devices"]["get"]):
            assert {"401", "403"} <= set(op["responses"])


# --- reload -------------------------------------------------------------------------------

def reload_workers(server: GwServer) -> None:
    """SIGHUP the master and wait until every worker logged its reload (log_level debug)."""
    log = server.log()
    counts = [log.count(f"worker {i}: reloaded") for i in range(server.workers)]
    server.signal(signal.SIGHUP)
    wait_for(lambda: all(server.log().count(f"worker {i}: reloaded") > counts[i] for i in range(server.workers)),
             20, what="every worker to reload")


@pytest.fixture
def reload_server(gw_factory, tmp_path):
    path = tmp_path / "tokens"
    keep, gone = make_token(path, "keep", "ingest"), make_token(path, "gone", "ingest")
    server = gw_factory(workers=2, listeners=("http",),
                        args=["--http-auth", "token", "--http-tokens-file", path, "--log-level", "debug"])
    return server, path, keep, gone


def test_revoked_token_refused_after_sighup(reload_server):
    server, path, keep, gone = reload_server
    for worker in (0, 1):
        with PlacedConn(server, worker) as conn:
            assert ingest(conn, "d1", gone).status == 202
    res = run_gw("token", "revoke", "gone", "--http-tokens-file", path)
    assert res.returncode == 0 and "reload (SIGHUP) or restart" in res.stdout
    reload_workers(server)
    for worker in (0, 1):
        with PlacedConn(server, worker) as conn:
            assert_401(ingest(conn, "d1", gone))
            assert ingest(conn, "d1", keep).status == 202
    # a token made now works after the next reload, on both workers
    fresh = make_token(path, "fresh", "ingest")
    reload_workers(server)
    for worker in (0, 1):
        with PlacedConn(server, worker) as conn:
            assert ingest(conn, "d2", fresh).status == 202


def test_broken_tokens_file_keeps_the_old_tokens(reload_server):
    server, path, keep, gone = reload_server
    good = path.read_text()
    path.write_text(good + '{"name": "bad", "sha256": "nothex", "scopes": ["ingest"]}\n')
    mark = len(server.log())
    server.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in server.log()[mark:], 20, what="the master to refuse the reload")
    assert f"{path}, line 3" in server.log()[mark:]
    # the workers were not asked; each one, asked directly, keeps its tokens too (fail-closed)
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGHUP)
    wait_for(lambda: server.log()[mark:].count("HTTP tokens not reloaded") >= 2, 20,
             what="both workers to keep their tokens")
    for worker in (0, 1):
        with PlacedConn(server, worker) as conn:
            assert ingest(conn, "d1", keep).status == 202
            assert ingest(conn, "d1", gone).status == 202
            assert_401(ingest(conn, "d1", None))



def test_a_respawned_worker_takes_the_tokens_in_force(gw_factory, tmp_path):
    """The tokens file broken on disk after the start (its reload refused): a
    worker respawned after a crash checks requests against the tokens in
    force, the master's parsed copy, not against the broken file: the token
    valid before still is, one revoked before the break stays refused."""
    path = tmp_path / "tokens"
    keep, gone = make_token(path, "keep", "ingest"), make_token(path, "gone", "ingest")
    res = run_gw("token", "revoke", "gone", "--http-tokens-file", path)
    assert res.returncode == 0, res.stderr
    server = gw_factory(workers=1, listeners=("http",),
                        args=["--http-auth", "token", "--http-tokens-file", path])
    with PlacedConn(server, 0) as conn:
        assert ingest(conn, "d1", keep).status == 202
        assert_401(ingest(conn, "d1", gone))
    path.write_text(path.read_text() + '{"name": "bad", "sha256": "nothex", "scopes": ["ingest"]}\n')
    mark = len(server.log())
    server.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in server.log()[mark:], 20, what="the master to refuse the reload")
    (victim,) = server.worker_pids()
    server.expect_worker_deaths(1)
    os.kill(victim, signal.SIGKILL)
    # One read of the children per poll: two could see the victim, then nothing.
    wait_for(lambda: (lambda pids: len(pids) == 1 and pids[0] != victim)(server.worker_pids()), 20,
             what="the worker respawned")
    (respawned,) = server.worker_pids()
    server.wait_ready(20)
    with PlacedConn(server, 0) as conn:
        assert ingest(conn, "d2", keep).status == 202
        assert_401(ingest(conn, "d2", gone))
        assert_401(ingest(conn, "d2", None))
    assert "HTTP tokens not reloaded" not in server.log()[mark:]
    assert server.worker_pids() == [respawned]          # it did not die again

def test_broken_tokens_file_stops_start(tmp_path):
    path = tmp_path / "tokens"
    path.write_text('{"name": "x"}\n')
    port = free_ports(1)[0]
    res = run_gw("serve", "--workers", "1", "--data-dir", tmp_path / "data", "--http-auth", "token",
                 "--http-tokens-file", path, "--http", f"{HOST}:{port}", "--mqtt", "off", "--mqtts", "off",
                 "--json", "off", "--jsons", "off", "--https", "off", "--ws", "off", "--wss", "off", timeout=60)
    assert res.returncode != 0
    assert f"{path}, line 1" in res.stderr


# --- http_auth = auto ----------------------------------------------------------------------

def test_auto_requires_tokens_off_loopback(tmp_path):
    data = tmp_path / "data"
    token = make_token(data / "tokens", "dev", "ingest")       # the default place: data_dir/tokens
    server = GwServer(tmp_path / "gw", workers=1, listeners=("http",), data_dir=data, fragment=False)
    # Every interface (loopback included, where the test connects): off loopback.
    server.args = ["--http", f"0.0.0.0:{server.listen_ports['http']}"]
    server.start()
    try:
        with HttpConn(server.ports["http"]) as conn:
            assert_401(ingest(conn, "d1", None))
            assert ingest(conn, "d1", token).status == 202
    finally:
        server.stop()


def test_auto_on_loopback_stays_open(gw_factory):
    server = gw_factory(workers=1, listeners=("http",))
    with HttpConn(server.ports["http"]) as conn:
        assert ingest(conn, "d1", None).status == 202
        assert conn.request("GET", "/metrics").status == 200


def test_metrics_auth_none(gw_factory, tmp_path):
    path = tmp_path / "tokens"
    make_token(path, "x", "ingest")
    server = gw_factory(workers=1, listeners=("http",),
                        args=["--http-auth", "token", "--http-tokens-file", path, "--metrics-auth", "none"])
    with HttpConn(server.ports["http"]) as conn:
        assert conn.request("GET", "/metrics").status == 200
        assert_401(conn.request("GET", "/v1/devices"))


# --- file modes ----------------------------------------------------------------------------

def test_modes_of_what_serve_creates(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)                                       # wider than it should be: tightened
    make_token(data / "tokens", "dev", "ingest")
    server = GwServer(tmp_path / "gw", workers=2, listeners=("http", "mqtt"), data_dir=data,
                      args=["--http-auth", "token", "--persist-interval", "0.2"])
    server.start()
    try:
        assert "tightened to 0700" in server.log()
        assert stat.S_IMODE(server.shm.stat().st_mode) == 0o600
        # ingest (the log, the store), a retained message, a persistent session
        with mqtt_client(server.ports["mqtt"], "keeper") as pub:
            retained = publish_packet("keep/this", b"retained", qos=1, packet_id=1)
            pub.sendall(bytes([retained[0] | 0x01]) + retained[1:])          # the RETAIN flag
            assert read_packet(pub)[0] == 0x40
        sock = socket.create_connection((HOST, server.ports["mqtt"]), timeout=10)
        sock.sendall(connect_packet(b"persistent", clean=False))
        assert read_packet(sock)[0] == 0x20
        sock.sendall(subscribe_packet(1, [("a/b", 1)]))
        assert read_packet(sock)[0] == 0x90
        sock.close()
        with mqtt_client(server.ports["mqtt"], "tele") as pub:
            pub.sendall(publish_packet("telemetry/dev-1", json.dumps({"metrics": {"t": 1}}).encode(), qos=1))
            assert read_packet(pub)[0] == 0x40
        wait_for(lambda: (data / "retained.msgpack").exists()
                 and any(data.glob("sessions-*.msgpack")) and (data / "store.sqlite-wal").exists(),
                 30, what="the retained, session and store files")
        running = sorted(data.rglob("*"))
        names = {p.name for p in running}
        assert {"gw.pid", "tokens", "store.sqlite", "store.sqlite-wal", "store.sqlite-shm"} <= names, names
        assert any(p.suffix == ".wal" for p in running), names
        assert not wrong_modes(data), wrong_modes(data)
    finally:
        server.stop()
    assert not wrong_modes(data), wrong_modes(data)


def wrong_modes(root: Path) -> list[str]:
    """Every directory under root (root too) not 0700, every file not 0600."""
    wrong = []
    for p in [root, *sorted(root.rglob("*"))]:
        try:
            mode = stat.S_IMODE(p.lstat().st_mode)
        except FileNotFoundError:       # a temporary file renamed meanwhile
            continue
        want = 0o700 if p.is_dir() else 0o600
        if mode != want:
            wrong.append(f"{p}: {mode:04o}, want {want:04o}")
    return wrong


# --- the tokens file on its own -----------------------------------------------------------

GOOD = '{"name": "a", "sha256": "%s", "scopes": ["ingest"], "devices": "site1-*"}' % ("ab" * 32)


@pytest.mark.parametrize("bad, why", [
    ("{", "not JSON"),
    ("[]", "not a JSON object"),
    ('{"name": "b", "sha256": "%s", "scopes": ["ingest"], "extra": 1}' % ("cd" * 32), "unknown field"),
    ('{"name": "b c", "sha256": "%s", "scopes": ["read"]}' % ("cd" * 32), "token name"),
    ('{"name": "b", "sha256": "%s", "scopes": ["read"]}' % ("CD" * 32), "sha256"),
    ('{"name": "b", "sha256": "%s", "scopes": []}' % ("cd" * 32), "scopes"),
    ('{"name": "b", "sha256": "%s", "scopes": ["write"]}' % ("cd" * 32), "scopes"),
    ('{"name": "b", "sha256": "%s", "scopes": ["ingest"], "devices": "a/b"}' % ("cd" * 32), "device pattern"),
    ('{"name": "a", "sha256": "%s", "scopes": ["read"]}' % ("cd" * 32), "a second token named"),
    ('{"name": "b", "sha256": "%s", "scopes": ["read"]}' % ("ab" * 32), "the same token"),
])
def test_tokens_file_errors_name_the_line(bad, why):
    from gw.tokens import TokensError, parse_tokens

    with pytest.raises(TokensError) as info:
        parse_tokens(f"# tokens\n{GOOD}\n\n{bad}\n", "tokens")
    assert str(info.value).startswith("tokens, line 4: ") and why in str(info.value), info.value


def test_token_table_verifies_the_header():
    from gw.tokens import TokenTable, digest_of, parse_tokens

    token = "gw_" + "x" * 43
    line = '{"name": "t", "sha256": "%s", "scopes": ["ingest"], "devices": "site1-*"}' % digest_of(token).hex()
    table = TokenTable(parse_tokens(line, "tokens"))
    for good in (f"Bearer {token}", f"bearer {token}", f"BEARER   {token}  "):
        entry = table.verify(good.encode())
        assert entry is not None and entry.name == "t"
    for bad in (None, b"", b"Bearer", b"Bearer ", f"Basic {token}".encode(), f"Bearer {token}x".encode(),
                f"Bearer {token[:-1]}".encode(), b"Bearer " + b"y" * 1000):
        assert table.verify(bad) is None, bad
    entry = table.verify(f"Bearer {token}".encode())
    assert entry.allows("ingest") and not entry.allows("read")
    assert entry.allows_device("site1-a") and entry.allows_device("site1-")
    assert not entry.allows_device("site2-a") and not entry.allows_device("xsite1-a")


def test_a_key_readable_by_others_is_warned_about(gw_factory):
    server = gw_factory(workers=1, listeners=("https",))
    key = server.certs_dir / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600                 # generated 0600
    assert "the TLS key" not in server.log()
    server.stop()
    os.chmod(key, 0o644)
    server.start()
    assert f"the TLS key {key} has mode 0644" in server.log()
    assert stat.S_IMODE(key.stat().st_mode) == 0o644                 # the operator's file: left as it is
    assert "PRIVATE KEY" not in server.log()
