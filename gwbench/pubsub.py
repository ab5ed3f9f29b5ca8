"""The throughput phase of a worker: drives gwbench._ext.pubsub_engine.Engine in
slices, between which it reports progress and reads the coordinator's orders."""
from __future__ import annotations

import ssl
import time

from gwbench._ext.pubsub_engine import ERROR_NAMES, Engine  # noqa: F401  (ImportError = not built)

from . import histogram as H



class PubSubWorker:
    def __init__(self, plan, conns, ctl, setup_engine):
        self.plan = plan
        self.ctl = ctl
        self.setup = setup_engine
        self.conns = conns
        self.eng = Engine(plan.qos, plan.size, plan.publishers, plan.inflight, plan.keepalive,
                          H.MIN_NS, H.GROWTH, H.NBUCKETS, max(1, len(conns)), plan.mqtt_level)
        self.n_pubs_local = 0
        for c in conns:
            is_sub = c.role == "sub"
            pub_id = 0 if is_sub else c.g - plan.subscribers
            topic = b"" if is_sub else plan.publish_topic(pub_id).encode()
            if not is_sub:
                self.n_pubs_local += 1
            self.eng.add(c.fd, c.sock, is_sub, pub_id, topic, bytes(c.inbuf),
                         isinstance(c.sock, ssl.SSLSocket), c.ws is not None,
                         bytes(c.ws.raw) if c.ws is not None else b"",
                         c.ws.remaining if c.ws is not None else 0,
                         c.alias_max, c.recv_max)
        self.epoch = setup_engine.epoch
        self.next_k = setup_engine.next_k
        self.expected = None
        self.notes: list[str] = []
        if plan.qos:
            low = sorted(set(w for w in self.eng.windows().values() if w < plan.inflight))
            if low:
                self.notes.append(f"the server's Receive Maximum ({', '.join(map(str, low))}) is below --inflight "
                                  f"{plan.inflight}: that many publishes in flight per publisher")

    def _snapshot(self) -> dict:
        e = self.eng
        return {
            "live": int(e.live), "pending": 0, "failed": int(self.setup.c["failed"]),
            "dropped": int(e.dropped), "published": int(e.published), "received": int(e.received),
            "errors": sum(self.setup.errors.values()) + sum(e.errors().values()),
        }

    def _slice(self, until_ns: int) -> None:
        mark_ns = int((self.epoch + self.next_k) * 1e9)
        self.eng.run(min(until_ns, mark_ns))
        now = time.monotonic()
        if now >= self.epoch + self.next_k:
            snap = self._snapshot()
            while now >= self.epoch + self.next_k:
                snap["k"] = self.next_k
                self.ctl.send("stats", dict(snap))
                self.next_k += 1
        self.ctl.poll()

    def run(self) -> None:
        plan = self.plan
        # Wait for the common start, keeping subscribers alive meanwhile.
        start = self.ctl.wait_start(time.monotonic() + plan.rampup + plan.connect_timeout + 30.0, self._slice)
        if start is None:
            return
        _, t0, t_stop = start
        hard_end = t_stop + plan.grace - 1.5  # finish before the coordinator's deadline
        self.eng.start(int(t0 * 1e9), plan.rate / plan.publishers if plan.rate else 0.0)
        self.ctl.run_slices(t_stop, self._slice)
        self.eng.stop_publishing()
        # Drain: every publish out of our buffers and (QoS >= 1) acknowledged.
        drain_pub_end = min(hard_end - 2.0, t_stop + max(2.0, plan.grace * 0.5))
        self.ctl.run_slices(drain_pub_end, self._slice, self.eng.publishers_idle)
        if not self.eng.publishers_idle():
            self.notes.append("publishers still had unsent or unacknowledged messages at the end")
        self.ctl.send("pub_done", self.eng.publisher_counts())
        # Wait for the final counts, then until our subscribers have them all
        # (or nothing arrives for 2 s).
        got = None

        def have_expect():
            nonlocal got
            got = self.ctl.take("expect")
            return got is not None

        self.ctl.run_slices(hard_end, self._slice, have_expect)
        if got is None:
            return
        expected = got[1]
        last = [self.eng.received, time.monotonic()]

        def complete():
            if self.eng.subscribers_missing(expected) == 0:
                return True
            now = time.monotonic()
            if self.eng.received != last[0]:
                last[0], last[1] = self.eng.received, now
                return False
            return now - last[1] > 2.0

        self.ctl.run_slices(hard_end, self._slice, complete)

    def result(self, setup: dict) -> dict:
        e = self.eng
        counters = dict(setup["counters"])
        for k, v in (("published", e.published), ("acked", e.acked), ("pingresp", e.pingresp),
                     ("pings", e.pings), ("dropped", e.dropped), ("disconnected", e.disconnected),
                     ("unacked", e.unacked()), ("rejected", e.rejected)):
            counters[k] = counters.get(k, 0) + int(v)
        counters["pub_blocked_ns"] = int(e.blocked_ns)
        counters["pub_active_ns"] = int(e.publish_ns)
        counters["bytes_out"] = counters.get("bytes_out", 0) + int(e.bytes_out)
        counters["bytes_in"] = counters.get("bytes_in", 0) + int(e.bytes_in)
        errors = dict(setup["errors"])
        for k, v in e.errors().items():
            errors[k] = errors.get(k, 0) + int(v)
        if e.last_errno:
            import errno as _errno
            self.notes.append(f"last socket error: {_errno.errorcode.get(e.last_errno, e.last_errno)}")
        hist = dict(setup["hist"])
        for name, d in (("latency", e.latency_hist()), ("ack", e.ack_hist())):
            h = H.Histogram()
            h.add_counts(d["counts"], d["total"], d["sum_ns"], d["min_ns"], d["max_ns"])
            hist[name] = h.to_dict()
        return {
            "counters": counters,
            "errors": errors,
            "hist": hist,
            "subs": {
                "received": int(e.received), "unique": int(e.unique), "duplicates": int(e.duplicates),
                "out_of_order": int(e.out_of_order), "foreign": int(e.foreign),
                "first_rx_ns": int(e.first_rx), "last_rx_ns": int(e.last_rx),
            },
            "notes": self.notes,
        }

    def close(self) -> None:
        try:
            self.eng.disconnect(2.0)
        finally:
            for c in self.conns:
                try:
                    c.sock.close()
                except OSError:
                    pass
