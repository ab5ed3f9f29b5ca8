"""Stateful property test of MQTT sessions, QoS flows and takeovers across
gw's workers: random client histories (tests/stateful_machine.py) against a
real `gw serve --workers 2`, every packet checked against the reference model
(tests/mqtt_model.py).

CI runs STATEFUL_EXAMPLES derandomized examples: every run replays the same
histories. GW_STATEFUL_EXAMPLES=N explores N random ones instead (a failure is
kept in .hypothesis/ and replayed first next time). GW_STATEFUL_KNOWN_BUGS=all
(or names, comma-separated) stops steering around the known gw bugs
(stateful_machine.KNOWN_BUGS), e.g. to check a fix.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from stateful_machine import SessionMachine, stateful_server  # noqa: F401 (the fixture)


STATEFUL_EXAMPLES = 30
STEPS = 50
_explore = int(os.environ.get("GW_STATEFUL_EXAMPLES", "0") or 0)
SETTINGS = settings(
    max_examples=_explore or STATEFUL_EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=not _explore,
    database=settings.default.database if _explore else None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


@pytest.mark.timeout(1200)      # a passing run takes well under a minute; a failing one shrinks for minutes
def test_sessions_follow_the_model(stateful_server):
    run_state_machine_as_test(SessionMachine, settings=SETTINGS)
