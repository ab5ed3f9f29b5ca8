"""Passwords, anonymous access, CONNECT refusals and takeover by the same user,
against real `gw serve` processes, real clients (mosquitto_pub, paho-mqtt, raw
sockets) and password files made by the real tools (mosquitto_passwd, gw passwd)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import zlib

import pytest

import mqtt_bytes
from conftest import (DISCONNECT, HOST, PINGREQ, PahoClient, free_ports, get_counter, gw_env, paho_client_class,
                      read_packet, run_gw, send_fragmented, start_paho_thread, stop_paho_thread, tcp_connect,
                      wait_closed, wait_for)

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
needs_mosquitto_tools = pytest.mark.skipif(not (MOSQUITTO_PASSWD and MOSQUITTO_PUB),
                                           reason="mosquitto_passwd and mosquitto_pub are not installed")


def auth_connect_packet(client_id: bytes, user: bytes | None = None, password: bytes | None = None,
                        keepalive: int = 60, clean: bool = True) -> bytes:
    return mqtt_bytes.connect_packet(client_id, clean, keepalive, user=user, password=password)


def connack_code(port: int, client_id: bytes, user=None, password=None, *, fragmented=None,
                 timeout: float = 10.0) -> int:
    """The CONNACK return code a raw client gets (the connection is then used no more)."""
    with tcp_connect(port, timeout) as sock:
        data = auth_connect_packet(client_id, user, password)
        if fragmented is not None:
            send_fragmented(sock, data, fragmented)
        else:
            sock.sendall(data)
        first, body = read_packet(sock, timeout)
        assert first == 0x20 and len(body) == 2, (first, body)
        return body[1]


def raw_client(port: int, client_id: bytes, user=None, password=None) -> socket.socket:
    sock = tcp_connect(port)
    sock.sendall(auth_connect_packet(client_id, user, password))
    assert read_packet(sock) == (0x20, b"\x00\x00")
    return sock


def raw_ping(sock) -> None:
    sock.sendall(PINGREQ)
    assert read_packet(sock) == (0xD0, b"")


def mosquitto_pub(port: int, user: str, password: str) -> subprocess.CompletedProcess:
    return subprocess.run([MOSQUITTO_PUB, "-h", HOST, "-p", str(port), "-u", user, "-P", password,
                           "-t", "auth/test", "-m", "hello", "-q", "1"],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def mosquitto_passwd_file(path, user: str, password: str) -> None:
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(path), user, password], check=True, timeout=30,
                   capture_output=True)


def gw_passwd(*args) -> subprocess.CompletedProcess:
    return run_gw("passwd", *args)


def sha512_line(user: str, password: str) -> str:
    """A `$6$` line as Mosquitto before 2.0 wrote it: SHA-512 of password then salt."""
    salt = secrets.token_bytes(12)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"{user}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


def auth_server(gw_factory, tmp_path, pwfile, *, workers: int = 1, args=(), listeners=("mqtt",)):
    return gw_factory(workers=workers, listeners=listeners, args=["--password-file", str(pwfile), *args])


# --- the password file --------------------------------------------------------------

@needs_mosquitto_tools
def test_mosquitto_passwd_file_accepted_and_wrong_password_refused(gw_factory, tmp_path, frag_rng):
    pwfile = tmp_path / "passwd"
    mosquitto_passwd_file(pwfile, "alice", "s3cret")
    assert open(pwfile).read().startswith("alice:$7$")
    server = auth_server(gw_factory, tmp_path, pwfile)
    port = server.ports["mqtt"]
    ok = mosquitto_pub(port, "alice", "s3cret")
    assert ok.returncode == 0, ok.stderr
    bad = mosquitto_pub(port, "alice", "wrong")
    assert bad.returncode != 0
    # Raw sockets: wrong password, unknown user, no password: 0x04; whole and in fragments.
    assert connack_code(port, b"r1", b"alice", b"wrong") == 4
    assert connack_code(port, b"r2", b"alice", b"wrong", fragmented=frag_rng) == 4
    assert connack_code(port, b"r3", b"mallory", b"s3cret", fragmented=frag_rng) == 4
    assert connack_code(port, b"r4", b"alice") == 4
    assert connack_code(port, b"r5", b"alice", b"s3cret", fragmented=frag_rng) == 0
    # The server closes after a refusal.
    with tcp_connect(port) as sock:
        sock.sendall(auth_connect_packet(b"r6", b"alice", b"nope"))
        assert wait_closed(sock) == b"\x20\x02\x00\x04"
    # paho-mqtt sees the refusal as its "bad user name or password".
    mqtt, client_class = paho_client_class()
    result = {}
    done = threading.Event()
    client = client_class(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-bad", protocol=mqtt.MQTTv311,
                          reconnect_on_failure=False)
    client.username_pw_set("alice", "wrong")

    def on_connect(c, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        done.set()

    client.on_connect = on_connect
    client.connect(HOST, port, 60)
    thread = start_paho_thread(client)
    try:
        assert done.wait(10), "paho got no CONNACK"
        assert result["rc"].is_failure and "password" in str(result["rc"]).lower(), str(result["rc"])
    finally:
        stop_paho_thread(client, thread, 5)
    counters = server.counters()
    assert get_counter(counters, "auth_refused_password") >= 6
    log = server.log()
    assert "bad user name or password" in log and "127.0.0.1:" in log
    assert "wrong" not in log and "nope" not in log       # passwords never logged


def test_sha512_and_argon2id_lines_verify(gw_factory, tmp_path):
    pwfile = tmp_path / "passwd"
    res = gw_passwd("-c", "-b", pwfile, "argon", "pw-argon")
    assert res.returncode == 0, res.stderr
    res = gw_passwd("-b", "--hash", "pbkdf2", pwfile, "pbkdf", "pw-pbkdf")
    assert res.returncode == 0, res.stderr
    with open(pwfile, "a") as fh:
        fh.write(sha512_line("old", "pw-old"))
    text = open(pwfile).read()
    assert "argon:$argon2id$" in text and "pbkdf:$7$210000$" in text and "old:$6$" in text
    server = auth_server(gw_factory, tmp_path, pwfile)
    port = server.ports["mqtt"]
    for user in ("argon", "pbkdf", "old"):
        assert connack_code(port, f"ok-{user}".encode(), user.encode(), f"pw-{user}".encode()) == 0, user
        assert connack_code(port, f"bad-{user}".encode(), user.encode(), b"pw-other") == 4, user


@needs_mosquitto_tools
@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_gw_passwd_round_trip_and_mosquitto_reads_it(tmp_path):
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", "--hash", "pbkdf2", pwfile, "alice", "first").returncode == 0
    assert gw_passwd("-b", "--hash", "pbkdf2", pwfile, "bob", "second").returncode == 0
    assert stat.S_IMODE(os.stat(pwfile).st_mode) == 0o600
    assert gw_passwd("-b", "--hash", "pbkdf2", pwfile, "alice", "changed").returncode == 0
    assert gw_passwd("-D", pwfile, "bob").returncode == 0
    users = [line.split(":")[0] for line in open(pwfile).read().splitlines()]
    assert users == ["alice"]
    assert stat.S_IMODE(os.stat(pwfile).st_mode) == 0o600
    missing = gw_passwd("-D", pwfile, "bob")
    assert missing.returncode != 0 and "not found" in missing.stderr
    # No terminal and no -b: an error, nothing written.
    before = open(pwfile).read()
    prompt = gw_passwd(pwfile, "carol")
    assert prompt.returncode != 0 and "-b" in prompt.stderr
    assert open(pwfile).read() == before
    # --config supplies the file.
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'password_file = "{pwfile}"\n')
    assert gw_passwd("--config", cfg, "-b", "--hash", "pbkdf2", "dave", "fourth").returncode == 0
    assert "dave:$7$" in open(pwfile).read()
    # Debian's Mosquitto reads gw's $7$ entries.
    port = free_ports(1)[0]
    conf = tmp_path / "mosquitto.conf"
    # As root, mosquitto drops to its own user, who may not read a 0600 file of root's.
    run_as = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{run_as}listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pwfile}\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and broker.poll() is None, (
                    f"mosquitto did not start: {broker.stderr.read().decode() if broker.poll() is not None else ''}")
                time.sleep(0.05)
        ok = mosquitto_pub(port, "alice", "changed")
        assert ok.returncode == 0, ok.stderr
        assert mosquitto_pub(port, "dave", "fourth").returncode == 0
        assert mosquitto_pub(port, "alice", "first").returncode != 0
    finally:
        broker.terminate()
        broker.wait(10)


def test_malformed_password_file_refused_at_start(tmp_path):
    pwfile = tmp_path / "passwd"
    pwfile.write_text(sha512_line("ok", "pw") + "bad:$5$abc$def\n")
    port = free_ports(1)[0]
    res = run_gw("serve", "--workers", "1", "--mqtt", f"127.0.0.1:{port}", "--mqtts", "off", "--json", "off",
                 "--jsons", "off", "--http", "off", "--https", "off", "--ws", "off", "--wss", "off", "--data-dir", tmp_path / "data",
                 "--password-file", pwfile, timeout=60)
    assert res.returncode != 0
    assert "line 2" in res.stderr and "unknown hash kind" in res.stderr


# --- anonymous access ----------------------------------------------------------------

def test_anonymous_refused_off_loopback_at_start(tmp_path):
    port = free_ports(1)[0]
    res = run_gw("serve", "--workers", "1", "--mqtt", f"0.0.0.0:{port}", "--mqtts", "off", "--json", "off",
                 "--jsons", "off", "--http", "off", "--https", "off", "--ws", "off", "--wss", "off", "--data-dir", tmp_path / "data", timeout=60)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "off loopback" in lines[0] and "password_file" in lines[0] and "allow_anonymous" in lines[0]


def test_anonymous_allowed_on_loopback_by_default(gw_factory):
    server = gw_factory(workers=1, listeners=("mqtt",))
    assert connack_code(server.ports["mqtt"], b"anon") == 0
    # No password file: a user name is taken as given, as Mosquitto does.
    assert connack_code(server.ports["mqtt"], b"named", b"anyone", b"anything") == 0


def test_off_loopback_with_password_file_refuses_anonymous(gw_factory, tmp_path):
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", pwfile, "alice", "pw").returncode == 0
    port, json_port = free_ports(2)
    # Listening on every address (clients still come over loopback): anonymous is off (auto).
    server = gw_factory(workers=1, argv=["--workers", "1", "--mqtt", f"0.0.0.0:{port}", "--json",
                                         f"0.0.0.0:{json_port}", "--mqtts", "off", "--jsons", "off",
                                         "--http", "off", "--https", "off", "--ws", "off", "--wss", "off", "--data-dir", str(tmp_path / "data"),
                                         "--password-file", str(pwfile), "--stats-interval", "0"],
                        ports={"mqtt": port, "json": json_port})
    assert connack_code(port, b"anon") == 5
    assert connack_code(port, b"alice-1", b"alice", b"pw") == 0
    # A JSON-lines Connect without credentials: the anonymous rules apply.
    with tcp_connect(json_port) as sock:
        sock.sendall(b'{"client_id":"dev1","message_type":"Connect","payload":null,"timestamp":0}\n')
        reply = wait_closed(sock)
    assert json.loads(reply.splitlines()[0])["message_type"] == "Error"
    counters = server.counters()
    assert get_counter(counters, "auth_refused_anonymous") == 2
    server.wait_log("anonymous access is off")


def test_allow_anonymous_true_with_password_file(gw_factory, tmp_path):
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", pwfile, "alice", "pw").returncode == 0
    server = auth_server(gw_factory, tmp_path, pwfile, args=["--allow-anonymous", "true"])
    port = server.ports["mqtt"]
    assert connack_code(port, b"anon") == 0
    assert connack_code(port, b"a1", b"alice", b"pw") == 0
    assert connack_code(port, b"a2", b"alice", b"bad") == 4


def test_allow_anonymous_false_on_loopback(gw_factory, tmp_path):
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", pwfile, "alice", "pw").returncode == 0
    server = auth_server(gw_factory, tmp_path, pwfile, args=["--allow-anonymous", "false"])
    assert connack_code(server.ports["mqtt"], b"anon") == 5


# --- takeover by another user ----------------------------------------------------------

def test_takeover_by_another_user_refused_across_workers(gw_factory, tmp_path):
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", "--hash", "pbkdf2", pwfile, "alice", "pw-a").returncode == 0
    assert gw_passwd("-b", "--hash", "pbkdf2", pwfile, "bob", "pw-b").returncode == 0
    server = auth_server(gw_factory, tmp_path, pwfile, workers=2)
    port = server.ports["mqtt"]
    holder = raw_client(port, b"shared-id", b"alice", b"pw-a")
    home = server.which_worker(holder.getsockname()[1])
    # Bob, from the other worker: refused, and Alice's connection stays.
    refused_elsewhere = False
    for _ in range(50):
        sock = tcp_connect(port)
        try:
            worker = server.which_worker(sock.getsockname()[1])
            if worker == home:
                continue
            sock.sendall(auth_connect_packet(b"shared-id", b"bob", b"pw-b"))
            assert wait_closed(sock) == b"\x20\x02\x00\x05"
            refused_elsewhere = True
            break
        finally:
            sock.close()
    assert refused_elsewhere, "no connection landed on the other worker"
    raw_ping(holder)
    # Bob on the same worker: refused too.
    assert connack_code(port, b"shared-id", b"bob", b"pw-b") == 5
    raw_ping(holder)
    # Alice herself takes her session over from whichever worker.
    again = raw_client(port, b"shared-id", b"alice", b"pw-a")
    assert wait_closed(holder) == b""
    raw_ping(again)
    again.close()
    holder.close()
    assert get_counter(server.counters(), "auth_refused_takeover") == 2


# --- the same id again at once, from the other worker ----------------------------------

class PlacedSockets:
    """TCP connections to the server opened ahead of use and sorted by the
    worker that accepted them, so a CONNECT can go out on a chosen worker the
    moment the test wants it (no accept between a disconnect and it). One
    kept longer than FRESH seconds is dropped: the server closes a connection
    that sent no CONNECT within connect_timeout."""

    FRESH = 3.0

    def __init__(self, server):
        self.server = server
        self.port = server.ports["mqtt"]
        self.spare = {}         # worker pid -> [(socket, when it was opened)]

    def on(self, pid: int) -> socket.socket:
        for _ in range(60):
            while self.spare.get(pid):
                sock, opened = self.spare[pid].pop()
                if time.monotonic() - opened < self.FRESH:
                    return sock
                sock.close()
            sock = tcp_connect(self.port)
            opened = time.monotonic()
            self.spare.setdefault(self.server.which_worker(sock.getsockname()[1]), []).append((sock, opened))
        raise AssertionError(f"no connection landed on worker {pid} in 60 attempts")

    def close(self):
        for socks in self.spare.values():
            for sock, _ in socks:
                sock.close()


# Client ids whose homes (crc32(id) % 2) are the two workers.
HOMED_ON_EACH_WORKER = (b"again-x", b"again-xy")
assert sorted(zlib.crc32(cid) % 2 for cid in HOMED_ON_EACH_WORKER) == [0, 1]


def connack(sock, client_id: bytes, user: bytes, password: bytes, *, clean: bool = True) -> bytes:
    sock.sendall(auth_connect_packet(client_id, user, password, clean=clean))
    first, body = read_packet(sock)
    assert first == 0x20 and len(body) == 2, (first, body)
    return body


def alice_and_bob(gw_factory, tmp_path):
    """Two workers checking a password file of alice (pw-a) and bob (pw-b):
    the server, its worker pids, and sockets placed on a chosen worker."""
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", "--hash", "pbkdf2", pwfile, "alice", "pw-a").returncode == 0
    assert gw_passwd("-b", "--hash", "pbkdf2", pwfile, "bob", "pw-b").returncode == 0
    server = auth_server(gw_factory, tmp_path, pwfile, workers=2)
    return server, server.worker_pids(), PlacedSockets(server)


def test_the_same_id_again_at_once_from_the_other_worker(gw_factory, tmp_path):
    """A client disconnects and the id connects again at once on the other
    worker: as the same user (no wait at all), as another user once the
    first has gone (its connection closed by the server after DISCONNECT),
    and as another user right after the DISCONNECT was sent. Every round is
    accepted, whichever worker is the id's home; a claim at the home must not
    be decided on an owner whose release is still on its way."""
    users = {b"alice": b"pw-a", b"bob": b"pw-b"}
    server, pids, placed = alice_and_bob(gw_factory, tmp_path)
    try:
        for cid in HOMED_ON_EACH_WORKER:
            user, worker = b"alice", 0
            holder = placed.on(pids[worker])
            assert connack(holder, cid, user, users[user]) == b"\x00\x00"
            for n in range(100):
                # alice, alice, bob, bob, ...: every other round a change of user.
                nxt_user = (b"alice", b"bob")[(n + 1) // 2 % 2]
                worker = 1 - worker
                nxt = placed.on(pids[worker])
                holder.sendall(DISCONNECT)
                if nxt_user != user and n % 4 == 1:
                    assert wait_closed(holder) == b""       # gone: the server closed it
                body = connack(nxt, cid, nxt_user, users[nxt_user])
                assert body == b"\x00\x00", (cid, n, user, nxt_user, body)
                holder.close()
                holder, user = nxt, nxt_user
            holder.close()
    finally:
        placed.close()
    assert get_counter(server.counters(), "auth_refused_takeover") == 0
    assert server.worker_pids() == pids


def test_another_users_persistent_session_refused_from_either_worker(gw_factory, tmp_path):
    """A persistent session left by alice (no connection) is hers: bob is
    refused from either worker, and alice resumes it."""
    server, pids, placed = alice_and_bob(gw_factory, tmp_path)
    try:
        for cid in HOMED_ON_EACH_WORKER:
            for holder_worker in (0, 1):
                sock = placed.on(pids[holder_worker])
                assert connack(sock, cid, b"alice", b"pw-a", clean=False)[0] in (0, 1)
                sock.sendall(DISCONNECT)
                assert wait_closed(sock) == b""
                sock.close()
                for claimant in (1 - holder_worker, holder_worker):
                    sock = placed.on(pids[claimant])
                    assert connack(sock, cid, b"bob", b"pw-b") == b"\x00\x05"
                    sock.close()
                sock = placed.on(pids[1 - holder_worker])
                assert connack(sock, cid, b"alice", b"pw-a", clean=False) == b"\x01\x00"   # session present
                # ... and alice's live connection is not taken by bob either.
                other = placed.on(pids[holder_worker])
                assert connack(other, cid, b"bob", b"pw-b") == b"\x00\x05"
                other.close()
                raw_ping(sock)
                sock.sendall(DISCONNECT)
                assert wait_closed(sock) == b""
                sock.close()
    finally:
        placed.close()
    assert get_counter(server.counters(), "auth_refused_takeover") == 12
    assert server.worker_pids() == pids


# --- reload -----------------------------------------------------------------------------

def test_reload_with_broken_file_keeps_the_previous_one(gw_factory, tmp_path):
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", "--hash", "pbkdf2", pwfile, "alice", "pw-a").returncode == 0
    server = auth_server(gw_factory, tmp_path, pwfile, workers=2)
    port = server.ports["mqtt"]
    connected = raw_client(port, b"stays", b"alice", b"pw-a")
    good = open(pwfile).read()
    # Carol added, and a broken line elsewhere: the reload is refused.
    assert gw_passwd("-b", "--hash", "pbkdf2", pwfile, "carol", "pw-c").returncode == 0
    with open(pwfile, "a") as fh:
        fh.write("broken line without a hash\n")
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert "line 3" in server.log()
    for i in range(4):
        assert connack_code(port, f"c{i}".encode(), b"carol", b"pw-c") == 4
        assert connack_code(port, f"a{i}".encode(), b"alice", b"pw-a") == 0
    # Fixed: carol is in, on every worker; a reload disconnects nobody.
    with open(pwfile, "w") as fh:
        fh.write(good)
    assert gw_passwd("-b", "--hash", "pbkdf2", pwfile, "carol", "pw-c").returncode == 0
    mark = server.log().count("reloaded configuration")
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while server.log().count("reloaded configuration") <= mark:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    accepted = 0
    while accepted < 4:
        code = connack_code(port, f"c-new-{accepted}-{time.monotonic()}".encode(), b"carol", b"pw-c")
        if code == 0:
            accepted += 1
        else:
            assert time.monotonic() < deadline, "carol still refused after the reload"
            time.sleep(0.1)
    raw_ping(connected)
    connected.close()


def test_a_respawned_worker_checks_against_the_version_in_force(gw_factory, tmp_path):
    """The file broken on disk after the start (its reload refused): a worker
    respawned after a crash checks passwords against the users the others
    check against, the master's parsed copy, rather than failing to start."""
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", "--hash", "pbkdf2", pwfile, "alice", "pw-a").returncode == 0
    server = auth_server(gw_factory, tmp_path, pwfile, workers=2)
    with open(pwfile, "a") as fh:
        fh.write("broken line without a hash\n")
    server.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in server.log(), 10, what="the reload refused")
    before = server.worker_pids()
    victim = before[1]
    server.expect_worker_deaths(1)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(set(server.worker_pids()) - set(before)) == 1, 15, what="the worker respawned")
    (respawned,) = set(server.worker_pids()) - set(before)
    checked = {}
    for i in range(60):
        sock = tcp_connect(server.ports["mqtt"])
        try:
            worker = server.which_worker(sock.getsockname()[1])
            password = b"pw-a" if i % 2 == 0 else b"wrong"
            sock.sendall(auth_connect_packet(f"r{i}".encode(), b"alice", password))
            first, body = read_packet(sock)
            checked[(worker, password)] = body[1]
        finally:
            sock.close()
        if (respawned, b"pw-a") in checked and (respawned, b"wrong") in checked:
            break
    assert checked.get((respawned, b"pw-a")) == 0, checked
    assert checked.get((respawned, b"wrong")) == 4, checked
    assert respawned in server.worker_pids()            # it did not die again


# --- a storm of password CONNECTs -------------------------------------------------------

def test_a_connect_whose_check_outlasts_connect_timeout_is_told_busy(gw_factory, tmp_path):
    """More password CONNECTs at once than the one auth thread can check within
    connect_timeout (40 PBKDF2 hashes of tens of ms each, 1 s): those still
    waiting then are answered as by a busy server (CONNACK 0x03; 0x88 for MQTT
    5.0), counted, never as a wrong password; the others are accepted."""
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", "--hash", "pbkdf2", pwfile, "alice", "pw-a").returncode == 0
    server = auth_server(gw_factory, tmp_path, pwfile, args=["--auth-cache-seconds", "0", "--auth-threads", "1",
                                                             "--connect-timeout", "1"])
    port = server.ports["mqtt"]
    socks = []
    try:
        for i in range(40):
            v5 = i % 2 == 1
            sock = tcp_connect(port, 120)
            if v5:
                body = (mqtt_bytes.mqtt_str(b"MQTT") + b"\x05\xc2\x00\x3c\x00" + mqtt_bytes.mqtt_str(f"late-{i}")
                        + mqtt_bytes.mqtt_str(b"alice") + mqtt_bytes.mqtt_str(b"pw-a"))
                sock.sendall(mqtt_bytes.packet(0x10, body))
            else:
                sock.sendall(auth_connect_packet(f"late-{i}".encode(), b"alice", b"pw-a"))
            socks.append((v5, sock))
        codes = []
        for v5, sock in socks:
            first, body = read_packet(sock, 120)
            assert first == 0x20, (first, body)
            codes.append((v5, body[1]))
    finally:
        for _, sock in socks:
            sock.close()
    assert all(code in (0, 0x88 if v5 else 3) for v5, code in codes), codes
    busy = sum(1 for _, code in codes if code)
    assert 0 < busy < 40, codes
    wait_for(lambda: server.counters()["auth_refused_busy"] == busy, 10, what="the busy answers counted")


def test_connect_storm_with_passwords_keeps_pings_answered(gw_factory, tmp_path):
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", "--hash", "pbkdf2", pwfile, "alice", "pw-a").returncode == 0
    # A CONNECT still waiting for its check at connect_timeout is told the server is
    # busy: not what this test is about, and hashes are slow on a loaded machine.
    server = auth_server(gw_factory, tmp_path, pwfile, workers=2, args=["--auth-cache-seconds", "0",
                                                                        "--connect-timeout", "120"])
    port = server.ports["mqtt"]
    pinger = PahoClient(port)          # anonymous is allowed on loopback
    stop = threading.Event()
    pongs = []
    failures = []

    def keep_pinging():
        while not stop.is_set():
            try:
                pinger.ping(30)
                pongs.append(1)
            except BaseException as exc:     # reported below
                failures.append(exc)
                return

    thread = threading.Thread(target=keep_pinging, daemon=True)
    thread.start()
    codes = []

    def storm(k):
        for i in range(10):
            password = b"pw-a" if (i + k) % 3 else b"bad"
            # Each CONNECT waits for its turn at the password check (hashes, no
            # cache): on a loaded machine that can take long; the answer counts.
            codes.append((password, connack_code(port, f"storm-{k}-{i}".encode(), b"alice", password,
                                                 timeout=90)))

    workers = [threading.Thread(target=storm, args=(k,)) for k in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(240)
    stop.set()
    thread.join(60)
    assert not failures, failures
    assert len(codes) == 80
    assert all(code == (0 if pw == b"pw-a" else 4) for pw, code in codes), codes
    assert pongs
    pinger.check_healthy()
    pinger.close()


def test_persistent_session_keeps_its_user_across_a_restart(gw_factory, tmp_path):
    """A clean_session=0 session away from its client still belongs to its user,
    also once saved in data_dir and restored by a restart."""
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", "--hash", "pbkdf2", pwfile, "alice", "pw-a").returncode == 0
    assert gw_passwd("-b", "--hash", "pbkdf2", pwfile, "bob", "pw-b").returncode == 0
    server = auth_server(gw_factory, tmp_path, pwfile, workers=2)
    port = server.ports["mqtt"]
    with tcp_connect(port) as sock:
        sock.sendall(auth_connect_packet(b"kept-id", b"alice", b"pw-a", clean=False))
        assert read_packet(sock) == (0x20, b"\x00\x00")
        sock.sendall(b"\xe0\x00")                      # DISCONNECT: the session stays, away
        wait_closed(sock)
    assert connack_code(port, b"kept-id", b"bob", b"pw-b") == 5
    server.stop()
    server.start()
    port = server.ports["mqtt"]
    assert connack_code(port, b"kept-id", b"bob", b"pw-b") == 5
    with tcp_connect(port) as sock:
        sock.sendall(auth_connect_packet(b"kept-id", b"alice", b"pw-a", clean=False))
        assert read_packet(sock) == (0x20, b"\x01\x00")      # her session, present


def test_checks_over_auth_max_pending_are_refused_busy(gw_factory, tmp_path):
    """More CONNECTs waiting for their check than auth_max_pending: CONNACK 0x03,
    each counted; every other one is answered by its check."""
    pwfile = tmp_path / "passwd"
    assert gw_passwd("-c", "-b", "--hash", "pbkdf2", pwfile, "alice", "pw-a").returncode == 0
    server = auth_server(gw_factory, tmp_path, pwfile,
                         args=["--auth-max-pending", "1", "--auth-cache-seconds", "0"])
    port = server.ports["mqtt"]
    busy = 0
    for attempt in range(5):        # a batch whose CONNECTs all queue together (the first one always checked)
        socks = [tcp_connect(port) for _ in range(6)]
        try:
            for i, sock in enumerate(socks):
                sock.sendall(auth_connect_packet(f"busy-{attempt}-{i}".encode(), b"alice", b"pw-a"))
            codes = [read_packet(sock, 60) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        assert all(first == 0x20 and body[1] in (0, 3) for first, body in codes), codes
        assert any(body[1] == 0 for _first, body in codes), codes       # a slot was free for one
        busy += sum(1 for _first, body in codes if body[1] == 3)
        if busy:
            break
    assert busy >= 1
    assert get_counter(server.counters(), "auth_refused_busy") == busy


def test_gw_passwd_prompts_twice_on_a_terminal(tmp_path):
    """`gw passwd -c FILE USER` on a terminal (a pseudo-terminal here) asks for the
    password twice; a mismatch writes nothing."""
    import pty

    pwfile = tmp_path / "passwd"

    def run_on_tty(args, answers):
        import fcntl
        import termios

        master, slave = pty.openpty()

        def controlling_tty():          # the child's own session, the pty its terminal (getpass reads /dev/tty)
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            proc = subprocess.Popen([sys_python(), "-m", "gw.cli", "passwd", *map(str, args)], env=gw_env(),
                                    stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_tty)
            out = b""
            for k, answer in enumerate(answers, 1):
                while out.count(b"assword: ") < k:       # "Password: ", "Reenter password: "
                    chunk = os.read(master, 1024)
                    assert chunk, out
                    out += chunk
                os.write(master, answer + b"\n")
            rc = proc.wait(60)
        finally:
            os.close(slave)
            os.close(master)
        return rc

    assert run_on_tty(["-c", "--hash", "pbkdf2", pwfile, "alice"], [b"typed-pw", b"typed-pw"]) == 0
    from gw.passwords import load_password_file

    users = load_password_file(str(pwfile))
    assert users[b"alice"].verify(b"typed-pw") and not users[b"alice"].verify(b"other")
    before = pwfile.read_text()
    assert run_on_tty([pwfile, "bob"], [b"one", b"two"]) != 0
    assert pwfile.read_text() == before


def sys_python() -> str:
    import sys

    return sys.executable


def test_a_check_queued_behind_a_successful_one_does_not_hash_again():
    """A storm of CONNECTs with the same credentials queues one check per
    CONNECT before the first is answered; each queued check asks the cache of
    successful ones first, so the storm hashes once."""
    from gw.auth import Authenticator
    from gw.passwords import hash_password, parse_lines

    users = parse_lines([f"fleet:{hash_password('pw', 'pbkdf2')}\n"], "<test>")
    auth = Authenticator(users, cache_seconds=60, cache_entries=100)
    assert auth.verify(b"fleet", b"pw")
    auth.users = {}             # no entry left to hash against: only the cache can answer
    assert auth.verify(b"fleet", b"pw")
    assert not auth.verify(b"fleet", b"other")


def test_a_file_of_cheap_hashes_is_checked_in_the_loop_with_a_decoy_as_cheap():
    """mosquitto_passwd's entries ($7$, 101 iterations) are checked in the event
    loop (auth_inline_iterations); one costly entry sends the whole file to the
    auth threads, and an unknown user costs what the file's costliest entry does."""
    import hashlib
    import os as _os

    from gw.auth import _DECOY, Authenticator
    from gw.passwords import hash_password, parse_lines

    def mosquitto_line(user: str, password: str, iterations: int = 101) -> str:
        import base64
        salt = _os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
        return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"

    cheap = parse_lines([mosquitto_line("a", "pa"), mosquitto_line("b", "pb", 150)], "<test>")
    auth = Authenticator(cheap, cache_seconds=0, cache_entries=10, inline_iterations=200)
    assert auth.inline and auth._decoy.iterations == 150
    assert auth.verify(b"a", b"pa") and not auth.verify(b"a", b"pb") and not auth.verify(b"nobody", b"pa")
    assert not Authenticator(cheap, 0, 10, inline_iterations=0).inline          # 0: never
    assert not Authenticator(cheap, 0, 10, inline_iterations=120).inline        # b's 150 is over it
    costly = parse_lines([mosquitto_line("a", "pa"), f"c:{hash_password('pc', 'pbkdf2')}\n"], "<test>")
    auth = Authenticator(costly, 0, 10, inline_iterations=200)
    assert not auth.inline and auth._decoy is _DECOY
    auth.replace(cheap, 0, 10, inline_iterations=200)                           # a reload decides again
    assert auth.inline and auth._decoy.iterations == 150
    assert not Authenticator({}, 0, 10, inline_iterations=200).inline
