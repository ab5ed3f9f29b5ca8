"""Retained messages and clean_session=0 sessions in the data directory, so
they survive a restart of `gw serve` (and a worker's crash).

- `retained.msgpack`: the retained store, written by worker 0 (every worker
  holds the whole store).
- `sessions-N.msgpack`: worker N's persistent sessions, each as the state the
  workers already exchange to move a session (see gw_ext/registry.pxi).

Each file is written when something changed, at most every persist_interval
seconds and when the worker stops, atomically (a temporary file, fsync,
rename). At start a worker loads the retained store and the session files
numbered like it modulo the worker count (so a server restarted with fewer
workers loses none), and takes over the files it loaded.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgspec

log = logging.getLogger("gw.persistence")

RETAINED = "retained.msgpack"
SESSIONS = "sessions-{}.msgpack"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _read(path: Path):
    try:
        return msgspec.msgpack.decode(path.read_bytes())
    except FileNotFoundError:
        return None
    except (msgspec.DecodeError, OSError) as exc:
        # Never replay garbage; keep the file aside for a human to look at.
        aside = path.with_name(path.name + f".corrupt-{int(time.time())}")
        os.replace(path, aside)
        log.error("%s is unreadable (%s); moved to %s, starting without it", path, exc, aside.name)
        return None


class Persistence:
    def __init__(self, worker, slot: int, workers: int, data_dir: str, interval: float):
        self.worker = worker
        self.slot = slot
        self.dir = Path(data_dir)
        self.interval = interval
        self.last = 0.0
        self.taken_over: list[Path] = []
        self.workers = workers

    def load(self) -> None:
        retained = _read(self.dir / RETAINED)
        if retained:
            store = self.worker.retained_messages
            for topic, qos, payload in retained:
                store[topic] = (qos, payload)
        saved = []
        for path in sorted(self.dir.glob("sessions-*.msgpack")):
            try:
                n = int(path.stem.split("-", 1)[1])
            except ValueError:
                continue
            if n % self.workers != self.slot:
                continue
            sessions = _read(path)
            if sessions:
                saved.extend((cid, state) for cid, state in sessions)
            if n != self.slot:
                self.taken_over.append(path)
        if saved:
            self.worker.restore_sessions(saved)
            log.info("worker %d: restored %d persistent sessions", self.slot, len(saved))
        self.worker.retained_saved()

    def tick(self, final: bool = False) -> None:
        if not self.interval and not final:
            return
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        sessions_changed, retained_changed = self.worker.changed
        if sessions_changed or final or self.taken_over:
            data = msgspec.msgpack.encode(self.worker.snapshot_sessions())
            _write_atomic(self.dir / SESSIONS.format(self.slot), data)
            for path in self.taken_over:
                path.unlink(missing_ok=True)
            self.taken_over = []
        if self.slot == 0 and (retained_changed or final):
            store = self.worker.retained_messages
            data = msgspec.msgpack.encode([(t, q, p) for t, (q, p) in store.items()
                                           if not t.startswith(b"$SYS/")])
            _write_atomic(self.dir / RETAINED, data)
            self.worker.retained_saved()
