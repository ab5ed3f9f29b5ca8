"""Small JSON checkpoint files, replaced atomically (write, fsync, rename, fsync dir)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gw.private_files import fsync_directory

from .errors import PipelineError


def write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    data = (json.dumps(value, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)        # a leftover temporary file keeps its mode otherwise
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path.parent)


def read_json(path: Path) -> dict | None:
    """The checkpoint, or None when there is none yet; ValueError if unreadable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def read_sink_checkpoint(path: Path, sink: str, redone: str) -> dict | None:
    """A sink's checkpoint of one worker's log, or None when there is none yet;
    PipelineError, saying how to go on, when it cannot be read (`redone`: what
    removing it does with that log, e.g. "sends")."""
    try:
        return read_json(path)
    except (ValueError, OSError) as exc:
        raise PipelineError(f"{sink} checkpoint {path} is unreadable ({exc}); "
                            f"fix or remove it (removing it {redone} that log again from its start)") from None
