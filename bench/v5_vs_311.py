"""MQTT 5.0 against MQTT 3.1.1 through the same gw, in the same run.

    python bench/v5_vs_311.py                    # 3 rounds of every scenario
    python bench/v5_vs_311.py --rounds 5 --only fanin-qos1
    python bench/v5_vs_311.py --duration 5 --workers 2
    python bench/v5_vs_311.py --only fanout-qos0-rate --fanout-rate 50000

Starts one `gw serve --workers 2` (plain MQTT on a free loopback port) and
runs compare.py's throughput scenarios against it with `gw bench`, each round
once with `--mqtt-version 3.1.1` and once with `--mqtt-version 5` (which goes
first alternates from round to round, so a busy moment of the shared machine
falls on either). The MQTT 5.0 publishers send with a Topic Alias: the topic
once, then the alias alone (gw announces `topic_alias_maximum`, 64 by
default, in its CONNACK).

Flat out, QoS 0 fan-out sheds: ten subscribers cannot take what one
publisher sends, gw drops QoS 0 copies to the slow ones (counted as gw
bench's "lost"), and the version whose publisher gets more in sheds more, so
its CPU per *delivered* copy carries the copies it routed and dropped. The
row `fanout-qos0-rate` is the same fan-out at a fixed publish rate
(`--fanout-rate`, 50,000 messages/s by default: 500,000 copies/s to
deliver) that both versions deliver whole: its CPU per delivered message
compares the cost of the same work, and its "lost" column shows whether the
rate was low enough (it must be 0 for the row to count).

For each run it prints messages delivered per second, gw's CPU time per
delivered message (user + system of the master, its workers and the pipeline,
from /proc, over the run: the figure a loaded machine moves least) and the
load generator's (user + system of `gw bench` and its client processes, from
their rusage), and per round the ratio v5 / 3.1.1 of each; at the end the
median ratios per scenario.
A throughput ratio of 0.90 or more (v5 at most 10% slower) meets the target;
a CPU ratio of 1.10 or less says the same from gw's side. Raw `gw bench
--json` results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from compare import PY, REPO, RESULTS, SCENARIOS, Gw, pubsub

# The issue's targets: QoS 0 fan-in, QoS 1 fan-in, fan-out (flat out, and at a
# fixed rate without shedding: the row that answers the fan-out target).
DEFAULT = ("fanin-qos0", "fanin-qos1", "fanout-qos0", "fanout-qos0-rate")
RATED = "fanout-qos0-rate"
VERSIONS = ("3.1.1", "5")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and every descendant alive now."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def scenario(name: str, fanout_rate: float):
    if name == RATED:
        return pubsub(RATED, f"QoS 0 fan-out, 1 publisher -> 10 subscribers, {fanout_rate:,.0f} msgs/s",
                      ["--publishers", "1", "--subscribers", "10", "--qos", "0", "--rate", f"{fanout_rate:g}"])
    return SCENARIOS[name]


def children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children (and theirs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_one(gw: Gw, sc, version: str, duration: float, out: Path) -> dict:
    name = sc.name
    args = [a for a in sc.bench_args]
    if "--duration" in args:
        args[args.index("--duration") + 1] = f"{duration:g}"
    cmd = [PY, "-m", "gw.cli", "bench", *args, "--mqtt-version", version,
           "--server", f"127.0.0.1:{gw.port}", "--json", str(out), "--quiet"]
    cpu0 = cpu_seconds(gw.proc.pid)
    bench0 = children_cpu()
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                          timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cpu1 = cpu_seconds(gw.proc.pid)
    bench_cpu = children_cpu() - bench0     # gw bench and its client processes, all waited for
    if not out.exists():
        raise SystemExit(f"v5_vs_311: gw bench ({name}, MQTT {version}) gave no result (exit {done.returncode}):\n"
                         + done.stderr.decode(errors="replace")[-2000:])
    r = json.loads(out.read_text())
    m, d = r["messages"], r["delivery"]
    return {
        "ok": r["ok"], "sent": m["sent"], "received": m["received"], "lost": d["lost"],
        "rejected": m.get("rejected", 0),
        "received_per_s": m["received_per_s"], "sent_per_s": m["sent_per_s"],
        "bytes_per_publish": m["bytes_sent"] / m["sent"] if m["sent"] else 0.0,
        "gw_cpu_s": cpu1 - cpu0,
        "gw_cpu_us_per_msg": 1e6 * (cpu1 - cpu0) / m["received"] if m["received"] else float("nan"),
        "bench_cpu_s": bench_cpu,
        "bench_cpu_us_per_msg": 1e6 * bench_cpu / m["received"] if m["received"] else float("nan"),
        "latency_p50_ms": r.get("latency_ms", {}).get("p50_ms"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append",
                    choices=sorted([n for n, s in SCENARIOS.items() if s.kind == "pubsub"] + [RATED]))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0, help="publishing seconds of each run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fanout-rate", type=float, default=50000.0,
                    help=f"{RATED}: messages/s the publisher sends (x10 copies to deliver)")
    args = ap.parse_args()
    scs = {n: scenario(n, args.fanout_rate) for n in (args.only or DEFAULT)}
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: dict[str, list[dict]] = {n: [] for n in scs}
    with tempfile.TemporaryDirectory(prefix="gw-v5-") as tmp:
        tmp = Path(tmp)
        certs = tmp / "certs"
        certs.mkdir()
        import trustme

        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        (certs / "ca.pem").write_bytes(ca.cert_pem.bytes())
        (certs / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        (certs / "key.pem").write_bytes(leaf.private_key_pem.bytes())
        os.chmod(certs / "key.pem", 0o600)
        work = tmp / "gw"
        work.mkdir()
        with Gw(work, certs, args.workers) as gw:
            for rnd in range(args.rounds):
                for name in scs:
                    order = VERSIONS if rnd % 2 == 0 else VERSIONS[::-1]
                    pair = {}
                    for v in order:
                        out = RESULTS / f"{stamp}-v5vs311-{name}-r{rnd}-{v}.json"
                        pair[v] = run_one(gw, scs[name], v, args.duration, out)
                        s = pair[v]
                        print(f"round {rnd + 1} {name} MQTT {v}: {s['received_per_s']:,.0f} delivered/s, "
                              f"gw {s['gw_cpu_us_per_msg']:.2f} CPU-us/msg, "
                              f"bench {s['bench_cpu_us_per_msg']:.2f} CPU-us/msg, {s['bytes_per_publish']:.1f} B/publish, "
                              f"lost {s['lost']}, rejected {s['rejected']}, ok {s['ok']}", file=sys.stderr, flush=True)
                    pair["ratio"] = pair["5"]["received_per_s"] / pair["3.1.1"]["received_per_s"] \
                        if pair["3.1.1"]["received_per_s"] else float("nan")
                    pair["cpu_ratio"] = pair["5"]["gw_cpu_us_per_msg"] / pair["3.1.1"]["gw_cpu_us_per_msg"]
                    pair["bench_ratio"] = pair["5"]["bench_cpu_us_per_msg"] / pair["3.1.1"]["bench_cpu_us_per_msg"]
                    pair["first"] = order[0]
                    rows[name].append(pair)
    print("\n| scenario | round (first) | 3.1.1 delivered/s | v5 delivered/s | v5 / 3.1.1 | "
          "gw CPU-us/msg 3.1.1 | v5 | v5 / 3.1.1 | bench CPU-us/msg 3.1.1 | v5 | v5 / 3.1.1 | lost 3.1.1 | v5 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, pairs in rows.items():
        what = scs[name].what
        for i, p in enumerate(pairs):
            a, b = p["3.1.1"], p["5"]
            print(f"| {what} | {i + 1} ({p['first']}) | {a['received_per_s']:,.0f} | {b['received_per_s']:,.0f} | "
                  f"{p['ratio']:.3f} | {a['gw_cpu_us_per_msg']:.2f} | {b['gw_cpu_us_per_msg']:.2f} | "
                  f"{p['cpu_ratio']:.3f} | {a['bench_cpu_us_per_msg']:.2f} | {b['bench_cpu_us_per_msg']:.2f} | "
                  f"{p['bench_ratio']:.3f} | {a['lost']:,} | {b['lost']:,} |")
    print("\n| scenario | median v5 / 3.1.1 delivered/s | gw CPU per message | bench CPU per message "
          "| every run ok, none shed |")
    print("|---|---|---|---|---|")
    for name, pairs in rows.items():
        clean = all(p[v]["ok"] and not p[v]["lost"] for p in pairs for v in VERSIONS)
        print(f"| {scs[name].what} | {statistics.median(p['ratio'] for p in pairs):.3f} | "
              f"{statistics.median(p['cpu_ratio'] for p in pairs):.3f} | "
              f"{statistics.median(p['bench_ratio'] for p in pairs):.3f} | {'yes' if clean else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
