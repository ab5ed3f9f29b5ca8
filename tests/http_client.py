"""A small HTTP/1.1 client on a plain socket, for what urllib and requests hide:
pipelining, raw malformed requests, slow bodies, reading exactly one response."""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass, field

from conftest import HOST, wait_closed

WAIT = 10.0


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)     # lowercase names
    body: bytes = b""

    def json(self):
        return json.loads(self.body)


class HttpConn:
    def __init__(self, port: int, *, tls_context: ssl.SSLContext | None = None, timeout: float = WAIT):
        sock = socket.create_connection((HOST, port), timeout=timeout)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.local_port = sock.getsockname()[1]
        self.buf = b""

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def request(self, method: str, path: str, body: bytes | None = None, *,
                content_type: str | None = "application/json", headers: dict | None = None,
                send_only: bool = False) -> Response | None:
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
            if content_type:
                lines.append(f"Content-Type: {content_type}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        return None if send_only else self.read_response()

    def _fill(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed (buffered: {self.buf[:200]!r})")
        self.buf += chunk

    def read_response(self, timeout: float = WAIT, head_only: bool = False) -> Response:
        """One response (a 1xx is returned like any other)."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self._fill(deadline)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_only or int(status) < 200 else int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill(deadline)
        body, self.buf = self.buf[:length], self.buf[length:]
        return Response(int(status), reason, headers, body)

    def wait_closed(self, timeout: float = WAIT) -> bytes:
        """Waits for the server to close; returns what it sent and was not read yet
        (AssertionError if still open after timeout)."""
        rest, self.buf = self.buf, b""
        return rest + wait_closed(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ingest_body(metrics=None, **fields) -> bytes:
    record = {"metrics": metrics if metrics is not None else {"temp_c": 21.5}, **fields}
    return json.dumps(record).encode()
