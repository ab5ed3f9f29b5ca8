"""Retained messages and clean_session=0 sessions in the data directory, so
they survive a restart of `gw serve` (and a worker's crash).

- `retained.msgpack`: the retained store, written by worker 0 (every worker
  holds the whole store).
- `sessions-N.msgpack`: worker N's persistent sessions, each as the state the
  workers already exchange to move a session (see gw_ext/registry.pxi), in a
  map `{"format": 2, "sessions": [[client id, state], ...]}`. A file of the
  previous version (a bare list, states with 16-bit counts) is read and
  converted.

Each file is written when something changed, at most every persist_interval
seconds and when the worker stops, atomically (a temporary file, fsync,
rename). At start a worker loads the retained store and the session files
numbered like it modulo the worker count (so a server restarted with fewer
workers loses none), and takes over the files it loaded.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from pathlib import Path

import msgspec

log = logging.getLogger("gw.persistence")

RETAINED = "retained.msgpack"
SESSIONS = "sessions-{}.msgpack"
SESSIONS_FORMAT = 2     # the state layout of gw_ext/registry.pxi (SESSION_STATE_VERSION)


def upgrade_session_state_v1(state: bytes) -> bytes:
    """A session state of the first version (16-bit subscription and QoS 2 id
    counts, no version byte) in the current layout. ValueError when malformed."""
    try:
        pos = 0
        (nsubs,) = struct.unpack_from("<H", state, pos)
        pos += 2
        subs_start = pos
        for _ in range(nsubs):
            (flen,) = struct.unpack_from("<H", state, pos)
            pos += 3 + flen
        subs = state[subs_start:pos]
        msgs_start = pos
        (_next_pid, nmsgs) = struct.unpack_from("<HI", state, pos)
        pos += 6
        for _ in range(nmsgs):
            (_pid, _qos, _st, tlen, plen) = struct.unpack_from("<HBBHI", state, pos)
            pos += 10 + tlen + plen
        msgs = state[msgs_start:pos]
        (nq2,) = struct.unpack_from("<H", state, pos)
        pos += 2
        ids = state[pos:pos + 2 * nq2]
        if len(ids) != 2 * nq2 or len(subs) + len(msgs) + 2 + len(ids) > len(state):
            raise ValueError("cut short")
    except struct.error as exc:
        raise ValueError(str(exc)) from None
    return (struct.pack("<BI", SESSIONS_FORMAT, nsubs) + subs + msgs + struct.pack("<I", nq2) + ids)


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
            for topic, qos, payload in retained:
                self.worker.retain(topic, qos, payload)
        saved = []
        for path in sorted(self.dir.glob("sessions-*.msgpack")):
            try:
                n = int(path.stem.split("-", 1)[1])
            except ValueError:
                continue
            if n % self.workers != self.slot:
                continue
            sessions = _read(path)
            if isinstance(sessions, dict) and sessions.get("format") == SESSIONS_FORMAT:
                saved.extend((cid, state) for cid, state in sessions.get("sessions", ()))
            elif isinstance(sessions, list):        # the previous version's file
                for cid, state in sessions:
                    try:
                        saved.append((cid, upgrade_session_state_v1(state)))
                    except ValueError as exc:
                        log.error("%s: session %r is malformed (%s); not restored", path, cid, exc)
            elif sessions is not None:
                log.error("%s: unknown format; not restored", path)
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
            data = msgspec.msgpack.encode({"format": SESSIONS_FORMAT,
                                           "sessions": self.worker.snapshot_sessions()})
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
