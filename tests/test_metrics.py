"""The counters of the shared-memory stats block (gw/stats.py, gw_ext/stats.pxd)
and their Prometheus exposition (gw/metrics.py), on real stats blocks in
/dev/shm, parsed back with prometheus_client's parser."""

from __future__ import annotations

import itertools
import json
import os
import re
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import gw_ext.stats as cstats
from gw import metrics
from gw.stats import (GAUGES, HIST_BOUNDS_NS, HIST_BUCKETS, HIST_WORDS, HTTP_STATUS_CODES,
                      MALFORMED_REASONS, N_COUNTERS, PACKET_NAMES, PER_WORKER, RANGES, STATUS_NAMES,
                      Aggregator, Counter, Layout, StatsBlock, counter_dict, hist_observe,
                      MAX_WORKERS, http_status_index, monotonic_ms)

_fake_pids = itertools.count(1)


@pytest.fixture
def make_block():
    """StatsBlock.create under a fake master pid (above any real pid), unlinked after."""
    blocks = []

    def make(nworkers: int) -> StatsBlock:
        pid = 1_000_000_000 + os.getpid() * 100 + next(_fake_pids)
        block = StatsBlock.create(nworkers, pid)
        blocks.append(block)
        return block

    yield make
    for block in blocks:
        block.close(unlink=True)


def parse(text: bytes) -> dict:
    """family name -> Metric, for text in exposition format 0.0.4."""
    return {m.name: m for m in text_string_to_metric_families(text.decode())}


def sample(families: dict, family: str, name: str | None = None, **labels) -> float:
    matches = [s.value for s in families[family].samples
               if s.name == (name or family) and s.labels == labels]
    assert len(matches) == 1, (family, name, labels, families[family].samples[:5])
    return matches[0]


# --- the layout ------------------------------------------------------------------

def test_existing_counters_kept_their_indices():
    assert (Counter.CONNS_CURRENT, Counter.BACKPRESSURE_EVENTS, Counter.PKT_IN, Counter.PKT_OUT,
            Counter.MALFORMED_BY_REASON, Counter.CHANNEL_MSGS_OUT, Counter.SESSIONS_EXPIRED) \
        == (0, 31, 32, 48, 64, 80, 86)


def test_rate_limit_counters():
    assert {c.name: int(c) for c in Counter if 88 <= c < 96} == {
        "CONN_RATE_PAUSES": 88, "MSG_RATE_PAUSES": 89, "BYTE_RATE_PAUSES": 90, "PER_IP_REFUSED": 91,
        "RATE_PAUSED": 92}


def test_new_counters():
    assert {c.name: int(c) for c in Counter if c >= 96} == {
        "HTTP_REQUESTS": 96, "INGEST_REQUESTS": 112, "INGEST_RECORDS_ACCEPTED": 128,
        "INGEST_RECORDS_DUPLICATE": 129, "INGEST_RECORDS_REJECTED": 130,
        "TELEMETRY_MQTT_ACCEPTED": 131, "TELEMETRY_MQTT_REJECTED": 132, "HTTP_MALFORMED": 133,
        "HTTP_TIMEOUTS": 134, "DEDUP_FULL": 135, "WORKER_HEARTBEAT_MS": 136,
        "HTTP_REQUESTS_SHED": 137, "WAL_RECORDS": 138, "WAL_BYTES": 139, "WAL_FSYNCS": 140,
        "WAL_DURABLE_OFFSET": 141, "WAL_APPENDED_OFFSET": 142, "WAL_TRUNCATED": 143, "WAL_ERRORS": 144,
        "WAL_REFUSED": 145, "ACKS_HELD": 146, "WAL_CORRUPT": 147, "WAL_CORRUPT_OFFSET": 148,
        "INGEST_RECORDS_PENDING": 149, "CHANNEL_MALFORMED": 150, "CHANNEL_FRAGMENTED": 151,
        "CLOSED_INTERNAL": 152, "CLOSED_LIMIT": 153, "INTERNAL_ERRORS": 154, "HTTP_LINGER_CUT": 155, "QUERIES_PENDING": 156,
        "QUERIES_REFUSED": 157, "PERSIST_WRITES": 158, "PERSIST_ERRORS": 159, "LIMITS": 160,
        "SUBSCRIPTION_INDEX_BYTES": 176, "AUTH_REFUSED_ANONYMOUS": 177, "AUTH_REFUSED_PASSWORD": 178,
        "AUTH_REFUSED_TAKEOVER": 179, "AUTH_REFUSED_BUSY": 180, "ACL_PUBLISH_DENIED": 181, "ACL_SUBSCRIBE_DENIED": 182,
        "ACL_DELIVERY_DENIED": 183, "ACL_SYS_PUBLISH_REFUSED": 184, "TLS_REFUSED_NO_CERT": 185, "TLS_REFUSED_BAD_CERT": 186,
        "TLS_REFUSED_REVOKED": 187, "HTTP_UNAUTHORIZED": 188, "HTTP_FORBIDDEN": 189,
        "HIST_INGEST": 192, "HIST_DELIVER": 224, "HIST_LOOP_TURN": 256, "STORE_BEHIND": 288,
        "STORE_BEHIND_HOLDS": 289, "STORE_BEHIND_HTTP": 290, "STORE_BEHIND_JSON": 291, "STORE_BEHIND_QOS0": 292,
        "STORE_CHECKPOINT": 293, "WS_UPGRADES": 294, "WS_REFUSED": 295, "WS_CLOSES": 300,
        "MQTT5_CONNECTED": 320, "MQTT5_MALFORMED": 321, "MQTT5_PROTOCOL_ERRORS": 322, "MQTT5_DISCONNECTS": 323,
        "MQTT5_BAD_PACKETS": 333, "MQTT5_EXPIRED": 352, "MQTT5_TOPIC_ALIASES_SET": 353,
        "MQTT5_TOPIC_ALIAS_INVALID": 354, "MQTT5_SUBSCRIPTION_IDS": 355, "MQTT5_SUBID_PUBLISHES": 356,
        "MQTT5_SUBIDS_CUT": 357, "MQTT5_NO_LOCAL_SKIPPED": 358, "MQTT5_RETAIN_HANDLING_SKIPPED": 359,
        "AUTH_SCRAM_OK": 360, "AUTH_SCRAM_FAILED": 361, "AUTH_REAUTH_OK": 362, "AUTH_REAUTH_FAILED": 363,
        "AUTH_METHOD_UNSUPPORTED": 383,
        "MQTT5_RECEIVE_MAX_HELD": 364, "MQTT5_TOO_LARGE_DROPPED": 365, "MQTT5_TOPIC_ALIASES_OUT": 366,
        "MQTT5_TOPIC_ALIAS_OUT_HITS": 367, "MQTT5_PAYLOAD_FORMAT_INVALID": 368,
        "WILLS_DELAYED": 376, "WILLS_DELAY_PENDING": 377, "WILLS_DELAY_ELAPSED": 378,
        "WILLS_DELAY_SESSION_END": 379, "WILLS_DELAY_CANCELLED": 380, "WILLS_DELAY_SHUTDOWN": 381,
        "WILLS_DELAY_OVER_LIMIT": 382,
        "CONNECTS_AT_ONCE": 408, "EVICTS_STALE": 409, "TLS_RESUMED": 416,
        "TLS_OWN_RECORDS": 417, "TLS_OPENSSL_RECORDS": 418, "TLS_RECORDS_REFUSED": 419,
        "TLS_KEY_UPDATES_IN": 420, "TLS_KEY_UPDATES_OUT": 421,
        "SHARED_DELIVERED": 384, "SHARED_FORWARDED": 385, "SHARED_REDELIVERED": 386, "SHARED_DROPPED": 387,
        "SHARED_REFUSED": 388, "SHARED_GROUPS": 389, "SHARED_MEMBERS": 390,
        "N_COUNTERS": 448}
    assert Layout.STATS_VERSION == 5
    assert (HIST_WORDS, HIST_BUCKETS, Layout.HIST_SUM, Layout.HIST_COUNT) == (32, 30, 30, 31)
    assert Counter.HIST_LOOP_TURN + HIST_WORDS <= Counter.STORE_BEHIND < N_COUNTERS
    assert N_COUNTERS * 8 % 64 == 0


def test_layout_constants_are_not_counters():
    """Every constant lands in exactly one enum, with no alias: a layout value
    that collided with a counter (HIST_WORDS == PKT_IN == 32) would otherwise
    take over the counter's name. (Layout is a bag of values: aliases there,
    such as STATS_VERSION == H_WORKERS == 2, are harmless.)"""
    assert len(Counter.__members__) == len(list(Counter))
    for name in ("HIST_WORDS", "HIST_BUCKETS", "HIST_SUM", "HIST_COUNT", "HTTP_STATUS_SLOTS",
                 "HTTP_STATUS_OTHER", "HIST_BOUNDS_NS", "HTTP_STATUS_CODES"):
        assert name not in Counter.__members__
    assert Counter(32) is Counter.PKT_IN


def test_histogram_bounds():
    assert len(HIST_BOUNDS_NS) == HIST_BUCKETS - 1 == 29
    assert HIST_BOUNDS_NS[0] == 25_000 and HIST_BOUNDS_NS[-1] == 10_000_000_000
    assert list(HIST_BOUNDS_NS) == sorted(set(HIST_BOUNDS_NS))
    # A superset of the Prometheus client libraries' default buckets.
    defaults = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
    assert {round(s * 1e9) for s in defaults} <= set(HIST_BOUNDS_NS)
    ratios = [b / a for a, b in zip(HIST_BOUNDS_NS, HIST_BOUNDS_NS[1:])]
    assert 1.2 <= min(ratios) and max(ratios) <= 2.0          # roughly log-spaced


def test_hist_observe_buckets():
    row = np.zeros(N_COUNTERS, dtype=np.uint64)
    values = [0, 1, 25_000, 25_001, 50_000, 9_999_999_999, 10_000_000_000, 10_000_000_001, 2**62]
    for v in values:
        hist_observe(row, Counter.HIST_DELIVER, v)
    h = row[Counter.HIST_DELIVER:Counter.HIST_DELIVER + HIST_WORDS]
    for v in values:
        # the bucket: the first bound >= v, else +Inf
        b = next((i for i, bound in enumerate(HIST_BOUNDS_NS) if v <= bound), HIST_BUCKETS - 1)
        assert h[b] >= 1, v
    assert h[0] == 3 and h[1] == 2 and h[28] == 2 and h[29] == 2
    assert h[Layout.HIST_COUNT] == len(values) == h[:HIST_BUCKETS].sum()
    assert int(h[Layout.HIST_SUM]) == sum(values) % 2**64
    assert row[:Counter.HIST_DELIVER].sum() == 0                # nothing outside the histogram
    with pytest.raises(ValueError):
        hist_observe(row, Counter.BYTES_IN, 1)


def test_http_status_index_python_matches_c():
    assert HTTP_STATUS_CODES == (200, 202, 204, 400, 404, 405, 408, 411, 413, 415, 431, 500, 501,
                                 503, 505)
    for code in range(0, 1000):
        assert http_status_index(code) == cstats.status_index(code), code
    assert [http_status_index(c) for c in HTTP_STATUS_CODES] == list(range(15))
    assert http_status_index(417) == http_status_index(302) == Layout.HTTP_STATUS_OTHER == 15


def test_gauges():
    assert set(GAUGES) == {Counter.CONNS_CURRENT, Counter.SESSIONS_CURRENT,
                           Counter.SUBSCRIPTIONS_CURRENT, Counter.SESSIONS_AWAY,
                           Counter.WORKER_HEARTBEAT_MS, Counter.ACKS_HELD, Counter.QUERIES_PENDING,
                           Counter.SUBSCRIPTION_INDEX_BYTES, Counter.RATE_PAUSED, Counter.STORE_BEHIND,
                           Counter.SHARED_GROUPS, Counter.SHARED_MEMBERS, Counter.WILLS_DELAY_PENDING}
    assert PER_WORKER == (Counter.WORKER_HEARTBEAT_MS, Counter.WAL_DURABLE_OFFSET, Counter.WAL_APPENDED_OFFSET,
                          Counter.WAL_CORRUPT_OFFSET, Counter.STORE_CHECKPOINT)


def test_reset_gauges_and_heartbeats(make_block):
    block = make_block(3)
    block.rows[:, Counter.CONNS_CURRENT] = 5
    block.rows[:, Counter.BYTES_IN] = 7
    now = monotonic_ms()
    block.rows[:, Counter.WORKER_HEARTBEAT_MS] = [now - 100, 0, now - 3000]
    assert block.heartbeat_ages_ms(now) == [100, None, 3000]
    block.reset_gauges(2)
    assert block.rows[2, Counter.CONNS_CURRENT] == 0 and block.rows[2, Counter.BYTES_IN] == 7
    assert block.heartbeat_ages_ms(now) == [100, None, None]


# --- gw stats --------------------------------------------------------------------

def test_counter_dict(make_block):
    block = make_block(2)
    block.rows[0, Counter.HTTP_REQUESTS + http_status_index(202)] = 3
    block.rows[1, Counter.HTTP_REQUESTS + http_status_index(418)] = 1
    block.rows[1, Counter.INGEST_REQUESTS + http_status_index(400)] = 2
    block.rows[:, Counter.WORKER_HEARTBEAT_MS] = monotonic_ms()
    block.rows[0, Counter.DEDUP_FULL] = 4
    for ns in (30_000, 60_000, 20_000_000):
        hist_observe(block.rows[1], Counter.HIST_INGEST, ns)
    d = counter_dict(block.totals())
    json.dumps(d)
    assert d["http_requests"]["202"] == 3 and d["http_requests"]["other"] == 1
    assert set(d["http_requests"]) == set(STATUS_NAMES)
    assert d["ingest_requests"]["400"] == 2
    assert d["dedup_full"] == 4
    assert "worker_heartbeat_ms" not in d                      # a sum of clocks means nothing
    for name in ("hist_ingest", "hist_deliver", "http_requests_shed"):
        assert (name in d) == (name == "http_requests_shed")
    assert d["ingest_latency"] == {"count": 3, "sum_seconds": 0.02009, "p50_seconds": 7.5e-05,
                                   "p99_seconds": 0.02}
    assert d["deliver_latency"]["count"] == 0 and d["deliver_latency"]["p50_seconds"] is None
    # Every value is a figure or a dict of figures: no histogram word as a counter.
    assert all(isinstance(v, (int, dict)) for v in d.values())
    assert len(d) < 122     # a range or histogram leaking its words as counters would add 5 or more
    assert "msg_rate_pauses" not in d
    assert d["rate_limits"] == {"pauses": {"max_conn_rate": 0, "max_messages_rate": 0, "max_bytes_rate": 0},
                                "per_ip_refused": 0, "clients_paused": 0}


def test_aggregator_tick(make_block):
    block = make_block(2)
    block.set_worker_pid(0, os.getpid())
    block.rows[0, Counter.WORKER_HEARTBEAT_MS] = monotonic_ms()
    agg = Aggregator(block)
    block.rows[0, Counter.CONNS_CURRENT] = 3
    block.rows[1, Counter.MSGS_IN] = 50
    snap = agg.tick()
    assert snap.clients == 3 and snap.msg_in > 0
    assert snap.line().startswith("[stats] clients: 3 | peak: 3 |")
    d = snap.as_dict()
    json.dumps(d)
    assert d["workers"][0]["pid"] == os.getpid() and d["workers"][0]["heartbeat_age_ms"] < 5000
    assert d["workers"][1] == {"slot": 1, "pid": 0, "heartbeat_age_ms": None, "store_lag_bytes": None,
                               "store_behind": False}
    assert d["worker_deaths"] == d["pipeline_deaths"] == 0
    block.header[Layout.H_WORKER_DEATHS] = 2
    block.header[Layout.H_PIPELINE_DEATHS] = 5
    d = agg.tick().as_dict()
    assert (d["worker_deaths"], d["pipeline_deaths"]) == (2, 5)


def test_store_lag_per_worker_and_per_sink(make_block):
    """The store's lag on each worker's log is its durable offset less the
    checkpoint the pipeline published (next offset + 1; 0: not published);
    the sinks' figures come from the header, the held-ingest counters grouped."""
    block = make_block(3)
    rows, header = block.rows, block.header
    rows[0, Counter.WAL_DURABLE_OFFSET] = 5000
    rows[0, Counter.STORE_CHECKPOINT] = 1000 + 1
    rows[1, Counter.WAL_DURABLE_OFFSET] = 700
    rows[1, Counter.STORE_CHECKPOINT] = 900 + 1          # a log behind its checkpoint (reset): no lag
    rows[2, Counter.WAL_DURABLE_OFFSET] = 300            # not published yet
    rows[0, Counter.STORE_BEHIND] = 1
    rows[0, Counter.STORE_BEHIND_HTTP] = 4
    rows[2, Counter.STORE_BEHIND_QOS0] = 2
    header[Layout.H_SINK_LAG] = 4000
    header[Layout.H_SINK_LAG_AGE_MS] = 2500
    header[Layout.H_SINK_WRITTEN] = 77
    assert block.store_lag_bytes() == [4000, 0, None]
    d = Aggregator(block).tick().as_dict()
    assert d["sinks"]["store"] == {"written": 77, "lag_bytes": 4000, "lag_seconds": 2.5}
    assert d["sinks"]["file"] == {"written": 0, "lag_bytes": 0, "lag_seconds": 0.0}
    assert [w["store_behind"] for w in d["workers"]] == [True, False, False]
    shed = d["counters"]["ingest_shed_store_behind"]
    assert shed == {"http_503": 4, "json_errors": 0, "mqtt_qos0_shed": 2, "holds": 0, "workers_holding": 1}
    assert "store_checkpoint" not in d["counters"] and "store_behind_http" not in d["counters"]
    line = Aggregator(block).tick().sinks_line()
    assert line == "[sinks] store: lag 0.0 MB, 2.5 s | written 77 | ingest held (max_sink_lag_bytes) on workers 0"
    text = metrics.render(block).decode()
    assert 'gw_store_lag_bytes{worker="0"} 4000' in text and 'gw_store_lag_bytes{worker="1"} 0' in text
    assert 'worker="2"' not in text.split("gw_store_lag_bytes")[-1].split("# HELP")[0]
    assert 'gw_sink_lag_seconds{sink="store"} 2.500' in text
    assert 'gw_ingest_shed_store_behind_total{how="http_503"} 4' in text
    assert "gw_store_behind_workers 1" in text


def test_deaths_words_are_in_the_header_past_the_worker_pids():
    """Two header words after the 64 pid slots, inside the header: a block of
    64 workers keeps every pid and both figures apart from the rows."""
    assert Layout.H_WORKER_PIDS + MAX_WORKERS <= Layout.H_WORKER_DEATHS < Layout.HEADER_WORDS
    assert Layout.H_PIPELINE_DEATHS == Layout.H_WORKER_DEATHS + 1 < Layout.HEADER_WORDS
    assert (Layout.HEADER_WORDS * 8) % 64 == 0        # the rows stay cache-line aligned


# --- the exposition --------------------------------------------------------------

def fill(block: StatsBlock, seed: int = 1) -> np.ndarray:
    """Distinct counts in every counter of every row, histograms observed; the expected sums."""
    rng = np.random.default_rng(seed)
    rows = block.rows
    rows[:] = rng.integers(0, 1_000_000, rows.shape, dtype=np.uint64)
    for hist in (Counter.HIST_INGEST, Counter.HIST_DELIVER):
        rows[:, hist:hist + HIST_WORDS] = 0
        for w in range(rows.shape[0]):
            for ns in rng.lognormal(np.log(2e6), 2.0, 200 + 50 * w).astype(np.uint64):
                hist_observe(rows[w], hist, int(ns))
    return rows.sum(axis=0, dtype=np.uint64)


def test_render_values_are_the_sums(make_block):
    block = make_block(4)
    totals = fill(block)
    fams = parse(metrics.render(block))
    t = totals.tolist()
    assert sample(fams, "gw_connections") == t[Counter.CONNS_CURRENT]
    assert sample(fams, "gw_connections_accepted",
                  "gw_connections_accepted_total") == t[Counter.CONNS_ACCEPTED]
    for reason, idx in metrics.CLOSE_REASONS:
        assert sample(fams, "gw_connections_closed", "gw_connections_closed_total", reason=reason) == t[idx]
    for ptype, name in PACKET_NAMES.items():
        assert sample(fams, "gw_mqtt_packets", "gw_mqtt_packets_total", direction="in",
                      type=name) == t[Counter.PKT_IN + ptype]
        assert sample(fams, "gw_mqtt_packets", "gw_mqtt_packets_total", direction="out",
                      type=name) == t[Counter.PKT_OUT + ptype]
    for code, name in MALFORMED_REASONS.items():
        assert sample(fams, "gw_malformed_packets", "gw_malformed_packets_total",
                      reason=name) == t[Counter.MALFORMED_BY_REASON + code]
    for i, code in enumerate(STATUS_NAMES):
        assert sample(fams, "gw_http_requests", "gw_http_requests_total",
                      code=code) == t[Counter.HTTP_REQUESTS + i]
        assert sample(fams, "gw_ingest_requests", "gw_ingest_requests_total",
                      code=code) == t[Counter.INGEST_REQUESTS + i]
    for result, idx in (("accepted", Counter.INGEST_RECORDS_ACCEPTED),
                        ("duplicate", Counter.INGEST_RECORDS_DUPLICATE),
                        ("rejected", Counter.INGEST_RECORDS_REJECTED)):
        assert sample(fams, "gw_ingest_records", "gw_ingest_records_total", result=result) == t[idx]
    for reason, idx in metrics.DROP_REASONS:
        assert sample(fams, "gw_messages_dropped", "gw_messages_dropped_total", reason=reason) == t[idx]
    singles = {"gw_received_bytes": Counter.BYTES_IN, "gw_sent_bytes": Counter.BYTES_OUT,
               "gw_tls_handshakes": Counter.TLS_HANDSHAKES,
               "gw_tls_handshake_failures": Counter.TLS_FAILURES,
               "gw_tls_resumed": Counter.TLS_RESUMED,
               "gw_json_messages": Counter.JSON_MESSAGES_IN, "gw_json_errors": Counter.JSON_ERRORS,
               "gw_http_malformed_requests": Counter.HTTP_MALFORMED,
               "gw_http_timeouts": Counter.HTTP_TIMEOUTS, "gw_http_requests_shed": Counter.HTTP_REQUESTS_SHED,
               "gw_dedup_full": Counter.DEDUP_FULL, "gw_takeovers": Counter.TAKEOVERS,
               "gw_wills_published": Counter.WILLS_PUBLISHED,
               "gw_backpressure_events": Counter.BACKPRESSURE_EVENTS,
               "gw_slow_consumers": Counter.SLOW_CONSUMERS, "gw_sessions_expired": Counter.SESSIONS_EXPIRED}
    for family, idx in singles.items():
        assert sample(fams, family, family + "_total") == t[idx], family
    assert sample(fams, "gw_sessions") == t[Counter.SESSIONS_CURRENT]
    assert sample(fams, "gw_subscriptions") == t[Counter.SUBSCRIPTIONS_CURRENT]
    assert sample(fams, "gw_sessions_away") == t[Counter.SESSIONS_AWAY]
    assert sample(fams, "gw_messages", "gw_messages_total", direction="in") == t[Counter.MSGS_IN]
    assert sample(fams, "gw_channel_bytes", "gw_channel_bytes_total",
                  direction="out") == t[Counter.CHANNEL_BYTES_OUT]
    assert sample(fams, "gw_telemetry_mqtt_publishes", "gw_telemetry_mqtt_publishes_total",
                  result="rejected") == t[Counter.TELEMETRY_MQTT_REJECTED]


def test_every_counter_is_exposed():
    """Each counter of the .pxd reaches /metrics, except the per-worker gauge
    (exposed per worker) and the ranges (their slots: test_render_values_are_the_sums)."""
    exposed = set(metrics._INDEX)
    for c in Counter:
        if c in PER_WORKER or c is Counter.N_COUNTERS or c in RANGES:
            continue
        assert int(c) in exposed, c.name
    assert int(Counter.WORKER_HEARTBEAT_MS) not in exposed


def test_histograms(make_block):
    block = make_block(3)
    fill(block, seed=5)
    fams = parse(metrics.render(block))
    for family, hist in (("gw_ingest_request_duration_seconds", Counter.HIST_INGEST),
                         ("gw_mqtt_publish_to_deliver_seconds", Counter.HIST_DELIVER)):
        m = fams[family]
        assert m.type == "histogram" and m.documentation
        words = block.rows[:, hist:hist + HIST_WORDS].sum(axis=0)
        buckets = [(s.labels["le"], s.value) for s in m.samples if s.name == family + "_bucket"]
        assert len(buckets) == HIST_BUCKETS
        les = [float(le) for le, _ in buckets]
        assert les[:-1] == [b / 1e9 for b in HIST_BOUNDS_NS] and buckets[-1][0] == "+Inf"
        values = [v for _, v in buckets]
        assert values == sorted(values)                                   # cumulative: monotonic
        assert values == np.cumsum(words[:HIST_BUCKETS]).tolist()
        count = sample(fams, family, family + "_count")
        assert values[-1] == count == int(words[Layout.HIST_COUNT]) > 0
        assert sample(fams, family, family + "_sum") == pytest.approx(int(words[Layout.HIST_SUM]) / 1e9)


def test_names_types_and_help(make_block):
    block = make_block(2)
    fill(block)
    block.rows[:, Counter.WORKER_HEARTBEAT_MS] = monotonic_ms()
    text = metrics.render(block, extra={"gw_retained_messages": 12})
    fams = parse(text)
    name_re = re.compile(r"gw_[a-z0-9_]+\Z")
    for m in fams.values():
        assert name_re.match(m.name), m.name
        assert m.documentation and m.type in ("counter", "gauge", "histogram"), m.name
        if m.type == "counter":
            assert {s.name for s in m.samples} == {m.name + "_total"}, m.name
        else:
            assert not any(s.name.endswith("_total") for s in m.samples), m.name
        # Base units only: seconds and bytes, never ms/us/kb.
        assert not re.search(r"_(ms|us|ns|milliseconds|kb|mb|kilobytes)(_|$)", m.name), m.name
    # Every HELP and TYPE line once, before its samples; no blank or stray line.
    lines = text.decode().splitlines()
    assert all(line for line in lines)
    helps = [line.split()[2] for line in lines if line.startswith("# HELP ")]
    types = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    assert helps == types and len(set(helps)) == len(helps) == len(fams)
    assert text.endswith(b"\n")


def test_process_figures(make_block):
    block = make_block(4)
    block.header[Layout.H_STARTED] = int(time.time()) - 100
    block.set_worker_pid(0, 101)
    block.set_worker_pid(2, 102)
    now = monotonic_ms()
    block.rows[0, Counter.WORKER_HEARTBEAT_MS] = now - 250
    block.rows[2, Counter.WORKER_HEARTBEAT_MS] = now - 4000
    fams = parse(metrics.render(block))
    assert 100 <= sample(fams, "gw_uptime_seconds") < 110
    assert sample(fams, "gw_start_time_seconds") == block.header[Layout.H_STARTED]
    assert sample(fams, "gw_workers") == 4
    assert sample(fams, "gw_workers_alive") == 2
    assert sample(fams, "gw_worker_deaths", "gw_worker_deaths_total") == 0
    assert sample(fams, "gw_pipeline_deaths", "gw_pipeline_deaths_total") == 0
    block.header[Layout.H_WORKER_DEATHS] = 3
    block.header[Layout.H_PIPELINE_DEATHS] = 1
    again = parse(metrics.render(block))
    assert again["gw_worker_deaths"].type == again["gw_pipeline_deaths"].type == "counter"
    assert sample(again, "gw_worker_deaths", "gw_worker_deaths_total") == 3
    assert sample(again, "gw_pipeline_deaths", "gw_pipeline_deaths_total") == 1
    ages = {s.labels["worker"]: s.value for s in fams["gw_worker_heartbeat_age_seconds"].samples}
    assert set(ages) == {"0", "2"}
    assert 0.25 <= ages["0"] < 5 and 4.0 <= ages["2"] < 9
    assert fams["gw_build_info"].samples[0].labels["version"]


def test_extra(make_block):
    block = make_block(1)
    text = metrics.render(block, extra={"gw_retained_messages": 12,
                                        "gw_things_total": (3, "Things.\nDone 100%."),
                                        "gw_ratio": (float("nan"), "A ratio.")})
    fams = parse(text)
    assert sample(fams, "gw_retained_messages") == 12 and fams["gw_retained_messages"].type == "gauge"
    assert sample(fams, "gw_things", "gw_things_total") == 3 and fams["gw_things"].type == "counter"
    assert fams["gw_things"].documentation == "Things.\nDone 100%."
    assert sample(fams, "gw_ratio") != sample(fams, "gw_ratio")      # NaN
    with pytest.raises(ValueError):
        metrics.render(block, extra={"bad name": 1})


def test_render_with_64_workers_takes_well_under_5_ms(make_block):
    """/metrics is served from a worker's event loop: the cost is the rows'
    sum and the formatting, the same with 10 or 10,000 connections open."""
    block = make_block(64)
    fill(block)
    block.rows[:, Counter.WORKER_HEARTBEAT_MS] = monotonic_ms()
    for slot in range(64):
        block.set_worker_pid(slot, 1000 + slot)
    metrics.render(block)
    best = float("inf")
    for _ in range(50):
        start = time.perf_counter()
        metrics.render(block)
        best = min(best, time.perf_counter() - start)
    print(f"render, 64 workers: {best * 1e6:.0f} us")
    assert best < 0.005
