"""The pipeline's settings, read by attribute from the gateway's config object.

gw/config.py owns the keys and their defaults; anything absent there (an older
config object, a test's namespace) falls back to those defaults, so the
pipeline can be run from any object with the attributes it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from gw.config import Config, store_is_postgresql

_CONFIG = Config()      # the defaults below are gw/config.py's


@dataclass(frozen=True)
class Settings:
    data_dir: str = _CONFIG.data_dir
    store: str = _CONFIG.store                                    # sqlite, or a postgresql:// URL
    store_pg_partitions_ahead: int = _CONFIG.store_pg_partitions_ahead
    store_pg_connect_timeout: float = _CONFIG.store_pg_connect_timeout
    store_raw_retention: float = _CONFIG.store_raw_retention      # readings and samples
    store_1m_retention: float = _CONFIG.store_1m_retention
    store_1h_retention: float = _CONFIG.store_1h_retention        # 1d rollups are kept
    anomaly_window: int = _CONFIG.anomaly_window                  # samples per (device, metric)
    anomaly_threshold: float = _CONFIG.anomaly_threshold          # |z| above it raises an alert
    file_sink: str = _CONFIG.file_sink                            # directory, "" or "off": no file sink
    file_sink_rotate_bytes: int = _CONFIG.file_sink_rotate_bytes
    file_sink_rotate_seconds: float = _CONFIG.file_sink_rotate_seconds
    bridge: str = _CONFIG.bridge          # mqtt://host:port or mqtts://host:port, "" or "off": none
    bridge_topic: str = _CONFIG.bridge_topic
    bridge_cafile: str = _CONFIG.bridge_cafile
    bridge_client_id: str = _CONFIG.bridge_client_id
    wal_retention_age: float = _CONFIG.wal_retention_age
    wal_retention_bytes: int = _CONFIG.wal_retention_bytes
    max_sink_lag_bytes: int = _CONFIG.max_sink_lag_bytes          # per worker log; the workers hold ingest past it
    pipeline_batch: int = _CONFIG.pipeline_batch                  # records per sink batch (all worker logs together)
    pipeline_stop_timeout: float = _CONFIG.pipeline_stop_timeout  # s the master waits for a stop; the sinks get 2 s less
    # Not in gw/config.py (internal knobs; tests shorten them).
    pipeline_poll_interval: float = 0.025       # s between polls of the logs when caught up
    pipeline_retain_interval: float = 5.0       # s between WAL retention passes
    store_retention_interval: float = 60.0      # s between store retention passes
    bridge_window: int = 1000                   # QoS 1 messages in flight upstream

    @classmethod
    def from_cfg(cls, cfg) -> "Settings":
        # The Settings of a Config (both immutable) are kept for the next call with
        # it: the master makes them before forking (gw/master.py), so the pipeline
        # process's start takes them instead of running dataclasses' code again
        # in its own pages.
        if type(cfg) is Config and cls is Settings:
            if _made_for[0] is not cfg:
                _made_for[:] = [cfg, cls._from_cfg(cfg)]
            return _made_for[1]
        return cls._from_cfg(cfg)

    @classmethod
    def _from_cfg(cls, cfg) -> "Settings":
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
    def store_is_postgresql(self) -> bool:
        return store_is_postgresql(self.store)

    @property
    def file_sink_enabled(self) -> bool:
        return self.file_sink not in ("", "off")

    @property
    def bridge_enabled(self) -> bool:
        return self.bridge not in ("", "off")


_made_for: list = [None, None]     # the Config last made Settings for, and those
