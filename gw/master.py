"""The master process, in the spirit of gunicorn's arbiter: it opens the
listening sockets, forks the workers, respawns those that die, turns signals
into drains and reloads, and logs the [stats] line. It serves no traffic.

Each worker slot has its own SO_REUSEPORT socket per listener, created here
before forking and kept open by the master. While a slot's worker is dead
(between a crash and its respawn) the kernel keeps queueing new connections
on that slot's socket, so they wait for the respawned worker instead of
being refused, and the other workers' clients are untouched.
"""

from __future__ import annotations

import _signal
import errno
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from gw import __version__
from gw.certs import CertError, CertPaths, ensure_certs_apart, server_context
from gw.config import RESTART_ONLY, TLS_LISTENER_KEYS, Config, ConfigError, load_config, store_is_postgresql
from gw.series import INTERVAL as SERIES_INTERVAL, SeriesRecorder, SeriesRing
from gw.stats import PIDFILE, Aggregator, Layout, StatsBlock
from gw.tokens import TokensError, http_tokens_required, load_tokens, tokens_path
from gw.worker import ListenerSpec, preload, worker_main
from gw_ext.frames import publish_frame
from gw_ext.tls import release_free_heap

log = logging.getLogger("gw.master")
stats_log = logging.getLogger("gw.stats")

LISTENERS = (("mqtt", "mqtt", False), ("mqtts", "mqtt", True), ("json", "json", False),
             ("jsons", "json", True), ("http", "http", False), ("https", "http", True),
             ("ws", "ws", False), ("wss", "ws", True))
BACKLOG = 4096
# defer_accept (TCP_DEFER_ACCEPT, seconds): a worker is woken for a new
# connection only once its first bytes (CONNECT, ClientHello, an HTTP request:
# every protocol here has the client speak first) are there, so one wake-up
# accepts and reads it instead of one for the accept and another for the
# CONNECT. A client that sends nothing is handed over after the kernel's first
# SYN-ACK retransmission (about 1 s), its connect_timeout starting then.
DEFER_ACCEPT_S = 1
RESPAWN_MIN = 0.05       # seconds; doubled for each quick death, up to RESPAWN_MAX
RESPAWN_MAX = 10.0
STABLE_AFTER = 5.0       # a worker that lived this long resets its backoff


# Seconds after the children are forked (and after a reload) before the master
# gives back the file pages only it maps (release_start_pages): by then every
# child has faulted in the pages it runs, so those stay shared.
RELEASE_START_PAGES_AFTER = 5.0


def release_start_pages() -> int:
    """Asks the kernel to reclaim the pages of the master's file mappings
    (libraries, extensions) that no other process maps: code and data it ran
    only while starting (OpenSSL reading the certificates, the import machinery,
    modules' initialisation); it serves no traffic, and a page it uses again is
    read back. Private mappings only (nothing to write back); the stats block
    and other shared memory are left alone. The number of bytes advised."""
    from gw_ext.stats import page_out

    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    advised = 0
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/") or parts[5].startswith("/dev/") or "p" not in parts[1]:
            continue
        lo, _, hi = parts[0].partition("-")
        start, end = int(lo, 16), int(hi, 16)
        if page_out(start, end - start):
            advised += end - start
    return advised


def preload_pipeline(cfg: Config | None = None) -> None:
    """What the pipeline process's start would otherwise work out in its own
    pages, made before the forks (its modules are imported already: the store
    is checked at start): msgspec resolves the annotations of the store sink's
    Reading the first time a decoder takes it, and keeps them in the class; the
    pipeline's Settings of the config."""
    import msgspec

    from gw.pipeline.batch import Reading
    from gw.pipeline.settings import Settings
    msgspec.json.Decoder(Reading)
    if cfg is not None:
        Settings.from_cfg(cfg)      # kept with cfg (gw/pipeline/settings.py)


def check_auth(cfg: Config, error: type) -> dict | None:
    """Refuses (raising `error`, one line) settings that expose listeners with
    no authentication, and a password file that does not parse (naming its line):
    the master checks before the workers load it, at start and on reload. The
    password file's users as parsed (None: no file)."""
    from gw.auth import anonymous_allowed, startup_problem
    from gw.passwords import PasswordFileError, load_password_file

    problem = startup_problem(cfg)
    if problem:
        raise error(problem)
    anonymous_allowed(cfg)      # kept with cfg: the workers forked with it find the answer
    if not cfg.password_file:
        return None
    try:
        return load_password_file(cfg.password_file)
    except PasswordFileError as exc:
        raise error(str(exc)) from None


class StartupError(Exception):
    pass


PIPELINE_FATAL = 3      # the pipeline's exit code for "cannot run here" (not respawned)


def alert_publisher(links: list[socket.socket]):
    """publish(topic, payload, qos=0, retain=False) for the pipeline process: one
    FR_PUBLISH frame (gw_ext/frames.pxd) to every worker, each delivering it to
    its own subscribers. A worker that is not reading (being respawned) misses it."""
    def publish(topic: bytes, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        frame = publish_frame(topic, payload, qos, retain, time.monotonic_ns())
        sent = 0
        for sock in links:
            try:
                sock.send(frame)
                sent += 1
            except OSError:
                pass
        return sent
    return publish


def exit_status(status: int) -> str:
    """A wait status as the log says it: "signal 9 (SIGKILL)" or "exit code 1"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"signal {sig} ({signal.Signals(sig).name})"
        except ValueError:
            return f"signal {sig}"
    return f"exit code {os.WEXITSTATUS(status)}"


def stopped_cleanly(status: int) -> bool:
    """While the master stops: exit code 0 ends a drain; SIGTERM is the master's
    own (a child still starting, before its handler was set). Anything else is a death."""
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status) == signal.SIGTERM
    return os.WEXITSTATUS(status) == 0


class Slot:
    def __init__(self, index: int):
        self.index = index
        self.pid = 0
        self.started = 0.0
        self.backoff = RESPAWN_MIN
        self.respawn_at = 0.0
        self.sockets: list[ListenerSpec] = []

    def schedule_respawn(self) -> float:
        """It died: respawn after a delay doubled for each quick death. The delay."""
        now = time.monotonic()
        if now - self.started >= STABLE_AFTER:
            self.backoff = RESPAWN_MIN
        delay = self.backoff
        self.backoff = min(self.backoff * 2, RESPAWN_MAX)
        self.respawn_at = now + delay
        return delay


def open_listener(addr, port: int, defer_accept: bool = False) -> socket.socket:
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if addr.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if defer_accept:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
    sock.bind((addr.host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def check_port_unused(addr, port: int) -> None:
    """Raises OSError (EADDRINUSE) when another process listens on addr:port.
    The workers' sockets share the port through SO_REUSEPORT, which would as
    well let a second gw (or anything else with SO_REUSEPORT, as the same user)
    share it: the kernel would then split new connections between the two
    servers without a word. A socket without SO_REUSEPORT cannot bind where one
    listens (SO_REUSEADDR still passes connections in TIME_WAIT)."""
    probe = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if addr.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((addr.host, port))
    finally:
        probe.close()


def private_data_dir(data: Path) -> None:
    """data_dir, created mode 0700; an existing one open to others is tightened to
    0700, said once: it holds the store, the logs, sessions and the HTTP tokens'
    hashes, and nothing in it is meant for another user (a warning alone would
    leave them readable)."""
    try:
        mode = data.stat().st_mode & 0o777
    except FileNotFoundError:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = data.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(data, 0o700)
        log.warning("data_dir %s had mode %04o, open to other users: tightened to 0700", data, mode)


class Master:
    def __init__(self, cfg: Config, config_path: str | None, overrides: dict):
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides
        self.slots = [Slot(i) for i in range(cfg.workers)]
        self.certs: CertPaths | None = None
        self.tls_context = None     # the TLS listeners' context (gw_ext.tls), made here: every worker inherits it
        self.acl = None             # the ACL file in force, as parsed (gw/acl.py): what a (re)spawned worker starts with
        self.password_users = None  # ... and the password file's users (gw/passwords.py)
        self.tokens = None          # ... and the HTTP tokens file's tokens (gw/tokens.py; None: tokens off)
        self.block: StatsBlock | None = None
        self.series: SeriesRing | None = None
        self.dedup = None           # the shared idempotency table (gw_ext/dedup.pyx)
        self.address_counts = None  # connections per client address, shared (gw_ext/addrlimit.pyx)
        # The pipeline process (gw/pipeline/): reads the workers' logs into the
        # sinks; one SOCK_SEQPACKET pair per worker carries its alerts into the broker.
        self.pipeline = Slot(-1)
        self.pipeline_links: list[tuple[socket.socket, socket.socket]] = []
        self.pidfile: Path | None = None
        self.stopping = False
        self.reload_pending = False
        self.release_pages_at = 0.0     # when release_start_pages runs next (0: not due)
        self.wake_r, self.wake_w = -1, -1
        self.bound: dict[str, str] = {}
        # (i, j) -> (socket for i, socket for j): one channel per pair of workers.
        self.channels: dict[tuple[int, int], tuple[socket.socket, socket.socket]] = {}

    # --- start-up ------------------------------------------------------------

    def prepare(self) -> None:
        cfg = self.cfg
        self.password_users = check_auth(cfg, StartupError)
        data = Path(cfg.data_dir)
        try:
            private_data_dir(data)
            probe = data / ".write-test"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            probe.unlink()
        except OSError as exc:
            raise StartupError(f"data_dir {str(data)!r} is not writable: {exc.strerror}") from None
        self.check_store()
        if cfg.acl_file:
            from gw.acl import AclError, load_acl
            try:
                self.acl = load_acl(cfg.acl_file)
            except AclError as exc:
                raise StartupError(f"acl_file refused: {exc}") from None
        self.tokens = self.check_tokens(cfg)
        if any(cfg.address(key) for key in TLS_LISTENER_KEYS):
            try:
                self.certs, generated = ensure_certs_apart(cfg.certs)
            except CertError as exc:
                raise StartupError(str(exc)) from None
            if generated:
                print(f"gw: generated a development CA; clients must trust {self.certs.ca}",
                      file=sys.stderr, flush=True)
            key_mode = self.certs.key.stat().st_mode & 0o777
            if key_mode & 0o077:
                # Warned, not changed: the file is the operator's (a group such as ssl-cert may
                # be meant to read it).
                log.warning("the TLS key %s has mode %04o: other users may read it (chmod 600 it)",
                            self.certs.key, key_mode)
            from gw_ext.tls import TLSError, set_ticket_secret
            # Made here, before the workers fork, so every worker (and every
            # respawned one) seals and opens session tickets with the same keys;
            # kept in memory only.
            set_ticket_secret(os.urandom(32), cfg.tls_ticket_lifetime)
            try:
                self.tls_context = server_context(self.certs, cfg)
            except TLSError as exc:
                raise StartupError(str(exc)) from None
        for name, proto, tls in LISTENERS:
            addr = cfg.address(name)
            if addr is None:
                continue
            port = addr.port
            if port:
                try:
                    check_port_unused(addr, port)
                except OSError as exc:
                    why = " (another process listens there)" if exc.errno == errno.EADDRINUSE else ""
                    raise StartupError(f"cannot listen on {addr} ({name}): {exc.strerror}{why}") from None
            for slot in self.slots:
                try:
                    sock = open_listener(addr, port, cfg.defer_accept)
                except OSError as exc:
                    raise StartupError(f"cannot listen on {addr} ({name}): {exc.strerror}") from None
                port = sock.getsockname()[1]      # port 0: all slots share the one picked
                slot.sockets.append(ListenerSpec(name, sock, proto, tls))
            self.bound[name] = f"{addr.host}:{port}" if ":" not in addr.host else f"[{addr.host}]:{port}"
        for i in range(len(self.slots)):
            for j in range(i + 1, len(self.slots)):
                pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                for sock in pair:
                    sock.setblocking(False)
                    # Room for bursts (channel_buffer; the kernel caps it). Frames larger
                    # than a datagram go in pieces (gw_ext/worker/channel.pyx).
                    if cfg.channel_buffer:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.channel_buffer)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.channel_buffer)
                self.channels[(i, j)] = pair
        for i in range(len(self.slots)):
            pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for sock in pair:
                sock.setblocking(False)
            self.pipeline_links.append(pair)
        self.block = StatsBlock.create(len(self.slots), os.getpid())
        # The last minutes of the block, a point a second (gw/series.py): GET /v1/stats/series.
        self.series = SeriesRing.create(len(self.slots))
        if cfg.idempotency_window > 0:
            # Shared memory every worker (and every respawned one) inherits: a
            # repeated (device_id, seq) is caught whichever worker it reaches.
            from gw_ext.dedup import DedupTable
            self.dedup = DedupTable(cfg.idempotency_capacity, cfg.idempotency_window)
        # Always made (its pages are touched only once counted), so a reload may
        # set max_connections_per_ip; sized for max_connections at start.
        from gw_ext.addrlimit import AddressCounts
        self.address_counts = AddressCounts(len(self.slots), cfg.max_connections)
        self.pidfile = data / PIDFILE
        fd = os.open(self.pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)            # one left by an older run may have had another mode
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)

    def check_tokens(self, cfg: Config) -> dict | None:
        """With HTTP tokens on, the tokens file must load (a missing one is none:
        every request needing a token is refused, which is said once here): its
        tokens, as the workers take them; None with tokens off."""
        if not http_tokens_required(cfg):
            return None
        path = tokens_path(cfg)
        try:
            tokens = load_tokens(path)
        except TokensError as exc:
            raise StartupError(f"HTTP tokens: {exc}") from None
        if not tokens:
            log.warning("HTTP tokens are on (http_auth = %s) but %s holds none: every HTTP request but "
                        "/healthz, /readyz and /docs is refused until `gw token create` makes one "
                        "and gw reloads (SIGHUP)", cfg.http_auth, path)
        return tokens

    def check_store(self) -> None:
        """The embedded store is checked before anything starts: a corrupt file
        stops gw serve with a message saying what to do; it is never replaced.
        So does a worker's log that ends before what the store has read of it:
        its files were removed (or lost their end), and the readings taken from
        now on would land at offsets the store holds already, so they would
        never be stored."""
        from gw.pipeline import PipelineError
        from gw.pipeline.pgstore import describe_url
        from gw.pipeline.store import StoreSink, open_store
        from gw_ext.wal import WalReader

        data = Path(self.cfg.data_dir)
        if store_is_postgresql(self.cfg.store):
            checkpoints = self.check_pg_store()
            where = describe_url(self.cfg.store)
        else:
            where = data / "store.sqlite"
            try:
                conn = open_store(data / "store.sqlite")
            except PipelineError as exc:
                raise StartupError(str(exc)) from None
            try:
                checkpoints = conn.execute("SELECT worker, next_offset FROM checkpoints WHERE sink = ?",
                                           (StoreSink.name,)).fetchall()
            finally:
                conn.close()
        for worker, read in checkpoints:
            if not 0 <= worker < len(self.slots):
                continue
            reader = WalReader(str(data / "wal" / str(worker)))
            try:
                end = int(reader.end_offset())
            finally:
                reader.close()
            if end < read:
                raise StartupError(
                    f"worker {worker}'s write-ahead log ({data / 'wal' / str(worker)}) ends at offset {end}, "
                    f"but the store ({where}) has read it up to {read}: the log was removed "
                    f"or lost its end. Restore the log, or move the store aside to start a new one; "
                    f"readings taken now would not be stored")

    def check_pg_store(self) -> list:
        """The PostgreSQL store at start: its schema created, or refused when it is
        not gw's (another version); its checkpoints. One that cannot be reached
        does not stop gw serve: the workers' logs keep the readings and the
        pipeline connects when it can (logged); its checkpoints are then unknown ([])."""
        import psycopg
        from gw.pipeline import PipelineError
        from gw.pipeline.pgstore import PgStoreSink, connect, describe_url, ensure_schema

        where = describe_url(self.cfg.store)
        try:
            conn = connect(self.cfg.store, self.cfg.store_pg_connect_timeout, "gw-master", autocommit=True)
        except psycopg.OperationalError as exc:
            log.warning("the PostgreSQL store %s cannot be reached now (%s); starting anyway: readings wait in "
                        "the write-ahead logs and the pipeline stores them once it connects (it retries with "
                        "backoff)", where, (str(exc).strip().splitlines() or [type(exc).__name__])[0])
            return []
        except PipelineError as exc:
            raise StartupError(str(exc)) from None
        try:
            ensure_schema(conn, where)
            return conn.execute("SELECT worker, next_offset FROM checkpoints WHERE sink = %s",
                                (PgStoreSink.name,)).fetchall()
        except PipelineError as exc:
            raise StartupError(str(exc)) from None
        except psycopg.Error as exc:
            raise StartupError(f"the PostgreSQL store {where} cannot be used: {exc}") from None
        finally:
            conn.close()

    # --- workers -------------------------------------------------------------

    def fork_child(self, what: str, run: Callable[[], int], ignore_interrupt: bool = False) -> int:
        """Forks a child that sets itself apart from the master (default signal
        handlers, SIGINT ignored when asked, no wake-up pipe), runs `run` and
        exits with its code (1 when it raised: `what` crashed). Returns the
        child's pid."""
        # Whatever the master holds now is inherited: collected first, then left
        # out of the collector's walks (in every process), so a collection in a
        # child never writes to those objects' pages, which stay shared.
        gc.collect()
        gc.freeze()
        # The free pages inside the C heap go back to the system before the fork
        # rather than being inherited: a child's mallocs then take fresh pages
        # instead of copying the master's.
        release_free_heap()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # _signal's own functions, as in every child's start: signal.signal
                # wraps them in enum conversions whose first run in a child writes
                # to pages it would otherwise share.
                for sig in (_signal.SIGTERM, _signal.SIGHUP, _signal.SIGCHLD):
                    _signal.signal(sig, _signal.SIG_DFL)
                if ignore_interrupt:
                    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
                _signal.set_wakeup_fd(-1)
                os.close(self.wake_r)
                os.close(self.wake_w)
                code = run()
            except BaseException:
                log.exception("%s crashed", what)
            finally:
                logging.shutdown()
                os._exit(code)
        return pid

    def spawn(self, slot: Slot) -> None:
        pid = self.fork_child(f"worker {slot.index}", lambda: self.worker_child(slot))
        slot.pid = pid
        slot.started = time.monotonic()
        self.block.set_worker_pid(slot.index, pid)
        log.debug("worker %d started, pid %d", slot.index, pid)

    def worker_child(self, slot: Slot) -> int:
        """In the forked worker: keeps its own sockets and channel ends, closes
        the rest, and runs the worker."""
        for other in self.slots:
            if other is not slot:
                for spec in other.sockets:
                    spec.sock.close()
        mine = {}
        for (i, j), (a, b) in self.channels.items():
            if i == slot.index:
                mine[j] = a
                b.close()
            elif j == slot.index:
                mine[i] = b
                a.close()
            else:
                a.close()
                b.close()
        for i, (a, b) in enumerate(self.pipeline_links):
            a.close()
            if i == slot.index:
                mine[len(self.slots)] = b      # the pipeline, as a peer that only publishes
            else:
                b.close()
        return worker_main(slot.index, self.cfg, slot.sockets, mine, self.block, self.certs,
                           self.config_path, self.overrides, self.dedup, self.acl,
                           self.address_counts, self.password_users, self.tokens, self.series,
                           self.tls_context)

    def spawn_pipeline(self) -> None:
        slot = self.pipeline
        pid = self.fork_child("the pipeline process", lambda: self.pipeline_child(slot), ignore_interrupt=True)
        slot.pid = pid
        slot.started = time.monotonic()
        self.block.header[Layout.H_PIPELINE_PID] = pid
        log.debug("pipeline started, pid %d", pid)

    def pipeline_child(self, slot: Slot) -> int:
        """In the forked pipeline process: closes every worker's sockets and
        channels, keeps its ends of the pipeline links, and runs the pipeline."""
        for other in self.slots:
            for spec in other.sockets:
                spec.sock.close()
        for a, b in self.channels.values():
            a.close()
            b.close()
        links = []
        for a, b in self.pipeline_links:
            b.close()
            links.append(a)
        from gw.pipeline import PipelineError, pipeline_main
        try:
            # check_store() ran just before the first start: a respawn checks again.
            return pipeline_main(self.cfg, self.block, len(self.slots), alert_publisher(links),
                                 quick_check=slot.started != 0.0)
        except PipelineError as exc:
            log.error("the pipeline cannot run: %s", exc)
            return PIPELINE_FATAL

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for slot in self.slots:
                if slot.pid == pid:
                    self.worker_exited(slot, pid, status)
            if self.pipeline.pid == pid:
                self.pipeline_exited(pid, status)

    def pipeline_exited(self, pid: int, status: int) -> None:
        slot = self.pipeline
        slot.pid = 0
        self.block.header[Layout.H_PIPELINE_PID] = 0
        how = exit_status(status)
        if self.stopping:
            if not stopped_cleanly(status):
                self.count_death(Layout.H_PIPELINE_DEATHS)
                log.error("the pipeline process (pid %d) died while stopping: %s", pid, how)
            return
        self.count_death(Layout.H_PIPELINE_DEATHS)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if code == PIPELINE_FATAL:
            # It said why (a corrupt store, an unwritable data dir): respawning
            # would only repeat it. Readings still go to the logs, and are
            # acknowledged per the ack mode; nothing reads them until a restart.
            log.error("the pipeline process stopped (see above); the logs keep every reading "
                      "until gw is restarted")
            slot.respawn_at = 0.0
            return
        delay = slot.schedule_respawn()
        log.warning("the pipeline process (pid %d) died: %s; respawning in %.2f s", pid, how, delay)

    def worker_exited(self, slot: Slot, pid: int, status: int) -> None:
        slot.pid = 0
        self.block.set_worker_pid(slot.index, 0)
        self.block.reset_gauges(slot.index)
        if self.address_counts is not None:
            # Its connections died with it: their addresses' counts go back
            # (before a respawn, so its new life starts from an empty row).
            self.address_counts.release_worker(slot.index)
        how = exit_status(status)
        if self.stopping:
            if not stopped_cleanly(status):
                self.count_death(Layout.H_WORKER_DEATHS)
                log.error("worker %d (pid %d) died while stopping: %s", slot.index, pid, how)
            return
        self.count_death(Layout.H_WORKER_DEATHS)
        delay = slot.schedule_respawn()
        log.warning("worker %d (pid %d) died: %s; respawning in %.2f s", slot.index, pid, how, delay)

    def count_death(self, word: int) -> None:
        """One more death in the stats block's header (`gw stats --json`, /metrics),
        counted before it is logged, so whoever reads the log finds it counted."""
        self.block.header[word] += 1

    # --- signals ---------------------------------------------------------------

    def on_signal(self, signum, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        elif signum == signal.SIGHUP:
            self.reload_pending = True

    def reload(self) -> None:
        try:
            new = load_config(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        changed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(self.cfg, k)]
        if changed:
            log.warning("reload: %s changed; that takes a restart (ignored now)", ", ".join(changed))
            new = Config(**{**new.__dict__, **{k: getattr(self.cfg, k) for k in changed}})
        try:
            password_users = check_auth(new, ConfigError)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config and password file: %s", exc)
            return
        tls_context = None
        if self.certs is not None:
            from gw_ext.tls import TLSError
            try:
                # The server certificate, client CA and CRLs as the workers will load
                # them: a file that does not load keeps every worker on what it has.
                tls_context = server_context(self.certs, new)
            except TLSError as exc:
                log.error("reload refused, certificates do not load: %s", exc)
                return
        acl = None
        if new.acl_file:
            # Fail closed: a file that does not parse leaves the running one in force everywhere.
            from gw.acl import AclError, load_acl
            try:
                acl = load_acl(new.acl_file)
            except AclError as exc:
                log.error("reload refused, keeping the running config and ACL: %s", exc)
                return
        tokens = None
        if http_tokens_required(new):
            try:
                tokens = load_tokens(tokens_path(new))
            except TokensError as exc:
                log.error("reload refused, keeping the running config and HTTP tokens: %s", exc)
                return
        # Every file checked: what a worker respawned from now on starts with.
        self.acl = acl
        self.password_users = password_users
        self.tokens = tokens
        if tls_context is not None:
            self.tls_context = tls_context
        self.cfg = new
        logging.getLogger("gw").setLevel(new.log_level.upper())
        for slot in self.slots:
            if slot.pid:
                os.kill(slot.pid, signal.SIGHUP)
        log.info("reloaded configuration and certificates")
        # Reading the certificates again touched OpenSSL's pages in the master.
        self.release_pages_at = time.monotonic() + RELEASE_START_PAGES_AFTER

    # --- main loop -------------------------------------------------------------

    def run(self) -> int:
        self.prepare()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self.on_signal)
        listeners = ", ".join(f"{name} {addr}" for name, addr in self.bound.items())
        log.info("gw %s: %d workers, listening on %s", __version__, len(self.slots), listeners)
        # Set before the forks, so a worker setting the same level (gw/worker.py)
        # leaves the loggers as inherited.
        logging.getLogger("gw").setLevel(self.cfg.log_level.upper())
        preload(self.cfg)
        preload_pipeline(self.cfg)
        for slot in self.slots:
            self.spawn(slot)
        self.spawn_pipeline()
        self.release_pages_at = time.monotonic() + RELEASE_START_PAGES_AFTER
        aggregator = Aggregator(self.block)
        interval = self.cfg.stats_interval
        next_stats = time.monotonic() + (interval or 3600)
        recorder = SeriesRecorder(self.block, self.series)
        next_point = time.monotonic() + SERIES_INTERVAL
        try:
            while not self.stopping:
                now = time.monotonic()
                timeout = min(next_stats, next_point) - now
                for slot in self.slots + [self.pipeline]:
                    if not slot.pid and slot.respawn_at:
                        timeout = min(timeout, slot.respawn_at - now)
                try:
                    select.select([self.wake_r], [], [], max(timeout, 0))
                except InterruptedError:
                    pass
                self.drain_wakeups()
                self.reap()
                if self.stopping:
                    break
                if self.reload_pending:
                    self.reload_pending = False
                    self.reload()
                now = time.monotonic()
                for slot in self.slots:
                    if not slot.pid and now >= slot.respawn_at:
                        self.spawn(slot)
                if not self.pipeline.pid and self.pipeline.respawn_at and now >= self.pipeline.respawn_at:
                    self.spawn_pipeline()
                if now >= next_point:
                    next_point = max(next_point + SERIES_INTERVAL, now + SERIES_INTERVAL / 2)
                    recorder.tick()
                if self.release_pages_at and now >= self.release_pages_at:
                    self.release_pages_at = 0.0
                    release_start_pages()
                if now >= next_stats:
                    interval = self.cfg.stats_interval
                    next_stats = now + (interval or 3600)
                    snap = aggregator.tick()
                    if interval:
                        stats_log.info("%s", snap.line())
            return self.shutdown()
        finally:
            self.cleanup()

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def shutdown(self) -> int:
        """Graceful drain: workers stop accepting, flush and close, then exit.
        Any still alive after drain_timeout (plus a margin) are killed."""
        log.info("draining %d workers (at most %.1f s)", sum(1 for s in self.slots if s.pid),
                 self.cfg.drain_timeout)
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        # Our copies of the listening sockets go now, so nothing queues on them.
        for slot in self.slots:
            for spec in slot.sockets:
                spec.sock.close()
        deadline = time.monotonic() + self.cfg.drain_timeout + 2.0
        while any(s.pid for s in self.slots) and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        killed = set()
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                    killed.add(slot.pid)
                except ProcessLookupError:
                    pass
        while any(s.pid for s in self.slots):
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            for slot in self.slots:
                if slot.pid == pid:
                    if pid in killed:          # our own kill: the drain took too long
                        slot.pid = 0
                    else:
                        self.worker_exited(slot, pid, status)
            if self.pipeline.pid == pid:
                self.pipeline_exited(pid, status)
        if killed:
            log.warning("killed %d workers that did not finish draining in time", len(killed))
        self.stop_pipeline()
        log.info("stopped")
        return 0

    def stop_pipeline(self) -> None:
        """After the workers: it reads what they made durable last, commits, exits."""
        slot = self.pipeline
        if not slot.pid:
            return
        try:
            os.kill(slot.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + self.cfg.pipeline_stop_timeout
        while slot.pid and time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(slot.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.pipeline_exited(pid, status)
                break
            time.sleep(0.02)
        else:
            if slot.pid:
                log.warning("killed the pipeline process: it did not stop within pipeline_stop_timeout "
                            "(%.0f s); its threads' stacks follow", self.cfg.pipeline_stop_timeout)
                try:
                    os.kill(slot.pid, signal.SIGUSR1)      # faulthandler: the stacks, to stderr
                    time.sleep(0.2)
                    os.kill(slot.pid, signal.SIGKILL)
                    os.waitpid(slot.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
        slot.pid = 0

    def cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        if self.pidfile is not None:
            try:
                if self.pidfile.read_text().strip() == str(os.getpid()):
                    self.pidfile.unlink()
            except OSError:
                pass
        if self.block is not None:
            self.block.close(unlink=True)

