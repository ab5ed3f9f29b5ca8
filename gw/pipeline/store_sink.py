"""What the two store sinks share (gw/pipeline/store.py, the embedded SQLite
store; gw/pipeline/pgstore.py, PostgreSQL): the detector and retention
settings, the alert record published once its batch committed, the log of
records that are not readings, and the bookkeeping after a commit. Each sink
writes its own tables; a batch, its rollups, its alerts and its checkpoints
always commit together."""

from __future__ import annotations

import logging
import queue
import time
from datetime import datetime

import msgspec

from . import batch
from .anomaly import Detector
from .sink import Part, Sink

log = logging.getLogger("gw.pipeline.store")


class Alert(msgspec.Struct):
    """An alert as published on alerts/{device_id} after its batch committed."""
    id: int
    device_id: str
    metric: str
    ts: datetime
    value: float
    zscore: float
    mean: float
    std: float
    state: str = "open"


class StoreSinkBase(Sink):
    name = "store"

    def __init__(self, nworkers: int, *, anomaly_window: int, anomaly_threshold: float, raw_retention: float,
                 rollup_retention: dict | None, retention_interval: float, clock):
        super().__init__(nworkers)
        self.detector = Detector(anomaly_window, anomaly_threshold, warm=self._warm)
        self.raw_retention = raw_retention
        self.rollup_retention = rollup_retention if rollup_retention is not None else \
            {"1m": 30 * 86400.0, "1h": 365 * 86400.0}
        self.retention_interval = retention_interval
        self.clock = clock
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()    # (topic, payload) to publish after commit
        self._decode = msgspec.json.Decoder(batch.Reading).decode
        self._encode = msgspec.json.Encoder().encode
        self.bad_records = 0
        self.alerts = 0
        self._bad_logged = 0.0
        self._heap_dirty = False

    def _warm(self, device_id: str, metric: str) -> list[float]:
        raise NotImplementedError

    # -- one batch, one transaction
    def write(self, parts: list[Part]) -> None:
        batch.keep_heap()
        self._heap_dirty = True
        with batch.paused_gc():
            self._write(parts)

    def idle(self, now: float) -> None:
        """A second after the last batch (nothing durable to take since): the
        memory the batches kept goes back to the system."""
        if self._heap_dirty:
            self._heap_dirty = False
            batch.trim_heap()

    def _write(self, parts: list[Part]) -> None:
        raise NotImplementedError

    def _committed(self, parts: list[Part], readings: int, published: list[Alert]) -> None:
        """After the batch's commit: the checkpoints move, its alerts go out."""
        for slot, _r, nxt in parts:
            self.checkpoints[slot] = nxt
        self.written += readings
        self.alerts += len(published)
        encode = self._encode
        for a in published:
            self.outbox.put((b"alerts/" + a.device_id.encode(), encode(a)))

    def _bad(self, slot: int, off: int, exc: Exception) -> None:
        self.bad_records += 1
        now = time.monotonic()
        if now - self._bad_logged >= 10.0:
            self._bad_logged = now
            log.error("store: skipped a record that is not a normalised reading (worker %d, offset %d): "
                      "%s (%d skipped so far)", slot, off, exc, self.bad_records)
