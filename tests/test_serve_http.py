"""The HTTP/1.1 listener's framing (gw_ext/worker/http.pyx) on real sockets
against `gw serve --workers 2`: keep-alive, pipelining, chunked bodies,
100-continue, and every way a request can be refused by the framing itself
(RFC 9112): a JSON error body, the connection closed, a counter, and nothing
else affected."""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import HOST, counter_delta, mqtt_client, publish_packet, read_packet
from http_client import HttpConn, ingest_body

MAX_BODY = 4096


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, args=["--max-body-size", MAX_BODY, "--http-timeout", "1",
                                              "--http-keepalive-timeout", "2"])


@pytest.fixture
def http(server):
    conns = []

    def connect(**kw) -> HttpConn:
        c = HttpConn(server.ports["http"], **kw)
        conns.append(c)
        return c

    yield connect
    for c in conns:
        c.close()


def assert_error(resp, status: int, code: str | None = None):
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) >= {"code", "message"} and body["message"], body
    if code is not None:
        assert body["code"] == code, body


def test_keep_alive_serves_many_requests_on_one_connection(http):
    """RFC 9112 9.3: HTTP/1.1 connections persist unless `Connection: close`."""
    c = http()
    for i in range(5):
        resp = c.request("POST", "/v1/ingest/dev-ka", ingest_body(seq=i))
        assert resp.status == 202, resp.body
        assert "connection" not in resp.headers
        assert resp.headers["date"].endswith("GMT")
    resp = c.request("GET", "/readyz", headers={"Connection": "close"})
    assert resp.status == 200
    assert resp.headers["connection"] == "close"
    assert c.wait_closed() == b""


def test_http_1_0_closes_unless_keep_alive_asked(http):
    c = http()
    c.send(b"GET /readyz HTTP/1.0\r\n\r\n")
    assert c.read_response().status == 200
    assert c.wait_closed() == b""
    c = http()
    c.send(b"GET /readyz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    resp = c.read_response()
    assert resp.status == 200 and resp.headers["connection"] == "keep-alive"
    c.send(b"GET /readyz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert c.read_response().status == 200


def test_pipelined_requests_are_answered_in_order(http):
    """RFC 9112 9.3.2: responses in the order of the requests, here all in one segment."""
    c = http()
    reqs = []
    for i in range(20):
        body = ingest_body(seq=i) if i % 3 else b"{not json"
        reqs.append(b"POST /v1/ingest/dev-pipe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    reqs.append(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    c.send(b"".join(reqs))
    statuses = [c.read_response().status for _ in range(21)]
    assert statuses == [400 if i % 3 == 0 else 202 for i in range(20)] + [404]


def test_request_split_across_many_segments(http):
    c = http()
    body = ingest_body(seq=1)
    raw = (b"POST /v1/ingest/dev-split HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    for i in range(len(raw)):
        c.send(raw[i:i + 1])
    assert c.read_response().status == 202


def test_chunked_body(http):
    c = http()
    body = ingest_body(seq=7)
    chunks = [body[i:i + 5] for i in range(0, len(body), 5)]
    raw = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(ch), ch) for ch in chunks) + b"0\r\nX-Trailer: 1\r\n\r\n"
    c.send(b"POST /v1/ingest/dev-chunk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + raw)
    assert c.read_response().status == 202
    c.send(b"POST /v1/ingest/dev-chunk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert c.read_response().status == 202


def test_expect_100_continue(http):
    c = http()
    body = ingest_body(seq=3)
    c.send(b"POST /v1/ingest/dev-cont HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert c.read_response().status == 100
    c.send(body)
    assert c.read_response().status == 202


@pytest.mark.parametrize("raw, status, code", [
    (b"GARBAGE\r\n\r\n", 400, "bad_request_line"),
    (b"GET  /readyz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_line"),
    (b"GET readyz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_line"),
    (b"GET /readyz HTTP/1.1\r\n\r\n", 400, "bad_host"),
    (b"GET /readyz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_host"),
    (b"GET /readyz HTTP/1.1\r\nHost : x\r\n\r\n", 400, "bad_header"),
    (b"GET /readyz HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400, "bad_header"),
    (b"GET /readyz HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400, "bad_header"),
    (b"GET /readyz HTTP/1.1\r\nHost: x\x01y\r\n\r\n", 400, "bad_header"),
    (b"GET /readyz HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    (b"GET /readyz HTTX/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_line"),
    (b"POST /v1/ingest/d HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400,
     "bad_content_length"),
    (b"POST /v1/ingest/d HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400, "bad_content_length"),
    (b"POST /v1/ingest/d HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
     400, "bad_framing"),
    (b"POST /v1/ingest/d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
     "unsupported_transfer_coding"),
    (b"POST /v1/ingest/d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "bad_chunk"),
    (b"POST /v1/ingest/d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", 400,
     "bad_chunk"),
    (b"POST /v1/ingest/d HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n{}", 417,
     "expectation_failed"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_requests_get_a_json_error_and_the_connection_closes(server, http, raw, status, code):
    before = server.counters()
    c = http()
    c.send(raw)
    resp = c.read_response()
    assert_error(resp, status, code)
    assert resp.headers["connection"] == "close"
    assert c.wait_closed() == b""
    after = server.counters()
    assert counter_delta(before, after, "http_malformed") == 1
    # Nothing else is affected: a new connection is served.
    assert http().request("GET", "/readyz").status == 200


def test_header_flood_and_oversized_head_get_431(server, http):
    c = http()
    c.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n")
    assert_error(c.read_response(), 431, "too_many_headers")
    assert c.wait_closed() == b""
    c = http()
    # No end of head in sight: refused once it passes the limit, without waiting for the rest.
    c.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000)
    assert_error(c.read_response(), 431, "header_too_large")
    assert c.wait_closed() == b""


def test_body_over_the_limit_gets_413(server, http):
    """Declared too large: answered before the body is sent. Chunked: once the
    de-chunked size passes max_body_size."""
    before = server.counters()
    c = http()
    c.send(b"POST /v1/ingest/dev HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    assert_error(c.read_response(), 413, "body_too_large")
    assert c.wait_closed() == b""
    c = http()
    c.send(b"POST /v1/ingest/dev HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * 1000
    for _ in range(5):
        try:
            c.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            break
    assert_error(c.read_response(), 413, "body_too_large")
    assert c.wait_closed() == b""
    c = http()
    c.send(b"POST /v1/ingest/dev HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffff\r\n")
    assert_error(c.read_response(), 413, "body_too_large")
    after = server.counters()
    assert counter_delta(before, after, "http_malformed") == 3
    # A body just at the limit is read (and judged by the app: not JSON here).
    c = http()
    resp = c.request("POST", "/v1/ingest/dev", b" " * MAX_BODY)
    assert_error(resp, 400)


def test_slowloris_gets_408_after_http_timeout(server, http):
    """A request begun and never finished (one header byte a while) is cut off
    http_timeout (1 s here) after it began, however it trickles."""
    before = server.counters()
    c = http()
    c.send(b"POST /v1/ingest/dev HTTP/1.1\r\nHost: x\r\n")
    got = b""
    start = time.monotonic()
    try:
        for _ in range(40):
            time.sleep(0.1)
            c.send(b"X")
    except (BrokenPipeError, ConnectionResetError):
        pass
    got = c.wait_closed(5)
    elapsed = time.monotonic() - start
    assert got.startswith(b"HTTP/1.1 408 "), got[:100]
    assert b'"request_timeout"' in got
    assert elapsed < 4.5          # cut off well before the 4 s of trickling ended
    assert counter_delta(before, server.counters(), "http_timeouts") == 1
    # A body that never finishes gets the same.
    c = http()
    c.send(b"POST /v1/ingest/dev HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 100\r\n\r\n{\"metr")
    assert c.wait_closed(5).startswith(b"HTTP/1.1 408 ")


def test_idle_keep_alive_connection_is_closed(server, http):
    before = server.counters()
    c = http()
    assert c.request("GET", "/readyz").status == 200
    assert c.wait_closed(6) == b""          # http_keepalive_timeout is 2 s here
    assert counter_delta(before, server.counters(), "http_timeouts") == 1


def test_http_abuse_does_not_affect_mqtt_clients(server, http):
    """Malformed, oversized and slow HTTP requests on both workers while an MQTT
    client publishes: it is served throughout."""
    with mqtt_client(server.ports["mqtt"], "bystander") as mq:
        for i in range(10):
            c = http()
            c.send([b"GARBAGE\r\n\r\n", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
                    b"GET /readyz HTTP/1.1\r\nHost: x\r\n"][i % 3])
            mq.sendall(publish_packet("bystander/t", b"x", qos=1, packet_id=i + 1))
            assert read_packet(mq) == (0x40, bytes([0, i + 1]))


def test_head_request_has_no_body(http):
    c = http()
    c.send(b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = c.read_response(head_only=True)
    assert head.body == b""
    assert c.read_response().status == 200


def test_https_listener_serves_the_same_api(server):
    import ssl
    ctx = ssl.create_default_context(cafile=str(server.ca))
    with HttpConn(server.ports["https"], tls_context=ctx) as c:
        assert c.request("GET", "/readyz").status == 200
        assert c.request("POST", "/v1/ingest/dev-tls", ingest_body(seq=1)).status == 202
