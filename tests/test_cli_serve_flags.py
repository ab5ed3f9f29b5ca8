"""`gw serve`'s flags read without click (gw/cli.py): whenever the entry point
reads them itself, it reads what click reads; anything else goes to click."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, free_ports, gw_env, run_gw
from gw.cli import serve_flags
from gw.commands import serve
from gw.config import SETTINGS


def click_reads(args: list[str]) -> tuple[str | None, dict]:
    params = serve.make_context("serve", list(args)).params
    return params.pop("config_path"), {k: v for k, v in params.items() if v is not None}


def every_setting(form: str) -> list[str]:
    """Each setting's flag with its default as text, as `--flag VALUE` or `--flag=VALUE`."""
    args = []
    for name, f in SETTINGS.items():
        value = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
        if value == "" or value.startswith("-"):
            continue
        flag = f"--{name.replace('_', '-')}"
        args += [f"{flag}={value}"] if form == "=" else [flag, value]
    return args


CASES = [
    [],
    ["--workers", "2", "--mqtt", "127.0.0.1:0", "--https", "off"],
    ["--workers=3", "--wal-batch-ms", "0.5", "--require-certificate", "true", "--log-level=debug"],
    ["--config", "gw.toml", "--workers", "1"],
    ["--workers", "1", "--workers", "2"],                 # the last one counts, as with click
    ["--allow-anonymous", "false", "--stats-interval", "0", "--idempotency-window", "1e3"],
    ["--mqtt=", "--acl-file", ""],
    every_setting(" "),
    every_setting("="),
]


@pytest.mark.parametrize("args", CASES, ids=range(len(CASES)))
def test_what_the_entry_point_reads_is_what_click_reads(args):
    mine = serve_flags(args)
    assert mine is not None, args
    assert mine == click_reads(args)


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], ["--workers"], ["--workers", "two"], ["--workers", " 2"], ["--workers", "-1"],
    ["--no-such-flag", "1"], ["--require-certificate", "TRUE"], ["--require-certificate", "maybe"],
    ["--wal-batch-ms", "inf"], ["--workers", "1_000"], ["serve"], ["--config", "."],
])
def test_anything_else_goes_to_click(args):
    assert serve_flags(args) is None


def test_serve_errors_are_said_as_before(tmp_path):
    for args, said in ((["--workers", "0"], "workers"), (["--no-such-flag", "1"], "No such option"),
                       (["--workers", "two"], "two")):
        res = run_gw("serve", "--data-dir", tmp_path / "data", *args)
        assert res.returncode == 2, res
        assert res.stderr.startswith("gw: error: ") and said in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_gw_serve_starts_without_importing_click(tmp_path):
    port, = free_ports(1)
    args = ["--workers", "1", "--mqtt", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data")]
    args += [a for name in ("mqtts", "json", "jsons", "http", "https") for a in (f"--{name}", "off")]
    proc = subprocess.Popen([PYTHON, "-X", "importtime", "-m", "gw.cli", "serve", *args], cwd=tmp_path,
                            env=gw_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "data" / "gw.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "gw serve did not start"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    imported = {line.rsplit("|", 1)[-1].strip() for line in err.decode().splitlines()
                if line.startswith("import time:")}
    assert "gw.master" in imported and "gw_ext.loop" in imported
    assert not {m for m in imported if m == "click" or m.startswith("click.")}
    assert proc.returncode == 0, err.decode()[-2000:]
