"""gw: an IoT connection gateway (MQTT 3.1.1, JSON lines, HTTP ingest) with a Cython hot path."""

__version__ = "0.1.0"
