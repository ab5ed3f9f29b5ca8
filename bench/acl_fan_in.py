"""What an ACL of 1,000 rules costs the broker: QoS 0 and QoS 1 fan-in (as
bench/compare.py runs them: 4 publishers -> 1 subscriber, flat out) against
`gw serve --workers 2` with `--acl-file` and without, same run, alternating
which goes first, and the ratio of messages received per second.

    python bench/acl_fan_in.py                  # 2 rounds of each
    python bench/acl_fan_in.py --rounds 3 --duration 10 --only fanin-qos1

The clients connect as user `bench`, whose section holds 999 rules that do
not match the benchmark's topics, then the one that does (a linear scan's
worst case), plus one pattern line. Not a pass/fail test: it prints the
figures and the ratios (ACL / no ACL); BENCHMARKS.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import PY, REPO, RESULTS, Gw  # noqa: E402

PREFIX = "bench/acl"
USER = "bench"


def acl_text(rules: int = 1000) -> str:
    lines = ["# bench/acl_fan_in.py: 1,000 rules; the one the benchmark's topics need comes last.",
             f"user {USER}"]
    lines += [f"topic readwrite filler/{i}/+/data" for i in range(rules - 2)]
    lines += ["topic deny filler/secret/#", f"topic readwrite {PREFIX}/#",
              "pattern readwrite devices/%c/#"]
    return "\n".join(lines) + "\n"


class GwWithArgs(Gw):
    def __init__(self, workdir, certs, workers: int, extra: list[str]):
        super().__init__(workdir, certs, workers)
        self.extra = extra

    def start(self, **_):
        self.proc = subprocess.Popen(
            [PY, "-m", "gw.cli", "serve", "--workers", str(self.workers),
             "--mqtt", f"127.0.0.1:{self.port}", "--mqtts", f"127.0.0.1:{self.tls_port}",
             "--json", "off", "--jsons", "off", "--http", "off", "--https", "off", "--ws", "off", "--wss", "off",
             "--certs", str(self.certs), "--data-dir", str(self.dir / "data"),
             "--stats-interval", "0", "--log-level", "warning", *self.extra],
            cwd=self.dir, stdout=open(self.dir / "gw.log", "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})


SCENARIOS = {
    "fanin-qos0": ["--publishers", "4", "--subscribers", "1", "--qos", "0"],
    "fanin-qos1": ["--publishers", "4", "--subscribers", "1", "--qos", "1", "--inflight", "32"],
}


def run(broker: Gw, args: list[str], duration: float, out: Path) -> float:
    cmd = [PY, "-m", "gw.cli", "bench", "pubsub", "--size", "64", "--duration", str(duration), *args,
           "--server", f"127.0.0.1:{broker.port}", "--username", USER, "--topic-prefix", PREFIX,
           "--json", str(out), "--quiet"]
    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return float(json.loads(out.read_text())["messages"]["received_per_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS))
    args = ap.parse_args()
    scenarios = {name: SCENARIOS[name] for name in args.only or SCENARIOS}
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gw-acl-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "certs").mkdir()        # the TLS listener's certificates are generated there
        acl = tmp / "acl"
        acl.write_text(acl_text())
        figures: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for i, (name, sc_args) in enumerate(scenarios.items()):
                order = ["acl", "none"] if (r + i) % 2 == 0 else ["none", "acl"]
                for which in order:
                    work = tmp / f"{r}-{name}-{which}"
                    work.mkdir()
                    extra = ["--acl-file", str(acl)] if which == "acl" else []
                    with GwWithArgs(work, tmp / "certs", args.workers, extra) as broker:
                        rate = run(broker, sc_args, args.duration, RESULTS / f"acl-{r}-{name}-{which}.json")
                    figures.setdefault((name, which), []).append(rate)
                    print(f"round {r} {name} {which}: {rate:,.0f} msg/s received", file=sys.stderr, flush=True)
    print("| scenario | no ACL (msg/s) | ACL, 1,000 rules (msg/s) | ratio |")
    print("|---|---|---|---|")
    for name in scenarios:
        none = statistics.median(figures[(name, "none")])
        with_acl = statistics.median(figures[(name, "acl")])
        print(f"| {name} | {none:,.0f} | {with_acl:,.0f} | {with_acl / none:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
