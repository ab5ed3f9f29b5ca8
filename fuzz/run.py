"""Runs fuzz targets for a bounded time each (`./dev fuzz TARGET SECONDS`,
`./dev fuzz all SECONDS`) and reports what each covered; `./dev fuzz TARGET
FILE` replays one input (a crash it found) with the worker's log on.

Each target runs in its own process: the fuzzing venv's Python with the
ASan runtime that has libFuzzer linked in preloaded (atheris's
asan_with_fuzzer.so), the instrumented extensions first on the import path,
PYTHONMALLOC=malloc so ASan sees every Python allocation. It reads the
committed seed corpus (fuzz/corpus/TARGET, never written) and keeps what it
finds in a working corpus outside the repository's tracked files
(.fuzz/corpus/TARGET); a crashing input is written to .fuzz/crashes/TARGET/,
outside both. The run stops by itself after SECONDS (libFuzzer's
-max_total_time). Exit status: 0 when no target found anything, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
REPO = FUZZ.parent
BUILD = REPO / ".fuzz" / "build" / "lib"      # where ./dev fuzz builds the instrumented extensions
TARGETS = ("codec", "codec5", "mqtt", "jsonlines", "http", "channel", "wal", "ws", "tls_records")
FINAL = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
PROGRESS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
EXECUTED = re.compile(r"stat::number_of_executed_units:\s+(\d+)")
PEAK_RSS = re.compile(r"stat::peak_rss_mb:\s+(\d+)")


def runtime_env(work: Path) -> dict:
    import atheris

    env = dict(os.environ)
    env["LD_PRELOAD"] = os.path.join(atheris.path(), "asan_with_fuzzer.so")
    # ./dev fuzz's build, or another one (GW_FUZZ_BUILD set).
    env.setdefault("GW_FUZZ_BUILD", str(BUILD))
    # Python leaks by design at exit; a fuzzed length may ask for more memory
    # than there is: libFuzzer's malloc limit reports that, ASan's NULL does not kill.
    env["ASAN_OPTIONS"] = "detect_leaks=0:allocator_may_return_null=1:handle_abort=1:symbolize=1"
    env["PYTHONMALLOC"] = "malloc"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_target(target: str, seconds: int, work: Path, extra: list[str]) -> dict:
    corpus = work / "corpus" / target
    crashes = work / "crashes" / target
    logs = work / "logs"
    for d in (corpus, crashes, logs):
        d.mkdir(parents=True, exist_ok=True)
    seeds = FUZZ / "corpus" / target
    log_path = logs / f"{target}.log"
    cmd = [sys.executable, str(FUZZ / f"fuzz_{target}.py"), str(corpus), str(seeds),
           f"-max_total_time={seconds}", f"-artifact_prefix={crashes}/", "-print_final_stats=1",
           "-timeout=20", "-rss_limit_mb=3072", "-max_len=4096", *extra]
    started = time.monotonic()
    before = set(os.listdir(crashes))
    # The target's data directories go in a scratch directory removed here:
    # libFuzzer's exit() skips the target's own clean-up.
    scratch = tempfile.mkdtemp(prefix=f"gw-fuzz-run-{target}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    env = runtime_env(work)
    env["GW_FUZZ_SCRATCH"] = scratch
    with open(log_path, "wb") as log:
        # A bounded run: libFuzzer stops at max_total_time; the wait bounds a hang
        # of the whole process (a stuck input is libFuzzer's -timeout).
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(seconds + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    text = log_path.read_text(errors="replace")
    found = sorted(set(os.listdir(crashes)) - before)
    result = {"target": target, "seconds": round(time.monotonic() - started), "rc": rc, "log": str(log_path),
              "found": [str(crashes / f) for f in found]}
    m = FINAL.findall(text) or PROGRESS.findall(text)
    if m:
        _, cov, ft, corp = m[-1]
        result.update(cov=int(cov), ft=int(ft), corpus=int(corp))
    m = EXECUTED.findall(text)
    if m:
        result["execs"] = int(m[-1])
    m = PEAK_RSS.findall(text)
    if m:
        result["peak_rss_mb"] = int(m[-1])
    return result


def replay(target: str, path: str, work: Path, extra: list[str]) -> int:
    """Runs one input (a crash libFuzzer wrote) once, with the worker's log on."""
    env = runtime_env(work)
    env["GW_FUZZ_LOG"] = "1"
    return subprocess.call([sys.executable, str(FUZZ / f"fuzz_{target}.py"), *extra, path], cwd=REPO, env=env,
                           stdin=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=TARGETS + ("all",))
    parser.add_argument("seconds", help="how long each target runs; or an input file to replay once")
    parser.add_argument("--work", default=str(REPO / ".fuzz"), help="working corpus, crashes, logs (default .fuzz)")
    parser.add_argument("libfuzzer_args", nargs="*", help="more libFuzzer flags (after --)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if not args.seconds.isdigit():
        if args.target == "all":
            parser.error("replay one target's input: ./dev fuzz TARGET FILE")
        return replay(args.target, args.seconds, work, args.libfuzzer_args)
    seconds = int(args.seconds)
    targets = TARGETS if args.target == "all" else (args.target,)
    failed = False
    nfailed = 0
    for target in targets:
        r = run_target(target, seconds, work, args.libfuzzer_args)
        line = (f"fuzz {r['target']}: {r['seconds']} s, {r.get('execs', '?')} executions, "
                f"cov {r.get('cov', '?')} ft {r.get('ft', '?')}, corpus {r.get('corpus', '?')}, "
                f"peak RSS {r.get('peak_rss_mb', '?')} MB")
        if r["rc"] != 0 or r["found"]:
            failed = True
            nfailed += 1
            line += f": FOUND SOMETHING (exit {r['rc']}); inputs: {', '.join(r['found']) or '-'}; log: {r['log']}"
            print(line, flush=True)
            tail = Path(r["log"]).read_text(errors="replace").splitlines()[-60:]
            print("\n".join("    " + t for t in tail), flush=True)
        else:
            print(line + ": nothing found", flush=True)
    print(f"fuzz: {len(targets) - nfailed} passed, {nfailed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
