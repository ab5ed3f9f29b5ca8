"""Connections open per client IP address across every worker (max_connections_per_ip)."""

MIN_SLOTS: int
MAX_SLOTS: int
SLOTS_PER_CONNECTION: int

def slots_for(max_connections: int) -> int: ...

class AddressCounts:
    nslots: int
    nworkers: int
    def __init__(self, nworkers: int, max_connections: int, seed: int | None = ...) -> None: ...
    def release_worker(self, worker: int) -> int: ...
    def count(self, host: str) -> int: ...
