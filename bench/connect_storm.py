"""Connection set-up: connect p50/p99 of a ramp, and a reconnect storm after a restart.

    python bench/connect_storm.py                          # gw, 10,000 ramped over 8 s, then the storm
    python bench/connect_storm.py --base /path/to/gw-checkout --mosquitto --runs 3
    python bench/connect_storm.py --clients 50000 --rampup 20 --workers 3 --no-storm

Ramp: `gw bench --clients N --rampup R` (the load generator of gwbench/, as
bench/compare.py runs it) against `gw serve --workers W`; its connect p50/p99
(from the client's TCP connect to its CONNACK).

Storm: N clean-session MQTT 3.1.1 clients connect (as fast as they are
answered, at most 1,000 handshakes in flight), the broker is restarted (SIGTERM,
which closes every connection, then started again on the same port), and once
it listens every client reconnects at once, with the same client id: the
connects are issued back to back (a few hundred per step of the generator's
loop, whose time between steps goes to the answers). Each client's time is
from its own connect() to its CONNACK; a client not answered within
--timeout seconds (TCP retries included: a full listen backlog drops SYNs,
retried after 1 s, 3 s, 7 s) counts as failed. Reported: success rate, p50,
p99, max, and the time until the last CONNACK.

With --base, the same is run against a second gw checkout (its own built
.venv) in the same run, the two alternating which goes first; --mosquitto adds
Debian's mosquitto (set_tcp_nodelay true, as in bench/compare.py); --vs-flags
a second gw of this checkout started with other settings (an A/B of one
setting). Each run's
figures are printed, one line per broker and run, then the JSON of all.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import free_port, wait_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable


def connect_packet(cid: bytes, keepalive: int = 60) -> bytes:
    body = struct.pack("!H", 4) + b"MQTT" + bytes((4, 0x02)) + struct.pack("!H", keepalive)
    body += struct.pack("!H", len(cid)) + cid
    return b"\x10" + bytes((len(body),)) + body       # < 128 bytes


CONNACK_OK = b"\x20\x02\x00\x00"


class Storm:
    """N clients on one epoll: connect them, see them dropped, reconnect them at once."""

    def __init__(self, port: int, n: int, prefix: str):
        self.addr = ("127.0.0.1", port)
        self.ids = [f"{prefix}{i}".encode() for i in range(n)]
        self.ep = select.epoll()
        self.socks: dict[int, list] = {}      # fd -> [index, socket, t0, state, inbuf]

    def _open(self, i: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        rc = s.connect_ex(self.addr)
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            self.failed[i] = errno.errorcode.get(rc, str(rc))
            return
        self.socks[s.fileno()] = [i, s, t0, 0, b""]
        self.ep.register(s.fileno(), select.EPOLLOUT)

    def _close(self, fd: int) -> None:
        ent = self.socks.pop(fd)
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        ent[1].close()

    def _step(self, timeout: float) -> None:
        for fd, ev in self.ep.poll(timeout, 4096):
            now = time.monotonic()
            ent = self.socks.get(fd)
            if ent is None:
                continue
            i, s = ent[0], ent[1]
            if ent[3] == 0:                 # TCP connect done (or failed)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.failed[i] = errno.errorcode.get(err, str(err))
                    self._close(fd)
                    continue
                try:
                    s.send(connect_packet(self.ids[i]))
                except OSError as e:
                    self.failed[i] = errno.errorcode.get(e.errno, str(e))
                    self._close(fd)
                    continue
                ent[3] = 1
                self.ep.modify(fd, select.EPOLLIN)
            elif ent[3] == 1:               # waiting for CONNACK
                try:
                    data = s.recv(64)
                except BlockingIOError:
                    continue
                except OSError as e:
                    self.failed[i] = errno.errorcode.get(e.errno, str(e))
                    self._close(fd)
                    continue
                ent[4] += data
                if not data:
                    self.failed[i] = "closed"
                    self._close(fd)
                elif len(ent[4]) >= 4:
                    if ent[4][:4] != CONNACK_OK:
                        self.failed[i] = "refused"
                        self._close(fd)
                        continue
                    self.times[i] = now - ent[2]
                    self.done_at = now
                    ent[3] = 2
                    self.live += 1
            else:                           # connected: the broker's close
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.live -= 1
                    self._close(fd)

    def connect_all(self, in_flight: int, timeout: float, burst: int = 0) -> dict:
        """Connects every client: with burst, `burst` connects per loop step
        (all at once, as fast as issued); else at most in_flight at a time."""
        n = len(self.ids)
        self.times: list = [None] * n
        self.failed: dict = {}
        self.live = 0
        self.done_at = None
        start = time.monotonic()
        deadline = start + timeout
        i = 0
        while time.monotonic() < deadline:
            if burst:
                stop = min(n, i + burst)
            else:
                stop = min(n, i + max(0, in_flight - (len(self.socks) - self.live)))
            while i < stop:
                self._open(i)
                i += 1
            if i >= n and self.live + len(self.failed) >= n:
                break
            self._step(0 if i < n and burst else 0.005)
        for fd, ent in list(self.socks.items()):
            if ent[3] != 2:
                self.failed.setdefault(ent[0], "timeout")
                self._close(fd)
        lat = sorted(t for t in self.times if t is not None)

        def pct(p):
            return round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1000, 2) if lat else None
        kinds: dict = {}
        for k in self.failed.values():
            kinds[k] = kinds.get(k, 0) + 1
        return {"clients": n, "connected": len(lat), "success_pct": round(100.0 * len(lat) / n, 3),
                "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": round(lat[-1] * 1000, 2) if lat else None,
                "last_connack_s": round(self.done_at - start, 3) if self.done_at else None, "failed": kinds}

    def wait_dropped(self, timeout: float) -> int:
        """Waits for the broker to close every connection; how many it closed."""
        deadline = time.monotonic() + timeout
        before = self.live
        while self.live and time.monotonic() < deadline:
            self._step(0.05)
        return before - self.live

    def close_all(self) -> None:
        for fd in list(self.socks):
            self._close(fd)


class Broker:
    def __init__(self, name: str, workdir: Path, port: int):
        self.name, self.dir, self.port = name, workdir, port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = self.spawn()
        wait_port(self.port, self.proc)

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Gw(Broker):
    def __init__(self, name, workdir, port, repo: Path, workers: int, extra: list[str]):
        super().__init__(name, workdir, port)
        self.repo, self.workers, self.extra = repo, workers, extra
        py = repo / ".venv" / "bin" / "python"
        self.py = str(py) if py.exists() else PY

    def spawn(self):
        return subprocess.Popen(
            [self.py, "-m", "gw.cli", "serve", "--workers", str(self.workers), "--mqtt", f"127.0.0.1:{self.port}",
             "--mqtts", "off", "--json", "off", "--jsons", "off", "--http", "off", "--https", "off", "--ws", "off",
             "--wss", "off", "--data-dir", str(self.dir / "data"), "--stats-interval", "0",
             "--log-level", "warning", *self.extra],
            cwd=self.dir, stdout=open(self.dir / "gw.log", "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(self.repo)})


class Mosquitto(Broker):
    def spawn(self):
        conf = self.dir / "mosquitto.conf"
        conf.write_text("set_tcp_nodelay true\npersistence false\nlog_dest none\nmax_connections -1\n"
                        f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        return subprocess.Popen(["mosquitto", "-c", str(conf)], cwd=self.dir,
                                stdout=open(self.dir / "mosquitto.log", "ab"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def ramp(broker: Broker, args, out: Path) -> dict:
    cmd = [PY, "-m", "gw.cli", "bench", "--clients", str(args.clients), "--rampup", str(args.rampup),
           "--duration", "3", "--keepalive", "60", "--server", f"127.0.0.1:{broker.port}",
           "--server-pid", str(broker.proc.pid), "--json", str(out), "--quiet"]
    if args.procs:
        cmd += ["--procs", str(args.procs)]
    if args.source_ips:
        cmd += ["--source-ips", args.source_ips]
    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                   timeout=900, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = json.loads(out.read_text())
    return {"clients": r["clients"], "connected": r["connected"], "success_pct": r["success_rate_pct"],
            "p50_ms": r["connect_ms"].get("p50_ms"), "p99_ms": r["connect_ms"].get("p99_ms"),
            "max_ms": r["connect_ms"].get("max_ms"), "failed": r.get("errors", {})}


def storm(broker: Broker, args) -> dict:
    st = Storm(broker.port, args.clients, f"storm-{os.getpid()}-")
    first = st.connect_all(1000, args.timeout)
    broker.stop()
    dropped = st.wait_dropped(10)
    st.close_all()
    broker.start()
    again = st.connect_all(0, args.timeout, burst=args.burst)
    st.close_all()
    return {"first_connect": first, "dropped_by_restart": dropped, **again}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--rampup", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--base", type=Path, help="a second gw checkout (with its .venv) run in the same run")
    ap.add_argument("--vs-flags", help="a second gw of this checkout with these extra serve flags, in the same "
                                       "run, e.g. '--connect-at-once false'")
    ap.add_argument("--mosquitto", action="store_true")
    ap.add_argument("--no-ramp", action="store_true")
    ap.add_argument("--no-storm", action="store_true")
    ap.add_argument("--procs", type=int, help="load generator processes of the ramp (gw bench --procs)")
    ap.add_argument("--source-ips", help="gw bench --source-ips (past ~28,000 clients)")
    ap.add_argument("--burst", type=int, default=256, help="storm: connects issued per loop step")
    ap.add_argument("--timeout", type=float, default=30.0, help="storm: seconds a client has for its CONNACK")
    args = ap.parse_args()
    brokers = [("gw", REPO, [])] + ([("gw-base", args.base, [])] if args.base else [])
    if args.vs_flags:
        brokers.append(("gw-vs", REPO, args.vs_flags.split()))
    if args.mosquitto and shutil.which("mosquitto"):
        brokers.append(("mosquitto", None, []))
    results = []
    with tempfile.TemporaryDirectory(prefix="gw-storm-") as tmp:
        tmp = Path(tmp)
        for run in range(args.runs):
            order = brokers if run % 2 == 0 else brokers[::-1]
            for name, repo, extra in order:
                for what in (["ramp"] if not args.no_ramp else []) + (["storm"] if not args.no_storm else []):
                    work = tmp / f"{run}-{name}-{what}"
                    work.mkdir()
                    port = free_port()
                    b = (Gw(name, work, port, repo, args.workers, extra) if repo is not None
                         else Mosquitto(name, work, port))
                    b.start()
                    time.sleep(0.5)
                    try:
                        r = ramp(b, args, work / "bench.json") if what == "ramp" else storm(b, args)
                    finally:
                        b.stop()
                    row = {"run": run, "broker": name, "what": what, **r}
                    results.append(row)
                    print(f"run {run} {name:9} {what:5} {r['connected']}/{r['clients']} "
                          f"({r['success_pct']}%) p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms max {r['max_ms']} ms"
                          + (f" last CONNACK {r['last_connack_s']} s" if what == "storm" else "")
                          + f" failed {r['failed']}",
                          flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
