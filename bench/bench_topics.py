"""The subscription index with 100,000 subscriptions: match 100,000 PUBLISH
topic names through ``match_count`` (one C loop, the C match per topic:
local subscribers deduplicated with their highest QoS, and the peer mask).

The subscription mix is what a device fleet looks like from one worker:
``devices/<id>/cmd`` (a device's own commands), ``devices/<id>/+`` (a
per-device backend view), a few ``devices/#`` (monitoring) and ``+/status``.

* pytest-benchmark benchmarks report matches/s (topics matched per second)
  in ``extra_info``;
* ``test_gate_index_vs_python_trie`` is the gate: the index against a
  pure-Python dict trie (the index's algorithm), on a smaller set, same run,
  best of several repetitions: a ratio, never an absolute time. Both are
  checked against the reference matcher of tests/test_topics.py (each filter
  tested against each topic), whose rate is recorded too (it is linear in the
  number of filters, so its ratio says more about the set than the index).
"""

from __future__ import annotations

import random
import time

from gw_ext.topics import TopicIndex
from benchutil import Gate, best_time, check_gate, paired_ratio

N_SUBS = 100_000
N_TOPICS = 100_000
GATE_RATIO = 17             # measured 17.5-37 (BENCHMARKS.md, Speed gates)


def subscriptions(total: int, seed: int = 3) -> list[tuple[str, int, int]]:
    """(filter, subscriber, qos), `total` of them."""
    rng = random.Random(seed)
    devices = total // 2 - 5
    out = [(f"devices/{i}/cmd", i, 1) for i in range(devices)]                        # exact
    out += [(f"devices/{i + devices // 2}/+", devices + i, rng.randint(0, 2))           # one level
            for i in range(total - len(out) - 10)]
    out += [("devices/#", 2 * devices + i, 0) for i in range(5)]                       # monitoring
    out += [("+/status", 2 * devices + 5 + i, 1) for i in range(5)]
    assert len(out) == total
    return out


def topics(count: int, id_range: int, seed: int = 4) -> list[bytes]:
    rng = random.Random(seed)
    leaves = ["cmd", "status", "telemetry", "cmd/ack"]
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.95:
            out.append(f"devices/{rng.randrange(id_range * 5 // 4)}/{rng.choice(leaves)}")
        elif r < 0.98:
            out.append(f"gateways/{rng.randrange(100)}/status")
        else:
            out.append(f"$SYS/broker/load/{rng.randrange(10)}")
    return [t.encode() for t in out]


def peer_interests(subs: list[tuple[str, int, int]]) -> list[tuple[str, int]]:
    # Other workers' devices and monitors: a share of the same filters.
    return [(f, (s % 7) + 1) for f, s, _ in subs[::50]] + [("devices/#", 9), ("+/status", 10)]


def build(subs, peers) -> TopicIndex:
    idx = TopicIndex()
    for f, s, q in subs:
        idx.subscribe(f, s, q)
    for f, w in peers:
        idx.add_peer(f, w)
    return idx


SUBS = subscriptions(N_SUBS)
PEERS = peer_interests(SUBS)
TOPICS = topics(N_TOPICS, N_SUBS // 2)


# --- pure-Python baselines ---------------------------------------------------------

def ref_matches(topic_filter: str, topic: str) -> bool:
    """The reference matcher of tests/test_topics.py (MQTT 3.1.1 section 4.7)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def ref_count(subs, peers, topic_list: list[bytes]) -> int:
    """What match_count returns, from the reference: per topic, matching
    subscribers (once each, highest QoS) plus the peer bits."""
    total = 0
    for raw in topic_list:
        topic = raw.decode()
        out: dict[int, int] = {}
        mask = 0
        for f, s, q in subs:
            if ref_matches(f, topic):
                out[s] = max(q, out.get(s, 0))
        for f, w in peers:
            if ref_matches(f, topic):
                mask |= 1 << w
        total += len(out) + bin(mask).count("1")
    return total


class DictTrie:
    """A pure-Python trie: nested dicts, '+' and '#' as keys; the same walk as the index."""

    def __init__(self, subs, peers):
        self.root: dict = {}
        for f, s, q in subs:
            self._node(f).setdefault(None, [{}, 0])[0][s] = q
        for f, w in peers:
            self._node(f).setdefault(None, [{}, 0])[1] |= 1 << w

    def _node(self, f: str) -> dict:
        n = self.root
        for level in f.split("/"):
            n = n.setdefault(level, {})
        return n

    def count(self, topic_list: list[bytes]) -> int:
        total = 0
        for raw in topic_list:
            levels = raw.decode().split("/")
            nl = len(levels)
            wild = not levels[0].startswith("$")
            out: dict[int, int] = {}
            mask = 0
            hits = []
            stack = [(self.root, 0)]
            while stack:
                n, i = stack.pop()
                if i == nl:
                    hits.append(n.get(None))
                    m = n.get("#")
                    if m:
                        hits.append(m.get(None))
                    continue
                if i or wild:
                    m = n.get("#")
                    if m:
                        hits.append(m.get(None))
                    p = n.get("+")
                    if p:
                        stack.append((p, i + 1))
                k = n.get(levels[i])
                if k:
                    stack.append((k, i + 1))
            for h in hits:
                if h:
                    for s, q in h[0].items():
                        if q > out.get(s, -1):
                            out[s] = q
                    mask |= h[1]
            total += len(out) + bin(mask).count("1")
        return total


# --- benchmarks ------------------------------------------------------------------


def record_rate(benchmark, fn, count: int):
    """matches/s into extra_info, from the benchmark's best round when it ran
    (not under --benchmark-disable), else from our own best of 5."""
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.min if stats is not None else best_time(fn, 5)
    benchmark.extra_info["subscriptions"] = N_SUBS
    benchmark.extra_info["topics"] = count
    benchmark.extra_info["matches_per_s"] = round(count / seconds)


def test_match_100k_topics_100k_subscriptions(benchmark):
    idx = build(SUBS, PEERS)
    assert len(idx) == N_SUBS
    expected = idx.match_count(TOPICS[:2000])
    assert expected == DictTrie(SUBS, PEERS).count(TOPICS[:2000])
    benchmark.extra_info["nodes"] = idx.node_count
    benchmark.extra_info["index_bytes"] = idx.bytes_used
    fn = lambda: idx.match_count(TOPICS)                  # noqa: E731
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
    record_rate(benchmark, fn, N_TOPICS)


def test_subscribe_and_remove_100k(benchmark):
    """Building the index from nothing and tearing it down by session."""
    subscribers = sorted({s for _, s, _ in SUBS})

    def run():
        idx = build(SUBS, [])
        for s in subscribers:
            idx.remove_subscriber(s)
        assert idx.node_count == 0 and idx.bytes_used == 0

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["subscriptions"] = N_SUBS


# A smaller set for the gate: the reference tests every filter per topic.
GATE_SUBS = subscriptions(1000, seed=5)
GATE_PEERS = peer_interests(GATE_SUBS)
GATE_TOPICS = topics(1000, 500, seed=6)


_REFERENCE: list = []


def _reference() -> tuple[int, float]:
    """The reference matcher's count for the gate's set and its time (once: a second)."""
    if not _REFERENCE:
        start = time.perf_counter()
        count = ref_count(GATE_SUBS, GATE_PEERS, GATE_TOPICS)
        _REFERENCE.extend((count, time.perf_counter() - start))
    return _REFERENCE[0], _REFERENCE[1]


def topics_ratio() -> tuple[float, dict]:
    """The index against the dict trie (its algorithm in pure Python) on the same
    topics and subscriptions, both checked against the reference matcher."""
    idx = build(GATE_SUBS, GATE_PEERS)
    trie = DictTrie(GATE_SUBS, GATE_PEERS)
    expected, reference = _reference()
    assert idx.match_count(GATE_TOPICS) == expected == trie.count(GATE_TOPICS)
    ratio, index, python_trie = paired_ratio(lambda: idx.match_count(GATE_TOPICS),
                                             lambda: trie.count(GATE_TOPICS), 15)
    return ratio, {"index_matches_per_s": round(len(GATE_TOPICS) / index),
                   "python_trie_matches_per_s": round(len(GATE_TOPICS) / python_trie),
                   "reference_matches_per_s": round(len(GATE_TOPICS) / reference),
                   "ratio_vs_reference": round(reference / index)}


GATE = Gate("topics", topics_ratio, GATE_RATIO, "the topic index vs a pure-Python dict trie")


def test_gate_index_vs_python_trie(request):
    check_gate(GATE, request)
