"""What happens to telemetry after the write-ahead log: the pipeline process and its sinks.

The pipeline process (`pipeline_main`, forked by the master) reads every
worker's log `data_dir/wal/{slot}/` up to the durable offset the worker
publishes in the stats block, and feeds the sinks, each from its own
checkpoint per worker log, in its own thread:

- `store` (always): SQLite `data_dir/store.sqlite`, exactly once (rows,
  rollups, devices, alerts and checkpoints in one transaction); rolling
  z-score alerts, published on `alerts/{device_id}` after commit;
- `file` (`file_sink = DIR`): rotated NDJSON files, at least once;
- `bridge` (`bridge = mqtt[s]://host:port`): QoS 1 to an upstream broker, at
  least once.

See gw/pipeline/store.py, anomaly.py, filesink.py, bridge.py, runner.py.
"""

from .core import Pipeline, pipeline_main, stats
from .errors import PipelineError
from .settings import Settings

__all__ = ["Pipeline", "PipelineError", "Settings", "pipeline_main", "stats"]
