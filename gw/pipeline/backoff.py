"""Exponential backoff with full jitter (base 0.1 s, cap 30 s)."""

from __future__ import annotations

import random


class Backoff:
    """delay() -> uniform(0, min(cap, base * 2**n)) for the n-th consecutive failure."""

    def __init__(self, base: float = 0.1, cap: float = 30.0, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.failures, 32)))
        self.failures += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.failures = 0
