"""Instructions a gw worker executes per TLS connection, counted by callgrind.

    python bench/tls_handshake_cost.py [--count 300] [--resume] [--tls12]
        [--serve-arg=--tls-ticket-lifetime --serve-arg=0] [--keep]

A count of instructions does not depend on what else runs on the machine, so
a change to the TLS set-up can be held against the commit before it on a
shared machine (its CPU time cannot: bench/tls_connect_probe.py's
--server-pid figure moves 10-20 % between runs there). It starts `gw serve
--workers 1` with only the mqtts listener (the development certificate:
ECDSA P-256) under `valgrind --tool=callgrind`, counting only inside the
worker's per-connection phases (its events, the reads of connections accepted
in the turn, the flush, the reaping of closed connections: accept, SSL_new,
the handshake with its session ticket, CONNECT/CONNACK, close, SSL_free; not
the loop's idle turns nor the once-a-second tick), then connects
bench/tls_connect_probe.py's blocking client --warmup times and --count
times, stops gw with SIGTERM (callgrind writes its counts as the worker
exits) and divides the worker's count by all the connections. The same
command gives the same figure to within a few instructions per connection.
Under valgrind OpenSSL picks the code paths of the CPU valgrind emulates, so
the crypto's share is not the native one; differences between two builds are.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare import PY, REPO, free_port

TOGGLES = ("*Worker_on_event", "*Worker_read_fresh", "*Worker_flush_dirty", "*Worker_reap_closed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--resume", action="store_true", help="each connection offers the last one's ticket")
    ap.add_argument("--tls12", action="store_true")
    ap.add_argument("--serve-arg", action="append", default=[], help="one more `gw serve` argument")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (callgrind files)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gw-tls-cost-"))
    port = free_port()
    cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
           *(f"--toggle-collect={t}" for t in TOGGLES), f"--callgrind-out-file={work}/cg.%p",
           PY, "-m", "gw.cli", "serve", "--workers", "1", "--mqtts", f"127.0.0.1:{port}",
           "--mqtt", "off", "--json", "off", "--jsons", "off", "--http", "off", "--https", "off",
           "--ws", "off", "--wss", "off", "--certs", str(work / "certs"), "--data-dir", str(work / "data"),
           *args.serve_arg]
    proc = subprocess.Popen(cmd, cwd=work, stdout=open(work / "gw.log", "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True)
    probe = [PY, str(REPO / "bench" / "tls_connect_probe.py"), "--port", str(port),
             "--cafile", str(work / "certs" / "ca.pem")]
    probe += ["--resume"] if args.resume else []
    probe += ["--tls12"] if args.tls12 else []
    try:
        end = time.time() + 600
        while b"listening on" not in (work / "gw.log").read_bytes():
            if proc.poll() is not None or time.time() > end:
                raise SystemExit(f"tls_handshake_cost: gw did not start; see {work / 'gw.log'}")
            time.sleep(1)
        time.sleep(2)
        subprocess.run(probe + ["--count", str(args.warmup)], check=True, stdout=subprocess.DEVNULL)
        out = subprocess.run(probe + ["--count", str(args.count)], check=True, capture_output=True, text=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Only the worker counts anything (the toggled functions run nowhere else).
    totals = []
    for f in work.glob("cg.*"):
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                totals.append(int(line.split()[1]))
                break
    ir = max(totals or [0])
    n = args.count + args.warmup
    print(out.stdout.strip().split(";")[0])
    print(f"worker instructions per TLS connection: {ir / n:,.0f} ({ir:,} over {n} connections)")
    if args.keep:
        print(f"callgrind files in {work}")
    else:
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    sys.exit(main())
