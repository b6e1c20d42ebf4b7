"""Exponential backoff with jitter for retrying a failing reconcile pass (pure but for the RNG).

A pod the API server rejects, a Service someone else owns or an API outage must neither be retried
once a second forever (the old fixed 1 s) nor make every deployment retry in lock-step after an
outage: the delay doubles per consecutive failure up to `cap`, and "equal jitter" spreads it over
[d/2, d].
"""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass
class Backoff:
    base: float = 1.0
    cap: float = 300.0
    failures: int = 0
    rng: random.Random = dataclasses.field(default_factory=random.Random)

    def ceiling(self) -> float:
        """The un-jittered delay after the current number of failures."""
        if self.failures <= 0:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(self.failures - 1, 62))

    def fail(self) -> float:
        """Record one more failure; the seconds to wait before the next attempt."""
        self.failures += 1
        top = self.ceiling()
        return top / 2 + self.rng.uniform(0.0, top / 2)

    def succeed(self) -> None:
        self.failures = 0
