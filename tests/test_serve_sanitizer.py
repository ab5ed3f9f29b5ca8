"""Under `./dev sanitize` (GW_SANITIZE set) the tests and every `gw serve` they
start run the sanitizer build: AddressSanitizer's runtime mapped in each worker
and the extension modules loaded from the sanitizer build's directory, never
the normal in-place build. Skipped in an ordinary run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("GW_SANITIZE"), reason="only under ./dev sanitize")


def mapped(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split()) >= 6}


def test_workers_run_the_sanitizer_build(gw_factory):
    import gw_ext.loop

    sanitized_loop = str(Path(gw_ext.loop.__file__).resolve())
    repo = Path(__file__).resolve().parent.parent
    assert not sanitized_loop.startswith(str(repo / "gw_ext")), sanitized_loop
    server = gw_factory(workers=2, listeners=("mqtt",))
    for pid in server.worker_pids() + [server.pipeline_pid()]:
        files = mapped(pid)
        assert any("libasan" in f for f in files), f"no ASan runtime in pid {pid}"
        assert any("libubsan" in f for f in files), f"no UBSan runtime in pid {pid}"
    for pid in server.worker_pids():
        loops = {f for f in mapped(pid) if Path(f).name.startswith("loop.cpython")}
        assert loops == {sanitized_loop}, loops
