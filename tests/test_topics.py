"""The subscription index (gw_ext.topics) against a pure-Python reference.

Explicit cases for the MQTT 3.1.1 matching rules, each named after the
statement it checks; property tests comparing every match with a
straightforward reference matcher (`ref_matches`, one filter at a time); a
state machine driving subscribe / unsubscribe / remove_subscriber / peer
interest against a model, checking the 0->1 and 1->0 transitions, every
enumeration, and that the trie holds exactly the nodes the live filters need
in its path-compressed shape, whatever the order of operations (so memory
returns: zero nodes and zero bytes once everything is removed).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gw_ext.topics import TopicIndex

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the reference -------------------------------------------------------------

def ref_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7, one filter against one topic name."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):       # MQTT-4.7.2-1
        return False
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":                # this level, the parent's, and everything below
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


class RefIndex:
    """The model: filter -> {subscriber: qos}, filter -> {peer workers}."""

    def __init__(self):
        self.subs: dict[str, dict[int, int]] = {}
        self.peers: dict[str, set[int]] = {}

    def match(self, topic: str) -> tuple[dict[int, int], int]:
        out: dict[int, int] = {}
        mask = 0
        for f, subs in self.subs.items():
            if ref_matches(f, topic):
                for s, q in subs.items():
                    out[s] = max(q, out.get(s, 0))          # MQTT-3.3.5-1: once, highest QoS
        for f, workers in self.peers.items():
            if ref_matches(f, topic):
                for w in workers:
                    mask |= 1 << w
        return out, mask

    def live_filters(self) -> set[str]:
        return {f for f, s in self.subs.items() if s} | {f for f, w in self.peers.items() if w}

    def node_count(self) -> int:
        """Trie nodes needed (the path-compressed shape): one per level prefix
        of a live filter that is itself live, ends with a wildcard, is where
        two paths part, or is followed by a wildcard; the levels between them
        share a node."""
        live = self.live_filters()
        prefixes: set[tuple[str, ...]] = set()
        for f in live:
            levels = f.split("/")
            prefixes.update(tuple(levels[:k]) for k in range(1, len(levels) + 1))
        after: dict[tuple[str, ...], set[str]] = {}
        for p in prefixes:
            after.setdefault(p[:-1], set()).add(p[-1])
        live_levels = {tuple(f.split("/")) for f in live}
        return sum(1 for p in prefixes
                   if p in live_levels or p[-1] in ("+", "#")
                   or len(after.get(p, ())) >= 2 or after.get(p, set()) & {"+", "#"})


# --- explicit cases ---------------------------------------------------------------

def index_with(*filters: str) -> TopicIndex:
    idx = TopicIndex()
    for i, f in enumerate(filters):
        idx.subscribe(f, i, 0)
    return idx


def index_of(*subscriptions: tuple[str, int, int]) -> TopicIndex:
    """A TopicIndex holding each (filter, subscriber, QoS)."""
    idx = TopicIndex()
    for topic_filter, subscriber, qos in subscriptions:
        idx.subscribe(topic_filter, subscriber, qos)
    return idx


def matching(idx: TopicIndex, topic: str, filters: tuple[str, ...]) -> set[str]:
    return {filters[s] for s in idx.match(topic)[0]}


def test_multi_level_wildcard_MQTT_4_7_1_2():
    """'#' matches its parent and any number of levels below (section 4.7.1.2:
    'sport/tennis/player1/#' matches 'sport/tennis/player1' and below; 'sport/#'
    also matches the singular 'sport')."""
    filters = ("sport/tennis/player1/#", "sport/#", "#", "sport/tennis/#", "sport/tennis/player1")
    idx = index_with(*filters)
    assert matching(idx, "sport/tennis/player1", filters) == set(filters)
    assert matching(idx, "sport/tennis/player1/ranking", filters) == set(filters) - {"sport/tennis/player1"}
    assert matching(idx, "sport/tennis/player1/score/wimbledon", filters) == set(filters) - {"sport/tennis/player1"}
    assert matching(idx, "sport", filters) == {"sport/#", "#"}
    assert matching(idx, "sports", filters) == {"#"}
    assert matching(idx, "sport/tennis", filters) == {"sport/#", "#", "sport/tennis/#"}


@pytest.mark.parametrize("bad", ["sport/tennis#", "sport/tennis/#/ranking", "#/", "a/#/", "##", "a/b#"])
def test_multi_level_wildcard_last_and_alone_MQTT_4_7_1_2(bad):
    idx = TopicIndex()
    with pytest.raises(ValueError):
        idx.subscribe(bad, 1, 0)
    with pytest.raises(ValueError):
        idx.add_peer(bad, 1)
    assert idx.node_count == 0 and not idx.unsubscribe(bad, 1) and idx.count(bad) == 0


def test_single_level_wildcard_MQTT_4_7_1_3():
    """'+' matches exactly one level, at any position, including an empty one
    (section 4.7.1.3: 'sport/tennis/+' matches 'sport/tennis/player1' but not
    'sport/tennis/player1/ranking'; 'sport/+' does not match 'sport' but does
    match 'sport/'; '+/+' and '/+' match '/finance'; '+' does not)."""
    filters = ("sport/tennis/+", "sport/+", "+", "+/+", "/+", "+/tennis/#")
    idx = index_with(*filters)
    assert matching(idx, "sport/tennis/player1", filters) == {"sport/tennis/+", "+/tennis/#"}
    assert matching(idx, "sport/tennis/player1/ranking", filters) == {"+/tennis/#"}
    assert matching(idx, "sport", filters) == {"+"}
    assert matching(idx, "sport/", filters) == {"sport/+", "+/+"}
    assert matching(idx, "/finance", filters) == {"+/+", "/+"}
    assert matching(idx, "sport/tennis", filters) == {"sport/+", "+/+", "+/tennis/#"}


@pytest.mark.parametrize("bad", ["sport+", "sport/+tennis", "+a", "a/b+/c", "++"])
def test_single_level_wildcard_whole_level_MQTT_4_7_1_3(bad):
    idx = TopicIndex()
    with pytest.raises(ValueError):
        idx.subscribe(bad, 1, 0)
    assert idx.node_count == 0


def test_names_are_literal_MQTT_4_7_1_1():
    """Wildcards belong to filters only: in a name (the codec rejects them, the
    index assumes it did) a character is just a character, and an exact filter
    containing what a name contains matches only that name."""
    filters = ("a/b", "a/+", "a/b/c")
    idx = index_with(*filters)
    assert matching(idx, "a/b", filters) == {"a/b", "a/+"}
    assert matching(idx, "a/bb", filters) == {"a/+"}
    assert matching(idx, "a/b/c", filters) == {"a/b/c"}
    assert matching(idx, "a", filters) == set()


def test_empty_levels_are_levels():
    """'a//b' has three levels, the middle one empty; a leading or trailing '/'
    makes an empty first or last level (section 4.7.3)."""
    filters = ("a//b", "a/+/b", "a/+", "+/+/+", "/", "+/+", "/#", "a/", "#")
    idx = index_with(*filters)
    assert matching(idx, "a//b", filters) == {"a//b", "a/+/b", "+/+/+", "#"}
    assert matching(idx, "a/", filters) == {"a/+", "+/+", "a/", "#"}
    assert matching(idx, "/", filters) == {"/", "+/+", "/#", "#"}
    assert matching(idx, "//", filters) == {"+/+/+", "/#", "#"}
    assert matching(idx, "/x", filters) == {"+/+", "/#", "#"}


def test_dollar_topics_not_matched_by_leading_wildcards_MQTT_4_7_2_1():
    filters = ("#", "+/monitor/Clients", "$SYS/#", "$SYS/monitor/+", "+", "+/#", "$SYS/+/Clients")
    idx = index_with(*filters)
    assert matching(idx, "$SYS/monitor/Clients", filters) == {"$SYS/#", "$SYS/monitor/+", "$SYS/+/Clients"}
    assert matching(idx, "$SYS", filters) == {"$SYS/#"}
    assert matching(idx, "$", filters) == set()
    assert matching(idx, "x/$SYS", filters) == {"#", "+/#"}
    assert matching(idx, "a/monitor/Clients", filters) == {"#", "+/monitor/Clients", "+/#"}
    idx.add_peer("#", 3)
    idx.add_peer("$SYS/#", 4)
    assert idx.match("$SYS/x")[1] == 1 << 4
    assert idx.match("x")[1] == 1 << 3


def test_no_normalisation_MQTT_4_7_3_4():
    """Case, spaces and Unicode are compared byte for byte."""
    filters = ("ACCOUNTS", "accounts/ x", "caf\u00e9", "cafe\u0301")
    idx = index_with(*filters)
    assert matching(idx, "ACCOUNTS", filters) == {"ACCOUNTS"}
    assert matching(idx, "Accounts", filters) == set()
    assert matching(idx, "accounts/x", filters) == set()
    assert matching(idx, "accounts/ x", filters) == {"accounts/ x"}
    assert matching(idx, "caf\u00e9", filters) == {"caf\u00e9"}


def test_empty_filter_rejected_MQTT_4_7_3_1():
    idx = TopicIndex()
    with pytest.raises(ValueError):
        idx.subscribe("", 1, 0)
    with pytest.raises(ValueError):
        idx.add_peer("", 1)
    assert idx.node_count == 0


def test_overlapping_subscriptions_once_with_max_qos_MQTT_3_3_5_1():
    idx = index_of(("a/#", 7, 0), ("a/+", 7, 2), ("a/b", 7, 1), ("#", 8, 1), ("a/b", 8, 0), ("+/+", 9, 0))
    assert idx.match("a/b") == ({7: 2, 8: 1, 9: 0}, 0)
    assert idx.match("a") == ({7: 0, 8: 1}, 0)
    assert idx.match("a/c") == ({7: 2, 8: 1, 9: 0}, 0)
    assert idx.match_count([b"a/b", b"a", b"a/c"]) == 3 + 2 + 3


def test_resubscribe_replaces_qos_MQTT_3_8_4_3():
    idx = TopicIndex()
    assert idx.subscribe("a/b", 1, 2) is True
    assert idx.subscribe("a/b", 1, 0) is False          # same filter: replaced, not added
    assert idx.match("a/b") == ({1: 0}, 0)
    assert idx.count("a/b") == 1 and len(idx) == 1
    assert idx.subscriptions(1) == [("a/b", 0)]
    assert idx.subscribe("a/b", 2, 1) is False
    assert idx.subscribe("a/b", 1, 1) is False
    assert idx.match("a/b") == ({1: 1, 2: 1}, 0)
    assert idx.unsubscribe("a/b", 1) is False
    assert idx.unsubscribe("a/b", 1) is False           # not subscribed any more
    assert idx.unsubscribe("a/b", 2) is True            # last one: 1 -> 0
    assert idx.node_count == 0 and idx.bytes_used == 0


def test_invalid_arguments():
    idx = TopicIndex()
    with pytest.raises(ValueError):
        idx.subscribe("a", 1, 3)
    with pytest.raises(ValueError):
        idx.subscribe("a", 0x7FFFFFFF, 0)
    with pytest.raises(ValueError):
        idx.add_peer("a", 64)
    assert idx.remove_peer("a", 64) is False and idx.clear_peer(64) == 0
    assert idx.remove_subscriber(12345) == [] and idx.subscriptions(12345) == []
    assert idx.unsubscribe("a", 99999) is False
    with pytest.raises(TypeError):
        idx.match_count(["not bytes"])


def test_peer_interest_is_idempotent():
    idx = TopicIndex()
    assert idx.add_peer("a/+", 0) is True
    assert idx.add_peer("a/+", 0) is False
    assert idx.add_peer("a/#", 63) is True
    assert idx.match("a/b") == ({}, 1 | 1 << 63)
    assert idx.filters() == []                          # peer interest is not a local filter
    assert idx.remove_peer("a/+", 0) is True
    assert idx.remove_peer("a/+", 0) is False
    assert idx.remove_peer("x/y", 0) is False
    assert idx.match("a/b") == ({}, 1 << 63)
    assert idx.node_count == 2
    assert idx.remove_peer("a/#", 63) is True
    assert idx.node_count == 0 and idx.bytes_used == 0


def test_clear_peer_over_wide_nodes():
    """A crashed worker's interests go, including across hash-table shrinks
    that happen while the walk is pruning (the walk must not skip a sibling)."""
    idx = TopicIndex()
    n = 5000
    for i in range(n):
        idx.add_peer(f"d/{i}/x", 3)
        if i % 7 == 0:
            idx.add_peer(f"d/{i}/+", 4)
        if i % 11 == 0:
            idx.subscribe(f"d/{i}/#", i, 1)
    assert idx.clear_peer(3) == n
    assert idx.clear_peer(3) == 0
    for i in range(0, n, 13):
        subs, peers = idx.match(f"d/{i}/x")
        assert peers == (1 << 4 if i % 7 == 0 else 0)
        assert subs == ({i: 1} if i % 11 == 0 else {})
    keep = {i for i in range(n) if i % 7 == 0 or i % 11 == 0}
    # d, then per kept i: d/i, and its '+' and/or '#'
    assert idx.node_count == 1 + len(keep) + sum((i % 7 == 0) + (i % 11 == 0) for i in keep)
    assert idx.clear_peer(4) == len([i for i in range(n) if i % 7 == 0])
    for i in range(0, n, 11):
        assert idx.remove_subscriber(i) == [f"d/{i}/#"]
    assert idx.node_count == 0 and idx.bytes_used == 0


def test_wide_node_grows_and_shrinks():
    """20k ids under one level: hash-table children, then every id removed in
    random order; each step past a resize must keep lookups right."""
    idx = TopicIndex()
    n = 20_000
    ids = list(range(n))
    for i in ids:
        assert idx.subscribe(f"devices/{i}/cmd", i, i % 3) is True
        assert idx.subscribe(f"devices/{i}/+", i, 0) is True
    assert idx.node_count == 1 + 3 * n
    assert idx.match("devices/123/cmd") == ({123: 123 % 3}, 0)
    assert idx.match("devices/123/status") == ({123: 0}, 0)
    assert idx.match("devices/x123/cmd") == ({}, 0)
    random.Random(5).shuffle(ids)
    for k, i in enumerate(ids):
        assert sorted(idx.remove_subscriber(i)) == sorted([f"devices/{i}/cmd", f"devices/{i}/+"])
        if k % 997 == 0:
            for j in ids[k + 1:k + 40]:
                assert idx.match(f"devices/{j}/cmd") == ({j: j % 3}, 0)   # max of QoS j % 3 and 0
            assert idx.match(f"devices/{i}/cmd") == ({}, 0)
    assert idx.node_count == 0 and idx.bytes_used == 0 and len(idx) == 0


def test_remove_subscriber_reports_only_last_ones():
    idx = index_of(("a/b", 1, 1), ("a/+", 1, 2), ("#", 1, 0), ("a/+", 2, 0))
    idx.add_peer("a/b", 5)
    assert sorted(idx.subscriptions(1)) == [("#", 0), ("a/+", 2), ("a/b", 1)]
    assert sorted(idx.filters()) == ["#", "a/+", "a/b"]
    assert sorted(idx.remove_subscriber(1)) == ["#", "a/b"]
    assert idx.subscriptions(1) == [] and idx.remove_subscriber(1) == []
    assert idx.filters() == ["a/+"]
    assert idx.match("a/b") == ({2: 0}, 1 << 5)
    assert idx.node_count == 3                          # a, a/b (peer), a/+


def test_many_subscribers_on_one_filter():
    """The match result grows past its first allocation; swap-with-last removal
    from a long subscriber list keeps the back-references right."""
    idx = TopicIndex()
    for s in range(3000):
        idx.subscribe("alerts/#", s, s % 3)
        idx.subscribe(f"alerts/{s % 10}", s, 0)
    subs, _ = idx.match("alerts/3")
    assert subs == {s: s % 3 for s in range(3000)}
    for s in range(0, 3000, 2):
        idx.unsubscribe("alerts/#", s)
    subs, _ = idx.match("alerts/3")
    assert subs == {s: (s % 3 if s % 2 else 0) for s in range(3000) if s % 2 or s % 10 == 3}
    for s in range(3000):
        assert sorted(idx.subscriptions(s)) == sorted(
            [(f"alerts/{s % 10}", 0)] + ([("alerts/#", s % 3)] if s % 2 else []))
    for s in reversed(range(3000)):
        idx.remove_subscriber(s)
    assert idx.node_count == 0 and idx.bytes_used == 0


def test_deep_filters_and_topics():
    """Tens of thousands of levels: every walk is iterative (no C recursion)."""
    idx = TopicIndex()
    deep = "/".join(["a"] * 20_000)
    assert idx.subscribe(deep + "/#", 1, 1)
    assert idx.subscribe("/" * 30_000, 2, 2)
    assert idx.subscribe("+/" * 100 + "#", 3, 0)
    assert idx.match(deep) == ({1: 1, 3: 0}, 0)
    assert idx.match(deep + "/b/c") == ({1: 1, 3: 0}, 0)
    assert idx.match("/" * 30_000) == ({2: 2, 3: 0}, 0)
    assert idx.match("/" * 29_999) == ({3: 0}, 0)
    assert sorted(idx.filters()) == sorted([deep + "/#", "/" * 30_000, "+/" * 100 + "#"])
    idx.add_peer(deep, 9)
    assert idx.clear_peer(9) == 1
    assert idx.remove_subscriber(1) == [deep + "/#"]
    assert idx.remove_subscriber(2) == ["/" * 30_000]
    assert idx.remove_subscriber(3) == ["+/" * 100 + "#"]
    assert idx.node_count == 0 and idx.bytes_used == 0


def test_a_run_of_exact_levels_is_one_node():
    """A filter whose levels branch nowhere is one node, however many levels it
    has; it matches exactly its own name, not a prefix, a longer name or a
    name differing in one level, nor one level split in two."""
    idx = TopicIndex()
    levels = [f"l{i}" for i in range(128)]
    f = "/".join(levels)
    assert idx.subscribe(f, 1, 1)
    assert idx.node_count == 1
    assert idx.bytes_used < len(f) + 200
    assert idx.match(f) == ({1: 1}, 0)
    assert idx.match("/".join(levels[:-1])) == ({}, 0)
    assert idx.match(f + "/x") == ({}, 0)
    assert idx.match(f + "/") == ({}, 0)
    assert idx.match(f.replace("l64", "l65", 1)) == ({}, 0)
    assert idx.match(f.replace("l64", "l6/4", 1)) == ({}, 0)
    assert idx.match(f.replace("/l64/", "/l64l65/", 1).replace("/l65/", "/", 1)) == ({}, 0)
    assert idx.count(f) == 1 and idx.count("/".join(levels[:64])) == 0
    assert idx.unsubscribe("/".join(levels[:64]), 1) is False and idx.node_count == 1
    assert idx.remove_peer("/".join(levels[:64]), 1) is False and idx.node_count == 1
    assert idx.subscriptions(1) == [(f, 1)] and idx.filters() == [f]
    assert idx.remove_subscriber(1) == [f]
    assert idx.node_count == 0 and idx.bytes_used == 0


def test_parting_paths_split_and_merge_back():
    """A filter parting from a label inside it splits the node there (at a level
    boundary, never inside a level); removing it merges the parts again, also
    when the child moves to a larger allocation with children and subscribers
    of its own (their references follow it)."""
    idx = TopicIndex()
    idx.subscribe("a/b/c/d", 1, 1)
    idx.subscribe("a/b/cx", 2, 2)            # parts inside level 'c': split after 'a/b'
    assert idx.node_count == 3               # a/b, c/d, cx
    idx.subscribe("a/b", 3, 0)               # ends at the split: that node
    assert idx.node_count == 3
    idx.subscribe("a", 4, 0)                 # ends inside the label 'a/b': split
    assert idx.node_count == 4               # a, b, c/d, cx
    idx.subscribe("a/+/c/d", 5, 1)
    assert idx.node_count == 6               # + and its c/d
    for t, subs in [("a/b/c/d", {1: 1, 5: 1}), ("a/b/cx", {2: 2}), ("a/b", {3: 0}), ("a", {4: 0}),
                    ("a/b/c", {}), ("a/z/c/d", {5: 1}), ("a/b/c/d/e", {})]:
        assert idx.match(t) == (subs, 0), t
    assert idx.unsubscribe("a/+/c/d", 5) and idx.unsubscribe("a", 4) and idx.unsubscribe("a/b", 3)
    assert idx.node_count == 3
    assert idx.unsubscribe("a/b/cx", 2)
    assert idx.node_count == 1               # merged back: a/b/c/d
    assert idx.match("a/b/c/d") == ({1: 1}, 0)
    # A merge that must move the child: 'q' (one byte of label) absorbs 'p'.
    for s in range(10, 20):
        idx.subscribe("p/q", s, s % 3)
    idx.subscribe("p/q/r", 30, 1)
    idx.subscribe("p/q/+", 31, 2)
    idx.add_peer("p/q/#", 7)
    idx.subscribe("p/other", 32, 0)
    nodes = idx.node_count
    assert idx.unsubscribe("p/other", 32)
    assert idx.node_count == nodes - 2       # 'other' gone, 'p' merged into 'q'
    assert idx.match("p/q") == ({s: s % 3 for s in range(10, 20)}, 1 << 7)
    assert idx.match("p/q/r") == ({30: 1, 31: 2}, 1 << 7)
    for s in range(10, 20):
        assert idx.subscriptions(s) == [("p/q", s % 3)]
    assert sorted(idx.filters()) == ["a/b/c/d", "p/q", "p/q/+", "p/q/r"]
    for s in [*range(10, 20), 30, 31, 1]:
        idx.remove_subscriber(s)
    assert idx.clear_peer(7) == 1
    assert idx.node_count == 0 and idx.bytes_used == 0


def test_clear_peer_merges():
    idx = TopicIndex()
    idx.add_peer("a/b/c", 1)
    idx.subscribe("a/b/d", 2, 1)
    idx.add_peer("x/y", 1)
    assert idx.node_count == 4
    assert idx.clear_peer(1) == 2
    assert idx.node_count == 1 and idx.match("a/b/d") == ({2: 1}, 0)
    assert idx.remove_subscriber(2) == ["a/b/d"]
    assert idx.node_count == 0 and idx.bytes_used == 0


def test_longest_filter_and_name():
    """A filter is at most 65535 bytes (MQTT's string length); the longest has
    65536 empty levels, one more than a 16-bit count holds, and works."""
    idx = TopicIndex()
    longest = "/" * 65535
    assert idx.subscribe(longest, 1, 2)
    assert idx.add_peer(longest, 3)
    assert idx.subscribe("/" * 65534 + "#", 2, 0)
    assert idx.node_count == 3               # 65535 empty levels, then '' and '#' under it
    assert idx.match(longest) == ({1: 2, 2: 0}, 1 << 3)
    assert idx.match("/" * 65534) == ({2: 0}, 0)
    assert idx.match("/" * 65533 + "x") == ({}, 0)
    assert sorted(idx.filters()) == sorted([longest, "/" * 65534 + "#"])
    for bad in ("/" * 65536, "a" * 65536):
        with pytest.raises(ValueError):
            idx.subscribe(bad, 1, 0)
        with pytest.raises(ValueError):
            idx.add_peer(bad, 1)
        assert idx.unsubscribe(bad, 1) is False and idx.count(bad) == 0
        with pytest.raises(ValueError):
            idx.match(bad)
    assert idx.remove_subscriber(1) == [longest] and idx.remove_subscriber(2) == ["/" * 65534 + "#"]
    assert idx.remove_peer(longest, 3)
    assert idx.node_count == 0 and idx.bytes_used == 0


def test_what_10k_filters_of_128_levels_cost():
    """10,000 filters of 128 levels each, sharing their first five levels:
    about the filters' own bytes plus a node each, for local subscriptions
    and for peer interest (one node per level would be 128 nodes each)."""
    filters = ["/".join(f"d{k}" if j == 5 else f"x{j}" for j in range(128)) for k in range(10_000)]
    size = sum(len(f) for f in filters)
    local, peer = TopicIndex(), TopicIndex()
    for k, f in enumerate(filters):
        local.subscribe(f, k, 1)
        peer.add_peer(f, k % 64)
    assert local.node_count == peer.node_count == 10_001
    assert peer.bytes_used < size + 10_000 * 100
    assert local.bytes_used < size + 10_000 * 150
    assert local.match(filters[1234]) == ({1234: 1}, 0)
    for k in range(10_000):
        local.remove_subscriber(k)
    for k, f in enumerate(filters):
        peer.remove_peer(f, k % 64)
    assert local.node_count == peer.node_count == 0
    assert local.bytes_used == peer.bytes_used == 0


def test_generation_wraps():
    idx = TopicIndex()
    idx.subscribe("a/+", 1, 0)
    idx.subscribe("a/b", 1, 2)
    idx.subscribe("#", 2, 1)
    idx._set_generation(0xFFFFFFFF - 2)
    for _ in range(6):
        assert idx.match("a/b") == ({1: 2, 2: 1}, 0)
        assert idx.match("a/c") == ({1: 0, 2: 1}, 0)


def test_free_with_content():
    """Dropping a populated index frees it (no crash; leaks show under valgrind/ASan)."""
    for _ in range(3):
        idx = TopicIndex()
        for i in range(2000):
            idx.subscribe(f"x/{i}/+", i, 0)
            idx.subscribe(f"x/{i % 50}/#", i, 1)
            idx.add_peer(f"y/{i}", i % 64)
        del idx


# --- properties ------------------------------------------------------------------

NAMES = ["a", "b", "", "$SYS", "$", "A", "\u00e9"] + [f"n{i}" for i in range(12)]
_names = st.sampled_from(NAMES)
_first_names = st.sampled_from(NAMES)
filters_st = st.builds(
    lambda levels, tail: "/".join(levels + tail),
    st.lists(st.one_of(_names, _names, st.just("+")), min_size=0, max_size=6),
    st.sampled_from([[], [], ["#"]]),
).filter(bool)
topics_st = st.lists(_names, min_size=1, max_size=7).map("/".join).filter(bool)


@PROPS
@given(st.lists(st.tuples(filters_st, st.integers(0, 9), st.integers(0, 2)), max_size=40),
       st.lists(st.tuples(filters_st, st.integers(0, 63)), max_size=10),
       st.lists(topics_st, min_size=1, max_size=20))
def test_match_equals_reference(subs, peers, topics):
    idx, ref = TopicIndex(), RefIndex()
    for f, s, q in subs:
        assert idx.subscribe(f, s, q) == (not ref.subs.get(f))
        ref.subs.setdefault(f, {})[s] = q
    for f, w in peers:
        idx.add_peer(f, w)
        ref.peers.setdefault(f, set()).add(w)
    for t in topics:
        assert idx.match(t) == ref.match(t), t
    expected = sum(len(ref.match(t)[0]) + bin(ref.match(t)[1]).count("1") for t in topics)
    assert idx.match_count([t.encode() for t in topics]) == expected
    assert idx.node_count == ref.node_count()


class IndexMachine(RuleBasedStateMachine):
    """Any sequence of operations: same transitions, same matches, same
    enumerations as the model; exactly the nodes the live filters need."""

    def __init__(self):
        super().__init__()
        self.idx = TopicIndex()
        self.ref = RefIndex()

    def _local(self, f):
        return self.ref.subs.get(f, {})

    @rule(f=filters_st, s=st.integers(0, 6), q=st.integers(0, 2))
    def subscribe(self, f, s, q):
        assert self.idx.subscribe(f, s, q) == (len(self._local(f)) == 0)
        self.ref.subs.setdefault(f, {})[s] = q

    @precondition(lambda self: any(self.ref.subs.values()))
    @rule(data=st.data())
    def unsubscribe_existing(self, data):
        f = data.draw(st.sampled_from(sorted(f for f, s in self.ref.subs.items() if s)))
        s = data.draw(st.sampled_from(sorted(self._local(f))))
        assert self.idx.unsubscribe(f, s) == (len(self._local(f)) == 1)
        del self.ref.subs[f][s]

    @rule(f=filters_st, s=st.integers(0, 6))
    def unsubscribe_any(self, f, s):
        local = self._local(f)
        assert self.idx.unsubscribe(f, s) == (s in local and len(local) == 1)
        local.pop(s, None)

    @rule(s=st.integers(0, 6))
    def remove_subscriber(self, s):
        expected = {f for f, subs in self.ref.subs.items() if set(subs) == {s}}
        got = self.idx.remove_subscriber(s)
        assert len(got) == len(set(got)) and set(got) == expected
        for subs in self.ref.subs.values():
            subs.pop(s, None)

    @rule(f=filters_st, w=st.integers(0, 3))
    def add_peer(self, f, w):
        assert self.idx.add_peer(f, w) == (w not in self.ref.peers.get(f, set()))
        self.ref.peers.setdefault(f, set()).add(w)

    @rule(f=filters_st, w=st.integers(0, 3))
    def remove_peer(self, f, w):
        assert self.idx.remove_peer(f, w) == (w in self.ref.peers.get(f, set()))
        self.ref.peers.get(f, set()).discard(w)

    @rule(w=st.integers(0, 3))
    def clear_peer(self, w):
        assert self.idx.clear_peer(w) == sum(w in ws for ws in self.ref.peers.values())
        for ws in self.ref.peers.values():
            ws.discard(w)

    @rule(t=topics_st)
    def match(self, t):
        assert self.idx.match(t) == self.ref.match(t)

    @invariant()
    def same_state(self):
        ref = self.ref
        assert self.idx.node_count == ref.node_count()
        assert len(self.idx) == sum(len(s) for s in ref.subs.values())
        assert sorted(self.idx.filters()) == sorted(f for f, s in ref.subs.items() if s)
        for s in range(7):
            assert sorted(self.idx.subscriptions(s)) == sorted(
                (f, subs[s]) for f, subs in ref.subs.items() if s in subs)
        for f, subs in ref.subs.items():
            assert self.idx.count(f) == len(subs)
        if self.idx.node_count == 0:
            assert self.idx.bytes_used == 0


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(st.lists(st.tuples(filters_st, st.integers(0, 20), st.integers(0, 2)), max_size=60), st.randoms())
def test_everything_removed_returns_memory(subs, rnd):
    idx = TopicIndex()
    owners: dict[str, set[int]] = {}
    for f, s, q in subs:
        idx.subscribe(f, s, q)
        owners.setdefault(f, set()).add(s)
    pairs = [(f, s) for f, ss in owners.items() for s in ss]
    rnd.shuffle(pairs)
    half = len(pairs) // 2
    for f, s in pairs[:half]:
        owners[f].discard(s)
        assert idx.unsubscribe(f, s) == (not owners[f])
    for s in range(21):
        idx.remove_subscriber(s)
    assert idx.node_count == 0 and idx.bytes_used == 0 and len(idx) == 0
    assert idx.filters() == []
