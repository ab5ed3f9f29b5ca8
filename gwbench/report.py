"""Merging worker results and presenting them: the live progress line, the
final text report, the JSON document and the optional plot."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np

from .histogram import Histogram, bucket_bounds

HIST_NAMES = ("connect", "tcp", "tls", "connack", "ping", "puback", "latency", "ack", "ramp_lag")
INGEST_HIST_NAMES = ("latency", "service", "send_lag")
ANOMALY_LIST_MAX = 100_000


def _fmt_n(x) -> str:
    return f"{int(x):,}"


def _fmt_rate(x) -> str:
    if x >= 10_000:
        return f"{x / 1000:,.1f}k"
    return f"{x:,.0f}"


def _fmt_ms(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x < 1:
        return f"{x * 1000:.0f} us"
    if x < 1000:
        return f"{x:.2f} ms" if x < 10 else f"{x:.1f} ms"
    return f"{x / 1000:.2f} s"


def _fmt_bytes(x) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:,.1f} {unit}" if unit != "B" else f"{x:,.0f} B"
        x /= 1024
    return str(x)


class Aggregate:
    def __init__(self, plan):
        self.plan = plan
        self.timeseries: list[dict] = []
        self.server: dict = {}
        self.server_samples: list[dict] = []
        self.tool_samples: list[dict] = []
        self.fatals: list[str] = []
        self.notes: list[str] = []
        self.publisher_sent: list[int] | None = None
        self.marks: dict[int, dict[int, dict]] = {}
        self.samples: dict[int, tuple] = {}
        self.t_run_start = 0.0
        self.t_publish = None

    # -- live -----------------------------------------------------------------
    def server_before(self, sample: dict) -> None:
        self.server["rss_before"] = sample["rss"]

    def fatal(self, w: int, msg: str) -> None:
        self.fatals.append(f"worker {w}: {msg.strip()}")

    def add_sample(self, k: int, server, tool, phase: str) -> None:
        self.samples[k] = (server, tool, phase)

    def point(self, k: int) -> dict:
        """Totals over the workers at second k (a worker that has not
        reported k counts with its last report before it)."""
        tot = Counter()
        for w, marks in self.marks.items():
            snap = marks.get(k)
            if snap is None:
                older = [j for j in marks if j <= k]
                snap = marks[max(older)] if older else None
            if snap:
                for key, v in snap.items():
                    if isinstance(v, (int, float)) and key != "k":
                        tot[key] += v
        out_n = tot["published"]
        in_n = tot["received"] if self.plan.scenario in ("pubsub", "ingest") else tot["packets_in"]
        p = {"t": k, "phase": self.samples.get(k, (None, None, ""))[2], "connected": int(tot["live"]),
             "pending": int(tot["pending"]), "failed": int(tot["failed"]), "dropped": int(tot["dropped"]),
             "errors": int(tot["errors"]), "out": int(out_n), "in": int(in_n)}
        if self.plan.scenario == "ingest":
            p["ok"] = int(tot["ok"])
            p["lost"] = int(tot["lost"])
        server, tool, _ = self.samples.get(k, (None, None, ""))
        if server:
            p["server_rss"] = server["rss"]
            if "cpu_pct" in server:
                p["server_cpu_pct"] = round(server["cpu_pct"], 1)
        if tool and "cpu_pct" in tool:
            p["tool_cpu_pct"] = round(tool["cpu_pct"], 1)
            p["tool_max_proc_cpu_pct"] = round(tool["max_proc_cpu_pct"], 1)
        return p

    def build_timeseries(self) -> list[dict]:
        ks = set(self.samples)
        for marks in self.marks.values():
            ks.update(marks)
        prev = {"out": 0, "in": 0, "ok": 0}
        series = []
        for k in range(1, max(ks, default=0) + 1):
            p = self.point(k)
            p["out_per_s"] = max(0, p["out"] - prev["out"])
            p["in_per_s"] = max(0, p["in"] - prev["in"])
            if self.plan.scenario == "ingest":
                p["ok_per_s"] = max(0, p["ok"] - prev["ok"])
                p["non_2xx_per_s"] = max(0, p["in_per_s"] - p["ok_per_s"])
                self._window_latency(k, p)
            prev = p
            series.append(p)
        return series

    def _window_latency(self, k: int, p: dict) -> None:
        """Ingest: latency percentiles of the responses of second k (each
        worker's histogram of that second, merged)."""
        h = Histogram()
        for marks in self.marks.values():
            snap = marks.get(k)
            if snap and snap.get("win"):
                h.merge(Histogram.from_dict(snap["win"]))
        if h.total:
            p["latency_p50_ms"] = round(h.percentile(50) / 1e6, 3)
            p["latency_p99_ms"] = round(h.percentile(99) / 1e6, 3)
            p["latency_max_ms"] = round(h.max_ns / 1e6, 3)

    def progress_line(self, k: int) -> str:
        p = self.point(k)
        q = self.point(k - 1) if k > 1 else {"out": 0, "in": 0}
        total = self.plan.total_clients
        s = (f"[{k:5d}s {p['phase']:<10}] connected {p['connected']:,}/{total:,}"
             f"  failed {p['failed']:,}")
        if p["dropped"]:
            s += f"  dropped {p['dropped']:,}"
        s += f"  out {_fmt_rate(max(0, p['out'] - q['out']))}/s  in {_fmt_rate(max(0, p['in'] - q['in']))}/s"
        if "server_cpu_pct" in p:
            s += f"  broker cpu {p['server_cpu_pct']:.0f}%"
        return s.ljust(100)

    # -- final ----------------------------------------------------------------
    def collect_timeseries(self) -> None:
        """The per-second timeline, with the server's and the tool's samples of each second."""
        self.timeseries = self.build_timeseries()
        self.server_samples = [{"t": p["t"], "connected": p["connected"], **self.samples[p["t"]][0]}
                               for p in self.timeseries if self.samples.get(p["t"], (None,))[0]]
        self.tool_samples = [self.samples[p["t"]][1] for p in self.timeseries
                             if self.samples.get(p["t"], (None, None))[1]]

    def finish(self, results: dict, elapsed: float) -> dict:
        plan = self.plan
        if plan.scenario == "ingest":
            return self.finish_ingest(results, elapsed)
        self.collect_timeseries()
        c = Counter()
        errors = Counter()
        hists = {name: Histogram() for name in HIST_NAMES}
        subs = Counter()
        first_rx = []
        last_rx = []
        for w, r in sorted(results.items()):
            if not r:
                continue
            c.update(r.get("counters", {}))
            for n in r.get("notes", []):
                if n not in self.notes:
                    self.notes.append(n)
            errors.update(r.get("errors", {}))
            for name, d in r.get("hist", {}).items():
                hists.setdefault(name, Histogram()).merge(Histogram.from_dict(d))
            sd = r.get("subs")
            if sd:
                for k, v in sd.items():
                    if k == "first_rx_ns" and v:
                        first_rx.append(v)
                    elif k == "last_rx_ns" and v:
                        last_rx.append(v)
                    elif isinstance(v, (int, float)):
                        subs[k] += v
        total = plan.total_clients
        connected = int(c["connected"])
        failed = int(c["failed"])
        out: dict = {
            "tool": "gw bench",
            "scenario": "connection" if plan.scenario == "conn" else "pubsub",
            "plan": plan.to_dict(),
            "elapsed_s": round(elapsed, 3),
            "clients": total,
            "connected": connected,
            "failed": failed,
            "not_started": int(c["not_started"]),
            "dropped": int(c["dropped"]),
            "disconnected": int(c["disconnected"]),
            "success_rate_pct": round(100.0 * connected / total, 3) if total else 0.0,
            "connect_ms": hists["connect"].summary((50, 90, 99, 99.9)),
            "connect_phases_ms": {k: hists[k].summary((50, 99)) for k in ("tcp", "tls", "connack")},
            "ping_rtt_ms": hists["ping"].summary((50, 99)),
            "ramp_lag_ms": hists["ramp_lag"].summary((50, 99)),
            "errors": dict(errors),
            "error_count": int(sum(errors.values())),
            "counters": {k: int(v) for k, v in c.items()},
            "notes": list(self.notes),
            "fatal": list(self.fatals),
        }
        attempts = connected + failed
        out["error_rate_pct"] = round(100.0 * out["error_count"] / max(1, attempts), 3)
        if plan.scenario == "conn":
            sent = int(c["published"])
            window = plan.rampup + plan.duration
            msgs = {
                "sent": sent, "received": int(c["packets_in"]),
                "acked": int(c["acked"]), "unacked": int(c["unacked"]), "rejected": int(c["rejected"]),
                "bytes_sent": int(c["bytes_out"]), "bytes_received": int(c["bytes_in"]),
                "sent_per_s": round(sent / window, 1) if window else 0.0,
                "bytes_sent_per_s": round(c["bytes_out"] / elapsed, 1) if elapsed else 0.0,
                "bytes_received_per_s": round(c["bytes_in"] / elapsed, 1) if elapsed else 0.0,
            }
            out["messages"] = msgs
            if plan.qos:
                out["puback_ms"] = hists["puback"].summary()
        else:
            sent = int(c["published"])
            received = int(subs["received"])
            dur = plan.duration
            if self.t_publish:
                dur = self.t_publish[1] - self.t_publish[0]
            rx_window = (max(last_rx) - min(first_rx)) / 1e9 if first_rx and last_rx else 0.0
            expected = sent * plan.subscribers
            unique = int(subs["unique"])
            msgs = {
                "sent": sent, "received": received, "acked": int(c["acked"]), "unacked": int(c["unacked"]),
                "rejected": int(c["rejected"]),
                "bytes_sent": int(c["bytes_out"]), "bytes_received": int(c["bytes_in"]),
                "sent_per_s": round(sent / dur, 1) if dur else 0.0,
                "received_per_s": round(received / rx_window, 1) if rx_window > 0 else 0.0,
                "received_over_publish_window_per_s": round(received / dur, 1) if dur else 0.0,
                "received_per_s_active": round(received / rx_window, 1) if rx_window > 0 else 0.0,
                "bytes_sent_per_s": round(c["bytes_out"] / dur, 1) if dur else 0.0,
                "bytes_received_per_s": round(c["bytes_in"] / dur, 1) if dur else 0.0,
                "publish_window_s": round(dur, 3),
            }
            if c["pub_active_ns"]:
                msgs["publishers_waiting_pct"] = round(100.0 * c["pub_blocked_ns"] / c["pub_active_ns"], 1)
            peaks = [p["in_per_s"] for p in self.timeseries if p["phase"] in ("publish", "drain")]
            if peaks:
                msgs["received_per_s_peak"] = max(peaks)
            out["messages"] = msgs
            out["latency_ms"] = hists["latency"].summary((50, 90, 99, 99.9))
            if plan.qos:
                out["ack_ms"] = hists["ack"].summary((50, 90, 99, 99.9))
            out["delivery"] = {
                "expected": expected,
                "unique": unique,
                "lost": max(0, expected - unique),
                "loss_pct": round(100.0 * max(0, expected - unique) / expected, 4) if expected else 0.0,
                "duplicates": int(subs["duplicates"]),
                "out_of_order": int(subs["out_of_order"]),
                "foreign": int(subs["foreign"]),
                "complete": bool(expected == unique),
            }
        out["server"] = self._server_summary(connected)
        out["tool_cpu"] = self._tool_summary()
        out["timeseries"] = self.timeseries
        out["histograms"] = {k: h.to_dict() for k, h in hists.items() if h.total}
        ok = (not self.fatals and connected == total and failed == 0 and out["dropped"] == 0
              and not any("interrupted" in n for n in self.notes))
        if plan.scenario == "conn" and plan.qos and out["messages"]["unacked"]:
            ok = False
        if plan.qos and out["messages"]["rejected"]:
            ok = False      # MQTT 5.0: the server refused publishes (a reason code >= 0x80)
        if plan.scenario == "pubsub":
            if plan.qos and out["delivery"]["lost"]:
                ok = False
            if out["delivery"]["duplicates"] and plan.qos == 2:
                ok = False
        out["ok"] = ok
        out["exit_code"] = 0 if ok else (130 if any("interrupted" in n for n in self.notes) else 1)
        return out

    def finish_ingest(self, results: dict, elapsed: float) -> dict:
        plan = self.plan
        self.collect_timeseries()
        c = Counter()
        errors = Counter()
        status = Counter()
        hists = {name: Histogram() for name in INGEST_HIST_NAMES}
        anomalies: list = []
        for w, r in sorted(results.items()):
            if not r:
                continue
            c.update(r.get("counters", {}))
            errors.update(r.get("errors", {}))
            status.update(r.get("status", {}))
            for n in r.get("notes", []):
                if n not in self.notes:
                    self.notes.append(n)
            for name, d in r.get("hist", {}).items():
                hists.setdefault(name, Histogram()).merge(Histogram.from_dict(d))
            anomalies.extend(r.get("anomalies", []))
        total = plan.clients
        connected = int(c["connected"])
        sent, answered, ok = int(c["sent"]), int(c["answered"]), int(c["ok"])
        dur = plan.duration
        if self.t_publish:
            dur = self.t_publish[1] - self.t_publish[0]
        windows = [r["window_s"] for r in results.values() if r and r.get("window_s")]
        if windows:
            dur = max(windows)   # the send phase as the workers ran it (shorter when interrupted)
        # answered per second over the send window (responses of the drain
        # come after it, but belong to requests sent in it)
        send_secs = [p for p in self.timeseries if p["phase"] == "send"]
        err_count = int(sum(errors.values()))
        # Rates over the send window [t0, t_stop): what was sent and answered
        # in it. What the drain sent after it (open loop, behind schedule) is
        # counted in sent_late; its latency is in the histograms.
        in_win = int(c["sent_in_window"]), int(c["answered_in_window"]), int(c["ok_in_window"])
        requests = {
            "sent": sent, "answered": answered, "ok_2xx": ok, "non_2xx": answered - ok,
            "unanswered": int(c["unanswered"]), "lost_with_connection": int(c["lost"]),
            "not_sent": int(c["not_sent"]),
            "sent_late": sent - in_win[0] if plan.rate else 0,
            "sent_per_s": round(in_win[0] / dur, 1) if dur else 0.0,
            "answered_per_s": round(in_win[1] / dur, 1) if dur else 0.0,
            "ok_per_s": round(in_win[2] / dur, 1) if dur else 0.0,
            "send_window_s": round(dur, 3),
            "target_rate": plan.rate,
            "bytes_sent": int(c["bytes_out"]), "bytes_received": int(c["bytes_in"]),
            "retry_after": int(c["retry_after"]),
        }
        if plan.rate:
            requests["scheduled"] = int(c["scheduled"])
        if send_secs:
            requests["answered_per_s_peak"] = max(p["in_per_s"] for p in send_secs)
        anomalies.sort(key=lambda a: (a[0], a[1]))
        out: dict = {
            "tool": "gw bench",
            "scenario": "ingest",
            "transport": plan.transport,
            "plan": plan.to_dict(),
            "elapsed_s": round(elapsed, 3),
            "clients": total,
            "devices": plan.devices,
            "connected": connected,
            "failed": total - connected,
            "connects": int(c["connects"]),
            "reconnects": max(0, int(c["connected_ok"]) - connected),
            "server_closes": int(c["server_closes"]),
            "requests": requests,
            "status": dict(sorted(status.items())),
            "latency_ms": hists["latency"].summary((50, 90, 99, 99.9)),
            "service_ms": hists["service"].summary((50, 90, 99, 99.9)),
            "send_lag_ms": hists["send_lag"].summary((50, 90, 99, 99.9)),
            "anomalies": {
                "enabled": plan.anomalies,
                "fraction": plan.anomaly_fraction if plan.anomalies else 0.0,
                "seed": plan.seed,
                "injected": int(c["injected"]),
                "list": [list(a) for a in anomalies[:ANOMALY_LIST_MAX]],
                "list_complete": len(anomalies) == int(c["injected"]) and len(anomalies) <= ANOMALY_LIST_MAX,
            },
            "errors": dict(errors),
            "error_count": err_count,
            "error_rate_pct": round(100.0 * (err_count + int(c["unanswered"])) / max(1, sent), 3),
            "counters": {k: int(v) for k, v in c.items()},
            "notes": list(self.notes),
            "fatal": list(self.fatals),
        }
        out["server"] = self._server_summary(connected)
        out["tool_cpu"] = self._tool_summary()
        out["timeseries"] = self.timeseries
        out["histograms"] = {k: h.to_dict() for k, h in hists.items() if h.total}
        interrupted = any("interrupted" in n for n in self.notes)
        ok_run = (not self.fatals and connected == total and err_count == 0 and out["requests"]["unanswered"] == 0
                  and requests["not_sent"] == 0 and ok > 0 and not interrupted)
        out["ok"] = ok_run
        out["exit_code"] = 0 if ok_run else (130 if interrupted else 1)
        return out

    def _server_summary(self, connected: int) -> dict:
        if "rss_before" not in self.server:
            return {}
        s = {"rss_before": self.server["rss_before"]}
        samples = [x for x in self.server_samples]
        if samples:
            peak = max(x["connected"] for x in samples)
            at_peak = [x for x in samples if x["connected"] == peak]
            s["rss_full"] = at_peak[-1]["rss"]
            s["connected_at_sample"] = peak
            s["rss_max"] = max(x["rss"] for x in samples)
            if peak:
                s["rss_per_connection"] = round((s["rss_full"] - s["rss_before"]) / peak, 1)
            cpus = [x["cpu_pct"] for x in samples if "cpu_pct" in x]
            if cpus:
                s["cpu_pct_avg"] = round(sum(cpus) / len(cpus), 1)
                s["cpu_pct_max"] = round(max(cpus), 1)
        return s

    def _tool_summary(self) -> dict:
        cpus = [x["cpu_pct"] for x in self.tool_samples if "cpu_pct" in x]
        if not cpus:
            return {}
        per = [x["max_proc_cpu_pct"] for x in self.tool_samples if "max_proc_cpu_pct" in x]
        users = [x["user_pct"] for x in self.tool_samples if "user_pct" in x]
        return {"cpu_pct_avg": round(sum(cpus) / len(cpus), 1), "cpu_pct_max": round(max(cpus), 1),
                "user_pct_avg": round(sum(users) / len(users), 1) if users else None,
                "busiest_process_cpu_pct_max": round(max(per), 1) if per else None}


def format_ingest(r: dict) -> str:
    plan = r["plan"]
    L = []
    where = f"{plan['host']}:{plan['port']}"
    q = r["requests"]
    what = (f"POST {plan['path']}{{device_id}}" if r["transport"] == "http"
            else f"MQTT QoS 1 to {plan['topic_prefix']}/{{device_id}}")
    pace = (f"rate {plan['rate']:,.0f} req/s (open loop)" if plan["rate"]
            else "flat out (closed loop)")
    L.append(f"gw bench ingest: {where} ({what}), {r['clients']:,} keep-alive client(s), "
             f"{r['devices']:,} device(s), {pace}, pipeline {plan['pipeline']}, "
             f"{plan['duration']:g} s, {plan['procs']} process(es)")
    L.append(f"Clients: connected {r['connected']:,}/{r['clients']:,} / failed {r['failed']:,}"
             + (f" / reconnects {r['reconnects']:,}" if r["reconnects"] else "")
             + (f" / closed by the server {r['server_closes']:,}" if r["server_closes"] else ""))
    ok_name = "2xx" if r["transport"] == "http" else "acknowledged"
    L.append(f"Requests: sent {q['sent']:,} / answered {q['answered']:,} / {ok_name} {q['ok_2xx']:,} / "
             f"{'non-2xx ' + format(q['non_2xx'], ',') + ' / ' if r['transport'] == 'http' else ''}"
             f"unanswered {q['unanswered']:,}"
             + (f" / due but never sent {q['not_sent']:,}" if q["not_sent"] else ""))
    if q.get("sent_late"):
        L.append(f"Behind schedule: {q['sent_late']:,} request(s) due in the send window went out after it "
                 f"(the server or the tool could not keep --rate; their wait is in the latency)")
    line = (f"Requests/sec: sent {q['sent_per_s']:,.0f} / answered {q['answered_per_s']:,.0f} / "
            f"{ok_name} {q['ok_per_s']:,.0f} (over the {q['send_window_s']:.1f} s send window")
    if "answered_per_s_peak" in q:
        line += f"; peak second {q['answered_per_s_peak']:,.0f}"
    line += ")"
    if plan["rate"]:
        line += f" / target {plan['rate']:,.0f}"
    L.append(line)
    if r["status"]:
        L.append("Status: " + ", ".join(f"{k} {v:,}" for k, v in r["status"].items())
                 + (f" (Retry-After on {q['retry_after']:,})" if q["retry_after"] else ""))
    src = "scheduled send time" if plan["rate"] else "send"
    L.append(f"Latency (from the {src} to the response): " + _lat_line(r["latency_ms"]))
    if plan["rate"]:
        L.append("Service time (from the write to the response): " + _lat_line(r["service_ms"]))
        lag = r.get("send_lag_ms", {})
        if lag.get("count"):
            line = ("Send lag (scheduled time to the write): "
                    f"p50 {_fmt_ms(lag['p50_ms'])} / p99 {_fmt_ms(lag['p99_ms'])} / max {_fmt_ms(lag['max_ms'])}")
            if lag["p99_ms"] > 1.0:
                line += (" (requests waited: for the server's answers with --pipeline outstanding, or for "
                         "the tool's CPU; see Tool CPU)")
            L.append(line)
    L.append(f"Bytes: sent {_fmt_bytes(q['bytes_sent'])} / received {_fmt_bytes(q['bytes_received'])}")
    a = r["anomalies"]
    if a["enabled"]:
        L.append(f"Anomalies: {a['injected']:,} injected (fraction {a['fraction']:g}, seed {a['seed']}; "
                 f"the list of (device, seq) is in the JSON result"
                 + ("" if a["list_complete"] else ", first 100,000 only") + ")")
    L.extend(_closing_lines(r, plan))
    return "\n".join(L)


def _closing_lines(r: dict, plan: dict) -> list[str]:
    """The lines every scenario's report ends with: errors, the server and the
    tool, notes, fatal errors, the verdict. The error rate is the result's
    (ingest counts unanswered requests in it: not 0 when no error was seen)."""
    L = []
    errs = r["errors"]
    if errs:
        L.append(f"Errors: {r['error_count']:,} (error rate {r['error_rate_pct']:.2f}%): "
                 + ", ".join(f"{k} {v:,}" for k, v in sorted(errs.items(), key=lambda kv: -kv[1])))
    else:
        L.append(f"Errors: 0 / Error Rate: {r['error_rate_pct']:.2f}%")
    L.extend(_server_tool_lines(r, plan))
    for n in r["notes"]:
        L.append(f"Note: {n}")
    for f in r["fatal"]:
        L.append(f"FATAL {f.splitlines()[-1] if f else f}")
    L.append("Result: " + ("OK" if r["ok"] else "FAILED"))
    return L


def _server_tool_lines(r: dict, plan: dict) -> list[str]:
    L = []
    s = r.get("server")
    if s:
        line = f"Server: RSS before {_fmt_bytes(s['rss_before'])}"
        if "rss_full" in s:
            line += (f", at {s['connected_at_sample']:,} connected {_fmt_bytes(s['rss_full'])}")
            if "rss_per_connection" in s:
                line += f", per connection {_fmt_bytes(s['rss_per_connection'])}"
        if "cpu_pct_avg" in s:
            line += f"; CPU avg {s['cpu_pct_avg']:.0f}%, max {s['cpu_pct_max']:.0f}%"
        L.append(line)
    t = r.get("tool_cpu")
    if t:
        line = f"Tool CPU: avg {t['cpu_pct_avg']:.0f}%"
        if t.get("user_pct_avg") is not None:
            line += f" (user {t['user_pct_avg']:.0f}%, the rest kernel: TCP stack)"
        line += f", max {t['cpu_pct_max']:.0f}% over {plan['procs']} process(es)"
        if t.get("busiest_process_cpu_pct_max") is not None:
            line += f", busiest process max {t['busiest_process_cpu_pct_max']:.0f}%"
            if t["busiest_process_cpu_pct_max"] > 90:
                line += " (a worker was saturated: the tool may have limited this run; add --procs)"
        L.append(line)
    return L


def format_text(r: dict) -> str:
    if r["scenario"] == "ingest":
        return format_ingest(r)
    plan = r["plan"]
    L = []
    where = f"{plan['host']}:{plan['port']}"
    proto = (plan["protocol"] + (" 5" if plan.get("mqtt_version") == "5" and plan["protocol"] == "mqtt" else "")
             + ("+ws" if plan.get("transport") == "ws" else "") + ("+tls" if plan["tls"] else ""))
    if r["scenario"] == "connection":
        L.append(f"gw bench connection: {where} ({proto}), {r['clients']:,} clients, ramp {plan['rampup']:g} s, "
                 f"hold {plan['duration']:g} s, keepalive {plan['keepalive']} s, {plan['procs']} process(es)")
    else:
        L.append(f"gw bench pubsub: {where} ({proto}), {plan['publishers']} publisher(s) -> "
                 f"{plan['subscribers']} subscriber(s), QoS {plan['qos']}, {plan['size']} B, "
                 f"rate {'flat out' if not plan['rate'] else format(plan['rate'], ',.0f') + ' msg/s'}, "
                 f"topics {plan['topic_mode']}, {plan['procs']} process(es)")
    L.append(f"Total Duration: {r['elapsed_s']:.2f}s / Total Clients: {r['clients']:,} / "
             f"Connected Successfully: {r['connected']:,} / Failed Connections: {r['failed']:,} / "
             f"Success Rate: {r['success_rate_pct']:.1f}%")
    extra = []
    if r["not_started"]:
        extra.append(f"not started {r['not_started']:,}")
    if r["dropped"]:
        extra.append(f"dropped by server {r['dropped']:,}")
    extra.append(f"disconnected cleanly {r['disconnected']:,}")
    L.append("Clients: " + " / ".join(extra))
    cm = r["connect_ms"]
    if cm.get("count"):
        ph = r["connect_phases_ms"]
        phases = f"tcp p99 {_fmt_ms(ph['tcp'].get('p99_ms'))}"
        if plan["tls"]:
            phases += f", tls p99 {_fmt_ms(ph['tls'].get('p99_ms'))}"
        phases += f", {'connack' if plan['protocol'] == 'mqtt' else 'reply'} p99 {_fmt_ms(ph['connack'].get('p99_ms'))}"
        hello = "CONNECT->CONNACK" if plan["protocol"] == "mqtt" else "Connect->Connect reply"
        L.append(f"Connect time (TCP{'+TLS' if plan['tls'] else ''}+{hello}): "
                 f"avg {_fmt_ms(cm['mean_ms'])} / p50 {_fmt_ms(cm['p50_ms'])} / p99 {_fmt_ms(cm['p99_ms'])} / "
                 f"max {_fmt_ms(cm['max_ms'])}   ({phases})")
    lag = r.get("ramp_lag_ms", {})
    if lag.get("count"):
        line = (f"Ramp: connects started on schedule within p50 {_fmt_ms(lag['p50_ms'])} / "
                f"p99 {_fmt_ms(lag['p99_ms'])} / max {_fmt_ms(lag['max_ms'])}")
        if lag["p99_ms"] > 100:
            line += " (the tool fell behind its schedule: add --procs)"
        L.append(line)
    m = r["messages"]
    if r["scenario"] == "connection":
        L.append(f"Messages Sent: {m['sent']:,} / Messages Received: {m['received']:,} / "
                 f"Bytes Sent: {_fmt_bytes(m['bytes_sent'])} / Bytes Received: {_fmt_bytes(m['bytes_received'])} / "
                 f"Messages/sec: {m['sent_per_s']:,.1f} / Throughput KB/s: "
                 f"{(m['bytes_sent_per_s'] + m['bytes_received_per_s']) / 1024:,.1f}")
        if plan["qos"]:
            L.append(f"PUBACKs: {m['acked']:,} / unacknowledged {m['unacked']:,} / "
                     + (f"rejected (reason code >= 0x80) {m['rejected']:,} / " if m.get("rejected") else "")
                     + _lat_line(r.get("puback_ms", {})))
        pr = r["ping_rtt_ms"]
        if pr.get("count"):
            L.append(f"Keepalive: {pr['count']:,} PINGRESP, rtt p50 {_fmt_ms(pr['p50_ms'])} / p99 {_fmt_ms(pr['p99_ms'])}")
    else:
        L.append(f"Messages Sent: {m['sent']:,} / Messages Received: {m['received']:,} / "
                 f"Bytes Sent: {_fmt_bytes(m['bytes_sent'])} / Bytes Received: {_fmt_bytes(m['bytes_received'])}")
        L.append(f"Messages/sec: out {m['sent_per_s']:,.0f} (over the {m['publish_window_s']:.1f} s publish window)"
                 f" / in {m['received_per_s_active']:,.0f} (first to last message received; peak second "
                 f"{m.get('received_per_s_peak', 0):,.0f}) / Throughput KB/s: out "
                 f"{m['bytes_sent_per_s'] / 1024:,.1f}, in {m['bytes_received_per_s'] / 1024:,.1f}")
        if "publishers_waiting_pct" in m:
            L.append(f"Publishers waited on the broker (TCP backpressure{' or full inflight window' if plan['qos'] else ''}) "
                     f"{m['publishers_waiting_pct']:.1f}% of the publish time")
        L.append("Latency (end-to-end): " + _lat_line(r["latency_ms"]))
        if plan["qos"]:
            L.append(f"Publish -> {'PUBACK' if plan['qos'] == 1 else 'PUBCOMP'}: " + _lat_line(r.get("ack_ms", {})))
        d = r["delivery"]
        L.append(f"Delivery: expected {d['expected']:,} / received unique {d['unique']:,} / "
                 f"lost {d['lost']:,} ({d['loss_pct']:.4g}%) / duplicates {d['duplicates']:,} / "
                 f"out of order {d['out_of_order']:,}" + (f" / foreign {d['foreign']:,}" if d["foreign"] else "")
                 + (f" / publishes never acknowledged {m['unacked']:,}" if plan["qos"] else "")
                 + (f" / rejected (reason code >= 0x80) {m['rejected']:,}" if m.get("rejected") else ""))
    L.extend(_closing_lines(r, plan))
    return "\n".join(L)


def _lat_line(h: dict) -> str:
    if not h.get("count"):
        return "no samples"
    return (f"p50 {_fmt_ms(h.get('p50_ms'))} / p90 {_fmt_ms(h.get('p90_ms'))} / p99 {_fmt_ms(h.get('p99_ms'))} / "
            f"p99.9 {_fmt_ms(h.get('p99.9_ms'))} / max {_fmt_ms(h.get('max_ms'))} ({h['count']:,} samples)")


def write_json(r: dict, path: str) -> None:
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    with open(path, "w") as f:
        json.dump(r, f, indent=1, default=default)
        f.write("\n")


def write_plot(r: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'gw[plot]' (or pip install matplotlib)") from None
    ts = r["timeseries"]
    t = [p["t"] for p in ts]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9))
    axes[0].plot(t, [p["connected"] for p in ts], label="connected")
    axes[0].plot(t, [p["failed"] for p in ts], label="failed")
    axes[0].set_ylabel("clients")
    axes[0].legend()
    axes[1].plot(t, [p["out_per_s"] for p in ts], label="out msg/s")
    axes[1].plot(t, [p["in_per_s"] for p in ts], label="in msg/s")
    axes[1].set_ylabel("messages/s")
    axes[1].set_xlabel("seconds")
    axes[1].legend()
    # The latency CDF (connect times for the connection scenario), from the
    # merged histogram: each bucket's upper bound against the share at or below.
    name = "latency" if "latency" in r.get("histograms", {}) else "connect"
    h = r.get("histograms", {}).get(name)
    if h:
        hist = Histogram.from_dict(h)
        nz = np.nonzero(hist.counts)[0]
        if len(nz):
            xs = [bucket_bounds(int(k))[1] / 1e6 for k in nz]
            ys = np.cumsum(hist.counts[nz]) / hist.total
            axes[2].step(xs, ys, where="post")
            axes[2].set_xscale("log")
    axes[2].set_xlabel(f"{'end-to-end latency' if name == 'latency' else 'connect time'} (ms, log scale)")
    axes[2].set_ylabel("fraction at or below")
    axes[2].grid(True, which="both", alpha=0.3)
    fig.suptitle(f"gw bench {r['scenario']}: {r['plan']['host']}:{r['plan']['port']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
