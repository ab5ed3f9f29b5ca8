"""gw against Mosquitto, same machine, same load generator, same run.

    python bench/compare.py                      # every scenario
    python bench/compare.py --only idle-10k-tls  # one row
    python bench/compare.py --only idle-10k-plain-8s   # 10,000 plain connects over 8 s
    python bench/compare.py --list
    python bench/compare.py --peer emqx=127.0.0.1:1884:4242   # a third broker, already running
    python bench/compare.py --mqtt-version 5     # MQTT 5.0 clients (Topic Aliases on)

Starts Debian's `mosquitto` and `gw serve --workers 2` on free loopback ports
(each with its own temporary directory and a trustme ECDSA P-256 certificate),
runs `gw bench` against each broker in turn (alternating which goes first),
stops both by pid, and prints the BENCHMARKS.md table. Raw `gw bench --json`
results go to bench/results/ (ignored by git).

`--peer NAME=HOST:PORT[:PID]` (repeatable) adds a broker the user runs
already: it gets the same `gw bench` load, in the same run, on its plain MQTT
port (the TLS and JSON-lines scenarios skip it: its certificates and protocols
are not ours to know), and gets a row of its own in every table. Its memory
(RSS per connection) is measured only when its PID is given, as the sum over
that process and its children; without it the cell reads "-". compare.py never
starts, configures or stops a peer.

`--mqtt-version 5` runs every MQTT scenario with MQTT 5.0 clients (`gw bench
--mqtt-version 5`: publishers with a Topic Alias, where the broker announces
a Topic Alias Maximum: gw 64, Mosquitto 10); the JSON-lines ones are as they
are. bench/v5_vs_311.py holds the two versions against each other through
the same gw.

Mosquitto is configured at its best for each figure: its defaults for
throughput; `set_tcp_nodelay true` where latency is measured (connect times);
`max_queued_messages 0` for lossless QoS 1, with gw's in-flight window to a
subscriber (`max_inflight_messages 128`, gw's `max_inflight`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchutil import free_port, wait_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
PY = sys.executable


@dataclass
class Scenario:
    name: str
    what: str
    bench_args: list[str]
    tls: bool = False
    mosquitto: dict = field(default_factory=dict)   # extra mosquitto.conf lines
    kind: str = "connections"        # or "pubsub"


def idle(n: int, rampup: float, tls: bool, suffix: str = "") -> Scenario:
    tag = f"{n // 1000}k" if n >= 1000 else str(n)
    return Scenario(
        name=f"idle-{tag}-{'tls' if tls else 'plain'}{suffix}",
        what=f"{n:,} idle {'TLS' if tls else 'plain'} connections over {rampup:g} s",
        bench_args=["--clients", str(n), "--rampup", str(rampup), "--duration", "5", "--keepalive", "60"],
        tls=tls,
        mosquitto={"set_tcp_nodelay": "true"},
    )


def pubsub(name: str, what: str, args: list[str], mosquitto: dict | None = None) -> Scenario:
    return Scenario(name=name, what=what, kind="pubsub",
                    bench_args=["pubsub", "--size", "64", "--duration", "10", *args],
                    mosquitto=mosquitto or {})


def jsonlines_tls(n: int) -> Scenario:
    # Persistent JSON-lines clients over TLS, 10 s heartbeats, a few Data
    # messages each. The protocol is gw's own, so gw only.
    return Scenario(name=f"jsonlines-tls-{n}", what=f"{n:,} persistent JSON-lines-over-TLS clients",
                    kind="jsonlines", bench_args=["--protocol", "json", "--clients", str(n), "--rampup", "5",
                                             "--duration", "20", "--keepalive", "10", "--messages", "5"],
                    tls=True)


SCENARIOS = {s.name: s for s in (
    jsonlines_tls(100), jsonlines_tls(500), jsonlines_tls(1000), jsonlines_tls(2500),
    idle(1000, 2, False), idle(1000, 2, True),
    idle(10000, 15, False), idle(10000, 15, True),
    # The connect-latency target's own ramp: 10,000 over 8 s (1,250 CONNECTs/s).
    idle(10000, 8, False, "-8s"),
    pubsub("fanin-qos0", "QoS 0 fan-in, 4 publishers -> 1 subscriber, flat out",
           ["--publishers", "4", "--subscribers", "1", "--qos", "0"]),
    pubsub("fanin-qos1", "QoS 1 fan-in, 4 -> 1, in-flight 32, flat out",
           ["--publishers", "4", "--subscribers", "1", "--qos", "1", "--inflight", "32"],
           # Mosquitto gets gw's in-flight window to a subscriber (max_inflight, 128).
           {"max_queued_messages": "0", "max_inflight_messages": "128"}),
    pubsub("fanout-qos0", "QoS 0 fan-out, 1 publisher -> 10 subscribers, flat out",
           ["--publishers", "1", "--subscribers", "10", "--qos", "0"]),
    pubsub("latency-20k", "QoS 0, 1 -> 1 at a fixed 20,000 msgs/s",
           ["--publishers", "1", "--subscribers", "1", "--qos", "0", "--rate", "20000"],
           {"set_tcp_nodelay": "true"}),
)}


def make_certs(certs: Path) -> Path:
    """A trustme CA and a leaf for localhost, 127.0.0.1 and ::1 in certs/ (ca.pem,
    cert.pem with its chain, key.pem 0600), as both brokers are given."""
    import trustme

    certs.mkdir()
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
    (certs / "ca.pem").write_bytes(ca.cert_pem.bytes())
    (certs / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (certs / "key.pem").write_bytes(leaf.private_key_pem.bytes())
    os.chmod(certs / "key.pem", 0o600)
    return certs


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Broker:
    name = ""

    def __init__(self, workdir: Path, certs: Path):
        self.dir = workdir
        self.certs = certs
        self.port = free_port()
        self.tls_port = free_port()
        self.json_tls_port = free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.start()
        wait_port(self.port, self.proc)
        wait_port(self.tls_port, self.proc)
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        stop(self.proc)


class Gw(Broker):
    name = "gw"

    def __init__(self, workdir, certs, workers: int = 2):
        super().__init__(workdir, certs)
        self.workers = workers

    def start(self, **_):
        self.proc = subprocess.Popen(
            [PY, "-m", "gw.cli", "serve", "--workers", str(self.workers),
             "--mqtt", f"127.0.0.1:{self.port}", "--mqtts", f"127.0.0.1:{self.tls_port}",
             "--json", "off", "--jsons", f"127.0.0.1:{self.json_tls_port}", "--http", "off", "--https", "off", "--ws", "off", "--wss", "off",
             "--certs", str(self.certs),
             "--data-dir", str(self.dir / "data"), "--stats-interval", "0", "--log-level", "warning"],
            cwd=self.dir, stdout=open(self.dir / "gw.log", "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})


class Peer:
    """A broker the user runs (--peer NAME=HOST:PORT[:PID]): nothing to start or stop."""

    def __init__(self, name: str, host: str, port: int, pid: int | None):
        self.name, self.host, self.port, self.pid = name, host, port, pid

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def parse_peer(spec: str) -> Peer:
    """NAME=HOST:PORT[:PID] (an IPv6 host in brackets: [::1]:1883)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or name in ("gw", "mosquitto") or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"--peer {spec!r}: want NAME=HOST:PORT[:PID], NAME letters, digits, - or _ "
                                         "and not gw or mosquitto")
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        parts = tail[1:].split(":") if tail.startswith(":") else []
    else:
        host, *parts = rest.split(":")
    try:
        if not host or len(parts) not in (1, 2):
            raise ValueError
        port = int(parts[0])
        pid = int(parts[1]) if len(parts) == 2 else None
        if not 0 < port < 65536 or (pid is not None and pid <= 0):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--peer {spec!r}: want NAME=HOST:PORT[:PID]") from None
    return Peer(name, host, port, pid)


class Mosquitto(Broker):
    name = "mosquitto"

    def __init__(self, workdir, certs, extra: dict):
        super().__init__(workdir, certs)
        self.extra = extra

    def start(self):
        conf = self.dir / "mosquitto.conf"
        lines = [
            "user root",                      # reads our 0600 key; we run it as ourselves
            "persistence false",
            "log_dest none",
            "max_connections -1",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"listener {self.tls_port} 127.0.0.1",
            "allow_anonymous true",
            f"cafile {self.certs / 'ca.pem'}",
            f"certfile {self.certs / 'cert.pem'}",
            f"keyfile {self.certs / 'key.pem'}",
        ]
        # Options that are per-listener in Mosquitto go after each listener line.
        general = [f"{k} {v}" for k, v in self.extra.items()]
        conf.write_text("\n".join(general + lines) + "\n")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], cwd=self.dir,
                                     stdout=open(self.dir / "mosquitto.log", "ab"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def run_bench(broker: Broker | Peer, sc: Scenario, out: Path, mqtt_version: str = "3.1.1") -> dict:
    if isinstance(broker, Peer):
        host, port, pid = broker.host, broker.port, broker.pid
    else:
        host, pid = "127.0.0.1", broker.proc.pid
        port = broker.json_tls_port if sc.kind == "jsonlines" else broker.tls_port if sc.tls else broker.port
    server = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cmd = [PY, "-m", "gw.cli", "bench", *sc.bench_args, "--server", server,
           "--json", str(out), "--quiet"]
    if sc.kind != "pubsub" and pid is not None:
        cmd += ["--server-pid", str(pid)]
    if sc.tls:
        cmd += ["--tls", "--cafile", str(broker.certs / "ca.pem")]
    if sc.kind != "jsonlines":
        cmd += ["--mqtt-version", mqtt_version]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                          timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if not out.exists():
        raise SystemExit(f"compare: gw bench against {broker.name} gave no result (exit {done.returncode}):\n"
                         + done.stderr.decode(errors="replace")[-2000:])
    return json.loads(out.read_text())


def _ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def summarize(r: dict) -> dict:
    server = r.get("server", {})
    if r.get("scenario") == "pubsub":
        m, d, lat = r["messages"], r["delivery"], r.get("latency_ms", {})
        return {
            "sent_per_s": f"{m['sent_per_s']:,.0f}",
            "received_per_s": f"{m['received_per_s']:,.0f}",
            "lost": f"{d['lost']:,} ({d['loss_pct']:g}%)",
            "latency_p50": _ms(lat.get("p50_ms")),
            "latency_p99": _ms(lat.get("p99_ms")),
        }
    return {
        "success": f"{r['connected']:,}/{r['clients']:,} ({r['success_rate_pct']:g}%)",
        "sent": f"{r.get('messages', {}).get('sent', 0):,}",
        "rss_mb": f"{server['rss_full'] / 1e6:.1f}" if "rss_full" in server else "-",
        "connect_p50": _ms(r["connect_ms"].get("p50_ms")),
        "connect_p99": _ms(r["connect_ms"].get("p99_ms")),
        "rss_per_conn_kib": round(server["rss_per_connection"] / 1024, 2) if "rss_per_connection" in server else "-",
    }


def each_result(rows: list, kind: str):
    """(scenario, gw's summary) of the scenarios of a kind that run gw alone."""
    return [(sc, results["gw"]) for sc, results in rows if sc.kind == kind]


def each_broker_result(rows: list, kind: str, brokers: list[str]):
    """(scenario, broker, its summary) of the scenarios of a kind, in the order of
    `brokers` (gw, Mosquitto, the peers), each broker that ran the scenario."""
    return [(sc, which, results[which]) for sc, results in rows if sc.kind == kind
            for which in brokers if which in results]


def print_table(heads: list[str], lines: list[list]) -> None:
    """A Markdown table, unless it has no lines."""
    if not lines:
        return
    print("\n| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for cells in lines:
        print("| " + " | ".join(str(c) for c in cells) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--peer", action="append", type=parse_peer, default=[], metavar="NAME=HOST:PORT[:PID]",
                    help="another broker, already running, to hold gw against (plain MQTT scenarios; "
                         "its RSS only with PID)")
    ap.add_argument("--mqtt-version", choices=["3.1.1", "5"], default="3.1.1",
                    help="the MQTT clients' version (gw bench --mqtt-version)")
    args = ap.parse_args()
    if len({p.name for p in args.peer}) != len(args.peer):
        ap.error("--peer: each peer needs a name of its own")
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:20} {s.what}")
        return 0
    if not shutil.which("mosquitto"):
        print("compare: Debian's mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gw-compare-") as tmp:
        tmp = Path(tmp)
        certs = make_certs(tmp / "certs")
        for i, name in enumerate(args.only or SCENARIOS):
            sc = SCENARIOS[name]
            order = ["gw", "mosquitto"] if i % 2 == 0 else ["mosquitto", "gw"]
            if sc.kind == "jsonlines":
                order = ["gw"]
            elif not sc.tls:
                order += [p.name for p in args.peer]
            peers = {p.name: p for p in args.peer}
            results = {}
            for which in order:
                work = tmp / f"{name}-{which}"
                work.mkdir()
                broker = (Gw(work, certs, args.workers) if which == "gw"
                          else peers[which] if which in peers
                          else Mosquitto(work, certs, sc.mosquitto))
                with broker:
                    tag = "-v5" if args.mqtt_version == "5" and sc.kind != "jsonlines" else ""
                    r = run_bench(broker, sc, RESULTS / f"{stamp}-{name}-{which}{tag}.json", args.mqtt_version)
                results[which] = summarize(r)
                print(f"{name} {which}: {results[which]}", file=sys.stderr, flush=True)
            rows.append((sc, results))
    brokers = ["gw", "mosquitto", *(p.name for p in args.peer)]
    print_table(["clients", "connected", "success rate", "Data messages sent", "connect p99 (ms)", "gw RSS (MB)"],
                [[sc.what, s["success"], s["success"].split("(")[1].rstrip(")"), s["sent"], s["connect_p99"],
                  s["rss_mb"]] for sc, s in each_result(rows, "jsonlines")])
    print_table(["scenario", "broker", "connected", "connect p50 (ms)", "connect p99 (ms)", "RSS per connection (KiB)"],
                [[sc.what, which, s["success"], s["connect_p50"], s["connect_p99"], s["rss_per_conn_kib"]]
                 for sc, which, s in each_broker_result(rows, "connections", brokers)])
    print_table(["scenario", "broker", "sent/s", "delivered/s", "lost", "latency p50 (ms)", "latency p99 (ms)"],
                [[sc.what, which, s["sent_per_s"], s["received_per_s"], s["lost"], s["latency_p50"], s["latency_p99"]]
                 for sc, which, s in each_broker_result(rows, "pubsub", brokers)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
