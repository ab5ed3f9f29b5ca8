"""Upstream MQTT bridge (the sink to another broker or a cloud): every reading, QoS 1, to another broker.

`bridge = "mqtt://host:port"` (or `mqtts://`, TLS with `bridge_cafile`, or the
system's CAs when empty; the server's name is verified). Each reading is
published unchanged (the normalised JSON) on `{bridge_topic}/{device_id}`.

Delivery: **at least once**. The checkpoint of a worker log advances only past
records whose PUBACK arrived, contiguously (a record acknowledged before an
earlier one waits for it). When the connection breaks, the records in flight
are published again, in order, after reconnecting (exponential backoff with
full jitter); the upstream may then get some of them twice (dedupe by
`(device_id, seq)`, or the whole payload).

Each connection is a fresh paho client (clean session) run in paho's threaded
mode (`loop_start`); its network thread only appends acknowledged message ids
to a deque, the sink's thread does the bookkeeping. Checkpoints are small JSON
files in `data_dir/pipeline/`, written at most every 0.5 s and on stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from .checkpointfile import read_sink_checkpoint, write_json_atomic
from .errors import PipelineError
from .sink import Part, Sink

log = logging.getLogger("gw.pipeline.bridge")


class BridgeDown(ConnectionError):
    pass


def parse_bridge_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise PipelineError(f"bridge {url!r}: expected mqtt://host:port or mqtts://host:port")
    try:
        port = parts.port
    except ValueError:
        raise PipelineError(f"bridge {url!r}: bad port") from None
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (8883 if tls else 1883), tls


class _DeviceId(msgspec.Struct):
    device_id: str


class _Connection:
    """One upstream connection: a paho client on its own network thread."""

    def __init__(self, host: str, port: int, tls: bool, cafile: str, client_id: str, window: int,
                 keepalive: int = 30, connect_timeout: float = 10.0):
        import paho.mqtt.client as mqtt

        self.mqtt = mqtt
        self.acked: deque = deque()            # mids, appended by paho's thread
        self.connected = threading.Event()
        self.lost = threading.Event()
        self.rc = None
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      clean_session=True, protocol=mqtt.MQTTv311,
                                      reconnect_on_failure=False)
        c.max_inflight_messages_set(window)
        c.max_queued_messages_set(0)
        c.connect_timeout = connect_timeout
        if tls:
            c.tls_set(ca_certs=cafile or None)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.connect(host, port, keepalive)        # TCP (and TLS) now; raises OSError
        c.loop_start()
        if not self.connected.wait(connect_timeout) or self.lost.is_set():
            self.close()
            raise BridgeDown(f"no CONNACK from {host}:{port}" +
                             (f" (return code {self.rc})" if self.rc else ""))

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.rc = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        if self.rc == 0:
            self.connected.set()
        else:
            self.lost.set()
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.lost.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.acked.append(mid)

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != self.mqtt.MQTT_ERR_SUCCESS:
            self.lost.set()
            raise BridgeDown(f"publish failed: {self.mqtt.error_string(info.rc)}")
        return info.mid

    def close(self) -> None:
        try:
            if self.client.is_connected():
                self.client.disconnect()
        except Exception:               # noqa: BLE001
            pass
        self.client.loop_stop()
        try:
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        except Exception:               # noqa: BLE001
            pass


class BridgeSink(Sink):
    name = "bridge"

    def __init__(self, url: str, nworkers: int, *, data_dir: str | Path, topic: str = "telemetry",
                 cafile: str = "", client_id: str = "gw-bridge", window: int = 1000,
                 checkpoint_interval: float = 0.5, drain_timeout: float = 3.0):
        super().__init__(nworkers)
        self.url = url
        self.host, self.port, self.tls = parse_bridge_url(url)
        self.topic = topic.rstrip("/")
        self.cafile = cafile
        self.client_id = client_id
        self.window = max(1, window)
        self.ckpt_dir = Path(data_dir) / "pipeline"
        self.checkpoint_interval = checkpoint_interval
        self.drain_timeout = drain_timeout
        self.conn: _Connection | None = None
        self.mids: dict[int, tuple] = {}        # mid -> entry [slot, next_offset, acked]
        self.queues: dict[int, deque] = {w: deque() for w in range(nworkers)}
        self.inflight = 0
        self.connects = 0
        self._saved: dict[int, int] = {}
        self._saved_at = 0.0
        self._device = msgspec.json.Decoder(_DeviceId).decode
        self.bad_records = 0

    def _ckpt_path(self, slot: int) -> Path:
        return self.ckpt_dir / f"bridge-w{slot}.json"

    def open(self) -> None:
        try:
            import paho.mqtt.client  # noqa: F401
        except ImportError:
            raise PipelineError("the bridge needs paho-mqtt (pip install paho-mqtt)") from None
        if self.tls and self.cafile and not Path(self.cafile).is_file():
            raise PipelineError(f"bridge_cafile {self.cafile} is not a file")
        try:
            self.ckpt_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(f"{self.ckpt_dir}: {exc.strerror or exc}") from None
        for slot in range(self.nworkers):
            state = read_sink_checkpoint(self._ckpt_path(slot), "bridge", "sends")
            if state is not None:
                self.checkpoints[slot] = int(state.get("next_offset", 0))
        self._saved = dict(self.checkpoints)

    # -- connection
    def _ensure(self) -> _Connection:
        conn = self.conn
        if conn is not None and conn.lost.is_set():
            self._drop()
            raise BridgeDown(f"connection to {self.host}:{self.port} lost")
        if conn is None:
            try:
                conn = _Connection(self.host, self.port, self.tls, self.cafile, self.client_id, self.window)
            except OSError as exc:
                raise BridgeDown(f"cannot connect to {self.host}:{self.port}: {exc}") from None
            self.conn = conn
            self.connects += 1
            log.info("bridge: connected to %s:%d", self.host, self.port)
        return conn

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    # -- acknowledgements
    def _settle(self) -> None:
        conn = self.conn
        if conn is None:
            return
        acked = conn.acked
        mids = self.mids
        while acked:
            entry = mids.pop(acked.popleft(), None)
            if entry is not None:
                entry[2] = True
        for slot, q in self.queues.items():
            nxt = None
            while q and q[0][2]:
                nxt = q.popleft()[1]
                self.inflight -= 1
                self.written += 1
            if nxt is not None:
                self.checkpoints[slot] = nxt

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at < self.checkpoint_interval:
            return
        self._saved_at = now
        for slot, off in self.checkpoints.items():
            if self._saved.get(slot) != off:
                write_json_atomic(self._ckpt_path(slot), {"next_offset": off})
                self._saved[slot] = off

    # -- the sink
    def budget(self, limit: int) -> int:
        return min(limit, self.window - self.inflight)

    def poll(self, now: float) -> None:
        self._settle()
        self._save()
        conn = self.conn
        if conn is not None and conn.lost.is_set() and not self.inflight:
            log.info("bridge: connection to %s:%d closed while idle; reconnecting at the next reading",
                     self.host, self.port)
            self._drop()
        elif conn is not None or self.inflight:
            self._ensure()           # raises when the connection broke with records in flight

    def write(self, parts: list[Part]) -> None:
        conn = self._ensure()
        prefix = self.topic + "/"
        for slot, records, nxt in parts:
            q = self.queues[slot]
            if not records:
                if not q:
                    self.checkpoints[slot] = nxt
                continue
            last = len(records) - 1
            for i, (off, payload) in enumerate(records):
                end = nxt if i == last else records[i + 1][0]
                try:
                    device = self._device(payload).device_id
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.bad_records += 1
                    entry = [slot, end, True]       # skipped: counts as done
                    q.append(entry)
                    self.inflight += 1
                    continue
                entry = [slot, end, False]
                q.append(entry)
                self.inflight += 1
                mid = conn.publish(prefix + device, payload)
                self.mids[mid] = entry
        self._settle()

    def rewind(self) -> None:
        self._drop()
        self.mids.clear()
        for q in self.queues.values():
            q.clear()
        self.inflight = 0

    def close(self) -> None:
        """On stop: wait a little for the acknowledgements in flight, save the checkpoints."""
        deadline = time.monotonic() + self.drain_timeout
        while self.inflight and self.conn is not None and not self.conn.lost.is_set() \
                and time.monotonic() < deadline:
            time.sleep(0.01)
            self._settle()
        self._settle()
        try:
            self._save(force=True)
        finally:
            self._drop()

    def extra_stats(self) -> dict:
        return {"inflight": self.inflight, "connected": self.conn is not None and not self.conn.lost.is_set(),
                "connects": self.connects, "bad_records": self.bad_records}
