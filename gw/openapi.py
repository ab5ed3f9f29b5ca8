"""The OpenAPI 3.1 document of the HTTP API, generated from the msgspec types.

Served at `/docs/openapi.json` (with Swagger UI at `/docs`) and printed by
`gw openapi`. The schemas come from `msgspec.json.schema_components` over the
types of gw/ingest.py, gw/http_api.py and gw/query.py; the paths, the responses (every
status each route can answer, including those the HTTP framing gives before
the application sees the request) and the examples are written here. The
document depends only on the configuration (max_batch, max_body_size, ack,
telemetry_topic) and the version, and is built deterministically: the same
inputs give the same bytes.
"""

from __future__ import annotations

import copy
import inspect
import json

import msgspec

from gw import __version__, query
from gw.http_api import METRICS_TYPE, DashboardConfig, Health, Ready, setting
from gw.series import StatsSeries
from gw.ingest import (CODES, DEVICE_ID_PATTERN, KEY_PATTERN, MAX_METRICS, MAX_TAG_VALUE, MAX_TAGS,
                       BatchAck, BatchError, BatchRecord, Error, IngestAck, Record, Telemetry)

REF = "#/components/schemas/{name}"
_TYPES = (Record, BatchRecord, Telemetry, IngestAck, BatchAck, Error, BatchError, Health, Ready, DashboardConfig,
          StatsSeries) + query.TYPES


def _schemas() -> dict:
    _, components = msgspec.json.schema_components(_TYPES, ref_template=REF)
    for schema in components.values():
        if "description" in schema:
            schema["description"] = inspect.cleandoc(schema["description"])
    # The HTTP body of one record: `Record` without device_id, which the path
    # gives. (A device_id equal to the path's is tolerated, so the published
    # form is valid input again, but it cannot be expressed in JSON Schema, so
    # the document shows the canonical form only.)
    body = copy.deepcopy(components["Record"])
    body["title"] = "IngestBody"
    body["description"] = "One telemetry record; the device id is the path's."
    del body["properties"]["device_id"]
    components["IngestBody"] = body
    return {name: components[name] for name in sorted(components)}


def _ref(name: str) -> dict:
    return {"$ref": REF.format(name=name)}


def _json(schema: dict, examples: dict | None = None) -> dict:
    media = {"schema": schema}
    if examples:
        media["examples"] = examples
    return {"application/json": media}


def _error_example(code: str, message: str) -> dict:
    return {"summary": code, "value": {"code": code, "message": message}}


_HEADERS = {
    "Allow": {"description": "the methods the path accepts", "schema": {"type": "string"}},
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}},
    "Cache-Control": {"description": "caching policy", "schema": {"type": "string"}},
    "X-Content-Type-Options": {"description": "nosniff", "schema": {"type": "string"}},
    "X-Frame-Options": {"description": "DENY: the page is never framed", "schema": {"type": "string"}},
    "Vary": {"description": "Accept-Encoding", "schema": {"type": "string"}},
    "Content-Encoding": {"description": "gzip, when the request's Accept-Encoding has it; else absent",
                         "schema": {"type": "string"}},
    "Referrer-Policy": {"description": "no-referrer", "schema": {"type": "string"}},
    "Content-Security-Policy": {"description": "scripts, styles and connections from this server only (and "
                                               "its MQTT over WebSocket listeners)", "schema": {"type": "string"}},
}

_INGEST_400 = ("invalid_json", "invalid_body", "unknown_field", "invalid_device_id", "device_id_mismatch",
               "missing_metrics", "invalid_metrics", "too_many_metrics", "invalid_metric_key",
               "invalid_metric", "non_finite_metric", "invalid_tags", "too_many_tags", "invalid_tag_key",
               "invalid_tag", "invalid_ts", "invalid_seq")


def _responses(cfg) -> dict:
    max_body = int(setting(cfg, "max_body_size"))
    max_batch = int(setting(cfg, "max_batch"))
    error = _ref("Error")
    framing_400 = ("bad_request_line", "bad_header", "bad_content_length", "bad_framing", "bad_host",
                   "bad_chunk")
    return {
        "IngestBadRequest": {
            "description": "The record breaks a rule (the code names it; nothing was published), or the "
                           "request is malformed HTTP (framing codes: " + ", ".join(framing_400) + ").\n\n"
                           + "\n".join(f"- `{c}`: {CODES[c]}" for c in _INGEST_400),
            "content": _json(error, {c: _error_example(c, CODES[c]) for c in _INGEST_400}),
        },
        "BatchBadRequest": {
            "description": "Some records of the batch are invalid (`invalid_batch`, every one listed in "
                           "`errors` with its index and code; nothing was published), the body is not a "
                           "JSON array of records (`invalid_json`, `invalid_body`), it is empty "
                           "(`empty_batch`), or the request is malformed HTTP.",
            "content": _json({"oneOf": [_ref("BatchError"), error]}, {
                "invalid_batch": {"summary": "invalid_batch", "value": {
                    "code": "invalid_batch", "message": "2 of 3 records are invalid; nothing was accepted",
                    "errors": [
                        {"index": 1, "code": "missing_device_id",
                         "message": "every record of a batch needs a device_id"},
                        {"index": 2, "code": "non_finite_metric", "message": "metric temp_c is not a finite number"},
                    ]}},
                "empty_batch": _error_example("empty_batch", "a batch needs at least one record"),
                "invalid_json": _error_example("invalid_json", "invalid JSON: JSON is malformed: "
                                                               "invalid character (byte 16)"),
            }),
        },
        "MalformedRequest": {
            "description": "Malformed HTTP, refused by the framing before routing (codes: "
                           + ", ".join(framing_400) + "); the connection is closed.",
            "content": _json(error, {"bad_request_line": _error_example("bad_request_line",
                                                                        "malformed request line")}),
        },
        "NotFound": {
            "description": "No such path (any path not listed here), or a docs file that is not installed.",
            "content": _json(error, {"not_found": _error_example("not_found", "no such path: /v2/ingest")}),
        },
        "MethodNotAllowed": {
            "description": "The path exists but not with this method; `Allow` lists the methods it takes.",
            "headers": {"Allow": _HEADERS["Allow"]},
            "content": _json(error, {"method_not_allowed": _error_example(
                "method_not_allowed", "GET is not allowed on /v1/ingest; use POST")}),
        },
        "RequestTimeout": {
            "description": "The request did not arrive in full within http_timeout; the connection is closed.",
            "content": _json(error, {"request_timeout": _error_example("request_timeout",
                                                                       "the request took too long")}),
        },
        "ContentTooLarge": {
            "description": f"The body is over max_body_size ({max_body} bytes; `body_too_large`); "
                           "refused by the framing, the connection is closed.",
            "content": _json(error, {"body_too_large": _error_example("body_too_large",
                                                                      f"the body exceeds {max_body} bytes")}),
        },
        "BatchContentTooLarge": {
            "description": f"The body is over max_body_size ({max_body} bytes; `body_too_large`, the "
                           f"connection is closed) or the batch has more than max_batch ({max_batch}) "
                           "records (`batch_too_large`): split it.",
            "content": _json(error, {
                "batch_too_large": _error_example("batch_too_large", f"the batch has {max_batch + 1} "
                                                  f"records, at most {max_batch} allowed; split it"),
                "body_too_large": _error_example("body_too_large", f"the body exceeds {max_body} bytes")}),
        },
        "UnsupportedMediaType": {
            "description": "Content-Type is not application/json (parameters are allowed, "
                           "a charset only if UTF-8).",
            "content": _json(error, {"unsupported_media_type": _error_example(
                "unsupported_media_type", "Content-Type must be application/json, got text/plain")}),
        },
        "ExpectationFailed": {
            "description": "An Expect header other than 100-continue.",
            "content": _json(error),
        },
        "HeadersTooLarge": {
            "description": "The request line and headers are too large or too many; the connection is closed.",
            "content": _json(error),
        },
        "InternalError": {
            "description": "The server failed to handle the request (a bug; logged).",
            "content": _json(error, {"internal_error": _error_example(
                "internal_error", "the server failed to handle the request")}),
        },
        "NotImplemented": {
            "description": "A transfer coding other than chunked.",
            "content": _json(error),
        },
        "IngestUnavailable": {
            "description": "Not accepting: the server is draining (`draining`) or shedding load "
                           "(`overloaded`), the write-ahead log cannot take readings (`log_unavailable`), "
                           "the store is `max_sink_lag_bytes` behind the log (`store_behind`), "
                           "or (ack mode sink) a reading with the same `(device_id, seq)` is being written "
                           "by another request and is not on disk yet (`in_progress`). Retry after "
                           "`Retry-After` seconds, with jitter.",
            "headers": {"Retry-After": _HEADERS["Retry-After"]},
            "content": _json(error, {
                "draining": _error_example("draining", "the server is shutting down; retry "
                                                       "(against another instance)"),
                "overloaded": _error_example("overloaded", "the server is shedding load; retry later"),
                "log_unavailable": _error_example("log_unavailable", "the write-ahead log cannot take "
                                                  "readings now (disk full or too slow); retry later"),
                "in_progress": _error_example("in_progress", "a reading with this device_id and seq is "
                                              "being written by another request and is not on disk yet; "
                                              "retry"),
                "store_behind": _error_example("store_behind", "the store is behind the write-ahead log by "
                                               "more than max_sink_lag_bytes; nothing was taken: retry after "
                                               "Retry-After seconds")}),
        },
        "VersionNotSupported": {
            "description": "An HTTP version other than 1.0 and 1.1.",
            "content": _json(error),
        },
    }


# Answers any route can get from the framing or a failure, whatever its own.
_COMMON = {"405": "MethodNotAllowed", "408": "RequestTimeout", "413": "ContentTooLarge",
           "417": "ExpectationFailed", "431": "HeadersTooLarge", "500": "InternalError",
           "501": "NotImplemented", "505": "VersionNotSupported"}


def _with_common(own: dict, *, bad_request: str = "MalformedRequest") -> dict:
    responses = dict(own)
    responses.setdefault("400", {"$ref": f"#/components/responses/{bad_request}"})
    for status, name in _COMMON.items():
        responses.setdefault(status, {"$ref": f"#/components/responses/{name}"})
    return dict(sorted(responses.items()))


def _ack_responses(cfg, schema: str, example: dict) -> dict:
    ack = setting(cfg, "ack")
    tail = " (this server's ack mode)"
    return {
        "202": {"description": "Accepted (ack mode `enqueue`, the default): validated, appended to the "
                               "worker's write-ahead log buffer and routed to the MQTT subscribers of the "
                               "telemetry topic" + (tail if ack == "enqueue" else ""),
                "content": _json(_ref(schema), {"accepted": {"value": example}})},
        "200": {"description": "Accepted (ack mode `sink`): validated, routed, and answered only once the "
                               "worker's write-ahead log is on disk past the record (per `fsync`)"
                               + (tail if ack == "sink" else ""),
                "content": _json(_ref(schema), {"accepted": {"value": example}})},
    }


def _get(summary: str, description: str, tag: str, op: str, ok: dict, extra: dict | None = None) -> dict:
    own = {"200": ok}
    own.update(extra or {})
    return {"get": {"tags": [tag], "summary": summary, "description": description, "operationId": op,
                    "responses": _with_common(own)}}


def _static(media: str, description: str, nosniff: bool = True) -> dict:
    headers = {"Cache-Control": _HEADERS["Cache-Control"]}
    if nosniff:
        headers["X-Content-Type-Options"] = _HEADERS["X-Content-Type-Options"]
    return {"description": description, "headers": headers,
            "content": {media: {"schema": {"type": "string"}}}}


def build_openapi(cfg=None) -> dict:
    """The OpenAPI 3.1 document for this configuration, as a dict."""
    prefix = str(setting(cfg, "telemetry_topic"))
    max_batch = int(setting(cfg, "max_batch"))
    max_body = int(setting(cfg, "max_body_size"))
    single_example = {"ts": "2025-09-23T11:18:41Z", "seq": 42, "metrics": {"temp_c": 21.5},
                      "tags": {"site": "AAL"}, "payload": {"raw": "ok"}}
    ack_example = {"accepted": 1, "duplicates": 0, "device_id": "device_1", "ts": "2025-09-23T11:18:41Z",
                   "seq": 42}
    device_param = {"name": "device_id", "in": "path", "required": True,
                    "description": "the device's identifier (not percent-decoded)",
                    "schema": {"type": "string", "pattern": DEVICE_ID_PATTERN, "minLength": 1, "maxLength": 64},
                    "example": "device_1"}
    common_rules = (
        f"Metrics: at most {MAX_METRICS} keys matching `{KEY_PATTERN}`, finite numbers. "
        f"Tags: at most {MAX_TAGS} keys (same pattern), strings of at most {MAX_TAG_VALUE} characters. "
        "`ts`: RFC 3339 with a time zone or Unix seconds; the server's time when absent. "
        "Unknown fields are refused (`unknown_field`). "
        f"Each accepted record is published (QoS 1) on `{prefix}/{{device_id}}` as the `Telemetry` schema; "
        "a `(device_id, seq)` already seen within the idempotency window is acknowledged "
        "(`duplicates`) but not published again. "
        f"Body at most {max_body} bytes; `Content-Type: application/json` required."
    )
    paths = {
        "/v1/ingest/{device_id}": {
            "post": {
                "tags": ["ingest"],
                "summary": "Ingest one telemetry record",
                "description": common_rules,
                "operationId": "ingestRecord",
                "parameters": [device_param],
                "requestBody": {"required": True, "content": _json(_ref("IngestBody"), {
                    "reading": {"summary": "a reading", "value": single_example},
                    "minimal": {"summary": "metrics only (ts filled in by the server)",
                                "value": {"metrics": {"temp_c": 21.5}}}})},
                "responses": _with_common({
                    **_ack_responses(cfg, "IngestAck", ack_example),
                    "400": {"$ref": "#/components/responses/IngestBadRequest"},
                    "415": {"$ref": "#/components/responses/UnsupportedMediaType"},
                    "503": {"$ref": "#/components/responses/IngestUnavailable"},
                }),
            },
        },
        "/v1/ingest": {
            "post": {
                "tags": ["ingest"],
                "summary": "Ingest a batch of records (all or nothing)",
                "description": f"A JSON array of 1 to {max_batch} records, each with its `device_id`. "
                               "Every record is validated first: if any is invalid the answer is 400 "
                               "`invalid_batch` listing each invalid record, and nothing is published. "
                               + common_rules,
                "operationId": "ingestBatch",
                "requestBody": {"required": True, "content": _json(
                    # max_batch is not maxItems: more is 413 (batch_too_large), not a 400.
                    {"type": "array", "items": _ref("BatchRecord"), "minItems": 1},
                    {"batch": {"summary": "two devices", "value": [
                        {"device_id": "device_1", **single_example},
                        {"device_id": "device_2", "seq": 7, "metrics": {"temp_c": 19.0, "rssi": -67}}]}})},
                "responses": _with_common({
                    **_ack_responses(cfg, "BatchAck", {"accepted": 2, "duplicates": 0}),
                    "400": {"$ref": "#/components/responses/BatchBadRequest"},
                    "413": {"$ref": "#/components/responses/BatchContentTooLarge"},
                    "415": {"$ref": "#/components/responses/UnsupportedMediaType"},
                    "503": {"$ref": "#/components/responses/IngestUnavailable"},
                }),
            },
        },
        "/healthz": _get(
            "Component status", "Worker processes alive and turning, listeners, data directory writable. "
            "200 when every component is ok, 503 otherwise (same body).", "health", "getHealth",
            {"description": "Every component is ok.", "headers": {"Cache-Control": _HEADERS["Cache-Control"]},
             "content": _json(_ref("Health"))},
            {"503": {"description": "Some component is not ok (see `components`).",
                     "headers": {"Cache-Control": _HEADERS["Cache-Control"]},
                     "content": _json(_ref("Health"))}}),
        "/readyz": _get(
            "Readiness", "200 while the server accepts requests, 503 while it drains (stopping).",
            "health", "getReady",
            {"description": "Accepting.", "headers": {"Cache-Control": _HEADERS["Cache-Control"]},
             "content": _json(_ref("Ready"))},
            {"503": {"description": "Draining: route traffic elsewhere.",
                     "headers": {"Retry-After": _HEADERS["Retry-After"],
                                 "Cache-Control": _HEADERS["Cache-Control"]},
                     "content": _json(_ref("Error"), {"draining": _error_example(
                         "draining", "the server is shutting down; retry (against another instance)")})}}),
        "/metrics": _get(
            "Prometheus metrics", "The server's counters and histograms in the Prometheus text "
            "exposition format 0.0.4.", "health", "getMetrics",
            {"description": "The metrics.",
             "content": {METRICS_TYPE.decode(): {"schema": {"type": "string"}}}}),
        "/docs": _get(
            "API documentation (Swagger UI)", "This document, browsable, served offline (also at `/docs/`).",
            "docs", "getDocs", _static("text/html", "The Swagger UI page.", nosniff=False),
            {"404": {"$ref": "#/components/responses/NotFound"}}),
        "/docs/openapi.json": _get(
            "This OpenAPI document", "The document, generated from the server's types and settings.",
            "docs", "getOpenapi",
            {"description": "The OpenAPI 3.1 document.", "headers": {"Cache-Control": _HEADERS["Cache-Control"]},
             "content": _json({"type": "object"})}),
        "/docs/swagger-ui-bundle.js": _get(
            "Swagger UI script", "Vendored swagger-ui-dist (Apache-2.0).", "docs", "getSwaggerBundle",
            _static("text/javascript", "The script."), {"404": {"$ref": "#/components/responses/NotFound"}}),
        "/docs/swagger-ui.css": _get(
            "Swagger UI style sheet", "Vendored swagger-ui-dist (Apache-2.0).", "docs", "getSwaggerCss",
            _static("text/css", "The style sheet."), {"404": {"$ref": "#/components/responses/NotFound"}}),
    }
    paths.update(_query_paths())
    paths.update(_dashboard_paths())
    _secure(paths, cfg)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gw HTTP API",
            "version": __version__,
            "summary": "Telemetry ingest, queries, health and metrics of the gw IoT gateway.",
            "description": (
                "HTTP ingest of device telemetry, queries of the stored readings and alerts, health probes "
                "and metrics. Every error is JSON `{\"code\", \"message\"}`; "
                "a path not listed here answers 404 `not_found`, a listed path with another method 405 "
                "with `Allow`. GET routes also answer HEAD. Ack mode of this server: "
                f"`{setting(cfg, 'ack')}`. Versioning: this is v1; breaking changes get a new prefix "
                "(/v2).\n\n" + _auth_description(cfg)),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [{"name": "ingest", "description": "Device telemetry in"},
                 {"name": "query", "description": "Devices, metric series and alerts from the pipeline's store"},
                 {"name": "health", "description": "Probes and metrics"},
                 {"name": "docs", "description": "This documentation"},
                 {"name": "dashboard", "description": "The operator's dashboard at `/` and what it reads"}],
        "paths": paths,
        "components": {"schemas": _schemas(), "responses": {**_responses(cfg), **_query_responses(),
                                                             **_auth_responses()},
                       "securitySchemes": {"bearerAuth": {
                           "type": "http", "scheme": "bearer",
                           "description": "A token made by `gw token create NAME --scope SCOPE`, sent as "
                                          "`Authorization: Bearer TOKEN`. Scopes: `ingest` (optionally "
                                          "limited to device ids matching a pattern), `read`, `admin` "
                                          "(every route, every device)."}}},
    }


# --- HTTP tokens (gw/tokens.py) ---------------------------------------------------------

# The scope each route needs (gw/http_api.py `_route_scope` decides the same); None: open.
ROUTE_SCOPES = {
    "/v1/ingest/{device_id}": "ingest", "/v1/ingest": "ingest",
    "/v1/devices": "read", "/v1/devices/{device_id}": "read", "/v1/devices/{device_id}/metrics": "read",
    "/v1/alerts": "read", "/v1/alerts/{alert_id}/ack": "admin", "/metrics": "read",
    "/healthz": None, "/readyz": None, "/docs": None, "/docs/openapi.json": None,
    "/docs/swagger-ui-bundle.js": None, "/docs/swagger-ui.css": None,
    "/": None, "/dashboard/app.js": None, "/dashboard/app.css": None, "/dashboard/vendor/mqtt.min.js": None,
    "/dashboard/vendor/uPlot.iife.min.js": None, "/dashboard/vendor/uPlot.min.css": None,
    "/v1/dashboard": "read", "/v1/stats/series": "read",
}


def _tokens_on(cfg) -> bool:
    from gw.tokens import http_tokens_required

    return http_tokens_required(cfg, setting)


def _auth_description(cfg) -> str:
    state = ("on for this server" if _tokens_on(cfg) else "off for this server "
             "(every listener on loopback, or `http_auth = none`): the token is optional")
    return ("**Authentication** (`http_auth`: `token`, `none`, or `auto`: tokens once any listener is off "
            f"loopback; {state}): a bearer token, `Authorization: Bearer TOKEN`, made with `gw token create` "
            "(use the Authorize button). Each route lists the scope it needs; `admin` has them all. "
            "No token or an unknown one: 401 with `WWW-Authenticate: Bearer`; a token without the scope, or "
            "an ingest for a device outside the token's pattern (for a batch: any of its readings; the batch "
            "is refused whole): 403. `/healthz`, `/readyz`, `/docs` and the dashboard's page and files (`/`, "
            "`/dashboard/...`: they hold no data; the page asks for a token) are open; `/metrics` needs `read` "
            "unless `metrics_auth = none`.")


def _auth_responses() -> dict:
    error = _ref("Error")
    return {
        "Unauthorized": {
            "description": "No bearer token, or one the server's tokens file does not hold (with HTTP tokens on).",
            "headers": {"WWW-Authenticate": {"description": "`Bearer realm=\"gw\"`", "schema": {"type": "string"}}},
            "content": _json(error, {"unauthorized": _error_example(
                "unauthorized", "this route needs a token: Authorization: Bearer TOKEN (gw token create)")}),
        },
        "Forbidden": {
            "description": "The token lacks the scope this route needs, or (ingest) may not ingest for a "
                           "device of the request (a batch is refused whole).",
            "content": _json(error, {"forbidden": _error_example(
                "forbidden", "the token 'site1' lacks the read scope this route needs")}),
        },
    }


def _secure(paths: dict, cfg) -> None:
    """Each operation's security requirement (the scope as the bearer scheme's role, as
    OpenAPI 3.1 allows) and its 401/403 answers; the open routes declare none. With
    tokens off for this configuration, the requirement is optional (`{}` beside it)."""
    tokens_on = _tokens_on(cfg)
    metrics_open = setting(cfg, "metrics_auth") == "none"
    for path, item in paths.items():
        scope = ROUTE_SCOPES[path]
        for op in item.values():
            if scope is None or (path == "/metrics" and metrics_open and tokens_on):
                op["security"] = []
                continue
            op["security"] = [{"bearerAuth": [scope]}] if tokens_on else [{"bearerAuth": [scope]}, {}]
            op["description"] = (op.get("description", "") + f"\n\nNeeds a token with the `{scope}` scope"
                                 + (" (or `admin`)" if scope != "admin" else "")
                                 + (", unless `metrics_auth = none`" if path == "/metrics" else "")
                                 + " when HTTP tokens are on.").lstrip()
            op["responses"].setdefault("401", {"$ref": "#/components/responses/Unauthorized"})
            op["responses"].setdefault("403", {"$ref": "#/components/responses/Forbidden"})


# --- the dashboard (gw/dashboard/) ---------------------------------------------------------

def _dashboard_paths() -> dict:
    def asset(summary: str, op: str, media: str, what: str) -> dict:
        ok = {"description": what + " Cached for a year (`immutable`): the page names it with `?v=` and its "
                                    "SHA-256, so a new version has a new name.",
              "headers": {name: _HEADERS[name] for name in ("Cache-Control", "X-Content-Type-Options", "Vary",
                                                            "Content-Encoding")},
              "content": {media: {"schema": {"type": "string"}}}}
        return _get(summary, what, "dashboard", op, ok, {"404": {"$ref": "#/components/responses/NotFound"}})

    page_headers = {name: _HEADERS[name] for name in ("Cache-Control", "X-Content-Type-Options", "X-Frame-Options",
                                                      "Referrer-Policy", "Content-Security-Policy")}
    return {
        "/": _get(
            "The dashboard", "The operator's live view of this gateway (also at `/index.html`, `/dashboard` and "
            "`/dashboard/`): connections and message rates of the last minutes, each worker's load, the "
            "write-ahead log and the sinks' lag (from `/v1/stats/series`, every second), the store's devices "
            "with their last values and a sparkline per metric (the query API, a page at a time), alerts as "
            "they are raised (MQTT over WebSocket on `alerts/#`) with an acknowledge button, and the live "
            "readings of one device. Served offline: every file it loads comes from this server. With HTTP "
            "tokens on it asks for a token (and, with anonymous MQTT off, an MQTT user) and keeps them in the "
            "browser tab.", "dashboard", "getDashboard",
            {"description": "The page.", "headers": page_headers,
             "content": {"text/html": {"schema": {"type": "string"}}}},
            {"404": {"$ref": "#/components/responses/NotFound"}}),
        "/dashboard/app.js": asset("The dashboard's script", "getDashboardScript", "text/javascript",
                                   "The page's own script."),
        "/dashboard/app.css": asset("The dashboard's style sheet", "getDashboardCss", "text/css",
                                    "The page's own style sheet."),
        "/dashboard/vendor/mqtt.min.js": asset("MQTT.js", "getMqttJs", "text/javascript",
                                               "Vendored MQTT.js browser bundle (npm `mqtt`, MIT)."),
        "/dashboard/vendor/uPlot.iife.min.js": asset("uPlot", "getUplotJs", "text/javascript",
                                                     "Vendored uPlot charts (npm `uplot`, MIT)."),
        "/dashboard/vendor/uPlot.min.css": asset("uPlot's style sheet", "getUplotCss", "text/css",
                                                 "Vendored uPlot style sheet (npm `uplot`, MIT)."),
        "/v1/dashboard": _get(
            "What the dashboard needs to connect", "This server's version and workers, whether the HTTP API "
            "needs a token and MQTT a user, its MQTT over WebSocket listeners (the port and path the page "
            "connects to) and the topics of readings and alerts.", "dashboard", "getDashboardConfig",
            {"description": "The settings.", "headers": {"Cache-Control": _HEADERS["Cache-Control"]},
             "content": _json(_ref("DashboardConfig"))}),
        "/v1/stats/series": {"get": {
            "tags": ["dashboard"], "summary": "The last minutes of the stats",
            "description": "A point a second, sampled by the master from the stats block (the counters of "
                           "`/metrics`), kept for the last `capacity` seconds, as columns: the gateway's "
                           "connections, message and byte rates, the write-ahead logs and the sinks' lag, "
                           "and per worker its load. Pass the answer's `last` as `after` to get only the "
                           "points since.",
            "operationId": "getStatsSeries",
            "parameters": [{"name": "after", "in": "query", "required": False,
                            "description": "only points with a greater sequence number (-1, the default: "
                                           "every point kept)",
                            "schema": {"type": "integer", "minimum": -1}}],
            "responses": _with_common({
                "200": {"description": "The points.", "headers": {"Cache-Control": _HEADERS["Cache-Control"]},
                        "content": _json(_ref("StatsSeries"))},
                "400": {"description": "A parameter that is not `after`, or `after` not an integer >= -1.",
                        "content": _json(_ref("Error"), {"invalid_after": _error_example(
                            "invalid_after", "after must be -1 or a point's sequence number (the `last` "
                                             "of an answer), got x")})},
                "503": {"description": "This worker keeps no series (not started by `gw serve`).",
                        "headers": {"Retry-After": _HEADERS["Retry-After"]},
                        "content": _json(_ref("Error"))}}),
        }},
    }


# --- the query routes (gw/query.py) ------------------------------------------------------

def _query_error(code: str) -> dict:
    return _error_example(code, query.CODES[code][1])


def _query_400(codes: tuple[str, ...], what: str) -> dict:
    return {
        "description": f"{what} (the code names the rule broken), or the request is malformed HTTP.\n\n"
                       + "\n".join(f"- `{c}`: {query.CODES[c][1]}" for c in codes),
        "content": _json(_ref("Error"), {c: _query_error(c) for c in codes}),
    }


def _query_responses() -> dict:
    return {
        "StoreUnavailable": {
            "description": "The store cannot answer now: it does not exist yet or cannot be read "
                           "(`store_unavailable`: the pipeline creates `store.sqlite` in the data directory), "
                           "its writer held its lock too long (`store_busy`), the query ran over its "
                           "time budget (`query_timeout`), or too many queries wait in this worker "
                           "(`queries_busy`). Retry after `Retry-After` seconds.",
            "headers": {"Retry-After": _HEADERS["Retry-After"]},
            "content": _json(_ref("Error"), {c: _query_error(c) for c in
                                             ("store_unavailable", "store_busy", "query_timeout",
                                              "queries_busy")}),
        },
        "UnknownDevice": {
            "description": "The store has never seen this device (`unknown_device`), or no such path "
                           "(`not_found`).",
            "content": _json(_ref("Error"), {"unknown_device": _error_example(
                "unknown_device", "no device device_9 in the store")}),
        },
        "UnknownAlert": {
            "description": "No alert has this id (`unknown_alert`), or no such path (`not_found`).",
            "content": _json(_ref("Error"), {"unknown_alert": _error_example("unknown_alert",
                                                                             "no alert has id 17")}),
        },
    }


def _param(name: str, where: str, description: str, schema: dict, *, required: bool = False,
           example=None) -> dict:
    param = {"name": name, "in": where, "description": description, "schema": schema}
    if required or where == "path":
        param["required"] = True
    if example is not None:
        param["example"] = example
    return param


def _limit(bounds: tuple[int, int], what: str) -> dict:
    default, maximum = bounds
    return _param("limit", "query", f"{what} per page, at most {maximum}",
                  {"type": "integer", "minimum": 1, "maximum": maximum, "default": default})


def _query_op(tag_op: str, summary: str, description: str, params: list, ok: dict, errors: dict,
              method: str = "get") -> dict:
    own = {"200": ok, **errors, "503": {"$ref": "#/components/responses/StoreUnavailable"}}
    return {method: {"tags": ["query"], "summary": summary, "description": description, "operationId": tag_op,
                     "parameters": params, "responses": _with_common(own)}}


def _days(seconds: int) -> str:
    return f"{seconds // 3600} hours" if seconds < 86400 else f"{seconds // 86400} days"


def _query_paths() -> dict:
    device_id = {"type": "string", "pattern": DEVICE_ID_PATTERN, "minLength": 1, "maxLength": 64}
    device_path = _param("device_id", "path", "the device's identifier (not percent-decoded)", device_id,
                         example="device_1")
    time_schema = {"anyOf": [{"type": "string", "format": "date-time"},
                             {"type": "number", "minimum": 0, "exclusiveMaximum": query.TS_MAX}]}
    windows = ", ".join(f"`{w}` default {_days(query.DEFAULT_SPAN[w])}, at most {_days(query.MAX_SPAN[w])}"
                        for w in query.WINDOWS)
    alert_id = {"type": "integer", "minimum": 1, "maximum": query.MAX_ID}
    device_example = {"device_id": "device_1", "first_seen": "2025-09-23T11:18:41Z",
                      "last_seen": "2025-09-24T08:00:00Z", "last_values": {"temp_c": 21.5},
                      "tags": {"site": "AAL"}, "readings": 75600}
    alert_example = {"id": 17, "device_id": "device_1", "metric": "temp_c", "ts": "2025-09-24T07:59:12Z",
                     "value": 48.2, "zscore": 6.1, "mean": 21.4, "std": 4.39, "state": "acked",
                     "created": "2025-09-24T07:59:13Z", "acked": "2025-09-24T08:03:00Z"}
    general = ("unknown_parameter", "invalid_parameter", "invalid_limit")
    paths = {
        "/v1/devices": _query_op(
            "listDevices", "List devices",
            "The devices of the store in device id order, a page at a time: pass a page's `next` as `after` "
            "for the next one.",
            [_limit(query.DEVICES_LIMIT, "devices"),
             _param("after", "query", "the `next` of the previous page: devices after this id", device_id)],
            {"description": "A page of devices.",
             "content": _json(_ref("DeviceList"), {"page": {"value": {"devices": [device_example],
                                                                      "next": None}}})},
            {"400": _query_400(general + ("invalid_after",), "A parameter is invalid")}),
        "/v1/devices/{device_id}": _query_op(
            "getDevice", "One device", "First and last reading times, latest value of each metric, tags, "
                                       "readings stored.",
            [device_path],
            {"description": "The device.", "content": _json(_ref("Device"), {"device": {"value": device_example}})},
            {"400": _query_400(("invalid_device_id", "unknown_parameter"), "The device id is invalid"),
             "404": {"$ref": "#/components/responses/UnknownDevice"}}),
        "/v1/devices/{device_id}/metrics": _query_op(
            "getMetricSeries", "A metric's samples or rollups",
            "The samples of one metric of a device (`window=raw`) or their statistics per minute, hour "
            "or day (`1m`, `1h`, `1d`: count, min, max, mean, population std of the window), in time order. "
            "The range is [`from`, `to`): a raw sample, or a window whose start, is in it. `to` defaults "
            "to now and `from` to `to` minus the window's default span; the span is limited per window: "
            f"{windows}. More points than `limit`: the answer's `next` is the `from` of the next page. "
            "A known device without samples of the metric in the range answers an empty `points`; "
            "its metrics are the keys of its `last_values`.",
            [device_path,
             _param("metric", "query", "the metric's name (required)",
                    {"type": "string", "pattern": KEY_PATTERN, "maxLength": 32}, required=True, example="temp_c"),
             _param("window", "query", "raw samples or a rollup window",
                    {"type": "string", "enum": list(query.WINDOWS), "default": "raw"}),
             _param("from", "query", "start (included): RFC 3339 with a time zone (`+` needs no encoding) or "
                                     "Unix seconds", time_schema, example="2025-09-23T11:00:00Z"),
             _param("to", "query", "end (excluded), same forms; now when absent", time_schema,
                    example="2025-09-23T12:00:00Z"),
             _limit(query.POINTS_LIMIT, "points")],
            {"description": "The series (`RawSeries` for `raw`, `WindowSeries` for the others).",
             "content": _json({"oneOf": [_ref("RawSeries"), _ref("WindowSeries")]}, {
                 "raw": {"value": {"device_id": "device_1", "metric": "temp_c", "window": "raw",
                                   "from": "2025-09-23T11:00:00Z", "to": "2025-09-23T12:00:00Z",
                                   "points": [{"ts": "2025-09-23T11:00:00Z", "value": 21.5},
                                              {"ts": "2025-09-23T11:00:01Z", "value": 21.6}], "next": None}},
                 "1h": {"value": {"device_id": "device_1", "metric": "temp_c", "window": "1h",
                                  "from": "2025-09-23T00:00:00Z", "to": "2025-09-24T00:00:00Z",
                                  "points": [{"ts": "2025-09-23T00:00:00Z", "count": 3600, "min": 19.1,
                                              "max": 23.4, "mean": 21.2, "std": 0.8}], "next": None}}})},
            {"400": _query_400(("invalid_device_id", "missing_metric", "invalid_metric", "invalid_window",
                                "invalid_time", "invalid_range", "range_too_large") + general,
                               "The range or a parameter is invalid"),
             "404": {"$ref": "#/components/responses/UnknownDevice"}}),
        "/v1/alerts": _query_op(
            "listAlerts", "List alerts",
            "Alerts newest first (by id), optionally of one device and in one state, a page at a time: "
            "pass a page's `next` as `after` for the next one.",
            [_param("device_id", "query", "only this device's alerts", device_id),
             _param("state", "query", "only alerts in this state", {"type": "string", "enum": ["open", "acked"]}),
             _limit(query.ALERTS_LIMIT, "alerts"),
             _param("after", "query", "the `next` of the previous page: alerts older than this id", alert_id)],
            {"description": "A page of alerts.",
             "content": _json(_ref("AlertList"), {"page": {"value": {"alerts": [alert_example], "next": None}}})},
            {"400": _query_400(("invalid_device_id", "invalid_state", "invalid_after") + general,
                               "A parameter is invalid")}),
        "/v1/alerts/{alert_id}/ack": _query_op(
            "ackAlert", "Acknowledge an alert",
            "Sets the alert's state to `acked` and its `acked` time, and returns it. Idempotent: an alert "
            "already acknowledged is returned unchanged. The body is ignored, but the request must declare "
            "`Content-Type: application/json` (else 415): a plain HTML form on another site cannot, so a "
            "browser cannot be made to acknowledge alerts.",
            [_param("alert_id", "path", "the alert's id", alert_id, example=17)],
            {"description": "The alert, acknowledged.", "content": _json(_ref("Alert"), {
                "acked": {"value": alert_example}})},
            {"400": _query_400(("invalid_alert_id", "unknown_parameter"), "The alert id is invalid"),
             "404": {"$ref": "#/components/responses/UnknownAlert"},
             "415": {"$ref": "#/components/responses/UnsupportedMediaType"}},
            method="post"),
    }
    # Declared so that clients (and the Authorize'd Swagger UI) send Content-Type: application/json.
    paths["/v1/alerts/{alert_id}/ack"]["post"]["requestBody"] = {
        "required": False, "description": "Ignored; any JSON (`{}`).",
        "content": _json({"type": "object"}, {"empty": {"value": {}}})}
    return paths


def openapi_json(cfg=None) -> bytes:
    """The document as JSON bytes (2-space indent, trailing newline): deterministic."""
    return (json.dumps(build_openapi(cfg), indent=2, ensure_ascii=False) + "\n").encode()
