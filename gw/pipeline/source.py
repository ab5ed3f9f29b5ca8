"""The worker logs as one sink sees them: one reader per worker log, the durable offsets.

Worker `slot` appends every accepted reading to `data_dir/wal/{slot}/`
(gw_ext/wal.pyx). A reader must read only up to the worker's durable offset,
published in shared memory (`block.rows[slot, Counter.WAL_DURABLE_OFFSET]`);
`durable(slot)` returns it, and `published(slot)` whether the worker has
published it yet: until its worker has recovered its log after a (re)start,
a slot reads 0 (a fresh stats block) or its previous value, neither of which
says where the log ends. Each sink thread has its own WalSource (readers keep
open files and are not shared between threads); they share one DamageLedger,
which counts and logs the damaged records they skip.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger("gw.pipeline")

Record = tuple[int, bytes]                   # (offset, payload)


def load_wal_module():
    """gw_ext.wal (the compiled log), imported when the pipeline starts."""
    import gw_ext.wal as wal     # noqa: PLC0415  (compiled; absent until built)
    return wal


def worker_dir(data_dir: str | Path, slot: int) -> Path:
    return Path(data_dir) / "wal" / str(slot)


class DamageLedger:
    """Damaged records the readers skipped in the worker logs (a bad length or
    CRC below the durable offset: the disk's doing, not a write in progress).
    Every sink's reader meets the same damage; each byte is counted once, in
    the worker's stats row (WAL_CORRUPT, with WAL_CORRUPT_OFFSET: how far it
    was counted, so a respawned pipeline does not count it again), and each
    damaged place is logged once. Thread-safe (one reader per sink thread).

    rows: the stats block's rows (writable), or None to keep the figures here."""

    def __init__(self, rows=None):
        self.rows = rows
        self._lock = threading.Lock()
        self._upto: dict[int, int] = {}
        self.lost: dict[int, int] = {}

    def _counted_upto(self, slot: int) -> int:
        if self.rows is not None:
            from gw.stats import Counter

            return int(self.rows[slot, Counter.WAL_CORRUPT_OFFSET])
        return self._upto.get(slot, 0)

    def skipped(self, slot: int, start: int, end: int) -> int:
        """A reader of worker `slot`'s log skipped offsets [start, end): the bytes
        newly lost (0 if another sink met them first)."""
        with self._lock:
            upto = self._counted_upto(slot)
            if end <= upto:
                return 0
            lost = end - max(start, upto)
            self.lost[slot] = self.lost.get(slot, 0) + lost
            if self.rows is not None:
                from gw.stats import Counter

                self.rows[slot, Counter.WAL_CORRUPT] += lost
                self.rows[slot, Counter.WAL_CORRUPT_OFFSET] = end
            else:
                self._upto[slot] = end
        log.error("worker %d's log: %d bytes of damaged records at offsets %d..%d cannot be read; "
                  "skipped (those readings are lost), reading goes on after them", slot, lost, start, end)
        return lost


class WalSource:
    def __init__(self, data_dir: str | Path, nworkers: int, durable: Callable[[int], int], wal,
                 damage: DamageLedger | None = None, published: Callable[[int], bool] | None = None):
        self.data_dir = Path(data_dir)
        self.nworkers = nworkers
        self.durable = durable
        self.published = published or (lambda slot: True)
        self.wal = wal
        self.damage = damage if damage is not None else DamageLedger()
        self._readers: dict[int, object] = {}

    def reader(self, slot: int):
        r = self._readers.get(slot)
        if r is None:
            d = worker_dir(self.data_dir, slot)
            if not d.is_dir():
                return None
            r = self._readers[slot] = self.wal.WalReader(str(d))
        return r

    def read(self, slot: int, offset: int, up_to: int, max_records: int) -> tuple[list[Record], int]:
        """Records starting at `offset` and ending at or before `up_to`, at most
        max_records: ([(offset, payload)], the offset to read next)."""
        r = self.reader(slot)
        if r is None:
            return [], offset
        try:
            records, next_offset = r.read(offset, up_to, max_records=max_records)
        except Exception as exc:
            deleted = getattr(self.wal, "OffsetDeletedError", None)
            if deleted is None or not isinstance(exc, deleted):
                raise
            # Retention (wal_retention_bytes) deleted records this sink had not
            # read: go on from the oldest record kept; the runner counts the gap.
            first = int(r.first_offset())
            if first <= offset:
                raise
            log.error("worker %d's log: offsets %d..%d were deleted before this sink read them (%s)",
                      slot, offset, first, exc)
            if first >= up_to:
                return [], first
            records, next_offset = r.read(first, up_to, max_records=max_records)
        take_skips = getattr(r, "take_skips", None)
        if take_skips is not None:
            for start, end in take_skips():
                self.damage.skipped(slot, int(start), int(end))
        return records, int(next_offset)

    def close(self) -> None:
        for r in self._readers.values():
            close = getattr(r, "close", None)
            if close is not None:
                close()
        self._readers.clear()
