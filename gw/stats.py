"""The shared-memory stats block: one row of counters per worker slot.

The master creates the block in /dev/shm before forking, so every worker maps
the same pages; each worker writes only its own row (gw_ext/loop.pyx, plain
stores, no locks), and readers sum the rows. `gw stats` finds a running
server through the pid file in its data directory.

The block is read and written through memoryviews (`header`, `matrix`,
`row(slot)`) and summed in C (`totals()`): the server's processes never
import numpy for it. `rows` gives the same words as a numpy array, for tools
and tests.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import gw_ext.stats as _consts

# The .pxd is the one list of counters; C code uses its constants, Python these enums.
# Layout: the block's header words and the histogram / status-slot geometry;
# Counter: every other integer constant (row indices, with N_COUNTERS). The
# tuples (HIST_BOUNDS_NS, HTTP_STATUS_CODES) are neither.
_LAYOUT = ("STATS_", "HEADER_", "MAX_WORKERS", "H_", "HIST_WORDS", "HIST_BUCKETS", "HIST_SUM",
           "HIST_COUNT", "HTTP_STATUS_", "LIM_", "N_LIMITS", "WS_REFUSED_", "N_WS_", "WS_CLOSE_SLOT_",
           "DISC5_", "N_DISC5")
_INTS = {k: getattr(_consts, k) for k in dir(_consts)
         if k.isupper() and type(getattr(_consts, k)) is int}
Layout = IntEnum("Layout", {k: v for k, v in _INTS.items() if k.startswith(_LAYOUT)})
Counter = IntEnum("Counter", sorted(((k, v) for k, v in _INTS.items() if not k.startswith(_LAYOUT)),
                                    key=lambda kv: kv[1]))

N_COUNTERS = int(Counter.N_COUNTERS)
HEADER_WORDS = int(Layout.HEADER_WORDS)
MAX_WORKERS = int(Layout.MAX_WORKERS)
# Gauges: set, not accumulated, by a worker; a dead worker's are zeroed (its
# connections, sessions and index died with it; a respawned worker counts its
# restored sessions again). All but the per-worker ones are summed over rows.
GAUGES = (Counter.CONNS_CURRENT, Counter.SESSIONS_CURRENT, Counter.SUBSCRIPTIONS_CURRENT,
          Counter.SESSIONS_AWAY, Counter.WORKER_HEARTBEAT_MS, Counter.ACKS_HELD, Counter.QUERIES_PENDING,
          Counter.SUBSCRIPTION_INDEX_BYTES, Counter.RATE_PAUSED, Counter.STORE_BEHIND,
          Counter.SHARED_GROUPS, Counter.SHARED_MEMBERS, Counter.WILLS_DELAY_PENDING)
PER_WORKER = (Counter.WORKER_HEARTBEAT_MS, Counter.WAL_DURABLE_OFFSET,     # read per row;
              Counter.WAL_APPENDED_OFFSET, Counter.WAL_CORRUPT_OFFSET,    # a sum means nothing
              Counter.STORE_CHECKPOINT)
HIST_WORDS = int(Layout.HIST_WORDS)
HIST_BUCKETS = int(Layout.HIST_BUCKETS)
HISTOGRAMS = (Counter.HIST_INGEST, Counter.HIST_DELIVER, Counter.HIST_LOOP_TURN)
HIST_BOUNDS_NS = _consts.HIST_BOUNDS_NS            # finite bucket bounds; the last bucket is +Inf
HIST_BOUNDS_SECONDS = tuple(b / 1e9 for b in HIST_BOUNDS_NS)
HTTP_STATUS_CODES = _consts.HTTP_STATUS_CODES      # (200, 202, ..., 505); slot 15: any other
HTTP_STATUS_SLOTS = int(Layout.HTTP_STATUS_SLOTS)
HTTP_STATUS_OTHER = int(Layout.HTTP_STATUS_OTHER)
_STATUS_SLOT = {code: i for i, code in enumerate(HTTP_STATUS_CODES)}
# Counters that are the first of a range of words (read as a whole, never as one figure).
RANGES = {Counter.PKT_IN: 16, Counter.PKT_OUT: 16, Counter.MALFORMED_BY_REASON: 16, Counter.LIMITS: 16,
          Counter.HTTP_REQUESTS: HTTP_STATUS_SLOTS, Counter.INGEST_REQUESTS: HTTP_STATUS_SLOTS,
          Counter.WS_REFUSED: int(Layout.N_WS_REFUSED), Counter.WS_CLOSES: int(Layout.N_WS_CLOSE_SLOTS),
          Counter.MQTT5_DISCONNECTS: int(Layout.N_DISC5), Counter.MQTT5_BAD_PACKETS: 19,
          Counter.HIST_INGEST: HIST_WORDS, Counter.HIST_DELIVER: HIST_WORDS, Counter.HIST_LOOP_TURN: HIST_WORDS}


def http_status_index(code: int) -> int:
    """The slot of an HTTP status in HTTP_REQUESTS / INGEST_REQUESTS (as the .pxd's)."""
    return _STATUS_SLOT.get(code, HTTP_STATUS_OTHER)


def hist_observe(row, hist: int, ns: int) -> None:
    """Counts one observation of `ns` nanoseconds in a row's histogram (the .pxd's code)."""
    _consts.observe(row, int(hist), ns)


def monotonic_ms() -> int:
    """CLOCK_MONOTONIC in ms: the clock of WORKER_HEARTBEAT_MS (system-wide)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000


PIDFILE = "gw.pid"


def shm_path(master_pid: int) -> Path:
    return Path("/dev/shm") / f"gw-{master_pid}.stats"


class StatsBlock:
    """The block mapped: `header` (int64 words) and `matrix` (a workers x
    N_COUNTERS view of uint64 words), both memoryviews over the mapping,
    read-only in a reader (`gw stats`)."""

    def __init__(self, path: Path, mm: mmap.mmap, writable: bool):
        self.path = path
        self._mm = mm
        self.writable = writable
        view = memoryview(mm)
        if not writable:
            view = view.toreadonly()
        self._view = view
        self.header = view[:HEADER_WORDS * 8].cast("q")
        self.nworkers = nworkers = int(self.header[Layout.H_WORKERS])
        self.matrix = view[HEADER_WORDS * 8:(HEADER_WORDS + nworkers * N_COUNTERS) * 8].cast(
            "L", (nworkers, N_COUNTERS))

    def row(self, slot: int) -> memoryview:
        """One worker's row: N_COUNTERS uint64 words (what its loop writes)."""
        if not 0 <= slot < self.nworkers:
            raise IndexError(f"no worker slot {slot} (the block has {self.nworkers})")
        start = (HEADER_WORDS + slot * N_COUNTERS) * 8
        return self._view[start:start + N_COUNTERS * 8].cast("L")

    def column(self, counter: int) -> list[int]:
        """One word of every row, in slot order."""
        return [self.matrix[slot, counter] for slot in range(self.nworkers)]

    @property
    def rows(self):
        """The rows as a (workers x N_COUNTERS) numpy uint64 array over the same
        memory (imports numpy: for tools and tests; the server's processes use
        `matrix`, `row` and `totals`)."""
        import numpy as np

        return np.asarray(self.matrix)

    @classmethod
    def create(cls, nworkers: int, master_pid: int) -> "StatsBlock":
        if nworkers > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} workers")
        path = shm_path(master_pid)
        size = (HEADER_WORDS + nworkers * N_COUNTERS) * 8
        # Exclusively, readable by this user only (gw stats runs as the same user). A
        # block of that name is left by a dead run whose master had this pid (a
        # running one would be this process): replaced.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            os.unlink(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        header = memoryview(mm)[:HEADER_WORDS * 8].cast("q")
        header[Layout.H_MAGIC] = Layout.STATS_MAGIC
        header[Layout.H_VERSION] = Layout.STATS_VERSION
        header[Layout.H_WORKERS] = nworkers
        header[Layout.H_COUNTERS] = N_COUNTERS
        header[Layout.H_MASTER_PID] = master_pid
        header[Layout.H_STARTED] = int(time.time())
        header.release()
        return cls(path, mm, writable=True)

    @classmethod
    def open(cls, master_pid: int) -> "StatsBlock":
        path = shm_path(master_pid)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_WORDS * 8:
                raise ValueError(f"{path} is not a gw stats block of this version")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        header = memoryview(mm).toreadonly()[:HEADER_WORDS * 8].cast("q")
        try:
            if header[Layout.H_MAGIC] != Layout.STATS_MAGIC or header[Layout.H_VERSION] != Layout.STATS_VERSION:
                raise ValueError(f"{path} is not a gw stats block of this version")
            if header[Layout.H_COUNTERS] != N_COUNTERS:
                raise ValueError(f"{path} was written by a gw with other counters")
            if not 0 <= header[Layout.H_WORKERS] <= MAX_WORKERS or \
                    size < (HEADER_WORDS + header[Layout.H_WORKERS] * N_COUNTERS) * 8:
                raise ValueError(f"{path} is shorter than its header says")
        finally:
            header.release()
        return cls(path, mm, writable=False)

    def totals(self) -> list[int]:
        """Every word summed over the rows (uint64 arithmetic, as the words wrap)."""
        return _consts.column_sums(self.matrix)

    def reset_gauges(self, slot: int) -> None:
        """A worker died: its connections died with it; its totals stay counted."""
        for gauge in GAUGES:
            self.matrix[slot, gauge] = 0

    def heartbeat_ages_ms(self, now_ms: int | None = None) -> list[int | None]:
        """Per worker slot: ms since its last tick (WORKER_HEARTBEAT_MS), None if
        it never ticked or is dead (the master zeroes a dead worker's)."""
        now_ms = monotonic_ms() if now_ms is None else now_ms
        return [None if hb == 0 else max(now_ms - hb, 0)
                for hb in self.column(Counter.WORKER_HEARTBEAT_MS)]

    def set_worker_pid(self, slot: int, pid: int) -> None:
        self.header[Layout.H_WORKER_PIDS + slot] = pid

    def worker_pids(self) -> list[int]:
        return [p for p in self.header[Layout.H_WORKER_PIDS:Layout.H_WORKER_PIDS + self.nworkers].tolist() if p]

    def deaths(self) -> dict:
        """Exits of workers and of the pipeline process other than the master's
        own orderly stop, since the master started (it counts them when it reaps)."""
        return {"worker_deaths": int(self.header[Layout.H_WORKER_DEATHS]),
                "pipeline_deaths": int(self.header[Layout.H_PIPELINE_DEATHS])}

    def sinks(self) -> dict:
        """Per sink (the pipeline's figures, about twice a second): readings written
        since the pipeline started, log bytes durable and not yet taken (summed over
        the workers' logs), and seconds the oldest of them has waited (the most
        behind log). A sink that is not configured shows zeros."""
        header = self.header
        return {name: {"written": int(header[Layout.H_SINK_WRITTEN + k]),
                       "lag_bytes": int(header[Layout.H_SINK_LAG + k]),
                       "lag_seconds": int(header[Layout.H_SINK_LAG_AGE_MS + k]) / 1000}
                for k, name in enumerate(SINK_NAMES)}

    def store_lag_bytes(self) -> list[int | None]:
        """Per worker log: bytes durable and not yet committed by the store sink
        (what max_sink_lag_bytes bounds); None until the pipeline published where
        the store is."""
        out = []
        for durable, published in zip(self.column(Counter.WAL_DURABLE_OFFSET),
                                      self.column(Counter.STORE_CHECKPOINT)):
            out.append(None if published == 0 else max(0, int(durable) - (int(published) - 1)))
        return out

    def close(self, unlink: bool = False) -> None:
        del self.header, self.matrix, self._view
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
    workers: list = field(default_factory=list)   # per slot: pid, heartbeat age, the store's lag on its log
    deaths: dict = field(default_factory=dict)    # worker_deaths, pipeline_deaths
    sinks: dict = field(default_factory=dict)     # per sink: written, lag_bytes, lag_seconds
    memory: dict | None = None                    # with PSS: per process and summed (memory_figures)

    def line(self) -> str:
        return (f"[stats] clients: {self.clients} | peak: {self.peak} | memory: {self.memory_mb:.1f} MB"
                f" | conn_rate: {self.conn_rate:.0f}/s | msg_in: {self.msg_in:.0f}/s"
                f" | msg_out: {self.msg_out:.0f}/s")

    def sinks_line(self) -> str:
        """The sinks' lag: the store always, the file sink and the bridge when they have figures."""
        parts = []
        for name, f in self.sinks.items():
            if name != "store" and not (f["written"] or f["lag_bytes"]):
                continue
            parts.append(f"{name}: lag {f['lag_bytes'] / 1e6:.1f} MB, {f['lag_seconds']:.1f} s"
                         f" | written {f['written']}")
        behind = [w["slot"] for w in self.workers if w.get("store_behind")]
        line = "[sinks] " + " | ".join(parts)
        if behind:
            line += " | ingest held (max_sink_lag_bytes) on workers " + ",".join(map(str, behind))
        return line

    def memory_line(self) -> str:
        """PSS beside RSS, summed and per process: "[memory] PSS 41.2 MB, RSS 120.3 MB |
        master 12.0 / 40.1 | worker 0 ... (MB, PSS / RSS)"."""
        m = self.memory or {"pss_bytes": 0, "rss_bytes": 0, "processes": []}
        parts = [f"PSS {m['pss_bytes'] / 1e6:.1f} MB, RSS {m['rss_bytes'] / 1e6:.1f} MB"]
        parts += [f"{p['process']} {p['pss_bytes'] / 1e6:.1f} / {p['rss_bytes'] / 1e6:.1f}"
                  for p in m["processes"]]
        return "[memory] " + " | ".join(parts) + " (MB, PSS / RSS)"

    def as_dict(self) -> dict:
        out = {"clients": self.clients, "peak": self.peak, "memory_mb": round(self.memory_mb, 2),
               "conn_rate": self.conn_rate, "msg_in": self.msg_in, "msg_out": self.msg_out,
               **self.deaths, "sinks": self.sinks, "counters": self.totals, "workers": self.workers}
        if self.memory is not None:
            out["memory"] = self.memory
        return out


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_of(pid: int) -> int:
    """A process's resident bytes, from /proc/PID/statm (cheap: no walk of its
    pages); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def memory_of(pid: int) -> dict | None:
    """A process's memory in bytes, from /proc/PID/smaps_rollup: rss (its
    resident pages, those it shares counted in full), pss (each resident page
    divided by the number of processes mapping it: summed over processes, what
    they cost together) and uss (its private pages: what its exit gives back).
    None when it is gone or not readable (another user's)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = {}
    for line in text.split(b"\n")[1:]:
        key, _, rest = line.partition(b":")
        if key in (b"Rss", b"Pss", b"Private_Clean", b"Private_Dirty"):
            fields[key] = int(rest.split()[0]) * 1024
    if b"Pss" not in fields:
        return None
    return {"rss": fields.get(b"Rss", 0), "pss": fields[b"Pss"],
            "uss": fields.get(b"Private_Clean", 0) + fields.get(b"Private_Dirty", 0)}


def server_processes(block: StatsBlock) -> list[tuple[str, int]]:
    """(name, pid) of every process of the server the block belongs to: the
    master, each live worker ("worker N"), the pipeline when it runs."""
    header = block.header
    out = [("master", int(header[Layout.H_MASTER_PID]))]
    pids = header[Layout.H_WORKER_PIDS:Layout.H_WORKER_PIDS + block.nworkers].tolist()
    out += [(f"worker {slot}", pid) for slot, pid in enumerate(pids) if pid]
    if header[Layout.H_PIPELINE_PID]:
        out.append(("pipeline", int(header[Layout.H_PIPELINE_PID])))
    return out


def memory_figures(block: StatsBlock) -> dict:
    """PSS beside RSS (and USS) for each process of the server and summed
    (`gw stats`): {"rss_bytes", "pss_bytes", "uss_bytes", "processes": [{"process",
    "pid", "rss_bytes", "pss_bytes", "uss_bytes"}]}. A process gone meanwhile
    is left out."""
    processes = []
    for name, pid in server_processes(block):
        m = memory_of(pid)
        if m is not None:
            processes.append({"process": name, "pid": pid, "rss_bytes": m["rss"], "pss_bytes": m["pss"],
                              "uss_bytes": m["uss"]})
    return {**{f"{k}_bytes": sum(p[f"{k}_bytes"] for p in processes) for k in ("rss", "pss", "uss")},
            "processes": processes}


class Aggregator:
    """Turns successive totals into rates; the master calls tick() once per
    interval. With `proportional` (`gw stats`), each tick also reads every
    process's PSS (smaps_rollup walks the process's pages, so the master's
    every-second line keeps to RSS)."""

    def __init__(self, block: StatsBlock, proportional: bool = False):
        self.block = block
        self.proportional = proportional
        self.prev = block.totals()
        self.prev_t = time.monotonic()

    def tick(self) -> Snapshot:
        now = time.monotonic()
        totals = self.block.totals()
        dt = max(now - self.prev_t, 1e-3)
        prev = self.prev
        self.prev, self.prev_t = totals, now
        header = self.block.header
        clients = totals[Counter.CONNS_CURRENT]
        peak = max(int(header[Layout.H_PEAK]), clients)
        # Only the master (writable block) keeps the peak; `gw stats` maps it read-only.
        if self.block.writable and clients > header[Layout.H_PEAK]:
            header[Layout.H_PEAK] = clients
        memory = memory_figures(self.block) if self.proportional else None
        rss = (memory["rss_bytes"] if memory is not None
               else sum(rss_of(pid) for _, pid in server_processes(self.block)))
        return Snapshot(
            clients=clients,
            peak=peak,
            memory_mb=rss / 1e6,
            conn_rate=float(totals[Counter.CONNS_ACCEPTED] - prev[Counter.CONNS_ACCEPTED]) / dt,
            msg_in=float(totals[Counter.MSGS_IN] - prev[Counter.MSGS_IN]) / dt,
            msg_out=float(totals[Counter.MSGS_OUT] - prev[Counter.MSGS_OUT]) / dt,
            totals=counter_dict(totals),
            workers=self.workers(),
            deaths=self.block.deaths(),
            sinks=self.block.sinks(),
            memory=memory,
        )

    def workers(self) -> list[dict]:
        header = self.block.header
        pids = header[Layout.H_WORKER_PIDS:Layout.H_WORKER_PIDS + self.block.nworkers].tolist()
        behind = self.block.column(Counter.STORE_BEHIND)
        return [{"slot": i, "pid": int(pid), "heartbeat_age_ms": age, "store_lag_bytes": lag,
                 "store_behind": bool(b)}
                for i, (pid, age, lag, b) in enumerate(zip(pids, self.block.heartbeat_ages_ms(),
                                                           self.block.store_lag_bytes(), behind))]


def counter_dict(totals) -> dict:
    """The summed counters by name (`gw stats --json`): ranges as dicts, histograms
    summarised; per-worker gauges left out (a sum of them means nothing)."""
    totals = [int(v) for v in totals]
    out = {}
    for c in Counter:
        if (c in RANGES or c in PER_WORKER or c is Counter.N_COUNTERS or c in RATE_LIMIT_COUNTERS
                or c in STORE_BEHIND_COUNTERS.values() or c in SHARED_COUNTERS.values()
                or c in WILL_DELAY_COUNTERS.values() or c in ENHANCED_AUTH_COUNTERS.values()
                or c in TLS_RECORD_COUNTERS.values()):
            continue
        out[c.name.lower()] = totals[c]
    out["ingest_shed_store_behind"] = {name: totals[c] for name, c in STORE_BEHIND_COUNTERS.items()}
    out["shared_subscriptions"] = {name: totals[c] for name, c in SHARED_COUNTERS.items()}
    out["will_delay"] = {name: totals[c] for name, c in WILL_DELAY_COUNTERS.items()}
    out["enhanced_auth"] = {name: totals[c] for name, c in ENHANCED_AUTH_COUNTERS.items()}
    out["tls_record_layer"] = {name: totals[c] for name, c in TLS_RECORD_COUNTERS.items()}
    out["rate_limits"] = {
        "pauses": {name: totals[c] for name, c in RATE_LIMIT_PAUSES.items()},
        "per_ip_refused": totals[Counter.PER_IP_REFUSED],
        "clients_paused": totals[Counter.RATE_PAUSED],
    }
    for base, label in ((Counter.PKT_IN, "packets_in"), (Counter.PKT_OUT, "packets_out")):
        out[label] = {name: totals[base + t] for t, name in PACKET_NAMES.items()}
    out["malformed"] = {name: totals[Counter.MALFORMED_BY_REASON + r]
                        for r, name in MALFORMED_REASONS.items()}
    out["limits"] = {name: totals[Counter.LIMITS + i] for i, name in LIMIT_NAMES.items()}
    out["ws_refused"] = {name: totals[Counter.WS_REFUSED + i] for i, name in WS_REFUSED_NAMES.items()}
    out["ws_closes"] = {name: totals[Counter.WS_CLOSES + i] for i, name in WS_CLOSE_NAMES.items()}
    out["mqtt5_disconnects"] = {name: totals[Counter.MQTT5_DISCONNECTS + i] for i, name in DISC5_NAMES.items()}
    out["mqtt5_bad_packets"] = {name: totals[Counter.MQTT5_BAD_PACKETS + i] for i, name in enumerate(R5_NAMES)}
    for base, label in ((Counter.HTTP_REQUESTS, "http_requests"),
                        (Counter.INGEST_REQUESTS, "ingest_requests")):
        out[label] = {name: totals[base + i] for i, name in enumerate(STATUS_NAMES)}
    for base, label in ((Counter.HIST_INGEST, "ingest_latency"),
                        (Counter.HIST_DELIVER, "deliver_latency"),
                        (Counter.HIST_LOOP_TURN, "loop_turn_duration")):
        out[label] = hist_summary(totals[base:base + HIST_WORDS])
    return out


def hist_summary(words) -> dict:
    """count, sum and quantile estimates (the bucket's upper bound, None: over the
    last finite bound or no observation) of one histogram's words."""
    buckets = [int(w) for w in words[:HIST_BUCKETS]]
    count = sum(buckets)
    out = {"count": count, "sum_seconds": int(words[Layout.HIST_SUM]) / 1e9}
    for q, name in ((0.5, "p50_seconds"), (0.99, "p99_seconds")):
        value = None
        if count:
            need, acc = q * count, 0
            for i, n in enumerate(buckets):
                acc += n
                if acc >= need:
                    value = HIST_BOUNDS_SECONDS[i] if i < len(HIST_BOUNDS_SECONDS) else None
                    break
        out[name] = value
    return out


PACKET_NAMES = {1: "connect", 2: "connack", 3: "publish", 4: "puback", 5: "pubrec", 6: "pubrel",
                7: "pubcomp", 8: "subscribe", 9: "suback", 10: "unsubscribe", 11: "unsuback",
                12: "pingreq", 13: "pingresp", 14: "disconnect"}
MALFORMED_REASONS = {1: "fixed_header", 2: "remaining_length", 3: "utf8", 4: "protocol",
                     5: "topic", 6: "qos", 7: "packet_id", 8: "no_topic_filter",
                     9: "control_character", 10: "server_packet", 11: "wrong_ack_kind"}
# LIMITS + LIM_*: which bound a client hit, named after its setting (max_<name>).
LIMIT_NAMES = {int(v): k[4:].lower() for k, v in _INTS.items() if k.startswith("LIM_")}
# WS_REFUSED + WS_REFUSED_*: the HTTP status a refused WebSocket upgrade got;
# WS_CLOSES + WS_CLOSE_SLOT_*: the code of a Close frame the server sent.
WS_REFUSED_NAMES = {int(v): k[len("WS_REFUSED_"):] for k, v in _INTS.items() if k.startswith("WS_REFUSED_")}
WS_CLOSE_NAMES = {int(v): k[len("WS_CLOSE_SLOT_"):].lower() for k, v in _INTS.items()
                  if k.startswith("WS_CLOSE_SLOT_")}
# MQTT5_DISCONNECTS + DISC5_*: the reason code of a DISCONNECT the server sent;
# MQTT5_BAD_PACKETS + R5_* - 1: the rule a packet refused by the MQTT 5.0 codec broke.
DISC5_NAMES = {int(v): k[len("DISC5_"):].lower() for k, v in _INTS.items() if k.startswith("DISC5_")}
# (gw/packets5.py REASONS names the same rules.)
R5_NAMES = ("header", "length", "varint", "utf8", "control", "protocol", "qos", "topic", "property", "options",
            "duplicate_property", "property_value", "packet_id", "empty", "reason_code", "subscription",
            "topic_alias", "session_present", "authentication")
# The rate limits' counters, grouped under "rate_limits" (`gw stats --json`): the
# pauses by setting, the connections refused by max_connections_per_ip, the
# clients paused now.
RATE_LIMIT_PAUSES = {"max_conn_rate": Counter.CONN_RATE_PAUSES, "max_messages_rate": Counter.MSG_RATE_PAUSES,
                     "max_bytes_rate": Counter.BYTE_RATE_PAUSES}
RATE_LIMIT_COUNTERS = (*RATE_LIMIT_PAUSES.values(), Counter.PER_IP_REFUSED, Counter.RATE_PAUSED)
# The store's lag bound (max_sink_lag_bytes), grouped under "ingest_shed_store_behind": what
# ingest refused or shed while the store was behind, and how often a worker began holding it.
STORE_BEHIND_COUNTERS = {"http_503": Counter.STORE_BEHIND_HTTP, "json_errors": Counter.STORE_BEHIND_JSON,
                         "mqtt_qos0_shed": Counter.STORE_BEHIND_QOS0, "holds": Counter.STORE_BEHIND_HOLDS,
                         "workers_holding": Counter.STORE_BEHIND}
# Shared subscriptions ($share/{name}/{filter}), grouped under "shared_subscriptions".
SHARED_COUNTERS = {"delivered": Counter.SHARED_DELIVERED, "forwarded": Counter.SHARED_FORWARDED,
                   "redelivered": Counter.SHARED_REDELIVERED, "dropped": Counter.SHARED_DROPPED,
                   "refused": Counter.SHARED_REFUSED, "groups": Counter.SHARED_GROUPS,
                   "members": Counter.SHARED_MEMBERS}
# MQTT 5.0 wills held for their Will Delay Interval, grouped under "will_delay".
WILL_DELAY_COUNTERS = {"held": Counter.WILLS_DELAYED, "pending": Counter.WILLS_DELAY_PENDING,
                       "elapsed": Counter.WILLS_DELAY_ELAPSED, "session_end": Counter.WILLS_DELAY_SESSION_END,
                       "cancelled": Counter.WILLS_DELAY_CANCELLED, "shutdown": Counter.WILLS_DELAY_SHUTDOWN,
                       "over_limit": Counter.WILLS_DELAY_OVER_LIMIT}
# MQTT 5.0 enhanced authentication (SCRAM-SHA-512, re-authentication), grouped under "enhanced_auth".
# gw's TLS record layer (tls_record_layer = gw): connections it took over, those
# that stayed on OpenSSL's, records refused, KeyUpdates in and out.
TLS_RECORD_COUNTERS = {"gw": Counter.TLS_OWN_RECORDS, "openssl": Counter.TLS_OPENSSL_RECORDS,
                       "refused": Counter.TLS_RECORDS_REFUSED, "key_updates_in": Counter.TLS_KEY_UPDATES_IN,
                       "key_updates_out": Counter.TLS_KEY_UPDATES_OUT}
ENHANCED_AUTH_COUNTERS = {"scram_ok": Counter.AUTH_SCRAM_OK, "scram_failed": Counter.AUTH_SCRAM_FAILED,
                          "reauth_ok": Counter.AUTH_REAUTH_OK, "reauth_failed": Counter.AUTH_REAUTH_FAILED,
                          "method_unsupported": Counter.AUTH_METHOD_UNSUPPORTED}
SINK_NAMES = ("store", "file", "bridge")      # H_SINK_* + index
# The HTTP status slots by name: "200", ..., "505", "other".
STATUS_NAMES = tuple(str(code) for code in HTTP_STATUS_CODES) + ("other",)


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
