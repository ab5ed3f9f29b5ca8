"""MQTT 5.0 wills with a Will Delay Interval (section 3.1.3.2.2), and a v5
session's Session Expiry Interval saved in data_dir.

A will of a connection that ends without DISCONNECT 0x00 is held for its
delay, then published, or earlier when its session ends (its expiry passed,
Session Expiry 0, a Clean Start 1 CONNECT took the id); a reconnect continuing
the session within the delay cancels it, on the same worker or the other one
(the session moves there). A graceful stop publishes the held wills;
max_delayed_wills bounds them. Real `gw serve` processes (2 workers),
paho-mqtt's v5 client holding the will (WillDelayInterval), mosquitto_sub -V 5
subscribed to it. Timing: only "not before" a delay and "eventually"."""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import msgspec
import pytest

from conftest import HOST, GwServer, get_counter, start_paho_thread, stop_and_check, stop_paho_thread, tcp_connect, wait_for

MOSQUITTO_SUB = shutil.which("mosquitto_sub")
MOSQUITTO_PUB = shutil.which("mosquitto_pub")
WAIT = 10.0

pytestmark = pytest.mark.skipif(not (MOSQUITTO_SUB and MOSQUITTO_PUB), reason="mosquitto clients not installed")


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def place(server: GwServer, worker: int) -> socket.socket:
    """A TCP connection held by worker `worker` (misplaced attempts reset unused)."""
    pids = server.worker_pids()
    for _ in range(60):
        sock = tcp_connect(server.ports["mqtt"])
        if server.which_worker(sock.getsockname()[1]) == pids[worker]:
            return sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    raise AssertionError(f"no connection placed on worker {worker}")


class V5Client:
    """paho-mqtt's v5 client on a socket placed on a chosen worker, optionally
    with a will (its WillDelayInterval) and a Session Expiry Interval."""

    def __init__(self, server: GwServer, worker: int, client_id: str, *, will: tuple | None = None,
                 delay: int | None = None, expiry: int | None = None, clean_start: bool = True):
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from broker_fixtures import _placed_client_class

        mqtt, placed = _placed_client_class()
        self.mqtt = mqtt
        self.sock = place(server, worker)
        self.connected = threading.Event()
        self.flags = None
        c = placed(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                   reconnect_on_failure=False)
        c.presock = self.sock
        if will is not None:
            wp = None
            if delay is not None:
                wp = Properties(PacketTypes.WILLMESSAGE)
                wp.WillDelayInterval = delay
            c.will_set(will[0], will[1], qos=1, properties=wp)
        cp = None
        if expiry is not None:
            cp = Properties(PacketTypes.CONNECT)
            cp.SessionExpiryInterval = expiry

        def on_connect(client, userdata, flags, reason_code, properties):
            self.flags = flags
            self.reason = reason_code
            self.connected.set()

        c.on_connect = on_connect
        self.client = c
        c.connect(HOST, server.ports["mqtt"], 60, clean_start=clean_start, properties=cp)
        self.thread = start_paho_thread(c)
        assert self.connected.wait(WAIT), f"{client_id}: no CONNACK"
        assert not self.reason.is_failure, self.reason

    @property
    def session_present(self) -> bool:
        return bool(self.flags.session_present)

    def drop(self) -> None:
        """The network connection ends without DISCONNECT (a reset)."""
        self.client.loop_stop()
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def disconnect(self, reason: str | None = None) -> None:
        """A DISCONNECT: 0x00, or the reason code named (paho's names)."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.reasoncodes import ReasonCode

        rc = ReasonCode(PacketTypes.DISCONNECT, reason) if reason else None
        self.client.disconnect(reasoncode=rc)
        self.thread.join(WAIT)
        stop_paho_thread(self.client, self.thread, WAIT)


class Sub:
    """mosquitto_sub -V 5 on `base/#`, its lines ("topic payload") collected;
    ready once a probe published on the topic came back."""

    def __init__(self, server: GwServer, base: str):
        self.server = server
        self.base = base
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            [MOSQUITTO_SUB, "-h", HOST, "-p", str(server.ports["mqtt"]), "-V", "5", "-q", "1",
             "-t", base + "/#", "-F", "%t %p"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        n = 0
        deadline = time.monotonic() + WAIT
        while not any(line.startswith(base + "/probe") for line in self.snapshot()):
            assert time.monotonic() < deadline, "mosquitto_sub never subscribed"
            n += 1
            self.publish(f"probe/{n}", "p")
            time.sleep(0.2)

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def publish(self, sub_topic: str, payload: str) -> None:
        subprocess.run([MOSQUITTO_PUB, "-h", HOST, "-p", str(self.server.ports["mqtt"]), "-V", "5", "-q", "1",
                        "-t", f"{self.base}/{sub_topic}", "-m", payload], check=True, timeout=WAIT)

    def snapshot(self) -> list[str]:
        with self.cond:
            return list(self.lines)

    def wait_line(self, line: str, timeout: float = WAIT) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: line in self.lines, timeout), (line, self.lines)
            return list(self.lines)

    def fence(self) -> list[str]:
        """Everything received before a marker published now (wills held or
        sent earlier are routed before it)."""
        mark = unique("mark")
        self.publish("mark", mark)
        return self.wait_line(f"{self.base}/mark {mark}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(WAIT)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = GwServer(tmp_path_factory.mktemp("gw"), workers=2, listeners=("mqtt",)).start()
    yield s
    stop_and_check([s])


@pytest.fixture
def sub(server):
    s = Sub(server, unique("wd"))
    yield s
    s.close()


def counter(server: GwServer, name: str) -> int:
    return get_counter(server.counters(), name)


# --- the delay ----------------------------------------------------------------------------------

@pytest.mark.parametrize("worker", [0, 1])
def test_the_will_waits_for_its_delay(server, sub, worker):
    """Not published before its Will Delay Interval (2 s), then published."""
    will = f"{sub.base}/will"
    c = V5Client(server, worker, unique("wd"), will=(will, b"gone"), delay=2, expiry=60)
    elapsed = counter(server, "will_delay.elapsed")
    c.drop()
    dropped = time.monotonic()
    server.wait_counter("will_delay.pending", 1)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - dropped)))
    assert f"{will} gone" not in sub.snapshot()          # not before the delay
    sub.wait_line(f"{will} gone")
    assert time.monotonic() - dropped >= 2.0 - 0.2        # the wheel's tick is 100 ms
    server.wait_counter("will_delay.elapsed", elapsed + 1)


@pytest.mark.parametrize("other_worker, live", [(False, False), (True, False), (True, True)],
                         ids=["same-worker", "other-worker", "takeover-other-worker"])
def test_a_reconnect_within_the_delay_cancels_the_will(server, sub, other_worker, live):
    """The client comes back (Clean Start 0) within the delay, on the worker
    that holds the will or on the other one (the session moves there), or
    takes its still open connection over from the other worker (DISCONNECT
    0x8E to the old one): the will is never published (MQTT-3.1.3-9)."""
    will = f"{sub.base}/will"
    cid = unique("wd-back")
    c = V5Client(server, 0, cid, will=(will, b"gone"), delay=2, expiry=60)
    cancelled = counter(server, "will_delay.cancelled")
    if not live:
        c.drop()
        server.wait_counter("will_delay.pending", 1)
    back = V5Client(server, 1 if other_worker else 0, cid, expiry=60, clean_start=False)
    assert back.session_present
    server.wait_counter("will_delay.cancelled", cancelled + 1)
    if live:
        c.thread.join(WAIT)             # the server closed the old connection (0x8E)
        stop_paho_thread(c.client, c.thread, WAIT)
    time.sleep(2.5)                                      # past the delay
    assert f"{will} gone" not in sub.fence()
    back.disconnect()


@pytest.mark.parametrize("how", ["expiry", "expiry_zero", "clean_start"])
def test_the_will_goes_when_the_session_ends_first(server, sub, how):
    """A delay of an hour: the session ends first, so the will goes then: its
    Session Expiry Interval (1 s) passed, it was 0 (the session ends with the
    connection), or a CONNECT with Clean Start 1 took the id on the other
    worker (the session is discarded)."""
    will = f"{sub.base}/will"
    cid = unique("wd-end")
    c = V5Client(server, 0, cid, will=(will, b"gone"), delay=3600,
                 expiry={"expiry": 1, "expiry_zero": 0, "clean_start": 3600}[how])
    held, ended = counter(server, "will_delay.held"), counter(server, "will_delay.session_end")
    c.drop()
    if how == "clean_start":
        server.wait_counter("will_delay.held", held + 1)
        again = V5Client(server, 1, cid, expiry=60, clean_start=True)
        assert not again.session_present
    sub.wait_line(f"{will} gone")
    if how == "expiry_zero":
        assert counter(server, "will_delay.held") == held      # never held: its session ended with it
    else:
        server.wait_counter("will_delay.session_end", ended + 1)
    if how == "clean_start":
        again.disconnect()


def test_disconnect_with_will_message_keeps_the_delay(server, sub):
    """DISCONNECT 0x04 publishes the will as a dropped connection would: after
    its delay; DISCONNECT 0x00 discards it."""
    will = f"{sub.base}/will"
    c = V5Client(server, 1, unique("wd-0x04"), will=(will, b"asked"), delay=2, expiry=60)
    quiet = V5Client(server, 1, unique("wd-0x00"), will=(will, b"discarded"), delay=1, expiry=60)
    c.disconnect("Disconnect with will message")
    quiet.disconnect()
    dropped = time.monotonic()
    time.sleep(max(0.0, 1.0 - (time.monotonic() - dropped)))
    assert f"{will} asked" not in sub.snapshot()
    sub.wait_line(f"{will} asked")
    assert f"{will} discarded" not in sub.fence()


def test_max_delayed_wills_sends_the_rest_at_once(tmp_path):
    """Past max_delayed_wills (1 per worker) a will goes out at once, counted."""
    server = GwServer(tmp_path / "gw", workers=1, listeners=("mqtt",), args=["--max-delayed-wills", "1"]).start()
    try:
        sub = Sub(server, unique("wd-limit"))
        held = V5Client(server, 0, unique("wd-held"), will=(f"{sub.base}/held", b"h"), delay=3600, expiry=3600)
        extra = V5Client(server, 0, unique("wd-extra"), will=(f"{sub.base}/extra", b"e"), delay=3600, expiry=3600)
        held.drop()
        server.wait_counter("will_delay.pending", 1)
        extra.drop()
        lines = sub.wait_line(f"{sub.base}/extra e")
        assert f"{sub.base}/held h" not in lines
        assert counter(server, "will_delay.over_limit") == 1
        assert counter(server, "will_delay.pending") == 1
        sub.close()
    finally:
        stop_and_check([server])


def test_a_graceful_stop_publishes_the_held_wills(tmp_path):
    """SIGTERM: the held wills go out before the connections close, so a
    subscriber connected then (on the same worker: another worker drains at
    the same time) gets them."""
    server = GwServer(tmp_path / "gw", workers=1, listeners=("mqtt",)).start()
    try:
        sub = Sub(server, unique("wd-stop"))
        wills = []
        for n in range(2):
            topic = f"{sub.base}/will{n}"
            V5Client(server, 0, unique("wd-stop"), will=(topic, b"bye"), delay=3600, expiry=3600).drop()
            wills.append(f"{topic} bye")
        server.wait_counter("will_delay.pending", 2)
        assert not any(w in sub.snapshot() for w in wills)
        server.signal(signal.SIGTERM)
        for w in wills:
            sub.wait_line(w)
        server.wait_exit(30)
        sub.close()
    finally:
        stop_and_check([server])


# --- the Session Expiry Interval saved in data_dir ---------------------------------------------

def saved_states(data_dir) -> dict:
    from gw.persistence import SESSIONS_FORMAT

    out = {}
    for path in data_dir.glob("sessions-*.msgpack"):
        saved = msgspec.msgpack.decode(path.read_bytes())
        assert saved["format"] == SESSIONS_FORMAT == 5
        out.update({bytes(cid): bytes(state) for cid, state in saved["sessions"]})
    return out


def test_a_v5_sessions_expiry_survives_a_restart(tmp_path):
    """Saved with its Session Expiry Interval (layout 5's tail: version 5, the
    interval, when its client left): after a restart a session of 3600 s is
    there; one of 1 s that passed while the server was down is not; one of 12 s
    still running at the restart expires 12 s after its client left, not 12 s
    after the restart, nor never (session_expiry is 0: forever). A session
    with Session Expiry 0 is never saved."""
    data_dir = tmp_path / "data"
    server = GwServer(tmp_path / "gw0", workers=2, listeners=("mqtt",), data_dir=data_dir).start()
    ids = {name: unique(f"se-{name}") for name in ("keep", "short", "mid", "zero")}
    expiry = {"keep": 3600, "short": 1, "mid": 12, "zero": 0}
    left = {}
    try:
        for n, name in enumerate(ids):
            c = V5Client(server, n % 2, ids[name], expiry=expiry[name])
            c.disconnect()
            left[name] = time.monotonic()

        def away_ms(state: bytes) -> int:
            return struct.unpack("<BIQ", state[-13:])[2]

        def saved():
            # Both saved, and saved after their clients left (a snapshot taken
            # between a CONNECT and its DISCONNECT holds the session as connected,
            # away_ms 0: the next one has it as left).
            states = saved_states(data_dir)
            keys = [ids[k].encode() for k in ("keep", "mid")]
            return states if all(k in states and away_ms(states[k]) > 0 for k in keys) else None
        states = wait_for(saved, WAIT, what="the v5 sessions saved after their clients left")
        assert ids["zero"].encode() not in states
        for name in ("keep", "short", "mid"):
            if name == "short" and ids[name].encode() not in states:
                continue        # its 1 s may have passed before the snapshot
            tail = states[ids[name].encode()][-13:]
            version, interval, away_ms = struct.unpack("<BIQ", tail)
            assert states[ids[name].encode()][0] == 5
            assert (version, interval) == (5, expiry[name]) and away_ms > 0
    finally:
        stop_and_check([server])
    # Down for 3 s at least: "short" expires meanwhile, and "mid" counted from the restart would
    # outlive the reconnect below by 1.5 s.
    time.sleep(max(0.0, 3.0 - (time.monotonic() - left["short"])))
    again = GwServer(tmp_path / "gw1", workers=2, listeners=("mqtt",), data_dir=data_dir).start()
    try:
        restarted = time.monotonic()
        c = V5Client(again, 0, ids["keep"], expiry=3600, clean_start=False)
        assert c.session_present
        c.disconnect()
        c = V5Client(again, 1, ids["short"], expiry=60, clean_start=False)
        assert not c.session_present                    # expired while the server was down
        c.disconnect()
        # "mid": its 12 s count from when its client left, before the restart.
        assert restarted - left["mid"] < 12, "the restart took too long for this test's timing"
        time.sleep(max(0.0, 12.5 - (time.monotonic() - left["mid"])) + 1.0)   # + the once-a-second sweep
        c = V5Client(again, 1, ids["mid"], expiry=60, clean_start=False)
        assert not c.session_present
        c.disconnect()
        assert counter(again, "sessions_expired") >= 1
    finally:
        stop_and_check([again])
