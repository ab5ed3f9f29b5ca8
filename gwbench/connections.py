"""The connection engine: one select.epoll loop per worker process.

Opens clients on a schedule (TCP connect, TLS handshake, MQTT CONNECT ->
CONNACK or the JSON line protocol's Connect -> Connect), timestamps each
phase, holds them with keepalives, publishes on a schedule, and disconnects
them cleanly. The throughput scenario uses it to set up its publishers and
subscribers (including SUBSCRIBE -> SUBACK) before handing the sockets to
the Cython engine.

TLS clients of the connection scenario are OpenSSL SSL objects driven from
Cython (gwbench/_ext/tls_clients.pyx: no Python ssl layer, read-ahead, EC
certificate keys decoded without OpenSSL 3.0's provider decoder search): on a shared
machine every ms of the tool's CPU competes with the server it measures. The
throughput scenario's setup keeps Python's ssl (its engine takes SSLSocket
objects).
"""
from __future__ import annotations

import errno
import heapq
import math
import os
import select
import socket
import ssl
import time
from collections import Counter

import msgspec

from . import mqtt, ws as wsproto
from .histogram import Histogram
from .payload import HEADER, HEADER_SIZE

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

# states (WSUP: the WebSocket upgrade of --transport ws, between TLS and HELLO)
TCP, TLS, HELLO, SUBSCRIBING, READY, CLOSED, WSUP = range(7)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP

try:
    from gwbench._ext import tls_clients
    from gwbench._ext.tls_clients import TLSError
except ImportError:  # not built: TLS clients go through Python's ssl module
    tls_clients = None

    class TLSError(Exception):
        kind = "tls_error"

_json_enc = msgspec.json.Encoder()
_json_dec = msgspec.json.Decoder()


def make_tls_context(cafile: str | None, insecure: bool, host: str):
    """The connection scenario's TLS clients: OpenSSL driven from Cython
    (gwbench/_ext/tls_clients.pyx), or Python's ssl module when the extension
    is not built. Both make the same handshake: TLS 1.2+, the certificate verified
    against cafile (or the system store) and the host name checked, unless
    insecure. GW_BENCH_TLS=python forces Python's ssl, =openssl-providers
    keeps OpenSSL's provider decoders for EC keys (see tls_clients); both are
    for comparisons only."""
    how = os.environ.get("GW_BENCH_TLS", "openssl")
    if tls_clients is None or how == "python":
        return make_ssl_context(cafile, insecure)
    if how != "openssl-providers":
        tls_clients.use_legacy_ec_keys()
    return tls_clients.ClientContext(cafile, insecure, None if insecure else host)


def make_ssl_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.load_default_certs()
    return ctx


def errname(code: int) -> str:
    return errno.errorcode.get(code, f"errno_{code}")


def classify(exc: BaseException) -> str:
    if isinstance(exc, TLSError):
        return exc.kind
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls_verify_failed"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        return f"tls_{reason.lower()}" if reason else "tls_error"
    if isinstance(exc, OSError) and exc.errno:
        return errname(exc.errno)
    return type(exc).__name__


class Conn:
    __slots__ = (
        "g", "cid", "role", "sock", "tls", "fd", "state", "events", "t0", "t_tcp", "t_tls", "t_ready",
        "inbuf", "outbuf", "ping_sent", "last_tx", "pubs_done", "pid", "inflight", "json_id", "ws", "ws_key",
        "alias_max", "recv_max", "alias_set",
    )

    def __init__(self, g: int, cid: str, role: str):
        self.g = g
        self.cid = cid
        self.role = role
        self.sock = None
        self.tls = None     # tls_clients.TLSConn (the socket stays in sock)
        self.fd = -1
        self.state = TCP
        self.events = 0
        self.t0 = self.t_tcp = self.t_tls = self.t_ready = 0.0
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.ping_sent = 0.0
        self.last_tx = 0.0
        self.pubs_done = 0
        self.pid = 0
        self.inflight = None
        self.json_id = None
        self.ws = None      # --transport ws: the server's frames being read (gwbench/ws.py FrameReader)
        self.ws_key = b""
        # MQTT 5.0: what the server's CONNACK announced (Topic Alias Maximum,
        # Receive Maximum), and whether this client's Topic Alias 1 is set.
        self.alias_max = 0
        self.recv_max = 65535
        self.alias_set = False


class ConnEngine:
    """Drives one worker's share of the clients of a plan."""

    MAX_PENDING = 1000   # handshakes in flight at once when there is no ramp

    def __init__(self, plan, indices, ssl_ctx=None, stats_cb=None, stop_check=None):
        """ssl_ctx: None (plain), a tls_clients.ClientContext (make_tls_context), or
        an ssl.SSLContext (the throughput scenario, whose engine takes
        SSLSocket objects)."""
        self.plan = plan
        self.indices = list(indices)
        self.ssl_ctx = ssl_ctx
        self.native_tls = tls_clients is not None and isinstance(ssl_ctx, tls_clients.ClientContext)
        self.stats_cb = stats_cb
        self.stop_check = stop_check or (lambda: False)
        self.ep = select.epoll(sizehint=len(self.indices) + 16)
        # epoll.poll() rounds timeouts up to whole ms: connects would start
        # up to 1 ms late. tls_clients.epoll_wait is precise to the microsecond.
        if tls_clients is not None:
            epfd = self.ep.fileno()
            self._wait = lambda timeout, maxevents: tls_clients.epoll_wait(epfd, timeout, maxevents)
        else:
            self._wait = self.ep.poll
        self.conns: dict[int, Conn] = {}
        self.timers: list = []
        self._tseq = 0
        self.json = plan.protocol == "json"
        self.v5 = not self.json and plan.mqtt_level == 5   # MQTT 5.0 clients (--mqtt-version 5)
        self.ws = getattr(plan, "transport", "") == "ws"    # MQTT over WebSocket
        self.server_hostname = plan.host if plan.tls and not plan.insecure else None
        self.username = plan.username.encode() if plan.username is not None else None
        self.password = plan.password.encode() if plan.password is not None else None
        # "{n}" in either: each client its own credentials (user-{n}: user-0, user-1, ...).
        self.per_client_credentials = b"{n}" in (self.username or b"") + (self.password or b"")
        self.c = Counter()          # counters
        self.errors = Counter()     # errors by kind
        self.h_connect = Histogram()   # t0 -> CONNACK (TCP + TLS + MQTT)
        self.h_tcp = Histogram()
        self.h_tls = Histogram()
        self.h_hello = Histogram()     # CONNECT -> CONNACK
        self.h_ping = Histogram()      # PINGREQ -> PINGRESP
        self.h_ack = Histogram()       # PUBLISH -> PUBACK (QoS 1)
        self.h_lag = Histogram()       # how late a connect started against the ramp's schedule
        self.live = 0        # connections past CONNACK and not closed
        self.pending = 0     # connections started, not yet READY or failed
        self.started = 0
        self.stopped = False
        self.hold_end = math.inf
        self.hold_start = 0.0
        self.setup_only = False
        self._last_poll = 0.0
        self._ramp = ((), 0, 0.0, 0.0)   # (indices, how many, seconds apart, t of index 0)
        self._next_i = 0
        self._next_start = math.inf      # when the next client is due (inf: none, or no ramp)
        self.epoch = None      # the run's common t=0 (monotonic): marks fall on whole seconds after it
        self.next_k = 1

    # -- timers ------------------------------------------------------------
    def _at(self, t: float, conn: Conn, kind: str, arg=None) -> None:
        self._tseq += 1
        heapq.heappush(self.timers, (t, self._tseq, conn, kind, arg))

    # -- epoll -------------------------------------------------------------
    def _want(self, c: Conn, events: int) -> None:
        if c.events != events and c.fd >= 0:
            self.ep.modify(c.fd, events)
            c.events = events

    # -- lifecycle ---------------------------------------------------------
    def _start(self, g: int, now: float) -> None:
        plan = self.plan
        c = Conn(g, plan.client_id(g), plan.role(g))
        self.started += 1
        self.c["attempted"] += 1
        c.t0 = now
        try:
            s = socket.socket(plan.family, socket.SOCK_STREAM)
        except OSError as e:
            self._fail(c, classify(e))
            return
        c.sock = s
        c.fd = s.fileno()
        s.setblocking(False)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            src = plan.source_ip_for(g)
            if src:
                try:
                    s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                except OSError:
                    pass
                s.bind((src, 0))
            rc = s.connect_ex(plan.sockaddr)
        except OSError as e:
            self._fail(c, classify(e))
            return
        if rc not in (0, errno.EINPROGRESS):
            self._fail(c, errname(rc))
            return
        self.pending += 1
        self.conns[c.fd] = c
        c.events = EPOLLOUT
        self.ep.register(c.fd, EPOLLOUT)
        self._at(now + plan.connect_timeout, c, "timeout")

    def _fail(self, c: Conn, kind: str) -> None:
        """A client that never reached READY."""
        if c.state == CLOSED:
            return
        if c.fd in self.conns:
            self.pending -= 1
        self._close(c)
        self.c["failed"] += 1
        self.errors[kind] += 1

    def _lost(self, c: Conn, kind: str) -> None:
        """A READY client the server dropped."""
        if c.state == CLOSED:
            return
        self._close(c)
        self.live -= 1
        self.c["dropped"] += 1
        self.errors[kind] += 1

    def _close(self, c: Conn) -> None:
        c.state = CLOSED
        if c.tls is not None:
            c.tls.close()
            c.tls = None
        if c.fd >= 0:
            self.conns.pop(c.fd, None)
            try:
                self.ep.unregister(c.fd)
            except (OSError, ValueError):
                pass
            c.fd = -1
        if c.sock is not None:
            try:
                c.sock.close()
            except OSError:
                pass
            c.sock = None

    # -- I/O ---------------------------------------------------------------
    def _send(self, c: Conn, data: bytes, now: float, raw: bool = False) -> None:
        if c.state == CLOSED:
            return
        if c.ws is not None and not raw:
            data = wsproto.client_frame(data)
        c.last_tx = now
        self.c["bytes_out"] += len(data)
        if c.outbuf:
            c.outbuf += data
            return
        n = self._write(c, data)
        if n < 0:
            return
        if n < len(data):
            c.outbuf += data[n:]
            self._want(c, EPOLLIN | EPOLLOUT)

    def _write(self, c: Conn, data) -> int:
        """What the socket took (0: it would block); -1 when the connection
        broke (already handled)."""
        try:
            if c.tls is not None:
                return c.tls.send(data)
            return c.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        except (OSError, TLSError) as e:
            self._broken(c, classify(e))
            return -1

    def _flush(self, c: Conn) -> None:
        while c.outbuf:
            n = self._write(c, c.outbuf)
            if n <= 0:
                return
            del c.outbuf[:n]
        self._want(c, EPOLLIN)

    def _broken(self, c: Conn, kind: str) -> None:
        if c.state == READY:
            self._lost(c, kind)
        else:
            self._fail(c, kind)

    def _readable(self, c: Conn, now: float) -> None:
        if c.tls is not None:
            self._readable_tls(c, now)
            return
        sock = c.sock
        got = 0
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as e:
                self._broken(c, classify(e))
                return
            if not data:
                if got:
                    self._process(c, now)
                self._broken(c, "closed_by_server" if c.state == READY else "closed_before_connack")
                return
            got += len(data)
            if c.ws is not None:
                if not self._ws_input(c, data, now):
                    return
            else:
                c.inbuf += data
            if len(data) < 65536 and not (c.state >= TLS and isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
        if got:
            self.c["bytes_in"] += got
            self._process(c, now)

    def _readable_tls(self, c: Conn, now: float) -> None:
        """OpenSSL reads ahead: one read() takes what the socket has, then
        records come out of its buffer until it is empty."""
        tls = c.tls
        got = 0
        while True:
            try:
                data = tls.recv()
            except (OSError, TLSError) as e:
                self._broken(c, classify(e))
                return
            if data is None:
                break
            if not data:
                if got:
                    self._process(c, now)
                    if c.state == CLOSED:
                        return
                self._broken(c, "closed_by_server" if c.state == READY else "closed_before_connack")
                return
            got += len(data)
            if c.ws is not None:
                if not self._ws_input(c, data, now):
                    return
            else:
                c.inbuf += data
            if not tls.has_pending():
                break
        if got:
            self.c["bytes_in"] += got
            self._process(c, now)

    # -- handshake steps -----------------------------------------------------
    def _tcp_done(self, c: Conn, now: float) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(c, errname(err))
            return
        c.t_tcp = now
        self.h_tcp.record((now - c.t0) * 1e9)
        if self.native_tls:
            c.state = TLS
            try:
                c.tls = self.ssl_ctx.wrap(c.fd)
            except TLSError as e:
                self._fail(c, classify(e))
                return
            self._handshake(c, now)
        elif self.ssl_ctx is not None:
            c.state = TLS
            try:
                c.sock = self.ssl_ctx.wrap_socket(c.sock, server_hostname=self.server_hostname,
                                                  do_handshake_on_connect=False)
            except (OSError, ValueError) as e:
                self._fail(c, classify(e))
                return
            self._handshake(c, now)
        else:
            self._connected(c, now)

    def _handshake(self, c: Conn, now: float) -> None:
        if c.tls is not None:
            try:
                r = c.tls.handshake()
            except (OSError, TLSError) as e:
                self._fail(c, classify(e))
                return
            if r:
                self._want(c, EPOLLIN if r == tls_clients.WANT_READ else EPOLLOUT)
                return
        else:
            try:
                c.sock.do_handshake()
            except ssl.SSLWantReadError:
                self._want(c, EPOLLIN)
                return
            except ssl.SSLWantWriteError:
                self._want(c, EPOLLOUT)
                return
            except (OSError, ValueError) as e:
                self._fail(c, classify(e))
                return
        # The TLS phase ends when the step that finished the handshake returns,
        # not at the poll's timestamp: that step verifies the certificate, and
        # on loopback the server's whole answer can even arrive within the
        # step that sent the ClientHello.
        t = time.monotonic()
        c.t_tls = t
        self.h_tls.record((t - c.t_tcp) * 1e9)
        self._connected(c, t)

    def _connected(self, c: Conn, now: float) -> None:
        """TCP (and TLS) up: the WebSocket upgrade first with --transport ws, then CONNECT."""
        if not self.ws:
            self._hello(c, now)
            return
        c.state = WSUP
        c.ws = wsproto.FrameReader()
        req, c.ws_key = wsproto.upgrade_request(self.plan.host, self.plan.port, self.plan.ws_path)
        self._want(c, EPOLLIN)
        self._send(c, req, now, raw=True)

    def _ws_input(self, c: Conn, data: bytes, now: float) -> bool:
        """Bytes from a WebSocket connection: the upgrade's answer, then frames
        whose payloads go to c.inbuf. False when the connection was closed."""
        if c.state == WSUP:
            c.ws.raw += data
            end = c.ws.raw.find(b"\r\n\r\n")
            if end < 0:
                if len(c.ws.raw) > wsproto.MAX_HEAD:
                    self._fail(c, "ws_bad_answer")
                    return False
                return True
            head, rest = bytes(c.ws.raw[:end + 4]), bytes(c.ws.raw[end + 4:])
            c.ws.raw.clear()
            try:
                wsproto.check_answer(head, c.ws_key)
            except wsproto.WsError:
                self._fail(c, "ws_upgrade_refused")
                return False
            self._hello(c, now)
            data = rest
        try:
            c.inbuf += c.ws.feed(data)
        except wsproto.WsError:
            self._broken(c, "ws_bad_frame")
            return False
        if c.ws.replies:
            self._send(c, bytes(c.ws.replies), now, raw=True)
            c.ws.replies.clear()
        if c.ws.closed is not None:
            if c.inbuf:
                self._process(c, now)
            self._broken(c, "closed_by_server" if c.state == READY else "closed_before_connack")
            return False
        return True

    def _hello(self, c: Conn, now: float) -> None:
        c.state = HELLO
        self._want(c, EPOLLIN)
        c.ping_sent = now  # start of CONNECT -> CONNACK
        if self.json:
            msg = {"client_id": c.cid, "message_type": "Connect", "payload": None, "timestamp": time.time()}
            self._send(c, _json_enc.encode(msg) + b"\n", now)
        else:
            user, password = self.username, self.password
            if self.per_client_credentials:
                n = str(c.g).encode()
                user = user.replace(b"{n}", n)
                password = password.replace(b"{n}", n) if password is not None else None
            self._send(c, mqtt.connect(c.cid.encode(), self.plan.keepalive, user, password,
                                       version=5 if self.v5 else 4), now)
        self.c["packets_out"] += 1

    def _connack5(self, c: Conn, body: bytes) -> bool:
        """An MQTT 5.0 CONNACK: False when it refused (or was not one), else
        what it announced is kept on the client."""
        if c.state != HELLO:
            self._broken(c, "unexpected_connack")
            return False
        if len(body) == 2:
            # A 3.1.1 server's answer to protocol level 5 (return code 1).
            self._fail(c, "connack_bad_protocol")
            return False
        try:
            rc, props = mqtt.connack5(body)
        except mqtt.MalformedError:
            self._fail(c, "malformed_from_server")
            return False
        if rc:
            self._fail(c, f"connack_0x{rc:02x}")
            return False
        c.alias_max = props.get(mqtt.P_TOPIC_ALIAS_MAXIMUM, 0)
        c.recv_max = props.get(mqtt.P_RECEIVE_MAXIMUM, 65535)
        return True

    def _accepted(self, c: Conn, now: float) -> None:
        self.h_hello.record((now - c.ping_sent) * 1e9)
        c.ping_sent = 0.0
        if c.role == "sub":
            c.state = SUBSCRIBING
            self._send(c, mqtt.subscribe(1, self.plan.subscribe_filter().encode(), self.plan.qos,
                                         version=5 if self.v5 else 4), now)
            self.c["packets_out"] += 1
        else:
            self._ready(c, now)

    def _ready(self, c: Conn, now: float) -> None:
        c.state = READY
        c.t_ready = now
        self.pending -= 1
        self.live += 1
        self.c["connected"] += 1
        self.h_connect.record((now - c.t0) * 1e9)
        if self.setup_only:
            return
        ka = self.plan.keepalive
        if ka:
            self._at(now + ka, c, "ping")
        m = self.plan.messages
        if m and c.role == "idle":
            if self.plan.qos:
                c.inflight = {}
            self._schedule_pub(c, now)

    def _schedule_pub(self, c: Conn, now: float) -> None:
        """Publish k of M goes out at base + (k + phase) * span / M: spread
        evenly over the hold (from the client's connect, if it came later),
        each client with its own phase so they do not burst together."""
        m = self.plan.messages
        k = c.pubs_done
        if k >= m:
            return
        base = max(self.hold_start, c.t_ready)
        span = max(0.0, self.hold_end - base)
        phase = (c.g * 0.6180339887498949) % 1.0
        t = base + (k + phase) * span / m
        self._at(max(t, now), c, "pub")

    # -- packets -----------------------------------------------------------
    def _process(self, c: Conn, now: float) -> None:
        if self.json:
            self._process_json(c, now)
            return
        try:
            packets = mqtt.split(c.inbuf)
        except mqtt.MalformedError:
            self._broken(c, "malformed_from_server")
            return
        for first, body in packets:
            self.c["packets_in"] += 1
            t = first >> 4
            if t == mqtt.CONNACK:
                if self.v5:
                    if not self._connack5(c, body):
                        return
                    self._accepted(c, now)
                    continue
                if c.state != HELLO or len(body) != 2:
                    self._broken(c, "unexpected_connack")
                    return
                rc = body[1]
                if rc:
                    self._fail(c, mqtt.CONNACK_CODES.get(rc, f"connack_{rc}"))
                    return
                self._accepted(c, now)
            elif t == mqtt.PINGRESP:
                if c.ping_sent:
                    self.h_ping.record((now - c.ping_sent) * 1e9)
                    c.ping_sent = 0.0
                self.c["pingresp"] += 1
            elif t == mqtt.PUBACK:
                pid = int.from_bytes(body[:2], "big")
                sent = c.inflight.pop(pid, None) if c.inflight is not None else None
                if sent is None:
                    self.errors["unexpected_puback"] += 1
                elif self.v5 and mqtt.ack5_reason(body) >= 0x80:
                    # The server refused the message (MQTT 5.0 reason code): not acknowledged.
                    self.c["rejected"] += 1
                    self.errors[f"puback_0x{mqtt.ack5_reason(body):02x}"] += 1
                else:
                    self.h_ack.record((now - sent) * 1e9)
                    self.c["acked"] += 1
            elif t == mqtt.SUBACK:
                if c.state != SUBSCRIBING:
                    self.errors["unexpected_suback"] += 1
                    continue
                if self.v5:
                    try:
                        codes = mqtt.suback5_codes(body)
                    except mqtt.MalformedError:
                        self._fail(c, "malformed_from_server")
                        return
                    if len(codes) != 1 or codes[0] >= 0x80:
                        self._fail(c, f"suback_0x{codes[0]:02x}" if codes else "suback_failure")
                        return
                elif len(body) < 3 or body[2] == 0x80:
                    self._fail(c, "suback_failure")
                    return
                self._ready(c, now)
            elif t == mqtt.PUBLISH:
                # Only setup-phase subscribers can see these (retained or
                # early messages); the Cython engine takes over after that.
                self.c["early_publish"] += 1
            elif t == mqtt.DISCONNECT and self.v5:
                # An MQTT 5.0 server says why it closes the connection.
                rc = body[0] if body else 0
                self._broken(c, f"disconnect_0x{rc:02x}")
                return
            else:
                self.errors[f"unexpected_packet_{t}"] += 1
            if c.state == CLOSED:
                return

    def _process_json(self, c: Conn, now: float) -> None:
        buf = c.inbuf
        while True:
            i = buf.find(b"\n")
            if i < 0:
                if len(buf) > 1 << 20:
                    self._broken(c, "json_line_too_long")
                return
            line = bytes(buf[:i])
            del buf[:i + 1]
            if not line.strip():
                continue
            self.c["packets_in"] += 1
            try:
                msg = _json_dec.decode(line)
                kind = msg.get("message_type")
            except (msgspec.DecodeError, AttributeError):
                self.errors["json_unparsable_reply"] += 1
                continue
            if kind == "Connect" and c.state == HELLO:
                c.json_id = msg.get("client_id")
                self._accepted(c, now)
            elif kind == "Error":
                if c.state == HELLO:
                    self._fail(c, "json_error_reply")
                    return
                self.errors["json_error_reply"] += 1
            else:
                self.errors[f"json_unexpected_{kind}"] += 1

    # -- timers --------------------------------------------------------------
    def _fire(self, c: Conn, kind: str, now: float) -> None:
        if c.state == CLOSED:
            return
        if kind == "timeout":
            if c.state != READY:
                self._fail(c, "connect_timeout" if c.state != SUBSCRIBING else "suback_timeout")
            return
        if c.state != READY or now >= self.hold_end:
            return
        if kind == "ping":
            if self.json:
                msg = {"client_id": c.json_id or c.cid, "message_type": "Heartbeat", "payload": None,
                       "timestamp": time.time()}
                self._send(c, _json_enc.encode(msg) + b"\n", now)
            else:
                if c.ping_sent:
                    self.errors["ping_timeout"] += 1
                c.ping_sent = now
                self._send(c, mqtt.PINGREQ_BYTES, now)
            self.c["pings"] += 1
            self.c["packets_out"] += 1
            self._at(now + self.plan.keepalive, c, "ping")
        elif kind == "pub":
            self._publish(c, now)
            c.pubs_done += 1
            self._schedule_pub(c, now)

    def _publish_the_rest(self, now: float) -> None:
        """At the hold's end: the publishes of the plan a client has not made
        yet (it connected after the hold, or this process ran late), made now,
        so every client sends --messages (their PUBACKs come before the
        DISCONNECTs, disconnect_all)."""
        m = self.plan.messages
        if not m:
            return
        for c in list(self.conns.values()):
            while c.state == READY and c.role == "idle" and c.pubs_done < m:
                self._publish(c, now)
                c.pubs_done += 1

    def _publish(self, c: Conn, now: float) -> None:
        plan = self.plan
        seq = c.pubs_done
        head = HEADER.pack(c.g, seq, time.perf_counter_ns())
        if self.json:
            msg = {"client_id": c.json_id or c.cid, "message_type": "Data",
                   "payload": {"seq": seq, "data": "x" * max(0, plan.size - HEADER_SIZE)},
                   "timestamp": time.time()}
            self._send(c, _json_enc.encode(msg) + b"\n", now)
        else:
            payload = head + b"\x00" * (plan.size - HEADER_SIZE)
            topic = f"{plan.topic_prefix}/c/{c.g}".encode()
            pid = 0
            if plan.qos:
                c.pid = c.pid % 65535 + 1
                pid = c.pid
                c.inflight[pid] = now
            if self.v5:
                # Topic Alias 1 when the server takes aliases: the topic with
                # the first publish, the alias alone after it.
                alias = 1 if c.alias_max else 0
                if alias and c.alias_set:
                    topic = b""
                c.alias_set = bool(alias)
                self._send(c, mqtt.publish(topic, payload, plan.qos, pid, version=5, alias=alias), now)
            else:
                self._send(c, mqtt.publish(topic, payload, plan.qos, pid), now)
        self.c["published"] += 1
        self.c["packets_out"] += 1

    # -- the loop -------------------------------------------------------------
    def _poll_once(self, timeout: float) -> None:
        try:
            events = self._wait(timeout, 1024)
        except InterruptedError:
            return
        now = time.monotonic()
        conns = self.conns
        monotonic = time.monotonic
        for fd, ev in events:
            if self._next_start <= monotonic():
                # A connect fell due while this batch is handled (a TLS step
                # costs a few hundred us): start it on time, not after the batch.
                self._start_due(monotonic())
            c = conns.get(fd)
            if c is None:
                continue
            st = c.state
            if st == TCP:
                self._tcp_done(c, now)
            elif st == TLS:
                self._handshake(c, now)
            else:
                if ev & EPOLLOUT and c.outbuf:
                    self._flush(c)
                    if c.state == CLOSED:
                        continue
                if ev & (EPOLLIN | EPOLLERR):
                    self._readable(c, now)

    def _start_due(self, now: float) -> None:
        """Starts the clients whose time on the ramp has come (with no ramp:
        as many as MAX_PENDING handshakes in flight allow)."""
        idx, n, step, start_at = self._ramp
        i = self._next_i
        while i < n and start_at + idx[i] * step <= now and (step or self.pending < self.MAX_PENDING):
            if step:
                self.h_lag.record((now - (start_at + idx[i] * step)) * 1e9)
            self._start(idx[i], now)
            i += 1
        self._next_i = i
        self._next_start = start_at + idx[i] * step if step and i < n else math.inf

    def _run_timers(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, _, c, kind, _ = heapq.heappop(timers)
            self._fire(c, kind, now)

    def snapshot(self) -> dict:
        d = dict(self.c)
        d["live"] = self.live
        d["pending"] = self.pending
        d["errors"] = sum(self.errors.values())
        return d

    def _tick(self, now: float) -> None:
        """Reports counters at each whole second after the epoch (the coordinator
        merges workers by that index, so per-second rates are exact) and
        polls the coordinator's orders a few times a second."""
        if self.epoch is not None and now >= self.epoch + self.next_k:
            snap = self.snapshot()
            while now >= self.epoch + self.next_k:
                snap["k"] = self.next_k
                if self.stats_cb:
                    self.stats_cb(dict(snap))
                self.next_k += 1
        if now - self._last_poll >= 0.1:
            self._last_poll = now
            if self.stop_check():
                self.stopped = True

    def run(self, start_at: float, rampup: float, total: int, hold_end: float | None) -> None:
        """Connects this worker's clients on the ramp (client g at
        start_at + g * rampup / total) and, unless hold_end is None (setup
        only), holds them until hold_end."""
        self.setup_only = hold_end is None
        if self.epoch is None:
            self.epoch = start_at
        self.hold_start = start_at + rampup
        self.hold_end = math.inf if hold_end is None else hold_end
        idx = self.indices
        n = len(idx)
        step = rampup / total if total and rampup > 0 else 0.0
        self._ramp = (idx, n, step, start_at)
        self._next_i = 0
        self._next_start = start_at + idx[0] * step if step and n else math.inf
        setup_deadline = start_at + rampup + self.plan.connect_timeout + 5.0
        while not self.stopped:
            now = time.monotonic()
            self._start_due(now)
            i = self._next_i
            self._run_timers(now)
            self._tick(now)
            if self.setup_only:
                if i >= n and self.pending == 0:
                    break
                if now > setup_deadline:
                    for c in list(self.conns.values()):
                        if c.state != READY:
                            self._fail(c, "setup_timeout")
                    break
            else:
                if now >= self.hold_end:
                    self._publish_the_rest(now)
                    break
                if i >= n and self.live == 0 and self.pending == 0:
                    break  # everyone failed or was dropped: nothing left to hold
            nxt = now + 0.1
            if i < n:
                nxt = min(nxt, start_at + idx[i] * step) if step else now
            if self.timers:
                nxt = min(nxt, self.timers[0][0])
            nxt = min(nxt, self.hold_end, self.epoch + self.next_k)
            self._poll_once(max(0.0, nxt - time.monotonic()))
        self._next_start = math.inf
        self.c["not_started"] += n - self._next_i

    def ready_conns(self) -> list[Conn]:
        return [c for c in self.conns.values() if c.state == READY]

    def detach(self) -> list[Conn]:
        """Hands the READY connections over (setup only): they leave this
        engine's epoll; the caller owns their sockets from now on."""
        out = self.ready_conns()
        if any(c.tls is not None for c in out):
            raise RuntimeError("the Cython TLS clients (tls_clients) cannot be handed to the throughput engine")
        for c in out:
            try:
                self.ep.unregister(c.fd)
            except (OSError, ValueError):
                pass
        self.conns.clear()
        self.ep.close()
        return out

    def disconnect_all(self, budget: float = 3.0) -> None:
        """Sends DISCONNECT (or the JSON Disconnect) on every live client,
        flushes within a time budget, and closes. QoS 1 publishes still in
        flight (sent near the hold's end) get their PUBACKs first, within the
        same budget: a DISCONNECT sent before them would count them unacked."""
        deadline = time.monotonic() + budget
        while (time.monotonic() < deadline
               and any(c.inflight and c.state == READY for c in self.conns.values())):
            self._poll_once(0.05)
        now = time.monotonic()
        for c in list(self.conns.values()):
            if c.state == READY:
                if self.json:
                    msg = {"client_id": c.json_id or c.cid, "message_type": "Disconnect", "payload": None,
                           "timestamp": time.time()}
                    self._send(c, _json_enc.encode(msg) + b"\n", now)
                else:
                    self._send(c, mqtt.DISCONNECT_BYTES, now)
                self.c["packets_out"] += 1
            elif c.state != CLOSED:
                self._fail(c, "not_connected_at_end")
        deadline = max(deadline, time.monotonic() + 0.5)
        while any(c.outbuf for c in self.conns.values()) and time.monotonic() < deadline:
            self._poll_once(0.05)
        for c in list(self.conns.values()):
            if c.state == READY:
                if c.outbuf:
                    self.errors["disconnect_unflushed"] += 1
                else:
                    self.c["disconnected"] += 1
                if c.inflight:
                    self.c["unacked"] += len(c.inflight)
                self.live -= 1
            self._close(c)
        self.ep.close()

    def result(self) -> dict:
        return {
            "counters": dict(self.c),
            "errors": dict(self.errors),
            "hist": {
                "connect": self.h_connect.to_dict(),
                "tcp": self.h_tcp.to_dict(),
                "tls": self.h_tls.to_dict(),
                "connack": self.h_hello.to_dict(),
                "ping": self.h_ping.to_dict(),
                "puback": self.h_ack.to_dict(),
                "ramp_lag": self.h_lag.to_dict(),
            },
        }
