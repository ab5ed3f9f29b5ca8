"""The validated plan of a bench run: what to connect where, and how."""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import resource
import secrets
import socket

# One process never holds more than this many client sockets (the hard limit
# is 20,000 open files per process; keep room for pipes, epoll, libraries).
MAX_SOCKETS_PER_PROC = 19_000
# A source address reaches one server address:port through at most this many
# ephemeral ports (net.ipv4.ip_local_port_range).
EPHEMERAL_FALLBACK = 28_000


class PlanError(ValueError):
    """The plan cannot run as asked; the message tells the user what to change."""


@dataclasses.dataclass
class Plan:
    scenario: str                      # "conn", "pubsub" or "ingest"
    host: str
    port: int
    family: int
    sockaddr: tuple
    protocol: str = "mqtt"
    mqtt_version: str = "3.1.1"        # "3.1.1" or "5" (MQTT 5.0): the MQTT clients' protocol level
    tls: bool = False
    cafile: str | None = None
    insecure: bool = False
    username: str | None = None
    password: str | None = None
    client_prefix: str = ""
    run_id: str = ""
    procs: int = 1
    source_ips: list = dataclasses.field(default_factory=list)
    duration: float = 10.0
    rampup: float = 0.0
    keepalive: int = 30
    connect_timeout: float = 10.0
    grace: float = 10.0
    # connection scenario
    clients: int = 0
    messages: int = 0
    # both
    qos: int = 0
    size: int = 16
    # throughput scenario
    publishers: int = 0
    subscribers: int = 0
    rate: float = 0.0
    topic_mode: str = "per-publisher"
    inflight: int = 32
    topic_prefix: str = ""
    # ingest scenario (clients and rate above)
    transport: str = "http"            # ingest: "http" or "mqtt"; conn, pubsub: "ws" is MQTT over WebSocket
    ws_path: str = "/mqtt"             # --transport ws: the upgrade request's path
    devices: int = 0
    pipeline: int = 1
    anomalies: bool = False
    anomaly_fraction: float = 0.005
    seq: bool = True
    seed: int = 0
    path: str = "/v1/ingest/"

    INGEST_FIELDS = ("transport", "devices", "pipeline", "anomalies", "anomaly_fraction", "seq", "seed", "path")

    @property
    def mqtt_level(self) -> int:
        """The CONNECT's protocol level: 4 (MQTT 3.1.1) or 5 (MQTT 5.0)."""
        return 5 if self.mqtt_version == "5" else 4

    @property
    def total_clients(self) -> int:
        return self.clients if self.scenario in ("conn", "ingest") else self.publishers + self.subscribers

    def sub_procs(self) -> int:
        """Pubsub: how many workers hold subscribers. With two or more
        workers, subscribers and publishers live in separate processes, split
        by load: a subscriber receives every message of every publisher, so
        the subscribers' share of the work is S / (S + 1)."""
        if self.scenario != "pubsub" or self.procs < 2 or self.subscribers == 0:
            return 0
        share = self.subscribers / (self.subscribers + 1)
        return min(self.procs - 1, self.subscribers, max(1, round(self.procs * share)))

    def worker_of(self, g: int) -> int:
        if self.scenario == "pubsub" and self.procs >= 2:
            ns = self.sub_procs()
            if g < self.subscribers:
                return g % ns
            return ns + (g - self.subscribers) % (self.procs - ns)
        return g % self.procs

    def indices_for(self, worker: int):
        """Global client indices owned by a worker. Connection scenario:
        round-robin, so the ramp's schedule interleaves evenly over the
        workers; pubsub: see sub_procs()."""
        if self.scenario == "pubsub" and self.procs >= 2:
            return [g for g in range(self.total_clients) if self.worker_of(g) == worker]
        return range(worker, self.total_clients, self.procs)

    def sockets_per_worker(self) -> list[int]:
        counts = [0] * self.procs
        if self.scenario == "pubsub" and self.procs >= 2:
            for g in range(self.total_clients):
                counts[self.worker_of(g)] += 1
        else:
            for w in range(self.procs):
                counts[w] = len(range(w, self.total_clients, self.procs))
        return counts

    def client_id(self, g: int) -> str:
        return f"{self.client_prefix}{g}"

    def role(self, g: int) -> str:
        if self.scenario == "conn":
            return "idle"
        return "sub" if g < self.subscribers else "pub"

    def publish_topic(self, pub_id: int) -> str:
        if self.topic_mode == "shared":
            return f"{self.topic_prefix}/shared"
        return f"{self.topic_prefix}/p/{pub_id}"

    def subscribe_filter(self) -> str:
        if self.topic_mode == "shared":
            return f"{self.topic_prefix}/shared"
        return f"{self.topic_prefix}/p/+"

    def source_ip_for(self, g: int) -> str | None:
        if not self.source_ips:
            return None
        return self.source_ips[g % len(self.source_ips)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("password", None)
        if self.scenario != "ingest":
            for k in self.INGEST_FIELDS:
                if not (k == "transport" and self.transport == "ws"):
                    d.pop(k, None)
        else:
            for k in ("protocol", "mqtt_version", "rampup", "messages", "qos", "size", "publishers", "subscribers",
                      "topic_mode", "inflight"):
                d.pop(k, None)
        if self.transport != "ws" or self.scenario == "ingest":
            d.pop("ws_path", None)
        d.pop("family", None)
        d["sockaddr"] = list(self.sockaddr)
        return d


def parse_server(server: str, default_port: int = 1883) -> tuple[str, int]:
    s = server.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return host, port
    if s.count(":") == 1:
        host, port = s.split(":")
        return host or "127.0.0.1", int(port)
    if s.count(":") > 1:  # bare IPv6
        return s, default_port
    return s, default_port


def resolve(host: str, port: int) -> tuple[int, tuple]:
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PlanError(f"cannot resolve server {host!r}: {e.strerror}") from None
    fam, _, _, _, sa = infos[0]
    return fam, sa


def parse_source_ips(spec: str | None) -> list[str]:
    """'127.0.0.1-127.0.0.20', '127.0.0.2,127.0.0.3' or a CIDR '127.0.1.0/24'."""
    if not spec:
        return []
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "/" in part:
                net = ipaddress.ip_network(part, strict=False)
                addrs = list(net.hosts()) if net.num_addresses > 2 else list(net)
            elif "-" in part:
                a, b = (ipaddress.ip_address(x.strip()) for x in part.split("-", 1))
                if b < a or a.version != b.version:
                    raise PlanError(f"bad --source-ips range {part!r}")
                if int(b) - int(a) > 65535:
                    raise PlanError(f"--source-ips range {part!r} is larger than 65,536 addresses")
                addrs = [ipaddress.ip_address(i) for i in range(int(a), int(b) + 1)]
            else:
                addrs = [ipaddress.ip_address(part)]
        except ValueError as e:
            raise PlanError(f"bad --source-ips {part!r}: {e}") from None
        out.extend(str(a) for a in addrs)
    return out


def ephemeral_ports() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return hi - lo + 1
    except OSError:
        return EPHEMERAL_FALLBACK


def check(plan: Plan) -> list[str]:
    """Validates a plan; raises PlanError, returns warnings."""
    warnings: list[str] = []
    if plan.scenario == "conn":
        if plan.clients < 1:
            raise PlanError("--clients must be at least 1")
    elif plan.scenario == "ingest":
        check_ingest(plan)
    else:
        if plan.publishers < 1 or plan.subscribers < 0:
            raise PlanError("pubsub needs --publishers >= 1 and --subscribers >= 0")
        if plan.protocol != "mqtt":
            raise PlanError("the throughput scenario speaks MQTT only (--protocol mqtt)")
        if plan.qos not in (0, 1, 2):
            raise PlanError("--qos must be 0, 1 or 2")
        if not 1 <= plan.inflight <= 65535:
            raise PlanError("--inflight must be 1..65535")
    if plan.transport == "ws" and plan.scenario != "ingest":
        if plan.protocol != "mqtt":
            raise PlanError("--transport ws carries MQTT (--protocol mqtt)")
        if not plan.ws_path.startswith("/"):
            raise PlanError("--ws-path must start with '/'")
    if plan.mqtt_version not in ("3.1.1", "5"):
        raise PlanError("--mqtt-version must be 3.1.1 or 5")
    if plan.mqtt_version == "5":
        if plan.scenario == "ingest":
            raise PlanError("the ingest scenario speaks MQTT 3.1.1 only: drop --mqtt-version 5")
        if plan.protocol != "mqtt":
            raise PlanError("--mqtt-version 5 is for MQTT clients (--protocol mqtt)")
    if plan.scenario == "conn" and plan.qos not in (0, 1):
        raise PlanError("the connection scenario publishes with --qos 0 or 1")
    from .payload import MIN_SIZE
    if plan.size < MIN_SIZE:
        raise PlanError(f"--size must be at least {MIN_SIZE} bytes (publisher id, sequence, timestamp)")
    if plan.size > 256 * 1024 * 1024:
        raise PlanError("--size above MQTT's 256 MiB limit")
    if plan.procs < 1:
        raise PlanError("--procs must be at least 1")
    if plan.duration <= 0:
        raise PlanError("--duration must be positive")
    if plan.rampup < 0:
        raise PlanError("--rampup must be >= 0")
    if not 0 <= plan.keepalive <= 65535:
        raise PlanError("--keepalive must be 0..65535 seconds")
    if plan.tls and plan.protocol == "json":
        pass  # TLS under the JSON line protocol is allowed too
    if plan.cafile and not os.path.isfile(plan.cafile):
        raise PlanError(f"--cafile {plan.cafile}: no such file")
    if plan.password is not None and plan.username is None:
        raise PlanError("--password needs --username (MQTT 3.1.1 section 3.1.2.9)")

    total = plan.total_clients
    if plan.procs > total:
        plan.procs = total
    per_proc = max(plan.sockets_per_worker())
    if per_proc > MAX_SOCKETS_PER_PROC:
        need = math.ceil(total / MAX_SOCKETS_PER_PROC)
        if plan.scenario == "pubsub":
            need = max(need, math.ceil(plan.subscribers / MAX_SOCKETS_PER_PROC)
                       + math.ceil(plan.publishers / MAX_SOCKETS_PER_PROC))
        raise PlanError(
            f"{total:,} clients over {plan.procs} process(es) is {per_proc:,} sockets in one process, "
            f"above the {MAX_SOCKETS_PER_PROC:,} a process may hold (open-file limit 20,000): "
            f"use --procs {need} or more")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and per_proc + 64 > hard:
        raise PlanError(f"{per_proc:,} sockets per process exceed this machine's open-file limit "
                        f"({hard:,}); use more --procs")
    ports = ephemeral_ports()
    sources = max(1, len(plan.source_ips))
    if total > ports * sources:
        raise PlanError(
            f"{total:,} connections to one server address need more than the {ports:,} ephemeral ports "
            f"of {sources} source address(es): add --source-ips, e.g. --source-ips 127.0.0.1-127.0.0.{min(254, math.ceil(total / ports) + 1)}")
    for ip in plan.source_ips:
        a = ipaddress.ip_address(ip)
        if a.version == 4 and plan.family != socket.AF_INET or a.version == 6 and plan.family != socket.AF_INET6:
            raise PlanError(f"--source-ips {ip} is not of the server address's family")
    if plan.procs > (os.cpu_count() or 1) * 2:
        warnings.append(f"--procs {plan.procs} is more than twice the CPU count; workers will compete")
    return warnings


def check_ingest(plan: Plan) -> None:
    if plan.clients < 1:
        raise PlanError("--clients must be at least 1")
    if plan.devices < plan.clients:
        raise PlanError(f"--devices ({plan.devices:,}) must be at least --clients ({plan.clients:,}): "
                        f"each connection carries its own devices, so each device's seq stays in order")
    if plan.devices > 4_000_000_000:
        raise PlanError("--devices above 4,000,000,000")
    if not 1 <= plan.pipeline <= 4096:
        raise PlanError("--pipeline must be 1..4096")
    if plan.rate < 0:
        raise PlanError("--rate must be >= 0 (0: as fast as possible)")
    if plan.transport not in ("http", "mqtt"):
        raise PlanError("--transport must be http or mqtt")
    if plan.tls:
        raise PlanError("the ingest scenario speaks plain HTTP (and plain MQTT) only: drop --tls")
    if not 0 < plan.anomaly_fraction <= 0.5:
        raise PlanError("--anomaly-fraction must be in (0, 0.5]")
    if not plan.path.startswith("/") or not plan.path.endswith("/"):
        raise PlanError("--path must start and end with '/' (the device id is appended)")


def new_run_id() -> str:
    return secrets.token_hex(4)
