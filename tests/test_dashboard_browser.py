"""The dashboard at `/`, in a real browser: Debian's headless Chromium (/usr/bin/chromium,
installed by ./dev test and .ci/run) driven by playwright, against a `gw serve` started on
free loopback ports. Readings and an anomaly are sent from the test over real HTTP; the
page must show them (its device list from the query API, its live tail and alerts over
MQTT over WebSocket), and acknowledging an alert on the page must change it in the store.
Every wait is for a condition on the page, never a sleep; each state is screenshotted
into the test's tmp_path."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import playwright.sync_api as playwright_api       # the [test] extra: never skipped for want of it
import pytest

from conftest import HOST, counter_delta, free_ports, run_gw
from http_client import HttpConn

CHROMIUM = Path("/usr/bin/chromium")
WAIT_MS = 30_000           # every page condition: the store commits and the list refreshes within it


def browser_env() -> dict:
    """The browser's environment: without the sanitizer runtime `./dev sanitize` preloads
    (it is for gw's workers; Chromium does not start under it)."""
    return {k: v for k, v in os.environ.items()
            if k != "LD_PRELOAD" and not k.startswith(("ASAN_", "UBSAN_", "LSAN_"))}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (./dev test installs it)")
    with playwright_api.sync_playwright() as p:
        # Root (CI) needs --no-sandbox; the browser is Debian's, never one playwright downloads.
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, env=browser_env(),
                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"the page raised: {errors}"


def dashboard_server(gw_factory, *, args=(), ports=None):
    """gw serve with the mqtt, http and ws listeners on free ports, two workers."""
    return gw_factory(workers=2, listeners=("mqtt", "http", "ws"), args=list(args), ports=ports)


def post(server, path: str, body, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with HttpConn(server.ports["http"]) as conn:
        return conn.request("POST", path, json.dumps(body).encode(), headers=headers)


def get(server, path: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with HttpConn(server.ports["http"]) as conn:
        return conn.request("GET", path, headers=headers)


def readings_then_anomaly(device: str, start: float) -> list[dict]:
    """Fifteen ordinary temperatures, then one far off: the z-score detector's alert."""
    batch = [{"device_id": device, "ts": start + i, "seq": i, "metrics": {"temp_c": 20.0 + (i % 3) * 0.1}}
             for i in range(15)]
    batch.append({"device_id": device, "ts": start + 15, "seq": 15, "metrics": {"temp_c": 95.0}})
    return batch


def store_alert_state(server, alert_id: int) -> str:
    conn = sqlite3.connect(f"file:{server.data_dir / 'store.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT state FROM alerts WHERE id = ?", (alert_id,)).fetchone()[0]
    finally:
        conn.close()


def shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


def exercise(page, server, tmp_path: Path, token: str | None, prefix: str) -> None:
    """Reading, live tail, anomaly, acknowledge: asserted on the page and in the store."""
    expect = playwright_api.expect
    page.wait_for_selector("body[data-ready='1']", timeout=WAIT_MS)
    page.wait_for_selector("body[data-live='1']", timeout=WAIT_MS)
    # The stats: a point a second, both workers listed.
    expect(page.locator("#workers tbody tr")).to_have_count(2, timeout=WAIT_MS)
    page.wait_for_function("document.querySelectorAll('#chart-rates canvas').length > 0", timeout=WAIT_MS)
    shot(page, tmp_path, f"{prefix}-loaded")

    # A reading: shown live in the tail, then in the device list from the store.
    device = f"{prefix}-dev"
    page.fill("#tail-device", device)
    page.click("#tail-form button")
    page.wait_for_selector(f"body[data-tail='{device}']", timeout=WAIT_MS)
    r = post(server, f"/v1/ingest/{device}", {"seq": 1, "metrics": {"temp_c": 21.5, "rh": 40.25}}, token)
    assert r.status in (200, 202), r.body
    expect(page.locator("#tail tbody tr").first).to_contain_text("temp_c = 21.5", timeout=WAIT_MS)
    row = page.locator(f"#devices tr[data-device='{device}']")
    expect(row).to_contain_text("21.5", timeout=WAIT_MS)
    expect(row).to_contain_text("40.25", timeout=WAIT_MS)
    shot(page, tmp_path, f"{prefix}-reading")

    # An anomaly: the alert appears live (MQTT over WebSocket on alerts/#), open.
    anomalous = f"{prefix}-hot"
    r = post(server, "/v1/ingest", readings_then_anomaly(anomalous, time.time() - 60), token)
    assert r.status in (200, 202), r.body
    alert_row = page.locator("#alerts tbody tr", has_text=anomalous).first
    expect(alert_row).to_have_attribute("data-state", "open", timeout=WAIT_MS)
    expect(alert_row).to_contain_text("95", timeout=WAIT_MS)
    alert_id = int(alert_row.get_attribute("data-alert-id"))
    assert store_alert_state(server, alert_id) == "open"
    shot(page, tmp_path, f"{prefix}-alert")

    # Acknowledged on the page: its state there, and in the store.
    alert_row.locator("button.ack").click()
    expect(alert_row).to_have_attribute("data-state", "acked", timeout=WAIT_MS)
    expect(alert_row.locator("td.state")).to_contain_text("acked", timeout=WAIT_MS)
    expect(alert_row.locator("button.ack")).to_have_count(0)
    assert store_alert_state(server, alert_id) == "acked"
    answer = json.loads(get(server, f"/v1/alerts?device_id={anomalous}", token).body)
    assert [a["state"] for a in answer["alerts"] if a["id"] == alert_id] == ["acked"]
    shot(page, tmp_path, f"{prefix}-acked")


def test_dashboard_open_on_loopback(gw_factory, page, tmp_path):
    server = dashboard_server(gw_factory)
    before = server.counters()
    url = f"http://{HOST}:{server.ports['http']}/"
    response = page.goto(url)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    exercise(page, server, tmp_path, None, "open")
    # The page is an MQTT 5.0 client (MQTT.js, protocolVersion 5): every CONNACK went to one.
    after = server.counters()
    assert counter_delta(before, after, "mqtt5_connected") >= 1
    assert counter_delta(before, after, "mqtt5_connected") == counter_delta(before, after, "packets_out.connack")
    # Nothing came from anywhere but this server; the vendored files are cached for a year.
    resources = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(n.startswith(f"http://{HOST}:{server.ports['http']}/") for n in resources)
    for name in ("mqtt.min.js", "uPlot.iife.min.js"):
        r = get(server, f"/dashboard/vendor/{name}")
        assert r.status == 200 and r.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "immutable" in r.headers["cache-control"]
    assert not page.locator("#login").is_visible()


def test_dashboard_with_tokens_and_mqtt_passwords(gw_factory, page, tmp_path):
    tokens = tmp_path / "tokens"
    made = run_gw("token", "create", "operator", "--scope", "admin", "--http-tokens-file", tokens)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    pwfile = tmp_path / "passwd"
    res = run_gw("passwd", "-c", "-b", pwfile, "dash", "s3cret-dash")
    assert res.returncode == 0, res.stderr
    # The page's origin the one a browser page may open the WebSocket from.
    ports = dict(zip(("mqtt", "http", "ws"), free_ports(3)))
    server = dashboard_server(gw_factory, ports=ports, args=[
        "--http-auth", "token", "--http-tokens-file", tokens, "--password-file", pwfile, "--allow-anonymous", "false",
        "--ws-allowed-origins", f"http://{HOST}:{ports['http']}"])
    # The APIs the page reads need the token; the page itself does not (it holds no data).
    assert get(server, "/v1/stats/series").status == 401
    assert get(server, "/v1/dashboard").status == 401
    assert get(server, "/").status == 200
    page.goto(f"http://{HOST}:{server.ports['http']}/")
    login = page.locator("#login")
    playwright_api.expect(login).to_be_visible(timeout=WAIT_MS)
    shot(page, tmp_path, "tokens-login")
    # A wrong MQTT password: the API works with the token, live updates are refused.
    page.fill("#login-token", token)
    page.fill("#login-user", "dash")
    page.fill("#login-password", "wrong")
    page.click("#login-submit")
    playwright_api.expect(page.locator("#login-reason")).to_contain_text("refused", timeout=WAIT_MS)
    assert page.get_attribute("body", "data-live") != "1"
    page.fill("#login-password", "s3cret-dash")
    page.click("#login-submit")
    exercise(page, server, tmp_path, token, "tokens")


def test_dashboard_shows_a_refused_subscription_by_its_reason_code(gw_factory, page, tmp_path):
    """The page is an MQTT 5.0 client: an ACL that does not let it read alerts/#
    refuses that filter in the SUBACK (reason code 0x87), and the page says so
    instead of marking itself live; the telemetry tail it may read still works."""
    acl = tmp_path / "acl"
    acl.write_text("topic read telemetry/#\n")
    server = dashboard_server(gw_factory, args=["--acl-file", acl])
    page.goto(f"http://{HOST}:{server.ports['http']}/")
    page.wait_for_selector("body[data-ready='1']", timeout=WAIT_MS)
    status = page.locator("#mqtt-status")
    playwright_api.expect(status).to_have_attribute("title", "alerts: refused, reason 0x87 (not authorized)",
                                                    timeout=WAIT_MS)
    assert status.get_attribute("data-state") == "error"
    assert page.get_attribute("body", "data-live") != "1"
    page.fill("#tail-device", "acl-dev")
    page.click("#tail-form button")
    page.wait_for_selector("body[data-tail='acl-dev']", timeout=WAIT_MS)
    shot(page, tmp_path, "acl-refused")


def test_files_compressed_for_a_client_that_asks(gw_factory):
    """The framing passes Accept-Encoding: gzip on (a bare token only), written in fragments too."""
    import gzip
    import socket

    from conftest import send_fragmented

    server = gw_factory(workers=1, listeners=("http",))
    plain = get(server, "/dashboard/vendor/uPlot.iife.min.js")
    for header, compressed in ((b"Accept-Encoding: gzip, deflate, br\r\n", True),
                               (b"accept-encoding: GZIP\r\n", True),
                               (b"Accept-Encoding: gzip;q=0\r\n", False), (b"", False)):
        with socket.create_connection((HOST, server.ports["http"]), timeout=10) as s:
            send_fragmented(s, b"GET /dashboard/vendor/uPlot.iife.min.js HTTP/1.1\r\nHost: x\r\n" + header
                            + b"Connection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert (b"Content-Encoding: gzip" in head) == compressed, header
        assert (gzip.decompress(body) if compressed else body) == plain.body
