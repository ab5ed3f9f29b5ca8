"""The JSON-lines protocol for devices: one JSON object per line, decoded with msgspec.

Client -> server: {"client_id": str|null, "message_type": "Connect" | "Disconnect"
| "Data" | "Heartbeat", "payload": any, "timestamp": unix seconds}. The server
answers a Connect with a Connect carrying the client id (a new UUID when the
client sent none) and payload "Connected"; an invalid message with
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

MessageType = Literal["Connect", "Disconnect", "Data", "Heartbeat"]


class Message(msgspec.Struct, forbid_unknown_fields=False):
    message_type: MessageType
    client_id: str | None = None
    payload: Any = None
    timestamp: float | None = None


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

    def store_behind_reply(self, client_id: bytes | None) -> bytes:
        return self._reply(client_id.decode() if client_id else None, "Error",
                           "store_behind: the store is behind (max_sink_lag_bytes); the reading was not "
                           "taken: send the Data message again later")

    def not_authorised_reply(self) -> bytes:
        """The Error answering a Connect while anonymous access is off (a Connect
        carries no credentials); the connection then closes."""
        return self._reply(None, "Error", "not authorised: anonymous access is off")

    def _reply(self, client_id: str | None, kind: str, payload: Any) -> bytes:
        return self._encoder.encode(Reply(client_id, kind, payload, round(time.time(), 3))) + b"\n"

    def handle(self, line: bytes, connected: bool, client_id: bytes | None):
        """Returns (action, reply bytes or None, assigned client id or None, data):
        data is False (not a Data message), True (data), or the normalised
        reading (bytes) the Data message makes, for the log and telemetry/{id}."""
        current = client_id.decode() if client_id is not None else None
        try:
            msg = self._decoder.decode(line)
        except msgspec.ValidationError as exc:
            return ERROR, self._reply(current, "Error", f"invalid message: {exc}"), None, False
        except msgspec.DecodeError as exc:
            return ERROR, self._reply(current, "Error", f"invalid JSON: {exc}"), None, False
        except RecursionError:
            return ERROR, self._reply(current, "Error", "invalid JSON: nested too deeply"), None, False
        kind = msg.message_type
        if kind == "Connect":
            if connected:
                return OK, self._reply(current, "Connect", "Connected"), None, False
            cid = msg.client_id or str(uuid.uuid4())
            if len(cid) > MAX_CLIENT_ID or not cid.isprintable():
                return ERROR, self._reply(None, "Error", "invalid client_id"), None, False
            return CONNECTED, self._reply(cid, "Connect", "Connected"), cid.encode(), False
        if not connected:
            return ERROR, self._reply(None, "Error", f"{kind} before Connect"), None, False
        if kind == "Disconnect":
            return CLOSE, None, None, False
        if kind == "Data":
            if self.ingest is not None and client_id is not None:
                reading = self.ingest.json_data(client_id, msg.payload, msg.timestamp)
                if reading is not None:
                    return OK, None, None, reading
            return OK, None, None, True
        return OK, None, None, False     # Heartbeat: activity is all it carries
