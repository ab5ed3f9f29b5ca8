"""What one ACL check costs a message, with 1,000 rules and with 2.

The worker's path (gw_ext/acl.pyx `acl_allowed`, through `AclSession`):
a session checking the topic it keeps publishing on is answered from its
cache; a topic it has not seen is matched once in its user's rules trie.
Each benchmark runs N_CHECKS checks in one C loop (`allowed_many`) and
records checks/s in ``extra_info``; no gate (a record for BENCHMARKS.md):
the cached check must not depend on the number of rules, the cold one only
on the topic's levels, not on the rules' count as a linear scan would.
"""

from __future__ import annotations

import time

from gw.acl import READ, WRITE, parse_acl
from gw_ext.acl import AclRules, AclSession

N_CHECKS = 1_000_000
TOPIC = b"bench/acl/p/0"


def acl_rules(n: int) -> AclRules:
    lines = ["user bench"] + [f"topic readwrite filler/{i}/+/data" for i in range(n - 2)]
    lines += ["topic deny filler/secret/#", "topic readwrite bench/acl/#"]
    return AclRules(parse_acl("\n".join(lines) + "\n"))


def rate(fn, count: int) -> int:
    best = min(_timed(fn) for _ in range(5))
    return round(count / best)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cached(benchmark, n_rules: int):
    session = AclSession(acl_rules(n_rules), b"bench", b"client-1")
    assert session.allowed(TOPIC, WRITE)

    def run():
        assert session.allowed_many(TOPIC, WRITE, N_CHECKS) == N_CHECKS

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["rules"] = n_rules
    benchmark.extra_info["checks_per_s"] = rate(run, N_CHECKS)


def test_cached_check_1000_rules(benchmark):
    _cached(benchmark, 1000)


def test_cached_check_2_rules(benchmark):
    _cached(benchmark, 2)


def test_cold_check_1000_rules(benchmark):
    """Every check a topic the session has not cached: 20 topics longer than a
    cache entry holds, so each goes to the trie."""
    rules = acl_rules(1000)
    session = AclSession(rules, b"bench", b"client-1")
    topics = [b"bench/acl/" + b"x" * 60 + b"/%d" % i for i in range(20)]
    assert all(session.allowed(t, READ) for t in topics)

    def run():
        for t in topics:
            session.allowed_many(t, READ, N_CHECKS // 100)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["rules"] = 1000
    benchmark.extra_info["checks_per_s"] = rate(run, len(topics) * (N_CHECKS // 100))
