"""The pipeline's settings, read by attribute from the gateway's config object.

gw/config.py owns the keys; anything absent there (an older config object, a
test's namespace) falls back to the defaults below, so the pipeline can be run
from any object with the attributes it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

DAY = 86400.0


@dataclass(frozen=True)
class Settings:
    data_dir: str = "data"
    store_raw_retention: float = 7 * DAY        # readings and samples
    store_1m_retention: float = 30 * DAY
    store_1h_retention: float = 365 * DAY       # 1d rollups are kept
    anomaly_window: int = 60                    # samples per (device, metric)
    anomaly_threshold: float = 4.0              # |z| above it raises an alert
    file_sink: str = ""                         # directory, "" or "off": no file sink
    file_sink_rotate_bytes: int = 64 << 20
    file_sink_rotate_seconds: float = 3600.0
    bridge: str = ""                            # mqtt://host:port or mqtts://host:port, "" or "off": none
    bridge_topic: str = "telemetry"
    bridge_cafile: str = ""
    bridge_client_id: str = "gw-bridge"
    wal_retention_age: float = 7 * DAY
    wal_retention_bytes: int = 10 << 30
    pipeline_batch: int = 2000                  # records per sink batch (all worker logs together)
    pipeline_stop_timeout: float = 15.0         # s the master waits for a stop; the sinks get 2 s less
    # Not in gw/config.py (internal knobs; tests shorten them).
    pipeline_poll_interval: float = 0.025       # s between polls of the logs when caught up
    pipeline_retain_interval: float = 5.0       # s between WAL retention passes
    store_retention_interval: float = 60.0      # s between store retention passes
    bridge_window: int = 1000                   # QoS 1 messages in flight upstream

    @classmethod
    def from_cfg(cls, cfg) -> "Settings":
        values = {}
        for f in fields(cls):
            value = getattr(cfg, f.name, None)
            if value is None:
                continue
            if f.type in ("float",):
                value = float(value)
            elif f.type in ("int",):
                value = int(value)
            else:
                value = str(value)
            values[f.name] = value
        return cls(**values)

    @property
    def file_sink_enabled(self) -> bool:
        return self.file_sink not in ("", "off")

    @property
    def bridge_enabled(self) -> bool:
        return self.bridge not in ("", "off")
