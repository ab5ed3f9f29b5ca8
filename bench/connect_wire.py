"""Where a connect's time goes, read off the wire.

    python bench/connect_wire.py                         # gw --workers 2, 10,000 clients over 8 s
    python bench/connect_wire.py --broker mosquitto      # the same for Debian's mosquitto
    python bench/connect_wire.py --workers 1 --clients 200 --rampup 1 --json out.json

Starts the broker as bench/compare.py does (its Gw and Mosquitto classes),
runs `tcpdump -i lo` on the broker's plain MQTT port during a `gw bench` ramp,
and splits every connection that completed its handshake into phases:

    SYN -> SYN-ACK          kernel (listen queue, SYN handling)
    SYN-ACK -> CONNECT      client (the load generator sends CONNECT)
    CONNECT -> CONNACK      server (accept, read, parse, register, answer)
    SYN -> CONNACK          total

With --tls (the broker's MQTT-over-TLS port, TLS 1.3) the handshake's flights
are told apart by their direction:

    SYN -> SYN-ACK                  kernel
    SYN-ACK -> ClientHello          client (connected, builds its ClientHello)
    ClientHello -> server flight    server (the handshake's key exchange and signature)
    server flight -> client Finished  client (verifies the certificate, derives the keys)
    last client bytes -> last server bytes  server (CONNECT -> CONNACK, the ticket)
    SYN -> last server bytes        total

with p50/p90/p99/max of each, and the moments (seconds since the first SYN)
of the server answers slower than --slow-ms (2 ms): the stall finder. Stalls
that line up across connections point at the server; compare with
`perf trace --duration 1 -p <worker pids>` taken over the same run.

tcpdump needs CAP_NET_RAW (root in CI). The capture keeps 96 bytes a packet.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import Gw, Mosquitto, idle, make_certs, run_bench, stop  # noqa: E402

PHASES = (("kernel", "syn", "synack"), ("client", "synack", "connect"),
          ("server", "connect", "connack"), ("total", "syn", "connack"))


def parse_pcap(path: Path, port: int) -> dict[int, dict[str, float]]:
    """Per client port: first SYN, SYN-ACK, first payload in (CONNECT) and out (CONNACK)."""
    d = path.read_bytes()
    if len(d) < 24:
        return {}
    magic = struct.unpack("<I", d[:4])[0]
    if magic not in (0xA1B2C3D4, 0xA1B23C4D):
        raise SystemExit(f"connect_wire: {path} is not a little-endian pcap")
    scale = 1e-6 if magic == 0xA1B2C3D4 else 1e-9
    link = struct.unpack("<I", d[20:24])[0]
    skip = {1: 14, 113: 16, 276: 20, 0: 4}.get(link)
    if skip is None:
        raise SystemExit(f"connect_wire: link type {link} not handled")
    conns: dict[int, dict[str, float]] = {}
    off = 24
    while off + 16 <= len(d):
        s, us, incl, _orig = struct.unpack("<IIII", d[off:off + 16])
        off += 16
        pkt = d[off:off + incl][skip:]
        off += incl
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            continue
        ihl = (pkt[0] & 15) * 4
        tot = struct.unpack(">H", pkt[2:4])[0]
        tcp = pkt[ihl:]
        if len(tcp) < 14:
            continue
        sp, dp = struct.unpack(">HH", tcp[:4])
        doff = (tcp[12] >> 4) * 4
        syn = tcp[13] & 2
        plen = tot - ihl - doff
        t = s + us * scale
        if dp == port:
            c = conns.setdefault(sp, {})
            if syn and "syn" not in c:
                c["syn"] = t
            if plen > 0:
                c.setdefault("connect", t)
                flight(c, "in", t)
        elif sp == port:
            c = conns.setdefault(dp, {})
            if syn and "synack" not in c:
                c["synack"] = t
            if plen > 0:
                c.setdefault("connack", t)
                flight(c, "out", t)
    return conns


def flight(c: dict, way: str, t: float) -> None:
    """Payload segments in one direction with none the other way between
    them are one flight: [direction, first, last]."""
    runs = c.setdefault("runs", [])
    if runs and runs[-1][0] == way:
        runs[-1][2] = t
    else:
        runs.append([way, t, t])


# The bench holds every client 1 s after the ramp: a flight that starts this
# long after the SYN belongs to the DISCONNECT, not to setting up.
SETUP_WINDOW = 0.9


def tls_phases(c: dict) -> dict | None:
    """A TLS connection's flights: ClientHello, the server's flight, the
    client's Finished (with or before its CONNECT), and the server's last
    flight of the set-up (the ticket and the CONNACK). None unless the
    connection got that far."""
    if "syn" not in c or "synack" not in c:
        return None
    runs = [r for r in c.get("runs", []) if r[1] - c["syn"] < SETUP_WINDOW]
    if len(runs) < 4 or [r[0] for r in runs[:3]] != ["in", "out", "in"] or runs[-1][0] != "out":
        return None
    return {"syn": c["syn"], "synack": c["synack"], "hello": runs[0][1], "flight": runs[1][1],
            "finished": runs[2][1], "last_in": runs[-2][1], "done": runs[-1][2]}


TLS_PHASES = (("kernel", "syn", "synack"), ("client", "synack", "hello"),
              ("server-hs", "hello", "flight"), ("client-hs", "flight", "finished"),
              ("server-mqtt", "last_in", "done"), ("total", "syn", "done"))


def pct(v: list[float], p: float) -> float:
    return v[min(len(v) - 1, int(len(v) * p))]


def split(conns: dict, slow_ms: float = 2.0, tls: bool = False) -> dict:
    if tls:
        full = [p for p in map(tls_phases, conns.values()) if p is not None]
        phases = TLS_PHASES
    else:
        full = [c for c in conns.values() if all(k in c for k in ("syn", "synack", "connect", "connack"))]
        phases = PHASES
    out = {"connections": len(conns), "complete": len(full), "phases": {}, "slow_server": []}
    if not full:
        return out
    for name, a, b in phases:
        v = sorted((c[b] - c[a]) * 1000 for c in full)
        out["phases"][name] = {"p50": pct(v, .5), "p90": pct(v, .9), "p99": pct(v, .99), "max": v[-1]}
    if tls:
        # The connections over the total's p99: which phase made them slow.
        cut = out["phases"]["total"]["p99"]
        slow = [c for c in full if (c["done"] - c["syn"]) * 1000 >= cut]
        out["slowest_1pct_mean_ms"] = {name: round(sum(c[b] - c[a] for c in slow) * 1000 / len(slow), 3)
                                       for name, a, b in phases}
        return out
    t0 = min(c["syn"] for c in full)
    out["slow_server"] = sorted((round(c["connect"] - t0, 4), round((c["connack"] - c["connect"]) * 1000, 3))
                                for c in full if (c["connack"] - c["connect"]) * 1000 > slow_ms)
    return out


def report(r: dict, slow_ms: float) -> None:
    print(f"{r['connections']} connections seen, {r['complete']} complete")
    for name, st in r["phases"].items():
        print(f"  {name:7s} p50 {st['p50']:7.3f}  p90 {st['p90']:7.3f}  p99 {st['p99']:7.3f}  max {st['max']:8.3f} ms")
    if "slowest_1pct_mean_ms" in r:
        print("the slowest 1 % (total at or over its p99), mean per phase: "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["slowest_1pct_mean_ms"].items()) + " ms")
        return
    slow = r["slow_server"]
    print(f"server answers over {slow_ms:g} ms: {len(slow)}")
    if slow:
        print("  " + " ".join(f"{t:.3f}s:{ms:.1f}" for t, ms in slow[:200]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", choices=("gw", "mosquitto"), default="gw")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--rampup", type=float, default=8.0)
    ap.add_argument("--slow-ms", type=float, default=2.0)
    ap.add_argument("--tls", action="store_true", help="the MQTT-over-TLS port, its handshake split by flights")
    ap.add_argument("--pcap", type=Path, help="keep the capture here")
    ap.add_argument("--json", type=Path, help="write the split as JSON here")
    args = ap.parse_args()
    if not shutil.which("tcpdump"):
        print("connect_wire: tcpdump is not installed (apt-get install tcpdump)", file=sys.stderr)
        return 2
    if args.broker == "mosquitto" and not shutil.which("mosquitto"):
        print("connect_wire: mosquitto is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gw-wire-") as tmp:
        tmp = Path(tmp)
        certs = make_certs(tmp / "certs")
        sc = idle(args.clients, args.rampup, tls=args.tls)
        sc.bench_args[sc.bench_args.index("--duration") + 1] = "1"
        work = tmp / args.broker
        work.mkdir()
        broker = Gw(work, certs, args.workers) if args.broker == "gw" else Mosquitto(work, certs, sc.mosquitto)
        pcap = args.pcap or tmp / "cap.pcap"
        with broker:
            port = broker.tls_port if args.tls else broker.port
            td = subprocess.Popen(["tcpdump", "-i", "lo", "-s", "96", "-B", "65536", "-U", "-w", str(pcap),
                                   f"tcp port {port}"], stdout=subprocess.DEVNULL,
                                  stderr=open(tmp / "tcpdump.log", "wb"), stdin=subprocess.DEVNULL)
            # Capturing once tcpdump says so (a fixed pause missed the first SYNs on a loaded machine).
            deadline = time.monotonic() + 30
            while b"listening on" not in (tmp / "tcpdump.log").read_bytes():
                if td.poll() is not None or time.monotonic() > deadline:
                    stop(td)
                    raise SystemExit("connect_wire: tcpdump did not start capturing:\n"
                                     + (tmp / "tcpdump.log").read_text(errors="replace"))
                time.sleep(0.05)
            try:
                bench = run_bench(broker, sc, tmp / "bench.json")
            finally:
                stop(td)
        r = split(parse_pcap(pcap, port), args.slow_ms, args.tls)
        r["port"] = port
        r["bench_connect_ms"] = bench.get("connect_ms")
    print(f"{args.broker}{f' --workers {args.workers}' if args.broker == 'gw' else ''}: "
          f"{args.clients} {'TLS ' if args.tls else ''}clients over {args.rampup:g} s, "
          f"gw bench's connect p99 {r['bench_connect_ms']}")
    report(r, args.slow_ms)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
