"""What every sink provides to its runner (gw/pipeline/runner.py).

A sink reads the worker logs from its own checkpoint per worker log. The runner
owns the read position (`pos`), gathers a bounded batch from the logs up to
their durable offsets, and hands it to `write`; a sink moves `checkpoints`
forward once the batch is where it belongs (store: committed; file: fsynced;
bridge: PUBACK received, possibly later, from `poll`). When `write` or `poll`
raises, the runner calls `rewind` (uncommitted work is forgotten), moves its
read position back to the checkpoints and retries after a backoff.
"""

from __future__ import annotations

Part = tuple[int, list, int]        # (worker slot, [(offset, payload)], next offset to read)


class Sink:
    name = "sink"
    catchup = 1        # when behind, batches grow up to catchup * pipeline_batch records

    def __init__(self, nworkers: int):
        self.nworkers = nworkers
        self.checkpoints: dict[int, int] = {w: 0 for w in range(nworkers)}
        self.written = 0                  # records delivered (committed / fsynced / acknowledged)

    def open(self) -> None:
        """Loads the checkpoints; raises PipelineError if the sink cannot start."""

    def budget(self, limit: int) -> int:
        """Records the runner may hand over now (at most limit)."""
        return limit

    def poll(self, now: float) -> None:
        """Called every loop turn (idle or not): timers, acknowledgements. May raise."""

    def write(self, parts: list[Part]) -> None:
        raise NotImplementedError

    def idle(self, now: float) -> None:
        """Called when the sink has had nothing to write for IDLE_AFTER seconds
        (once per idle spell). May raise."""

    def rewind(self) -> None:
        """After a failure: drop whatever was not committed."""

    def close(self) -> None:
        """On stop, after the batch in hand: commit what can be, release resources."""

    def extra_stats(self) -> dict:
        return {}
