"""The keepalive wheel with 100,000 timers: schedule them all, reschedule them
all (what activity does), and advance through every deadline.

Compared, in the same run, with the obvious pure-Python alternative (a heapq
of deadlines); the gate is a ratio, never an absolute time.
"""

from __future__ import annotations

import heapq

import numpy as np

from gw_ext.wheel import TimerWheel
from benchutil import Gate, check_gate, paired_ratio

N = 100_000
TICK_MS = 100
GATE_RATIO = 60             # measured 70.7-141 (BENCHMARKS.md, Speed gates); 2x slower: 43


def deadlines(seed: int = 7) -> np.ndarray:
    # Keepalives of 10-600 s as devices use them, x1.5, spread over start times.
    rng = np.random.default_rng(seed)
    return (rng.integers(10, 600, N) * 1500 + rng.integers(0, 60_000, N)).astype(np.uint64)


DEADLINES = deadlines()
HORIZON = int(DEADLINES.max()) + TICK_MS


def run_wheel() -> int:
    wheel = TimerWheel(N, 4096, TICK_MS, 0)
    wheel.schedule_many(DEADLINES)
    wheel.schedule_many(DEADLINES + 1000)           # every connection was active once
    fired = 0
    for now in range(0, HORIZON + 2001, 1000):      # the loop advances about once a second when idle
        fired += wheel.advance_count(now)
    assert fired == N and len(wheel) == 0
    return fired


def run_heap() -> int:
    heap = [(int(d), i) for i, d in enumerate(DEADLINES)]
    heapq.heapify(heap)
    latest = {i: int(d) + 1000 for i, d in enumerate(DEADLINES)}   # lazy reschedule, as the wheel does
    for i, d in latest.items():
        heapq.heappush(heap, (d, i))
    fired = 0
    for now in range(0, HORIZON + 2001, 1000):
        while heap and heap[0][0] <= now:
            d, i = heapq.heappop(heap)
            if latest.get(i) == d:
                del latest[i]
                fired += 1
    assert fired == N
    return fired


def test_wheel_100k_timers(benchmark):
    benchmark.extra_info["timers"] = N
    benchmark.pedantic(run_wheel, rounds=5, iterations=1)
    benchmark.extra_info["timers_per_s"] = round(N / benchmark.stats.stats.min)


def test_heapq_100k_timers_reference(benchmark):
    benchmark.pedantic(run_heap, rounds=3, iterations=1)
    benchmark.extra_info["timers_per_s"] = round(N / benchmark.stats.stats.min)


def wheel_ratio() -> tuple[float, dict]:
    """Scheduling, rescheduling and expiring 100k timers: the wheel against a heapq."""
    ratio, wheel, heap = paired_ratio(run_wheel, run_heap, 3)
    return ratio, {"wheel_ms": round(wheel * 1e3, 1), "heapq_ms": round(heap * 1e3, 1)}


GATE = Gate("wheel", wheel_ratio, GATE_RATIO, "the timer wheel vs a heapq")


def test_gate_wheel_vs_heapq(request):
    check_gate(GATE, request)
