"""Known gw bugs the stateful session test found, each as its shrunk history
replayed through the same state machine and model (tests/stateful_machine.py),
with the steering around that one bug turned off.

A bug found and not yet fixed is listed in stateful_machine.KNOWN_BUGS (the
generated histories steer around it) and its test here is marked with
known_bug(name), xfail(strict=True): once fixed, the test passes, which fails
the run until both are removed. The ones below are fixed regressions.
"""

from __future__ import annotations

import socket
import time

import pytest

from broker_fixtures import connect_packet_full
from conftest import read_packet
from placement import connect_on
from stateful_machine import AVOIDED, KNOWN_BUGS, SessionMachine, stateful_server  # noqa: F401 (the fixture)


def replay(bug: str, steps) -> None:
    """Runs steps [(rule, arguments)] with the model's checks after each one,
    as hypothesis does, steering around every known bug but `bug`."""
    state = SessionMachine()
    state.avoided = AVOIDED - {bug}     # (nothing to steer around once it is fixed)
    try:
        state.start(seed=0)
        for name, kwargs in steps:
            getattr(state, name)(**kwargs)
            state.no_worker_died()
            state.everything_owed_arrived()
    finally:
        state.teardown()


def known_bug(name: str):
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"gw bug {name!r}: {KNOWN_BUGS[name]}")


def test_takeover_on_the_same_worker_keeps_the_id_owned(stateful_server):
    """MQTT-3.1.4-2, three CONNECTs with one client id, clean session 1: the
    second (same worker) closes the first; the third, on the other worker,
    must close the second. gw: the second's takeover made the worker release
    the id at its home (the closed session's end), so the third is granted a
    new session and the second stays open beside it."""
    replay("same-worker-clean-takeover", [
        ("connect", dict(who=0, clean=True, worker=0, will=None, entries=[])),
        ("connect", dict(who=0, clean=True, worker=0, will=None, entries=[])),
        ("connect", dict(who=0, clean=True, worker=1, will=None, entries=[])),
    ])


def test_retained_message_resent_on_resume_keeps_retain(stateful_server):
    """MQTT-3.3.1-8 with MQTT-4.4.0-1: a retained message sent for a new
    subscription (RETAIN=1), not acknowledged, is re-sent on the session's
    resume as the same PUBLISH with DUP=1: still RETAIN=1. gw re-sends it
    with RETAIN=0 (the in-flight window does not keep the flag)."""
    replay("retain-flag-on-resend", [
        ("connect", dict(who=0, clean=False, worker=0, will=None, entries=[])),
        ("publish", dict(who=0, messages=[("a", 1, True, "short", False)])),
        ("subscribe", dict(who=0, entries=[("a", 1)])),
        ("end", dict(who=0, how="fin", rel="", cut=1)),
        ("connect", dict(who=0, clean=False, worker=1, will=None, entries=[])),
    ])


def test_connect_in_fragments_gets_connack(stateful_server):
    """A CONNECT that arrives in two reads, cut at any byte, gets its CONNACK
    and the worker lives. gw: cut after its fixed header (2 bytes) or inside
    the client id (e.g. 20 bytes), the worker closes the connection as a
    protocol violation and dies (SIGSEGV)."""
    server = stateful_server
    for cut in range(1, 30):
        pkt = connect_packet_full(f"frag-{cut:02d}-{time.monotonic_ns() % 10**9:09d}", clean=True)
        server.wait_ready(10)
        pids = server.worker_pids()
        log_offset = len(server.log())
        sock, _, _ = connect_on(server.ports["mqtt"], pids, cut % 2)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(pkt[:cut])
            time.sleep(0.02)
            sock.sendall(pkt[cut:])
            try:
                answer = read_packet(sock, 5)
            except (EOFError, OSError) as exc:
                answer = exc
        finally:
            sock.close()
        assert answer == (0x20, b"\x00\x00"), f"cut after {cut} bytes: CONNACK expected, got {answer!r}"
        assert server.worker_pids() == pids and "died" not in server.log()[log_offset:], \
            f"cut after {cut} bytes: a worker died: {server.log()[log_offset:]}"
