"""The query API's store queries run in each worker's query threads, not in its
event loop (gw/query_pool.py, gw_ext/worker/http_queries.pyx): against `gw serve --workers 1`
on a store filled beforehand, with real sockets. Answers keep their order on a
pipelined connection (behind answers held for the log in ack mode sink, and
over TLS), a client that closes while its query runs leaves nothing behind
(nor gets its answer on a reused descriptor), and the bound on waiting queries
answers 503 with Retry-After, counted.

Slow queries are made certain, not timed: while the test holds the store's
write lock, acknowledging an alert (POST /v1/alerts/{id}/ack) waits its whole
busy timeout in a query thread, then answers 503 `store_busy`."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import struct
import time

import psutil
import pytest

from conftest import client_tls_context, counter_delta, get_counter, mqtt_client, ping, wait_for
from http_client import HttpConn, ingest_body
from test_query_api import Store


def fill_store(data_dir) -> list[int]:
    """A store with one device and a few open alerts; their ids."""
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(data_dir)
    now = time.time()
    store.readings([("dev1", now - 60 + i, {"temp_c": 20.0 + i}, {"site": "AAL"}) for i in range(10)])
    ids = [store.alert("dev1", "temp_c", now - 30 + i) for i in range(20)]
    store.close()
    return ids


@contextlib.contextmanager
def store_locked(data_dir):
    """Holds the store's write lock: an acknowledgement waits for it, in a query thread."""
    db = sqlite3.connect(data_dir / "store.sqlite", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gw_module_factory):
    data_dir = tmp_path_factory.mktemp("queries") / "data"
    ids = fill_store(data_dir)
    server = gw_module_factory(workers=1, listeners=("mqtt", "http", "https"), data_dir=data_dir,
                               args=["--ack-http", "sink", "--ack-https", "enqueue"])
    return server, data_dir, ids


@pytest.fixture
def http(setup):
    server = setup[0]
    conns = []

    def connect(tls: bool = False) -> HttpConn:
        c = HttpConn(server.ports["https" if tls else "http"],
                     tls_context=client_tls_context(server.ca) if tls else None)
        conns.append(c)
        return c

    yield connect
    for c in conns:
        c.close()


def request(method: str, target: str, body: bytes | None = None) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def pipelined(alert_id: int, seq: int) -> tuple[bytes, list]:
    """Slow queries between fast requests; what each answer must be, in order."""
    reqs = [
        (request("POST", f"/v1/alerts/{alert_id}/ack", b"{}"), lambda r: (r.status, r.json()["code"]) == (503, "store_busy")),
        (request("GET", "/readyz"), lambda r: r.status == 200 and r.json()["status"] == "ready"),
        (request("POST", "/v1/ingest/dev-q", ingest_body(seq=seq)),
         lambda r: r.status in (200, 202) and r.json()["device_id"] == "dev-q"),
        (request("GET", "/v1/devices/dev1"), lambda r: r.status == 200 and r.json()["device_id"] == "dev1"),
        (request("HEAD", "/v1/devices"), lambda r: r.status == 200 and r.body == b""),
        (request("POST", f"/v1/alerts/{alert_id}/ack", b"{}"), lambda r: (r.status, r.json()["code"]) == (503, "store_busy")),
        (request("GET", "/v1/alerts?limit=2"), lambda r: r.status == 200 and len(r.json()["alerts"]) == 2),
        (request("GET", "/nowhere"), lambda r: r.status == 404),
        (request("GET", "/v1/alerts?limt=2"), lambda r: (r.status, r.json()["code"]) == (400, "unknown_parameter")),
        (request("GET", "/readyz"), lambda r: r.status == 200 and r.json()["status"] == "ready"),
    ]
    return b"".join(raw for raw, _ in reqs), [check for _, check in reqs]


@pytest.mark.parametrize("tls", [False, True], ids=["http-ack-sink", "https"])
@pytest.mark.parametrize("fragment", [0, 7], ids=["whole", "fragments"])
def test_pipelined_answers_keep_their_order(setup, http, tls, fragment):
    """Slow queries (in the query threads), ingest (held for the log on the sink
    listener), health, a HEAD of a query route, a 404 and a refused query, all
    pipelined on one connection: the answers come back in request order."""
    server, data_dir, ids = setup
    raw, checks = pipelined(ids[0], seq=int(time.time() * 1000) % 1_000_000 + fragment + tls)
    c = http(tls=tls)
    with store_locked(data_dir):
        if fragment:
            for i in range(0, len(raw), fragment):
                c.send(raw[i:i + fragment])
        else:
            c.send(raw)
        for i, check in enumerate(checks):
            resp = c.read_response(head_only=(i == 4))      # the HEAD
            assert check(resp), (i, resp)
    assert wait_for(lambda: get_counter(server.counters(), "queries_pending") == 0, 10, what="no query pending")


def server_fd(server, client_port: int) -> int:
    """The descriptor of the server's side of the client connection from that port."""
    def find():
        for pid in server.worker_pids():
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == client_port and conn.fd >= 0:
                    return conn.fd
        return None
    return wait_for(find, 10, what=f"the server side of port {client_port}")


def reset(c: HttpConn) -> None:
    """Closes with a TCP reset (SO_LINGER 0): the server sees it at once, even not reading."""
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def test_client_closing_during_its_query(setup, http):
    """A client that sends a query and goes (a reset, or a plain close): its
    answer is dropped, a new connection on the same descriptor gets only its
    own answers, and the worker serves HTTP and MQTT as before."""
    server, data_dir, ids = setup
    before = server.counters()
    reused = []
    with mqtt_client(server.ports["mqtt"], "bystander") as mq, store_locked(data_dir):
        for i in range(6):
            open_before = get_counter(server.counters(), "conns_current")
            c = http()
            c.send(request("POST", f"/v1/alerts/{ids[1]}/ack", b"{}") + request("GET", "/readyz"))
            fd = server_fd(server, c.local_port)
            if i % 2 == 0:
                reset(c)
                # The server closed it (while its query may still run in the thread).
                wait_for(lambda: get_counter(server.counters(), "conns_current") == open_before, 10,
                         what="the reset connection closed")
            else:
                c.close()
            reuse = http()
            reused.append(server_fd(server, reuse.local_port) == fd and i % 2 == 0)
            reuse.send(request("GET", "/readyz"))
            assert reuse.read_response().json()["status"] == "ready"
            ping(mq)
            wait_for(lambda: get_counter(server.counters(), "queries_pending") == 0, 10, what="no query pending")
            reuse.send(request("GET", "/v1/devices/dev1"))
            resp = reuse.read_response()
            assert resp.status == 200 and resp.json()["device_id"] == "dev1", resp
    assert any(reused), "no new connection got a closed one's descriptor"
    after = server.counters()
    assert counter_delta(before, after, "queries_refused") == 0
    assert "Traceback" not in server.log()
    # The acknowledgement itself works once the store is free.
    resp = http().request("POST", f"/v1/alerts/{ids[1]}/ack", b"{}")
    assert resp.status == 200 and resp.json()["state"] == "acked", resp


def test_a_query_then_connection_close(setup, http):
    """`Connection: close` on a query: answered, then the connection closes."""
    c = http()
    c.send(b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    resp = c.read_response()
    assert resp.status == 200 and resp.headers["connection"] == "close"
    assert "dev1" in [d["device_id"] for d in resp.json()["devices"]]
    assert c.wait_closed() == b""


def test_waiting_queries_are_bounded(tmp_path, gw_factory):
    """One query thread, one query pending at most: more queries at once are
    answered 503 queries_busy with Retry-After and counted; the others are
    answered normally, and the connections refused are served afterwards."""
    data_dir = tmp_path / "data"
    ids = fill_store(data_dir)
    server = gw_factory(workers=1, listeners=("mqtt", "http"), data_dir=data_dir,
                        args=["--query-threads", "1", "--query-max-pending", "1"])
    conns = [HttpConn(server.ports["http"]) for _ in range(12)]
    try:
        with store_locked(data_dir):
            for i, c in enumerate(conns):
                c.send(request("POST", f"/v1/alerts/{ids[i]}/ack", b"{}"))
            answers = [c.read_response() for c in conns]
        codes = [(a.status, a.json()["code"]) for a in answers]
        busy = [a for a in answers if a.json()["code"] == "queries_busy"]
        assert busy, codes
        assert all(code in ((503, "store_busy"), (503, "queries_busy")) for code in codes), codes
        assert all(a.headers["retry-after"] == "1" for a in answers)
        assert "too many store queries" in busy[0].json()["message"]
        counters = server.wait_counter("queries_refused", len(busy))
        assert get_counter(counters, "queries_refused") == len(busy)
        for c in conns:
            resp = c.request("GET", "/v1/alerts?limit=1")
            assert resp.status == 200, resp
        server.wait_log("store queries are waiting")
    finally:
        for c in conns:
            c.close()


def test_queries_in_the_event_loop_still_answer(tmp_path, gw_factory):
    """query_threads = 0: the queries run in the loop, as before the threads."""
    data_dir = tmp_path / "data"
    fill_store(data_dir)
    server = gw_factory(workers=1, listeners=("http",), data_dir=data_dir, args=["--query-threads", "0"])
    with HttpConn(server.ports["http"]) as c:
        c.send(request("GET", "/v1/devices/dev1") + request("GET", "/readyz"))
        assert c.read_response().json()["device_id"] == "dev1"
        assert c.read_response().json()["status"] == "ready"
    assert get_counter(server.counters(), "queries_pending") == 0
