"""A real PostgreSQL server for the tests: `initdb` in a temporary directory,
`pg_ctl start` on a free loopback port (its socket in that directory too),
trust authentication, stopped (`pg_ctl stop -m immediate`) in a finalizer.

Session-scoped (`pg_server` fixture): the suite pays for one initdb; each test
takes a database of its own (`pg_server.database()`). Skipped, with the reason,
only when the PostgreSQL binaries are not installed (.ci/run installs them).
`initdb` refuses to run as root: as root the server runs as `nobody`, in a
directory given to it.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_ports, wait_for

SUPERUSER = "gw"


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for path in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return path
    return None


class PgServer:
    def __init__(self, base: Path, *, fsync: bool = False):
        self.base = base
        self.data = base / "data"
        self.logfile = base / "postgres.log"
        self.port = free_ports(1)[0]
        self.fsync = fsync
        self._ids = itertools.count(1)
        self.initdb = find_bin("initdb")
        self.pg_ctl = find_bin("pg_ctl")
        self.user = "nobody" if os.geteuid() == 0 else None

    def _run(self, args: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        if self.user is not None:
            args = ["runuser", "-u", self.user, "--", *args]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)

    def init(self) -> "PgServer":
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self._run([self.initdb, "-D", str(self.data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
                   "--no-sync", "--no-instructions"])
        return self

    def start(self, timeout: float = 60.0) -> "PgServer":
        """Starts the server; after a kill -9 its old backends may hold the shared
        memory a moment longer (they exit once they notice): tried again until then."""
        opts = (f"-k {self.base} -c listen_addresses=127.0.0.1 -p {self.port} "
                f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200 -c shared_buffers=128MB")
        deadline = time.monotonic() + timeout
        while True:
            done = self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.logfile), "-o", opts, "-w",
                              "-t", "60", "start"], check=False)
            if done.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {done.stdout} {done.stderr} "
                                   f"{self.logfile.read_text()[-2000:] if self.logfile.exists() else ''}")
            time.sleep(0.5)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"], check=False)

    def running(self) -> bool:
        try:
            os.kill(self.postmaster_pid(), 0)
        except (OSError, ValueError):
            return False
        return True

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def kill9(self) -> None:
        """SIGKILL to the postmaster (its backends notice and exit); restart with start()."""
        pid = self.postmaster_pid()
        os.kill(pid, signal.SIGKILL)

        def gone():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False
        wait_for(gone, 10, what="the postmaster to die")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres", params=()) -> list:
        import psycopg
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def database(self) -> str:
        """A new empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._ids)}"
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def make_pg_server(fsync: bool = False) -> PgServer:
    """fsync off for the tests (only PostgreSQL is killed, never the machine)."""
    if find_bin("initdb") is None or find_bin("pg_ctl") is None:
        pytest.skip("PostgreSQL is not installed (initdb and pg_ctl not found); .ci/run installs it")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install -e '.[test]')")
    base = Path(tempfile.mkdtemp(prefix="gw-pg-"))
    os.chmod(base, 0o700)
    server = PgServer(base, fsync=fsync)
    try:
        server.init().start()
    except BaseException:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    return server


@pytest.fixture(scope="session")
def pg_server():
    server = make_pg_server()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A fresh database of the session's server, dropped afterwards."""
    url = pg_server.database()
    yield url
    try:
        pg_server.drop(url)
    except Exception:       # noqa: BLE001  (the server may be down after a test that killed it)
        pass
