"""MQTT 5.0 against MQTT 3.1.1 through the same gw, in the same run.

    python bench/v5_vs_311.py                    # 3 rounds of every scenario
    python bench/v5_vs_311.py --rounds 5 --only fanin-qos1
    python bench/v5_vs_311.py --duration 5 --workers 2

Starts one `gw serve --workers 2` (plain MQTT on a free loopback port) and
runs compare.py's throughput scenarios against it with `gw bench`, each round
once with `--mqtt-version 3.1.1` and once with `--mqtt-version 5` (which goes
first alternates from round to round, so a busy moment of the shared machine
falls on either). The MQTT 5.0 publishers send with a Topic Alias: the topic
once, then the alias alone (gw announces `topic_alias_maximum`, 64 by
default, in its CONNACK).

For each run it prints messages delivered per second and gw's CPU time per
delivered message (user + system of the master, its workers and the pipeline,
from /proc, over the run: the figure a loaded machine moves least), and per
round the ratio v5 / 3.1.1 of both; at the end the median ratio per scenario.
A throughput ratio of 0.90 or more (v5 at most 10% slower) meets the target;
a CPU ratio of 1.10 or less says the same from gw's side. Raw `gw bench
--json` results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from compare import PY, REPO, RESULTS, SCENARIOS, Gw

# The issue's targets: QoS 0 fan-in, QoS 1 fan-in, fan-out.
DEFAULT = ("fanin-qos0", "fanin-qos1", "fanout-qos0")
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


def run_one(gw: Gw, name: str, version: str, duration: float, out: Path) -> dict:
    sc = SCENARIOS[name]
    args = [a for a in sc.bench_args]
    if "--duration" in args:
        args[args.index("--duration") + 1] = f"{duration:g}"
    cmd = [PY, "-m", "gw.cli", "bench", *args, "--mqtt-version", version,
           "--server", f"127.0.0.1:{gw.port}", "--json", str(out), "--quiet"]
    cpu0 = cpu_seconds(gw.proc.pid)
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                          timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cpu1 = cpu_seconds(gw.proc.pid)
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
        "latency_p50_ms": r.get("latency_ms", {}).get("p50_ms"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(n for n, s in SCENARIOS.items() if s.kind == "pubsub"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0, help="publishing seconds of each run")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    names = args.only or list(DEFAULT)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: dict[str, list[dict]] = {n: [] for n in names}
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
                for name in names:
                    order = VERSIONS if rnd % 2 == 0 else VERSIONS[::-1]
                    pair = {}
                    for v in order:
                        out = RESULTS / f"{stamp}-v5vs311-{name}-r{rnd}-{v}.json"
                        pair[v] = run_one(gw, name, v, args.duration, out)
                        s = pair[v]
                        print(f"round {rnd + 1} {name} MQTT {v}: {s['received_per_s']:,.0f} delivered/s, "
                              f"gw {s['gw_cpu_us_per_msg']:.2f} CPU-us/msg, {s['bytes_per_publish']:.1f} B/publish, "
                              f"lost {s['lost']}, rejected {s['rejected']}, ok {s['ok']}", file=sys.stderr, flush=True)
                    pair["ratio"] = pair["5"]["received_per_s"] / pair["3.1.1"]["received_per_s"] \
                        if pair["3.1.1"]["received_per_s"] else float("nan")
                    pair["cpu_ratio"] = pair["5"]["gw_cpu_us_per_msg"] / pair["3.1.1"]["gw_cpu_us_per_msg"]
                    pair["first"] = order[0]
                    rows[name].append(pair)
    print("\n| scenario | round (first) | 3.1.1 delivered/s | v5 delivered/s | v5 / 3.1.1 | "
          "gw CPU-us/msg 3.1.1 | v5 | v5 / 3.1.1 | B/publish 3.1.1 | v5 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, pairs in rows.items():
        what = SCENARIOS[name].what
        for i, p in enumerate(pairs):
            a, b = p["3.1.1"], p["5"]
            print(f"| {what} | {i + 1} ({p['first']}) | {a['received_per_s']:,.0f} | {b['received_per_s']:,.0f} | "
                  f"{p['ratio']:.3f} | {a['gw_cpu_us_per_msg']:.2f} | {b['gw_cpu_us_per_msg']:.2f} | "
                  f"{p['cpu_ratio']:.3f} | {a['bytes_per_publish']:.1f} | {b['bytes_per_publish']:.1f} |")
    print("\n| scenario | median v5 / 3.1.1 delivered/s | median v5 / 3.1.1 gw CPU per message | every run ok |")
    print("|---|---|---|---|")
    for name, pairs in rows.items():
        clean = all(p[v]["ok"] for p in pairs for v in VERSIONS)
        print(f"| {SCENARIOS[name].what} | {statistics.median(p['ratio'] for p in pairs):.3f} | "
              f"{statistics.median(p['cpu_ratio'] for p in pairs):.3f} | {'yes' if clean else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
