"""Shared by the benchmarks' ratio gates."""

from __future__ import annotations

import time


def best_time(fn, repeat: int) -> float:
    """The fastest of `repeat` calls, in seconds (the least disturbed by a noisy machine)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


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
