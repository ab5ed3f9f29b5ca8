"""The background writer of whole files (gw_ext.filewriter): atomic replacement
on real files, newest snapshot wins, failures reported and the previous file
kept, close() writes everything pending before it returns."""

from __future__ import annotations

import errno
import os
import time

import pytest

from conftest import wait_for
from gw_ext.filewriter import FileWriter


@pytest.fixture
def writer():
    w = FileWriter()
    yield w
    w.close()


def test_writes_a_file_and_reports_it(tmp_path, writer):
    path = tmp_path / "state.bin"
    data = os.urandom(3 << 20)
    gen = writer.submit(path, data)
    assert writer.wait_idle(30)
    assert writer.results() == [(str(path), gen, 0)]
    assert path.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["state.bin"]        # no temporary file left
    assert (writer.writes, writer.errors) == (1, 0)
    assert writer.results() == []


def test_newer_snapshot_replaces_a_waiting_one(tmp_path, writer):
    """One write in flight at a time; of the snapshots submitted meanwhile only
    the newest is written."""
    path = tmp_path / "state.bin"
    writer._inject(delay=0.3)
    first = writer.submit(path, b"first")
    wait_for(lambda: writer.busy, 10, what="the first write in flight")
    for i in range(50):
        last = writer.submit(path, b"snapshot %d" % i)
    assert writer.wait_idle(30)
    done = writer.results()
    assert [g for _, g, _ in done] == [first, last]
    assert path.read_bytes() == b"snapshot 49"
    assert writer.writes == 2


def test_files_are_independent(tmp_path, writer):
    a, b = tmp_path / "a.bin", tmp_path / "sub" / "b.bin"
    b.parent.mkdir()
    writer.submit(a, b"A1")
    writer.submit(b, b"B1")
    writer.submit(a, b"A2")
    assert writer.wait_idle(30)
    assert (a.read_bytes(), b.read_bytes()) == (b"A2", b"B1")
    assert {p for p, _, e in writer.results() if e == 0} == {str(a), str(b)}


def test_a_failed_write_keeps_the_previous_file(tmp_path, writer):
    path = tmp_path / "state.bin"
    writer.submit(path, b"good")
    assert writer.wait_idle(30)
    # A directory where the temporary file goes: open() fails for real.
    (tmp_path / "state.bin.tmp").mkdir()
    gen = writer.submit(path, b"never")
    assert writer.wait_idle(30)
    assert writer.results()[-1] == (str(path), gen, errno.EISDIR)
    assert path.read_bytes() == b"good"
    assert writer.errors == 1
    (tmp_path / "state.bin.tmp").rmdir()
    writer._inject(errno.ENOSPC, 1)
    gen = writer.submit(path, b"no room")
    assert writer.wait_idle(30)
    assert writer.results() == [(str(path), gen, errno.ENOSPC)]
    assert path.read_bytes() == b"good"
    gen = writer.submit(path, b"better")
    assert writer.wait_idle(30)
    assert writer.results() == [(str(path), gen, 0)]
    assert path.read_bytes() == b"better"
    assert sorted(os.listdir(tmp_path)) == ["state.bin"]


def test_a_missing_directory_is_an_error_not_a_crash(tmp_path, writer):
    path = tmp_path / "gone" / "state.bin"
    gen = writer.submit(path, b"x")
    assert writer.wait_idle(30)
    assert writer.results() == [(str(path), gen, errno.ENOENT)]


def test_close_writes_what_is_pending_to_the_end(tmp_path):
    w = FileWriter()
    path = tmp_path / "state.bin"
    w._inject(delay=0.2)
    w.submit(path, b"in flight")
    # Until the thread has taken it, a second submit would replace it (the
    # latest content of a file wins): wait for the first write to be in flight.
    deadline = time.monotonic() + 30
    while not (w.busy or w.writes) and time.monotonic() < deadline:
        time.sleep(0.001)
    final = os.urandom(1 << 20)
    w.submit(path, final)
    w.close()
    assert path.read_bytes() == final
    assert w.writes == 2
    with pytest.raises(ValueError):
        w.submit(path, b"after close")


def test_submit_returns_at_once_while_a_write_is_slow(tmp_path, writer):
    """The caller never waits for the disk: with each write held for a second,
    submitting and collecting stay immediate (not a timing assertion: the
    write is still in flight when submit has returned)."""
    path = tmp_path / "state.bin"
    writer._inject(delay=1.0)
    writer.submit(path, b"slow")
    writer.submit(path, b"slower")
    assert writer.results() == []              # nothing finished yet: we did not wait
    assert not writer.wait_idle(0.05)
    assert writer.wait_idle(30)
    assert path.read_bytes() == b"slower"
