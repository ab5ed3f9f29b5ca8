"""What the processes of `gw serve` load: each only what it uses, so the idle
server's memory (PSS summed over its processes, bench/footprint.py) stays
small. numpy is the pipeline's, for its batches, and loads with the first one;
cryptography only makes the development certificates, in a child process of
its own; no process reads its memory figures through psutil."""

from __future__ import annotations

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
