"""Persistence in a running `gw serve`: the snapshots of data_dir are written
by each worker's writer thread; a failed write is counted, logged and retried
with the next snapshot, the previous file kept; a session whose state holds
more than 65,535 subscriptions survives a restart."""

from __future__ import annotations

import os
import socket

import msgspec

from conftest import HOST, get_counter, subscribe_packet, wait_for
from gw.persistence import SESSIONS_FORMAT
from broker_fixtures import RawClient, publish_packet_full


def raw(server, timeout: float = 10.0) -> RawClient:
    return RawClient(socket.create_connection((HOST, server.ports["mqtt"]), timeout), None)


def saved_sessions(server) -> dict:
    path = server.data_dir / "sessions-0.msgpack"
    if not path.exists():
        return {}
    saved = msgspec.msgpack.decode(path.read_bytes())
    assert saved["format"] == SESSIONS_FORMAT
    return {bytes(cid): state for cid, state in saved["sessions"]}


def test_a_failed_write_is_counted_logged_and_retried(gw_factory):
    server = gw_factory(workers=1, listeners=("mqtt",))
    first = raw(server)
    first.connect(b"persist-first", clean=False)
    assert first.subscribe(1, [("a/b", 1)]) == [1]
    wait_for(lambda: b"persist-first" in saved_sessions(server), 10, what="the first snapshot")
    server.wait_counter("persist_writes", 1)          # counted when the loop collects it
    # A directory where the temporary file goes: every write of that file fails for real.
    blocker = server.data_dir / "sessions-0.msgpack.tmp"
    blocker.mkdir()
    second = raw(server)
    second.connect(b"persist-second", clean=False)
    assert second.subscribe(1, [("c/d", 2)]) == [2]
    server.wait_counter("persist_errors", 2, timeout=15)          # failed, and failed again on retry
    server.wait_log("sessions-0.msgpack failed")
    assert server.log().count("sessions-0.msgpack failed") == 1   # at most one line per 10 s
    assert set(saved_sessions(server)) == {b"persist-first"}       # the previous file, whole
    first.ping()                                                   # the loop is serving meanwhile
    blocker.rmdir()
    wait_for(lambda: b"persist-second" in saved_sessions(server), 10, what="the retried snapshot")
    second.disconnect()
    first.disconnect()
    errors = get_counter(server.counters(), "persist_errors")
    server.stop()
    again = gw_factory(workers=1, listeners=("mqtt",), data_dir=server.data_dir)
    client = raw(again)
    assert client.connect(b"persist-second", clean=False) == (True, 0)
    client.disconnect()
    assert errors >= 2


def test_a_session_of_70000_subscriptions_survives_restart(gw_factory, tmp_path):
    """Its subscription count no longer fits the state's old 16-bit field."""
    data_dir = tmp_path / "data"
    many = ["--max-subscriptions", "70000"]
    server = gw_factory(workers=1, listeners=("mqtt",), data_dir=data_dir, args=many)
    filters = [(f"many/{i:05d}", 1) for i in range(70_000)]
    client = raw(server)
    client.connect(b"many-subs", clean=False)
    body = subscribe_packet(7, filters)
    for i in range(0, len(body), 65_521):                  # in fragments
        client.send(body[i:i + 65_521])
    suback = client.read_until(0x90, 30)
    assert suback[2:] == bytes([1]) * 70_000
    client.disconnect()
    wait_for(lambda: b"many-subs" in saved_sessions(server), 15, what="the snapshot")
    server.stop()
    assert (data_dir / "sessions-0.msgpack").exists()
    assert not (data_dir / "sessions-0.msgpack.tmp").exists()
    server = gw_factory(workers=1, listeners=("mqtt",), data_dir=data_dir, args=many)
    assert get_counter(server.counters(), "subscriptions_current") == 70_000
    client = raw(server)
    assert client.connect(b"many-subs", clean=False) == (True, 0)
    publisher = raw(server)
    publisher.connect(b"many-subs-pub")
    publisher.send(publish_packet_full("many/69999", b"last one", qos=0))
    msg = client.read_publish()
    assert (msg.topic, msg.payload) == ("many/69999", b"last one")
    publisher.disconnect()
    client.disconnect()


def test_the_final_snapshot_is_written_on_stop(gw_factory):
    """A change right before SIGTERM is on disk when gw serve has exited, with
    persist_interval too long for a tick to have written it."""
    server = gw_factory(workers=1, listeners=("mqtt",), args=["--persist-interval", "3600"])
    client = raw(server)
    client.connect(b"stop-write", clean=False)
    assert client.subscribe(1, [("x/y", 0)]) == [0]
    client.disconnect()
    assert server.stop() == 0
    states = saved_sessions(server)
    assert b"stop-write" in states
    assert sorted(os.listdir(server.data_dir)).count("sessions-0.msgpack.tmp") == 0


def test_only_changed_sessions_are_serialized_and_the_file_stays_whole(gw_factory):
    """Snapshots after the first serialize only the sessions that changed; the
    file still holds every session as it is: one that ended is gone, one that
    changed is new, a new one in a reused slot is there, the others kept."""
    server = gw_factory(workers=1, listeners=("mqtt",))
    for name in (b"inc-a", b"inc-b", b"inc-c"):
        c = raw(server)
        c.connect(name, clean=False)
        assert c.subscribe(1, [(name.decode() + "/x", 1)]) == [1]
        c.disconnect()
    wait_for(lambda: set(saved_sessions(server)) == {b"inc-a", b"inc-b", b"inc-c"}, 10, what="three")
    c_state = saved_sessions(server)[b"inc-c"]
    a = raw(server)
    a.connect(b"inc-a", clean=True)                 # ends the persistent session, frees its slot
    a.disconnect()
    b = raw(server)
    assert b.connect(b"inc-b", clean=False) == (True, 0)
    assert b.subscribe(2, [("inc-b/changed", 2)]) == [2]
    b.disconnect()
    d = raw(server)
    d.connect(b"inc-d", clean=False)                # may take the freed slot
    assert d.subscribe(1, [("inc-d/x", 0)]) == [0]
    d.disconnect()
    wait_for(lambda: set(saved_sessions(server)) == {b"inc-b", b"inc-c", b"inc-d"}, 10, what="a gone, d in")
    wait_for(lambda: b"inc-b/changed" in saved_sessions(server)[b"inc-b"], 10, what="b's change")
    assert saved_sessions(server)[b"inc-c"] == c_state
    server.stop()
    again = gw_factory(workers=1, listeners=("mqtt",), data_dir=server.data_dir)
    for name, present in ((b"inc-a", False), (b"inc-b", True), (b"inc-c", True), (b"inc-d", True)):
        c = raw(again)
        assert c.connect(name, clean=False) == (present, 0), name
        c.disconnect()
