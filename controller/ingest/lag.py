"""Ingest lag: from the moment an agent recorded an event to the moment this controller stored it.

The lag includes the time an event waited in the agent's outbox (broker down, agent offline), so a spike
after an outage is expected; a steady high lag means ingest cannot keep up. The agent's clock is trusted
here only as far as its skew allows (negative lags, from a fast agent clock, count as zero).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# Seconds: sub-second is normal; minutes to an hour is an outbox draining after an outage.
LAG_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


@dataclass
class LagHistogram:
    """Cumulative-ready bucket counts and the sum of observed lags (thread-safe)."""

    buckets: tuple[float, ...] = LAG_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS) + 1))
    total: float = 0.0
    observed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, seconds: float) -> None:
        """Count one lag."""
        value = max(0.0, seconds)
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.total += value
            self.observed += 1

    def snapshot(self) -> tuple[list[tuple[str, int]], float, int]:
        """Return cumulative (upper bound, count) pairs ending in +Inf, the sum and the count."""
        with self._lock:
            running = 0
            out: list[tuple[str, int]] = []
            for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
                running += count
                out.append((bound, running))
            return out, self.total, self.observed
