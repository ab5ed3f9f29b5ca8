"""The pipeline process: the sinks' threads, WAL retention, alerts, stats, signals."""

from __future__ import annotations

import _signal
import faulthandler
import logging
import os
import signal
import threading
import time
from collections import deque
from typing import Callable

from .bridge import BridgeSink
from .errors import PipelineError
from .filesink import FileSink
from .runner import SinkRunner
from .settings import Settings
from .source import DamageLedger, WalSource, load_wal_module, worker_dir
from .store import STORE_FILE, StoreSink, check_data_dir, open_store

log = logging.getLogger("gw.pipeline")

_current: "Pipeline | None" = None


def durable_index() -> int:
    """The stats row's word holding a worker's durable log offset."""
    from gw.stats import Counter
    return int(Counter.WAL_DURABLE_OFFSET)


class LagClock:
    """How long the oldest log byte a sink has not taken has been durable.

    Twice a second the pipeline notes each log's durable offset with the
    time (only when it moved); the age of a sink's lag on a log is the time
    since the first note past the sink's checkpoint: the oldest unread record
    became durable at most one note earlier. Notes every sink has read past
    are dropped; at most MAX_NOTES per log are kept (past that the oldest go,
    and the age reported is a lower bound, as it is for a backlog the log held
    when the pipeline started: it counts from the first note)."""

    MAX_NOTES = 8192        # at two a second: over an hour behind

    def __init__(self, nworkers: int):
        self.notes: list[deque] = [deque() for _ in range(nworkers)]

    def note(self, slot: int, now: float, durable: int, min_checkpoint: int) -> None:
        notes = self.notes[slot]
        if not notes or durable > notes[-1][1]:
            notes.append((now, durable))
            if len(notes) > self.MAX_NOTES:
                notes.popleft()
        elif durable < notes[-1][1]:
            notes.clear()           # the log was reset: start again
            notes.append((now, durable))
        # A note at or below every sink's checkpoint is the first past none of them.
        while len(notes) > 1 and notes[0][1] <= min_checkpoint:
            notes.popleft()

    def age(self, slot: int, now: float, checkpoint: int, durable: int) -> float:
        """Seconds the oldest byte past `checkpoint` has waited (0: nothing waits)."""
        if durable <= checkpoint:
            return 0.0
        for t, offset in self.notes[slot]:
            if offset > checkpoint:
                return max(0.0, now - t)
        return 0.0


class Pipeline:
    """The sinks over the worker logs of `nworkers` slots.

    durable(slot) gives a log's durable offset, durable_published(slot) whether
    the log's worker has published it since it (re)started (None: always);
    publish(topic, payload) sends
    an MQTT message into the broker (alerts), called from the thread that runs
    `run()` only; wal is gw_ext.wal or a module with the same API; rows, the
    stats block's rows, get the damaged log bytes the readers skipped."""

    def __init__(self, settings: Settings, nworkers: int, durable: Callable[[int], int],
                 publish: Callable[[bytes, bytes], None] | None = None, wal=None, quick_check: bool = True,
                 rows=None, durable_published: Callable[[int], bool] | None = None):
        self.settings = settings
        self.nworkers = nworkers
        self.durable = durable
        self.publish = publish
        self.data_dir = check_data_dir(settings.data_dir)
        if wal is None:
            try:
                wal = load_wal_module()
            except ImportError as exc:
                raise PipelineError(f"the write-ahead log module gw_ext.wal does not import ({exc}); "
                                    "build the extensions (pip install -e .)") from None
        self.wal = wal
        self.stop_event = threading.Event()
        self.alerts_published = 0
        self.alerts_failed = 0
        self._publish_logged = 0.0
        self._retain_logged = 0.0
        self._next_retain = 0.0
        self.header = None          # the stats block's header, for publish_figures()
        self.rows = rows            # the workers' stats rows: the store's checkpoint per log (STORE_CHECKPOINT)
        self.lag_clock = LagClock(nworkers)
        self._next_figures = 0.0
        self.started = time.time()
        s = settings
        retention = {"anomaly_window": s.anomaly_window, "anomaly_threshold": s.anomaly_threshold,
                     "raw_retention": s.store_raw_retention,
                     "rollup_retention": {"1m": s.store_1m_retention, "1h": s.store_1h_retention},
                     "retention_interval": s.store_retention_interval}
        if s.store_is_postgresql:
            from .pgstore import PgStoreSink
            self.store = PgStoreSink(s.store, nworkers, partitions_ahead=s.store_pg_partitions_ahead,
                                     connect_timeout=s.store_pg_connect_timeout, **retention)
        else:
            self.store = StoreSink(open_store(self.data_dir / STORE_FILE, quick_check), nworkers, **retention)
        sinks = [self.store]
        try:
            if s.file_sink_enabled:
                sinks.append(FileSink(s.file_sink, nworkers, rotate_bytes=s.file_sink_rotate_bytes,
                                      rotate_seconds=s.file_sink_rotate_seconds))
            if s.bridge_enabled:
                sinks.append(BridgeSink(s.bridge, nworkers, data_dir=self.data_dir, topic=s.bridge_topic,
                                        cafile=s.bridge_cafile, client_id=s.bridge_client_id,
                                        window=s.bridge_window))
            for sink in sinks:
                sink.open()
        except BaseException:
            self.store.close()
            raise
        self.sinks = sinks
        self.damage = DamageLedger(rows)
        self.runners = [SinkRunner(sink, WalSource(self.data_dir, nworkers, durable, wal, self.damage,
                                                   durable_published),
                                   batch=s.pipeline_batch, poll_interval=s.pipeline_poll_interval,
                                   stop=self.stop_event)
                        for sink in sinks]

    # -- life cycle
    def start(self) -> None:
        self.publish_checkpoints()
        self.check_disk()
        for r in self.runners:
            r.start()
        log.info("pipeline: %d worker logs, sinks %s", self.nworkers,
                 ", ".join(s.name for s in self.sinks))

    def run(self) -> int:
        """Until stop(): alerts out, WAL retention. Then waits for the sinks to
        finish their batch in hand and commit; returns 0."""
        while not self.stop_event.is_set():
            self.tick()
            self.stop_event.wait(self.settings.pipeline_poll_interval)
        return self.shutdown()

    def tick(self) -> None:
        self._publish_alerts()
        self.publish_checkpoints()
        now = time.monotonic()
        if now >= self._next_figures:
            self._next_figures = now + 0.5
            self.note_durable(now)
            if self.header is not None:
                self.publish_figures(now)
        if now >= self._next_retain:
            self._next_retain = now + self.settings.pipeline_retain_interval
            self.retain_wal()

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self, timeout: float | None = None) -> int:
        if timeout is None:
            # Less than the master waits (pipeline_stop_timeout), so a sink that
            # hangs is reported here and the checkpoints of the others still commit.
            timeout = max(0.5, self.settings.pipeline_stop_timeout - 2.0)
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for r in self.runners:
            if r.thread is not None:
                r.thread.join(max(0.0, deadline - time.monotonic()))
                if r.thread.is_alive():
                    log.error("pipeline: the %s sink did not stop within %.0f s", r.sink.name, timeout)
            else:
                r.sink.close()
        self._publish_alerts()
        self.retain_wal()
        return 0

    # -- alerts, after their transaction committed
    def _publish_alerts(self) -> None:
        outbox = self.store.outbox
        while not outbox.empty():
            topic, payload = outbox.get_nowait()
            if self.publish is None:
                continue
            try:
                self.publish(topic, payload)
                self.alerts_published += 1
            except Exception as exc:       # noqa: BLE001  (the alert is in the store anyway)
                self.alerts_failed += 1
                now = time.monotonic()
                if now - self._publish_logged >= 10.0:
                    self._publish_logged = now
                    log.warning("pipeline: alert not published on %s: %s (it is in the store)",
                                topic.decode(errors="replace"), exc)

    # -- the logs' retention: nothing a sink still needs
    def retain_wal(self) -> None:
        s = self.settings
        for slot in range(self.nworkers):
            d = worker_dir(self.data_dir, slot)
            if not d.is_dir():
                continue
            keep = min(sink.checkpoints.get(slot, 0) for sink in self.sinks)
            try:
                self.wal.retain_dir(str(d), keep, s.wal_retention_age, s.wal_retention_bytes)
            except Exception as exc:         # noqa: BLE001
                now = time.monotonic()
                if now - self._retain_logged >= 60.0:
                    self._retain_logged = now
                    log.warning("pipeline: WAL retention in %s failed: %s", d, exc)

    def check_disk(self) -> None:
        """Warns at start when the disk under data_dir cannot hold what the logs
        may keep unstored (max_sink_lag_bytes per worker log, the bound past which
        the workers hold ingest): past that the disk fills before the bound acts."""
        bound = self.settings.max_sink_lag_bytes
        if not bound:
            return
        try:
            st = os.statvfs(self.data_dir)      # shutil.disk_usage's free, without importing shutil
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        need = bound * self.nworkers
        if free < need:
            log.warning("pipeline: the disk under %s has %.1f GB free, less than the %d worker logs may hold "
                        "before the store is behind by max_sink_lag_bytes (%d x %.1f GB = %.1f GB, plus what "
                        "wal_retention_bytes keeps): lower max_sink_lag_bytes or free space, or the disk fills "
                        "before ingest is held", self.data_dir, free / 1e9, self.nworkers, self.nworkers,
                        bound / 1e9, need / 1e9)

    # -- figures
    SINK_INDEX = {"store": 0, "file": 1, "bridge": 2}

    def publish_checkpoints(self) -> None:
        """Each worker's log: how far the store sink has committed it, into the
        worker's stats row (STORE_CHECKPOINT, next offset + 1), where the
        worker compares it with its durable offset (max_sink_lag_bytes)."""
        if self.rows is None:
            return
        from gw.stats import Counter

        word = int(Counter.STORE_CHECKPOINT)
        checkpoints = self.store.checkpoints
        rows = self.rows
        for slot in range(self.nworkers):
            rows[slot, word] = checkpoints.get(slot, 0) + 1

    def lag_ages(self, now: float | None = None) -> dict[str, list[float]]:
        """Per sink, per worker log: seconds its oldest unread byte has been durable."""
        now = time.monotonic() if now is None else now
        out = {}
        for r in self.runners:
            ck = r.sink.checkpoints
            out[r.sink.name] = [self.lag_clock.age(slot, now, ck.get(slot, 0), int(self.durable(slot)))
                                for slot in range(self.nworkers)]
        return out

    def note_durable(self, now: float) -> None:
        for slot in range(self.nworkers):
            low = min(r.sink.checkpoints.get(slot, 0) for r in self.runners)
            self.lag_clock.note(slot, now, int(self.durable(slot)), low)

    def publish_figures(self, now: float | None = None) -> None:
        """The figures /metrics shows, into the stats block's header (gw/metrics.py)."""
        from gw.stats import Layout

        header = self.header
        retries = 0
        now = time.monotonic() if now is None else now
        ages = self.lag_ages(now)
        for r in self.runners:
            k = self.SINK_INDEX.get(r.sink.name)
            if k is None:
                continue
            header[Layout.H_SINK_WRITTEN + k] = r.sink.written
            header[Layout.H_SINK_LAG + k] = r.lag()
            header[Layout.H_SINK_LAG_AGE_MS + k] = int(max(ages[r.sink.name], default=0.0) * 1000)
            retries += r.retries
        header[Layout.H_SINK_RETRIES] = retries
        header[Layout.H_ALERTS] = self.alerts_published

    def stats(self) -> dict:
        ages = self.lag_ages()
        sinks = {}
        for r in self.runners:
            sinks[r.sink.name] = r.stats()
            sinks[r.sink.name]["lag_age_seconds"] = [round(a, 3) for a in ages[r.sink.name]]
        out = {"sinks": sinks,
               "alerts_published": self.alerts_published, "alerts_publish_failed": self.alerts_failed,
               "damaged_log_bytes": dict(self.damage.lost),
               "durable": {slot: int(self.durable(slot)) for slot in range(self.nworkers)}}
        return out


def stats() -> dict:
    """The running pipeline's figures in this process ({} when none runs)."""
    return _current.stats() if _current is not None else {}


def pipeline_main(cfg, block, nworkers: int, publish, quick_check: bool = True) -> int:
    """The pipeline process's body (the master forks it). Runs until SIGTERM,
    then finishes each sink's batch in hand, commits the checkpoints and
    returns 0. Raises PipelineError when it cannot start (corrupt store,
    unwritable data dir, bad setting)."""
    global _current
    # _signal's functions: signal.signal's enum conversions would run in this
    # process's own pages (the master forked it; see ARCHITECTURE.md).
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)     # the master relays Ctrl-C as SIGTERM
    # The master sends SIGUSR1 before it kills a pipeline that did not stop in
    # time: every thread's stack goes to stderr (the log), saying where it hung.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    settings = Settings.from_cfg(cfg)
    rows = block.matrix
    idx = durable_index()

    def durable(slot: int) -> int:
        return int(rows[slot, idx])

    from gw.stats import Counter
    heartbeat = int(Counter.WORKER_HEARTBEAT_MS)

    def durable_published(slot: int) -> bool:
        # A worker publishes its durable offset (Worker.set_wal) before its loop's
        # first turn, which sets its heartbeat; the master zeroes the heartbeat
        # of a dead worker, so a respawned one counts as unpublished until it turns.
        return int(rows[slot, heartbeat]) != 0

    pipe = Pipeline(settings, nworkers, durable, publish, quick_check=quick_check, rows=rows,
                    durable_published=durable_published)
    pipe.header = block.header
    _signal.signal(_signal.SIGTERM, lambda signum, frame: pipe.stop())
    _signal.signal(_signal.SIGHUP, _signal.SIG_IGN)     # its settings need a restart
    _current = pipe
    try:
        pipe.start()
        return pipe.run()
    finally:
        _current = None
