"""Reconnect delays: exponential back-off with full jitter, bounded.

paho's own reconnect delay doubles from min to max with no randomness: after a broker restart every agent
of a site waits exactly the same time and they all come back in the same instant, again and again. Each
delay here is drawn uniformly from [0, ceiling], the ceiling doubling per failed attempt up to max_s
("full jitter"), so a thousand agents spread over the whole window and a broker that is still overloaded
sees the load thin out rather than arrive in waves.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

# 2**40 times any sane minimum is far past any maximum: stop counting there (no float overflow).
_MAX_EXPONENT = 40


class ReconnectBackoff:
    """The delays before successive reconnect attempts; reset() after a connection is accepted."""

    def __init__(self, min_s: float, max_s: float, *, rng: Callable[[], float] = random.random) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError("need 0 < min_s <= max_s")
        self.min_s = min_s
        self.max_s = max_s
        self._rng = rng
        self._attempt = 0
        self._lock = threading.Lock()

    def ceiling(self) -> float:
        """Return the longest delay the next attempt may draw."""
        with self._lock:
            return float(min(self.max_s, self.min_s * 2**self._attempt))

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count the attempt."""
        with self._lock:
            ceiling = float(min(self.max_s, self.min_s * 2**self._attempt))
            self._attempt = min(self._attempt + 1, _MAX_EXPONENT)
        # Clamped: an rng of the wrong range must not make a delay negative or beyond the bound.
        return ceiling * min(max(float(self._rng()), 0.0), 1.0)

    def reset(self) -> None:
        """Start again from the minimum (the broker accepted us)."""
        with self._lock:
            self._attempt = 0
