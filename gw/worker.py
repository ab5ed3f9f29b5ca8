"""A worker process: sets up the Cython loop (gw_ext/loop.pyx) and runs it.

Runs in a child forked by the master. It inherits the listening sockets of
its slot and its row of the stats block; after that it never needs the
master to serve traffic.
"""

from __future__ import annotations

import _signal
import fcntl
import logging
import os
import resource
import socket
import time

import msgspec

from gw.auth import Authenticator, anonymous_allowed
from gw.certs import CertPaths, server_context
from gw.config import Config, ConfigError, load_config, ws_origins
from gw.ingest import Ingest
from gw.jsonproto import JsonProtocol
from gw.passwords import PasswordFileError, load_password_file
from gw.persistence import Persistence
from gw.stats import Counter, StatsBlock
from gw.systopics import sys_messages
from gw_ext import codec

# The heap is trimmed after this many TLS handshakes, at most every TRIM_INTERVAL seconds,
# once a tick passes without a new handshake (malloc_trim walks the whole heap and
# madvises its free pages: milliseconds during which the worker's connections wait,
# so not in the middle of a connection ramp), or after TRIM_MAX_WAIT seconds of
# handshakes that never pause.
TRIM_AFTER_HANDSHAKES = 256
TRIM_INTERVAL = 10.0
TRIM_MAX_WAIT = 60.0

log = logging.getLogger("gw.worker")
_gw_log = logging.getLogger("gw")       # looked up here, in the master: not again in each worker


class HeapTrimSchedule:
    """When a worker trims its heap after TLS handshakes (each allocates and frees
    tens of KiB among the new connections' lasting objects: about 3.5 KiB per TLS
    connection stays resident otherwise, BENCHMARKS.md). Asked once a tick with
    the handshakes done so far: after TRIM_AFTER_HANDSHAKES of them, at most every
    TRIM_INTERVAL s, and only at a tick that saw no new handshake (the run is
    over: the trim stalls the loop for milliseconds) unless handshakes went on for
    TRIM_MAX_WAIT s. The worker's start counts as a trim, so the first is not
    overdue inside the first ramp."""

    def __init__(self, start: float):
        self.trimmed_at = start         # when the heap was last trimmed
        self.trimmed_done = 0           # the handshakes then
        self.last_done = 0              # the handshakes at the last tick

    def due(self, now: float, done: int) -> bool:
        quiet = done == self.last_done
        self.last_done = done
        if (done - self.trimmed_done >= TRIM_AFTER_HANDSHAKES and now - self.trimmed_at >= TRIM_INTERVAL
                and (quiet or now - self.trimmed_at >= TRIM_MAX_WAIT)):
            self.trimmed_at, self.trimmed_done = now, done
            return True
        return False


class ListenerSpec:
    """One listening socket of a worker slot, as the master made it."""

    def __init__(self, name: str, sock, proto: str, tls: bool):
        self.name = name          # config key: mqtt, mqtts, json, jsons, http, https, ws, wss
        self.sock = sock
        self.proto = proto        # "mqtt", "json", "http" or "ws" (MQTT over WebSocket)
        self.tls = tls


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# Descriptors a worker holds besides its connections: listeners, epoll, the
# channels to the master and the other workers, the log files, the store.
FD_HEADROOM = 1024


def reserve_fd_table(fds: int) -> int:
    """Grows this process's file-descriptor table to hold `fds` descriptors (at
    most RLIMIT_NOFILE), once, now; returns the size asked of the kernel.

    The kernel doubles the table when a new descriptor does not fit (at 256,
    512, 1024, ... open files), and in a process with threads (a worker has
    its file writer's) each doubling waits for an RCU grace period inside
    accept(): 6-15 ms here, during which every connection of the worker
    waits. Measured on the wire, these stalls were the whole of the worker's
    connect tail during a ramp. Reserved up front, the table never grows
    while serving. The table lives in kernel memory (8 bytes and two bits per
    descriptor), not in the process's pages, and is never shrunk: growing it
    again on a reload that raises max_connections is one call."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fds = min(fds, soft)
    if fds <= 256:
        return fds
    probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # The lowest free descriptor at or above fds - 1: never one in use (dup2
        # would close a connection that sits there after a reload).
        os.close(fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, fds - 1))
    except OSError:
        pass            # a smaller table only brings back the stalls, never an error
    finally:
        os.close(probe)
    return fds


def apply_limits(worker, cfg: Config) -> None:
    """Every limit of a Worker, from the config: the one place they are set
    (a Worker starts with none), at start and on SIGHUP."""
    reserve_fd_table(cfg.max_connections + FD_HEADROOM)
    worker.max_connections = cfg.max_connections
    worker.max_packet_size = cfg.max_packet_size
    worker.ws_path = cfg.ws_path.encode()
    worker.ws_allowed_origins = frozenset(o.encode() for o in ws_origins(cfg))
    worker.max_outbound = cfg.max_outbound
    worker.tls_own_records = cfg.tls_record_layer == "gw"
    worker.soft_outbound = cfg.max_outbound // 2
    worker.max_inflight = cfg.max_inflight
    worker.max_queued = cfg.max_queued
    worker.queue_high = max(1, cfg.max_queued // 4)
    worker.queue_low = cfg.max_queued // 8
    worker.max_retained = cfg.max_retained
    worker.max_retained_bytes = cfg.max_retained_bytes
    worker.max_queued_bytes = cfg.max_queued_bytes
    worker.max_awaiting_rel = cfg.max_awaiting_rel
    worker.topic_alias_maximum = cfg.topic_alias_maximum
    worker.topic_alias_maximum_out = cfg.topic_alias_maximum_out
    worker.max_delayed_wills = cfg.max_delayed_wills
    worker.max_subscriptions = cfg.max_subscriptions
    worker.max_topic_levels = cfg.max_topic_levels
    worker.max_topic_length = cfg.max_topic_length
    worker.connect_timeout_ms = int(cfg.connect_timeout * 1000)
    worker.settle_timeout_ms = int(cfg.connect_settle_timeout * 1000)
    worker.connect_at_once = cfg.connect_at_once
    worker.json_timeout_ms = int(cfg.json_timeout * 1000)
    worker.http_max_body = cfg.max_body_size
    worker.http_timeout_ms = int(cfg.http_timeout * 1000)
    worker.http_keepalive_ms = int(cfg.http_keepalive_timeout * 1000)
    worker.http_linger_bytes = cfg.http_linger_bytes
    worker.http_linger_ms = int(cfg.http_linger_timeout * 1000)
    worker.telemetry_topic = cfg.telemetry_topic
    worker.max_sink_lag = cfg.max_sink_lag_bytes
    worker.tick_ms = 1000
    # After max_packet_size: the default byte burst is at least one largest packet.
    worker.set_rate_limits(cfg.max_conn_rate, cfg.max_conn_burst, cfg.max_messages_rate,
                           cfg.max_messages_burst, cfg.max_bytes_rate, cfg.max_bytes_burst,
                           cfg.max_connections_per_ip)


def peer_address(fd: int) -> str | None:
    """HOST:PORT of a connection's client (only for a log line: a dup and a getpeername)."""
    if fd < 0:
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def apply_process_settings(cfg: Config) -> None:
    """The settings of the whole worker process, at start and on SIGHUP."""
    # The codec's policy (its decoders take no settings).
    codec.allow_control_characters(cfg.mqtt_control_characters == "accept")
    logger = _gw_log
    level = logging.getLevelName(cfg.log_level.upper())
    if logger.level != level:
        # setLevel clears every logger's cache, writing to objects the master's
        # pages hold: not done when the level is the one inherited.
        logger.setLevel(level)


def ack_mode(cfg: Config, listener: str) -> str:
    """A listener's ack mode: its own setting (ack_http, ...), else `ack`."""
    return getattr(cfg, f"ack_{listener}", "") or cfg.ack


def open_wal(slot: int, cfg: Config, block: StatsBlock):
    """This worker's write-ahead log under data_dir/wal/{slot}, recovered: a torn
    or corrupt tail (a crash mid-write) is cut and counted, never replayed."""
    from gw_ext.wal import Wal

    wal = Wal(os.path.join(cfg.data_dir, "wal", str(slot)), segment_bytes=cfg.wal_segment_bytes,
              fsync=cfg.fsync, batch_ms=cfg.wal_batch_ms, max_pending=cfg.wal_max_pending,
              counters=block.row(slot))
    found = wal.recover()
    if found.get("truncated_bytes"):
        log.warning("worker %d: write-ahead log recovered: cut a torn or corrupt tail of %d bytes "
                    "(a crash mid-write); %d whole records before it kept", slot,
                    found["truncated_bytes"], found.get("records", 0))
    if found.get("corrupt_bytes"):
        log.warning("worker %d: write-ahead log recovered: %d bytes of damage in the middle of its last "
                    "segment (offsets %s), with valid records after it: kept; the pipeline skips the damage",
                    slot, found["corrupt_bytes"],
                    ", ".join(f"{a}..{b}" for a, b in found.get("corrupt_regions", [])))
    return wal


def attach_dedup(dedup, slot: int, wal, wal_dir: str) -> None:
    """Attaches this worker to the idempotency table. A previous life of this
    slot may have left readings recorded as pending (not durable when it died):
    those its recovered log holds are committed (they are durable now, and the
    pipeline stores them: a retry is a duplicate); then the new life begins,
    and the pending records left, whose readings were lost, no longer count (a
    retry is taken). Until then a retry meeting them is not acknowledged."""
    start = dedup.recommit_from(slot)
    end = wal.durable_offset
    if start is not None and start < end:
        committed = recommit_logged(dedup, slot, wal_dir, start, end)
        if committed:
            log.info("worker %d: %d readings of its previous life, pending in the idempotency table, "
                     "are in its recovered log: recorded as seen", slot, committed)
    dedup.attach(slot, end)


def recommit_logged(dedup, slot: int, wal_dir: str, start: int, end: int) -> int:
    """dedup.recommit for each reading with a seq in the log between start and end."""
    from gw_ext.wal import OffsetDeletedError, WalOffsetError, WalReader

    decode = msgspec.json.Decoder(_LoggedReading).decode
    committed = 0
    reader = WalReader(wal_dir)
    try:
        pos = start
        while pos < end:
            try:
                records, nxt = reader.read(pos, end, max_records=10_000)
            except OffsetDeletedError:
                pos = max(pos + 1, int(reader.first_offset()))
                continue
            except WalOffsetError as exc:
                log.warning("worker %d: readings pending before its restart not checked: %s", slot, exc)
                break
            for _, payload in records:
                try:
                    reading = decode(payload)
                except msgspec.DecodeError:
                    continue
                if reading.seq is not None:
                    committed += dedup.recommit(slot, reading.device_id.encode(), reading.seq)
            if nxt == pos:
                break
            pos = nxt
    finally:
        reader.close()
    return committed


class _LoggedReading(msgspec.Struct):
    """What the idempotency table keys a logged reading by (its normalised JSON)."""
    device_id: str
    seq: int | None = None


def preload(cfg: Config | None = None) -> None:
    """Imports every module a worker runs, for the master to call before it
    forks: the pages they fill are then shared by every worker (and the
    pipeline) instead of copied into each. With the config, also makes once
    what each worker's start would otherwise work out in its own pages."""
    import gw.health  # noqa: F401
    import gw.http_api  # noqa: F401
    import gw.metrics  # noqa: F401
    import gw.query_pool  # noqa: F401
    import gw_ext.acl  # noqa: F401
    import gw_ext.loop  # noqa: F401
    import gw_ext.tls  # noqa: F401
    from gw.ingest import shared_ingestor
    from gw.jsonproto import Message

    # msgspec resolves a Struct's annotations the first time a decoder takes it
    # and keeps the result in the class, as typing keeps the batch's
    # Annotated[list[...], Meta(...)]: done here, each worker's decoders find them.
    for struct in (Message, _LoggedReading):
        msgspec.json.Decoder(struct)
    if cfg is not None:
        shared_ingestor(cfg.max_batch)     # kept: each worker's Ingest takes it


def worker_main(slot: int, cfg: Config, listeners: list[ListenerSpec], channels: dict,
                block: StatsBlock, certs: CertPaths | None, config_path: str | None,
                overrides: dict, dedup=None, acl=None,
                address_counts=None, password_users=None, tokens=None, series=None,
                tls_context=None) -> int:
    from gw.health import Health
    from gw.http_api import HttpApp
    from gw.metrics import render
    from gw.query_pool import QueryPool
    from gw_ext.loop import Worker
    from gw_ext.tls import TLSError, release_free_heap

    # Ctrl-C reaches the whole process group; the master decides what happens.
    # (_signal: signal.signal's enum conversions would run in this process's pages.)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    # A file over RLIMIT_FSIZE: the write fails (EFBIG) and the log reports it,
    # rather than the signal killing the worker.
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    max_fds = raise_fd_limit()
    # The schema for every transport; the worker takes what it accepts (worker/ingest.pyx).
    ingest = Ingest(cfg.max_batch, block.row(slot))
    json_protocol = JsonProtocol(ingest)
    worker = Worker(slot, block.row(slot), block.matrix, block.nworkers, json_protocol, max_fds)
    if address_counts is not None:
        worker.set_address_counts(address_counts)      # max_connections_per_ip, shared by every worker
    apply_limits(worker, cfg)
    apply_process_settings(cfg)
    if acl is not None:
        # The master's version (parsed at start or at its last reload), not the file
        # as it may be now: a respawned worker enforces what the others do.
        from gw_ext.acl import AclRules
        worker.set_acl(AclRules(acl))
    elif cfg.acl_file:
        raise RuntimeError("acl_file is set but the master passed no ACL")
    serving = {spec.name: "%s:%d" % spec.sock.getsockname()[:2] for spec in listeners}
    # The HTTP tokens as the master has them in force, like the ACL and the users.
    app = HttpApp(cfg, worker_index=slot, ingest=ingest, render_metrics=lambda: render(block),
                  health=Health(block, serving, cfg.data_dir, slot), counters=block.row(slot), tokens=tokens)
    if series is not None:
        # GET /v1/stats/series: the master's ring of the last minutes (gw/series.py).
        from gw.series import series_answer
        app.stats_series = lambda after: series_answer(series, block, after)
    app.listeners = serving
    worker.http_app = app
    app.peer_address = lambda: peer_address(worker.http_current_fd)
    worker.ingest = ingest
    wal = open_wal(slot, cfg, block)
    worker.set_wal(wal)
    if dedup is not None:
        attach_dedup(dedup, slot, wal, os.path.join(cfg.data_dir, "wal", str(slot)))
        worker.set_dedup(dedup)
    query_pool = None
    if cfg.query_threads:
        # The store queries run in threads (started on the first query), not in the loop.
        query_pool = QueryPool(cfg.query_threads, cfg.query_max_pending)
        worker.set_query_pool(query_pool)
        app.query_pool = query_pool
    auth_pool = None

    def apply_auth(new: Config, users: dict | None = None) -> None:
        # Who may connect (gw/auth.py, gw_ext/worker/auth.pyx). A password file
        # that does not load keeps the one in force (fail-closed); connected
        # clients stay connected whatever the new file says, as with Mosquitto.
        # users: the file as the master parsed it (a start or respawn), else read here.
        nonlocal auth_pool
        authenticator = worker_authenticator[0]
        if new.password_file:
            try:
                if users is None:
                    users = load_password_file(new.password_file)
            except PasswordFileError as exc:
                log.error("worker %d: password file not reloaded, the previous one stays in force: %s", slot, exc)
                return
            if authenticator is None:
                authenticator = Authenticator(users, new.auth_cache_seconds, new.auth_cache_entries,
                                              new.auth_inline_iterations)
            else:
                authenticator.replace(users, new.auth_cache_seconds, new.auth_cache_entries,
                                      new.auth_inline_iterations)
            if auth_pool is None and new.auth_threads:
                auth_pool = QueryPool(new.auth_threads, new.auth_max_pending, name="auth")
            if auth_pool is not None:
                auth_pool.max_pending = new.auth_max_pending
        else:
            authenticator = None
        worker_authenticator[0] = authenticator
        worker.set_auth(authenticator, auth_pool)
        worker.allow_anonymous = anonymous_allowed(new)
        # The handshake of a listener requiring a certificate authenticated the
        # client: no user name needed there, unless the operator said false.
        worker.certificate_anonymous = new.allow_anonymous != "false"
        worker.auth_required = bool(new.password_file) or new.require_certificate

    worker_authenticator = [None]
    # The version in force in the master: a respawned worker does not read a file
    # changed (perhaps broken) since the last reload the master accepted.
    apply_auth(cfg, password_users)
    if cfg.password_file and worker_authenticator[0] is None:
        raise SystemExit(f"worker {slot}: the password file does not load")
    # The master's context (made before the fork, so its pages are shared), else made here.
    tls = tls_context
    if tls is None and certs is not None:
        tls = server_context(certs, cfg)
    for peer, sock in channels.items():
        worker.add_peer(peer, sock.fileno())
    tls_indexes = []
    for spec in listeners:
        index = worker.add_listener(spec.sock.fileno(), spec.proto, tls if spec.tls else None,
                                    ack_mode(cfg, spec.name) == "sink")
        if spec.tls:
            tls_indexes.append(index)

    def on_term(signum, frame):
        worker.request_drain(cfg.drain_timeout)

    def on_hup(signum, frame):
        worker.request_reload()

    def reload():
        nonlocal cfg
        try:
            new = load_config(config_path, overrides)
        except ConfigError as exc:
            log.error("worker %d: reload refused, keeping the running config: %s", slot, exc)
            return
        if certs is not None:
            # New handshakes get the new context (server certificate, client CA,
            # CRLs); open connections keep theirs. One that does not load keeps
            # the old contexts and the old configuration (the master checked it
            # first: a file changed since).
            try:
                fresh = server_context(certs, new)
            except TLSError as exc:
                log.error("worker %d: reload refused, certificates do not load, keeping the "
                          "running ones: %s", slot, exc)
                return
            for index in tls_indexes:
                worker.set_tls_context(index, fresh)
        apply_limits(worker, new)
        apply_process_settings(new)
        apply_auth(new)
        app.cfg = new
        if query_pool is not None:
            query_pool.max_pending = new.query_max_pending
        cfg = new
        log.debug("worker %d: reloaded", slot)

    def reload_acl(path: str) -> None:
        # Atomic and fail-closed: the new version replaces the old one whole,
        # or (it does not parse, or cannot be read) the old one stays in force.
        from gw.acl import AclError, load_acl
        from gw_ext.acl import AclRules
        if not path:
            worker.set_acl(None)
            return
        try:
            rules = AclRules(load_acl(path))
        except AclError as exc:
            log.error("worker %d: ACL reload refused, keeping the one in force: %s", slot, exc)
            return
        worker.set_acl(rules)
        log.info("worker %d: ACL %s: %d rules", slot, path, rules.rule_count)

    def reload_all():
        reload()
        reload_acl(cfg.acl_file)

    worker.on_reload = reload_all
    persistence = Persistence(worker, slot, block.nworkers, cfg.data_dir, cfg.persist_interval,
                              counters=block.row(slot))
    persistence.load()
    next_sys = 0.0
    counters = block.row(slot)
    heap_trim = HeapTrimSchedule(time.monotonic())

    def trim_after_handshakes():
        done = int(counters[Counter.TLS_HANDSHAKES]) + int(counters[Counter.TLS_FAILURES])
        if heap_trim.due(time.monotonic(), done):
            release_free_heap()

    def tick():
        # Once a second: persistence, and on worker 0 the $SYS topics.
        nonlocal next_sys
        trim_after_handshakes()
        persistence.interval = cfg.persist_interval
        # session_expiry for 3.1.1 sessions (0: kept), and every MQTT 5.0
        # session's own Session Expiry Interval.
        expired = worker.expire_sessions(cfg.session_expiry or 0)
        if expired:
            log.info("worker %d: %d persistent sessions expired", slot, expired)
        persistence.tick()
        if slot == 0 and cfg.sys_interval and time.monotonic() >= next_sys:
            next_sys = time.monotonic() + cfg.sys_interval
            for topic, value in sys_messages(block, len(worker.retained_messages)):
                worker.publish(topic.encode(), value.encode(), 0, True)

    worker.on_tick = tick
    _signal.signal(_signal.SIGTERM, on_term)
    _signal.signal(_signal.SIGHUP, on_hup)
    log.debug("worker %d (pid %d) serving, fd limit %d", slot, os.getpid(), max_fds)
    # What setting up freed in the C heap goes back to the system.
    release_free_heap()
    worker.run()
    persistence.tick(final=True)
    wal.flush()
    wal.close()
    return 0
