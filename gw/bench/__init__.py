"""gw bench: a load generator for gw and any MQTT 3.1.1 broker.

Scenarios: the connection scenario (many clients on a ramp, held with
keepalives, optional publishes) and the throughput scenario (publishers ->
subscribers with exact loss, duplicate and latency accounting). The click
command is gw.bench.cli.bench; `python -m gw.bench` runs it standalone.
"""
