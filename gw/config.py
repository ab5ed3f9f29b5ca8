"""Configuration: defaults, then a TOML file (--config), then command-line flags.

Every setting is one field of `Config`; its TOML key is the field name and its
flag the same name with dashes (`max_connections` / `--max-connections`).
Errors name the key and end the program with exit code 2.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields

LOG_LEVELS = ("debug", "info", "warning", "error")
ACK_MODES = ("enqueue", "sink")
CONTROL_CHARACTER_MODES = ("close", "accept")
ANONYMOUS_CHOICES = ("auto", "true", "false")
FSYNC_MODES = ("always", "batch", "off")
BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False,
              "1": True, "0": False}
HTTP_AUTH_MODES = ("auto", "token", "none")
TLS_RECORD_LAYERS = ("gw", "openssl")
METRICS_AUTH_MODES = ("read", "none")
LISTENER_KEYS = ("mqtt", "mqtts", "json", "jsons", "http", "https", "ws", "wss")
TLS_LISTENER_KEYS = ("mqtts", "jsons", "https", "wss")


class ConfigError(Exception):
    """A bad setting. The message names the key."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(key: str, value: str) -> Address | None:
    """HOST:PORT, [V6HOST]:PORT or :PORT (loopback); '' or 'off' disables the listener."""
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}': expected \"HOST:PORT\" or \"off\", got {value!r}")
    value = value.strip()
    if value in ("", "off", "none"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ConfigError(f"config key '{key}': expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_n = int(port)
    except ValueError:
        raise ConfigError(f"config key '{key}': port must be a number, got {port!r}") from None
    if not 0 <= port_n <= 65535:
        raise ConfigError(f"config key '{key}': port {port_n} is out of range 0-65535")
    return Address(host, port_n)


def _setting(default, doc: str, *, minimum=None, maximum=None, choices=None, kind=None):
    return field(default=default, metadata={"doc": doc, "min": minimum, "max": maximum,
                                            "choices": choices, "kind": kind})


@dataclass(frozen=True)
class Config:
    workers: int = _setting(os.cpu_count() or 1, "worker processes (each an epoll loop)",
                            minimum=1, maximum=64)
    mqtt: str = _setting("127.0.0.1:1883", "MQTT over TCP listener, HOST:PORT or off", kind="address")
    mqtts: str = _setting("127.0.0.1:8883", "MQTT over TLS listener, HOST:PORT or off", kind="address")
    json: str = _setting("127.0.0.1:1880", "JSON-lines listener (one JSON object per line: Connect, Data, "
                         "Heartbeat, Disconnect), HOST:PORT or off", kind="address")
    jsons: str = _setting("127.0.0.1:8880", "JSON-lines over TLS listener, HOST:PORT or off", kind="address")
    http: str = _setting("127.0.0.1:8080", "HTTP listener (ingest API, /healthz, /readyz, /metrics, /docs, the dashboard at /), "
                         "HOST:PORT or off", kind="address")
    https: str = _setting("127.0.0.1:8443", "HTTPS listener (the same, over TLS with the certs), HOST:PORT or off",
                          kind="address")
    ws: str = _setting("127.0.0.1:8083", "MQTT over WebSocket listener (an HTTP upgrade on ws_path, "
                       "subprotocol mqtt or mqttv3.1), HOST:PORT or off", kind="address")
    wss: str = _setting("127.0.0.1:8084", "MQTT over WebSocket over TLS listener (the same certificates), "
                        "HOST:PORT or off", kind="address")
    ws_path: str = _setting("/mqtt", "the path of the ws and wss listeners' upgrade requests (another path: 404)")
    ws_allowed_origins: str = _setting("", "comma-separated Origin values (scheme://host[:port]) whose "
                                       "browser pages may open a ws/wss connection; another Origin is "
                                       "refused 403; a request without Origin (not a browser's) is let in "
                                       "('' : any origin)")
    certs: str = _setting("certs", "directory holding cert.pem and key.pem (generated with a "
                          "development CA, ca.pem, when absent)")
    require_certificate: bool = _setting(False, "TLS listeners (mqtts, jsons, https) ask every client for a "
                                         "certificate and refuse the handshake of one without a valid one, "
                                         "verified against client_cafile")
    client_cafile: str = _setting("", "PEM file of the CA certificates client certificates are verified "
                                  "against (Mosquitto's cafile; gw's own certificate is in certs); required "
                                  "with require_certificate, used only with it", kind="path")
    crlfile: str = _setting("", "PEM file of certificate revocation lists for client certificates: a revoked "
                            "one fails the handshake; the file must hold a current CRL of each CA in "
                            "client_cafile that issues client certificates ('' : none)", kind="path")
    use_identity_as_username: bool = _setting(False, "the common name (CN) of the client certificate's subject "
                                              "is the connection's user name, replacing any user name in "
                                              "CONNECT or a JSON-lines Connect; a certificate without a "
                                              "usable CN is refused (CONNACK 4, JSON lines: an Error); "
                                              "needs require_certificate")
    tls_ticket_lifetime: int = _setting(7200, "seconds a TLS session ticket lets a reconnecting client resume "
                                        "(an abbreviated handshake, on any worker: the keys come from a "
                                        "secret the master makes at start, each sealing tickets for this "
                                        "long and accepted for as long again); 0: no tickets",
                                        minimum=0, maximum=604800)
    tls_record_layer: str = _setting("gw", "who seals and opens a TLS connection's records after its "
                                     "handshake: gw (TLS 1.3 with an AES-GCM or ChaCha20-Poly1305 suite: gw "
                                     "takes the keys from OpenSSL and frees its connection object, some 13 KiB "
                                     "less per connection; TLS 1.2 and use_identity_as_username listeners "
                                     "stay on OpenSSL) or openssl (OpenSSL's record layer throughout)",
                                     choices=TLS_RECORD_LAYERS)
    data_dir: str = _setting("data", "directory for the pid file, retained messages, "
                             "clean_session=0 sessions, the write-ahead logs (wal/) and the store "
                             "(store.sqlite), kept across restarts")
    store: str = _setting("sqlite", "where the pipeline stores readings and the query API reads them: "
                          "sqlite (the embedded store in data_dir) or a PostgreSQL URL "
                          "postgresql://USER@HOST:PORT/DBNAME (see README \"PostgreSQL\")", kind="store")
    store_pg_partitions_ahead: int = _setting(3, "PostgreSQL store: days of readings and samples partitions "
                                              "created ahead of today", minimum=1, maximum=60)
    store_pg_connect_timeout: float = _setting(5.0, "PostgreSQL store: seconds a connection attempt may take",
                                               minimum=0.5, maximum=300)
    persist_interval: float = _setting(1.0, "seconds between writes of changed retained messages and "
                                       "sessions to data_dir (0: only when stopping)",
                                       minimum=0, maximum=3600)
    max_connections: int = _setting(100_000, "open connections allowed across all workers; "
                                    "more are refused and counted", minimum=1)
    # Rate limits (EMQX's limiter): a bucket empty stops reading, never drops what was read.
    max_connections_per_ip: int = _setting(0, "connections open from one IP address across all workers; "
                                           "more are closed right after accept (before TLS or CONNECT), "
                                           "counted (per_ip_refused) (0: unlimited)",
                                           minimum=0, maximum=65535)
    max_conn_rate: float = _setting(0.0, "new connections per second each listener accepts (each worker "
                                    "takes rate / workers on its own socket); past it and max_conn_burst the "
                                    "listener stops accepting until its bucket refills, and the kernel's "
                                    "backlog holds the rest: clients see slowness, not a refusal (0: unlimited)",
                                    minimum=0, maximum=1_000_000)
    max_conn_burst: int = _setting(0, "connections a listener accepts at once above max_conn_rate "
                                   "(0: one second's worth of the rate)", minimum=0, maximum=1_000_000)
    max_messages_rate: float = _setting(0.0, "messages per second one client may send (MQTT PUBLISH, "
                                        "JSON lines, HTTP requests with a body); past it and "
                                        "max_messages_burst the server stops reading that client until its "
                                        "bucket refills (0: unlimited)", minimum=0, maximum=10_000_000)
    max_messages_burst: int = _setting(0, "messages one client may send at once above max_messages_rate "
                                       "(0: one second's worth of the rate)", minimum=0, maximum=100_000_000)
    max_bytes_rate: int = _setting(0, "bytes per second of those messages one client may send; past it and "
                                   "max_bytes_burst the server stops reading that client until its bucket "
                                   "refills (0: unlimited)", minimum=0, maximum=1 << 40)
    max_bytes_burst: int = _setting(0, "bytes one client may send at once above max_bytes_rate (0: one "
                                    "second's worth of the rate, at least max_packet_size); set, it must be "
                                    "at least max_packet_size", minimum=0, maximum=1 << 40)
    max_packet_size: int = _setting(1 << 20, "largest MQTT packet (or JSON line) accepted, bytes; "
                                    "larger closes the connection", minimum=64, maximum=268_435_460)
    max_outbound: int = _setting(8 << 20, "bytes queued to one slow client before it is disconnected; "
                                 "past half of it QoS 0 messages to that client are dropped and counted",
                                 minimum=4096, maximum=1 << 31)
    max_inflight: int = _setting(128, "QoS 1/2 messages sent to one client and not yet acknowledged",
                                 minimum=1, maximum=65535)
    max_queued: int = _setting(1000, "QoS 1/2 messages queued for one client beyond max_inflight "
                               "(also while a clean_session=0 client is away); more are dropped "
                               "and counted", minimum=0)
    session_expiry: float = _setting(0.0, "seconds a clean_session=0 session is kept while its client "
                                     "is away (0: forever, as Mosquitto's default); MQTT 5.0 clients "
                                     "give their own (Session Expiry Interval)", minimum=0)
    max_retained: int = _setting(100_000, "retained messages kept; more are refused and counted",
                                 minimum=0)
    max_retained_bytes: int = _setting(256 << 20, "bytes of topics and payloads in the retained store "
                                       "(every worker holds all of it); more are refused and counted",
                                       minimum=0, maximum=1 << 40)
    max_queued_bytes: int = _setting(64 << 20, "bytes of QoS 1/2 messages queued for one client (also while "
                                     "a clean_session=0 client is away); more are dropped and counted",
                                     minimum=0, maximum=1 << 40)
    max_awaiting_rel: int = _setting(1000, "QoS 2 messages from one client awaiting their PUBREL; one more "
                                     "disconnects the client (counted). MQTT 5.0: the Receive Maximum "
                                     "announced, which also counts QoS 1 readings whose PUBACK waits for "
                                     "the log (ack mode sink); one more is DISCONNECT 0x93",
                                     minimum=1, maximum=65535)
    topic_alias_maximum: int = _setting(64, "MQTT 5.0 Topic Aliases a client may set (the Topic Alias Maximum "
                                        "announced in CONNACK; a PUBLISH with an alias above it is answered "
                                        "DISCONNECT 0x94); 0: none", minimum=0, maximum=65535)
    topic_alias_maximum_out: int = _setting(64, "MQTT 5.0 Topic Aliases the server gives one client for the "
                                            "topics it sends it (at most the client's Topic Alias Maximum; the "
                                            "first topics up to 512 bytes that it sends get one); 0: none",
                                            minimum=0, maximum=1024)
    max_delayed_wills: int = _setting(100_000, "MQTT 5.0 wills one worker holds for their Will Delay Interval "
                                      "(their clients gone, their sessions kept); past it a will is published "
                                      "at once, counted (will_delay.over_limit)", minimum=0,
                                      maximum=10_000_000)
    max_subscriptions: int = _setting(10_000, "subscriptions one client may hold; more are refused "
                                      "(SUBACK 0x80) and counted", minimum=1, maximum=10_000_000)
    acl_file: str = _setting("", "access control list in Mosquitto's acl_file format (topic, user and pattern "
                             "lines): who may publish and subscribe where; what no line grants is denied. "
                             "'' : no ACL, everything allowed. Reloaded on SIGHUP (a file that does not parse "
                             "keeps the previous one in force)")
    max_topic_levels: int = _setting(128, "levels in a topic filter; deeper filters are refused "
                                     "(SUBACK 0x80) and counted", minimum=1, maximum=65535)
    max_topic_length: int = _setting(4096, "bytes in a topic filter; longer filters are refused "
                                     "(SUBACK 0x80) and counted", minimum=1, maximum=65535)
    mqtt_control_characters: str = _setting("close", "what a control character (U+0001-U+001F, U+007F-U+009F) "
                                            "in an MQTT client id, user name, will topic, topic name or topic "
                                            "filter does: close (the connection, counted, as Mosquitto does; "
                                            "MQTT 3.1.1 section 1.5.3 allows it) or accept",
                                            choices=CONTROL_CHARACTER_MODES)
    password_file: str = _setting("", "password file in Mosquitto's format (user:$7$..., $6$, $argon2id$; "
                                  "made by `gw passwd` or mosquitto_passwd); a client giving a user name must "
                                  "give its password ('' : none). Reloaded on SIGHUP")
    allow_anonymous: str = _setting("auto", "whether MQTT and JSON-lines clients without a user name may connect: "
                                    "true, false, or auto (true only while every mqtt, mqtts, json and jsons "
                                    "listener is on loopback)", choices=ANONYMOUS_CHOICES)
    auth_threads: int = _setting(1, "threads per worker checking passwords, off its event loop (0: in the "
                                 "event loop, which then waits for each hash)", minimum=0, maximum=64)
    auth_inline_iterations: int = _setting(200, "a password file whose every entry is as cheap as $6$ or $7$ "
                                           "with at most this many PBKDF2 iterations (mosquitto_passwd writes "
                                           "101: about 70 us a check) is checked in the event loop, as Mosquitto "
                                           "does, not handed to the auth threads (0: never)",
                                           minimum=0, maximum=10_000)
    auth_max_pending: int = _setting(1000, "CONNECTs waiting in a worker for their password check; more are "
                                     "refused (CONNACK 0x03, counted)", minimum=1, maximum=1_000_000)
    auth_cache_seconds: float = _setting(60.0, "seconds a successful password check is remembered (per user "
                                         "and password digest), so reconnects do not hash again (0: never)",
                                         minimum=0, maximum=86400)
    auth_cache_entries: int = _setting(100_000, "successful password checks remembered per worker",
                                       minimum=1, maximum=10_000_000)
    connect_timeout: float = _setting(10.0, "seconds a new socket has to finish TLS and send CONNECT",
                                      minimum=0.1, maximum=3600)
    connect_settle_timeout: float = _setting(3.0, "seconds a CONNECT waits for its session from the worker "
                                             "that held it; then it settles as a new session, and the "
                                             "session coming later is dropped and counted (sessions_late); "
                                             "half of it bounds how long a CONNECT of another user waits for "
                                             "the id's open connection to end before it is refused",
                                             minimum=0.1, maximum=3600)
    connect_at_once: bool = _setting(True, "a clean-session CONNECT whose client id's home is another worker "
                                     "is answered in its own loop turn, its claim sent to the home after it "
                                     "(not with authentication on); false: it waits for the home's answer",
                                     )
    defer_accept: bool = _setting(False, "listeners hand a new connection to a worker only once its first "
                                  "bytes are there (TCP_DEFER_ACCEPT): one wake-up of the worker for the "
                                  "accept and the CONNECT instead of two; a client that sends nothing is "
                                  "accepted about 1 s after its handshake (at start only)")
    json_timeout: float = _setting(30.0, "seconds of silence after which a JSON-lines client is closed",
                                   minimum=1, maximum=86400)
    drain_timeout: float = _setting(10.0, "seconds a graceful stop (SIGTERM/SIGINT) may take",
                                    minimum=0, maximum=3600)
    pipeline_stop_timeout: float = _setting(15.0, "seconds the pipeline has, after the workers stopped, to "
                                            "commit what they logged last; past it, it is killed (nothing "
                                            "is lost: the logs are read again at the next start)",
                                            minimum=1, maximum=3600)
    sys_interval: float = _setting(10.0, "seconds between $SYS/broker/... updates (0: none)",
                                   minimum=0, maximum=86400)
    stats_interval: float = _setting(1.0, "seconds between [stats] log lines (0: none)",
                                     minimum=0, maximum=3600)
    log_level: str = _setting("info", "debug, info, warning or error", choices=LOG_LEVELS)
    ack: str = _setting("enqueue", "when an accepted reading is acknowledged: enqueue (once it is in the "
                        "write-ahead log's buffer and routed: HTTP 202, PUBACK/PUBREC at once) or sink (only "
                        "once the log is on disk past it, per fsync: HTTP 200, PUBACK/PUBREC held until "
                        "then); ack_<listener> overrides it for one listener", choices=ACK_MODES)
    max_body_size: int = _setting(1 << 20, "largest HTTP request body, bytes (declared or de-chunked); "
                                  "larger is answered 413 and the connection closed",
                                  minimum=64, maximum=1 << 30)
    max_batch: int = _setting(1000, "records in one batch ingest (POST /v1/ingest); more is answered 413",
                              minimum=1, maximum=100_000)
    idempotency_window: float = _setting(60.0, "seconds a (device_id, seq) pair is remembered: a repeat "
                                         "within it is acknowledged but not stored again (0: off)",
                                         minimum=0, maximum=86400 * 7)
    idempotency_capacity: int = _setting(1 << 22, "slots of the shared idempotency table (16 bytes each, "
                                         "64 MiB by default); give it 3x the readings with a seq expected "
                                         "per window (the default: 20,000/s for 60 s). When a probe finds no "
                                         "room, the reading is accepted without the check and counted "
                                         "(dedup_full)", minimum=1024, maximum=1 << 30)
    telemetry_topic: str = _setting("telemetry", "readings are published on TOPIC/{device_id}; MQTT "
                                    "publishes there must pass the ingest schema")
    http_timeout: float = _setting(10.0, "seconds an HTTP request has to arrive in full once it has begun "
                                   "(slowloris); then 408 and the connection is closed",
                                   minimum=0.1, maximum=3600)
    http_keepalive_timeout: float = _setting(75.0, "seconds an idle keep-alive HTTP connection is kept",
                                             minimum=0.1, maximum=86400)
    http_linger_bytes: int = _setting(16 << 20, "after an answer sent before the request's body arrived (413, "
                                      "400, ...), bytes the client may still send, read and discarded so it "
                                      "sees the answer rather than a reset (0: close at once)",
                                      minimum=0, maximum=1 << 30)
    http_linger_timeout: float = _setting(5.0, "seconds such a lingering close lasts at most (0: close at once)",
                                          minimum=0, maximum=3600)
    query_threads: int = _setting(2, "threads per worker running the query API's store queries, off its event "
                                  "loop (0: in the event loop, which then waits for each query)",
                                  minimum=0, maximum=64)
    query_max_pending: int = _setting(32, "store queries waiting for or running in a worker's query threads; "
                                      "more are answered 503 with Retry-After and counted",
                                      minimum=1, maximum=100_000)
    http_auth: str = _setting("auto", "who may use the HTTP API: token (a bearer token from http_tokens_file, "
                              "made with `gw token create`), none (anyone who reaches the port), or auto: "
                              "token once any listener is off loopback, else none", choices=HTTP_AUTH_MODES)
    http_tokens_file: str = _setting("", "the HTTP API's tokens (their SHA-256 hashes, scopes and device "
                                     "patterns; `gw token`) ('' : tokens in data_dir); reloaded on SIGHUP")
    metrics_auth: str = _setting("read", "with HTTP tokens on, what /metrics needs: read (a token with the "
                                 "read scope) or none (open, like /healthz and /readyz)",
                                 choices=METRICS_AUTH_MODES)
    ack_mqtt: str = _setting("", "ack mode of the mqtt listener ('' : ack)", choices=("",) + ACK_MODES)
    ack_mqtts: str = _setting("", "ack mode of the mqtts listener ('' : ack)", choices=("",) + ACK_MODES)
    ack_http: str = _setting("", "ack mode of the http listener ('' : ack)", choices=("",) + ACK_MODES)
    ack_https: str = _setting("", "ack mode of the https listener ('' : ack)", choices=("",) + ACK_MODES)
    fsync: str = _setting("batch", "when the write-ahead log is fsynced: always (before any reading it holds "
                          "is acknowledged, grouping what arrives meanwhile), batch (group commit every "
                          "wal_batch_ms) or off (the page cache: survives a crash of gw, not of the machine)",
                          choices=FSYNC_MODES)
    wal_batch_ms: float = _setting(2.0, "fsync batch: longest wait to group readings into one fsync, ms",
                                   minimum=0.1, maximum=1000)
    wal_segment_bytes: int = _setting(64 << 20, "size of a write-ahead log segment file, bytes",
                                      minimum=1 << 16, maximum=1 << 34)
    wal_max_pending: int = _setting(64 << 20, "bytes appended and not yet written before readings are "
                                    "refused (HTTP 503; MQTT publishers disconnected, their readings "
                                    "not acknowledged)", minimum=1 << 16, maximum=1 << 34)
    wal_retention_age: float = _setting(7 * 86400.0, "seconds a log segment is kept once every sink has "
                                        "read past it", minimum=0)
    wal_retention_bytes: int = _setting(10 << 30, "bytes of log kept per worker once every sink has read "
                                        "past them", minimum=1 << 20)
    max_sink_lag_bytes: int = _setting(1 << 30, "bytes of a worker's log the store sink may be behind before "
                                       "that worker holds ingest (HTTP 503 store_behind, JSON-lines Error, MQTT "
                                       "QoS 1/2 telemetry publishers not read, QoS 0 telemetry shed) until the "
                                       "lag is under 3/4 of it; unread log is never deleted, so a worker's log "
                                       "holds at most this plus wal_retention_bytes (0: no bound)", minimum=0,
                                       maximum=1 << 50)
    store_raw_retention: float = _setting(7 * 86400.0, "seconds raw readings are kept in the embedded store",
                                          minimum=60)
    store_1m_retention: float = _setting(30 * 86400.0, "seconds 1-minute rollups are kept", minimum=60)
    store_1h_retention: float = _setting(365 * 86400.0, "seconds 1-hour rollups are kept", minimum=3600)
    anomaly_window: int = _setting(60, "samples of a device's metric the z-score detector looks back on",
                                   minimum=2, maximum=100_000)
    anomaly_threshold: float = _setting(4.0, "z-score above which a reading raises an alert", minimum=0.5)
    file_sink: str = _setting("", "directory for the file sink's rotated NDJSON files ('' : off)")
    file_sink_rotate_bytes: int = _setting(64 << 20, "file sink: a new file after this many bytes",
                                           minimum=4096)
    file_sink_rotate_seconds: float = _setting(3600.0, "file sink: a new file after this many seconds",
                                               minimum=1)
    bridge: str = _setting("", "upstream MQTT broker for the bridge sink, mqtt://HOST:PORT or "
                           "mqtts://HOST:PORT ('' : off)")
    bridge_topic: str = _setting("telemetry", "the bridge publishes readings on TOPIC/{device_id} upstream")
    bridge_cafile: str = _setting("", "CA file to verify the upstream broker's certificate (mqtts)")
    bridge_client_id: str = _setting("gw-bridge", "the bridge's MQTT client id upstream")
    pipeline_batch: int = _setting(2000, "readings a sink takes per batch", minimum=1, maximum=1_000_000)
    channel_buffer: int = _setting(4 << 20, "SO_SNDBUF and SO_RCVBUF asked for each link between two workers, "
                                   "bytes (the kernel doubles it and caps it at net.core.wmem_max / rmem_max; "
                                   "0: the kernel's default). A link's datagrams are at most half of what its "
                                   "socket got; a larger frame goes in pieces", minimum=0, maximum=1 << 30)

    def address(self, key: str) -> Address | None:
        return parse_address(key, getattr(self, key))


SETTINGS = {f.name: f for f in fields(Config)}
# Changing these needs a restart: SIGHUP reloads the rest.
RESTART_ONLY = LISTENER_KEYS + ("workers", "data_dir", "defer_accept", "store", "store_pg_partitions_ahead",
                                "store_pg_connect_timeout", "idempotency_capacity", "idempotency_window",
                                "fsync", "wal_segment_bytes", "file_sink", "bridge", "channel_buffer",
                                "query_threads", "auth_threads", "tls_ticket_lifetime")


def _coerce(key: str, value):
    f = SETTINGS[key]
    meta = f.metadata
    typ = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if typ is bool:
        # TOML gives a bool; a flag gives its text.
        if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
            value = BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
    elif not isinstance(value, str):
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if meta["min"] is not None and value < meta["min"]:
        raise ConfigError(f"config key '{key}': must be at least {meta['min']}, got {value!r}")
    if meta["max"] is not None and value > meta["max"]:
        raise ConfigError(f"config key '{key}': must be at most {meta['max']}, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}': must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta["kind"] == "address":
        parse_address(key, value)
    if meta["kind"] == "store" and value != "sqlite" and not store_is_postgresql(value):
        raise ConfigError(f"config key '{key}': expected sqlite or a URL postgresql://..., "
                          f"got {value.split('://')[0] + '://...' if '://' in value else value!r}")
    return value


def load_config(path: str | None = None, overrides: dict | None = None) -> Config:
    """Defaults < TOML file < overrides (the flags given on the command line)."""
    values: dict = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
        # Accept either top-level keys or a [gw] table.
        if set(data) == {"gw"} and isinstance(data["gw"], dict):
            data = data["gw"]
        for key, value in data.items():
            if key not in SETTINGS:
                raise ConfigError(f"unknown config key '{key}' in {path}")
            values[key] = _coerce(key, value)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in SETTINGS:
            raise ConfigError(f"unknown config key '{key}'")
        values[key] = _coerce(key, value)
    cfg = Config(**values)
    if not any(cfg.address(k) for k in LISTENER_KEYS):
        raise ConfigError("config keys " + ", ".join(f"'{k}'" for k in LISTENER_KEYS) + ": every listener is off")
    check_client_certificates(cfg)
    if cfg.max_bytes_rate and cfg.max_bytes_burst and cfg.max_bytes_burst < cfg.max_packet_size:
        # Refused rather than raised: a setting silently different from the file misleads.
        raise ConfigError(f"config key 'max_bytes_burst': {cfg.max_bytes_burst} is below max_packet_size "
                          f"({cfg.max_packet_size}): one largest message would empty the bucket; raise it, "
                          f"or 0 for the default")
    if not cfg.ws_path.startswith("/") or any(ch <= " " or ch in "?#" or ord(ch) > 126 for ch in cfg.ws_path):
        raise ConfigError(f"config key 'ws_path': not an absolute path without query: {cfg.ws_path!r}")
    for origin in ws_origins(cfg):
        if "://" not in origin or any(ch <= " " or ord(ch) > 126 for ch in origin):
            raise ConfigError(f"config key 'ws_allowed_origins': not an origin (scheme://host[:port]): {origin!r}")
    if (not cfg.telemetry_topic or any(ch in cfg.telemetry_topic for ch in "+#\0")
            or cfg.telemetry_topic.startswith("$") or cfg.telemetry_topic.endswith("/")):
        raise ConfigError(f"config key 'telemetry_topic': not a plain topic prefix: {cfg.telemetry_topic!r}")
    return cfg


def ws_origins(cfg: Config) -> frozenset:
    """ws_allowed_origins as the set of lowercased origins (empty: any)."""
    return frozenset(o.strip().lower().rstrip("/") for o in cfg.ws_allowed_origins.split(",") if o.strip())


def store_is_postgresql(store: str | None) -> bool:
    """The `store` setting names a PostgreSQL database (else: the embedded store)."""
    return isinstance(store, str) and store.startswith(("postgresql://", "postgres://"))


def check_client_certificates(cfg: Config) -> None:
    """The client-certificate settings hang together (their files are loaded,
    and their errors reported, by the TLS contexts: gw/master.py)."""
    if cfg.require_certificate and not cfg.client_cafile:
        raise ConfigError("config key 'client_cafile': required when require_certificate is true "
                          "(the CA that client certificates are verified against)")
    if cfg.use_identity_as_username and not cfg.require_certificate:
        raise ConfigError("config key 'use_identity_as_username': needs require_certificate = true")
    if cfg.crlfile and not cfg.require_certificate:
        raise ConfigError("config key 'crlfile': needs require_certificate = true and client_cafile")


def is_loopback_host(host: str) -> bool:
    """A listener's host that only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False            # a host name: it may resolve anywhere


def certificate_required(cfg: Config, listener: str) -> bool:
    """Whether a listener lets in only clients with a verified certificate
    (require_certificate, on a TLS listener): for the start-up check of
    listeners off loopback, an authentication."""
    return cfg.require_certificate and listener in TLS_LISTENER_KEYS


def describe() -> str:
    """The settings as a commented TOML file (`gw config`)."""
    lines = []
    for f in fields(Config):
        default = f.default
        lines.append(f"# {f.metadata['doc']}")
        if isinstance(default, bool):
            lines.append(f"{f.name} = {str(default).lower()}")
        else:
            lines.append(f"{f.name} = {default!r}".replace("'", '"') if isinstance(default, str)
                         else f"{f.name} = {default}")
    return "\n".join(lines) + "\n"
