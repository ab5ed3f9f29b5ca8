"""The shared-memory stats block: one row of counters per worker slot.

The master creates the block in /dev/shm before forking, so every worker maps
the same pages; each worker writes only its own row (gw_ext/loop.pyx, plain
stores, no locks), and readers sum the rows. `gw stats` finds a running
server through the pid file in its data directory.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enum import IntEnum

import gw_ext.stats as _consts

# The .pxd is the one list of counters; C code uses its constants, Python these enums.
_LAYOUT = ("STATS_", "HEADER_", "MAX_WORKERS", "H_")
Layout = IntEnum("Layout", {k: getattr(_consts, k) for k in dir(_consts)
                            if k.isupper() and k.startswith(_LAYOUT)})
Counter = IntEnum("Counter", sorted(((k, getattr(_consts, k)) for k in dir(_consts)
                                     if k.isupper() and not k.startswith(_LAYOUT)),
                                    key=lambda kv: kv[1]))

N_COUNTERS = int(Counter.N_COUNTERS)
HEADER_WORDS = int(Layout.HEADER_WORDS)
MAX_WORKERS = int(Layout.MAX_WORKERS)
GAUGES = (Counter.CONNS_CURRENT, Counter.SESSIONS_CURRENT)
PIDFILE = "gw.pid"


def shm_path(master_pid: int) -> Path:
    return Path("/dev/shm") / f"gw-{master_pid}.stats"


class StatsBlock:
    def __init__(self, path: Path, mm: mmap.mmap, writable: bool):
        self.path = path
        self._mm = mm
        self.header = np.frombuffer(mm, dtype=np.int64, count=HEADER_WORDS)
        nworkers = int(self.header[Layout.H_WORKERS])
        self.rows = np.frombuffer(mm, dtype=np.uint64, count=nworkers * N_COUNTERS,
                                  offset=HEADER_WORDS * 8).reshape(nworkers, N_COUNTERS)
        if not writable:
            self.header.flags.writeable = False
            self.rows.flags.writeable = False

    @classmethod
    def create(cls, nworkers: int, master_pid: int) -> "StatsBlock":
        if nworkers > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} workers")
        path = shm_path(master_pid)
        size = (HEADER_WORDS + nworkers * N_COUNTERS) * 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        header = np.frombuffer(mm, dtype=np.int64, count=HEADER_WORDS)
        header[Layout.H_MAGIC] = Layout.STATS_MAGIC
        header[Layout.H_VERSION] = Layout.STATS_VERSION
        header[Layout.H_WORKERS] = nworkers
        header[Layout.H_COUNTERS] = N_COUNTERS
        header[Layout.H_MASTER_PID] = master_pid
        header[Layout.H_STARTED] = int(time.time())
        del header
        return cls(path, mm, writable=True)

    @classmethod
    def open(cls, master_pid: int) -> "StatsBlock":
        path = shm_path(master_pid)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        header = np.frombuffer(mm, dtype=np.int64, count=HEADER_WORDS)
        if header[Layout.H_MAGIC] != Layout.STATS_MAGIC or header[Layout.H_VERSION] != Layout.STATS_VERSION:
            raise ValueError(f"{path} is not a gw stats block of this version")
        if header[Layout.H_COUNTERS] != N_COUNTERS:
            raise ValueError(f"{path} was written by a gw with other counters")
        del header
        return cls(path, mm, writable=False)

    def totals(self) -> np.ndarray:
        return self.rows.sum(axis=0, dtype=np.uint64)

    def reset_gauges(self, slot: int) -> None:
        """A worker died: its connections died with it; its totals stay counted."""
        for gauge in GAUGES:
            self.rows[slot, gauge] = 0

    def set_worker_pid(self, slot: int, pid: int) -> None:
        self.header[Layout.H_WORKER_PIDS + slot] = pid

    def worker_pids(self) -> list[int]:
        n = int(self.header[Layout.H_WORKERS])
        return [int(p) for p in self.header[Layout.H_WORKER_PIDS:Layout.H_WORKER_PIDS + n] if p]

    def close(self, unlink: bool = False) -> None:
        del self.header, self.rows
        self._mm.close()
        if unlink:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


@dataclass
class Snapshot:
    """Figures of one [stats] line."""
    clients: int
    peak: int
    memory_mb: float
    conn_rate: float
    msg_in: float
    msg_out: float
    totals: dict

    def line(self) -> str:
        return (f"[stats] clients: {self.clients} | peak: {self.peak} | memory: {self.memory_mb:.1f} MB"
                f" | conn_rate: {self.conn_rate:.0f}/s | msg_in: {self.msg_in:.0f}/s"
                f" | msg_out: {self.msg_out:.0f}/s")

    def as_dict(self) -> dict:
        return {"clients": self.clients, "peak": self.peak, "memory_mb": round(self.memory_mb, 2),
                "conn_rate": self.conn_rate, "msg_in": self.msg_in, "msg_out": self.msg_out,
                "counters": self.totals}


def rss_bytes(pids: list[int]) -> int:
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class Aggregator:
    """Turns successive totals into rates; the master calls tick() once per interval."""

    def __init__(self, block: StatsBlock):
        self.block = block
        self.prev = block.totals().astype(np.int64)
        self.prev_t = time.monotonic()

    def tick(self) -> Snapshot:
        now = time.monotonic()
        totals = self.block.totals().astype(np.int64)
        dt = max(now - self.prev_t, 1e-3)
        delta = totals - self.prev
        self.prev, self.prev_t = totals, now
        header = self.block.header
        clients = int(totals[Counter.CONNS_CURRENT])
        peak = max(int(header[Layout.H_PEAK]), clients)
        # Only the master (writable block) keeps the peak; `gw stats` maps it read-only.
        if header.flags.writeable and clients > header[Layout.H_PEAK]:
            header[Layout.H_PEAK] = clients
        pids = [int(header[Layout.H_MASTER_PID])] + self.block.worker_pids()
        return Snapshot(
            clients=clients,
            peak=peak,
            memory_mb=rss_bytes(pids) / 1e6,
            conn_rate=float(delta[Counter.CONNS_ACCEPTED]) / dt,
            msg_in=float(delta[Counter.MSGS_IN]) / dt,
            msg_out=float(delta[Counter.MSGS_OUT]) / dt,
            totals=counter_dict(totals),
        )


def counter_dict(totals) -> dict:
    out = {}
    for c in Counter:
        if c in (Counter.PKT_IN, Counter.PKT_OUT, Counter.MALFORMED_BY_REASON, Counter.N_COUNTERS):
            continue
        out[c.name.lower()] = int(totals[c])
    for base, label in ((Counter.PKT_IN, "packets_in"), (Counter.PKT_OUT, "packets_out")):
        out[label] = {name: int(totals[base + t]) for t, name in PACKET_NAMES.items()}
    out["malformed"] = {name: int(totals[Counter.MALFORMED_BY_REASON + r])
                        for r, name in MALFORMED_REASONS.items()}
    return out


PACKET_NAMES = {1: "connect", 2: "connack", 3: "publish", 4: "puback", 5: "pubrec", 6: "pubrel",
                7: "pubcomp", 8: "subscribe", 9: "suback", 10: "unsubscribe", 11: "unsuback",
                12: "pingreq", 13: "pingresp", 14: "disconnect"}
MALFORMED_REASONS = {1: "fixed_header", 2: "remaining_length", 3: "utf8", 4: "protocol",
                     5: "topic", 6: "qos", 7: "packet_id", 8: "no_topic_filter"}


def read_running(data_dir: str) -> tuple[int, StatsBlock]:
    """The master pid and stats block of the gw serving from data_dir."""
    pidfile = Path(data_dir) / PIDFILE
    try:
        pid = int(pidfile.read_text().strip())
    except FileNotFoundError:
        raise LookupError(f"no running gw: {pidfile} does not exist") from None
    except ValueError:
        raise LookupError(f"{pidfile} does not hold a pid") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise LookupError(f"no running gw: pid {pid} from {pidfile} is gone") from None
    except PermissionError:
        pass
    try:
        return pid, StatsBlock.open(pid)
    except FileNotFoundError:
        raise LookupError(f"gw pid {pid} has no stats block at {shm_path(pid)}") from None
