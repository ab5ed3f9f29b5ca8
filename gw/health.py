"""What `GET /healthz` reports: one entry per component, each ok or not.

- workers: every worker slot has a live process whose loop turned recently
  (its WORKER_HEARTBEAT_MS gauge in the stats block, written every loop turn;
  a worker stuck in a long call stops it);
- listeners: the listeners this worker serves, from the configuration;
- data_dir: a file can be created in it (persistence, and the pipeline's log).

The answer is computed per request from shared memory and two syscalls on
the data directory: cheap enough for a probe every second.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from gw.stats import Counter, StatsBlock

HEARTBEAT_STALE_S = 5.0     # a worker whose loop has not turned for this long is unhealthy


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Health:
    def __init__(self, block: StatsBlock, listeners: dict[str, str], data_dir: str, worker_index: int):
        self.block = block
        self.listeners = listeners          # name -> "host:port", as this worker serves them
        # Strings, not Paths: made at a worker's start, where pathlib's code would
        # run in the worker's own pages (the path is shown by data_dir_writable).
        self._data_dir = os.fspath(data_dir)
        self.worker_index = worker_index
        self._probe = os.path.join(self._data_dir, f".health-{os.getpid()}")

    @property
    def data_dir(self) -> Path:
        return Path(self._data_dir)

    def workers(self) -> tuple[bool, dict]:
        from gw.stats import Layout

        header = self.block.header
        n = int(header[Layout.H_WORKERS])
        now_ms = time.monotonic() * 1000
        slots = []
        alive = 0
        for slot in range(n):
            pid = int(header[Layout.H_WORKER_PIDS + slot])
            beat = int(self.block.matrix[slot, Counter.WORKER_HEARTBEAT_MS])
            age = (now_ms - beat) / 1000 if beat else None
            ok = bool(pid) and _pid_alive(pid) and age is not None and age < HEARTBEAT_STALE_S
            alive += ok
            slots.append({"slot": slot, "pid": pid, "ok": ok,
                          "loop_age_seconds": round(age, 3) if age is not None else None})
        return alive == n, {"ok": alive == n, "alive": alive, "expected": n, "slots": slots}

    def data_dir_writable(self) -> tuple[bool, dict]:
        try:
            fd = os.open(self._probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            os.close(fd)
            os.unlink(self._probe)
        except OSError as exc:
            return False, {"ok": False, "path": str(self.data_dir), "error": exc.strerror or str(exc)}
        return True, {"ok": True, "path": str(self.data_dir)}

    def __call__(self) -> tuple[bool, dict]:
        workers_ok, workers = self.workers()
        data_ok, data = self.data_dir_writable()
        listeners = {"ok": bool(self.listeners), "serving": dict(self.listeners)}
        ok = workers_ok and data_ok and listeners["ok"]
        return ok, {"workers": workers, "listeners": listeners, "data_dir": data,
                    "worker": self.worker_index}
