"""The load generator's click command: `gwbench`, and `gw bench` (the same command)."""
from __future__ import annotations

import os
import sys

import click
from click.core import ParameterSource

from . import plan as plan_mod
from .plan import Plan, PlanError

SCENARIOS = {"conn": "conn", "connection": "conn", "pubsub": "pubsub", "throughput": "pubsub", "ingest": "ingest"}
# The ingest scenario's defaults where they differ from the MQTT scenarios'.
INGEST_DEFAULTS = {"server": "127.0.0.1:8080", "clients": 64, "procs": 1}


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("scenario", required=False, type=click.Choice(sorted(SCENARIOS)), metavar="[conn|pubsub|ingest]")
@click.option("--mode", type=click.Choice(["connection", "throughput"]), default=None,
              help="Same as the scenario word: connection (default) or throughput (= pubsub).")
@click.option("--server", default="127.0.0.1:1883", show_default=True, metavar="HOST:PORT",
              help="Broker to load ([v6]:port for IPv6); ingest: the HTTP listener (default "
                   "127.0.0.1:8080), or with --transport mqtt the broker.")
@click.option("--tls", is_flag=True, help="Connect with TLS.")
@click.option("--cafile", type=click.Path(dir_okay=False), help="CA bundle that signed the broker's certificate.")
@click.option("--insecure", is_flag=True, help="TLS without certificate or host name verification.")
@click.option("--username", default=None, help="MQTT user name; {n} in it (or in --password) is the client's "
                                               "number, 0 up, giving each client its own credentials.")
@click.option("--password", default=None, help="MQTT password (needs --username).")
@click.option("--protocol", type=click.Choice(["mqtt", "json"]), default="mqtt", show_default=True,
              help="mqtt: MQTT (3.1.1, or 5.0 with --mqtt-version 5); json: gw's newline-delimited JSON "
                   "protocol (connection scenario).")
@click.option("--mqtt-version", type=click.Choice(["3.1.1", "5"]), default="3.1.1", show_default=True,
              help="MQTT clients' version (connection and throughput scenarios). 5: MQTT 5.0 clients "
                   "(CONNECT level 5; reason codes in CONNACK, SUBACK, PUBACK read: one >= 0x80 on a PUBACK "
                   "counts as rejected, not acknowledged); publishers send with a Topic Alias (the topic "
                   "once, then only the alias) when the server's CONNACK announces a Topic Alias Maximum, "
                   "and keep at most the server's Receive Maximum in flight.")
@click.option("--clients", "-c", type=int, default=1000, show_default=True,
              help="Connection scenario: number of clients; ingest: keep-alive connections (default 64).")
@click.option("--rampup", type=float, default=0.0, show_default=True,
              help="Seconds over which client connects are spread evenly (0: as fast as possible).")
@click.option("--duration", "-d", type=float, default=10.0, show_default=True,
              help="Connection scenario: hold after the ramp; pubsub: publishing time; ingest: sending "
                   "time (then every request is waited for). Seconds.")
@click.option("--keepalive", type=int, default=30, show_default=True,
              help="MQTT keepalive in seconds; a PINGREQ (JSON: Heartbeat) is sent every K s (0: none).")
@click.option("--messages", "-m", type=int, default=0, show_default=True,
              help="Connection scenario: publishes per client, spread from its connect to the end of the hold.")
@click.option("--qos", type=click.IntRange(0, 2), default=0, show_default=True,
              help="QoS of publishes (connection scenario: 0 or 1) and subscriptions.")
@click.option("--size", "-s", type=int, default=64, show_default=True,
              help="Payload bytes (at least 16: publisher id, sequence, send timestamp).")
@click.option("--publishers", "-p", type=int, default=1, show_default=True, help="Pubsub: publishers.")
@click.option("--subscribers", "-S", type=int, default=1, show_default=True, help="Pubsub: subscribers.")
@click.option("--rate", "-r", type=float, default=0.0, show_default=True,
              help="Pubsub: total messages/s over all publishers (0: flat out). Ingest: total requests/s "
                   "over all clients, open loop: latency is measured from each request's scheduled time "
                   "(0: flat out, closed loop with --pipeline outstanding per connection).")
@click.option("--topic-mode", type=click.Choice(["per-publisher", "shared"]), default="per-publisher",
              show_default=True, help="Pubsub: a topic per publisher (subscribers use +) or one shared topic.")
@click.option("--inflight", type=int, default=64, show_default=True,
              help="Pubsub: unacknowledged QoS 1/2 publishes per publisher.")
@click.option("--topic-prefix", default=None, help="Topic prefix (default gwbench/<run id>).")
@click.option("--client-prefix", default=None, help="Client id prefix; ids are prefix + index "
              "(default gwbench-<run id>-).")
@click.option("--procs", type=int, default=None,
              help="Worker processes, clients split evenly (default: CPU count; ingest: 1, which drives "
                   "> 40,000 requests/s; at most 19,000 sockets each).")
@click.option("--devices", "-n", type=int, default=1000, show_default=True,
              help="Ingest: devices dev-00000.., spread over the clients (each device on one connection, "
                   "its records in seq order).")
@click.option("--pipeline", "-k", type=int, default=1, show_default=True,
              help="Ingest: requests outstanding per connection (1: keep-alive without pipelining).")
@click.option("--transport", type=click.Choice(["http", "mqtt", "ws"]), default="http", show_default=True,
              help="Ingest: POST /v1/ingest/{device_id}, or MQTT QoS 1 PUBLISH of the same JSON record to "
                   "telemetry/{device_id} (--topic-prefix changes 'telemetry'). Connection and throughput "
                   "scenarios: ws speaks MQTT over WebSocket (an upgrade on --ws-path, masked binary frames; "
                   "default server 127.0.0.1:8083, with --tls 8084); the others plain MQTT.")
@click.option("--ws-path", default="/mqtt", show_default=True, help="--transport ws: the upgrade's path.")
@click.option("--anomalies", is_flag=True,
              help="Ingest: make a small fraction of readings far (40 C) off each device's normal value; "
                   "the count (and the list of device/seq) is in the result.")
@click.option("--anomaly-fraction", type=float, default=0.005, show_default=True,
              help="Ingest: share of readings made anomalies with --anomalies.")
@click.option("--seq/--no-seq", default=True, show_default=True,
              help="Ingest: include a per-device increasing seq in each record.")
@click.option("--seed", type=int, default=None,
              help="Ingest: seed of the readings (default: random; reported in the result).")
@click.option("--path", "http_path", default="/v1/ingest/", show_default=True,
              help="Ingest: URL path before the device id.")
@click.option("--source-ips", default=None, metavar="A-B|CIDR|A,B",
              help="Bind client sockets to these local addresses round-robin, "
                   "e.g. 127.0.0.1-127.0.0.20 (to pass the ~28k ephemeral ports per address).")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True,
              help="Seconds for TCP + TLS + CONNACK before a client counts as failed.")
@click.option("--server-pid", default=None, metavar="PID|auto",
              help="Sample this broker process (and its children): RSS, CPU, RSS per connection. "
                   "'auto': the local process listening on --server's port (for gw serve, its master).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the full result (with per-second timeseries and histograms) as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write a PNG of connected and msgs/s over time (needs matplotlib).")
@click.option("--quiet", "-q", is_flag=True, help="No live progress line.")
@click.option("--dry-run", is_flag=True, help="Check and print the plan (processes, sockets, source "
              "addresses, rates), then exit without connecting.")
def bench(scenario, mode, server, tls, cafile, insecure, username, password, protocol, mqtt_version, clients, rampup,
          duration, keepalive, messages, qos, size, publishers, subscribers, rate, topic_mode, inflight,
          topic_prefix, client_prefix, procs, devices, pipeline, transport, ws_path, anomalies, anomaly_fraction,
          seq, seed, http_path, source_ips, connect_timeout, server_pid, json_path, plot_path, quiet,
          dry_run):
    """Load-test an MQTT 3.1.1 or 5.0 broker (gw, Mosquitto, any other), or an
    HTTP ingest endpoint.

    \b
    Connection scenario (default):
      gw bench --clients 10000 --rampup 15 --duration 30 --server 127.0.0.1:1883
    Throughput scenario:
      gw bench pubsub --publishers 10 --subscribers 1 --qos 0 --size 64 --duration 10
      gw bench pubsub --mqtt-version 5 --publishers 4 --qos 1     (MQTT 5.0, Topic Aliases)
    Either over MQTT over WebSocket:
      gw bench --transport ws --clients 10000 --rampup 15 --server 127.0.0.1:8083
    Ingest scenario (POST /v1/ingest/{device_id}, HTTP/1.1 keep-alive):
      gw bench ingest --server 127.0.0.1:8080 --clients 64 --devices 10000 --rate 10000 --duration 30
      gw bench ingest --clients 64 --pipeline 8 --duration 10          (flat out)
      gw bench ingest --devices 25 --rate 200 --anomalies --transport mqtt --server 127.0.0.1:1883

    \b
    Ingest reports requests/s sent and answered, responses by status code,
    latency p50/p90/p99/p99.9/max measured from each request's scheduled
    time (at a fixed --rate the wait behind a slow server counts: no
    coordinated omission), the service time from the actual write, and a
    per-second timeline in --json.

    Exit status: 0 when every client connected and stayed connected and (QoS
    >= 1) nothing was lost (ingest: every request answered, at least one
    2xx, no transport error; non-2xx answers are reported, not failures);
    1 when the run had failures (partial results are still reported); 2 when
    it could not start (bad plan, unreachable server, TLS or credentials
    refused); 130 when interrupted.

    `gw bench` and `gwbench` are the same command.
    """
    sc = SCENARIOS[scenario] if scenario else ("pubsub" if mode == "throughput" else "conn")
    if sc == "ingest":
        ctx = click.get_current_context()
        given = {name: ctx.get_parameter_source(name) != ParameterSource.DEFAULT for name in INGEST_DEFAULTS}
        if not given["server"] and transport == "http":
            server = INGEST_DEFAULTS["server"]
        if not given["clients"]:
            clients = INGEST_DEFAULTS["clients"]
        if not given["procs"] and procs is None:
            procs = INGEST_DEFAULTS["procs"]
        if ctx.get_parameter_source("devices") == ParameterSource.DEFAULT and devices < clients:
            devices = clients
    if sc != "ingest" and transport == "ws" and \
            click.get_current_context().get_parameter_source("server") == ParameterSource.DEFAULT:
        server = "127.0.0.1:8084" if tls or cafile or insecure else "127.0.0.1:8083"
    if scenario and mode and sc != ("pubsub" if mode == "throughput" else "conn"):
        raise click.UsageError(f"scenario {scenario!r} contradicts --mode {mode}")
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib, which is not installed: "
                                   "pip install 'gw[plot]' (or pip install matplotlib)")
    try:
        host, port = plan_mod.parse_server(server, 8080 if sc == "ingest" and transport == "http" else 1883)
        family, sockaddr = plan_mod.resolve(host, port)
        run_id = plan_mod.new_run_id()
        p = Plan(
            scenario=sc, host=host, port=port, family=family, sockaddr=sockaddr, protocol=protocol,
            mqtt_version=mqtt_version,
            tls=tls or bool(cafile) or insecure, cafile=cafile, insecure=insecure,
            username=username, password=password,
            client_prefix=client_prefix if client_prefix is not None else f"gwbench-{run_id}-",
            run_id=run_id, procs=procs or os.cpu_count() or 1,
            source_ips=plan_mod.parse_source_ips(source_ips), duration=duration, rampup=rampup,
            keepalive=keepalive, connect_timeout=connect_timeout, clients=clients, messages=messages,
            qos=qos, size=size, publishers=publishers, subscribers=subscribers, rate=rate,
            topic_mode=topic_mode, inflight=inflight,
            topic_prefix=topic_prefix if topic_prefix else ("telemetry" if sc == "ingest" else f"gwbench/{run_id}"),
            transport=transport, ws_path=ws_path, devices=devices, pipeline=pipeline, anomalies=anomalies,
            anomaly_fraction=anomaly_fraction, seq=seq, path=http_path,
            seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
        )
        for w in plan_mod.check(p):
            click.echo(f"warning: {w}", err=True)
    except PlanError as e:
        click.echo(f"{prog_name()}: {e}", err=True)
        sys.exit(2)

    if dry_run:
        click.echo(describe(p))
        sys.exit(0)

    if sc in ("pubsub", "ingest"):
        try:
            if sc == "pubsub":
                from . import pubsub  # noqa: F401  (the compiled extension)
            else:
                import gwbench._ext.ingest_engine  # noqa: F401
        except ImportError as e:
            click.echo(f"{prog_name()}: the {'throughput' if sc == 'pubsub' else 'ingest'} engine is not built "
                       f"({e}); run `python setup.py build_ext --inplace`", err=True)
            sys.exit(2)

    if sc == "ingest":
        from .ingest_scenario import PreflightError, preflight
    else:
        from .preflight import PreflightError, preflight
    try:
        preflight(p, timeout=min(5.0, connect_timeout))
    except PreflightError as e:
        click.echo(f"{prog_name()}: {e}", err=True)
        sys.exit(2)

    if server_pid is not None:
        server_pid = resolve_server_pid(server_pid, p.host, p.port)
    from .report import format_text, write_json, write_plot
    from .coordinator import Coordinator
    result = Coordinator(p, quiet=quiet, server_pid=server_pid).run()
    click.echo(format_text(result))
    if json_path:
        write_json(result, json_path)
    if plot_path:
        try:
            write_plot(result, plot_path)
        except RuntimeError as e:
            click.echo(f"{prog_name()}: {e}", err=True)
    sys.exit(result["exit_code"])


def main() -> None:
    """The `gwbench` command (and `python -m gwbench`)."""
    bench(prog_name="gwbench")


def prog_name() -> str:
    """What the user typed to run the load generator, for its messages:
    `gwbench` on its own, `gw bench` under the gw command."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.parent is not None:
        return "gw bench"
    return ctx.info_name or "gwbench"


def describe(p: Plan) -> str:
    import math
    total = p.total_clients
    per = max(p.sockets_per_worker())
    lines = []
    proto = f"mqtt {p.mqtt_version}" if p.protocol == "mqtt" else p.protocol
    where = f"{p.host}:{p.port} ({proto}{'+tls' if p.tls else ''})"
    if p.scenario == "ingest":
        what = (f"POST {p.path}{{device_id}}" if p.transport == "http"
                else f"MQTT QoS 1 to {p.topic_prefix}/{{device_id}}")
        lines.append(f"ingest scenario: {total:,} keep-alive client(s), {p.devices:,} device(s) -> "
                     f"{p.host}:{p.port} ({what}), "
                     + (f"{p.rate:,.0f} requests/s (open loop, {p.rate / p.devices:,.3g}/s per device)"
                        if p.rate else f"flat out (closed loop)")
                     + f", pipeline {p.pipeline}, {p.duration:g} s")
        if p.anomalies:
            lines.append(f"anomalies: a fraction {p.anomaly_fraction:g} of readings, seed {p.seed}")
    elif p.scenario == "conn":
        lines.append(f"connection scenario: {total:,} clients -> {where}")
        if p.rampup:
            lines.append(f"ramp: {total / p.rampup:,.0f} connects/s over {p.rampup:g} s, then hold {p.duration:g} s")
        else:
            lines.append(f"ramp: none (at most {1000 * p.procs:,} handshakes in flight), then hold {p.duration:g} s")
        if p.keepalive:
            lines.append(f"keepalive: {p.keepalive} s ({total / p.keepalive:,.0f} PINGREQ/s when all are connected)")
        if p.messages:
            lines.append(f"messages: {p.messages} per client, QoS {p.qos}, {p.size} B")
    else:
        lines.append(f"pubsub scenario: {p.publishers} publisher(s) -> {p.subscribers} subscriber(s) at {where}, "
                     f"QoS {p.qos}, {p.size} B, {'flat out' if not p.rate else format(p.rate, ',.0f') + ' msg/s'}, "
                     f"topics {p.topic_mode} ({p.subscribe_filter()}), inflight {p.inflight}")
    lines.append(f"workers: {p.procs} process(es), up to {per:,} sockets each (limit "
                 f"{plan_mod.MAX_SOCKETS_PER_PROC:,})")
    if p.sub_procs():
        lines.append(f"roles: subscribers in {p.sub_procs()} process(es), publishers in "
                     f"{p.procs - p.sub_procs()}")
    ports = plan_mod.ephemeral_ports()
    if p.source_ips:
        lines.append(f"source addresses: {len(p.source_ips)} ({math.ceil(total / len(p.source_ips)):,} "
                     f"connections each; {ports:,} ephemeral ports per address)")
    else:
        lines.append(f"source address: chosen by the kernel ({ports:,} ephemeral ports)")
    if p.scenario != "ingest" or p.transport == "mqtt":
        lines.append(f"client ids: {p.client_id(0)} .. {p.client_id(total - 1)}")
    return "\n".join(lines)


def resolve_server_pid(value: str, host: str, port: int) -> int:
    """--server-pid: a number, or 'auto': the process listening on the broker's
    port on this machine, climbing to the top of its process tree while the
    parent listens there too (gw's master holds every worker's sockets)."""
    if value != "auto":
        try:
            return int(value)
        except ValueError:
            raise click.BadParameter("a process id or 'auto'", param_hint="--server-pid") from None
    import psutil

    listeners = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            listeners.add(conn.pid)
    if not listeners:
        raise click.BadParameter(f"no local process listens on port {port} (is the broker on "
                                 f"this machine?)", param_hint="--server-pid")
    def listens(proc) -> bool:
        try:
            return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                       for c in proc.net_connections(kind="tcp"))
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            return False

    proc = psutil.Process(min(listeners))
    while proc.parent() is not None and listens(proc.parent()):
        proc = proc.parent()
    return proc.pid
