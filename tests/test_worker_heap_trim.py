"""When a worker trims its heap after TLS handshakes (gw/worker.py
HeapTrimSchedule, asked once a tick): after a run of handshakes has ended,
never in the middle of one (each trim stalls the worker's loop for
milliseconds), unless the handshakes never pause."""

from __future__ import annotations

from gw.worker import TRIM_AFTER_HANDSHAKES, TRIM_INTERVAL, TRIM_MAX_WAIT, HeapTrimSchedule

START = 1000.0


def ticks(schedule: HeapTrimSchedule, per_tick: list[int], start: float = START) -> list[float]:
    """Feeds one tick a second with per_tick[i] new handshakes; returns when it trimmed."""
    done, trims = 0, []
    for i, n in enumerate(per_tick):
        done += n
        now = start + 1 + i
        if schedule.due(now, done):
            trims.append(now - start)
    return trims


def test_a_ramp_is_trimmed_at_the_first_quiet_tick_after_it_not_during_it():
    # 15 s of 333 handshakes a second (a 5,000-connection ramp), then nothing.
    trims = ticks(HeapTrimSchedule(START), [333] * 15 + [0] * 5)
    assert trims == [16.0]


def test_the_start_counts_as_a_trim():
    # A ramp that ends 3 s after the start waits for TRIM_INTERVAL, then for a quiet tick.
    trims = ticks(HeapTrimSchedule(START), [400] * 3 + [0] * 12)
    assert trims == [TRIM_INTERVAL]


def test_too_few_handshakes_are_not_worth_a_trim():
    assert ticks(HeapTrimSchedule(START), [TRIM_AFTER_HANDSHAKES - 1] + [0] * 30) == []
    assert ticks(HeapTrimSchedule(START), [TRIM_AFTER_HANDSHAKES] + [0] * 30) == [TRIM_INTERVAL]


def test_handshakes_that_never_pause_are_trimmed_every_max_wait():
    trims = ticks(HeapTrimSchedule(START), [50] * 200)
    assert trims == [TRIM_MAX_WAIT, 2 * TRIM_MAX_WAIT, 3 * TRIM_MAX_WAIT]


def test_two_ramps_are_trimmed_once_each_at_most_every_interval():
    # Ramps of 5 s with 2 quiet seconds between them: trimmed at a quiet tick, TRIM_INTERVAL apart.
    trims = ticks(HeapTrimSchedule(START), ([300] * 5 + [0] * 2) * 6)
    assert trims and all(b - a >= TRIM_INTERVAL for a, b in zip(trims, trims[1:]))
    assert all(t % 7 in (6, 0) for t in trims)      # each at a quiet tick
