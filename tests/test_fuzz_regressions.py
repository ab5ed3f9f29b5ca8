"""What the fuzzers (fuzz/, `./dev fuzz`) found, reduced to its trigger: each
test reproduces one finding against a real server, or against a Worker driven
one loop turn at a time (Worker.run_once) with real sockets and a peer worker
played by the test over a real SOCK_SEQPACKET socketpair (fuzz/common.py's
harness). Worker-level reproductions run in a child process, so a memory
error fails the test instead of ending the test run.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, connect_packet, get_counter, gw_env, ping, read_packet, tcp_connect


def run_worker_script(body: str, timeout: float = 60) -> str:
    """Runs `body` in a child Python with fuzz/common.py's harness imported;
    the child must exit 0 (a crash is a failure) and print 'ok'."""
    script = textwrap.dedent("""
        import struct, sys
        sys.path.insert(0, %r)
        from common import *
        h = Harness()
    """ % str(REPO / "fuzz")) + textwrap.dedent(body) + "\nprint('ok')\n"
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=gw_env(), capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (
        f"worker script exited {res.returncode}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-4000:]}")
    return res.stdout


# --- against a real server -------------------------------------------------------------

def test_connect_in_two_segments_local_home(gw_factory):
    server = gw_factory(workers=1, listeners=("mqtt",))
    pids = server.worker_pids()
    connect = connect_packet(b"split")
    for cut in (1, 2, len(connect) - 1):
        with tcp_connect(server.ports["mqtt"]) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            before = get_counter(server.counters(), "bytes_in")
            s.sendall(connect[:cut])
            # The first part is read on its own before the rest is sent.
            server.wait_counter("bytes_in", before + cut, timeout=10)
            s.sendall(connect[cut:])
            assert read_packet(s) == (0x20, b"\x00\x00")
            ping(s)
    assert server.worker_pids() == pids
    assert " died " not in server.log()


def test_evict_naming_no_worker_is_dropped():
    """An EVICT frame names the worker that claimed the client id by a byte:
    one that is no worker indexed the 64-entry peer table out of bounds. It is
    dropped, and the client it named stays connected."""
    run_worker_script("""
        wut = WorkerUnderTest(h, nworkers=3, protos=("mqtt",))
        c = Client(wut.ports["mqtt"])
        wut.turn()
        c.stream += connect_packet(b"c0")          # c0's home is this worker (crc32 % 3 == 0)
        c.send(0)
        for _ in range(5):
            wut.turn()
        c.drain()
        assert bytes(c.received) == CONNACK_NEW, bytes(c.received)
        for claimant in (200, 64, 3, 255):
            wut.peers[1].send(frame(FR_EVICT, struct.pack("<BIB", claimant, 1, 1) + b"c0"))
            wut.peers[1].send(frame(FR_REGISTER, bytes([claimant]) + b"c0"))
            wut.turn()
        assert h.counter("TAKEOVERS") == 0
        c.stream += PINGREQ
        c.send(0)
        for _ in range(3):
            wut.turn()
        c.drain()
        assert bytes(c.received) == CONNACK_NEW + b"\\xd0\\x00", bytes(c.received)
        assert c.open
        wut.close()
    """)


def test_moved_session_with_lying_lengths():
    """A SESSION frame carries a session's state from the worker that held it;
    its counts and lengths were trusted (a filter length past the end, a
    payload length of 2 GiB read from a frame of a few bytes). A state that
    lies is restored up to the lie, and the client is served."""
    run_worker_script("""
        # The SESSION frames' states: lying filter length, lying payload length,
        # lying message count, cut short, a QoS 3 filter and message.
        good_sub = struct.pack("<H", 3) + b"t/x" + b"\\x01"
        states = [
            struct.pack("<H", 1) + struct.pack("<H", 0xFFFF) + b"t/x\\x01",
            struct.pack("<H", 1) + good_sub + struct.pack("<HI", 5, 1)
                + struct.pack("<HBBHI", 4, 1, 0, 3, 0x7FFFFFF0) + b"t/xhi",
            struct.pack("<H", 0) + struct.pack("<HI", 5, 0xFFFFFFFF) + struct.pack("<HBBHI", 0, 1, 0, 3, 2) + b"t/x",
            struct.pack("<H", 2) + good_sub,
            struct.pack("<H", 1) + struct.pack("<H", 3) + b"t/x\\x03" + struct.pack("<HI", 1, 1)
                + struct.pack("<HBBHI", 9, 3, 7, 3, 2) + b"t/xhi" + struct.pack("<H", 0xFFFF),
        ]
        from zlib import crc32
        # Client ids whose home is the peer (worker 1), one per state: each
        # CONNECT's session is settled by the peer's frames.
        ids = [cid for cid in (b"s%d" % i for i in range(100)) if crc32(cid) % 2 == 1][:len(states)]
        wut = WorkerUnderTest(h, nworkers=2, protos=("mqtt",), peer_answers=False)
        for token, (state, cid) in enumerate(zip(states, ids), start=1):
            c = Client(wut.ports["mqtt"])
            wut.turn()
            c.stream += connect_packet(cid, clean=False)
            c.send(0)
            wut.turn()
            wut.turn()
            # The peer: c0 was held by worker 1, which sends the session over.
            wut.peers[1].held.clear()
            wut.peers[1].send(frame(FR_GRANT, struct.pack("<Ib", token, 1) + cid))
            wut.peers[1].send(frame(FR_SESSION, struct.pack("<IBH", token, 1, len(cid)) + cid + state))
            for _ in range(4):
                wut.turn()
            c.drain()
            assert bytes(c.received[:4]) == b"\\x20\\x02\\x01\\x00", (token, bytes(c.received))
            c.stream += PINGREQ
            c.send(0)
            for _ in range(3):
                wut.turn()
            c.drain()
            assert bytes(c.received).endswith(b"\\xd0\\x00"), (token, bytes(c.received))
            c.close()
            for _ in range(3):
                wut.turn()
        assert wut.connections() == 0
        wut.close()
    """)


# --- the committed seeds, on the normal build ---------------------------------------------

@pytest.mark.parametrize("target", sorted(p.name for p in (REPO / "fuzz" / "corpus").iterdir() if p.is_dir()))
def test_every_committed_seed_passes_its_harness(target):
    """Each seed of fuzz/corpus/TARGET through fuzz/fuzz_TARGET.py's TestOneInput,
    in a child process: a seed the harness refuses would stop CI's fuzzing
    before it fuzzes anything (a harness that drifted from the worker, or a
    finding), so it is caught here first."""
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        sys.path.insert(0, %r)
        import fuzz_%s as target
        seeds = sorted(Path(%r).iterdir())
        for seed in seeds:
            try:
                target.TestOneInput(seed.read_bytes())
            except BaseException as exc:
                print(f"seed {seed.name}: {type(exc).__name__}: {exc}")
                raise
        print(f"{len(seeds)} seeds ok")
    """ % (str(REPO / "fuzz"), target, str(REPO / "fuzz" / "corpus" / target)))
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=gw_env(), capture_output=True, text=True,
                         timeout=240, stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and res.stdout.strip().endswith("seeds ok"), (
        f"exit {res.returncode}\nstdout: {res.stdout[-3000:]}\nstderr: {res.stderr[-3000:]}")
