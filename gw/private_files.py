"""Files only the server's user may read, replaced whole: the password file
(gw passwd) and the tokens file (gw token). A reader sees the old file or the
new one, never a part, and a crash leaves one of the two."""

from __future__ import annotations

import os


def fsync_directory(directory: str | os.PathLike) -> None:
    """Makes a rename or a new file in the directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_private_file(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to a temporary file beside `path` (mode 0600 from its
    creation), fsyncs it, renames it over `path` and fsyncs the directory."""
    # Imported here: gw serve reads these files but never writes them, and
    # tempfile brings shutil, bz2 and lzma (with their C libraries) into every process.
    import tempfile

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)   # mkstemp: 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), 0o600)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(directory)
