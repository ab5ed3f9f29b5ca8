"""MQTT 5.0 messages in the broker: a message's properties (Payload Format
Indicator, Message Expiry Interval, Content Type, Response Topic, Correlation
Data, User Properties) carried with it (gw_ext/loop.pxd, Msg's extras) into
the retained store, the data dir and sessions' queues, and across workers;
an expired message is not delivered (counted: mqtt5_expired); a 3.1.1
subscriber gets the message without them.

Real server (`gw serve`, 2 workers), real clients (mosquitto_sub)."""

from __future__ import annotations

import struct
import subprocess
import time

import msgspec
import pytest

from conftest import GwServer, stop_and_check

# Content Type "text/plain", User Properties ("k", "v") then ("a", "b") in that
# order, Correlation Data b"\x00\x01", Response Topic "re/ply".
PROPS = (b"\x03\x00\x0atext/plain" + b"\x26\x00\x01k\x00\x01v" + b"\x26\x00\x01a\x00\x01b"
         + b"\x09\x00\x02\x00\x01" + b"\x08\x00\x06re/ply")


def ext_of(props: bytes, expire_ms: int = 0) -> bytes:
    """A message's extras as the server keeps them: its expiry (wall-clock ms, 0:
    never), then its property block."""
    return struct.pack("<Q", expire_ms) + props


def sub(port: int, topic: str, count: int, *, version: str = "311", timeout: int = 5) -> list[str]:
    """mosquitto_sub until `count` messages or `timeout` seconds: one line per
    message, "topic payload"."""
    res = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", version, "-t", topic,
                          "-C", str(count), "-W", str(timeout), "-F", "%t %p"],
                         capture_output=True, text=True, timeout=timeout + 10)
    return [line for line in res.stdout.splitlines() if line]


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    return d


def test_retained_properties_kept_across_a_restart_and_expired_ones_not_delivered(tmp_path, data_dir):
    now_ms = int(time.time() * 1000)
    kept = ext_of(PROPS)
    later = ext_of(b"\x01\x01", now_ms + 3_600_000)
    saved = [
        [b"m5/kept", 1, b"K", kept],
        [b"m5/later", 0, b"L", later],
        [b"m5/gone", 0, b"G", ext_of(b"", now_ms - 1000)],     # expired while the server was down: not loaded
        [b"m5/soon", 0, b"S", ext_of(b"", now_ms + 1500)],     # expires while the server runs
        [b"m5/old", 0, b"O"],                                  # a 3.1.1 message, as before
    ]
    (data_dir / "retained.msgpack").write_bytes(msgspec.msgpack.encode(saved))
    server = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt",), data_dir=data_dir).start()
    try:
        time.sleep(max(0.0, (now_ms + 1600) / 1000 - time.time()))
        got = sorted(sub(server.ports["mqtt"], "m5/#", 4, timeout=3))
        assert got == ["m5/kept K", "m5/later L", "m5/old O"]
        assert server.counters()["mqtt5_expired"] == 1         # m5/soon, found expired by the subscription
    finally:
        stop_and_check([server])
    after = {e[0]: e[1:] for e in msgspec.msgpack.decode((data_dir / "retained.msgpack").read_bytes())}
    assert after[b"m5/kept"] == [1, b"K", kept]          # the properties, byte for byte, in order
    assert after[b"m5/later"] == [0, b"L", later]        # the same expiry: no time added by the restart
    assert after[b"m5/old"] == [0, b"O"]
    assert b"m5/gone" not in after


def test_a_saved_session_keeps_its_queued_messages_properties(tmp_path, data_dir):
    """A persistent session's queued MQTT 5.0 message comes back with its
    extras from the data dir (state layout 4) and is delivered; one whose
    expiry passed meanwhile is dropped, counted."""
    now_ms = int(time.time() * 1000)

    def msg(topic: bytes, payload: bytes, ext: bytes) -> bytes:
        return (struct.pack("<HBBHI", 0, 1, 0, len(topic), len(payload)) + topic + payload
                + struct.pack("<I", len(ext)) + ext)

    state = (struct.pack("<BI", 4, 1) + struct.pack("<H", 4) + b"q5/#" + b"\x01"
             + struct.pack("<HI", 1, 3)
             + msg(b"q5/a", b"A", ext_of(PROPS))
             + msg(b"q5/b", b"B", ext_of(b"", now_ms - 1))
             + msg(b"q5/c", b"C", b"")
             + struct.pack("<I", 0) + b"\x00\x00\x00")
    for n in range(2):      # each worker loads the files numbered like it
        (data_dir / f"sessions-{n}.msgpack").write_bytes(msgspec.msgpack.encode(
            {"format": 4, "sessions": [[b"q5-client", state]] if n == 0 else []}))
    server = GwServer(tmp_path / "gw", workers=2, listeners=("mqtt",), data_dir=data_dir).start()
    try:
        res = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(server.ports["mqtt"]), "-V", "311",
                              "-i", "q5-client", "-c", "-q", "1", "-t", "q5/#", "-C", "2", "-W", "5",
                              "-F", "%t %p"], capture_output=True, text=True, timeout=20)
        assert res.stdout.split("\n")[:2] == ["q5/a A", "q5/c C"], res
        assert server.counters()["mqtt5_expired"] == 1
    finally:
        stop_and_check([server])
