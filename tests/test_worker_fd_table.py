"""A worker's file-descriptor table is sized for its connections when it starts.

The kernel doubles a process's table when a new descriptor does not fit, and
in a process with threads each doubling waits for an RCU grace period inside
accept(): every connection of the worker waited with it (6-15 ms per doubling
here, the whole of the connect tail of a ramp, bench/compare.py
idle-10k-plain-8s). /proc/PID/status `FDSize` is the table's size."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO, wait_for
from gw.worker import FD_HEADROOM


def fd_table_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("FDSize:"):
            return int(line.split()[1])
    raise AssertionError(f"no FDSize for {pid}")


def hard_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def test_each_worker_starts_with_a_table_for_max_connections_and_a_reload_grows_it(gw_factory, tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text("max_connections = 3000\nlog_level = \"debug\"\n")
    server = gw_factory(workers=2, config=config)
    pids = server.worker_pids()
    assert len(pids) == 2
    for pid in pids:
        assert fd_table_size(pid) >= min(3000 + FD_HEADROOM, hard_limit()), pid
        # far from full: no connection has been made
        assert len(os.listdir(f"/proc/{pid}/fd")) < 256

    config.write_text("max_connections = 6000\nlog_level = \"debug\"\n")
    log = server.log()
    counts = [log.count(f"worker {i}: reloaded") for i in range(2)]
    server.signal(signal.SIGHUP)
    wait_for(lambda: all(server.log().count(f"worker {i}: reloaded") > counts[i] for i in range(2)), 10,
             what="both workers to reload")
    for pid in server.worker_pids():
        assert fd_table_size(pid) >= min(6000 + FD_HEADROOM, hard_limit()), pid


def test_reserving_never_takes_a_descriptor_in_use_and_stops_at_the_limit(tmp_path):
    # In a child: the table it grows is its own.
    script = textwrap.dedent(f"""
        import fcntl, os, resource
        from gw.worker import reserve_fd_table
        f = open({str(tmp_path / "held")!r}, "w")
        held = fcntl.fcntl(f.fileno(), fcntl.F_DUPFD_CLOEXEC, 2999)     # a connection at the top
        before = os.fstat(held)
        assert reserve_fd_table(3000) == 3000
        after = os.fstat(held)
        assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
        status = open("/proc/self/status").read()
        size = int(status.split("FDSize:")[1].split()[0])
        assert size >= 3000, size
        assert sorted(int(n) for n in os.listdir("/proc/self/fd") if int(n) >= 2999) == [held]
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        assert reserve_fd_table(1 << 20) == 4096
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
