# Type stub of the worker's event loop (loop.pyx and the gw_ext/worker/*.pyx it
# includes): what gw/worker.py, the tests and the fuzzers set and call.
from typing import Any, Callable, final

from gw_ext.acl import AclRules
from gw_ext.addrlimit import AddressCounts
from gw_ext.dedup import DedupTable
from gw_ext.tls import TLSContext
from gw_ext.wal import Wal

# JsonProtocol.handle's actions (gw/jsonproto.py).
JSON_OK: int
JSON_CONNECTED: int
JSON_CLOSE: int
JSON_ERROR: int
# LIMITS + LIM_* (gw_ext/stats.pxd): the setting each bound is.
LIMIT_SETTINGS: list[str]
# Readable names of the codec's MAL_* reasons, for log lines.
MALFORMED_NAMES: list[str]

def peer_address(fd: int) -> str:
    """A connected socket's peer as "host:port", for a log line; "?" if it is gone."""

def tls_records_open(suite: int, secret: bytes, data: bytes, cap: int = ...) -> tuple[int, bytes, int]:
    """Opens TLS 1.3 records as gw's read side (worker/tls_records.pyx): (status, plaintext, consumed)."""

def tls_records_seal(suite: int, secret: bytes, plain: bytes, seq: int = ..., content_type: int = ...) -> bytes:
    """Seals plain into TLS 1.3 records with the keys of secret: the other end of tls_records_open."""

def tls_record_state_size() -> int:
    """Bytes of gw's record state per TLS connection."""

class PendingConnect:
    """A CONNECT waiting for its session to be settled."""

@final
class ClaimCheck:
    """A claim by another user at its client id's home, waiting for the id's owner to say what it holds."""

@final
class PendingSuback:
    """A SUBACK held until every peer confirmed."""

@final
class Worker:
    """One worker process's event loop. Built and configured by gw/worker.py."""

    # Set by gw/worker.py, before run() and again on a reload.
    stopped: bool
    on_reload: Callable[[], Any] | None
    on_tick: Callable[[], Any] | None
    tick_ms: int
    worker_index: int
    tls_own_records: bool
    max_connections: int
    allow_anonymous: bool
    certificate_anonymous: bool
    auth_required: bool
    max_packet_size: int
    ws_path: bytes
    ws_allowed_origins: frozenset[bytes]
    max_outbound: int
    soft_outbound: int
    connect_timeout_ms: int
    settle_timeout_ms: int
    json_timeout_ms: int
    max_awaiting_rel: int
    topic_alias_maximum: int
    topic_alias_maximum_out: int
    max_delayed_wills: int
    max_subscriptions: int
    max_topic_levels: int
    max_topic_length: int
    max_retained: int
    max_retained_bytes: int
    sessions_changed: bool
    max_inflight: int
    max_queued: int
    max_queued_bytes: int
    queue_high: int
    queue_low: int
    max_sink_lag: int
    http_app: Any
    ingest: Any
    http_max_body: int
    http_timeout_ms: int
    http_keepalive_ms: int
    http_linger_bytes: int
    http_linger_ms: int
    http_current_fd: int

    def __init__(self, worker_index: int, counters_row: Any, all_counters: Any, nworkers: int,
                 json_protocol: Any, max_fds: int) -> None: ...
    def add_listener(self, fd: int, proto: str, tls: TLSContext | None = None, ack_sink: bool = False) -> int: ...
    def add_peer(self, peer: int, fd: int) -> None: ...
    def set_wal(self, wal: Wal) -> None: ...
    def set_dedup(self, dedup: DedupTable) -> None: ...
    def set_acl(self, rules: AclRules | None) -> None: ...
    @property
    def acl_rules(self) -> AclRules | None: ...
    def set_query_pool(self, pool: Any) -> None: ...
    def set_auth(self, authenticator: Any, pool: Any) -> None: ...
    def set_rate_limits(self, conn_rate: float = ..., conn_burst: float = ..., messages_rate: float = ...,
                        messages_burst: float = ..., bytes_rate: float = ..., bytes_burst: float = ...,
                        per_ip: int = ...) -> None: ...
    def set_address_counts(self, counts: AddressCounts | None) -> None: ...
    @property
    def rate_paused(self) -> int: ...
    @property
    def telemetry_topic(self) -> str: ...
    @telemetry_topic.setter
    def telemetry_topic(self, prefix: str) -> None: ...
    def publish(self, topic: bytes, payload: bytes, qos: int = 0, retain: bool = False) -> None: ...
    def snapshot_sessions(self, changed_only: bool = False) -> list[tuple[int, bytes | None, bytes | None]]: ...
    def restore_sessions(self, saved: list[tuple[bytes, bytes]]) -> None: ...
    @property
    def changed(self) -> tuple[bool, bool]: ...
    def expire_sessions(self, seconds: float) -> int: ...
    def retained_saved(self) -> None: ...
    def retain(self, topic: bytes, qos: int, payload: bytes, ext: bytes | None = None) -> bool: ...
    @property
    def retained_messages(self) -> dict[bytes, tuple[int, bytes] | tuple[int, bytes, bytes]]: ...
    def set_tls_context(self, index: int, tls: TLSContext) -> None: ...
    def request_drain(self, seconds: float) -> None: ...
    def request_reload(self) -> None: ...
    @property
    def connections(self) -> int: ...
    def run(self) -> None: ...
    def run_once(self, timeout_ms: int = 0) -> bool: ...
