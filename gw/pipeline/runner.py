"""One thread per sink: poll the worker logs, hand batches to the sink, retry.

The runner keeps the sink's read position per worker log. Each turn it gathers
up to `batch` records over the logs (starting with a different log each turn,
so a busy log cannot starve the others), each read only up to the log's
durable offset, and calls `sink.write`. When the batch was full it goes again
at once (catching up), with a batch twice as large as the last, up to
`sink.catchup` times `batch` (larger transactions cost the store far less per
record: each commit writes every page it touched). Once caught up (the batch
took everything durable) it waits `poll_interval`, and the next batch may take
up to twice what this one took (at least `batch`): under a sustained rate the
batches stay as large as what piles up during a write, instead of starting
again from `batch`; behind, the next batch takes what waits (estimated from
the bytes left), not just twice the last. After IDLE_AFTER seconds with
nothing to take the sink's `idle()` runs once (the store gives its batches'
memory back). A failing sink
(write or poll raising) is rewound to its checkpoints and retried after an
exponential backoff with full jitter (base 0.1 s, cap 30 s); the failure is
logged once per streak, and its recovery once. Sinks run in their own threads,
so a failing or slow sink never holds up the others.
"""

from __future__ import annotations

import logging
import threading
import time

from .backoff import Backoff
from .sink import Sink
from .source import WalSource

log = logging.getLogger("gw.pipeline")

IDLE_AFTER = 1.0        # seconds without a record before the sink's idle()


class SinkRunner:
    def __init__(self, sink: Sink, source: WalSource, *, batch: int, poll_interval: float,
                 stop: threading.Event, backoff: Backoff | None = None):
        self.sink = sink
        self.source = source
        self.batch = max(1, batch)
        self.cur_batch = self.batch
        self.poll_interval = poll_interval
        self.stop = stop
        self.backoff = backoff or Backoff()
        self.pos: dict[int, int] = dict(sink.checkpoints)
        self.retries = 0
        self.failing = False
        self.last_error = ""
        self.skipped_bytes = 0          # log bytes the sink never saw (retention removed them first)
        self._start = 0
        self._ahead_logged: set[int] = set()
        self._last_records = 0.0
        self._idle_told = True          # nothing written yet: nothing to tell
        self.thread: threading.Thread | None = None
        self.done = threading.Event()

    def start(self) -> None:
        self.pos = dict(self.sink.checkpoints)
        self.thread = threading.Thread(target=self.run, name=f"gw-pipeline-{self.sink.name}", daemon=True)
        self.thread.start()

    # -- one turn
    def gather(self) -> tuple[list, int, bool]:
        """([(slot, records, next_offset)], records, full)."""
        sink = self.sink
        limit = sink.budget(self.cur_batch)
        n = sink.nworkers
        parts = []
        count = 0
        full = False
        if limit <= 0:
            return parts, 0, False
        for i in range(n):
            slot = (self._start + i) % n
            durable = self.source.durable(slot)
            pos = self.pos.get(slot, 0)
            if durable <= pos:
                # Behind the checkpoint is normal until the worker has recovered its
                # log and published where it ends; after that the log was reset.
                if durable < pos and slot not in self._ahead_logged and self.source.published(slot):
                    self._ahead_logged.add(slot)
                    log.warning("%s: checkpoint %d of worker %d's log is past its durable offset %d "
                                "(was the log reset?); waiting for the log to reach it",
                                sink.name, pos, slot, durable)
                continue
            left = limit - count
            records, nxt = self.source.read(slot, pos, durable, left)
            start = records[0][0] if records else nxt
            if start > pos:
                self.skipped_bytes += start - pos
            if records or nxt != pos:
                parts.append((slot, records, nxt))
                self.pos[slot] = nxt
                count += len(records)
            if count >= limit:
                full = True
                break
        self._start = (self._start + 1) % n if n else 0
        cap = self.batch * max(1, sink.catchup)
        if full:
            # Behind: the next batch takes what is waiting now (its records
            # estimated from the bytes left and this batch's record size), up
            # to twice as much, and at least twice this one. Doubling alone
            # from `batch` took eight ever larger batches to reach the cap, each
            # small one costing the store several times the CPU per record, and
            # a store started under a sustained rate fell seconds behind on the
            # way.
            left = sum(max(0, self.source.durable(slot) - self.pos.get(slot, 0)) for slot in range(n))
            read = sum(nxt - records[0][0] for _slot, records, nxt in parts if records)
            per = read / count if count and read > 0 else 0
            waiting = int(left / per) + 1 if per else 0
            self.cur_batch = min(max(self.cur_batch * 2, 2 * waiting), cap)
        else:
            # Everything durable was read. The next batch may again take what piles
            # up meanwhile, up to twice this one's records: a sink that wrote a large
            # batch is under a sustained rate, and starting it again from `batch`
            # (doubling back up over several small batches) costs the store several
            # times the CPU per record (each batch writes rows per device and
            # series it holds: 14,600 readings per CPU-second in batches of 8,000
            # against 85,000 in batches of 512,000, 20,000 devices).
            self.cur_batch = max(self.batch, min(cap, 2 * count))
        return parts, count, full

    def turn(self) -> bool:
        """One poll and (maybe) one batch; True when it should go again at once.
        After IDLE_AFTER seconds without a record to write, the sink's idle()."""
        now = time.monotonic()
        self.sink.poll(now)
        parts, count, full = self.gather()
        if parts:
            self.sink.write(parts)
        if count:
            self._last_records = now
            self._idle_told = False
        elif not self._idle_told and now - self._last_records >= IDLE_AFTER:
            self._idle_told = True
            self.sink.idle(now)
        return full

    def run(self) -> None:
        sink = self.sink
        try:
            while not self.stop.is_set():
                try:
                    again = self.turn()
                except Exception as exc:        # noqa: BLE001  (any failure of the target: retry)
                    self._failed(exc)
                    continue
                if self.failing:
                    log.info("%s sink: working again after %d retries", sink.name, self.backoff.failures)
                    self.failing = False
                    self.backoff.reset()
                if not again:
                    self.stop.wait(self.poll_interval)
        finally:
            try:
                sink.close()
            except Exception:                 # noqa: BLE001
                log.exception("%s sink: error while closing", sink.name)
            self.source.close()
            self.done.set()

    def _failed(self, exc: Exception) -> None:
        sink = self.sink
        self.retries += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        try:
            sink.rewind()
        except Exception:                     # noqa: BLE001
            log.exception("%s sink: rewind failed", sink.name)
        self.pos = dict(sink.checkpoints)
        delay = self.backoff.delay()
        if not self.failing:
            self.failing = True
            log.warning("%s sink failing (%s); retrying with backoff (up to %.0f s), "
                        "logged once until it works again", sink.name, self.last_error,
                        self.backoff.cap, exc_info=not isinstance(exc, (OSError, ConnectionError)))
        self.stop.wait(delay)

    # -- figures
    def lag(self) -> int:
        total = 0
        for slot in range(self.sink.nworkers):
            total += max(0, self.source.durable(slot) - self.sink.checkpoints.get(slot, 0))
        return total

    def stats(self) -> dict:
        sink = self.sink
        out = {"written": sink.written, "retries": self.retries, "lag": self.lag(),
               "failing": self.failing, "last_error": self.last_error,
               "skipped_bytes": self.skipped_bytes,
               "checkpoints": dict(sink.checkpoints)}
        out.update(sink.extra_stats())
        return out
