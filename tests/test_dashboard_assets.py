"""The dashboard's files as the HTTP app serves them (gw/dashboard/): the page names
each of its files with its SHA-256, every name resolves, content types and cache
headers are right, nothing comes from outside, and the vendored libraries are the
ones gw/dashboard/vendor/VERSIONS records (fetch.sh wrote it from npm pack)."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources

from test_http_app import App, close_apps  # noqa: F401 (close_apps: an autouse fixture)

VENDOR = resources.files("gw.dashboard").joinpath("vendor")


def test_vendored_files_are_those_recorded_with_their_licences():
    lines = [ln.split() for ln in VENDOR.joinpath("VERSIONS").read_text().splitlines() if not ln.startswith("#")]
    assert {(pkg, name) for pkg, _, name, _ in lines} == {
        ("mqtt", "mqtt.min.js"), ("mqtt", "LICENSE-mqtt.txt"), ("uplot", "uPlot.iife.min.js"),
        ("uplot", "uPlot.min.css"), ("uplot", "LICENSE-uplot.txt")}
    for pkg, version, name, sha in lines:
        data = VENDOR.joinpath(name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha, name
        assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    for name in ("LICENSE-mqtt.txt", "LICENSE-uplot.txt"):
        assert b"MIT License" in VENDOR.joinpath(name).read_bytes()


def test_page_and_files_served_with_types_and_cache_headers():
    app = App()
    status, ctype, html, extra = app(b"GET", b"/")
    assert (status, ctype) == (200, b"text/html; charset=utf-8")
    assert b"Cache-Control: no-cache\r\n" in extra and b"Content-Security-Policy: default-src 'self'" in extra
    for alias in (b"/index.html", b"/dashboard", b"/dashboard/"):
        assert app(b"GET", alias) == (status, ctype, html, extra)
    assert b"{{" not in html
    assert not re.search(rb"(src|href)=\"(https?:)?//", html)          # nothing from outside: offline
    refs = re.findall(rb"(?:src|href)=\"(/dashboard/[^\"?]+)\?v=([0-9a-f]{16})\"", html)
    assert {r for r, _ in refs} == {b"/dashboard/app.js", b"/dashboard/app.css", b"/dashboard/vendor/mqtt.min.js",
                                    b"/dashboard/vendor/uPlot.iife.min.js", b"/dashboard/vendor/uPlot.min.css"}
    for path, version in refs:
        status, ctype, body, extra = app(b"GET", path + b"?v=" + version)
        assert status == 200, path
        assert hashlib.sha256(body).hexdigest()[:16].encode() == version
        assert ctype == (b"text/javascript; charset=utf-8" if path.endswith(b".js") else b"text/css; charset=utf-8")
        assert b"Cache-Control: public, max-age=31536000, immutable\r\n" in extra
        assert b"X-Content-Type-Options: nosniff\r\n" in extra
    assert app(b"HEAD", b"/dashboard/app.js")[0] == 200
    assert app(b"POST", b"/", b"{}")[0] == 405
    assert app(b"GET", b"/dashboard/nothing.js")[0] == 404


def test_config_without_a_ws_listener_says_so():
    app = App()
    status, _, body, _ = app(b"GET", b"/v1/dashboard")
    assert status == 200
    config = json.loads(body)
    assert config["ws"] is None and config["wss"] is None and config["tokens_required"] is False
    app.app.listeners = {"ws": "127.0.0.1:18083", "http": "127.0.0.1:8080"}
    config = json.loads(app(b"GET", b"/v1/dashboard")[2])
    assert config["ws"] == {"port": 18083, "path": "/mqtt", "tls": False} and config["wss"] is None


def test_gzip_when_accepted():
    import gzip
    app = App()
    plain = app(b"GET", b"/dashboard/vendor/mqtt.min.js")
    assert b"Content-Encoding" not in plain[3] and b"Vary: Accept-Encoding\r\n" in plain[3]
    answer = app.app.handle(b"GET", b"/dashboard/vendor/mqtt.min.js", None, b"", None, True)
    status, ctype, body, extra = answer
    assert (status, ctype) == (200, b"text/javascript; charset=utf-8")
    assert b"Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n" in extra
    assert gzip.decompress(body) == plain[2] and len(body) < len(plain[2]) // 2
    # Only the dashboard's files; the API's answers and the page stay as they are.
    assert b"Content-Encoding" not in app.app.handle(b"GET", b"/", None, b"", None, True)[3]
    assert b"Content-Encoding" not in app.app.handle(b"GET", b"/healthz", None, b"", None, True)[3]
    assert app.app.handle(b"POST", b"/dashboard/app.js", None, b"", None, True)[0] == 405
