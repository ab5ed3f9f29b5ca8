"""What the processes of `gw serve` load: each only what it uses, so the idle
server's memory (PSS summed over its processes, bench/footprint.py) stays
small. numpy is the pipeline's, for its batches, and loads with the first one;
cryptography only makes the development certificates, in a child process of
its own; no process reads its memory figures through psutil."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import wait_for
from gw.stats import server_processes
from http_client import HttpConn, ingest_body
from test_serve_pipeline import wait_stored

LIBRARIES = ("numpy", "cryptography", "psutil")
# Extension modules no process of an idle server loads (tempfile brings them through
# shutil; gw imports tempfile, gzip and importlib.resources where it uses them).
UNUSED_EXTENSIONS = ("_lzma", "_bz2")


def mapped(pid: int) -> set[str]:
    """Which of LIBRARIES a process has mapped (a shared object of its package)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {lib for lib in LIBRARIES if f"/{lib}/" in maps or f"/{lib}." in maps}


def test_each_process_maps_only_what_it_uses(gw_factory):
    # Every listener, TLS ones included: the development certificates are made at start.
    server = gw_factory(workers=2)
    assert (server.certs_dir / "cert.pem").exists()
    wait_for(server.pipeline_pid, 20, what="the pipeline process")
    processes = server_processes(server.block())
    assert [name for name, _ in processes] == ["master", "worker 0", "worker 1", "pipeline"]
    assert {name: mapped(pid) for name, pid in processes} == {name: set() for name, _ in processes}
    for name, pid in processes:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert [ext for ext in UNUSED_EXTENSIONS if f"/{ext}." in maps] == [], name

    # A reading stored: the pipeline has loaded numpy for its batch; nothing else has.
    with HttpConn(server.ports["http"]) as c:
        assert c.request("POST", "/v1/ingest/dev-footprint", ingest_body(seq=1)).status == 202
    wait_stored(server, "dev-footprint", {1})
    assert {name: mapped(pid) for name, pid in processes} == {
        name: {"numpy"} if name == "pipeline" else set() for name, _ in processes}


def mapping_rss_kib(path: str) -> int:
    """The resident KiB of this process's mappings of path (/proc/self/smaps)."""
    rss, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
            inside = line.endswith(" " + path)
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
    return rss


def mapping_range(path: str) -> tuple[int, int]:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(" " + path):
            lo, hi = line.split(" ", 1)[0].split("-")
            return int(lo, 16), int(hi, 16)
    raise AssertionError(f"{path} is not mapped")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding path (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1]
        if (str(path) + "/").startswith(mount.rstrip("/") + "/") and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def test_page_out_gives_back_a_private_file_mapping_only_this_process_maps(tmp_path):
    # What the master does with the file pages of its start (gw/master.py,
    # release_start_pages): a private read-only mapping of a file this process
    # owns, every page touched, is no longer resident once paged out, and reads
    # back the same bytes.
    import mmap

    import pytest

    from gw_ext.stats import page_out

    if filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("the temporary directory is in memory: its pages are not paged out without swap")
    data = bytes(range(256)) * 16 * 64          # 256 KiB
    path = tmp_path / "pages.bin"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        # Written back first: the kernel pages out only clean file pages (a
        # dirty one is queued for writeback instead, and stays resident).
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), len(data), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        assert sum(m[i] for i in range(0, len(data), 4096)) == 0    # every page touched (byte 0 of each)
        assert mapping_rss_kib(str(path)) == len(data) // 1024
        start, end = mapping_range(str(path))
        if not page_out(start, end - start):
            pytest.skip("the kernel has no MADV_PAGEOUT (Linux 5.4)")
        # Reclaim is best effort: a page the kernel holds in a per-CPU batch
        # (just faulted in, on another CPU than now) is skipped by that pass.
        for _ in range(20):
            if mapping_rss_kib(str(path)) < len(data) // 1024 // 4:
                break
            time.sleep(0.05)
            page_out(start, end - start)
        assert mapping_rss_kib(str(path)) < len(data) // 1024 // 4
        assert m[:] == data
    finally:
        m.close()
    assert not page_out(1, 4096)        # not page-aligned: refused, nothing done
