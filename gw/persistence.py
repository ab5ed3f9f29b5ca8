"""Retained messages and clean_session=0 sessions in the data directory, so
they survive a restart of `gw serve` (and a worker's crash).

- `retained.msgpack`: the retained store, written by worker 0 (every worker
  holds the whole store): `[topic, qos, payload]`, or `[topic, qos, payload,
  extras]` for an MQTT 5.0 message with properties (gw_ext/loop.pxd, `Msg`:
  its expiry as wall-clock time, then its property block).
- `sessions-N.msgpack`: worker N's persistent sessions, each as the state the
  workers already exchange to move a session (see gw_ext/worker/session_state.pyx), in a
  map `{"format": 2, "sessions": [[client id, state], ...]}`. A file of the
  previous version (a bare list, states with 16-bit counts) is read and
  converted.

When something changed, at most every persist_interval seconds, the loop
takes a snapshot (it must read the worker's state) and hands it to the
worker's writer thread (gw_ext/filewriter.pyx), which writes it atomically (a
temporary file, fsync, rename, fsync of the directory) while the loop goes
on: the loop never waits for the disk. A newer snapshot replaces one still
waiting. A failed write is counted, logged (at most every 10 s) and retried
with the next snapshot. When the worker stops, a last snapshot is written
before it exits, to the end. At start a worker loads the retained store and
the session files numbered like it modulo the worker count (so a server
restarted with fewer workers loses none), and takes over the files it
loaded: they are deleted once its own file holding their sessions is durable.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from pathlib import Path

import msgspec

from gw_ext.filewriter import FileWriter
from gw.stats import Counter

log = logging.getLogger("gw.persistence")
ERROR_LOG_INTERVAL = 10.0           # seconds between two messages about failed writes

RETAINED = "retained.msgpack"
SESSIONS = "sessions-{}.msgpack"
SESSIONS_FORMAT = 5     # the state layout of gw_ext/worker/session_state.pyx (SESSION_STATE_VERSION)
# 2: states without the session's user name (read as anonymous); 3: without MQTT 5.0 messages' properties;
# 4: without the expiry tail (protocol version, Session Expiry Interval, when its client went away).
SESSIONS_FORMATS_READ = (2, 3, 4, 5)


def upgrade_session_state_v1(state: bytes) -> bytes:
    """A session state of the first version (16-bit subscription and QoS 2 id
    counts, no version byte) in layout 2 (no user name: anonymous). ValueError when malformed."""
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
    return (struct.pack("<BI", 2, nsubs) + subs + msgs + struct.pack("<I", nq2) + ids)


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
    def __init__(self, worker, slot: int, workers: int, data_dir: str, interval: float, counters=None):
        self.worker = worker
        self.slot = slot
        self.dir = Path(data_dir)
        self.interval = interval
        self.last = 0.0
        self.taken_over: list[Path] = []
        self.takeover_gen = 0           # the sessions file's generation that holds the taken-over sessions
        self.workers = workers
        self.counters = counters        # the worker's stats row (PERSIST_WRITES, PERSIST_ERRORS)
        self.writer = FileWriter()
        self.sessions_path = self.dir / SESSIONS.format(slot)
        self.retained_path = self.dir / RETAINED
        self.retry = {self.sessions_path: False, self.retained_path: False}
        self.failures = 0               # failed writes not yet in a log message
        self.states: dict | None = None  # slot -> (client id, state) as last serialized
        self.last_error_log = 0.0

    def session_files(self) -> list[Path]:
        """data_dir's sessions-*.msgpack, sorted (read by name: a glob would compile a
        pattern, work the worker's start would do on pages the master shares)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return [self.dir / name for name in sorted(names)
                if name.startswith("sessions-") and name.endswith(".msgpack") and len(name) >= 17]

    def load(self) -> None:
        retained = _read(self.retained_path)
        if retained:
            for entry in retained:
                if isinstance(entry, (list, tuple)) and len(entry) in (3, 4):
                    self.worker.retain(*entry)
        saved = []
        for path in self.session_files():
            try:
                n = int(path.stem.split("-", 1)[1])
            except ValueError:
                continue
            if n % self.workers != self.slot:
                continue
            sessions = _read(path)
            if isinstance(sessions, dict) and sessions.get("format") in SESSIONS_FORMATS_READ:
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
        """Called from the loop about once a second, and with final=True once
        the loop has stopped (then it returns when everything is on disk)."""
        self.collect()
        if not self.interval and not final:
            return
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        sessions_changed, retained_changed = self.worker.changed
        if (sessions_changed or final or self.retry[self.sessions_path]
                or (self.taken_over and not self.takeover_gen)):
            data = msgspec.msgpack.encode({"format": SESSIONS_FORMAT, "sessions": self.session_states()})
            self.retry[self.sessions_path] = False
            gen = self.writer.submit(self.sessions_path, data)
            if self.taken_over and not self.takeover_gen:
                self.takeover_gen = gen
        if self.slot == 0 and (retained_changed or final or self.retry[self.retained_path]):
            store = self.worker.retained_messages
            data = msgspec.msgpack.encode([(t, *entry) for t, entry in store.items()
                                           if not t.startswith(b"$SYS/")])
            self.worker.retained_saved()
            self.retry[self.retained_path] = False
            self.writer.submit(self.retained_path, data)
        if final:
            self.writer.close()         # writes what is pending, to the end
            self.collect()
            if self.failures:
                self.log_failures(force=True)

    def session_states(self) -> list:
        """[(client id, state)] of every clean_session=0 session. The first call
        serializes them all; later ones only those changed since (the worker
        marks them), the others' states kept from before."""
        if self.states is None:
            self.states = {slot: (cid, state) for slot, cid, state in self.worker.snapshot_sessions()}
        else:
            for slot, cid, state in self.worker.snapshot_sessions(changed_only=True):
                if state is None:
                    self.states.pop(slot, None)
                else:
                    self.states[slot] = (cid, state)
        return list(self.states.values())

    def collect(self) -> None:
        """Takes the writer's finished writes: counts them; a failure is logged
        and retried with the next snapshot; once the sessions of the files taken
        over at start are durable in ours, those files go."""
        for path, gen, err in self.writer.results():
            path = Path(path)
            if err == 0:
                self.count(Counter.PERSIST_WRITES)
                if path == self.sessions_path and self.takeover_gen and gen >= self.takeover_gen:
                    for old in self.taken_over:
                        old.unlink(missing_ok=True)
                    self.taken_over = []
                continue
            self.count(Counter.PERSIST_ERRORS)
            self.retry[path] = True
            self.failures += 1
            self.last_error = (path, err)
            self.log_failures()

    def count(self, counter) -> None:
        if self.counters is not None:
            self.counters[counter] += 1

    def log_failures(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self.last_error_log and now - self.last_error_log < ERROR_LOG_INTERVAL:
            return
        self.last_error_log = now
        path, err = self.last_error
        log.error("worker %d: writing %s failed: %s (%d failed writes since the last message); "
                  "the previous file is kept, the next snapshot retries", self.slot, path,
                  os.strerror(err), self.failures)
        self.failures = 0
