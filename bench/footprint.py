"""The idle server's memory: RSS, PSS and USS of every process of `gw serve`.

    python bench/footprint.py [--workers 2] [--settle 5] [--json] [--mappings N]
                              [--imports] [-- extra gw serve flags]

Starts `gw serve` with the default configuration (every listener on, each on a
free loopback port; the pipeline process with its store; the development
certificates made beforehand, as a restart finds them (--first-start: by gw
serve itself), in a temporary directory; data in a temporary directory), waits until the plain listeners accept (the master opens them all before it forks; a bare connection to a TLS one would be logged as a failed handshake) and the server has been idle
for --settle seconds, then reads /proc/PID/smaps_rollup of the master and of
every process under it (workers, the pipeline, anything they forked) and
prints, per process and summed:

* RSS: resident pages, shared ones counted in full in each process;
* PSS: proportional set size, each resident page divided by the number of
  processes mapping it (the sum over the processes is what the server costs
  the machine);
* USS: the process's private pages (Private_Clean + Private_Dirty), what
  ending it would give back.

PSS divides a file's pages (libpython, libcrypto, libc) among every process
of the machine mapping them, other programs' included, so the measured sum
depends on what else runs; the next line estimates it without them (see
file_pages_alone), and when the frame numbers of /proc/PID/pagemap can be read
(root), the last one gives it exactly: the server's resident pages, each
counted once (see distinct_pages).

--mappings N also prints, per process, the N mappings of /proc/PID/smaps that
weigh most in PSS, grouped by what they map (a shared object, [heap], an
anonymous region, the stats block in /dev/shm); --imports lists the modules
each kind of process has loaded that the others do not (from the
interpreter's own `sys.modules`, read with the `gw.debug` helpers when
present, else skipped). The server is stopped with SIGTERM at the end.

Measures whatever `gw` the repository holds, so the same command compares
two builds (a branch against main).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import free_port, wait_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LISTENERS = ("mqtt", "mqtts", "json", "jsons", "http", "https")
PLAIN_LISTENERS = ("mqtt", "json", "http")
ROLLUP_FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty",
                 "Anonymous", "Pss_Anon", "Pss_File", "Pss_Shmem")


def smaps_rollup(pid: int) -> dict[str, int]:
    """The fields of /proc/PID/smaps_rollup, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def children(pid: int) -> list[int]:
    """Every process under pid (children of every thread, then theirs)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except FileNotFoundError:
            continue
        for child in text.split():
            found.append(int(child))
            found.extend(children(int(child)))
    return found


def role_names(master: int, data_dir: Path) -> dict[int, str]:
    """pid -> "master", "worker N", "pipeline" (from the stats block's header,
    found through the pid file), anything else by its command name."""
    names = {master: "master"}
    try:
        import numpy as np
        raw = np.fromfile(f"/dev/shm/gw-{master}.stats", dtype=np.int64, count=16 + 64)
        nworkers = int(raw[2])
        pipeline = int(raw[7])
        if pipeline:
            names[pipeline] = "pipeline"
        for slot in range(nworkers):
            if raw[16 + slot]:
                names[int(raw[16 + slot])] = f"worker {slot}"
    except (OSError, ValueError, IndexError):
        pass
    return names


def mapping_breakdown(pid: int) -> dict[str, dict[str, int]]:
    """Per mapped object (path, [heap], [stack], anonymous), summed Rss/Pss/private."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    name = "?"
    header = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if header.match(line):
            parts = line.split(None, 5)
            name = parts[5] if len(parts) > 5 else "[anonymous]"
            name = re.sub(r".*/site-packages/", "site-packages/", name)
            name = re.sub(r".*/lib/python3\.\d+/", "stdlib/", name)
            name = re.sub(r"^/dev/shm/gw-\d+\.stats.*", "[stats block]", name)
            continue
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous"):
            groups[name][key] += int(rest.split()[0]) * 1024
    return groups


def file_pages_alone(pids) -> int:
    """About what the file-backed pages (libpython, libcrypto, the extensions...)
    would weigh in the PSS sum if no process outside the server mapped those
    files: per file, the most any one of the processes has resident, less the
    anonymous pages of its mappings (a lower bound of their union). On a machine
    running other Python processes, they take their share of those pages and the
    measured PSS is lower. distinct_pages gives the exact figure, as root."""
    most: dict[str, int] = defaultdict(int)
    for pid in pids:
        try:
            groups = mapping_breakdown(pid)
        except FileNotFoundError:
            continue
        for name, g in groups.items():
            if not name.startswith("[") and name != "[anonymous]" and not name.startswith("/dev/"):
                # Less its anonymous pages (a library's relocated data, copied
                # on write): Pss_Anon counts those already.
                most[name] = max(most[name], g["Rss"] - g["Anonymous"])
    return sum(most.values())


def distinct_pages(pids) -> int | None:
    """The server's resident pages, each counted once however many of its
    processes map it (the physical frames of /proc/PID/pagemap): exactly what the
    PSS sum would be if no other program shared its files. None when the frame
    numbers cannot be read (they need CAP_SYS_ADMIN: the kernel shows 0)."""
    import struct

    frames: set[int] = set()
    seen_nonzero = False
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except (FileNotFoundError, PermissionError):
            continue
        try:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) > 5 and parts[5] == "[vsyscall]":
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                try:
                    data = os.pread(fd, (hi - lo) // 4096 * 8, lo // 4096 * 8)
                except OSError:
                    continue
                for (entry,) in struct.iter_unpack("<Q", data):
                    if entry >> 63:                     # present
                        pfn = entry & ((1 << 55) - 1)
                        seen_nonzero = seen_nonzero or pfn != 0
                        frames.add(pfn)
        finally:
            os.close(fd)
    return len(frames) * 4096 if seen_nonzero else None


def measure(pids: dict[int, str]) -> dict:
    rows = []
    for pid, role in pids.items():
        try:
            r = smaps_rollup(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        rows.append({"pid": pid, "role": role, "rss": r.get("Rss", 0), "pss": r.get("Pss", 0),
                     "uss": r.get("Private_Clean", 0) + r.get("Private_Dirty", 0),
                     "pss_anon": r.get("Pss_Anon", 0), "pss_file": r.get("Pss_File", 0),
                     "pss_shmem": r.get("Pss_Shmem", 0)})
    total = {k: sum(row[k] for row in rows) for k in ("rss", "pss", "uss", "pss_anon", "pss_file", "pss_shmem")}
    alone = file_pages_alone(pids)
    total["pss_alone"] = total["pss_anon"] + total["pss_shmem"] + max(alone, total["pss_file"])
    total["distinct"] = distinct_pages(pids)
    return {"processes": rows, "total": total}


def mib(n: int) -> str:
    return f"{n / 1048576:.1f}"


def print_table(result: dict) -> None:
    head = f"{'process':<12} {'pid':>8} {'RSS MiB':>9} {'PSS MiB':>9} {'USS MiB':>9}   PSS anon/file/shmem MiB"
    print(head)
    print("-" * len(head))
    for row in result["processes"]:
        print(f"{row['role']:<12} {row['pid']:>8} {mib(row['rss']):>9} {mib(row['pss']):>9} {mib(row['uss']):>9}"
              f"   {mib(row['pss_anon'])}/{mib(row['pss_file'])}/{mib(row['pss_shmem'])}")
    t = result["total"]
    print("-" * len(head))
    print(f"{'sum':<12} {'':>8} {mib(t['rss']):>9} {mib(t['pss']):>9} {mib(t['uss']):>9}"
          f"   {mib(t['pss_anon'])}/{mib(t['pss_file'])}/{mib(t['pss_shmem'])}")
    print(f"PSS sum with the file-backed pages counted as if no other process shared them: "
          f"about {mib(t['pss_alone'])} MiB")
    if t.get("distinct") is not None:
        print(f"the server's resident pages, each counted once (/proc/PID/pagemap; what the PSS sum "
              f"is when no other program shares them): {mib(t['distinct'])} MiB")


def print_mappings(pids: dict[int, str], top: int) -> None:
    for pid, role in pids.items():
        try:
            groups = mapping_breakdown(pid)
        except FileNotFoundError:
            continue
        ranked = sorted(groups.items(), key=lambda kv: -kv[1]["Pss"])[:top]
        print(f"\n{role} (pid {pid}): the {top} mappings weighing most in PSS")
        print(f"  {'PSS KiB':>9} {'RSS KiB':>9} {'private KiB':>11}  mapping")
        for name, g in ranked:
            print(f"  {g['Pss'] // 1024:>9} {g['Rss'] // 1024:>9} "
                  f"{(g['Private_Clean'] + g['Private_Dirty']) // 1024:>11}  {name}")


def post_readings(port: int, n: int) -> None:
    """n readings of one device over one HTTP connection (each answered before the next)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for seq in range(n):
            body = json.dumps({"seq": seq, "metrics": {"temp_c": 20.0 + seq % 7}}).encode()
            conn.request("POST", "/v1/ingest/footprint-1", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status not in (200, 202):
                raise RuntimeError(f"ingest answered {resp.status}")
    finally:
        conn.close()


def serve_command(workers: int, tmp: Path, extra: list[str]) -> tuple[list[str], dict[str, int]]:
    ports = {name: free_port() for name in LISTENERS}
    cmd = [sys.executable, "-m", "gw.cli", "serve", "--workers", str(workers),
           "--data-dir", str(tmp / "data"), "--certs", str(tmp / "certs"), "--log-level", "warning"]
    for name, port in ports.items():
        cmd += [f"--{name}", f"127.0.0.1:{port}"]
    return cmd + extra, ports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds the server stays idle once every listener accepts (default 5)")
    ap.add_argument("--json", action="store_true", help="the figures as JSON")
    ap.add_argument("--first-start", action="store_true",
                    help="no certificates made beforehand: gw serve makes its development CA itself")
    ap.add_argument("--mappings", type=int, default=0, metavar="N",
                    help="also the N mappings weighing most in PSS, per process")
    ap.add_argument("--readings", type=int, default=0, metavar="N",
                    help="post N readings over HTTP once it accepts, then idle (default 0: none)")
    ap.add_argument("extra", nargs="*", help="more gw serve flags (after --)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="gw-footprint-") as tmpname:
        tmp = Path(tmpname)
        cmd, ports = serve_command(args.workers, tmp, args.extra)
        # The certificates a restart finds: made before, by another process, so
        # the figures are those of a server's usual start (--first-start: gw
        # makes them itself).
        if not args.first_start:
            subprocess.run([sys.executable, "-c", "import sys; from gw.certs import ensure_certs; "
                            "ensure_certs(sys.argv[1])", str(tmp / "certs")],
                           cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
        server = subprocess.Popen(cmd, cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO)},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            # The plain listeners only: the master opens every listening socket
            # before it forks, so they accept once it has; a bare connection to a
            # TLS listener would be a failed handshake, which a worker logs (its
            # first log line runs logging's code in its own pages: about 0.2 MiB
            # each), and an idle server has seen none.
            for name, port in ports.items():
                if name in PLAIN_LISTENERS:
                    wait_port(port, server, timeout=60)
            if args.readings:
                post_readings(ports["http"], args.readings)
            time.sleep(args.settle)
            if server.poll() is not None:
                raise RuntimeError(f"gw serve exited with {server.returncode}")
            pids = role_names(server.pid, tmp / "data")
            for pid in children(server.pid):
                pids.setdefault(pid, Path(f"/proc/{pid}/comm").read_text().strip())
            result = measure(pids)
            result["command"] = " ".join(["gw serve", *cmd[4:]])
            result["workers"] = args.workers
            result["settle_seconds"] = args.settle
            result["readings"] = args.readings
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                after = f" and {args.readings} readings" if args.readings else ""
                print(f"gw serve --workers {args.workers}, default settings, idle {args.settle:g} s after start{after}")
                print_table(result)
            if args.mappings:
                print_mappings(pids, args.mappings)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                _, err = server.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                _, err = server.communicate()
            if server.returncode not in (0, None) and err:
                sys.stderr.write(err.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
