"""Answers sent before the request's body has arrived (413 over max_body_size,
400 for a bad chunk, 417, ...) are heard: the close lingers (gw_ext/worker/http.pyx),
reading and discarding what the client still sends, so common clients
(http.client, urllib, requests) uploading 5 MB see the answer and its JSON
body rather than a broken pipe or a reset. The lingering is bounded by
http_linger_bytes and http_linger_timeout (then a reset, counted)."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from conftest import HOST, client_tls_context, counter_delta, get_counter, wait_for
from http_client import HttpConn, ingest_body

MAX_BODY = 65536
UPLOAD = 5 << 20


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, listeners=("mqtt", "http", "https"), args=["--max-body-size", MAX_BODY])


@pytest.fixture(scope="module")
def tight(gw_module_factory):
    """Lingering bounded tightly: 256 KiB, 1 s."""
    return gw_module_factory(workers=1, listeners=("http",),
                             args=["--max-body-size", MAX_BODY, "--http-linger-bytes", 256 << 10,
                                   "--http-linger-timeout", "1"])


def url(server, path: str = "/v1/ingest/dev-big") -> str:
    return f"http://{HOST}:{server.ports['http']}{path}"


def assert_too_large(status: int, body: bytes) -> None:
    assert status == 413, (status, body[:200])
    doc = json.loads(body)
    assert doc["code"] == "body_too_large" and str(MAX_BODY) in doc["message"], doc


def test_http_client_uploading_5_mb_sees_the_413(server):
    before = server.counters()
    for _ in range(3):
        conn = http.client.HTTPConnection(HOST, server.ports["http"], timeout=20)
        try:
            conn.request("POST", "/v1/ingest/dev-big", body=b"x" * UPLOAD,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.getheader("Connection") == "close"
            assert_too_large(resp.status, resp.read())
        finally:
            conn.close()
    after = server.counters()
    assert counter_delta(before, after, "http_malformed") == 3
    assert counter_delta(before, after, "http_linger_cut") == 0


def test_https_upload_of_5_mb_sees_the_413(server):
    """The same over TLS: close_notify, then the lingering close."""
    ctx = client_tls_context(server.ca)
    conn = http.client.HTTPSConnection("localhost", server.ports["https"], timeout=20, context=ctx)
    try:
        conn.request("POST", "/v1/ingest/dev-big", body=b"x" * UPLOAD, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert_too_large(resp.status, resp.read())
    finally:
        conn.close()


def test_urllib_uploading_5_mb_sees_the_413(server):
    req = urllib.request.Request(url(server), data=b"x" * UPLOAD, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=20)
    assert_too_large(err.value.code, err.value.read())


def test_requests_uploading_5_mb_sees_the_413(server):
    requests = pytest.importorskip("requests")
    resp = requests.post(url(server), data=b"x" * UPLOAD, headers={"Content-Type": "application/json"}, timeout=20)
    assert_too_large(resp.status_code, resp.content)
    # A generator body goes chunked: refused once the de-chunked data passes the limit.
    resp = requests.post(url(server), data=(b"y" * 65536 for _ in range(UPLOAD // 65536)),
                         headers={"Content-Type": "application/json"}, timeout=20)
    assert_too_large(resp.status_code, resp.content)


@pytest.mark.parametrize("fragment", [65536, 1000], ids=["64KiB", "1000B"])
def test_raw_upload_in_pieces_then_the_answer_and_the_close(server, fragment):
    """The whole 5 MB goes through (read and discarded), then the 413 is read,
    then the server's FIN: a clean close."""
    c = HttpConn(server.ports["http"], timeout=20)
    try:
        c.send(b"POST /v1/ingest/dev-big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % UPLOAD)
        payload = b"z" * fragment
        sent = 0
        while sent < (UPLOAD if fragment > 1000 else 1 << 20):
            c.send(payload)
            sent += fragment
        resp = c.read_response()
        assert_too_large(resp.status, resp.body)
        assert c.wait_closed() == b""
    finally:
        c.close()


@pytest.mark.parametrize("fragment", [0, 4096], ids=["whole", "4KiB"])
def test_bad_chunk_mid_upload_is_heard(server, fragment):
    """A malformed chunk after some good ones, with 2 MB more behind it: the 400
    reaches the client."""
    raw = (b"POST /v1/ingest/dev-big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + b"10\r\n" + b"a" * 16 + b"\r\n" + b"zz\r\n" + b"q" * (2 << 20))
    c = HttpConn(server.ports["http"], timeout=20)
    try:
        step = fragment or len(raw)
        for i in range(0, len(raw), step):
            c.send(raw[i:i + step])
        resp = c.read_response()
        assert resp.status == 400 and resp.json()["code"] == "bad_chunk", resp
        assert c.wait_closed() == b""
    finally:
        c.close()


def test_expect_100_continue_over_the_limit_gets_the_413_first(server):
    """With Expect: 100-continue the client waits: the 413 comes instead of 100."""
    c = HttpConn(server.ports["http"])
    try:
        c.send(b"POST /v1/ingest/dev-big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % UPLOAD)
        resp = c.read_response()
        assert_too_large(resp.status, resp.body)
        assert c.wait_closed() == b""
    finally:
        c.close()


def test_other_answers_are_not_early(server):
    """415 and the app's 400 are given once the whole body is read: the
    connection stays open for the next request."""
    c = HttpConn(server.ports["http"])
    try:
        body = b"x" * (MAX_BODY - 1)
        resp = c.request("POST", "/v1/ingest/dev-big", body, content_type="text/plain")
        assert resp.status == 415 and resp.json()["code"] == "unsupported_media_type"
        assert "connection" not in resp.headers
        resp = c.request("POST", "/v1/ingest/dev-big", body)
        assert resp.status == 400
        resp = c.request("POST", "/v1/ingest/dev-big", ingest_body(seq=1))
        assert resp.status == 202
    finally:
        c.close()


def test_lingering_is_bounded_in_bytes(tight):
    """A client that goes on sending past http_linger_bytes gets a reset, counted."""
    before = tight.counters()
    c = HttpConn(tight.ports["http"], timeout=20)
    try:
        c.send(b"POST /v1/ingest/dev-big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % (64 << 20))
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(1024):           # 64 MiB at most
                c.send(b"z" * 65536)
    finally:
        c.close()
    counters = tight.wait_counter("http_linger_cut", get_counter(before, "http_linger_cut") + 1)
    assert counter_delta(before, counters, "http_malformed") == 1


def test_lingering_is_bounded_in_time(tight):
    """A client trickling bytes after its answer, never closing: closed after
    http_linger_timeout (1 s here), counted."""
    before = tight.counters()
    c = HttpConn(tight.ports["http"], timeout=20)
    try:
        c.send(b"POST /v1/ingest/dev-big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % (64 << 20))
        resp = c.read_response()
        assert_too_large(resp.status, resp.body)
        start = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while time.monotonic() - start < 20:
                c.send(b"z" * 100)
                time.sleep(0.05)
    finally:
        c.close()
    counters = tight.wait_counter("http_linger_cut", get_counter(before, "http_linger_cut") + 1)
    wait_for(lambda: get_counter(tight.counters(), "conns_current") == 0, 10, what="the connection closed")
    assert counter_delta(before, counters, "http_malformed") == 1


def test_a_client_that_closes_ends_the_lingering(tight):
    """The usual case: the client reads the answer and closes; nothing is cut."""
    before = tight.counters()
    for _ in range(5):
        with socket.create_connection((HOST, tight.ports["http"]), timeout=10) as s:
            s.sendall(b"POST /v1/ingest/d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
            s.sendall(b"z" * 10000)
            got = b""
            while chunk := s.recv(65536):       # the answer, then the server's FIN
                got += chunk
            assert got.startswith(b"HTTP/1.1 413 "), got
    wait_for(lambda: get_counter(tight.counters(), "conns_current") == 0, 10, what="the connections closed")
    after = tight.counters()
    assert counter_delta(before, after, "http_linger_cut") == 0
    assert counter_delta(before, after, "closed_client") == 5
