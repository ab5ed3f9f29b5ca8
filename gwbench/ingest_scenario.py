"""The ingest scenario (`gw bench ingest`): devices sending telemetry records
over keep-alive connections, to gw's HTTP listener (POST
/v1/ingest/{device_id}) or, with --transport mqtt, as QoS 1 PUBLISH to
telemetry/{device_id}.

C clients (global index g = 0..C-1, round-robin over the worker processes)
carry N devices: client g owns devices g, g + C, g + 2C, ... and sends their
records in turn, so each device's seq increases by one per record on one
connection. The hot loop is gwbench/_ext/ingest_engine.pyx; this module builds the
request template, opens the sockets, and runs the worker's phases:

  hello -> (go) connect every client -> ready -> (start t0, t_stop) requests
  -> drain (every request answered, or the deadline) -> result

A record (its length never changes: numbers are right-aligned with JSON
whitespace, so the engine patches it in place):

  {"ts":"2025-01-31T12:34:56.789Z","seq":        17,
   "metrics":{"temp_c":  21.37,"humidity_pct": 45.2},"tags":{"site":"AAL"}}

Readings are a pure function of (seed, device, seq); see reading() below,
which mirrors the engine, so a checker can tell which records were anomalies.
"""
from __future__ import annotations

import errno
import socket
import time

from . import histogram as H
from . import mqtt
from .preflight import PreflightError, tcp_connect  # noqa: F401  (PreflightError: for the CLI)
from .preflight import preflight as shared_preflight
from .client_process import Control, run_client_process

TRANSPORTS = {"http": 0, "mqtt": 1}
SEQ_WIDTH = 10      # up to 4,294,967,295
TEMP_WIDTH = 7      # -999.99 .. 9999.99
HUM_WIDTH = 5       # 0.0 .. 100.0
TS_PLACEHOLDER = b"2000-01-01T00:00:00.000Z"
SITES = ("AAL", "CPH", "OSL", "STO")
ANOMALY_OFFSET_C = 40.0
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


# -- records ---------------------------------------------------------------------

def device_width(devices: int) -> int:
    return max(5, len(str(max(0, devices - 1))))


def device_id(devices: int, d: int) -> str:
    return f"dev-{d:0{device_width(devices)}d}"


def devices_of(clients: int, devices: int, g: int) -> int:
    """How many devices client g carries (devices g, g + C, ... below N)."""
    return max(0, (devices - g + clients - 1) // clients)


def _record(seq: bool) -> tuple[bytes, dict]:
    """The JSON record with placeholders, and where its fields start."""
    parts: list[bytes] = []
    off: dict = {}

    def add(b: bytes, field: str | None = None, width: int = 0) -> None:
        if field:
            off[field] = (sum(map(len, parts)), width)
        parts.append(b)

    add(b'{"ts":"')
    add(TS_PLACEHOLDER, "ts", len(TS_PLACEHOLDER))
    add(b'"')
    if seq:
        add(b',"seq":')
        add(b"0".rjust(SEQ_WIDTH), "seq", SEQ_WIDTH)
    add(b',"metrics":{"temp_c":')
    add(b"0.00".rjust(TEMP_WIDTH), "temp", TEMP_WIDTH)
    add(b',"humidity_pct":')
    add(b"0.0".rjust(HUM_WIDTH), "hum", HUM_WIDTH)
    add(b'},"tags":{"site":"')
    add(b"AAL", "site", 3)
    add(b'"}}')
    return b"".join(parts), off


def _host_header(plan) -> str:
    host = f"[{plan.host}]" if ":" in plan.host else plan.host
    return f"{host}:{plan.port}"


def build_template(plan) -> tuple[bytes, dict]:
    """The request every client sends, with the offsets (and widths) of the
    fields the engine patches: dev, seq, temp, hum, ts, site, pid."""
    body, boff = _record(plan.seq)
    dev0 = device_id(plan.devices, 0).encode()
    dev_w = device_width(plan.devices)
    if plan.transport == "http":
        head = (f"POST {plan.path}{dev0.decode()} HTTP/1.1\r\nHost: {_host_header(plan)}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        off = {"dev": (head.index(dev0) + 4, dev_w)}
        tpl = head + body
        base = len(head)
    else:
        topic = f"{plan.topic_prefix}/".encode() + dev0
        vh = len(topic).to_bytes(2, "big") + topic
        rest = vh + b"\x00\x01" + body
        fixed = b"\x32" + mqtt._remaining(len(rest))   # PUBLISH, QoS 1
        tpl = fixed + rest
        off = {"dev": (len(fixed) + 2 + len(topic) - len(dev0) + 4, dev_w),
               "pid": (len(fixed) + len(vh), 2)}
        base = len(fixed) + len(vh) + 2
    for k, (o, w) in boff.items():
        off[k] = (base + o, w)
    return tpl, off


def _mix64(x: int) -> int:
    M = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


def reading(seed: int, anomaly_fraction: float, d: int, seq: int, anomalies: bool = True) -> dict:
    """What device d sends as its record seq (the engine's computation, in
    Python): {"temp_c", "humidity_pct", "site", "normal_temp_c", "anomaly"}."""
    M = (1 << 64) - 1
    hd = _mix64(seed ^ ((d * 0x100000001B3) & M))
    h = _mix64((seed + _mix64(((d << 32) | seq) & M)) & M)
    h2 = _mix64(h)
    normal = 1500 + hd % 1500
    temp = normal + (h2 & 0xFFFF) % 101 - 50
    hum = 300 + (hd >> 20) % 400 + ((h2 >> 16) & 0xFFFF) % 41 - 20
    anomaly = bool(anomalies and (h >> 11) * (1.0 / 9007199254740992.0) < anomaly_fraction)
    if anomaly:
        temp += 4000 if (h2 >> 40) & 1 else -4000
    return {"temp_c": temp / 100, "humidity_pct": hum / 10, "site": SITES[d % 4],
            "normal_temp_c": normal / 100, "anomaly": anomaly}


def hello(plan, g: int) -> bytes:
    if plan.transport != "mqtt":
        return b""
    user = plan.username.encode() if plan.username is not None else None
    pw = plan.password.encode() if plan.password is not None else None
    return mqtt.connect(plan.client_id(g).encode(), plan.keepalive, user, pw)


# -- before the run ----------------------------------------------------------------

def preflight(plan, timeout: float = 5.0) -> None:
    """HTTP: one TCP connect (no request: the server's counts stay exact);
    MQTT: the shared preflight (CONNECT -> CONNACK). PreflightError otherwise."""
    if plan.transport == "mqtt":
        shared_preflight(plan, timeout=timeout)
        return
    s = socket.socket(plan.family, socket.SOCK_STREAM)
    try:
        tcp_connect(plan, s, timeout, listener="the HTTP listener")
    finally:
        s.close()


# -- the worker process ------------------------------------------------------------

def _opener(plan):
    def open_socket(g: int) -> int:
        """A non-blocking socket with its connect started: its fd (the engine
        owns it from now on), or -errno."""
        s = socket.socket(plan.family, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            src = plan.source_ip_for(g)
            if src:
                if plan.family == socket.AF_INET:
                    s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((src, 0))
            err = s.connect_ex(plan.sockaddr)
            if err not in (0, errno.EINPROGRESS):
                s.close()
                return -err
            return s.detach()
        except OSError as e:
            s.close()
            return -(e.errno or 1)
    return open_socket


class IngestWorker:
    def __init__(self, worker_id: int, plan, ctl: Control):
        from gwbench._ext.ingest_engine import IngestEngine  # ImportError: not built

        self.plan = plan
        self.ctl = ctl
        self.gs = [g for g in plan.indices_for(worker_id)]
        self.eng = IngestEngine(TRANSPORTS[plan.transport], len(self.gs), plan.pipeline, plan.clients,
                                plan.devices, H.MIN_NS, H.GROWTH, H.NBUCKETS)
        tpl, off = build_template(plan)
        self.eng.set_template(tpl, off, plan.seed, plan.anomalies, plan.anomaly_fraction,
                              time.time_ns() - time.monotonic_ns())
        self.eng.configure(plan.connect_timeout, plan.keepalive, _opener(plan))
        for g in self.gs:
            self.eng.add(g, devices_of(plan.clients, plan.devices, g), hello(plan, g))
        self.epoch = 0.0
        self.next_k = 1
        self.notes: list[str] = []
        self.at_stop = (0, 0, 0)
        self.setup_done = False
        self.window_s = 0.0

    def snapshot(self) -> dict:
        e = self.eng
        return {"live": e.ready_count(), "pending": e.connecting_count(),
                "failed": len(self.gs) - e.ever_ready_count() if self.setup_done else 0, "dropped": 0,
                "published": int(e.sent), "received": int(e.answered), "ok": int(e.ok),
                "lost": int(e.lost), "errors": int(e.error_total())}

    def _slice(self, until_ns: int) -> None:
        mark_ns = int((self.epoch + self.next_k) * 1e9)
        self.eng.run(min(until_ns, mark_ns))
        now = time.monotonic()
        if now >= self.epoch + self.next_k:
            snap = self.snapshot()
            w = self.eng.take_window()
            h = H.Histogram()
            h.add_counts(w["counts"], w["total"], w["sum_ns"], w["min_ns"], w["max_ns"])
            snap["win"] = h.to_dict()
            while now >= self.epoch + self.next_k:
                snap["k"] = self.next_k
                self.ctl.send("stats", dict(snap))
                snap["win"] = None
                self.next_k += 1
        self.ctl.poll()

    def run(self) -> None:
        plan = self.plan
        go = self.ctl.wait("go", 60.0)
        if go is None:
            return
        self.epoch = go[1]
        delay = self.epoch - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.eng.open_all()
        n = len(self.gs)
        self.ctl.run_slices(time.monotonic() + plan.connect_timeout, self._slice,
                            lambda: self.eng.ready_count() == n)
        self.setup_done = True
        self.ctl.send("stats", dict(self.snapshot(), k=None))
        self.ctl.send("ready", {"ready": self.eng.ready_count(), "clients": n})
        start = self.ctl.wait_start(time.monotonic() + plan.connect_timeout + 30.0, self._slice)
        if start is None:
            return
        _, t0, t_stop = start
        hard_end = t_stop + plan.grace - 1.5   # finish before the coordinator's deadline
        self.eng.start(int(t0 * 1e9), int(t_stop * 1e9), plan.rate)
        self.ctl.run_slices(t_stop, self._slice)
        self.at_stop = (int(self.eng.sent), int(self.eng.answered), int(self.eng.ok))
        self.window_s = max(0.0, min(time.monotonic(), t_stop) - t0)   # shorter when stopped early
        self.ctl.run_slices(hard_end, self._slice, self.eng.drained)
        if not self.eng.drained() and not self.ctl.stop:
            out, back = self.eng.outstanding(), self.eng.backlog()
            self.notes.append(f"drain deadline passed with {out:,} request(s) unanswered"
                              + (f" and {back:,} due but never sent" if back else ""))

    def result(self) -> dict:
        e = self.eng
        counters = {
            "clients": len(self.gs), "connected": e.ever_ready_count(), "connects": int(e.connects),
            "connected_ok": int(e.connected_ok), "server_closes": int(e.server_closes),
            "sent": int(e.sent), "answered": int(e.answered), "ok": int(e.ok), "lost": int(e.lost),
            "unanswered": int(e.outstanding()) + int(e.lost), "not_sent": int(e.backlog()),
            "scheduled": int(e.scheduled()), "retry_after": int(e.retry_after),
            "injected": int(e.injected), "bytes_out": int(e.bytes_out), "bytes_in": int(e.bytes_in),
            "pingreqs": int(e.pingreqs), "sent_in_window": self.at_stop[0],
            "answered_in_window": self.at_stop[1], "ok_in_window": self.at_stop[2],
        }
        if e.last_errno:
            self.notes.append(f"last socket error: {errno.errorcode.get(e.last_errno, e.last_errno)}")
        hist = {}
        for name, d in (("latency", e.latency_hist()), ("service", e.service_hist()), ("send_lag", e.lag_hist())):
            h = H.Histogram()
            h.add_counts(d["counts"], d["total"], d["sum_ns"], d["min_ns"], d["max_ns"])
            hist[name] = h.to_dict()
        return {
            "counters": counters,
            "status": {k: int(v) for k, v in e.status_counts().items()},
            "errors": {k: int(v) for k, v in e.errors().items()},
            "hist": hist,
            "anomalies": [[device_id(self.plan.devices, d), s] for d, s in e.anomaly_list()],
            "window_s": self.window_s,
            "notes": self.notes,
        }


def worker_main(worker_id: int, plan, pipe) -> None:
    run_client_process(pipe, lambda ctl: _run_worker(worker_id, plan, ctl))


def _run_worker(worker_id: int, plan, ctl: Control) -> None:
    w = IngestWorker(worker_id, plan, ctl)
    ctl.send("hello")
    try:
        w.run()
    finally:
        w.eng.close_all()
    snap = w.snapshot()
    snap["k"] = None
    ctl.send("stats", snap)
    ctl.send("result", w.result())
