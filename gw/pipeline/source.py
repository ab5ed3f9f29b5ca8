"""The worker logs as one sink sees them: one reader per worker log, the durable offsets.

Worker `slot` appends every accepted reading to `data_dir/wal/{slot}/`
(gw_ext/wal.pyx). A reader must read only up to the worker's durable offset,
published in shared memory (`block.rows[slot, Counter.WAL_DURABLE_OFFSET]`);
`durable(slot)` returns it, and `published(slot)` whether the worker has
published it yet: until its worker has recovered its log after a (re)start,
a slot reads 0 (a fresh stats block) or its previous value, neither of which
says where the log ends. Each sink thread has its own WalSource (readers keep
open files and are not shared between threads).
"""

from __future__ import annotations

import logging
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


class WalSource:
    def __init__(self, data_dir: str | Path, nworkers: int, durable: Callable[[int], int], wal,
                 published: Callable[[int], bool] | None = None):
        self.data_dir = Path(data_dir)
        self.nworkers = nworkers
        self.durable = durable
        self.published = published or (lambda slot: True)
        self.wal = wal
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
        return records, int(next_offset)

    def close(self) -> None:
        for r in self._readers.values():
            close = getattr(r, "close", None)
            if close is not None:
                close()
        self._readers.clear()
