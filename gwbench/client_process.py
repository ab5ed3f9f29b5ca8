"""A bench worker process: owns a share of the clients and one event loop.

Talks to the coordinator over a multiprocessing pipe:
  worker -> coordinator: ("hello",) ("stats", snap) ("ready", info) ("pub_done", sent)
                         ("result", result) ("fatal", message)
  coordinator -> worker: ("go", start_at, hold_end) ("start", t0, t_stop)
                         ("expect", sent_by_publisher) ("stop",)
"""
from __future__ import annotations

import fcntl
import gc
import os
import resource
import signal
import time
import traceback

from .connections import ConnEngine, make_ssl_context, make_tls_context


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


# Descriptors a client process holds besides its sockets (the pipe, epoll,
# the interpreter's own files).
FD_HEADROOM = 256


def _reserve_fd_table(sockets: int) -> None:
    """Grows the descriptor table to hold every socket of the run, now. The
    kernel doubles it when a new descriptor does not fit (256, 512, ...), and
    in a process with a second thread (numpy's BLAS pool, or any library's)
    each doubling waits inside socket() for an RCU grace period: 6-15 ms in
    which none of this process's clients is served. On a ramp those stalls
    showed up as clusters of slow connects on both sides of the wire."""
    fds = min(sockets + FD_HEADROOM, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if fds <= 256:
        return
    probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.close(fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, fds - 1))
    except OSError:
        pass            # a smaller table only brings the stalls back
    finally:
        os.close(probe)


SLICE_NS = 200_000_000      # longest an engine runs before the worker reads its orders


class Control:
    """The worker's end of the pipe, polled without blocking from the loops."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.stop = False
        self.inbox: list = []

    def send(self, *msg) -> None:
        try:
            self.pipe.send(msg)
        except (BrokenPipeError, OSError):
            self.stop = True

    def poll(self) -> bool:
        """Reads pending control messages; returns True when asked to stop."""
        try:
            while self.pipe.poll():
                msg = self.pipe.recv()
                if msg[0] == "stop":
                    self.stop = True
                else:
                    self.inbox.append(msg)
        except (EOFError, OSError):
            self.stop = True  # coordinator gone
        return self.stop

    def run_slices(self, t_end: float, run_slice, done=lambda: False) -> bool:
        """Calls run_slice(until_ns), SLICE_NS at most at a time, until monotonic
        t_end or done() (True), or a stop order (False). run_slice polls the pipe."""
        end_ns = int(t_end * 1e9)
        while not self.stop:
            now_ns = time.monotonic_ns()
            if now_ns >= end_ns or done():
                return True
            run_slice(min(end_ns, now_ns + SLICE_NS))
        return False

    def wait_start(self, give_up: float, run_slice):
        """Runs slices (run_slice(until_ns), 50 ms each) until the coordinator's
        "start" comes: it, or None when stopped or past give_up (monotonic)."""
        start = None
        while start is None and not self.stop and time.monotonic() < give_up:
            run_slice(time.monotonic_ns() + 50_000_000)
            start = self.take("start")
        return start

    def take(self, kind: str):
        for i, m in enumerate(self.inbox):
            if m[0] == kind:
                return self.inbox.pop(i)
        return None

    def wait(self, kind: str, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            stop = self.poll()
            m = self.take(kind)
            if m is not None:
                return m
            if stop:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self.pipe.poll(min(left, 0.2))
            except (EOFError, OSError):
                self.stop = True
                return None


def run_client_process(pipe, body, sockets: int = 0) -> None:
    """A client process's frame around body(ctl): Ctrl-C left to the coordinator
    (it decides when to stop), the file limit raised and the descriptor table
    sized for `sockets`, the imports' objects frozen; an exception goes to the
    coordinator as "fatal"; the pipe is closed at the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _raise_nofile()
    _reserve_fd_table(sockets)
    # What the imports made (numpy, click...: ~22,000 objects) lives as long
    # as the process: out of the collector's sight, a full collection during
    # the run costs what the run allocated, not ~15 ms more.
    gc.freeze()
    ctl = Control(pipe)
    try:
        body(ctl)
    except Exception:
        ctl.send("fatal", traceback.format_exc())
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def main(worker_id: int, plan, pipe) -> None:
    run = _run_conn if plan.scenario == "conn" else _run_pubsub
    run_client_process(pipe, lambda ctl: run(worker_id, plan, ctl), plan.sockets_per_worker()[worker_id])


def _engine(plan, worker_id, ctl, native_tls: bool) -> ConnEngine:
    """native_tls: TLS clients on OpenSSL from Cython (the connection scenario);
    the throughput scenario's engine takes Python SSLSocket objects."""
    if not plan.tls:
        ssl_ctx = None
    elif native_tls:
        ssl_ctx = make_tls_context(plan.cafile, plan.insecure, plan.host)
    else:
        ssl_ctx = make_ssl_context(plan.cafile, plan.insecure)
    return ConnEngine(plan, plan.indices_for(worker_id), ssl_ctx,
                      stats_cb=lambda snap: ctl.send("stats", snap), stop_check=ctl.poll)


def _connect_on_go(worker_id: int, plan, ctl: Control, native_tls: bool) -> ConnEngine | None:
    """This process's clients connected on the ramp the coordinator's "go"
    sets, and held until its end (pubsub: none, setup only); None when the
    coordinator stopped the run first."""
    eng = _engine(plan, worker_id, ctl, native_tls)
    ctl.send("hello")
    go = ctl.wait("go", 60.0)
    if go is None:
        return None
    _, start_at, hold_end = go
    eng.run(start_at, plan.rampup, plan.total_clients, hold_end)
    return eng


def _run_conn(worker_id: int, plan, ctl: Control) -> None:
    eng = _connect_on_go(worker_id, plan, ctl, native_tls=True)
    if eng is None:
        return
    eng.disconnect_all()
    ctl.send("stats", eng.snapshot())
    ctl.send("result", eng.result())


def _run_pubsub(worker_id: int, plan, ctl: Control) -> None:
    from .pubsub import PubSubWorker  # needs the compiled extension

    eng = _connect_on_go(worker_id, plan, ctl, native_tls=False)
    if eng is None:
        return
    conns = eng.detach()
    setup = eng.result()
    ctl.send("stats", eng.snapshot())
    ctl.send("ready", {"ready": len(conns), "pubs": sum(c.role == "pub" for c in conns),
                       "subs": sum(c.role == "sub" for c in conns)})
    ps = PubSubWorker(plan, conns, ctl, eng)
    try:
        ps.run()
    finally:
        ps.close()
    ctl.send("stats", ps._snapshot())
    ctl.send("result", ps.result(setup))
