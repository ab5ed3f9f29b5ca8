"""The store's lag bound (max_sink_lag_bytes) against `gw serve`: backpressure
before the disk fills.

The store sink is made slow for real: the test holds `BEGIN EXCLUSIVE` on
store.sqlite, so the pipeline cannot commit and retries while the worker's log
grows. Past the bound the worker holds ingest: HTTP 503 `store_behind` with
Retry-After, a JSON-lines Error, MQTT QoS 1 telemetry PUBACKs stop (the
publisher is not read), QoS 0 telemetry is shed; all counted and shown by
`gw stats` and /metrics. Once the lock goes, everything acknowledged before
lands in the store exactly once, the held publisher's readings are
acknowledged and stored, and ingest answers 200 again."""

from __future__ import annotations

import json
import socket
import sqlite3
import struct
import threading
import time
import uuid

from conftest import mqtt_client, publish_packet, read_packet, tcp_connect, wait_for
from http_client import HttpConn

BOUND = 64 * 1024       # max_sink_lag_bytes: a few dozen HTTP batches
BATCH = 50              # readings per POST /v1/ingest


def batch_body(device: str, seqs) -> bytes:
    return json.dumps([{"device_id": device, "seq": s, "metrics": {"v": float(s), "w": 1.0},
                        "tags": {"pad": "x" * 40}} for s in seqs]).encode()


def store_seqs(server, device: str) -> list[int]:
    conn = sqlite3.connect(f"file:{server.data_dir / 'store.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return [r[0] for r in conn.execute("SELECT seq FROM readings WHERE device_id = ?", (device,))]
    finally:
        conn.close()


def metric_values(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with HttpConn(port) as c:
        text = c.request("GET", "/metrics").body.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


class QoS1Publisher:
    """A raw MQTT client sending QoS 1 telemetry with seq = packet id, reading
    PUBACKs in a thread."""

    def __init__(self, port: int, device: str, keepalive: int = 60):
        self.cm = mqtt_client(port, f"lag-{uuid.uuid4().hex[:8]}", keepalive=keepalive)
        self.sock = self.cm.__enter__()
        self.device = device
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def send(self, seq: int) -> None:
        body = json.dumps({"seq": seq, "metrics": {"v": float(seq)}}).encode()
        self.sock.sendall(publish_packet(f"telemetry/{self.device}", body, qos=1, packet_id=seq))

    def _read(self) -> None:
        try:
            while True:
                first, body = read_packet(self.sock, timeout=600)
                if first == 0x40:
                    with self.lock:
                        self.acked.add(struct.unpack("!H", body)[0])
        except (OSError, EOFError, AssertionError, socket.timeout):
            self.closed.set()

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def close(self) -> None:
        try:
            self.cm.__exit__(None, None, None)
        except OSError:
            pass


def json_line(sock, msg: dict) -> dict:
    sock.sendall(json.dumps(msg).encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "the JSON-lines connection closed"
        buf += chunk
    return json.loads(buf)


def test_a_store_behind_by_the_bound_holds_ingest_until_it_catches_up(gw_factory):
    server = gw_factory(workers=1, listeners=("mqtt", "http", "json"),
                        args=["--ack", "sink", "--fsync", "batch", "--max-sink-lag-bytes", str(BOUND)])
    device = f"lag-{uuid.uuid4().hex[:6]}"
    http = HttpConn(server.ports["http"])
    # The pipeline runs and has said where the store is.
    assert http.request("POST", "/v1/ingest", batch_body(device, range(0, BATCH))).status == 200
    wait_for(lambda: len(store_seqs(server, device)) == BATCH, 30, what="the first batch in the store")
    wait_for(lambda: server.stats()["workers"][0]["store_lag_bytes"] == 0, 10,
             what="the store's checkpoint published to the worker")
    acked = set(range(0, BATCH))
    refused: set[int] = set()

    lock = sqlite3.connect(str(server.data_dir / "store.sqlite"), timeout=30, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")          # the sink cannot commit: it retries, its lag grows
    released = False
    pub = None
    try:
        # HTTP: 200 until the lag passes the bound, then 503 store_behind with Retry-After.
        seq = BATCH
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "no 503 store_behind within 60 s"
            seqs = range(seq, seq + BATCH)
            resp = http.request("POST", "/v1/ingest", batch_body(device, seqs))
            seq += BATCH
            if resp.status == 200:
                acked.update(seqs)
                continue
            assert resp.status == 503, (resp.status, resp.body)
            assert resp.json()["code"] == "store_behind", resp.body
            assert "message" in resp.json()
            assert int(resp.headers["retry-after"]) >= 1
            refused.update(seqs)
            break
        stats = server.stats()
        assert stats["workers"][0]["store_behind"] is True
        assert stats["workers"][0]["store_lag_bytes"] > BOUND
        wait_for(lambda: server.stats()["sinks"]["store"]["lag_bytes"] > BOUND, 10,
                 what="the store sink's lag in the pipeline's figures (twice a second)")
        assert stats["counters"]["ingest_shed_store_behind"]["http_503"] >= 1
        assert stats["counters"]["ingest_shed_store_behind"]["holds"] == 1
        assert stats["counters"]["ingest_shed_store_behind"]["workers_holding"] == 1

        # MQTT QoS 1: the first telemetry PUBLISH is read, so it is taken and acknowledged
        # (once durable); the publisher is then not read: the rest get no PUBACK while the
        # store is behind.
        # Its keepalive (2 s: closed after 3 s without a packet) restarts while it is held:
        # the server's hold is not the client's silence.
        pub = QoS1Publisher(server.ports["mqtt"], device + "-m", keepalive=2)
        pub.send(1)
        wait_for(lambda: pub.count() == 1, 10, what="the PUBACK of the PUBLISH read before the hold")
        for pid in range(2, 201):
            pub.send(pid)
        time.sleep(4.0)
        assert pub.count() == 1, "PUBACKs went on while the store was behind"
        assert not pub.closed.is_set(), "the held publisher was closed"

        # QoS 0 telemetry: shed, counted.
        with mqtt_client(server.ports["mqtt"], f"q0-{uuid.uuid4().hex[:8]}") as q0:
            q0.sendall(publish_packet(f"telemetry/{device}-q0", b'{"seq": 1, "metrics": {"v": 1.0}}', qos=0))
            q0.sendall(b"\xc0\x00")             # PINGREQ: the PUBLISH before it was handled
            assert read_packet(q0) == (0xD0, b"")
        # JSON lines: a Data message gets an Error naming the cause.
        js = tcp_connect(server.ports["json"])
        jid = f"{device}-j"
        assert json_line(js, {"message_type": "Connect", "client_id": jid, "payload": None,
                              "timestamp": time.time()})["message_type"] == "Connect"
        err = json_line(js, {"message_type": "Data", "client_id": jid, "payload": {"seq": 1, "metrics": {"v": 1.0}},
                             "timestamp": time.time()})
        assert err["message_type"] == "Error" and "store_behind" in err["payload"], err

        shed = server.stats()["counters"]["ingest_shed_store_behind"]
        assert shed["mqtt_qos0_shed"] == 1 and shed["json_errors"] == 1
        got = metric_values(server.ports["http"])
        assert got[("gw_ingest_shed_store_behind_total", (("how", "http_503"),))] >= 1
        assert got[("gw_store_behind_workers", ())] == 1
        assert got[("gw_store_lag_bytes", (("worker", "0"),))] > BOUND
        assert got[("gw_sink_lag_bytes", (("sink", "store"),))] > BOUND
        wait_for(lambda: metric_values(server.ports["http"])[("gw_sink_lag_seconds", (("sink", "store"),))] >= 1.0,
                 10, what="the store's lag in seconds")
        text = server.stats(as_json=False)
        assert "[sinks] store: lag" in text and "ingest held" in text, text

        # The lock goes: the store catches up, the publisher is read again.
        lock.rollback()
        lock.close()
        released = True
        wait_for(lambda: pub.count() == 200, 90, what="every held PUBLISH acknowledged once the store caught up")
        assert not pub.closed.is_set()
        # HTTP ingest is answered 200 again (the refused batch, sent again, is taken).
        retry = sorted(refused)

        def taken():
            resp = http.request("POST", "/v1/ingest", batch_body(device, retry))
            assert resp.status in (200, 503), (resp.status, resp.body)
            return resp.status == 200
        wait_for(taken, 60, interval=0.5, what="ingest answered 200 again")
        acked.update(retry)
        # A Data message taken gets no answer: it shows in the store.
        js.sendall(json.dumps({"message_type": "Data", "client_id": jid, "payload": {"seq": 2, "metrics": {"v": 2.0}},
                               "timestamp": time.time()}).encode() + b"\n")
        wait_for(lambda: store_seqs(server, jid) == [2], 30, what="the JSON-lines reading taken after the hold")
        js.close()
    finally:
        if not released:
            lock.rollback()
            lock.close()
        if pub is not None:
            pub.close()
        http.close()

    # Nothing lost, nothing twice: every acknowledged reading is in the store once.
    wait_for(lambda: set(store_seqs(server, device)) >= acked, 60, what="every acknowledged HTTP reading stored")
    rows = store_seqs(server, device)
    assert sorted(rows) == sorted(acked)
    mrows = wait_for(lambda: (r := store_seqs(server, device + "-m")) and len(r) >= 200 and r, 60,
                     what="every acknowledged MQTT reading stored")
    assert sorted(mrows) == list(range(1, 201))
    assert store_seqs(server, f"{device}-q0") == []                 # shed, and counted above
    stats = server.stats()
    assert stats["workers"][0]["store_behind"] is False
    assert stats["counters"]["ingest_shed_store_behind"]["workers_holding"] == 0
