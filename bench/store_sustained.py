"""The store end to end: readings driven at a fixed rate into `gw serve`, and
what the pipeline's store makes of them.

Starts `gw serve` (free loopback ports, its own data directory in a temporary
directory, ack mode sink: an acknowledgement means the reading is in a log on
disk), drives it at a fixed rate with `gw bench ingest` (MQTT QoS 1 on
telemetry/{device_id} by default, or single-reading HTTP POSTs) or with
Debian's wrk (`--transport http-batch`: arrays of --batch readings POSTed to
/v1/ingest, paced at --rate by bench/wrk/ingest_batch.lua) and samples the
server's stats block and the CPU time of its processes once a second:

  t  taken/s (into the logs; acknowledged once durable)  stored/s
     store lag (bytes, seconds)  workers holding ingest

then waits for the store to drain (its lag back to 0 and every accepted
reading written), stops the server (SIGTERM, by its pid) and checks the store
file: every reading the server accepted is there exactly once (rows against
distinct (worker, lsn) and distinct (device_id, seq), against the server's
accepted count and the load generator's acknowledged count).

At the end: the sustained store rate over the send window, over the whole run
(window and drain), the largest and the last lag of the window, the time to
drain, and the exactly-once verdict. It stops by itself (--drain-timeout) and
stops the server it started.

    python bench/store_sustained.py                       # 100,000/s, 60 s, 20,000 devices, 2 workers
    python bench/store_sustained.py --rate 50000 --duration 20 --json out.json
    python bench/store_sustained.py --transport http-batch --rate 100000 --clients 64 --duration 60

The report adds, per 5 s, readings taken and stored and the lag; the pipeline
process's CPU seconds over the window (readings stored per CPU-second: the
figure that holds on a shared machine) and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from benchutil import free_port, wait_port  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rate", type=float, default=100_000, help="readings per second offered (2 metrics each)")
    p.add_argument("--duration", type=float, default=60, help="seconds of sending")
    p.add_argument("--devices", type=int, default=20_000, help="distinct devices")
    p.add_argument("--workers", type=int, default=2, help="gw serve --workers")
    p.add_argument("--transport", choices=("mqtt", "http", "http-batch"), default="mqtt",
                   help="MQTT QoS 1 publishes, HTTP POST /v1/ingest/{device_id} (one reading each), or "
                        "http-batch: Debian's wrk posting arrays of --batch readings to /v1/ingest, paced "
                        "at --rate (bench/wrk/ingest_batch.lua; --rate 0: as fast as the server answers)")
    p.add_argument("--batch", type=int, default=100, help="http-batch: readings per request")
    p.add_argument("--clients", type=int, default=200, help="connections of the load generator")
    p.add_argument("--procs", type=int, default=None, help="load generator processes (gw bench --procs)")
    p.add_argument("--drain-timeout", type=float, default=900, help="seconds to wait for the store to drain")
    p.add_argument("--fsync", choices=("always", "batch", "off"), default="batch")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for gw serve (repeat), e.g. --server-arg=--max-sink-lag-bytes=1e9")
    p.add_argument("--json", dest="json_path", default=None, help="write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the data directory (its path is printed)")
    return p.parse_args(argv)


class Sampler:
    """The server's figures from its stats block (the same `gw stats` reads)."""

    def __init__(self, data_dir: str):
        from gw.stats import Counter, Layout, read_running

        self.C, self.L = Counter, Layout
        _pid, self.block = read_running(data_dir)

    def sample(self, cpu: "CpuClock | None" = None) -> dict:
        rows, header = self.block.rows, self.block.header
        totals = rows.sum(axis=0, dtype="uint64")
        pipeline_cpu, server_cpu = cpu.read() if cpu is not None else (0.0, 0.0)
        return {
            "t": time.monotonic(),
            "pipeline_cpu": pipeline_cpu,      # CPU seconds of the pipeline process so far
            "server_cpu": server_cpu,          # of the whole server (master, workers, pipeline)
            "accepted": int(totals[self.C.WAL_RECORDS]),       # readings taken into the logs, any transport
            "stored": int(header[self.L.H_SINK_WRITTEN]),
            "lag_bytes": int(header[self.L.H_SINK_LAG]),
            "lag_seconds": int(header[self.L.H_SINK_LAG_AGE_MS]) / 1000,
            "holding": int(totals[self.C.STORE_BEHIND]),
            "shed": int(totals[self.C.STORE_BEHIND_HTTP] + totals[self.C.STORE_BEHIND_JSON]
                        + totals[self.C.STORE_BEHIND_QOS0]),
            "caught_up": all(int(r[self.C.STORE_CHECKPOINT]) - 1 >= int(r[self.C.WAL_DURABLE_OFFSET])
                             for r in rows),
        }

    def close(self):
        self.block.close()


class CpuClock:
    """CPU seconds (user + system) used so far by the server's pipeline process (the
    child holding the store file open) and by the whole server."""

    def __init__(self, pid: int, store_path: str):
        import psutil

        self.psutil = psutil
        self.master = psutil.Process(pid)
        self.store_path = os.path.realpath(store_path)
        self.pipeline = None
        self.gone = 0.0             # CPU of children that exited

    def _find_pipeline(self, children):
        for c in children:
            try:
                if any(os.path.realpath(f.path) == self.store_path for f in c.open_files()):
                    return c
            except self.psutil.Error:
                pass
        return None

    def read(self) -> tuple[float, float]:
        ps = self.psutil
        try:
            children = self.master.children(recursive=True)
        except ps.Error:
            return 0.0, 0.0
        if self.pipeline is None or not self.pipeline.is_running():
            self.pipeline = self._find_pipeline(children)
        total = 0.0
        pipe = 0.0
        for p in [self.master, *children]:
            try:
                t = p.cpu_times()
            except ps.Error:
                continue
            total += t.user + t.system
            if self.pipeline is not None and p.pid == self.pipeline.pid:
                pipe = t.user + t.system
        return pipe, total


def start_server(args, tmp: str) -> tuple[subprocess.Popen, dict, str]:
    ports = {"mqtt": free_port(), "http": free_port()}
    data = os.path.join(tmp, "data")
    cmd = [sys.executable, "-m", "gw.cli", "serve", "--workers", str(args.workers),
           "--mqtt", f"127.0.0.1:{ports['mqtt']}", "--http", f"127.0.0.1:{ports['http']}",
           "--mqtts", "off", "--json", "off", "--jsons", "off", "--https", "off", "--ws", "off", "--wss", "off",
           "--data-dir", data, "--certs", os.path.join(tmp, "certs"), "--ack", "sink", "--fsync", args.fsync,
           "--stats-interval", "0", "--sys-interval", "0", "--log-level", "warning",
           "--idempotency-window", "0", *args.server_arg]
    log = open(os.path.join(tmp, "gw.log"), "ab")
    server = subprocess.Popen(cmd, cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        for port in ports.values():
            wait_port(port, server, timeout=60)
    except BaseException:
        stop_server(server)
        raise
    return server, ports, data


def stop_server(server: subprocess.Popen, timeout: float = 120) -> None:
    """SIGTERM to the master (it stops its workers and the pipeline, which
    commits); SIGKILL to it and the children it had, by pid, if it hangs."""
    import psutil

    if server.poll() is not None:
        return
    try:
        children = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout)
    except subprocess.TimeoutExpired:
        for proc in [psutil.Process(server.pid), *children]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        server.wait(10)


WRK_SCRIPT = REPO / "bench" / "wrk" / "ingest_batch.lua"


def bench_command(args, ports: dict, out_json: str) -> list[str]:
    if args.transport == "http-batch":
        # One wrk thread: a C load generator that leaves the server the CPU a Python one takes.
        return ["wrk", "-t1", f"-c{args.clients}", f"-d{int(args.duration)}s", "-s", str(WRK_SCRIPT),
                f"http://127.0.0.1:{ports['http']}"]
    server = f"127.0.0.1:{ports[args.transport]}"
    cmd = [sys.executable, "-m", "gw.cli", "bench", "ingest", "--transport", args.transport, "--server", server,
           "--clients", str(args.clients), "--devices", str(args.devices), "--rate", str(args.rate),
           "--duration", str(args.duration), "--quiet", "--json", out_json]
    if args.procs:
        cmd += ["--procs", str(args.procs)]
    return cmd


def wrk_figures(path: str, batch: int, duration: float) -> dict:
    """gw bench's figures from wrk's report: requests answered 2xx, in readings."""
    import re
    text = open(path).read()
    total = re.search(r"(\d+) requests in", text)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if total is None:
        raise RuntimeError(f"wrk printed no total: {text[-500:]!r}")
    ok = int(total.group(1)) - (int(bad.group(1)) if bad else 0)
    return {"requests": {"ok_2xx": ok * batch, "sent_per_s": int(total.group(1)) * batch / duration,
                         "ok_per_s": ok * batch / duration}}


def count_store(data_dir: str) -> dict:
    """Rows of `readings`, distinct (worker, lsn), distinct (device_id, seq)."""
    conn = sqlite3.connect(f"file:{os.path.join(data_dir, 'store.sqlite')}?mode=ro", uri=True, timeout=60)
    try:
        rows = conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
        by_lsn = conn.execute("SELECT COUNT(*) FROM (SELECT DISTINCT worker, lsn FROM readings)").fetchone()[0]
        by_seq = conn.execute("SELECT COUNT(*) FROM (SELECT DISTINCT device_id, seq FROM readings)").fetchone()[0]
    finally:
        conn.close()
    return {"rows": rows, "distinct_worker_lsn": by_lsn, "distinct_device_seq": by_seq}


def fmt_line(t: float, acked_s: float, stored_s: float, s: dict) -> str:
    return (f"{t:6.0f} s  taken {acked_s:>9,.0f}/s  stored {stored_s:>9,.0f}/s  "
            f"store lag {s['lag_bytes'] / 1e6:>8.1f} MB {s['lag_seconds']:>6.1f} s"
            + (f"  holding ingest on {s['holding']} worker(s)" if s["holding"] else ""))


def run(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="gw-store-sustained-")
    server, ports, data = start_server(args, tmp)
    timeline = []
    bench = None
    try:
        sampler = Sampler(data)
        bench_json = os.path.join(tmp, "bench.json")
        print(f"gw serve pid {server.pid}, {args.workers} workers, data in {tmp}; driving {args.rate:,.0f} "
              f"readings/s over {args.transport} ({args.clients} connections, {args.devices:,} devices) for "
              f"{args.duration:.0f} s; load average before {os.getloadavg()}", flush=True)
        # Sampled before the load starts: every reading taken is counted.
        cpu = CpuClock(server.pid, os.path.join(data, "store.sqlite"))
        first = prev = sampler.sample(cpu)
        wrk_out = os.path.join(tmp, "wrk.out")
        bench = subprocess.Popen(bench_command(args, ports, bench_json), cwd=tmp, stdin=subprocess.DEVNULL,
                                 stdout=open(wrk_out, "wb") if args.transport == "http-batch" else subprocess.DEVNULL,
                                 stderr=open(os.path.join(tmp, "bench.log"), "ab"),
                                 env={**os.environ, "PYTHONPATH": str(REPO), "GW_BATCH": str(args.batch),
                                      "GW_DEVICES": str(args.devices), "GW_RATE": str(args.rate),
                                      "GW_THREADS": "1"})
        start = first["t"]
        window_start = window_end = None
        max_lag = 0
        bench_done_t = None
        drained_t = None
        timeline_prev_accepted = first["accepted"]
        while True:
            time.sleep(1.0)
            s = sampler.sample(cpu)
            dt = max(s["t"] - prev["t"], 1e-3)
            acked_s = (s["accepted"] - prev["accepted"]) / dt
            stored_s = (s["stored"] - prev["stored"]) / dt
            if window_start is None and s["accepted"] > first["accepted"]:
                window_start = prev
            timeline.append({"t": round(s["t"] - start, 2), "acknowledged_per_s": round(acked_s),
                             "stored_per_s": round(stored_s), "lag_bytes": s["lag_bytes"],
                             "lag_seconds": s["lag_seconds"], "workers_holding": s["holding"]})
            print(fmt_line(s["t"] - start, acked_s, stored_s, s), flush=True)
            prev = s
            if bench_done_t is None:
                max_lag = max(max_lag, s["lag_bytes"])
                if window_start is not None and s["accepted"] > timeline_prev_accepted:
                    window_end = s          # the last second readings came in
                timeline_prev_accepted = s["accepted"]
                if bench.poll() is not None:
                    bench_done_t = s["t"]
                continue
            if s["caught_up"] and s["stored"] - first["stored"] >= s["accepted"] - first["accepted"]:
                drained_t = s["t"]
                break
            if s["t"] - bench_done_t > args.drain_timeout:
                break
            if server.poll() is not None:
                raise RuntimeError(f"gw serve exited with {server.returncode} (log: {tmp}/gw.log)")
        final = prev
        sampler.close()
    finally:
        if bench is not None and bench.poll() is None:
            bench.terminate()
            bench.wait(30)
        stop_server(server)
    if args.transport == "http-batch":
        load = wrk_figures(wrk_out, args.batch, args.duration)
    else:
        with open(bench_json) as f:
            load = json.load(f)
    counts = count_store(data)
    try:
        load_avg = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load_avg = None
    ws = window_start or first
    we = window_end or final
    window = max(we["t"] - ws["t"], 1e-3)
    accepted = final["accepted"] - first["accepted"]
    acknowledged = int(load["requests"]["ok_2xx"])       # PUBACKs (MQTT) or 200s (HTTP): in ack mode sink, durable
    window_stored = we["stored"] - ws["stored"]
    pipe_cpu = {"window_s": round(we["pipeline_cpu"] - ws["pipeline_cpu"], 2),
                "server_window_s": round(we["server_cpu"] - ws["server_cpu"], 2),
                "readings_per_cpu_s_window": round(window_stored / max(we["pipeline_cpu"] - ws["pipeline_cpu"], 1e-3)),
                "readings_per_cpu_s_overall": round((final["stored"] - first["stored"])
                                                    / max(final["pipeline_cpu"] - first["pipeline_cpu"], 1e-3))}
    out = {
        "plan": {"rate": args.rate, "duration_s": args.duration, "devices": args.devices, "workers": args.workers,
                 "transport": args.transport, "clients": args.clients, "fsync": args.fsync,
                 "server_args": args.server_arg},
        "acknowledged": acknowledged,
        "load_sent_per_s": load["requests"].get("sent_per_s"),          # what the load generator managed to offer
        "load_acknowledged_per_s": load["requests"].get("ok_per_s"),
        "acknowledged_per_s_window": round((we["accepted"] - ws["accepted"]) / window),
        "accepted_by_server": accepted,
        "shed_store_behind": final["shed"],
        "store_rate_window_per_s": round((we["stored"] - ws["stored"]) / window),
        "store_rate_overall_per_s": round((final["stored"] - first["stored"])
                                          / max(final["t"] - ws["t"], 1e-3)),
        "lag_max_bytes": max_lag,
        "lag_end_of_window_bytes": we["lag_bytes"],
        "lag_end_of_window_seconds": we["lag_seconds"],
        "drain_seconds": round(drained_t - bench_done_t, 1) if drained_t else None,
        "drained": drained_t is not None,
        "store": counts,
        "exactly_once": (counts["rows"] == counts["distinct_worker_lsn"] == counts["distinct_device_seq"]
                         == accepted and acknowledged <= accepted),
        "timeline": timeline,
        "per_5s": per_interval(timeline),
        "pipeline_cpu_s": pipe_cpu,
        "machine_load_average": load_avg,
        "data_dir": tmp if args.keep else None,
    }
    if not args.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def per_interval(timeline: list, seconds: float = 5.0) -> list:
    """The timeline in intervals of `seconds`: readings taken and stored per second, the
    lag at the interval's end."""
    out = []
    i = 0
    while i < len(timeline):
        group = [x for x in timeline[i:] if x["t"] < timeline[i]["t"] + seconds - 0.5]
        if not group:
            group = [timeline[i]]
        n = len(group)
        out.append({"from_s": round(group[0]["t"] - 1), "to_s": round(group[-1]["t"]),
                    "taken_per_s": round(sum(x["acknowledged_per_s"] for x in group) / n),
                    "stored_per_s": round(sum(x["stored_per_s"] for x in group) / n),
                    "lag_mb": round(group[-1]["lag_bytes"] / 1e6, 1), "lag_seconds": group[-1]["lag_seconds"],
                    "holding": max(x["workers_holding"] for x in group)})
        i += n
    return out


def report(r: dict) -> str:
    lines = ["", "   seconds    taken/s   stored/s   lag MB   lag s"]
    for x in per_interval(r["timeline"]):
        lines.append(f"{x['from_s']:4d}-{x['to_s']:<4d} {x['taken_per_s']:>10,} {x['stored_per_s']:>10,} "
                     f"{x['lag_mb']:>8.1f} {x['lag_seconds']:>7.1f}"
                     + ("  holding ingest" if x["holding"] else ""))
    lines += [
        "",
        f"acknowledged         {r['acknowledged']:,} readings (load generator); taken by the server "
        f"{r['accepted_by_server']:,} ({r['acknowledged_per_s_window']:,}/s over the window); "
        f"shed (store behind) {r['shed_store_behind']:,}",
        f"load generator       sent {r['load_sent_per_s'] or 0:,.0f}/s, acknowledged {r['load_acknowledged_per_s'] or 0:,.0f}/s "
        f"over its send window (offered: {r['plan']['rate']:,.0f}/s)",
        f"store rate           {r['store_rate_window_per_s']:,}/s over the send window, "
        f"{r['store_rate_overall_per_s']:,}/s until drained",
        f"store lag            max {r['lag_max_bytes'] / 1e6:,.1f} MB; at the end of the window "
        f"{r['lag_end_of_window_bytes'] / 1e6:,.1f} MB ({r['lag_end_of_window_seconds']:.1f} s behind)",
        "time to drain        " + (f"{r['drain_seconds']:.1f} s" if r["drained"] else "not drained in time"),
        f"store rows           {r['store']['rows']:,} (distinct (worker, lsn) {r['store']['distinct_worker_lsn']:,}, "
        f"distinct (device_id, seq) {r['store']['distinct_device_seq']:,})",
        f"pipeline CPU         {r['pipeline_cpu_s']['window_s']:.1f} s over the window "
        f"({r['pipeline_cpu_s']['readings_per_cpu_s_window']:,} readings stored per CPU-second; "
        f"{r['pipeline_cpu_s']['readings_per_cpu_s_overall']:,} until drained); the whole server "
        f"{r['pipeline_cpu_s']['server_window_s']:.1f} CPU-s over the window",
        f"load average         {r['machine_load_average']} at the end (the machine's)",
        "exactly once         " + ("yes: every accepted reading stored once" if r["exactly_once"]
                                   else "NO: rows and accepted readings differ"),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    r = run(args)
    print(report(r))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(r, f, indent=2)
    return 0 if r["exactly_once"] and r["drained"] else 1


if __name__ == "__main__":
    sys.exit(main())
