"""Shared by the benchmarks: the ratio gates, and the servers they start.

A gate compares the code under test with a baseline doing the same work, both
timed in the same run (best of several repetitions): its ratio is baseline
time / our time, so higher is faster and a regression that makes our code 2x
slower halves it. A gate is judged on the median of five such measurements.
Each gate's minimum sits between half the highest ratio measured on the
development machine and the lowest one (BENCHMARKS.md, "Speed gates",
measured with bench/gate_ratios.py): the noise of a loaded machine passes, a
2x regression fails.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


def best_time(fn, repeat: int) -> float:
    """The fastest of `repeat` calls, in seconds (the least disturbed by a noisy machine)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def paired_ratio(ours: Callable, baseline: Callable, repeat: int, *, ours_setup: Callable | None = None,
                 baseline_setup: Callable | None = None) -> tuple[float, float, float]:
    """(baseline time / our time, our best time, the baseline's best time), for one call each.

    The two are timed alternately, so a busy moment of the machine falls on
    both, and each timing of ours repeats it to last about as long as one call
    of the baseline, so both are as likely to be interrupted (best-of alone
    favours the shorter one on a loaded machine). A setup, when given, makes the
    argument of each call outside the timing (a fresh table, a fresh log). The
    garbage collector is off while timing, as in timeit: a collection falling on
    one side only would decide the ratio."""
    def timed(fn, setup, calls: int) -> float:
        args = [setup() for _ in range(calls)] if setup is not None else [None] * calls
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            for a in args:
                fn(a) if setup is not None else fn()
            return (time.perf_counter() - start) / calls
        finally:
            gc.enable()

    first_ours = timed(ours, ours_setup, 1)
    first_base = timed(baseline, baseline_setup, 1)
    calls = max(1, min(1000, round(first_base / max(first_ours, 1e-9))))
    best_ours = best_base = float("inf")
    for _ in range(repeat):
        best_ours = min(best_ours, timed(ours, ours_setup, calls))
        best_base = min(best_base, timed(baseline, baseline_setup, 1))
    return best_base / best_ours, best_ours, best_base


@dataclass(frozen=True)
class Gate:
    name: str
    measure: Callable[[], tuple[float, dict]]     # () -> (ratio, figures to report)
    minimum: float
    what: str                                     # "ours vs baseline", for messages and tables


GATE_SAMPLES = 5


def gated_ratio(gate: Gate) -> tuple[float, dict]:
    """What a gate is judged on: the median of GATE_SAMPLES measurements (two
    disturbed measurements, up or down, do not decide), with its figures."""
    samples = sorted((gate.measure() for _ in range(GATE_SAMPLES)), key=lambda rf: rf[0])
    ratio, figures = samples[len(samples) // 2]
    return ratio, {**figures, "ratios": [round(r, 2) for r, _ in samples]}


def check_gate(gate: Gate, request=None) -> dict:
    """Measures the gate (gated_ratio); fails below its minimum. The figures go
    to the test's user_properties (the JUnit XML) and stdout."""
    ratio, figures = gated_ratio(gate)
    figures = {**figures, "ratio": round(ratio, 2), "gate": gate.minimum}
    if request is not None:
        request.node.user_properties.extend(figures.items())
    print(f"{gate.name} gate: {figures}")
    assert ratio >= gate.minimum, (f"{gate.name}: {gate.what} is {ratio:.2f}x, the gate is "
                                   f"{gate.minimum}x ({figures})")
    return figures


def free_port() -> int:
    """A loopback TCP port free at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    """Returns once something accepts connections on the loopback port;
    RuntimeError when proc (the server meant to) exits first, or after timeout
    seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def gw_harness():
    """The tests' harness (tests/conftest.py: GwServer, its fixtures, the check
    that fails a test during which a worker died), for benchmarks that run `gw
    serve`. The module pytest loaded for tests/ when it did, else loaded by path."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tests" / "conftest.py"
    for name in ("conftest", "gw_tests_harness"):
        mod = sys.modules.get(name)
        if mod is not None and Path(getattr(mod, "__file__", "")).resolve() == path:
            return mod
    spec = importlib.util.spec_from_file_location("gw_tests_harness", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextmanager
def mqtt_only_gw(workers: int, *flags: str, tmp_parent: str | None = None, stderr=subprocess.DEVNULL,
                 stop_timeout: float = 60) -> Iterator[tuple[subprocess.Popen, int, str]]:
    """`gw serve` with its plain MQTT listener alone, on a free loopback port,
    in a temporary directory (its data in data/, no stats or $SYS), once it
    accepts connections; stopped with SIGTERM at the end. Yields (the process,
    the port, the directory)."""
    repo = Path(__file__).resolve().parent.parent
    port = free_port()
    with tempfile.TemporaryDirectory(dir=tmp_parent) as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "gw.cli", "serve", "--workers", str(workers), "--mqtt", f"127.0.0.1:{port}",
             "--mqtts", "off", "--json", "off", "--jsons", "off", "--http", "off", "--https", "off", "--ws", "off", "--wss", "off",
             "--data-dir", f"{tmp}/data", "--stats-interval", "0", "--sys-interval", "0",
             "--log-level", "warning", *flags],
            cwd=tmp, env={**os.environ, "PYTHONPATH": str(repo)}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_port(port, server)
            yield server, port, tmp
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(stop_timeout)
