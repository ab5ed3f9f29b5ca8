"""File sink: the readings as rotated newline-delimited JSON files.

Each line is the normalised reading with two more fields, `"_worker"` (the
worker log's slot) and `"_lsn"` (the record's offset in that log): together a
unique key of the record.

Files, per worker log, in the sink's directory:

- `w{worker}-{YYYYmmddTHHMMSSZ}-{offset:020d}.ndjson.part`: the file being
  written (offset: the log offset of its first record);
- renamed to `...ndjson` (without `.part`) when it reaches
  `file_sink_rotate_bytes` or has been open `file_sink_rotate_seconds`: a
  completed file never changes again; consumers read completed files;
- `checkpoint-w{worker}.json`: `{"next_offset", "file", "size", "opened"}`,
  replaced atomically (write, fsync, rename, fsync the directory) after every
  batch, once the batch's lines are fsynced.

Delivery: **at least once**. After a crash the sink resumes from the
checkpoint: the `.part` file is first cut back to the size the checkpoint
recorded (lines written after the last checkpoint are removed and written
again), so completed files hold each record once as long as the file system
keeps what was fsynced; a consumer reading a `.part` file while it is written,
or a file restored from a backup, can see a record twice. Consumers dedupe by
(`_worker`, `_lsn`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from gw.private_files import fsync_directory

from .checkpointfile import read_sink_checkpoint, write_json_atomic
from .errors import PipelineError
from .sink import Part, Sink

log = logging.getLogger("gw.pipeline.file")

PART = ".part"


class _Open:
    __slots__ = ("name", "fd", "size", "opened")

    def __init__(self, name: str, fd: int, size: int, opened: float):
        self.name = name
        self.fd = fd
        self.size = size
        self.opened = opened


class FileSink(Sink):
    name = "file"
    catchup = 4

    def __init__(self, directory: str | Path, nworkers: int, *, rotate_bytes: int = 64 << 20,
                 rotate_seconds: float = 3600.0, clock=time.time):
        super().__init__(nworkers)
        self.dir = Path(directory)
        self.rotate_bytes = max(1, int(rotate_bytes))
        self.rotate_seconds = float(rotate_seconds)
        self.clock = clock
        self.files: dict[int, _Open] = {}
        self.rotated = 0
        self.bytes = 0
        self._state: dict[int, dict] = {}

    def _ckpt_path(self, slot: int) -> Path:
        return self.dir / f"checkpoint-w{slot}.json"

    def open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PipelineError(f"file_sink {self.dir} is not a writable directory: "
                                f"{exc.strerror or exc}") from None
        for slot in range(self.nworkers):
            state = read_sink_checkpoint(self._ckpt_path(slot), "file_sink", "writes")
            if state is None:
                continue
            self.checkpoints[slot] = int(state.get("next_offset", 0))
            self._state[slot] = state

    def _resume(self, slot: int) -> None:
        """At the first write for a log: reopen the checkpoint's .part file, cut
        back to the checkpoint's size."""
        state = self._state.pop(slot, None)
        if not state or not state.get("file"):
            return
        name = state["file"]
        path = self.dir / name
        size = int(state.get("size", 0))
        if not path.exists():
            final = self.dir / name[:-len(PART)] if name.endswith(PART) else None
            if final is not None and final.exists():
                # Crashed between the rename and the checkpoint: it is complete.
                return
            log.warning("file sink: %s named by the checkpoint is gone; starting a new file", path)
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.files[slot] = _Open(name, fd, size, float(state.get("opened", self.clock())))

    def _new_file(self, slot: int, first_offset: int) -> _Open:
        now = self.clock()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        name = f"w{slot}-{stamp}-{first_offset:020d}.ndjson{PART}"
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        f = self.files[slot] = _Open(name, fd, 0, now)
        return f

    def write(self, parts: list[Part]) -> None:
        for slot, records, nxt in parts:
            if slot in self._state:
                self._resume(slot)
            f = self.files.get(slot)
            if records:
                if f is None:
                    f = self._new_file(slot, records[0][0])
                elif os.fstat(f.fd).st_size != f.size:
                    os.ftruncate(f.fd, f.size)       # a failed batch left lines past the checkpoint
                tail = b',"_worker":%d,"_lsn":%d}\n'
                lines = []
                for off, payload in records:
                    body = payload.rstrip()
                    if body[-1:] != b"}" or len(body) < 2:
                        continue                     # not a JSON object: not a reading
                    lines.append(body[:-1] + (tail % (slot, off) if len(body) > 2 else tail[1:] % (slot, off)))
                data = b"".join(lines)
                view = memoryview(data)
                while view:
                    n = os.write(f.fd, view)
                    view = view[n:]
                os.fsync(f.fd)
                self._checkpoint(slot, nxt, f.size + len(data))
                f.size += len(data)          # only once the checkpoint covers it
                self.bytes += len(data)
            else:
                self._checkpoint(slot, nxt, f.size if f else 0)
            self.checkpoints[slot] = nxt
            self.written += len(records)
            if f is not None and f.size >= self.rotate_bytes:
                self._rotate(slot)

    def _checkpoint(self, slot: int, nxt: int, size: int) -> None:
        f = self.files.get(slot)
        write_json_atomic(self._ckpt_path(slot), {
            "next_offset": nxt, "file": f.name if f else None, "size": size if f else 0,
            "opened": f.opened if f else None})

    def _rotate(self, slot: int) -> None:
        """Completes the file: rename without .part (its content is fsynced and
        the checkpoint already covers it), then a checkpoint without a file."""
        f = self.files.pop(slot)
        os.close(f.fd)
        if f.size == 0:
            os.unlink(self.dir / f.name)
        else:
            os.rename(self.dir / f.name, self.dir / f.name[:-len(PART)])
            fsync_directory(self.dir)
            self.rotated += 1
        self._checkpoint(slot, self.checkpoints[slot], 0)

    def poll(self, now: float) -> None:
        wall = self.clock()
        for slot in list(self.files):
            f = self.files[slot]
            if f.size > 0 and wall - f.opened >= self.rotate_seconds:
                self._rotate(slot)
        for slot in list(self._state):
            st = self._state[slot]
            if st.get("file") and wall - float(st.get("opened") or wall) >= self.rotate_seconds:
                self._resume(slot)         # an old .part left by the previous run: complete it
                if slot in self.files:
                    self._rotate(slot)

    def rewind(self) -> None:
        # The checkpoint is written after the data is fsynced; what was written
        # past it (a failed batch) is cut at the next write (size check).
        pass

    def close(self) -> None:
        for f in self.files.values():
            try:
                os.close(f.fd)
            except OSError:
                pass
        self.files.clear()

    def extra_stats(self) -> dict:
        return {"files_completed": self.rotated, "bytes": self.bytes}
