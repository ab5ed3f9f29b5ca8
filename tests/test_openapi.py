"""The OpenAPI document (gw/openapi.py), /docs, and `gw openapi`: a valid 3.1
document, deterministic, listing every route and every status the app answers
on it, with response schemas the app's real answers validate against."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import gw_env
from gw import http_api
from gw.openapi import build_openapi, openapi_json

from test_http_app import BODY, App, cfg, close_apps  # noqa: F401 (close_apps: an autouse fixture)

REPO = Path(__file__).resolve().parent.parent
SPEC = build_openapi(cfg())


def test_spec_is_valid_openapi_3_1():
    validator = pytest.importorskip("openapi_spec_validator")
    assert SPEC["openapi"].startswith("3.1")
    validator.validate(SPEC)


def test_spec_is_deterministic():
    assert openapi_json(cfg()) == openapi_json(cfg())
    outputs = set()
    for seed in ("1", "2"):
        env = dict(gw_env(), PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, "-c", "import sys; from gw.openapi import openapi_json; "
                              "sys.stdout.buffer.write(openapi_json())"], env=env, capture_output=True,
                             timeout=60, check=True)
        outputs.add(run.stdout)
    assert outputs == {openapi_json(None)}


def test_spec_reflects_settings():
    spec = build_openapi(cfg(max_batch=7, telemetry_topic="t/x", ack="sink", max_body_size=4096))
    batch = spec["paths"]["/v1/ingest"]["post"]
    assert "1 to 7 records" in batch["description"]
    # Over max_batch is 413, not a schema violation (which schemathesis expects to be a 400).
    assert "maxItems" not in batch["requestBody"]["content"]["application/json"]["schema"]
    single = spec["paths"]["/v1/ingest/{device_id}"]["post"]["requestBody"]["content"]["application/json"]
    body = spec["components"]["schemas"]["IngestBody"]
    assert single["schema"] == {"$ref": "#/components/schemas/IngestBody"}
    assert "device_id" not in body["properties"] and body["additionalProperties"] is False
    assert "`t/x/{device_id}`" in batch["description"]
    assert "4096 bytes" in spec["components"]["responses"]["ContentTooLarge"]["description"]
    assert "`sink`" in spec["info"]["description"]


def test_schemas_from_msgspec_types():
    schemas = SPEC["components"]["schemas"]
    assert {"Record", "BatchRecord", "Telemetry", "Error", "BatchError", "ItemError", "IngestAck", "BatchAck",
            "Health", "Ready"} <= set(schemas)
    record = schemas["Record"]
    assert record["required"] == ["metrics"] and record["additionalProperties"] is False
    assert record["properties"]["metrics"]["maxProperties"] == 32
    assert record["properties"]["metrics"]["propertyNames"]["pattern"] == "^[a-z][a-z0-9_]{0,31}$"
    assert schemas["BatchRecord"]["required"] == ["device_id", "metrics"]
    assert all("\n    " not in s.get("description", "") for s in schemas.values())


# --- every route, every status -------------------------------------------------------------------

ONE = b'{"device_id":"d","metrics":{}}'
SCENARIOS = [   # (method, target, content type, body, app set-up) -> the documented path
    ("POST", "/v1/ingest/d", b"application/json", BODY, None),
    ("POST", "/v1/ingest/d", b"application/json", b'{"metrics":{"a":1e999}}', None),
    ("POST", "/v1/ingest/bad id", b"application/json", BODY, None),
    ("POST", "/v1/ingest/d", b"text/plain", BODY, None),
    ("POST", "/v1/ingest/d", b"application/json", BODY, "draining"),
    ("POST", "/v1/ingest/d", b"application/json", BODY, "shedding"),
    ("POST", "/v1/ingest/d", b"application/json", BODY, "sink"),
    ("POST", "/v1/ingest/d", b"application/json", BODY, "ingest_fails"),
    ("GET", "/v1/ingest/d", None, b"", None),
    ("POST", "/v1/ingest", b"application/json", b"[" + ONE + b"]", None),
    ("POST", "/v1/ingest", b"application/json", b"[" + ONE + b"]", "sink"),
    ("POST", "/v1/ingest", b"application/json", b'[{"metrics":{}}]', None),
    ("POST", "/v1/ingest", b"application/json", b"[]", None),
    ("POST", "/v1/ingest", b"application/json", b"[" + b",".join([ONE] * 1001) + b"]", None),
    ("POST", "/v1/ingest", None, b"[" + ONE + b"]", None),
    ("POST", "/v1/ingest", b"application/json", b"[" + ONE + b"]", "draining"),
    ("DELETE", "/v1/ingest", None, b"", None),
    ("GET", "/healthz", None, b"", None),
    ("GET", "/healthz", None, b"", "unhealthy"),
    ("POST", "/healthz", None, b"", None),
    ("GET", "/readyz", None, b"", None),
    ("GET", "/readyz", None, b"", "draining"),
    ("PUT", "/readyz", None, b"", None),
    ("GET", "/metrics", None, b"", None),
    ("POST", "/metrics", None, b"", None),
    ("GET", "/docs", None, b"", None),
    ("GET", "/docs/openapi.json", None, b"", None),
    ("GET", "/docs/swagger-ui-bundle.js", None, b"", None),
    ("GET", "/docs/swagger-ui.css", None, b"", None),
    ("POST", "/docs", None, b"", None),
    ("GET", "/", None, b"", None),
    ("GET", "/dashboard/app.js", None, b"", None),
    ("GET", "/dashboard/vendor/mqtt.min.js", None, b"", None),
    ("GET", "/dashboard/vendor/uPlot.min.css", None, b"", None),
    ("POST", "/", None, b"", None),
    ("GET", "/v1/dashboard", None, b"", None),
    ("GET", "/v1/stats/series", None, b"", None),
    ("GET", "/v1/stats/series?after=x", None, b"", None),
    ("GET", "/v1/stats/series", None, b"", "series"),
    ("GET", "/v1/stats/series?after=3", None, b"", "series"),
]


def template_of(path: str) -> str:
    path = path.split("?")[0]
    return "/v1/ingest/{device_id}" if path.startswith("/v1/ingest/") else path


def app_for(setup):
    a = App(cfg(ack="sink") if setup == "sink" else cfg())
    if setup == "draining":
        a.app.draining = True
    elif setup == "shedding":
        a.app.shedding = True
    elif setup == "unhealthy":
        a.health_answer = (False, {"data_dir": {"ok": False}})
    elif setup == "ingest_fails":
        a.app.ingest.one = lambda *args: 1 / 0
    elif setup == "series":
        a.app.stats_series = stats_series_of_a_master()
    return a


def stats_series_of_a_master():
    """The answer of /v1/stats/series as a worker has it: a real ring a recorder wrote five points into."""
    import os
    from gw.series import SeriesRecorder, SeriesRing, series_answer
    from gw.stats import StatsBlock
    block = StatsBlock.create(2, os.getpid())
    ring = SeriesRing.create(2, capacity=4)
    recorder = SeriesRecorder(block, ring)
    for _ in range(5):
        recorder.tick()
    answer = series_answer(ring, block, -1)
    block.close(unlink=True)
    return lambda after: answer


def resolve(obj: dict) -> dict:
    while "$ref" in obj:
        node = SPEC
        for part in obj["$ref"].lstrip("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def schema_validator(schema: dict):
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft202012Validator({**schema, "components": SPEC["components"]})


@pytest.mark.parametrize("method, path, ctype, body, setup", SCENARIOS,
                         ids=[f"{m} {p} {s or ''}{len(b)}" for m, p, _, b, s in SCENARIOS])
def test_every_answer_is_documented(method, path, ctype, body, setup):
    a = app_for(setup)
    status, rtype, rbody, extra = a(method.encode(), path.encode(), body, ctype)
    item = SPEC["paths"][template_of(path)]
    op = item.get(method.lower())
    if op is None:       # the method is not served: 405 must be documented on the path's operation
        assert status == 405
        op = next(iter(item.values()))
    response = resolve(op["responses"][str(status)])
    media = rtype.decode().split(";")[0]
    content = response["content"]
    assert any(media == m.split(";")[0] for m in content), (status, media, list(content))
    for header in re.findall(rb"^([A-Za-z-]+):", extra, re.M):
        assert header.decode() in response.get("headers", {}), (status, header)
    if media == "application/json":
        schema = next(v["schema"] for m, v in content.items() if m.startswith("application/json"))
        schema_validator(schema).validate(json.loads(rbody))


def test_every_route_is_documented_and_nothing_else():
    app = App()
    documented = set(SPEC["paths"])
    assert documented == {"/v1/ingest/{device_id}", "/v1/ingest", "/healthz", "/readyz", "/metrics", "/docs",
                          "/docs/openapi.json", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css",
                          "/v1/devices", "/v1/devices/{device_id}", "/v1/devices/{device_id}/metrics",
                          "/v1/alerts", "/v1/alerts/{alert_id}/ack", "/", "/dashboard/app.js", "/dashboard/app.css",
                          "/dashboard/vendor/mqtt.min.js", "/dashboard/vendor/uPlot.iife.min.js",
                          "/dashboard/vendor/uPlot.min.css", "/v1/dashboard", "/v1/stats/series"}
    assert len(documented) == 22
    routed = {p.decode() for p in app.app._gets} - {"/docs/", "/docs/index.html", "/index.html", "/dashboard",
                                                     "/dashboard/"}
    assert (routed | {"/v1/ingest/{device_id}", "/v1/ingest", "/v1/stats/series"} | set(http_api.QUERY_PATHS)
            == documented)
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            assert {"400", "405", "408", "413", "431", "500"} <= codes, (path, method)
            if path.startswith("/v1/ingest"):
                assert {"200", "202", "400", "413", "415", "503"} <= codes
            assert op["operationId"]


def test_examples_match_their_schemas():
    for path, item in SPEC["paths"].items():
        for op in item.values():
            body = op.get("requestBody")
            if body:
                media = body["content"]["application/json"]
                for example in media["examples"].values():
                    schema_validator(media["schema"]).validate(example["value"])
            for response in op["responses"].values():
                for media_type, media in resolve(response).get("content", {}).items():
                    for example in media.get("examples", {}).values():
                        schema_validator(media["schema"]).validate(example["value"])


def test_request_examples_are_accepted_by_the_app():
    app = App()
    single = SPEC["paths"]["/v1/ingest/{device_id}"]["post"]["requestBody"]["content"]["application/json"]
    for example in single["examples"].values():
        assert app.post(b"/v1/ingest/device_1", json.dumps(example["value"]).encode())[0] == 202
    batch = SPEC["paths"]["/v1/ingest"]["post"]["requestBody"]["content"]["application/json"]
    for example in batch["examples"].values():
        assert app.post(b"/v1/ingest", json.dumps(example["value"]).encode())[0] == 202


def test_published_telemetry_matches_its_schema():
    app = App()
    app.post(b"/v1/ingest/device_1")
    schema_validator({"$ref": "#/components/schemas/Telemetry"}).validate(json.loads(app.published[0][1]))


# --- /docs --------------------------------------------------------------------------------------

def test_docs_served():
    app = App()
    status, ctype, html, extra = app(b"GET", b"/docs")
    assert (status, ctype) == (200, b"text/html; charset=utf-8") and b"Cache-Control: no-cache" in extra
    assert app(b"GET", b"/docs/") == (status, ctype, html, extra)
    for ref in (b'href="/docs/swagger-ui.css"', b'src="/docs/swagger-ui-bundle.js"', b'url: "/docs/openapi.json"',
                b"validatorUrl: null"):
        assert ref in html
    assert not re.search(rb"(src|href)=\"https?:", html)     # nothing from outside: works offline
    status, ctype, spec, extra = app(b"GET", b"/docs/openapi.json")
    assert (status, ctype) == (200, b"application/json") and spec == openapi_json(app.app.cfg)
    js = app(b"GET", b"/docs/swagger-ui-bundle.js")
    css = app(b"GET", b"/docs/swagger-ui.css")
    assert js[:2] == (200, b"text/javascript; charset=utf-8") and b"SwaggerUIBundle" in js[2]
    assert css[:2] == (200, b"text/css; charset=utf-8") and b".swagger-ui" in css[2]
    for answer in (js, css):
        assert b"Cache-Control: public, max-age=86400\r\n" in answer[3]
        assert b"X-Content-Type-Options: nosniff\r\n" in answer[3]
    assert app(b"HEAD", b"/docs/swagger-ui.css")[0] == 200


def test_docs_spec_follows_reload():
    app = App()
    first = app(b"GET", b"/docs/openapi.json")[2]
    app.app.cfg = cfg(max_batch=5)
    second = app(b"GET", b"/docs/openapi.json")[2]
    assert first != second and "1 to 5 records" in json.loads(second)["paths"]["/v1/ingest"]["post"][
        "description"]


def test_vendored_files_present():
    docs = REPO / "gw" / "docs"
    for name in ("index.html", "swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "NOTICE"):
        assert (docs / name).is_file(), name
    assert "Apache License" in (docs / "LICENSE").read_text()


def test_missing_asset_is_a_json_404(monkeypatch):
    monkeypatch.setitem(http_api._ASSET_CACHE, "swagger-ui.css", None)
    answer = App()(b"GET", b"/docs/swagger-ui.css")
    assert answer[0] == 404 and json.loads(answer[2])["code"] == "not_found"


# --- gw openapi ------------------------------------------------------------------------------

def test_cli_openapi(tmp_path):
    from click.testing import CliRunner

    from gw.cli import main_group
    from gw.config import load_config

    runner = CliRunner()
    result = runner.invoke(main_group, ["openapi"])
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == openapi_json(load_config())
    out = tmp_path / "spec.json"
    result = runner.invoke(main_group, ["openapi", "--output", str(out)])
    assert result.exit_code == 0 and result.output == ""
    assert out.read_bytes() == openapi_json(load_config())
    conf = tmp_path / "gw.toml"
    conf.write_text("max_batch = 9\n")
    result = runner.invoke(main_group, ["openapi", "--config", str(conf)])
    assert "1 to 9 records" in json.loads(result.stdout_bytes)["paths"]["/v1/ingest"]["post"]["description"]


def test_settings_defaults_are_the_configs():
    from dataclasses import fields

    from gw.config import Config
    for f in fields(Config):       # a config object without the key: gw/config.py's default, the only one
        assert http_api.setting(SimpleNamespace(), f.name) == getattr(Config(), f.name), f.name
    assert http_api.setting(None, "max_batch") == Config().max_batch
    assert http_api.setting(SimpleNamespace(max_batch=7), "max_batch") == 7
