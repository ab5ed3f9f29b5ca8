"""Runs a plan: starts the worker processes, coordinates their phases,
samples the broker and the tool itself once a second, prints the live
progress line, and merges everything into one result."""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import sys
import time

import click

from . import client_process
from .report import Aggregate

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency
    psutil = None


class Sampler:
    """RSS (process + children) and CPU% of a set of processes."""

    def __init__(self, pids, with_children: bool):
        self.procs = []
        self.with_children = with_children
        for pid in pids:
            try:
                self.procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        self.last_cpu = None
        self.last_t = None
        self.per_proc_last: dict[int, float] = {}

    def _tree(self):
        out = []
        for p in self.procs:
            out.append(p)
            if self.with_children:
                try:
                    out.extend(p.children(recursive=True))
                except psutil.Error:
                    pass
        return out

    def sample(self) -> dict | None:
        rss = 0
        cpu = 0.0
        user = 0.0
        alive = 0
        per = {}
        for p in self._tree():
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    c = t.user + t.system
                cpu += c
                user += t.user
                per[p.pid] = c
                alive += 1
            except psutil.Error:
                continue
        if not alive:
            return None
        now = time.monotonic()
        out = {"rss": rss}
        if self.last_t is not None and now > self.last_t:
            dt = now - self.last_t
            out["cpu_pct"] = max(0.0, (cpu - self.last_cpu) / dt * 100.0)
            out["user_pct"] = max(0.0, (user - self.last_user) / dt * 100.0)
            out["max_proc_cpu_pct"] = max(
                ((c - self.per_proc_last.get(pid, c)) / dt * 100.0 for pid, c in per.items()), default=0.0)
        self.last_cpu, self.last_user, self.last_t, self.per_proc_last = cpu, user, now, per
        return out


class Coordinator:
    def __init__(self, plan, *, quiet: bool = False, server_pid: int | None = None,
                 progress_stream=None):
        self.plan = plan
        self.quiet = quiet
        self.server_pid = server_pid
        self.stream = progress_stream if progress_stream is not None else sys.stderr
        self.show_progress = not quiet and self.stream.isatty()
        self.agg = Aggregate(plan)
        self.procs: list = []
        self.pipes: list = []
        self.snaps: dict[int, dict] = {}
        self.results: dict[int, dict] = {}
        self.phase = "starting"
        self.interrupted = False
        self.notes: list[str] = []

    # -- processes -----------------------------------------------------------
    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        target = client_process.main
        if self.plan.scenario == "ingest":
            from . import ingest_scenario
            target = ingest_scenario.worker_main
        for w in range(self.plan.procs):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=target, args=(w, self.plan, child), daemon=True,
                            name=f"gw-bench-{w}")
            p.start()
            child.close()
            self.procs.append(p)
            self.pipes.append(parent)

    def _broadcast(self, *msg) -> None:
        for w, pipe in enumerate(self.pipes):
            if w in self.results:
                continue
            try:
                pipe.send(msg)
            except (BrokenPipeError, OSError):
                pass

    def _pump(self, timeout: float, on_msg) -> None:
        """Waits up to timeout for worker messages and dispatches them."""
        live = [p for w, p in enumerate(self.pipes) if w not in self.results and not p.closed]
        if not live:
            time.sleep(max(0.0, timeout))
            return
        try:
            ready = mpc.wait(live, timeout)
        except KeyboardInterrupt:
            self._interrupt()
            return
        for pipe in ready:
            w = self.pipes.index(pipe)
            try:
                while pipe.poll():
                    msg = pipe.recv()
                    self._dispatch(w, msg, on_msg)
            except (EOFError, OSError):
                if w not in self.results:
                    self.results[w] = None
                    self.agg.fatal(w, f"worker {w} exited without a result (exit code {self.procs[w].exitcode})")
                pipe.close()

    def _dispatch(self, w: int, msg, on_msg) -> None:
        kind = msg[0]
        if kind == "stats":
            self.snaps[w] = msg[1]
            k = msg[1].get("k")
            if k is not None:
                self.agg.marks.setdefault(w, {})[k] = msg[1]
        elif kind == "result":
            self.results[w] = msg[1]
        elif kind == "fatal":
            self.results[w] = None
            self.agg.fatal(w, msg[1])
        if on_msg:
            on_msg(w, msg)

    def _interrupt(self) -> None:
        if not self.interrupted:
            self.interrupted = True
            self.notes.append("interrupted (Ctrl-C): partial results")
            self._broadcast("stop")

    def _all_sent(self, kind_seen: dict) -> bool:
        return all(w in kind_seen or w in self.results for w in range(len(self.pipes)))

    def _wait_all(self, kind: str, timeout: float) -> dict:
        seen: dict[int, tuple] = {}

        def on(w, msg):
            if msg[0] == kind:
                seen[w] = msg

        deadline = time.monotonic() + timeout
        while not self._all_sent(seen) and time.monotonic() < deadline and not self.interrupted:
            self._tick()
            self._pump(min(0.2, max(0.0, deadline - time.monotonic())), on)
        return seen

    # -- sampling and progress ------------------------------------------------
    def _tick(self, force: bool = False) -> None:
        """Once per whole second after the common start (plus a little, so
        the workers' marks for that second have arrived): samples the broker
        and the tool, and redraws the progress line."""
        if self.start_at is None:
            return
        now = time.monotonic()
        while now >= self.start_at + self.k_next + 0.05:
            k = self.k_next
            self.k_next += 1
            server = self.server_sampler.sample() if self.server_sampler else None
            tool = self.tool_sampler.sample() if self.tool_sampler else None
            self.agg.add_sample(k, server, tool, self.phase)
            if self.show_progress and now < self.start_at + self.k_next + 0.05:
                click.echo("\r" + self.agg.progress_line(k), nl=False, err=True)
                self._drawn = True

    # -- the run -------------------------------------------------------------
    def run(self):
        self.t_start = time.monotonic()
        self.start_at = None
        self.k_next = 1
        self._drawn = False
        self.server_sampler = None
        if self.server_pid:
            self.server_sampler = Sampler([self.server_pid], with_children=True)
            s = self.server_sampler.sample()
            if s is None:
                raise click.ClickException(f"--server-pid {self.server_pid}: no such process")
            self.agg.server_before(s)
        self._spawn()
        self.tool_sampler = Sampler([p.pid for p in self.procs], with_children=False)
        try:
            self._run_phases()
        except KeyboardInterrupt:
            self._interrupt()
            self._finish(time.monotonic() + 5.0)
        if self._drawn:
            click.echo("", err=True)
        self.agg.notes.extend(self.notes)
        return self.agg.finish(self.results, time.monotonic() - self.t_start)

    def _run_phases(self) -> None:
        plan = self.plan
        hello = self._wait_all("hello", 60.0)
        if len(hello) < plan.procs and not self.interrupted:
            self.notes.append("some workers did not start")
        start_at = time.monotonic() + 0.1
        self.start_at = start_at
        self.agg.t_run_start = start_at - self.t_start
        if self.tool_sampler:
            self.tool_sampler.sample()
        if self.server_sampler:
            self.server_sampler.sample()
        if plan.scenario == "conn":
            hold_end = start_at + plan.rampup + plan.duration
            self.phase = "ramp"
            self._broadcast("go", start_at, hold_end)
            while not self.interrupted and time.monotonic() < hold_end and len(self.results) < plan.procs:
                if self.phase == "ramp" and time.monotonic() >= start_at + plan.rampup:
                    self.phase = "hold"
                self._tick()
                self._pump(0.2, None)
            self.phase = "disconnect"
            self._finish(hold_end + plan.grace)
            return
        if plan.scenario == "ingest":
            self._run_ingest(start_at)
            return

        # throughput: connect + subscribe everyone, then publish together
        self.phase = "setup"
        self._broadcast("go", start_at, None)
        ready = self._wait_all("ready", plan.rampup + plan.connect_timeout + 15.0)
        pubs = sum(m[1]["pubs"] for m in ready.values())
        subs = sum(m[1]["subs"] for m in ready.values())
        too_few = (f"{pubs} publisher(s) and {subs} subscriber(s) connected"
                   if pubs == 0 or (plan.subscribers and subs == 0) else None)
        if not self._ready_to_measure(ready, too_few):
            return
        t0, t_stop = self._start_together(start_at, "publish")
        pub_done = {}

        def on(w, msg):
            if msg[0] == "pub_done":
                pub_done[w] = msg[1]

        deadline = t_stop + plan.grace
        while not self.interrupted and not self._all_sent(pub_done) and time.monotonic() < deadline:
            if self.phase == "publish" and time.monotonic() >= t_stop:
                self.phase = "drain"
            self._tick()
            self._pump(0.2, on)
        sent = [0] * plan.publishers
        for d in pub_done.values():
            for pid, n in d.items():
                sent[int(pid)] = n
        self.agg.publisher_sent = sent
        self.phase = "drain"
        self._broadcast("expect", sent)
        self._finish(deadline)

    def _run_ingest(self, start_at: float) -> None:
        """Ingest: every worker connects its clients, then all send requests
        from one t0 to one t_stop, then drain (each worker sends its result
        when every request is answered or its deadline passed)."""
        plan = self.plan
        self.phase = "setup"
        self._broadcast("go", start_at, None)
        ready = self._wait_all("ready", plan.connect_timeout + 15.0)
        n = sum(m[1]["ready"] for m in ready.values())
        if not self._ready_to_measure(ready, "no client connected" if n == 0 else None):
            return
        t0, t_stop = self._start_together(start_at, "send")
        deadline = t_stop + plan.grace
        while not self.interrupted and len(self.results) < plan.procs and time.monotonic() < deadline:
            if self.phase == "send" and time.monotonic() >= t_stop:
                self.phase = "drain"
            self._tick()
            self._pump(0.2, None)
        self.phase = "drain"
        self._finish(deadline)

    def _ready_to_measure(self, ready: dict, too_few: str | None) -> bool:
        """After the setup phase: whether the run goes on to send. Not when it
        was interrupted, no worker reported ready, or too_few says what little
        connected (nothing to measure: the workers are told to stop); the run
        is finished then."""
        if not self.interrupted and ready and too_few:
            self.notes.append(f"nothing to measure: {too_few}")
            self._broadcast("stop")
        if self.interrupted or not ready or too_few:
            self._finish(time.monotonic() + self.plan.grace)
            return False
        return True

    def _start_together(self, start_at: float, phase: str) -> tuple[float, float]:
        """Every worker sends from one t0, just ahead so that the message
        reaches them all, for the run's duration: (t0, t_stop)."""
        self.phase = phase
        t0 = time.monotonic() + 0.05
        t_stop = t0 + self.plan.duration
        self.agg.t_publish = (t0 - start_at, t_stop - start_at)
        self._broadcast("start", t0, t_stop)
        return t0, t_stop

    def _finish(self, deadline: float) -> None:
        """Collects results until the deadline; then stops and, past a
        short extra wait, terminates the workers that are still running."""
        while len(self.results) < len(self.pipes) and time.monotonic() < deadline:
            self._tick()
            self._pump(0.2, None)
        if len(self.results) < len(self.pipes):
            self.notes.append("workers still busy past the deadline: asked to stop")
            self._broadcast("stop")
            end = time.monotonic() + 3.0
            while len(self.results) < len(self.pipes) and time.monotonic() < end:
                self._pump(0.2, None)
        for w, p in enumerate(self.procs):
            p.join(timeout=max(0.0, 2.0 if w in self.results else 0.0))
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=1.0)
                if w not in self.results:
                    self.results[w] = None
                    self.agg.fatal(w, f"worker {w} did not finish in time and was terminated")
        for pipe in self.pipes:
            try:
                pipe.close()
            except OSError:
                pass
