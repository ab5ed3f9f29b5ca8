"""Connection set-up with passwords against without: 10,000 clients ramped
over 15 s (`gw bench`'s connection scenario) against one `gw serve`, once
giving a user name and password from a PBKDF2 password file and once
anonymous, alternating, same server, same run (after one anonymous warm-up
run, not counted); the connect p50/p99 of each and their ratio.

    python bench/password_connects.py [--clients 10000] [--rampup 15] [--rounds 2]
        [--hash pbkdf2|mosquitto] [--workers 2] [--distinct-users]

--hash pbkdf2: an entry `gw passwd --hash pbkdf2` writes ($7$, 210,000
iterations); --hash mosquitto: one Debian's `mosquitto_passwd` writes ($7$,
its default iteration count), as a password file carried over from
Mosquitto. Every client gives the same credentials, so after the first
check in each worker the rest are answered from the cache of successful
checks (`auth_cache_seconds`), as a fleet reconnecting with its
credentials is. --distinct-users: every client its own user name and
password (user-{n}), entries as `mosquitto_passwd` writes them ($7$, 101
iterations, written here directly: 10,000 runs of the tool take minutes),
so every CONNECT is hashed. Loopback only; the server is stopped by pid. Not a
pass/fail test: BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchutil import mqtt_only_gw

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
USER, PASSWORD = "fleet", "fleet-password"


MOSQUITTO_ITERATIONS = 101      # mosquitto_passwd's default (Mosquitto 2.0)


def distinct_password_file(path: Path, users: int) -> None:
    """user-{n}:password-{n} for n < users, in mosquitto_passwd's $7$ format."""
    import base64
    import hashlib
    b64 = base64.b64encode
    lines = []
    for n in range(users):
        salt = os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", f"password-{n}".encode(), salt, MOSQUITTO_ITERATIONS, 64)
        lines.append(f"user-{n}:$7${MOSQUITTO_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}\n")
    path.write_text("".join(lines))
    path.chmod(0o600)


def password_file(path: Path, kind: str) -> None:
    if kind == "mosquitto":
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            sys.exit("mosquitto_passwd is not installed (Debian: mosquitto)")
        subprocess.run([tool, "-c", "-b", str(path), USER, PASSWORD], check=True, stdin=subprocess.DEVNULL)
    else:
        subprocess.run([sys.executable, "-m", "gw.cli", "passwd", "-c", "-b", "--hash", "pbkdf2", str(path),
                        USER, PASSWORD], env=ENV, check=True, stdin=subprocess.DEVNULL)


def connects(port: int, pid: int, clients: int, rampup: float, out: Path, credentials: bool,
             distinct: bool = False) -> dict:
    cmd = [sys.executable, "-m", "gw.cli", "bench", "--clients", str(clients), "--rampup", str(rampup),
           "--duration", "3", "--keepalive", "60", "--server", f"127.0.0.1:{port}", "--server-pid", str(pid),
           "--json", str(out), "--quiet"]
    if credentials:
        cmd += ["--username", "user-{n}", "--password", "password-{n}"] if distinct else \
            ["--username", USER, "--password", PASSWORD]
    subprocess.run(cmd, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=600, check=True)
    r = json.loads(out.read_text())
    return {"connected": r["connected"], "clients": r["clients"], "p50": r["connect_ms"]["p50_ms"],
            "p99": r["connect_ms"]["p99_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--rampup", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hash", choices=("pbkdf2", "mosquitto"), default="pbkdf2")
    ap.add_argument("--distinct-users", action="store_true",
                    help="one user per client, mosquitto_passwd's $7$ with 101 iterations (--hash ignored)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gw-password-connects-") as tmp:
        pwfile = Path(tmp) / "passwd"
        if args.distinct_users:
            distinct_password_file(pwfile, args.clients)
        else:
            password_file(pwfile, args.hash)
        # allow_anonymous: the anonymous runs go to the same server as the password runs.
        flags = ("--password-file", str(pwfile), "--allow-anonymous", "true",
                 "--max-connections", str(args.clients + 1000))
        if args.distinct_users:
            # No cache: every round's CONNECTs are hashed, not only the first round's.
            flags += ("--auth-cache-seconds", "0")
        with open(Path(tmp) / "gw.log", "ab") as log, \
                mqtt_only_gw(args.workers, *flags, tmp_parent=tmp, stderr=log) as (server, port, _):
            # A first run the server has not seen the like of pays for growing its
            # tables: one anonymous run first, not counted, so neither side gets it.
            warm = connects(port, server.pid, args.clients, args.rampup, Path(tmp) / "warm-up.json", False)
            print(f"warm-up (anonymous, not counted): {warm}", file=sys.stderr, flush=True)
            for rnd in range(args.rounds):
                order = (True, False) if rnd % 2 == 0 else (False, True)
                for credentials in order:
                    r = connects(port, server.pid, args.clients, args.rampup,
                                 Path(tmp) / f"r{rnd}-{credentials}.json", credentials, args.distinct_users)
                    rows.append((rnd, credentials, r))
                    print(f"round {rnd + 1} {'password' if credentials else 'anonymous'}: {r}",
                          file=sys.stderr, flush=True)
    print("| round | clients | connected | connect p50 (ms) | connect p99 (ms) |")
    print("|---|---|---|---|---|")
    for rnd, credentials, r in rows:
        print(f"| {rnd + 1} | {'password' if credentials else 'anonymous'} | {r['connected']:,}/{r['clients']:,} "
              f"| {r['p50']:.2f} | {r['p99']:.2f} |")
    for rnd in range(args.rounds):
        pw = next(r for n, c, r in rows if n == rnd and c)
        anon = next(r for n, c, r in rows if n == rnd and not c)
        print(f"round {rnd + 1}: p99 password / anonymous = {pw['p99'] / anon['p99']:.2f}")


if __name__ == "__main__":
    main()
