"""Every length of an HTTP request is bounded by the framing (gw_ext/worker/http.pyx),
against `gw serve` with real sockets, each request sent whole and in small
fragments: a chunk-size line (whether its CRLF has arrived or not), a chunk's
size and extensions, the framing of a chunked body (tiny chunks with long
extensions), the trailer section, Content-Length. Refused requests get a
JSON error, are counted, and the connection closes; nothing else is
affected."""

from __future__ import annotations

import pytest

from conftest import counter_delta
from http_client import HttpConn, ingest_body

MAX_BODY = 4096
CHUNK_FRAMING = 65536           # the framing always allowed (HTTP_MIN_CHUNK_FRAMING)
HEAD = (b"POST /v1/ingest/dev-chunk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")


@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, listeners=("mqtt", "http"),
                             args=["--max-body-size", MAX_BODY, "--http-timeout", "5"])


@pytest.fixture
def http(server):
    conns = []

    def connect() -> HttpConn:
        c = HttpConn(server.ports["http"])
        conns.append(c)
        return c

    yield connect
    for c in conns:
        c.close()


def send(c: HttpConn, raw: bytes, fragment: int) -> None:
    """All of raw, whole or `fragment` bytes at a time; stops quietly if the server
    reset the connection (it answered and gave up reading)."""
    step = fragment or len(raw)
    try:
        for i in range(0, len(raw), step):
            c.send(raw[i:i + step])
    except (BrokenPipeError, ConnectionResetError):
        pass


def refused(server, http, raw: bytes, fragment: int, status: int, code: str, message: str = "") -> None:
    before = server.counters()
    c = http()
    send(c, raw, fragment)
    resp = c.read_response()
    assert resp.status == status, (resp.status, resp.body)
    body = resp.json()
    assert body["code"] == code and message in body["message"], body
    assert resp.headers["connection"] == "close"
    c.wait_closed()
    assert counter_delta(before, server.counters(), "http_malformed") == 1
    assert http().request("GET", "/readyz").status == 200


FRAGMENTS = pytest.mark.parametrize("fragment", [0, 5, 1000], ids=["whole", "5B", "1000B"])


@FRAGMENTS
def test_chunk_size_line_over_the_limit_with_its_crlf(server, http, fragment):
    """`1;<4 KiB extension>\\r\\nX\\r\\n` over and over: refused at the first line,
    whether or not its CRLF arrived with it."""
    chunk = b"1;" + b"e" * 4096 + b"\r\nX\r\n"
    refused(server, http, HEAD + chunk * 50, fragment, 400, "bad_chunk", "chunk-size line longer than 1024")


@FRAGMENTS
def test_chunk_framing_is_bounded(server, http, fragment):
    """Chunks of one byte with 1,000-byte extensions (each line under the limit):
    the encoded body stops at max_body_size of data plus its framing allowance."""
    chunk = b"1;" + b"e" * 1000 + b"\r\nX\r\n"
    count = (MAX_BODY + CHUNK_FRAMING) // len(chunk) + 20         # well past the bound, under max_body of data
    assert count < MAX_BODY
    refused(server, http, HEAD + chunk * count, fragment, 413, "body_too_large", "framing")


@FRAGMENTS
def test_trailer_section_is_bounded(server, http, fragment):
    trailer = b"X-Trailer: " + b"t" * 20000 + b"\r\n"
    refused(server, http, HEAD + b"0\r\n" + trailer + b"\r\n", fragment, 431, "header_too_large", "trailer")


@pytest.mark.parametrize("line, message", [
    (b"5 6", "malformed chunk size"),             # whitespace, then not an extension
    (b"5;a\nb", "control character"),            # a bare LF in an extension
    (b"5;a\x00b", "control character"),
    (b";5", "malformed chunk size"),
    (b"0x5", "malformed chunk size"),
], ids=["two-numbers", "bare-lf", "nul", "no-digits", "0x"])
@pytest.mark.parametrize("fragment", [0, 3], ids=["whole", "3B"])
def test_malformed_chunk_lines(server, http, line, message, fragment):
    refused(server, http, HEAD + line + b"\r\nhello\r\n0\r\n\r\n", fragment, 400, "bad_chunk", message)


@pytest.mark.parametrize("fragment", [0, 3], ids=["whole", "3B"])
def test_chunk_size_over_eight_significant_digits(server, http, fragment):
    refused(server, http, HEAD + b"100000000\r\n", fragment, 413, "body_too_large")


@FRAGMENTS
def test_valid_chunked_bodies_are_taken(server, http, fragment):
    """Leading zeros, whitespace and extensions around the size, a trailer, and
    a body at max_body_size in one-byte chunks (framing within its allowance)."""
    body = ingest_body(seq=fragment + 1)
    raw = HEAD + b"".join(b"%010x \t;name=value;x\r\n%s\r\n" % (len(body[i:i + 9]), body[i:i + 9])
                          for i in range(0, len(body), 9)) + b"0\r\nX-Trailer: 1\r\n\r\n"
    c = http()
    send(c, raw, fragment)
    resp = c.read_response()
    assert resp.status == 202, resp
    padded = body + b" " * (MAX_BODY - len(body))
    send(c, HEAD + b"".join(b"1\r\n%s\r\n" % padded[i:i + 1] for i in range(MAX_BODY)) + b"0\r\n\r\n", fragment)
    resp = c.read_response()
    assert resp.status == 202, resp         # JSON with trailing spaces, exactly max_body_size bytes


@pytest.mark.parametrize("value, status, code", [
    (b"99999999999999999999", 400, "bad_content_length"),   # over 15 digits: never parsed into a number
    (b"999999999999999", 413, "body_too_large"),
    (b"1e3", 400, "bad_content_length"),
    (b"+5", 400, "bad_content_length"),
    (b"5, 5", 400, "bad_content_length"),
    (b"", 400, "bad_content_length"),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_content_length_is_checked_before_use(server, http, value, status, code):
    raw = (b"POST /v1/ingest/dev HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + value + b"\r\n\r\n")
    for fragment in (0, 4):
        refused(server, http, raw, fragment, status, code)


@pytest.mark.parametrize("fragment", [1, 7, 1000], ids=["1B", "7B", "1000B"])
def test_a_body_in_pieces_then_pipelined_requests(http, fragment):
    """A Content-Length body arriving in many pieces (its length known, the head
    is not parsed again for each one), then two requests behind it."""
    body = ingest_body(seq=100 + fragment, metrics={f"m{i}": i for i in range(30)})
    raw = (b"POST /v1/ingest/dev-pieces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body)) * 2 + b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
    c = http()
    send(c, raw, fragment)
    assert [c.read_response().status for _ in range(3)] == [202, 202, 200]
