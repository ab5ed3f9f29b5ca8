"""One blocking client before the run, so an unreachable server, a refused
TLS handshake, a wrong CA or bad credentials fail in seconds with a message
that says what is wrong, instead of N identical connection errors."""
from __future__ import annotations

import socket
import ssl
import time

import msgspec

from . import mqtt, ws as wsproto
from .connections import make_ssl_context


class PreflightError(RuntimeError):
    pass


def _recv_more(sock, timeout_at: float, if_closed: str) -> bytes:
    """The next bytes from the server; PreflightError(if_closed) when it
    closed the connection instead."""
    sock.settimeout(max(0.05, timeout_at - time.monotonic()))
    data = sock.recv(4096)
    if not data:
        raise PreflightError(if_closed)
    return data


class _WsSocket:
    """MQTT bytes over an upgraded WebSocket (sendall, recv, settimeout): what the preflight needs."""

    def __init__(self, sock, reader):
        self.sock = sock
        self.reader = reader

    def settimeout(self, t):
        self.sock.settimeout(t)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(wsproto.client_frame(data))

    def recv(self, n: int) -> bytes:
        while True:
            raw = self.sock.recv(65536)
            if not raw:
                return b""
            data = self.reader.feed(raw)
            if self.reader.replies:
                self.sock.sendall(bytes(self.reader.replies))
                self.reader.replies.clear()
            if data:
                return data
            if self.reader.closed is not None:
                return b""

    def close(self) -> None:
        self.sock.close()


def _ws_upgrade(plan, sock, deadline: float, where: str):
    req, key = wsproto.upgrade_request(plan.host, plan.port, plan.ws_path)
    sock.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += _recv_more(sock, deadline, f"{where} closed the connection before answering the WebSocket "
                                          f"upgrade (is it a ws listener? is --tls needed?)")
        if len(buf) > wsproto.MAX_HEAD:
            raise PreflightError(f"{where} answered the WebSocket upgrade with an over-long head")
    head, _, rest = buf.partition(b"\r\n\r\n")
    try:
        wsproto.check_answer(head + b"\r\n\r\n", key)
    except wsproto.WsError as e:
        raise PreflightError(f"{where}: WebSocket {e} (is --ws-path right? is it a ws listener?)") from None
    reader = wsproto.FrameReader()
    ws = _WsSocket(sock, reader)
    if rest:
        reader.feed(rest)
    return ws


def tcp_connect(plan, sock: socket.socket, timeout: float, listener: str = "the broker") -> None:
    """Connects sock (blocking, timeout) from the plan's first source address;
    PreflightError saying what went wrong."""
    where = f"{plan.host}:{plan.port}"
    sock.settimeout(timeout)
    src = plan.source_ip_for(0)
    if src:
        try:
            sock.bind((src, 0))
        except OSError as e:
            raise PreflightError(f"cannot bind source address {src}: {e.strerror}") from None
    try:
        sock.connect(plan.sockaddr)
    except ConnectionRefusedError:
        raise PreflightError(f"cannot connect to {where}: connection refused (is {listener} running?)") from None
    except socket.timeout:
        raise PreflightError(f"cannot connect to {where}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise PreflightError(f"cannot connect to {where}: {e.strerror or e}") from None


def preflight(plan, timeout: float = 5.0) -> dict:
    """Returns timings of one full connect (with --mqtt-version 5 also what the
    server's CONNACK announced: topic_alias_maximum, receive_maximum); raises
    PreflightError."""
    where = f"{plan.host}:{plan.port}"
    t0 = time.monotonic()
    deadline = t0 + timeout
    info: dict = {}
    sock = socket.socket(plan.family, socket.SOCK_STREAM)
    try:
        tcp_connect(plan, sock, timeout)
        t_tcp = time.monotonic()
        if plan.tls:
            ctx = make_ssl_context(plan.cafile, plan.insecure)
            try:
                sock = ctx.wrap_socket(sock, server_hostname=plan.host if not plan.insecure else None)
            except ssl.SSLCertVerificationError as e:
                raise PreflightError(
                    f"TLS handshake with {where} failed: certificate verify failed ({e.verify_message}); "
                    f"check --cafile, or use --insecure to skip verification") from None
            except ssl.SSLError as e:
                raise PreflightError(f"TLS handshake with {where} failed: {e.reason or e} "
                                     f"(is this a TLS port?)") from None
            except socket.timeout:
                raise PreflightError(f"TLS handshake with {where} failed: no answer within {timeout:g} s "
                                     f"(is this a TLS port?)") from None
            except OSError as e:
                raise PreflightError(f"TLS handshake with {where} failed: {e.strerror or e} "
                                     f"(is this a TLS port?)") from None
        t_tls = time.monotonic()
        if getattr(plan, "transport", "") == "ws" and plan.scenario != "ingest":
            sock = _ws_upgrade(plan, sock, deadline, where)
        try:
            if plan.protocol == "json":
                hello = {"client_id": f"{plan.client_prefix}preflight", "message_type": "Connect",
                         "payload": None, "timestamp": time.time()}
                sock.sendall(msgspec.json.encode(hello) + b"\n")
                buf = b""
                while b"\n" not in buf:
                    buf += _recv_more(sock, deadline, f"{where} closed the connection before answering Connect "
                                                      f"(is it a JSON-lines server? is --tls needed?)")
                try:
                    reply = msgspec.json.decode(buf.split(b"\n", 1)[0])
                except msgspec.DecodeError:
                    raise PreflightError(f"{where} answered Connect with something that is not JSON "
                                         f"(is it an MQTT port? use --protocol mqtt)") from None
                if not isinstance(reply, dict) or reply.get("message_type") != "Connect":
                    raise PreflightError(f"{where} refused the JSON Connect: {reply!r}")
                bye = {"client_id": reply.get("client_id"), "message_type": "Disconnect",
                       "payload": None, "timestamp": time.time()}
                sock.sendall(msgspec.json.encode(bye) + b"\n")
            else:
                # With per-client credentials ("{n}"), the preflight is client 0.
                user = plan.username.replace("{n}", "0").encode() if plan.username is not None else None
                pw = plan.password.replace("{n}", "0").encode() if plan.password is not None else None
                level = plan.mqtt_level
                sock.sendall(mqtt.connect(f"{plan.client_prefix}preflight".encode(), plan.keepalive, user, pw,
                                          version=level))
                buf = bytearray()
                packets = []
                while not packets:
                    buf += _recv_more(sock, deadline, f"{where} closed the connection before CONNACK "
                                                      f"(is it an MQTT port? is --tls needed?"
                                                      + (" does it speak MQTT 5.0?)" if level == 5 else ")"))
                    try:
                        packets = mqtt.split(buf)
                    except mqtt.MalformedError:
                        raise PreflightError(f"{where} answered CONNECT with garbage (not an MQTT port?)") from None
                first, body = packets[0]
                if first >> 4 != mqtt.CONNACK or len(body) < 2 or (level != 5 and len(body) != 2):
                    raise PreflightError(f"{where} answered CONNECT with packet type {first >> 4}, not CONNACK")
                if level == 5 and len(body) == 2:
                    # A 3.1.1 CONNACK: the server refused protocol level 5 as a 3.1.1 server does.
                    raise PreflightError(f"{where} does not speak MQTT 5.0 (it answered with a 3.1.1 CONNACK, "
                                         f"return code {body[1]}): drop --mqtt-version 5")
                if level == 5:
                    try:
                        code, props = mqtt.connack5(body)
                    except mqtt.MalformedError as e:
                        raise PreflightError(f"{where} answered CONNECT with a malformed MQTT 5.0 CONNACK: {e}") from None
                    if code:
                        why = mqtt.CONNACK5_TEXT.get(code, "unknown reason")
                        text = props.get(mqtt.P_REASON_STRING)
                        raise PreflightError(f"{where} refused CONNECT: {why} (CONNACK reason code 0x{code:02x}"
                                             + (f": {text.decode(errors='replace')})" if text else ")"))
                    info["topic_alias_maximum"] = props.get(mqtt.P_TOPIC_ALIAS_MAXIMUM, 0)
                    info["receive_maximum"] = props.get(mqtt.P_RECEIVE_MAXIMUM, 65535)
                elif body[1]:
                    why = mqtt.CONNACK_TEXT.get(body[1], "unknown reason")
                    raise PreflightError(f"{where} refused CONNECT: {why} (CONNACK return code {body[1]})")
                sock.sendall(mqtt.DISCONNECT_BYTES)
        except socket.timeout:
            raise PreflightError(f"{where} did not answer the {plan.protocol.upper()} connect within "
                                 f"{timeout:g} s (is --tls needed, or --protocol?)") from None
        except ConnectionError as e:
            raise PreflightError(f"{where} dropped the connection during the connect: {e.strerror or e}") from None
        t_done = time.monotonic()
        return {"tcp_ms": (t_tcp - t0) * 1e3, "tls_ms": (t_tls - t_tcp) * 1e3,
                "connect_ms": (t_done - t0) * 1e3, **info}
    finally:
        try:
            sock.close()
        except OSError:
            pass
