"""The JSON-lines protocol for devices: one JSON object per line, decoded with msgspec.

Client -> server: {"client_id": str|null, "message_type": "Connect" | "Disconnect"
| "Data" | "Heartbeat", "payload": any, "timestamp": unix seconds}; a Connect may
add "username" and "password" (strings), checked as MQTT CONNECT's are
(gw_ext/worker/auth.pyx). The server
answers an accepted Connect with a Connect carrying the client id (a new UUID when the
client sent none) and payload "Connected"; a refused one, and an invalid message, with
message_type "Error" and the reason as payload. Heartbeats get no answer, nor
does a Data message unless the write-ahead log cannot take its reading (an
"Error" asking to send it again); any line counts as activity, and
json_timeout seconds of silence close the connection. The worker's framing
(gw_ext/worker/jsonlines.pyx) cuts the lines and calls `JsonProtocol.handle`
once per line.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec

# Results of handle(), mirrored in gw_ext/loop.pyx.
OK = 0
CONNECTED = 1
CLOSE = 2
ERROR = 3

MAX_CLIENT_ID = 256
MAX_CREDENTIAL = 65535        # bytes of a user name or password, as in MQTT

MessageType = Literal["Connect", "Disconnect", "Data", "Heartbeat"]


class Message(msgspec.Struct, forbid_unknown_fields=False):
    message_type: MessageType
    client_id: str | None = None
    payload: Any = None
    timestamp: float | None = None
    username: str | None = None       # Connect only
    password: str | None = None


class Reply(msgspec.Struct):
    client_id: str | None
    message_type: str
    payload: Any
    timestamp: float


class JsonProtocol:
    """`ingest` (gw/ingest.py's Ingest): Data messages as telemetry readings;
    None: they are only activity."""

    def __init__(self, ingest=None):
        self._decoder = msgspec.json.Decoder(Message)
        self._encoder = msgspec.json.Encoder()
        self.ingest = ingest

    def log_full_reply(self, client_id: bytes | None) -> bytes:
        return self._reply(client_id.decode() if client_id else None, "Error",
                           "the write-ahead log cannot take readings now (disk full or too slow); "
                           "send the Data message again later")

    def refused_reply(self, client_id: bytes | None, reason: str) -> bytes:
        """The Error answering a Connect that may not connect (worker/auth.pyx
        says why); the connection then closes."""
        return self._reply(client_id.decode() if client_id else None, "Error", reason)

    def store_behind_reply(self, client_id: bytes | None) -> bytes:
        return self._reply(client_id.decode() if client_id else None, "Error",
                           "store_behind: the store is behind (max_sink_lag_bytes); the reading was not "
                           "taken: send the Data message again later")

    def _reply(self, client_id: str | None, kind: str, payload: Any) -> bytes:
        return self._encoder.encode(Reply(client_id, kind, payload, round(time.time(), 3))) + b"\n"

    def handle(self, line: bytes, connected: bool, client_id: bytes | None, may_publish: bool = True):
        """Returns (action, reply bytes or None, assigned client id or None, data,
        credentials): data is False (not a Data message), True (data), the
        normalised reading (bytes) the Data message makes, for the log and
        telemetry/{id}, or None: a Data message refused because the client
        may not publish on telemetry/{id} (`may_publish`, the ACL's verdict),
        answered with an Error; credentials, for a Connect that gives any, is
        (user name, password or None) as UTF-8 bytes, else None."""
        current = client_id.decode() if client_id is not None else None
        try:
            msg = self._decoder.decode(line)
        except msgspec.ValidationError as exc:
            return ERROR, self._reply(current, "Error", f"invalid message: {exc}"), None, False, None
        except msgspec.DecodeError as exc:
            return ERROR, self._reply(current, "Error", f"invalid JSON: {exc}"), None, False, None
        except RecursionError:
            return ERROR, self._reply(current, "Error", "invalid JSON: nested too deeply"), None, False, None
        kind = msg.message_type
        if kind == "Connect":
            if connected:
                return OK, self._reply(current, "Connect", "Connected"), None, False, None
            cid = msg.client_id or str(uuid.uuid4())
            if len(cid) > MAX_CLIENT_ID or not cid.isprintable():
                return ERROR, self._reply(None, "Error", "invalid client_id"), None, False, None
            credentials = None
            if msg.username is not None or msg.password is not None:
                credentials = self._credentials(msg.username, msg.password)
                if isinstance(credentials, str):
                    return ERROR, self._reply(cid, "Error", credentials), None, False, None
            return CONNECTED, self._reply(cid, "Connect", "Connected"), cid.encode(), False, credentials
        if not connected:
            return ERROR, self._reply(None, "Error", f"{kind} before Connect"), None, False, None
        if kind == "Disconnect":
            return CLOSE, None, None, False, None
        if kind == "Data":
            if not may_publish:
                return OK, self._reply(current, "Error", "not authorised to publish this device's readings "
                                       "(ACL): not stored"), None, None, None
            if self.ingest is not None and client_id is not None:
                reading = self.ingest.json_data(client_id, msg.payload, msg.timestamp)
                if reading is not None:
                    return OK, None, None, reading, None
            return OK, None, None, True, None
        return OK, None, None, False, None     # Heartbeat: activity is all it carries

    @staticmethod
    def _credentials(username: str | None, password: str | None):
        """(user, password) as bytes, or why they are invalid (MQTT's rules: a
        password needs a user name; a user name is 1 to 65,535 bytes of UTF-8
        without control characters, as gw takes client ids)."""
        if username is None:
            return "invalid Connect: a password without a username"
        try:
            user = username.encode()
            secret = password.encode() if password is not None else None
        except UnicodeEncodeError:      # a lone surrogate (JSON "\udc80")
            return "invalid Connect: username and password must be valid UTF-8"
        if not user or len(user) > MAX_CREDENTIAL or not username.isprintable():
            return "invalid username"
        if secret is not None and len(secret) > MAX_CREDENTIAL:
            return "invalid password: longer than 65535 bytes"
        return user, secret
