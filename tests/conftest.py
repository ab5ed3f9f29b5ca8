"""Harness for the `gw serve` tests: real processes, real sockets, loopback only.

`GwServer` starts `gw serve` (python -m gw.cli serve) on free ports it picked,
with its own --data-dir and --certs under a tmp dir, waits until every worker
runs its loop, and always stops it (SIGTERM, then SIGKILL of the master and
of every worker it ever saw, by pid). Helpers build raw MQTT packets by hand
(struct, not the project codec) and wrap paho-mqtt clients.

Fragmentation: with GW_TEST_FRAGMENT=1 every GwServer listens on ports of its
own and a fragmenting proxy (tests/fragproxy.py) on each of the ports the
tests connect to (`GwServer.ports`) relays to them, re-cutting both byte
streams at random points. The run's seed is printed in pytest's header and in
each test's set-up output; GW_TEST_FRAGMENT_SEED=<seed> replays it. A test that
cannot run through a proxy says so with `@pytest.mark.no_fragment(reason)` and
is skipped under the switch. `send_fragmented` writes a client's own bytes in
pieces, with or without the switch.

A worker or pipeline process of any such server that dies during a test fails
that test (`no_undeclared_deaths`, from the master's counts in the stats block),
with the death's exit status and the server's log; a test that kills one on
purpose declares it first (`server.expect_worker_deaths(1)`).
"""

from __future__ import annotations

import atexit
import json
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

import fragproxy
from fragproxy import FragProxy
from mqtt_bytes import mqtt_str, packet, varint  # noqa: F401  (the tests import them from here too)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))     # the in-place build: gw/ and gw_ext/*.so
PYTHON = sys.executable
LISTENERS = ("mqtt", "mqtts", "json", "jsons", "http", "https")
# Every listener gw has: those a server is not given are `off`.
ALL_LISTENERS = LISTENERS + ("ws", "wss")
HOST = "127.0.0.1"
STATS_LINE = re.compile(r"\[stats\] clients: \d+ \| peak: \d+ \| memory: \d+(\.\d+)? MB \| "
                        r"conn_rate: \d+/s \| msg_in: \d+/s \| msg_out: \d+/s")


# --- processes -----------------------------------------------------------------

def gw_env() -> dict:
    """The environment of a `gw` subprocess: the repository on PYTHONPATH (the
    in-place build), unless PYTHONPATH already names it: then its order stands,
    so a build placed before it (`./dev sanitize`'s) is the one the server runs."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any(Path(p).resolve() == REPO for p in paths):
        paths.insert(0, str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_gw(*args, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
    """Runs one `gw` command to completion (bounded)."""
    return subprocess.run([PYTHON, "-m", "gw.cli", *map(str, args)], env=gw_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (bound to port 0 together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls predicate until truthy (returned) or raises AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


_RUNNING: list["GwServer"] = []
# Servers whose deaths are still to be checked: every started one, until it
# was stopped and checked (tests/conftest.py no_undeclared_deaths).
_WATCHED: list["GwServer"] = []
DEATHS = ("worker_deaths", "pipeline_deaths")
DEATH_LINE = re.compile(r"^.*(?:worker \d+|the pipeline process) \(pid \d+\) died.*$", re.M)
def sanitizer_rss_slack() -> int:
    """Bytes a worker's RSS may hold beyond a normal build's under `./dev sanitize`:
    AddressSanitizer keeps freed memory in its quarantine (quarantine_size_mb in
    ASAN_OPTIONS, which ./dev sets) to catch its use. 0 in a normal run, where the
    tests' memory bounds apply as written."""
    if not os.environ.get("GW_SANITIZE"):
        return 0
    m = re.search(r"quarantine_size_mb=(\d+)", os.environ.get("ASAN_OPTIONS", ""))
    return (int(m.group(1)) if m else 256) << 20


SANITIZER_REPORT = re.compile(r"^.*(?:ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer"
                              r"|ERROR: UndefinedBehaviorSanitizer).*$", re.M)
LOG_EXCERPT = 8000          # characters of a server's log in a death report


@atexit.register
def _stop_leftovers() -> None:
    """Last resort (e.g. an interrupted run): no server outlives the test process."""
    for server in list(_RUNNING):
        server.stop(timeout=5)


class GwServer:
    """One `gw serve` process tree.

    listeners: which of mqtt/mqtts/json/jsons/http/https/ws/wss get a free port (the others are `off`).
    argv: when given, replaces the generated flags entirely (after `serve`); the
    caller then passes `ports` and `workers` so the harness knows what to expect.
    ports: where clients connect. fragment (default: GW_TEST_FRAGMENT): a
    fragmenting proxy listens on each of those and relays to the server's own
    ports (`listen_ports`); without it the server listens on `ports` itself.
    """

    def __init__(self, base: Path, *, workers: int = 2, listeners=LISTENERS, certs=None,
                 data_dir=None, config=None, stats_interval: float = 0, args=(), argv=None,
                 ports: dict | None = None, fragment: bool | None = None):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.data_dir = Path(data_dir) if data_dir else self.base / "data"
        self.certs_dir = Path(certs) if certs else self.base / "certs"
        self.config = config
        self.stats_interval = stats_interval
        self.args = [str(a) for a in args]
        self.argv = argv
        # Ports picked here are picked again when another process took one
        # between the pick and the server's bind (start()).
        self._ports_picked = ports is None and argv is None
        if ports is None:
            ports = dict(zip(listeners, free_ports(len(listeners))))
        self.ports: dict[str, int] = dict(ports)
        # argv names the ports the server listens on: no room for a proxy then.
        self.fragment = fragproxy.enabled() if fragment is None else fragment
        self.fragment = self.fragment and argv is None
        self.listen_ports: dict[str, int] = (dict(zip(self.ports, free_ports(len(self.ports))))
                                             if self.fragment else self.ports)
        self.proxies: dict[str, FragProxy] = {}
        self.log_path = self.base / "gw.log"          # stderr: log lines and messages
        self.stdout_path = self.base / "stdout.log"
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        self._seen: dict[int, psutil.Process] = {}
        self._block = None
        self._log_fh = self._out_fh = None
        # Deaths (worker_deaths, pipeline_deaths): declared for the current test,
        # already checked, counted by earlier runs (a restart: a new master counts
        # from 0), and as counted when the master exited.
        self._deaths_expected = dict.fromkeys(DEATHS, 0)
        self._deaths_checked = dict.fromkeys(DEATHS, 0)
        self._deaths_before = dict.fromkeys(DEATHS, 0)
        self._deaths_final: dict | None = None
        self._log_mark = 0          # where in the log the current test's part begins
        self.stopped = False

    # where things are
    @property
    def ca(self) -> Path:
        return self.certs_dir / "ca.pem"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "gw.pid"

    @property
    def shm(self) -> Path:
        return Path("/dev/shm") / f"gw-{self.pid}.stats"

    def command(self) -> list[str]:
        cmd = [PYTHON, "-m", "gw.cli", "serve"]
        if self.argv is not None:
            return cmd + [str(a) for a in self.argv]
        if self.config:
            cmd += ["--config", str(self.config)]
        cmd += ["--workers", str(self.workers)]
        for name in ALL_LISTENERS:
            cmd += [f"--{name}", f"{HOST}:{self.listen_ports[name]}" if name in self.listen_ports else "off"]
        cmd += ["--data-dir", str(self.data_dir), "--certs", str(self.certs_dir),
                "--stats-interval", str(self.stats_interval)]
        return cmd + self.args

    # life cycle
    def start(self, timeout: float = 30.0) -> "GwServer":
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError as exc:
                # A port free when picked, taken before the server bound it (by
                # another test's server or a client's ephemeral port): gw refuses
                # to share a port, so pick others.
                if not self._ports_picked or attempt == 2 or "another process listens there" not in str(exc):
                    raise
                self.ports = dict(zip(self.ports, free_ports(len(self.ports))))
                self.listen_ports = (dict(zip(self.ports, free_ports(len(self.ports))))
                                     if self.fragment else self.ports)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "GwServer":
        self._log_fh = open(self.log_path, "ab")
        self._out_fh = open(self.stdout_path, "ab")
        _RUNNING.append(self)
        if self.fragment:
            try:
                for name, port in self.ports.items():
                    self.proxies[name] = FragProxy(self.listen_ports[name], listen_port=port, name=name)
            except BaseException:
                self.stop_proxies()
                raise
        if self not in _WATCHED:
            _WATCHED.append(self)
        self.stopped = False
        if self._deaths_final is not None:          # started again
            self._deaths_before = {k: self._deaths_before[k] + self._deaths_final[k] for k in DEATHS}
            self._deaths_final = None
        self._block = None                          # the block of this run's master, mapped when asked
        self.proc = subprocess.Popen(self.command(), cwd=self.base, env=gw_env(),
                                     stdin=subprocess.DEVNULL, stdout=self._out_fh,
                                     stderr=self._log_fh, start_new_session=True)
        self.pid = self.proc.pid
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every worker forked, registered in the stats block and turning its loop."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gw serve exited with {self.proc.returncode}:\n{self.log()}")
            if self._ready():
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"gw serve not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        from gw.stats import Counter

        pids = self.worker_pids()
        block = self.block() if len(pids) == self.workers else None
        if block is None or sorted(block.worker_pids()) != sorted(pids):
            # Mapped too early, the block may be one a dead master with this pid
            # left (pids wrap at 32768 here): the master replaces that file, so
            # map it again on the next poll.
            self._block = None
            return False
        return bool((block.rows[:, Counter.LOOP_TURNS] > 0).all())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pipeline_pid(self) -> int:
        """The pipeline process's pid (0 while there is none, or before the master wrote it)."""
        from gw.stats import Layout

        block = self.block()
        return int(block.header[Layout.H_PIPELINE_PID]) if block is not None else 0

    def worker_pids(self) -> list[int]:
        """The master's children but the pipeline process."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        pipeline = self.pipeline_pid()
        pids = []
        for c in children:
            if c.pid == pipeline:
                self._seen.setdefault(c.pid, c)
                continue
            self._seen.setdefault(c.pid, c)
            try:
                if c.status() != psutil.STATUS_ZOMBIE:
                    pids.append(c.pid)
            except psutil.NoSuchProcess:
                pass
        return sorted(pids)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, bounded wait, then SIGKILL; also kills any worker left behind.
        The proxies stop after the server: they pass on its closes."""
        if self.proc is None:
            self.stop_proxies()
            return None
        if self in _RUNNING:
            _RUNNING.remove(self)
        if self.proc.poll() is None:
            self.worker_pids()
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        for proc in self._seen.values():
            try:
                proc.kill()          # psutil checks the pid still is that process
            except psutil.NoSuchProcess:
                pass
        if self.proc.returncode == -signal.SIGKILL and self.shm.exists():
            self.shm.unlink()        # the master could not clean up after itself
        if self._block is not None:
            # The master has exited: the deaths it counted while stopping are in.
            self._deaths_final = self._block.deaths()
            self._block.close()
            self._block = None
        self.stopped = True
        for fh in (self._log_fh, self._out_fh):
            if fh is not None:
                fh.close()
        self._log_fh = self._out_fh = None
        self.stop_proxies()
        return self.proc.returncode

    def stop_proxies(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()

    # deaths of workers and of the pipeline process
    def expect_worker_deaths(self, n: int = 1) -> None:
        """The current test kills n workers on purpose: n deaths are not a failure
        (more still are). Call it before the kill."""
        self._deaths_expected["worker_deaths"] += n

    def expect_pipeline_deaths(self, n: int = 1) -> None:
        """The same for the pipeline process."""
        self._deaths_expected["pipeline_deaths"] += n

    def deaths(self) -> dict:
        """The master's counts, over every run of this server so far:
        {"worker_deaths": n, "pipeline_deaths": m}."""
        now = self._deaths_final
        if now is None:
            block = self.block()
            now = block.deaths() if block is not None else dict.fromkeys(DEATHS, 0)
        return {k: self._deaths_before[k] + now[k] for k in DEATHS}

    def settle_deaths(self, timeout: float = 10.0) -> None:
        """Waits until the master has reaped every child that exited (a zombie
        child is a death not counted yet), so a death is charged to the test
        during which it happened."""
        if not self.alive():
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                children = psutil.Process(self.pid).children()
                if not any(c.status() == psutil.STATUS_ZOMBIE for c in children):
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    def check_deaths(self) -> str | None:
        """Deaths since the last check beyond those declared for it: a report
        naming each death, its exit status or signal and the server's log since
        the last check (a sanitizer's report in full), or None. Resets the
        declarations: each test declares its own."""
        self.settle_deaths()
        now = self.deaths()
        new = {k: now[k] - self._deaths_checked[k] for k in DEATHS}
        expected = self._deaths_expected
        undeclared = {k: new[k] - expected[k] for k in DEATHS if new[k] > expected[k]}
        self._deaths_checked = now
        self._deaths_expected = dict.fromkeys(DEATHS, 0)
        log = self.log()
        mark, self._log_mark = self._log_mark, len(log)
        if not undeclared:
            return None
        return self.death_report(undeclared, new, expected, log[mark:])

    def death_report(self, undeclared: dict, new: dict, expected: dict, log: str) -> str:
        what = ", ".join(f"{n} {k.replace('_', ' ')[:-1]}(s)" for k, n in undeclared.items())
        counted = ", ".join(f"{k} {new[k]} (declared {expected[k]})" for k in DEATHS)
        lines = DEATH_LINE.findall(log) or ["(no death line in the log: see the log below)"]
        out = [f"gw serve (pid {self.pid}) lost {what} that the test did not declare "
               f"[{counted}]:", *(f"  {line.strip()}" for line in lines)]
        tail = log[-LOG_EXCERPT:]
        report = SANITIZER_REPORT.search(log)
        if report is not None and report.start() < len(log) - len(tail):
            # The first report, in full, when the tail below does not show it.
            start = log.rfind("\n", 0, max(report.start() - 200, 0)) + 1
            out += ["--- the first sanitizer report ---", log[start:start + LOG_EXCERPT].rstrip()]
        out += [f"--- the server's log since the previous check, last {len(tail)} characters "
                f"({self.log_path}) ---", tail.rstrip()]
        return "\n".join(out)

    # observations
    def log(self) -> str:
        """What the server wrote on stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The log, once it holds `text`. A worker counts an event before it
        writes the event's log line, so a test that saw the counter move can
        still read the log a moment before the line is in it."""
        def holds():
            log = self.log()
            return log if text in log else None
        return wait_for(holds, timeout, what=f"{text!r} in the server's log")

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def block(self):
        """The server's stats block, mapped read-only in this process (None until it exists)."""
        from gw.stats import StatsBlock

        if self._block is None:
            try:
                self._block = StatsBlock.open(self.pid)
            except (FileNotFoundError, ValueError):
                return None
        return self._block

    def counters(self) -> dict:
        """Every counter summed over the workers, as in `gw stats --json`'s "counters"."""
        from gw.stats import counter_dict

        return counter_dict(self.block().totals())

    def stats(self, as_json: bool = True):
        """Runs `gw stats [--json]` against this server: the parsed JSON or the printed text."""
        args = ["stats", "--data-dir", self.data_dir, "--interval", "0.1"] + (["--json"] if as_json else [])
        res = run_gw(*args, timeout=60)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout) if as_json else res.stdout

    def which_worker(self, client_local_port: int, timeout: float = 5.0) -> int:
        """The worker pid holding the server side of the client connection from
        that port (through a proxy: of the proxy's upstream connection for it)."""
        ports = set(self.listen_ports.values())
        peer_port = self.peer_port(client_local_port, timeout)

        def find():
            for pid in self.worker_pids():
                try:
                    conns = psutil.Process(pid).net_connections(kind="tcp")
                except psutil.NoSuchProcess:
                    continue
                for c in conns:
                    if c.raddr and c.raddr.port == peer_port and c.laddr.port in ports:
                        return pid
            return None

        return wait_for(find, timeout, what=f"the worker of client port {client_local_port}")

    def peer_port(self, client_local_port: int, timeout: float = 5.0) -> int:
        """The port the server sees the client connection from that port come
        from: the client's own, or the proxy's upstream socket's."""
        if not self.proxies:
            return client_local_port
        proxy = wait_for(lambda: next((p for p in self.proxies.values() if p.knows(client_local_port)), None),
                         timeout, what=f"a proxy to accept client port {client_local_port}")
        return proxy.upstream_port(client_local_port)

    def wait_counter(self, name: str, at_least: int, timeout: float = 10.0) -> dict:
        def check():
            c = self.counters()
            return c if get_counter(c, name) >= at_least else None
        return wait_for(check, timeout, what=f"counter {name} >= {at_least}")


def get_counter(counters: dict, name: str) -> int:
    """A counter by dotted name: 'closed_timeout', 'malformed.utf8', 'packets_in.connect'."""
    value = counters
    for part in name.split("."):
        value = value[part]
    return int(value)


def counter_delta(before: dict, after: dict, name: str) -> int:
    return get_counter(after, name) - get_counter(before, name)


def assert_counter_deltas(server: "GwServer", before: dict, expected: dict) -> dict:
    """Each counter named in expected (dotted names) moved by exactly that much
    since before; the counters now, for further checks."""
    after = server.counters()
    assert {name: counter_delta(before, after, name) for name in expected} == expected
    return after


# --- fragmentation -----------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "no_fragment(reason): the test cannot run through the "
                                       "fragmenting proxy; skipped under GW_TEST_FRAGMENT=1")


def pytest_report_header(config):
    if fragproxy.enabled():
        return (f"fragmenting proxy in front of every server: GW_TEST_FRAGMENT_SEED={fragproxy.BASE_SEED} "
                f"replays this run's cuts")
    return None


def pytest_collection_modifyitems(config, items):
    if not fragproxy.enabled():
        return
    for item in items:
        mark = item.get_closest_marker("no_fragment")
        if mark is not None:
            reason = mark.args[0] if mark.args else mark.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"not through the fragmenting proxy: {reason}"))


@pytest.fixture(autouse=True)
def _fragment_seed(request):
    """Seeds the proxies (and frag_rng) for this test, from the run's seed and
    the test's node id, and prints how to replay it (shown when it fails)."""
    seed = fragproxy.begin_test(request.node.nodeid)
    if fragproxy.enabled():
        print(f"fragmenting proxy: seed {seed!r}; replay: GW_TEST_FRAGMENT=1 "
              f"GW_TEST_FRAGMENT_SEED={fragproxy.BASE_SEED} pytest '{request.node.nodeid}'")
    return seed


@pytest.fixture
def frag_rng(_fragment_seed) -> random.Random:
    """A random.Random for send_fragmented, seeded per test (GW_TEST_FRAGMENT_SEED replays it)."""
    print(f"send_fragmented seed {_fragment_seed!r}; replay: GW_TEST_FRAGMENT_SEED={fragproxy.BASE_SEED}")
    return random.Random(_fragment_seed + "/send")


def send_fragmented(sock, data: bytes, rng: random.Random | None = None, *, cuts=None,
                    pause: float = 0.002) -> int:
    """Writes data in pieces, each its own segment (TCP_NODELAY) with `pause`
    seconds between them, so the server reads them separately. The cuts: one
    byte at a time with neither rng nor cuts; else the given offsets `cuts`,
    and random ones from rng (single bytes among them). Stops when the server
    closed the connection meanwhile (it may close on the first bad byte);
    returns the bytes written."""
    n = len(data)
    if rng is None and cuts is None:
        sizes = [1] * n
    else:
        points = {c for c in (cuts or ()) if 0 < c < n}
        if rng is not None:
            pos = 0
            for size in fragproxy.cut_sizes(n, rng)[:-1]:
                pos += size
                points.add(pos)
        bounds = [0, *sorted(points), n]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = 0
    for i, size in enumerate(sizes):
        if i:
            time.sleep(pause)
        try:
            sock.sendall(data[sent:sent + size])
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += size
    return sent


# --- fixtures --------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_undeclared_deaths():
    """A worker (or the pipeline process) of any gw serve started by the harness
    that dies during a test fails that test, unless the test declared it
    (`server.expect_worker_deaths(n)`). Checked after every test, once its
    function-scoped servers have stopped; module-scoped ones are checked after
    each test that ran while they did, so the death is charged to its test."""
    yield
    reports = []
    for server in list(_WATCHED):
        report = server.check_deaths()
        if report:
            reports.append(report)
        if server.stopped:
            _WATCHED.remove(server)
    if reports:
        pytest.fail("\n\n".join(reports), pytrace=False)


def stop_and_check(servers: list[GwServer]) -> None:
    """Stops servers (a module's, at its end) and fails on deaths while they stopped."""
    reports = []
    for server in servers:
        server.stop()
        report = server.check_deaths()
        if server in _WATCHED:
            _WATCHED.remove(server)
        if report:
            reports.append(report)
    if reports:
        pytest.fail("\n\n".join(reports), pytrace=False)


@pytest.fixture
def gw_factory(tmp_path):
    """Starts fresh servers for one test: gw_factory(workers=1, args=[...])."""
    servers = []

    def make(**kwargs) -> GwServer:
        server = GwServer(tmp_path / f"gw{len(servers)}", **kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()        # no_undeclared_deaths checks them next


@pytest.fixture(scope="module")
def gw_module_factory(tmp_path_factory):
    """Like gw_factory, for module-scoped servers shared by a module's tests."""
    servers = []

    def make(**kwargs) -> GwServer:
        server = GwServer(tmp_path_factory.mktemp("gw"), **kwargs)
        servers.append(server)
        return server.start()

    yield make
    stop_and_check(servers)


@pytest.fixture(scope="module")
def gw_server(gw_module_factory) -> GwServer:
    """One server per module: 2 workers, all four listeners, generated certificates."""
    return gw_module_factory(workers=2)


# --- raw MQTT (built by hand) ----------------------------------------------------------

PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
DISCONNECT = b"\xe0\x00"
CONNACK_OK = (0x20, b"\x00\x00")


def connect_packet(client_id=b"raw", keepalive: int = 60, clean: bool = True,
                   proto=b"MQTT", level: int = 4) -> bytes:
    body = mqtt_str(proto) + bytes([level, 0x02 if clean else 0x00]) + struct.pack("!H", keepalive)
    return packet(0x10, body + mqtt_str(client_id))


def publish_packet(topic, payload: bytes = b"", qos: int = 0, packet_id: int = 1) -> bytes:
    body = mqtt_str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


def subscribe_packet(packet_id: int, filters) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(mqtt_str(f) + bytes([q]) for f, q in filters)
    return packet(0x82, body)


def recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_packet(sock, timeout: float = 10.0) -> tuple[int, bytes]:
    """One MQTT packet from the server: (first byte, body)."""
    sock.settimeout(timeout)
    first = recv_exact(sock, 1)[0]
    length, shift = 0, 0
    while True:
        b = recv_exact(sock, 1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, recv_exact(sock, length)


def tcp_connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=timeout)


def client_tls_context(ca) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def tls_connect(port: int, ctx: ssl.SSLContext, timeout: float = 10.0) -> ssl.SSLSocket:
    sock = tcp_connect(port, timeout)
    try:
        return ctx.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


def mqtt_client(port: int, client_id="raw", keepalive: int = 60, tls: ssl.SSLContext | None = None):
    """A raw socket past CONNECT/CONNACK 0."""
    sock = tls_connect(port, tls) if tls is not None else tcp_connect(port)
    try:
        sock.sendall(connect_packet(client_id, keepalive))
        assert read_packet(sock) == CONNACK_OK
    except BaseException:
        sock.close()
        raise
    return sock


def ping(sock, timeout: float = 10.0) -> None:
    sock.sendall(PINGREQ)
    assert read_packet(sock, timeout) == (0xD0, b"")


def wait_closed(sock, timeout: float = 10.0) -> bytes:
    """Reads until the server closes the connection (EOF or reset); returns what
    arrived before. AssertionError if it is still open after timeout."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {timeout} s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            continue
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return bytes(got)
        except ssl.SSLError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def assert_open_for(sock, seconds: float) -> None:
    """Nothing arrives and the connection stays open for `seconds`."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(1)
    except (socket.timeout, TimeoutError):
        return
    except (ConnectionResetError, ssl.SSLError) as exc:
        raise AssertionError(f"connection closed early ({exc!r})") from None
    raise AssertionError("connection closed early" if not data else f"unexpected data {data!r}")


# --- paho-mqtt -------------------------------------------------------------------

def paho_client_class(base=None):
    """paho's Client (or `base`, a subclass of it) run in paho's threaded mode.

    paho is thread-safe only when its own thread (loop_start) runs the network
    loop: publish() from another thread then just queues the packet. With a
    thread of ours calling loop(), paho thinks it is single-threaded and
    publish() also writes from the caller's thread, so two threads pop its
    outgoing queue at once and can swap two packets: two adjacent QoS 1
    publishes reached the broker swapped whenever the socket blocked
    (backpressure), which looked like the broker reordering.

    loop_start's loop waits up to 1 s in select(), which would make keepalive
    PINGREQs up to 1 s late; ours waits 50 ms."""
    import paho.mqtt.client as mqtt

    class ThreadedClient(base or mqtt.Client):
        def _thread_main(self):
            try:
                self.loop_forever(timeout=0.05)
            finally:
                self._thread = None

    return mqtt, ThreadedClient


def start_paho_thread(client) -> threading.Thread:
    """loop_start(); returns the network thread (paho forgets it when it ends).
    The thread ends when the connection does (reconnect_on_failure=False)."""
    client.loop_start()
    thread = client._thread
    if thread is None:
        # It already ended (a connection refused at once): a thread that has ended too.
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
    return thread


def stop_paho_thread(client, thread: threading.Thread, timeout: float) -> None:
    """Ends the network thread within timeout, then closes the socket. Without a
    DISCONNECT having been sent, the broker sees the connection end (FIN)."""
    sock = client.socket()
    if thread.is_alive() and thread is not threading.current_thread():
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)     # its loop sees EOF and ends
            except OSError:
                pass
        thread.join(timeout)
    if sock is not None:
        sock.close()


class PahoClient:
    """A paho-mqtt (v2 callback API) client on its own network thread."""

    def __init__(self, port: int, *, ca=None, keepalive: int = 60, client_id: str | None = None,
                 clean_session: bool = True, username: str | None = None, password: str | None = None):
        mqtt, client_class = paho_client_class()
        self.mqtt = mqtt
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connect_rc = None
        self.pingresps = 0
        self.subacks: dict[int, list] = {}
        self.received: list = []          # every PUBLISH it got (paho's MQTTMessage)
        self._lock = threading.Lock()
        self.client = client_class(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"paho-{uuid.uuid4().hex[:12]}",
                                  clean_session=clean_session, protocol=mqtt.MQTTv311,
                                  reconnect_on_failure=False)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_log = self._on_log
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda client, userdata, msg: self.received.append(msg)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.client.connect(HOST, port, keepalive)
        # Its network thread's short select timeout sends keepalive PINGREQs on
        # time even with a 1-2 s keepalive (paho_client_class).
        self._thread = start_paho_thread(self.client)
        if not self.connected.wait(10):
            self.close()
            raise AssertionError("paho client got no CONNACK within 10 s")
        assert self.connect_rc == 0, f"CONNACK {self.connect_rc}"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connect_rc = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnected.set()

    def _on_log(self, client, userdata, level, buf):
        if "Received PINGRESP" in buf:
            with self._lock:
                self.pingresps += 1

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subacks[mid] = [rc.value if hasattr(rc, "value") else int(rc) for rc in reason_codes]

    @property
    def is_connected(self) -> bool:
        return self.client.is_connected() and not self.disconnected.is_set()

    def ping(self, timeout: float = 10.0) -> None:
        """PINGREQ now; PINGRESP within timeout."""
        before = self.pingresps
        self.client._send_pingreq()
        wait_for(lambda: self.pingresps > before, timeout, what="PINGRESP")

    def publish_qos1(self, topic: str = "healthy/t", payload: bytes = b"ok", timeout: float = 10.0):
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        assert info.is_published(), "no PUBACK"

    def subscribe(self, topic: str, qos: int, timeout: float = 10.0) -> list:
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == 0
        wait_for(lambda: mid in self.subacks, timeout, what="SUBACK")
        return self.subacks[mid]

    def messages(self, topic: str) -> list:
        return [m for m in list(self.received) if m.topic == topic]

    def wait_messages(self, n: int, topic: str, timeout: float = 10.0) -> list:
        """Waits until n messages on topic arrived; returns them."""
        wait_for(lambda: len(self.messages(topic)) >= n, timeout, what=f"{n} messages on {topic}")
        return self.messages(topic)

    def check_healthy(self) -> None:
        assert self.is_connected, "healthy client was disconnected"
        self.ping()
        self.publish_qos1()
        assert self.is_connected

    def close(self) -> None:
        """DISCONNECT (if still connected), then stops the network thread."""
        try:
            if self.client.is_connected():
                self.client.disconnect()
                wait_for(lambda: self.disconnected.is_set(), 10, what="paho disconnect")
        finally:
            stop_paho_thread(self.client, self._thread, 10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
