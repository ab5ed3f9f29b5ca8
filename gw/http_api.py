"""The HTTP API (ingest, queries, health, metrics, docs): routing and answers, behind the Cython framing.

The worker's framing (gw_ext/worker/http.pyx) parses HTTP/1.1, enforces the body
limit and timeouts, writes the status line and the Date, Content-Length and
Connection headers, and calls `HttpApp.handle(method, target, content_type,
body)` once per complete request; a HEAD gets the GET answer without its body.
This module never sees a socket. Routes:

| method   | path                          | answers                                   |
|----------|-------------------------------|-------------------------------------------|
| POST     | /v1/ingest/{device_id}        | 202 (200 with ack = sink), 400, 415, 503  |
| POST     | /v1/ingest                    | the same for a batch; 413 over max_batch  |
| GET/HEAD | /healthz                      | 200 or 503, component status              |
| GET/HEAD | /readyz                       | 200 while accepting, 503 while draining   |
| GET/HEAD | /metrics                      | Prometheus text (render_metrics)          |
| GET/HEAD | /docs, /docs/openapi.json, /docs/swagger-ui-bundle.js, /docs/swagger-ui.css | docs |
| GET/HEAD | /, /dashboard/...             | the dashboard's page and files (gw/dashboard/) |
| GET/HEAD | /v1/dashboard                 | what the dashboard needs to connect: 200    |
| GET/HEAD | /v1/stats/series              | the last minutes of the stats, a point a second: 200, 400, 503 |
| GET/HEAD | /v1/devices                   | the store's devices, paged: 200, 400, 503  |
| GET/HEAD | /v1/devices/{device_id}       | one device: 200, 400, 404, 503             |
| GET/HEAD | /v1/devices/{device_id}/metrics | samples or rollups of a metric: 200, 400, 404, 503 |
| GET/HEAD | /v1/alerts                    | alerts, newest first, paged: 200, 400, 503 |
| POST     | /v1/alerts/{alert_id}/ack     | acknowledges an alert: 200, 400, 404, 415, 503 |

With HTTP tokens on (http_auth; gw/tokens.py), every route but /healthz,
/readyz, the docs and the dashboard's page and files (which hold no data: the
page asks for a token and sends it with its API calls), and /metrics with
metrics_auth = none, first checks the
`Authorization: Bearer` header the framing passes, before any body is parsed:
401 with WWW-Authenticate without a valid token, 403 without the route's scope
(ingest; read, also for /v1/stats/series and /v1/dashboard; admin for
acknowledging alerts) or for a device outside the
token's pattern (a batch refused whole). POST /v1/alerts/{alert_id}/ack, a
state change, needs Content-Type: application/json (415), which a plain HTML
form on another site cannot send.

The /v1/devices and /v1/alerts routes read the pipeline's SQLite store
(gw/query.py; 503 `store_unavailable` until it exists) in the worker's query
threads (gw/query_pool.py), never in its event loop: `handle` answers None, the
framing queues the query with `defer` and writes the answer when a thread has
it (503 `queries_busy` with Retry-After when query_max_pending are already
waiting). Any other path is 404,
another method 405 with `Allow`; every error is JSON `{"code", "message"}` (a
refused batch adds `errors`). Only the query routes read the query string;
the path is not percent-decoded (a device id only has characters that never
need encoding). An ingest request's records are validated by gw/ingest.py
(`Ingest`): `handle` answers an `Accepted` for them, which the worker takes
(gw_ext/worker/ingest.pyx: idempotency by device id and seq, the log, routing
on `{telemetry_topic}/{device_id}` at QoS 1) before it asks this app for the
answer (`ingest_taken`, `log_full`, `in_progress`). A worker's table records a
reading as pending until its log is durable past it: a repeat of a durable
reading is a duplicate; of one pending in this worker's log, a duplicate whose
200 waits for the log (ack mode sink); of one pending in another worker's, in
ack mode sink, 503 `in_progress` (the first copy may yet be lost).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from gw import __version__
from gw.config import Config
from gw.dashboard import ASSET_HEADERS, ASSETS as DASHBOARD_ASSETS, GZIP_HEADERS, HTML, PAGE_HEADERS, PAGE_PATHS, VARY
from gw.ingest import (Accepted, BatchAck, BatchError, Error, Ingest, IngestAck, Invalid, check_path_device_id)
from gw.query import Query, StoreError, open_query
from gw.stats import Counter, http_status_index
from gw.tokens import TokensError, TokenTable, http_tokens_required, load_tokens, tokens_path

log = logging.getLogger("gw.http")

INGEST_REQUESTS = int(Counter.INGEST_REQUESTS)
INGEST_RECORDS_REJECTED = int(Counter.INGEST_RECORDS_REJECTED)
QUERIES_REFUSED = int(Counter.QUERIES_REFUSED)
HTTP_UNAUTHORIZED = int(Counter.HTTP_UNAUTHORIZED)
HTTP_FORBIDDEN = int(Counter.HTTP_FORBIDDEN)

_DEFAULTS = Config()


def setting(cfg, name: str):
    """A setting of cfg, or its default (gw/config.py) when cfg is None or has no such key."""
    return getattr(cfg, name, getattr(_DEFAULTS, name)) if cfg is not None else getattr(_DEFAULTS, name)


JSON = b"application/json"
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
RETRY_AFTER = b"Retry-After: 1\r\n"
STORE_BEHIND_RETRY_AFTER = b"Retry-After: 2\r\n"    # the store takes seconds, not moments, to catch up
NO_STORE = b"Cache-Control: no-store\r\n"
ALLOW_POST = b"Allow: POST\r\n"
ALLOW_GET = b"Allow: GET, HEAD\r\n"
INGEST_PREFIX = b"/v1/ingest/"
INGEST_BATCH = b"/v1/ingest"
DEVICES_PREFIX = b"/v1/devices"
ALERTS_PREFIX = b"/v1/alerts"
# The query routes' paths (gw/query.py answers them), as the OpenAPI document names them.
QUERY_PATHS = ("/v1/devices", "/v1/devices/{device_id}", "/v1/devices/{device_id}/metrics", "/v1/alerts",
               "/v1/alerts/{alert_id}/ack")

DOC_ASSETS = {   # path -> (file in gw/docs, content type, extra headers)
    b"/docs": ("index.html", b"text/html; charset=utf-8", b"Cache-Control: no-cache\r\n"),
    b"/docs/": ("index.html", b"text/html; charset=utf-8", b"Cache-Control: no-cache\r\n"),
    b"/docs/index.html": ("index.html", b"text/html; charset=utf-8", b"Cache-Control: no-cache\r\n"),
    b"/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.js", b"text/javascript; charset=utf-8",
                                    b"Cache-Control: public, max-age=86400\r\nX-Content-Type-Options: nosniff\r\n"),
    b"/docs/swagger-ui.css": ("swagger-ui.css", b"text/css; charset=utf-8",
                              b"Cache-Control: public, max-age=86400\r\nX-Content-Type-Options: nosniff\r\n"),
}
OPENAPI_PATH = b"/docs/openapi.json"
STATS_SERIES_PATH = b"/v1/stats/series"
DASHBOARD_CONFIG_PATH = b"/v1/dashboard"
WWW_AUTHENTICATE = b'WWW-Authenticate: Bearer realm="gw"\r\n'
# Open with HTTP tokens on: the probes, the docs and the dashboard's files (where a user pastes a token).
OPEN_PATHS = frozenset((b"/healthz", b"/readyz", OPENAPI_PATH, *DOC_ASSETS, *PAGE_PATHS, *DASHBOARD_ASSETS))
METRICS_PATH = b"/metrics"
SERIES_PARAMS = frozenset(("after",))
_SEQUENCE = re.compile(r"[0-9]{1,18}")
REFUSAL_LOG_INTERVAL = 10.0     # seconds between two log lines of one refusal reason
_ASSET_CACHE: dict[str, bytes | None] = {}


def doc_asset(name: str) -> bytes | None:
    """A file of gw/docs (package data), read once per process; None if not installed."""
    if name not in _ASSET_CACHE:
        from importlib import resources
        try:
            _ASSET_CACHE[name] = resources.files("gw.docs").joinpath(name).read_bytes()
        except (OSError, ModuleNotFoundError):
            _ASSET_CACHE[name] = None
    return _ASSET_CACHE[name]


class WsListener(Struct, forbid_unknown_fields=True):
    """An MQTT over WebSocket listener the browser can reach."""

    port: int
    path: Annotated[str, Meta(description="the HTTP path of the upgrade (ws_path)")]
    tls: bool


class DashboardConfig(Struct, forbid_unknown_fields=True):
    """GET /v1/dashboard: what the dashboard needs to connect and subscribe."""

    version: str
    worker: Annotated[int, Meta(description="the worker that answered")]
    workers: int
    tokens_required: Annotated[bool, Meta(description="the HTTP API needs a bearer token (http_auth)")]
    mqtt_anonymous: Annotated[bool, Meta(description="MQTT clients without a user name may connect "
                                                     "(allow_anonymous); else the page asks for one")]
    ws: Annotated[WsListener | None, Meta(description="the ws listener; null: off")]
    wss: Annotated[WsListener | None, Meta(description="the wss listener; null: off")]
    telemetry_topic: Annotated[str, Meta(description="readings are published on TOPIC/{device_id}")]
    alerts_topic: Annotated[str, Meta(description="alerts are published on TOPIC/{device_id}")]


class Health(Struct, forbid_unknown_fields=True):
    """GET /healthz: 200 when every component is ok, else 503."""

    status: Literal["ok", "unavailable"]
    worker: int
    draining: bool
    components: dict[str, Any]


class Ready(Struct, forbid_unknown_fields=True):
    """GET /readyz while accepting."""

    status: Literal["ready"]
    worker: int


_JSON_TYPES = {b"application/json": True, b"application/json; charset=utf-8": True,
               b"application/json;charset=utf-8": True, b"application/json; charset=UTF-8": True}
_JSON_TYPES_MAX = 256


def is_json_content_type(value: bytes | None) -> bool:
    """application/json, any case, any parameters but a charset other than UTF-8."""
    if value is None:
        return False
    known = _JSON_TYPES.get(value)
    if known is not None:
        return known
    ok = _parse_json_type(value)
    if len(_JSON_TYPES) < _JSON_TYPES_MAX:
        _JSON_TYPES[value] = ok
    return ok


def _parse_json_type(value: bytes) -> bool:
    media, *params = value.split(b";")
    if media.strip().lower() != b"application/json":
        return False
    for param in params:
        name, sep, val = param.partition(b"=")
        if name.strip().lower() == b"charset":
            if val.strip().strip(b'"').lower() not in (b"utf-8", b"utf8"):
                return False
        elif not sep and param.strip():
            return False
    return True


def _counter_view(counters):
    """A memoryview of the worker's counter row: an item increment costs half
    of numpy's. The array itself if it has no such view (tests may pass a list)."""
    try:
        view = memoryview(counters)
    except TypeError:
        return counters
    if view.ndim != 1 or view.readonly or view.format not in ("L", "Q", "K", "<Q", "=Q"):
        return counters
    return view


class HttpApp:
    """One per worker. `handle` never raises for bad input; `draining` and
    `shedding` are set by the worker (both make ingest answer 503)."""

    def __init__(self, cfg, *, worker_index: int, ingest: Ingest, render_metrics, health, counters,
                 tokens: dict | None = None):
        self.worker_index = worker_index
        self.ingest = ingest
        self.render_metrics = render_metrics
        self.health = health
        self.counters = counters
        self._c = _counter_view(counters)
        self.draining = False
        self.shedding = False        # the worker may set it under overload: ingest 503 + Retry-After
        self._encoder = msgspec.json.Encoder()
        self._encode = self._encoder.encode
        self._lenient = msgspec.json.Encoder(enc_hook=str)
        self._last_log = 0.0
        self._gets = {b"/healthz": self._healthz, b"/readyz": self._readyz, b"/metrics": self._metrics,
                      OPENAPI_PATH: self._openapi}
        for path in DOC_ASSETS:
            self._gets[path] = self._asset
        for path in PAGE_PATHS:
            self._gets[path] = self._dashboard_page
        for path in DASHBOARD_ASSETS:
            self._gets[path] = self._dashboard_asset
        self._gets[DASHBOARD_CONFIG_PATH] = self._dashboard_config
        # GET /v1/stats/series: after -> gw/series.py's StatsSeries (set by the worker: the
        # master's ring); None: 503. listeners: name -> "host:port" this worker serves.
        self.stats_series = None
        self.listeners: dict[str, str] = {}
        self._draining_body = self._encode(Error("draining", "the server is shutting down; retry "
                                                             "(against another instance)"))
        self._shedding_body = self._encode(Error("overloaded", "the server is shedding load; retry later"))
        self._log_full_body = self._encode(Error("log_unavailable", "the write-ahead log cannot take readings "
                                                                    "now (disk full or too slow); retry later"))
        self._store_behind_body = self._encode(Error(
            "store_behind", "the store is behind the write-ahead log by more than max_sink_lag_bytes; "
                            "nothing was taken: retry after Retry-After seconds"))
        self._in_progress_body = self._encode(Error(
            "in_progress", "a reading with this device_id and seq is being written by another request "
                           "and is not on disk yet; retry"))
        self._queries_full_body = self._encode(Error("queries_busy", "too many store queries are waiting; "
                                                                     "retry after Retry-After seconds"))
        self._last_full_log = 0.0
        self._req_slot = {}
        self._query = None           # gw/query.py's Query, created on the first query request
        # The store queries' threads (gw/query_pool.py), set by the worker; None: queries run in
        # `handle`. With a pool, `handle` answers None for a query, and the framing calls
        # `defer(token)` to queue it: the answer comes back from the pool with that token.
        self.query_pool = None
        self._deferred = None
        self._thread_local = threading.local()
        self._data_dir = None
        self._store = None             # the store setting: sqlite, or a postgresql:// URL
        # HTTP tokens (gw/tokens.py): None when off (http_auth), else the table every
        # request but OPEN_PATHS (and /metrics with metrics_auth = none) is checked against.
        self.auth: TokenTable | None = None
        self._open_paths = OPEN_PATHS
        self._refusal_logged: dict[str, float] = {}
        # The client's address of the request being answered, for refusal logs (set by
        # the worker: it reads the connection's peer; None: unknown).
        self.peer_address = None
        self._unauthorized_body = self._encode(Error(
            "unauthorized", "this route needs a token: Authorization: Bearer TOKEN (gw token create)"))
        self._cfg = None
        # tokens: the tokens file as the master parsed it (a worker's start or
        # respawn: the file on disk may have been broken since); None: read it.
        self._configure(cfg, tokens)

    # --- configuration (the worker assigns app.cfg on SIGHUP) ---------------------------

    @property
    def cfg(self):
        return self._cfg

    @cfg.setter
    def cfg(self, cfg) -> None:
        self._configure(cfg, None)

    def _configure(self, cfg, tokens: dict | None) -> None:
        self._cfg = cfg
        self.ingest.max_batch = int(setting(cfg, "max_batch"))
        self._openapi_body = None
        data_dir = getattr(cfg, "data_dir", None) if cfg is not None else None
        store = getattr(cfg, "store", None) if cfg is not None else None
        if data_dir != getattr(self, "_data_dir", None) or store != getattr(self, "_store", None):
            self._data_dir = data_dir
            self._store = store
            self.close_query()
        self._configure_auth(cfg, tokens)

    def _configure_auth(self, cfg, tokens: dict | None = None) -> None:
        """Tokens on or off (http_auth), the tokens given or else the tokens file
        loaded again. A file that does not load keeps the tokens in force (none
        at all if there were none: every request needing one is refused); it is
        logged with its line."""
        if not http_tokens_required(cfg, setting):
            self.auth = None
            self._open_paths = OPEN_PATHS
            return
        self._open_paths = (OPEN_PATHS | {METRICS_PATH} if setting(cfg, "metrics_auth") == "none"
                            else OPEN_PATHS)
        try:
            if tokens is None:
                tokens = load_tokens(tokens_path(cfg, setting))
        except TokensError as exc:
            log.error("worker %d: HTTP tokens not reloaded, the tokens in force stay: %s", self.worker_index, exc)
            if self.auth is None:
                self.auth = TokenTable({})
            return
        self.auth = TokenTable(tokens)

    # --- the framing's entry points ---------------------------------------------------

    def handle(self, method: bytes, target: bytes, content_type: bytes | None,
               body: bytes, authorization: bytes | None = None,
               accept_gzip: bool = False) -> tuple[int, bytes, bytes, bytes] | Accepted | None:
        """The answer (status, content type, body, extra header lines); for an
        ingest request whose records passed the schema, the `Accepted` readings,
        for the worker to take and then ask for the answer (`ingest_taken`,
        `log_full`, `in_progress`); None for a query to run in the query pool:
        the framing then calls `defer`. With HTTP tokens on, every route but the
        open ones checks `authorization` first, before the body is looked at.
        `accept_gzip`: the request's Accept-Encoding has `gzip` (the dashboard's
        files are then sent compressed)."""
        q = target.find(b"?")
        path = target if q < 0 else target[:q]
        if path[:1] != b"/":
            path = _origin_path(path)
        token = None
        if self.auth is not None and path not in self._open_paths:
            token = self.auth.verify(authorization)
            refusal = self._refusal(token, path, authorization is None)
            if refusal is not None:
                return refusal
        if path.startswith(INGEST_PREFIX):
            return self._ingest(method, path, content_type, body, False, token)
        if path == INGEST_BATCH:
            return self._ingest(method, path, content_type, body, True, token)
        if path.startswith(DEVICES_PREFIX) or path.startswith(ALERTS_PREFIX):
            return self._query_route(method, path, b"" if q < 0 else target[q + 1:], content_type)
        if path == STATS_SERIES_PATH:
            return self._stats_series_route(method, path, b"" if q < 0 else target[q + 1:])
        if accept_gzip and path in DASHBOARD_ASSETS and (method == b"GET" or method == b"HEAD"):
            return self._dashboard_asset(path, True)
        route = self._gets.get(path)
        try:
            if route is None:
                return 404, JSON, self._error("not_found", f"no such path: {_show_path(path)}"), b""
            if method != b"GET" and method != b"HEAD":
                return self._method_not_allowed(method, path, ALLOW_GET)
            return route(path)
        except Exception:
            return self._internal_error()

    def check_early(self, target: bytes, authorization: bytes | None) -> tuple[int, bytes, bytes, bytes] | None:
        """A request's token, checked while its body is still coming (the framing
        asks once per such request): the refusal to send now, or None to read on
        (`handle` checks again once the request is complete)."""
        if self.auth is None:
            return None
        try:
            q = target.find(b"?")
            path = target if q < 0 else target[:q]
            if path[:1] != b"/":
                path = _origin_path(path)
            if path in self._open_paths:
                return None
            token = self.auth.verify(authorization)
            refusal = self._refusal(token, path, authorization is None)
            if refusal is not None or not path.startswith(INGEST_PREFIX):
                return refusal
            try:
                device_id = check_path_device_id(path[len(INGEST_PREFIX):])
            except Invalid:
                return None             # answered 400 once the request is complete
            if not token.allows_device(device_id):
                return self._forbidden("device", f"the token {token.name!r} may not ingest for device "
                                                  f"{device_id!r} (its pattern: {token.devices})")
            return None
        except Exception:
            return self._internal_error()

    def _refusal(self, token, path: bytes, missing: bool):
        """401 without a valid token, 403 without the route's scope; else None."""
        if token is None:
            return self._unauthorized(missing)
        scope = _route_scope(path)
        if scope is not None and not token.allows(scope):
            return self._forbidden("scope", f"the token {token.name!r} lacks the {scope} scope this route needs")
        return None

    def error_body(self, status: int, code: str, message: str) -> bytes:
        """The JSON error body, for the framing's own answers (400, 408, 413, 431, 505)."""
        return self._encode(Error(code, message))

    # --- ingest -------------------------------------------------------------------------

    def _ingest(self, method, path, content_type, body, batch: bool, token):
        try:
            if method != b"POST":
                answer = self._method_not_allowed(method, path, ALLOW_POST)
            elif self.draining or self.shedding:
                answer = self._unavailable()
            elif batch:
                if not is_json_content_type(content_type):
                    answer = self._unsupported(content_type)
                else:
                    accepted = self.ingest.batch(body)
                    if token is None or token.device_match is None:
                        return accepted
                    # All or nothing, as for invalid readings: one device outside the
                    # token's pattern refuses the whole batch.
                    for record in accepted.records:
                        device_id = record[0].decode("ascii")
                        if not token.allows_device(device_id):
                            return self._counted(self._forbidden(
                                "device", f"the token {token.name!r} may not ingest for device {device_id!r} "
                                          f"(its pattern: {token.devices}); the batch is refused whole"))
                    return accepted
            else:
                raw_id = path[len(INGEST_PREFIX):]
                device_id = check_path_device_id(raw_id)
                if token is not None and not token.allows_device(device_id):
                    answer = self._forbidden("device", f"the token {token.name!r} may not ingest for device "
                                                       f"{device_id!r} (its pattern: {token.devices})")
                elif not is_json_content_type(content_type):
                    answer = self._unsupported(content_type)
                else:
                    return self.ingest.one(device_id, raw_id, body)
        except Invalid as err:
            answer = self._refused(err)
        except Exception:
            answer = self._internal_error()
        return self._counted(answer)

    def ingest_taken(self, accepted: Accepted, duplicates: int, sink: bool):
        """The answer once the worker took the readings: 200 in ack mode sink
        (sent once the log is durable past them), else 202."""
        single = accepted.single
        if single is not None:
            body = self._encode(IngestAck(1, duplicates, single.device_id, single.ts, single.seq))
        else:
            body = self._encode(BatchAck(len(accepted.records), duplicates))
        return self._counted((200 if sink else 202, JSON, body, b""))

    def log_full(self):
        """The log could not take the readings: 503, retry."""
        return self._counted((503, JSON, self._log_full_body, RETRY_AFTER))

    def store_behind(self):
        """The store sink is max_sink_lag_bytes behind this worker's log: 503, retry later."""
        return self._counted((503, JSON, self._store_behind_body, STORE_BEHIND_RETRY_AFTER))

    def in_progress(self):
        """Another worker holds a first copy not durable yet (ack mode sink): 503, retry."""
        return self._counted((503, JSON, self._in_progress_body, RETRY_AFTER))

    def _counted(self, answer):
        status = answer[0]
        slot = self._req_slot.get(status)
        if slot is None:
            slot = self._req_slot[status] = INGEST_REQUESTS + http_status_index(status)
        self._c[slot] += 1
        return answer

    def _unavailable(self):
        body = self._draining_body if self.draining else self._shedding_body
        return 503, JSON, body, RETRY_AFTER

    def _refused(self, err: Invalid):
        self._c[INGEST_RECORDS_REJECTED] += err.records
        if err.errors is not None:
            return err.status, JSON, self._encode(BatchError(err.code, err.message, err.errors)), b""
        return err.status, JSON, self._encode(Error(err.code, err.message)), b""

    def _unsupported(self, content_type):
        got = "none" if content_type is None else _show_path(content_type)
        return 415, JSON, self._error("unsupported_media_type",
                                      f"Content-Type must be application/json, got {got}"), b""

    # --- the query routes (gw/query.py) ---------------------------------------------------

    def _query_route(self, method: bytes, path: bytes, query: bytes, content_type: bytes | None = None):
        """/v1/devices[/{device_id}[/metrics]], /v1/alerts, /v1/alerts/{alert_id}/ack: 404 for
        any other path under them, then 405, then 415 for a POST not declaring JSON, then the
        parameters (400), then the store (503, 404)."""
        try:
            parts = path.split(b"/")          # b"", b"v1", b"devices", ...
            n = len(parts)
            arg = b""
            allow = ALLOW_GET
            if parts[2] == b"devices":
                if n == 3:
                    name = "devices"
                elif n == 4:
                    name, arg = "device", parts[3]
                elif n == 5 and parts[4] == b"metrics":
                    name, arg = "series", parts[3]
                else:
                    name = None
            elif parts[2] == b"alerts":
                if n == 3:
                    name = "alerts"
                elif n == 5 and parts[4] == b"ack":
                    name, arg, allow = "ack", parts[3], ALLOW_POST
                else:
                    name = None
            else:
                name = None
            if name is None:
                return 404, JSON, self._error("not_found", f"no such path: {_show_path(path)}"), b""
            if allow is ALLOW_POST:
                if method != b"POST":
                    return self._method_not_allowed(method, path, ALLOW_POST)
                if not is_json_content_type(content_type):
                    # A state change: a plain HTML form on another site cannot send this type.
                    return self._unsupported(content_type)
            elif method != b"GET" and method != b"HEAD":
                return self._method_not_allowed(method, path, ALLOW_GET)
            if self.query_pool is None:
                return self._query_answer(self._query_api(), self._encode, name, arg, query)
            self._deferred = (name, arg, query)
            return None
        except Exception:
            return self._internal_error()

    def defer(self, token) -> tuple[int, bytes, bytes, bytes] | None:
        """Queues the query `handle` just answered None for; its answer comes back
        from the query pool with `token`. None, or the answer now: 503
        queries_busy when query_max_pending queries wait already."""
        job, self._deferred = self._deferred, None
        if job is None:
            raise RuntimeError("defer() without a query to queue")
        if not self.query_pool.submit(token, self._query_in_thread, *job):
            return self._queries_full()
        return None

    def _query_answer(self, api: Query, encode, name: str, arg: bytes, query: bytes):
        """A query route's answer from the store (in the loop, or in a pool thread:
        then it touches nothing but its arguments and its thread's own objects)."""
        try:
            try:
                if name == "devices" or name == "alerts":
                    result = getattr(api, name)(query)
                else:
                    result = getattr(api, name)(arg, query)
            except Invalid as err:
                return err.status, JSON, encode(Error(err.code, err.message)), b""
            except StoreError as err:
                return 503, JSON, encode(Error(err.code, err.message)), RETRY_AFTER
            return 200, JSON, encode(result), b""
        except Exception:
            return self._internal_error()

    def _query_in_thread(self, name: str, arg: bytes, query: bytes):
        """A pool thread's job: the thread's own store connection and encoder
        (sqlite3 connections belong to the thread that opened them)."""
        local = self._thread_local
        api = getattr(local, "api", None)
        if api is None or local.data_dir != self._data_dir or local.store != self._store:
            if api is not None:
                api.close()
            local.data_dir = self._data_dir
            local.store = self._store
            api = local.api = open_query(self._data_dir, self._store)
            local.encode = msgspec.json.Encoder().encode
        return self._query_answer(api, local.encode, name, arg, query)

    def _queries_full(self):
        """More queries than query_max_pending wait: 503, counted, logged at most every 10 s."""
        self._c[QUERIES_REFUSED] += 1
        now = time.monotonic()
        if now - self._last_full_log >= 10.0 or self._last_full_log == 0.0:
            self._last_full_log = now
            log.warning("worker %d: %d store queries are waiting (query_max_pending): answering 503 "
                        "(logged at most every 10 s)", self.worker_index, self.query_pool.max_pending)
        return 503, JSON, self._queries_full_body, RETRY_AFTER

    def _query_api(self) -> Query:
        """The store's queries, created on first use: a store missing now is looked for
        again on every request (503 until the pipeline has created it)."""
        api = self._query
        if api is None:
            api = self._query = open_query(self._data_dir, self._store)
        return api

    def close_query(self) -> None:
        api, self._query = getattr(self, "_query", None), None
        if api is not None:
            api.close()

    # --- the other routes ---------------------------------------------------------------

    def _healthz(self, path):
        try:
            ok, components = self.health()
        except Exception as exc:
            self._log_failure("health check")
            ok, components = False, {"error": f"the health check failed: {exc.__class__.__name__}"}
        body = Health("ok" if ok else "unavailable", self.worker_index, self.draining, components)
        try:
            data = self._lenient.encode(body)
        except Exception:
            data = self._encode(Health("unavailable", self.worker_index, self.draining,
                                       {"error": "the health report could not be encoded"}))
            ok = False
        return (200 if ok else 503), JSON, data, NO_STORE

    def _readyz(self, path):
        if self.draining:
            return 503, JSON, self._draining_body, RETRY_AFTER + NO_STORE
        return 200, JSON, self._encode(Ready("ready", self.worker_index)), NO_STORE

    def _metrics(self, path):
        return 200, METRICS_TYPE, bytes(self.render_metrics()), b""

    def _openapi(self, path):
        if self._openapi_body is None:
            from gw.openapi import openapi_json
            self._openapi_body = openapi_json(self._cfg)
        return 200, JSON, self._openapi_body, b"Cache-Control: no-cache\r\n"

    def _asset(self, path):
        name, ctype, headers = DOC_ASSETS[path]
        data = doc_asset(name)
        if data is None:
            return 404, JSON, self._error("not_found", f"{name} is not installed (gw/docs package data)"), b""
        return 200, ctype, data, headers

    # --- the dashboard -------------------------------------------------------------------

    def _dashboard_page(self, path):
        from gw.dashboard import page
        data = page()
        if data is None:
            return 404, JSON, self._error("not_found", "the dashboard is not installed (gw/dashboard "
                                                       "package data)"), b""
        return 200, HTML, data, PAGE_HEADERS

    def _dashboard_asset(self, path, gzip: bool = False):
        from gw.dashboard import asset
        try:
            found = asset(path, gzip)
        except Exception:
            return self._internal_error()
        if found is None:
            return 404, JSON, self._error("not_found", f"{_show_path(path)} is not installed (gw/dashboard "
                                                       "package data)"), b""
        return 200, found[0], found[1], ASSET_HEADERS + (GZIP_HEADERS if gzip else VARY)

    def _dashboard_config(self, path):
        from gw.auth import anonymous_allowed
        cfg = self._cfg

        def ws(name: str, tls: bool):
            bound = self.listeners.get(name)
            if not bound:
                return None
            port = int(bound.rpartition(":")[2])
            return WsListener(port, str(setting(cfg, "ws_path")), tls)

        body = DashboardConfig(__version__, self.worker_index, int(setting(cfg, "workers")), self.auth is not None,
                               anonymous_allowed(cfg) if cfg is not None else True, ws("ws", False),
                               ws("wss", True), str(setting(cfg, "telemetry_topic")), "alerts")
        return 200, JSON, self._encode(body), NO_STORE

    def _stats_series_route(self, method: bytes, path: bytes, query: bytes):
        """GET /v1/stats/series[?after=N]: from the master's ring, in the loop (a copy and an encode)."""
        try:
            if method != b"GET" and method != b"HEAD":
                return self._method_not_allowed(method, path, ALLOW_GET)
            from gw.query import parse_query
            params = parse_query(query, SERIES_PARAMS)
            raw = params.get("after", "-1")
            if raw != "-1" and _SEQUENCE.fullmatch(raw) is None:
                return 400, JSON, self._error(
                    "invalid_after", "after must be -1 or a point's sequence number (the `last` of an answer), "
                                     f"got {_show_path(raw.encode())}"), b""
            if self.stats_series is None:
                return 503, JSON, self._error("stats_unavailable", "this server keeps no stats series "
                                                                   "(a worker not started by gw serve)"), RETRY_AFTER
            return 200, JSON, self._encode(self.stats_series(int(raw))), NO_STORE
        except Invalid as err:
            return err.status, JSON, self._encode(Error(err.code, err.message)), b""
        except Exception:
            return self._internal_error()

    # --- helpers ------------------------------------------------------------------------

    def _error(self, code: str, message: str) -> bytes:
        return self._encode(Error(code, message))

    def _method_not_allowed(self, method: bytes, path: bytes, allow: bytes):
        allowed = allow[7:-2].decode()
        return 405, JSON, self._error(
            "method_not_allowed",
            f"{_show_path(method)} is not allowed on {_show_path(path)}; use {allowed}"), allow

    def _internal_error(self):
        self._log_failure("HTTP request")
        return 500, JSON, self._error("internal_error", "the server failed to handle the request"), b""

    def _unauthorized(self, missing: bool):
        """401 with WWW-Authenticate: no token, or one the tokens file does not hold."""
        self._c[HTTP_UNAUTHORIZED] += 1
        self._log_refusal("no_token" if missing else "bad_token",
                          "401, no bearer token" if missing else "401, a token the tokens file does not hold")
        return 401, JSON, self._unauthorized_body, WWW_AUTHENTICATE

    def _forbidden(self, reason: str, message: str):
        """403: a valid token without the route's scope, or for a device outside its pattern."""
        self._c[HTTP_FORBIDDEN] += 1
        self._log_refusal(reason, "403, " + message)
        return 403, JSON, self._error("forbidden", message), b""

    def _log_refusal(self, reason: str, message: str) -> None:
        """One line per reason at most every REFUSAL_LOG_INTERVAL, with the client's
        address; never the token."""
        now = time.monotonic()
        last = self._refusal_logged.get(reason)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            return
        self._refusal_logged[reason] = now
        peer = None
        if self.peer_address is not None:
            try:
                peer = self.peer_address()
            except Exception:
                peer = None
        log.warning("worker %d: HTTP request from %s refused: %s (logged at most every %d s per reason)",
                    self.worker_index, peer or "an unknown address", message, int(REFUSAL_LOG_INTERVAL))

    def _log_failure(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= 10.0 or self._last_log == 0.0:
            self._last_log = now
            log.exception("worker %d: %s failed (logged at most every 10 s)", self.worker_index, what)


def _route_scope(path: bytes) -> str | None:
    """The scope a route needs (gw/tokens.py); None: any valid token (unknown paths, then 404)."""
    if path.startswith(INGEST_BATCH):
        return "ingest"
    if path.startswith(ALERTS_PREFIX) and path.endswith(b"/ack"):
        return "admin"
    if (path.startswith(DEVICES_PREFIX) or path.startswith(ALERTS_PREFIX) or path == METRICS_PATH
            or path == STATS_SERIES_PATH or path == DASHBOARD_CONFIG_PATH):
        return "read"
    return None


def _origin_path(target: bytes) -> bytes:
    """The path of an absolute-form target (http://host/path); other forms have none."""
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        slash = rest.find(b"/")
        return rest[slash:] if slash >= 0 else b"/"
    return target


def _show_path(raw: bytes, limit: int = 200) -> str:
    text = raw[:limit].decode("utf-8", "replace")
    return text + "..." if len(raw) > limit else text
