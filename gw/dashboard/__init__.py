"""The operator's dashboard at `/`: a page, its script and style, and the browser
libraries it uses (vendor/: MQTT.js and uPlot from npm, MIT, with their
licences; vendor/fetch.sh re-fetches them and records versions and SHA-256 in
vendor/VERSIONS). Package data: served by every worker from memory, read once.

The page (index.html) names its script and styles with `?v=` and the first
16 hex digits of their SHA-256, filled in when the page is first read, so
they can be cached for a year (`immutable`) and a new version is fetched
under a new name; the page itself is `no-cache`. A request whose Accept-Encoding
has `gzip` gets them compressed (once per worker, on the first such request: about
30 ms of its loop for MQTT.js, which goes from 335 KiB to 103), `Vary:
Accept-Encoding` either way.
"""

from __future__ import annotations

import hashlib

# gzip and importlib.resources are imported on the first request for a file: they
# bring tempfile, shutil, bz2 and lzma (with their C libraries), which every
# process forked by the master would otherwise hold from its start.

HTML = b"text/html; charset=utf-8"
JS = b"text/javascript; charset=utf-8"
CSS = b"text/css; charset=utf-8"
PAGE_HEADERS = (b"Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\n"
                b"Referrer-Policy: no-referrer\r\n"
                # Everything from this server; the MQTT connection to its WebSocket listener
                # (another port: any ws:/wss: source). No inline script.
                b"Content-Security-Policy: default-src 'self'; connect-src 'self' ws: wss:; "
                b"img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'\r\n")
ASSET_HEADERS = b"Cache-Control: public, max-age=31536000, immutable\r\nX-Content-Type-Options: nosniff\r\n"
VARY = b"Vary: Accept-Encoding\r\n"
GZIP_HEADERS = b"Content-Encoding: gzip\r\n" + VARY

# URL path -> (file in this package, content type); the page's own entry is "/".
ASSETS = {
    b"/dashboard/app.js": ("app.js", JS),
    b"/dashboard/app.css": ("app.css", CSS),
    b"/dashboard/vendor/mqtt.min.js": ("vendor/mqtt.min.js", JS),
    b"/dashboard/vendor/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", JS),
    b"/dashboard/vendor/uPlot.min.css": ("vendor/uPlot.min.css", CSS),
}
PAGE_PATHS = (b"/", b"/index.html", b"/dashboard", b"/dashboard/")

_cache: dict[str, bytes | None] = {}


def _read(name: str) -> bytes | None:
    if name not in _cache:
        from importlib import resources

        try:
            _cache[name] = resources.files(__name__).joinpath(name).read_bytes()
        except (OSError, ModuleNotFoundError):
            _cache[name] = None
    return _cache[name]


def asset(path: bytes, gzip: bool = False) -> tuple[bytes, bytes] | None:
    """(content type, body) of a static file of the dashboard, gzip-compressed if asked
    (compressed once, on the first such request); None: not installed."""
    name, ctype = ASSETS[path]
    if gzip:
        key = name + "!gz"
        if key not in _cache:
            data = _read(name)
            import gzip as _gzip

            # mtime 0: the same bytes from every worker and every start.
            _cache[key] = None if data is None else _gzip.compress(data, 6, mtime=0)
        data = _cache[key]
    else:
        data = _read(name)
    return None if data is None else (ctype, data)


def page() -> bytes | None:
    """index.html with each asset's `{{name}}` replaced by its path and version."""
    if "index.html!" not in _cache:
        html = _read("index.html")
        if html is not None:
            for path, (name, _) in ASSETS.items():
                data = _read(name)
                version = hashlib.sha256(data or b"").hexdigest()[:16]
                html = html.replace(b"{{" + name.encode() + b"}}", path + b"?v=" + version.encode())
        _cache["index.html!"] = html
    return _cache["index.html!"]
