"""gw_ext.wheel.TimerWheel: the hashed timing wheel behind keepalive and connect timeouts.

Semantics checked: a timer never fires before its deadline, and fires at the
first advance that reaches the tick boundary at or after its deadline (so at
most one tick late); deadlines already past fire once the wheel reaches its
next tick; timers more than a revolution away stay put until their round.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

wheel = pytest.importorskip("gw_ext.wheel")
TimerWheel = wheel.TimerWheel

TICK = 100
SLOTS = 4096
REVOLUTION = TICK * SLOTS      # 409.6 s


def test_schedule_advance_cancel_and_count():
    w = TimerWheel(10, SLOTS, TICK, 0)
    assert len(w) == 0
    w.schedule(1, 1000)
    w.schedule(2, 2000)
    w.schedule(3, 3000)
    assert len(w) == 3
    w.cancel(2)
    assert len(w) == 2
    w.cancel(2)                       # cancelling an idle timer is a no-op
    assert len(w) == 2
    assert w.advance(900) == []
    assert w.advance(1000) == [1]
    assert len(w) == 1
    assert w.advance(2500) == []      # 2 was cancelled
    assert sorted(w.advance(3000)) == [3]
    assert len(w) == 0
    assert w.advance(10_000) == []


def test_many_timers_same_slot_fire_together():
    w = TimerWheel(100, SLOTS, TICK, 0)
    for i in range(100):
        w.schedule(i, 5000)
    assert len(w) == 100
    assert w.advance(4999) == []
    assert sorted(w.advance(5000)) == list(range(100))
    assert len(w) == 0


def test_never_early_within_a_tick():
    """A deadline in the middle of a tick: not before it, and by the next tick boundary."""
    w = TimerWheel(1, SLOTS, TICK, 0)
    w.schedule(0, 150)
    assert w.advance(120) == []       # same tick, deadline not reached
    assert w.advance(149) == []
    assert w.advance(200) == [0]      # the boundary after 150


def test_advance_early_in_the_deadline_tick_does_not_lose_a_revolution():
    """Regression: a timer whose deadline tick had been visited early (now < deadline)
    was skipped and only fired a whole revolution (409.6 s) later."""
    w = TimerWheel(1, SLOTS, TICK, 1000)
    w.schedule(0, 2550)               # e.g. 1.5 x keepalive 1 s after a packet at 1050
    assert w.advance(2520) == []
    assert w.advance(2620) == [0]


def test_deadline_in_the_past_fires_on_next_advance():
    w = TimerWheel(2, SLOTS, TICK, 10_000)
    w.schedule(0, 500)                # long past
    w.schedule(1, 9_999)              # just past
    assert sorted(w.advance(10_000)) == [0, 1]
    assert len(w) == 0
    # Once the wheel has moved on, a past deadline fires at the next tick.
    w.advance(10_050)
    w.schedule(0, 1)
    assert w.advance(10_100) == [0]


def test_more_than_one_revolution_away_fires_at_its_round():
    w = TimerWheel(3, SLOTS, TICK, 0)
    far = REVOLUTION + 12_345                  # same slot as 12 345, one round later
    farther = 3 * REVOLUTION + 50_000
    w.schedule(0, far)
    w.schedule(1, farther)
    w.schedule(2, 12_345)
    fired = {}
    now = 0
    while now <= farther + TICK:                # every tick, like the worker loop
        for t in w.advance(now):
            fired[t] = now
        now += TICK
    assert fired[2] >= 12_345 and fired[2] < 12_345 + TICK
    assert fired[0] >= far and fired[0] < far + TICK
    assert fired[1] >= farther and fired[1] < farther + TICK
    assert len(w) == 0


def test_more_than_one_revolution_with_big_jumps():
    """Sleeping longer than a revolution between advances (the jump-ahead path)."""
    w = TimerWheel(2, SLOTS, TICK, 0)
    w.schedule(0, 2 * REVOLUTION + 700)
    w.schedule(1, 500)
    assert w.advance(REVOLUTION + 300) == [1]
    assert w.advance(2 * REVOLUTION + 600) == []
    assert len(w) == 1
    assert w.advance(5 * REVOLUTION) == [0]


def test_rescheduling_moves_a_timer():
    w = TimerWheel(2, SLOTS, TICK, 0)
    w.schedule(0, 1000)
    w.schedule(0, 5000)               # moved later
    assert len(w) == 1
    assert w.advance(1000) == []
    assert w.advance(4900) == []
    assert w.advance(5000) == [0]
    w.schedule(1, 9000)
    w.schedule(1, 6000)               # moved earlier
    assert len(w) == 1
    assert w.advance(6000) == [1]
    assert w.advance(9000) == []
    assert len(w) == 0


def test_fired_timer_can_be_rescheduled():
    w = TimerWheel(1, SLOTS, TICK, 0)
    w.schedule(0, 100)
    assert w.advance(100) == [0]
    w.schedule(0, 300)
    assert len(w) == 1
    assert w.advance(300) == [0]


def test_timers_expiring_together_can_each_be_rescheduled_or_cancelled():
    """Regression: expired timers come back chained through `next`, and the wheel
    took a non-NULL `next` for "scheduled", so rescheduling or cancelling any but
    the last of several timers that expired together unlinked through a NULL
    `prev` (a segfault in the worker when two connections timed out in one tick)."""
    w = TimerWheel(4, SLOTS, TICK, 0)
    for i in range(4):
        w.schedule(i, 1000)
    fired = w.advance(1000)
    assert sorted(fired) == [0, 1, 2, 3]
    assert len(w) == 0
    w.schedule(fired[0], 2000)          # the worker: "it was active", rescheduled
    w.cancel(fired[1])                  # the worker: connection closed
    w.cancel(fired[2])
    w.schedule(fired[3], 3000)
    assert len(w) == 2
    assert w.advance(2000) == [fired[0]]
    assert w.advance(3000) == [fired[3]]
    assert len(w) == 0


def test_ids_out_of_range():
    w = TimerWheel(2)
    with pytest.raises(IndexError):
        w.schedule(2, 100)
    with pytest.raises(IndexError):
        w.cancel(-1)


# --- against a model ---------------------------------------------------------------

class Model:
    """The wheel's contract at tick granularity: a timer is due at the first tick
    boundary at or after its deadline (or the wheel's next tick, if that is later);
    an advance fires what is due up to now // tick. Advancing a whole revolution or
    more at once fires everything whose deadline has passed."""

    def __init__(self, nslots, tick, now):
        self.n, self.tick = nslots, tick
        self.cur = now // tick            # next tick to process
        self.timers: dict[int, tuple[int, int]] = {}

    def schedule(self, tid, deadline):
        due = max(-(-deadline // self.tick), self.cur)
        self.timers[tid] = (deadline, due)

    def cancel(self, tid):
        self.timers.pop(tid, None)

    def advance(self, now):
        last = now // self.tick
        if last < self.cur:
            return set()
        if last - self.cur + 1 >= self.n:
            fired = {t for t, (d, _) in self.timers.items() if d <= now}
        else:
            fired = {t for t, (_, due) in self.timers.items() if due <= last}
        for t in fired:
            del self.timers[t]
        self.cur = last + 1
        return fired


NTIMERS = 8
ops = st.lists(st.one_of(
    st.tuples(st.just("schedule"), st.integers(0, NTIMERS - 1), st.integers(-50, 700)),
    st.tuples(st.just("cancel"), st.integers(0, NTIMERS - 1), st.just(0)),
    st.tuples(st.just("advance"), st.just(0), st.integers(0, 400)),
), max_size=60)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, start=st.integers(0, 1000), nslots=st.sampled_from([4, 8, 16]),
       tick=st.sampled_from([1, 10, 100]))
def test_matches_sorted_model(ops, start, nslots, tick):
    """Random schedule/cancel/advance sequences (small wheels, so timers wrap
    around many revolutions): same timers fire at the same advances, counts agree,
    and nothing fires before its deadline."""
    w = TimerWheel(NTIMERS, nslots, tick, start)
    m = Model(nslots, tick, start)
    now = start
    for op, tid, arg in ops:
        if op == "schedule":
            deadline = max(0, now + arg * tick // 10)
            w.schedule(tid, deadline)
            m.schedule(tid, deadline)
        elif op == "cancel":
            w.cancel(tid)
            m.cancel(tid)
        else:
            now += arg * tick // 10
            pending = dict(m.timers)
            fired = w.advance(now)
            assert len(fired) == len(set(fired))
            assert set(fired) == m.advance(now)
            for t in fired:
                assert pending[t][0] <= now, "fired before its deadline"
        assert len(w) == len(m.timers)
    # Finally, everything left fires once time has moved far enough.
    now += (nslots + 2) * tick * 100
    assert set(w.advance(now)) == set(m.timers)
    assert len(w) == 0
