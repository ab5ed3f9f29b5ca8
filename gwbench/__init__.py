"""gwbench: a load generator for gw and any MQTT 3.1.1 broker, or an HTTP
ingest endpoint.

Scenarios: the connection scenario (many clients on a ramp, held with
keepalives, optional publishes), the throughput scenario (publishers ->
subscribers with exact loss, duplicate and latency accounting) and the
ingest scenario (telemetry over HTTP or MQTT QoS 1). The click command is
gwbench.command.bench, run as `gwbench` or as `gw bench` (the gw command
imports it only then); `python -m gwbench` runs it too. Its hot loops are
Cython in gwbench/_ext/.
"""
