"""`/metrics`: the shared-memory counters in the Prometheus text exposition
format 0.0.4, summed over every worker's row.

A worker serves it from its event loop, so `render` must stay cheap whatever
the load: one sum over the rows (in C, gw_ext/stats.pyx), one gather of the
figures it prints, and one `%` into a template built at import (measured in tests/test_metrics.py,
well under a millisecond for 64 workers).

Names follow the Prometheus conventions: `gw_` prefix, base units (`_seconds`,
`_bytes`), `_total` on counters, one metric with a label where figures are
the same thing split by a dimension (close reason, packet type, status code).
"""

from __future__ import annotations

import re
import time
from decimal import Decimal
from itertools import accumulate
from numbers import Integral
from operator import itemgetter

from gw import __version__
from gw.stats import (DISC5_NAMES, R5_NAMES, HIST_BOUNDS_NS, HIST_BUCKETS, HIST_WORDS, LIMIT_NAMES, MALFORMED_REASONS,
                      PACKET_NAMES, SINK_NAMES, STATUS_NAMES, WS_CLOSE_NAMES, WS_REFUSED_NAMES, Counter as C,
                      Layout, StatsBlock, monotonic_ms)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Label values of MALFORMED_BY_REASON + code: the codec's MAL_* codes, in the
# order of MALFORMED_NAMES in gw_ext/loop.pyx ("fixed header", "remaining
# length", "invalid UTF-8", ...), spelled as in `gw stats --json`.
MALFORMED_LABELS = {0: "unknown", **MALFORMED_REASONS}
CLOSE_REASONS = (("client", C.CLOSED_CLIENT), ("timeout", C.CLOSED_TIMEOUT),
                 ("connect_timeout", C.CLOSED_CONNECT_TIMEOUT), ("malformed", C.CLOSED_MALFORMED),
                 ("server", C.CLOSED_SERVER), ("error", C.CLOSED_ERROR),
                 ("internal_error", C.CLOSED_INTERNAL), ("limit", C.CLOSED_LIMIT))
DROP_REASONS = (("slow_qos0", C.DROPPED_SLOW_QOS0), ("queue_full", C.DROPPED_QUEUE_FULL),
                ("retained_full", C.DROPPED_RETAINED_FULL), ("nomem", C.DROPPED_NOMEM),
                ("channel", C.CHANNEL_DROPS))

# (name, type, help, samples): each sample is (labels, counter index). Counter
# names carry `_total`; the family name (HELP/TYPE lines) is the same name.
_FAMILIES = [
    ("gw_connections", "gauge", "Connections open now (any protocol, any state).",
     [("", C.CONNS_CURRENT)]),
    ("gw_connections_accepted_total", "counter", "Sockets accepted.", [("", C.CONNS_ACCEPTED)]),
    ("gw_connections_rejected_total", "counter",
     "Sockets refused: over max_connections or out of file descriptors.", [("", C.CONNS_REJECTED)]),
    ("gw_connections_closed_total", "counter", "Connections closed, by reason.",
     [(f'{{reason="{r}"}}', i) for r, i in CLOSE_REASONS]),
    ("gw_internal_errors_total", "counter",
     "Exceptions contained by a worker's loop (a bug: the connection concerned was closed, the worker "
     "went on; each is logged with its traceback, at most every 10 s).", [("", C.INTERNAL_ERRORS)]),
    ("gw_limits_hit_total", "counter",
     "Times a client went past a bound on what it can make the server hold, by setting.",
     [(f'{{limit="max_{n}"}}', C.LIMITS + i) for i, n in LIMIT_NAMES.items()]),
    ("gw_rate_limit_pauses_total", "counter",
     "Times reading stopped because a rate limit's bucket was empty, by setting: a listener stopped "
     "accepting (max_conn_rate), a client stopped being read (max_messages_rate, max_bytes_rate).",
     [('{limit="max_conn_rate"}', C.CONN_RATE_PAUSES), ('{limit="max_messages_rate"}', C.MSG_RATE_PAUSES),
      ('{limit="max_bytes_rate"}', C.BYTE_RATE_PAUSES)]),
    ("gw_rate_limited_clients", "gauge", "Clients not read now because of a rate limit.",
     [("", C.RATE_PAUSED)]),
    ("gw_connections_per_ip_refused_total", "counter",
     "Connections closed right after accept: max_connections_per_ip were open from their address.",
     [("", C.PER_IP_REFUSED)]),
    ("gw_write_overflows_total", "counter", "Connections closed for exceeding max_outbound.",
     [("", C.WRITE_OVERFLOWS)]),
    ("gw_packets_too_large_total", "counter", "Packets or lines over max_packet_size.",
     [("", C.PACKETS_TOO_LARGE)]),
    ("gw_received_bytes_total", "counter", "Bytes received from clients.", [("", C.BYTES_IN)]),
    ("gw_sent_bytes_total", "counter", "Bytes sent to clients.", [("", C.BYTES_OUT)]),
    ("gw_tls_handshakes_total", "counter", "TLS handshakes completed.", [("", C.TLS_HANDSHAKES)]),
    ("gw_tls_handshake_failures_total", "counter", "TLS handshakes failed.", [("", C.TLS_FAILURES)]),
    ("gw_tls_resumed_total", "counter", "TLS handshakes (of gw_tls_handshakes_total) that resumed a session "
     "from a ticket.", [("", C.TLS_RESUMED)]),
    ("gw_tls_record_layer_connections_total", "counter", "TLS connections past their handshake, by whose "
     "record layer carries them: gw's (TLS 1.3, tls_record_layer = gw) or OpenSSL's though gw's was asked.",
     [('{layer="gw"}', C.TLS_OWN_RECORDS), ('{layer="openssl"}', C.TLS_OPENSSL_RECORDS)]),
    ("gw_tls_records_refused_total", "counter", "Connections closed over a TLS record gw's record layer "
     "refused (a bad tag, length, header or content).", [("", C.TLS_RECORDS_REFUSED)]),
    ("gw_tls_key_updates_total", "counter", "TLS 1.3 KeyUpdates handled by gw's record layer, by direction.",
     [('{direction="in"}', C.TLS_KEY_UPDATES_IN), ('{direction="out"}', C.TLS_KEY_UPDATES_OUT)]),
    ("gw_tls_client_certificates_refused_total", "counter",
     "Clients refused over their certificate (require_certificate), by reason: none presented, not valid "
     "(unknown CA, bad signature, expired, or a common name that is no user name), revoked by crlfile.",
     [('{reason="no_certificate"}', C.TLS_REFUSED_NO_CERT), ('{reason="invalid"}', C.TLS_REFUSED_BAD_CERT),
      ('{reason="revoked"}', C.TLS_REFUSED_REVOKED)]),
    ("gw_mqtt5_messages_expired_total", "counter",
     "MQTT 5.0 messages not delivered: their Message Expiry Interval had passed (live, queued or retained).",
     [("", C.MQTT5_EXPIRED)]),
    ("gw_mqtt5_topic_aliases_total", "counter",
     "MQTT 5.0 Topic Aliases from clients: set (or set again), and refused (0 or over topic_alias_maximum: "
     "DISCONNECT 0x94; never set: 0x82).",
     [('{result="set"}', C.MQTT5_TOPIC_ALIASES_SET), ('{result="invalid"}', C.MQTT5_TOPIC_ALIAS_INVALID)]),
    ("gw_mqtt5_topic_aliases_out_total", "counter",
     "MQTT 5.0 Topic Aliases toward clients (topic_alias_maximum_out): given (the topic sent with a new alias), "
     "and used (an empty topic with the alias).",
     [('{result="given"}', C.MQTT5_TOPIC_ALIASES_OUT), ('{result="used"}', C.MQTT5_TOPIC_ALIAS_OUT_HITS)]),
    ("gw_mqtt5_receive_maximum_held_total", "counter",
     "MQTT 5.0 QoS 1/2 messages queued because the client's Receive Maximum (below max_inflight) was reached.",
     [("", C.MQTT5_RECEIVE_MAX_HELD)]),
    ("gw_mqtt5_payload_format_invalid_total", "counter",
     "MQTT 5.0 PUBLISHes and wills refused (0x99): Payload Format Indicator 1 with a payload that is not UTF-8.",
     [("", C.MQTT5_PAYLOAD_FORMAT_INVALID)]),
    ("gw_mqtt5_too_large_total", "counter",
     "MQTT 5.0 PUBLISHes not sent to a client: larger than the Maximum Packet Size of its CONNECT.",
     [("", C.MQTT5_TOO_LARGE_DROPPED)]),
    ("gw_mqtt5_subscription_ids_total", "counter",
     "MQTT 5.0 Subscription Identifiers: subscriptions made with one, PUBLISHes written with them, "
     "PUBLISHes that carried only the first 32 of a subscriber's matching ones.",
     [('{event="subscribed"}', C.MQTT5_SUBSCRIPTION_IDS), ('{event="published"}', C.MQTT5_SUBID_PUBLISHES),
      ('{event="cut"}', C.MQTT5_SUBIDS_CUT)]),
    ("gw_mqtt5_enhanced_auth_total", "counter",
     "MQTT 5.0 enhanced authentication: SCRAM-SHA-512 logins and re-authentications that succeeded or "
     "failed, CONNECTs with an Authentication Method not supported (CONNACK 0x8C).",
     [('{event="scram_ok"}', C.AUTH_SCRAM_OK), ('{event="scram_failed"}', C.AUTH_SCRAM_FAILED),
      ('{event="reauth_ok"}', C.AUTH_REAUTH_OK), ('{event="reauth_failed"}', C.AUTH_REAUTH_FAILED),
      ('{event="method_unsupported"}', C.AUTH_METHOD_UNSUPPORTED)]),
    ("gw_mqtt5_subscription_options_total", "counter",
     "MQTT 5.0 subscription options at work: deliveries No Local left out, subscriptions Retain Handling "
     "sent no retained messages.",
     [('{option="no_local"}', C.MQTT5_NO_LOCAL_SKIPPED),
      ('{option="retain_handling"}', C.MQTT5_RETAIN_HANDLING_SKIPPED)]),
    ("gw_ws_upgrades_total", "counter", "WebSocket upgrades accepted (ws, wss listeners).",
     [("", C.WS_UPGRADES)]),
    ("gw_ws_upgrades_refused_total", "counter", "WebSocket upgrade requests refused, by the HTTP status answered.",
     [(f'{{code="{n}"}}', C.WS_REFUSED + i) for i, n in WS_REFUSED_NAMES.items()]),
    ("gw_ws_closes_total", "counter", "WebSocket Close frames the server sent, by close code.",
     [(f'{{code="{n}"}}', C.WS_CLOSES + i) for i, n in WS_CLOSE_NAMES.items()]),
    ("gw_mqtt5_connects_total", "counter", "MQTT 5.0 CONNECTs accepted.", [("", C.MQTT5_CONNECTED)]),
    ("gw_mqtt5_bad_packets_total", "counter",
     "MQTT 5.0 packets refused, by class (Malformed Packet 0x81, Protocol Error 0x82).",
     [('{class="malformed"}', C.MQTT5_MALFORMED), ('{class="protocol_error"}', C.MQTT5_PROTOCOL_ERRORS)]),
    ("gw_mqtt5_bad_packets_by_rule_total", "counter", "MQTT 5.0 packets the codec refused, by the rule broken.",
     [(f'{{rule="{n}"}}', C.MQTT5_BAD_PACKETS + i) for i, n in enumerate(R5_NAMES)]),
    ("gw_mqtt5_disconnects_sent_total", "counter",
     "DISCONNECTs the server sent to MQTT 5.0 clients before closing, by reason.",
     [(f'{{reason="{n}"}}', C.MQTT5_DISCONNECTS + i) for i, n in DISC5_NAMES.items()]),
    ("gw_shared_messages_total", "counter",
     "Messages of shared subscriptions ($share/{name}/{filter}): given to a member on this worker, sent to "
     "another worker's member, given again after their member left unacknowledged, dropped with no member left.",
     [('{how="delivered"}', C.SHARED_DELIVERED), ('{how="forwarded"}', C.SHARED_FORWARDED),
      ('{how="redelivered"}', C.SHARED_REDELIVERED), ('{how="dropped"}', C.SHARED_DROPPED)]),
    ("gw_shared_subscriptions_refused_total", "counter",
     "SUBSCRIBE filters $share/... refused as malformed (SUBACK 0x80).", [("", C.SHARED_REFUSED)]),
    ("gw_shared_groups", "gauge", "Shared subscription groups each worker knows, summed.", [("", C.SHARED_GROUPS)]),
    ("gw_shared_members", "gauge", "Members of shared subscription groups.", [("", C.SHARED_MEMBERS)]),
    ("gw_mqtt_packets_total", "counter", "MQTT control packets, by direction and type.",
     [(f'{{direction="in",type="{n}"}}', C.PKT_IN + t) for t, n in PACKET_NAMES.items()]
     + [(f'{{direction="out",type="{n}"}}', C.PKT_OUT + t) for t, n in PACKET_NAMES.items()]),
    ("gw_mqtt_connects_total", "counter", "MQTT CONNECTs answered, by result.",
     [('{result="accepted"}', C.MQTT_CONNECTED), ('{result="refused"}', C.CONNACK_REFUSED)]),
    ("gw_malformed_packets_total", "counter", "Connections closed for a protocol violation, by reason.",
     [(f'{{reason="{n}"}}', C.MALFORMED_BY_REASON + r) for r, n in MALFORMED_LABELS.items()]),
    ("gw_messages_total", "counter",
     "Application messages (MQTT PUBLISH, JSON-lines data), by direction.",
     [('{direction="in"}', C.MSGS_IN), ('{direction="out"}', C.MSGS_OUT)]),
    ("gw_messages_dropped_total", "counter", "Messages not delivered or kept, by reason.",
     [(f'{{reason="{r}"}}', i) for r, i in DROP_REASONS]),
    ("gw_json_messages_total", "counter", "JSON-lines messages received.", [("", C.JSON_MESSAGES_IN)]),
    ("gw_json_errors_total", "counter", "Invalid JSON-lines messages answered with an error.",
     [("", C.JSON_ERRORS)]),
    ("gw_http_requests_total", "counter", "HTTP requests answered, by status code.",
     [(f'{{code="{n}"}}', C.HTTP_REQUESTS + i) for i, n in enumerate(STATUS_NAMES)]),
    ("gw_http_malformed_requests_total", "counter",
     "HTTP requests refused by the framing (bad request line or headers, too large).",
     [("", C.HTTP_MALFORMED)]),
    ("gw_http_timeouts_total", "counter",
     "HTTP connections closed: request not complete in time, or idle keep-alive expired.",
     [("", C.HTTP_TIMEOUTS)]),
    ("gw_http_requests_shed_total", "counter", "HTTP requests answered 503 (draining, queue full).",
     [("", C.HTTP_REQUESTS_SHED)]),
    ("gw_ingest_requests_total", "counter", "Ingest requests (POST /v1/ingest) answered, by status code.",
     [(f'{{code="{n}"}}', C.INGEST_REQUESTS + i) for i, n in enumerate(STATUS_NAMES)]),
    ("gw_ingest_records_total", "counter",
     "Telemetry records (HTTP and MQTT), by result: accepted, duplicate (seen within the "
     "idempotency window, acknowledged, not stored again), rejected (schema), pending (answered "
     "503: the same reading is being written by another worker and is not durable yet).",
     [('{result="accepted"}', C.INGEST_RECORDS_ACCEPTED),
      ('{result="duplicate"}', C.INGEST_RECORDS_DUPLICATE),
      ('{result="rejected"}', C.INGEST_RECORDS_REJECTED),
      ('{result="pending"}', C.INGEST_RECORDS_PENDING)]),
    ("gw_telemetry_mqtt_publishes_total", "counter",
     "MQTT publishes on telemetry topics, by schema result (rejected ones are not routed).",
     [('{result="accepted"}', C.TELEMETRY_MQTT_ACCEPTED),
      ('{result="rejected"}', C.TELEMETRY_MQTT_REJECTED)]),
    ("gw_dedup_full_total", "counter",
     "Records accepted without being remembered: the idempotency table was full.",
     [("", C.DEDUP_FULL)]),
    ("gw_sessions", "gauge", "MQTT and JSON-lines clients past CONNECT.", [("", C.SESSIONS_CURRENT)]),
    ("gw_sessions_away", "gauge", "clean_session=0 sessions whose client is away.",
     [("", C.SESSIONS_AWAY)]),
    ("gw_subscriptions", "gauge", "Subscriptions (filter, session) in the workers' indexes.",
     [("", C.SUBSCRIPTIONS_CURRENT)]),
    ("gw_subscription_index_bytes", "gauge",
     "Memory of the workers' subscription indexes: every worker holds its own filters and, as peer "
     "interest, the others'.", [("", C.SUBSCRIPTION_INDEX_BYTES)]),
    ("gw_sessions_expired_total", "counter", "clean_session=0 sessions ended after session_expiry.",
     [("", C.SESSIONS_EXPIRED)]),
    ("gw_sessions_late_total", "counter",
     "Sessions from another worker dropped: they came after their CONNECT had settled without them "
     "(connect_settle_timeout), as a new session.", [("", C.SESSIONS_LATE)]),
    ("gw_connects_at_once_total", "counter",
     "CONNECTs with a clean session settled in their own loop turn though their client id's home is "
     "another worker (its claim follows; no authentication on).", [("", C.CONNECTS_AT_ONCE)]),
    ("gw_evicts_stale_total", "counter",
     "Takeovers from another worker that named a connection a newer CONNECT here had already replaced: "
     "the newer one stays.", [("", C.EVICTS_STALE)]),
    ("gw_acl_denied_total", "counter",
     "What the ACL (acl_file) refused, by what: publishes and wills dropped, SUBSCRIBE filters answered "
     "0x80, deliveries to subscribers that may not read the topic; and client publishes on $SYS, "
     "refused whatever the ACL says.",
     [('{action="publish"}', C.ACL_PUBLISH_DENIED), ('{action="subscribe"}', C.ACL_SUBSCRIBE_DENIED),
      ('{action="deliver"}', C.ACL_DELIVERY_DENIED), ('{action="sys_publish"}', C.ACL_SYS_PUBLISH_REFUSED)]),
    ("gw_takeovers_total", "counter", "Connections closed by a CONNECT with the same client id.",
     [("", C.TAKEOVERS)]),
    ("gw_auth_refused_total", "counter",
     "CONNECTs refused by authentication, by reason: anonymous (no user name, anonymous access off: "
     "CONNACK 0x05), password (unknown user, wrong or missing password: 0x04), takeover (a client id "
     "whose session another user holds: 0x05), busy (auth_max_pending checks waiting: 0x03).",
     [('{reason="anonymous"}', C.AUTH_REFUSED_ANONYMOUS), ('{reason="password"}', C.AUTH_REFUSED_PASSWORD),
      ('{reason="takeover"}', C.AUTH_REFUSED_TAKEOVER), ('{reason="busy"}', C.AUTH_REFUSED_BUSY)]),
    ("gw_wills_published_total", "counter", "Will messages published.", [("", C.WILLS_PUBLISHED)]),
    ("gw_wills_delayed_total", "counter",
     "MQTT 5.0 wills held for their Will Delay Interval, and how each ended: published when the delay "
     "passed, published early (the session ended first), cancelled (the client came back to its session), "
     "published at a graceful stop; over_limit: published at once, max_delayed_wills being held.",
     [('{outcome="held"}', C.WILLS_DELAYED), ('{outcome="elapsed"}', C.WILLS_DELAY_ELAPSED),
      ('{outcome="session_end"}', C.WILLS_DELAY_SESSION_END), ('{outcome="cancelled"}', C.WILLS_DELAY_CANCELLED),
      ('{outcome="shutdown"}', C.WILLS_DELAY_SHUTDOWN), ('{outcome="over_limit"}', C.WILLS_DELAY_OVER_LIMIT)]),
    ("gw_wills_held", "gauge", "MQTT 5.0 wills held now for their Will Delay Interval.",
     [("", C.WILLS_DELAY_PENDING)]),
    ("gw_backpressure_events_total", "counter",
     "Times a subscriber's queue passed queue_high and QoS 1/2 publishers were held.",
     [("", C.BACKPRESSURE_EVENTS)]),
    ("gw_slow_consumers_total", "counter", "Subscribers that stopped acknowledging while congested.",
     [("", C.SLOW_CONSUMERS)]),
    ("gw_channel_messages_total", "counter", "Messages forwarded between workers, by direction.",
     [('{direction="in"}', C.CHANNEL_MSGS_IN), ('{direction="out"}', C.CHANNEL_MSGS_OUT)]),
    ("gw_channel_bytes_total", "counter", "Bytes of frames between workers, by direction.",
     [('{direction="in"}', C.CHANNEL_BYTES_IN), ('{direction="out"}', C.CHANNEL_BYTES_OUT)]),
    ("gw_channel_fragmented_frames_total", "counter",
     "Frames between workers larger than one datagram, sent in continuation datagrams.",
     [("", C.CHANNEL_FRAGMENTED)]),
    ("gw_channel_malformed_total", "counter",
     "Frames or datagrams from another worker dropped as truncated, malformed or over their bound.",
     [("", C.CHANNEL_MALFORMED)]),
    ("gw_event_loop_turns_total", "counter", "Event loop iterations (epoll_wait returns).",
     [("", C.LOOP_TURNS)]),
    ("gw_wal_records_total", "counter", "Readings appended to the workers' write-ahead logs.",
     [("", C.WAL_RECORDS)]),
    ("gw_wal_bytes_total", "counter", "Bytes appended to the write-ahead logs, framing included.",
     [("", C.WAL_BYTES)]),
    ("gw_wal_fsyncs_total", "counter", "fdatasync calls on the write-ahead logs (group commits).",
     [("", C.WAL_FSYNCS)]),
    ("gw_wal_truncated_bytes_total", "counter",
     "Bytes of a torn or corrupt log tail cut when a worker recovered its log.", [("", C.WAL_TRUNCATED)]),
    ("gw_wal_corrupt_bytes_total", "counter",
     "Bytes of damaged records in the middle of a write-ahead log, skipped by the pipeline (lost).",
     [("", C.WAL_CORRUPT)]),
    ("gw_wal_errors_total", "counter", "Failed writes or fsyncs of a write-ahead log (disk full, I/O).",
     [("", C.WAL_ERRORS)]),
    ("gw_wal_refused_total", "counter",
     "Readings the log could not take (HTTP 503, MQTT publisher disconnected, QoS 0 dropped).",
     [("", C.WAL_REFUSED)]),
    ("gw_ingest_shed_store_behind_total", "counter",
     "Readings not taken while the store sink was max_sink_lag_bytes behind a worker's log, by how the "
     "sender was told: HTTP ingest requests answered 503 store_behind, JSON-lines Data answered with an "
     "Error, MQTT QoS 0 telemetry shed (no acknowledgement to hold). QoS 1/2 telemetry publishers are held "
     "(not read), not shed.",
     [('{how="http_503"}', C.STORE_BEHIND_HTTP), ('{how="json_error"}', C.STORE_BEHIND_JSON),
      ('{how="mqtt_qos0_shed"}', C.STORE_BEHIND_QOS0)]),
    ("gw_store_behind_holds_total", "counter",
     "Times a worker began holding ingest (MQTT telemetry publishers not read, HTTP 503, JSON-lines "
     "Error): the store's lag on its log passed max_sink_lag_bytes.", [("", C.STORE_BEHIND_HOLDS)]),
    ("gw_store_behind_workers", "gauge",
     "Workers holding ingest now: the store is behind their log (until under 3/4 of max_sink_lag_bytes).",
     [("", C.STORE_BEHIND)]),
    ("gw_acks_held", "gauge", "Acknowledgements waiting for the log to be durable (ack mode sink).",
     [("", C.ACKS_HELD)]),
    ("gw_http_lingering_closes_cut_total", "counter",
     "HTTP connections closed while the client was still sending after an early answer: "
     "over http_linger_bytes or http_linger_timeout.",
     [("", C.HTTP_LINGER_CUT)]),
    ("gw_queries_pending", "gauge", "Store queries waiting for or running in the workers' query threads.",
     [("", C.QUERIES_PENDING)]),
    ("gw_queries_refused_total", "counter",
     "Store queries answered 503: query_max_pending queries were already waiting.",
     [("", C.QUERIES_REFUSED)]),
    ("gw_http_unauthorized_total", "counter",
     "HTTP requests answered 401: no bearer token, or one the tokens file does not hold.",
     [("", C.HTTP_UNAUTHORIZED)]),
    ("gw_http_forbidden_total", "counter",
     "HTTP requests answered 403: a valid token without the route's scope, or an ingest of a device "
     "outside the token's pattern.",
     [("", C.HTTP_FORBIDDEN)]),
    ("gw_persist_writes_total", "counter",
     "Files of retained messages and persistent sessions written to data_dir and made durable.",
     [("", C.PERSIST_WRITES)]),
    ("gw_persist_errors_total", "counter",
     "Failed writes of those files (disk full, I/O error); the next snapshot retries.",
     [("", C.PERSIST_ERRORS)]),
]

_HISTOGRAMS = [
    ("gw_ingest_request_duration_seconds", C.HIST_INGEST,
     "Ingest request (POST /v1/ingest) latency, from the complete request to the queued response."),
    ("gw_mqtt_publish_to_deliver_seconds", C.HIST_DELIVER,
     "MQTT publish-to-deliver latency: from the loop turn that read a PUBLISH to the one "
     "delivering it, once per delivering worker (and again on leaving a session queue)."),
    ("gw_event_loop_turn_duration_seconds", C.HIST_LOOP_TURN,
     "Event loop turns: the work from epoll_wait's return to the turn's end (a long one "
     "delays every connection of that worker)."),
]


def _le(ns: int) -> str:
    return str(Decimal(ns) / Decimal(1_000_000_000))     # 0.000025 ... 10, exact


def _escape(help_: str) -> str:
    """HELP text escaped for the exposition, and for the template's `%`."""
    return help_.replace("\\", "\\\\").replace("\n", "\\n").replace("%", "%%")


def _build():
    lines, index = [], []
    for name, kind, help_, samples in _FAMILIES:
        lines += [f"# HELP {name} {_escape(help_)}", f"# TYPE {name} {kind}"]
        for labels, i in samples:
            lines.append(f"{name}{labels} %d")
            index.append(int(i))
    for name, base, help_ in _HISTOGRAMS:
        lines += [f"# HELP {name} {_escape(help_)}", f"# TYPE {name} histogram"]
        les = [_le(b) for b in HIST_BOUNDS_NS] + ["+Inf"]
        lines += [f'{name}_bucket{{le="{le}"}} %d' for le in les]
        lines += [f"{name}_sum %s", f"{name}_count %d"]
    return "\n".join(lines) + "\n", tuple(index)


_TEMPLATE, _INDEX = _build()
_GATHER = itemgetter(*_INDEX)          # the totals the template prints, in its order
_HIST_BASES = [int(base) for _, base, _ in _HISTOGRAMS]
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_INFO = (f'# HELP gw_build_info The gw version serving.\n# TYPE gw_build_info gauge\n'
         f'gw_build_info{{version="{__version__}"}} 1\n')


def render(block: StatsBlock, *, extra: dict | None = None) -> bytes:
    """The exposition of every counter of `block`, summed over its rows.

    `extra` adds metrics the block does not hold (e.g. the retained store's
    size): name -> value, or name -> (value, help). A name ending in `_total`
    is typed counter, any other gauge.
    """
    totals = block.totals()
    values = list(_GATHER(totals))
    for base in _HIST_BASES:
        words = totals[base:base + HIST_WORDS]
        buckets = list(accumulate(words[:HIST_BUCKETS]))
        values += buckets
        values.append(repr(int(words[Layout.HIST_SUM]) / 1e9))
        values.append(buckets[-1])          # _count == the +Inf bucket, even mid-update
    out = [_TEMPLATE % tuple(values), _INFO]

    header = block.header
    nworkers = block.nworkers
    started = int(header[Layout.H_STARTED])
    pids = header[Layout.H_WORKER_PIDS:Layout.H_WORKER_PIDS + nworkers].tolist()
    out.append(
        "# HELP gw_start_time_seconds Unix time the master started.\n"
        "# TYPE gw_start_time_seconds gauge\n"
        f"gw_start_time_seconds {started}\n"
        "# HELP gw_uptime_seconds Seconds since the master started.\n"
        "# TYPE gw_uptime_seconds gauge\n"
        f"gw_uptime_seconds {max(time.time() - started, 0.0):.3f}\n"
        "# HELP gw_workers Worker slots.\n"
        "# TYPE gw_workers gauge\n"
        f"gw_workers {nworkers}\n"
        "# HELP gw_workers_alive Worker slots with a running worker process.\n"
        "# TYPE gw_workers_alive gauge\n"
        f"gw_workers_alive {sum(1 for p in pids if p)}\n"
        "# HELP gw_worker_deaths_total Worker processes that died (a signal, an exit the master "
        "did not ask for).\n"
        "# TYPE gw_worker_deaths_total counter\n"
        f"gw_worker_deaths_total {int(header[Layout.H_WORKER_DEATHS])}\n"
        "# HELP gw_pipeline_deaths_total Times the pipeline process died (a signal, an exit the master "
        "did not ask for).\n"
        "# TYPE gw_pipeline_deaths_total counter\n"
        f"gw_pipeline_deaths_total {int(header[Layout.H_PIPELINE_DEATHS])}\n")
    sinks = SINK_NAMES
    written = header[Layout.H_SINK_WRITTEN:Layout.H_SINK_WRITTEN + 3].tolist()
    lag = header[Layout.H_SINK_LAG:Layout.H_SINK_LAG + 3].tolist()
    lag_ms = header[Layout.H_SINK_LAG_AGE_MS:Layout.H_SINK_LAG_AGE_MS + 3].tolist()
    out.append(
        "# HELP gw_pipeline_up Whether the pipeline process (the sinks) runs.\n"
        "# TYPE gw_pipeline_up gauge\n"
        f"gw_pipeline_up {1 if header[Layout.H_PIPELINE_PID] else 0}\n"
        "# HELP gw_sink_records_total Readings a sink wrote, since the pipeline process started.\n"
        "# TYPE gw_sink_records_total counter\n"
        + "".join(f'gw_sink_records_total{{sink="{n}"}} {w}\n' for n, w in zip(sinks, written))
        + "# HELP gw_sink_lag_bytes Log bytes durable and not yet taken by a sink, summed over the workers.\n"
        "# TYPE gw_sink_lag_bytes gauge\n"
        + "".join(f'gw_sink_lag_bytes{{sink="{n}"}} {v}\n' for n, v in zip(sinks, lag))
        + "# HELP gw_sink_lag_seconds Seconds the oldest log record a sink has not taken has been durable "
        "(the most behind worker log).\n"
        "# TYPE gw_sink_lag_seconds gauge\n"
        + "".join(f'gw_sink_lag_seconds{{sink="{n}"}} {v / 1000:.3f}\n' for n, v in zip(sinks, lag_ms))
        + "# HELP gw_sink_retries_total Failed sink attempts, retried with backoff.\n"
        "# TYPE gw_sink_retries_total counter\n"
        f"gw_sink_retries_total {int(header[Layout.H_SINK_RETRIES])}\n"
        "# HELP gw_alerts_published_total Anomaly alerts published on alerts/{device_id}.\n"
        "# TYPE gw_alerts_published_total counter\n"
        f"gw_alerts_published_total {int(header[Layout.H_ALERTS])}\n")
    published = block.column(C.STORE_CHECKPOINT)
    if any(published):
        durable = block.column(C.WAL_DURABLE_OFFSET)
        out.append("# HELP gw_store_lag_bytes Bytes of each worker's log durable and not yet committed by the "
                   "store sink (what max_sink_lag_bytes bounds).\n"
                   "# TYPE gw_store_lag_bytes gauge\n")
        out += [f'gw_store_lag_bytes{{worker="{w}"}} {max(0, d - (p - 1))}\n'
                for w, (d, p) in enumerate(zip(durable, published)) if p]
    beats = block.column(C.WORKER_HEARTBEAT_MS)
    if any(beats):
        now = monotonic_ms()
        out.append("# HELP gw_worker_heartbeat_age_seconds Seconds since each live worker's last tick.\n"
                   "# TYPE gw_worker_heartbeat_age_seconds gauge\n")
        out += [f'gw_worker_heartbeat_age_seconds{{worker="{w}"}} {max(now - hb, 0) / 1000:.3f}\n'
                for w, hb in enumerate(beats) if hb]
    if extra:
        for name, spec in extra.items():
            value, help_ = spec if isinstance(spec, tuple) else (spec, name.replace("_", " "))
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a metric name")
            kind = "counter" if name.endswith("_total") else "gauge"
            help_ = str(help_).replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name} {_number(value)}\n")
    return "".join(out).encode()


def _number(value) -> str:
    if isinstance(value, (bool, Integral)):
        return str(int(value))
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
