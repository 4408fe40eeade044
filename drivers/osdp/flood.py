"""A reader's card reads held to a rate: a token bucket with one waiting place, and the flood it reports.

A reader that sends card reads faster than people can tap (a fault, a stuck card, an attack on the line)
must not starve the other readers of the door box, nor the door decisions behind it. Each read takes a token;
tokens come back at ``rate`` per second up to ``burst``. A read that finds no token waits in the reader's one
waiting place until the next token; a newer read takes that place and the older one is dropped. So the
newest read always gets through within ``1 / rate`` seconds, a valid card tapped after a flood is decided
even if the bucket is empty, and nothing queues behind a flooding reader beyond one read.

The limit is applied before anything looks at the card: a valid card that arrives during a flood may be
dropped (the reader's owner taps again after the flood, or once the alarm has been dealt with).

A flood begins with the first dropped read and ends once ``calm_s`` has passed with none dropped (and
nothing waiting); each is reported once. Pure logic: time is passed in; one caller at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

ItemT = TypeVar("ItemT")

DEFAULT_READS_PER_S = 4.0
DEFAULT_READ_BURST = 8
DEFAULT_CALM_S = 2.0


@dataclass(frozen=True, slots=True)
class FloodChange:
    """A reader's flood began (``flooding``) or ended; ``dropped`` counts the reads it lost so far."""

    flooding: bool
    dropped: int


def validate_limit(rate: float, burst: int, calm_s: float) -> None:
    """Raise ValueError unless the limit can let a person's taps through."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.2 <= rate <= 1000:
        raise ValueError("card reads per second must be between 0.2 and 1000")
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= 1000:
        raise ValueError("the card read burst must be an integer between 1 and 1000")
    if isinstance(calm_s, bool) or not isinstance(calm_s, int | float) or not 0 < calm_s <= 600:
        raise ValueError("calm_s must be in (0, 600] seconds")


class ReadLimiter(Generic[ItemT]):
    """One reader's token bucket, its waiting read and its flood state."""

    def __init__(
        self, rate: float = DEFAULT_READS_PER_S, burst: int = DEFAULT_READ_BURST, calm_s: float = DEFAULT_CALM_S
    ) -> None:
        validate_limit(rate, burst, calm_s)
        self.rate = float(rate)
        self.burst = burst
        self.calm_s = float(calm_s)
        self._tokens = float(burst)
        self._updated: float | None = None
        self._waiting: list[ItemT] = []  # the read waiting for a token: none or one
        self.flooding = False
        self.dropped = 0  # in the current (or last) flood
        self._last_drop: float | None = None

    def offer(self, now: float, item: ItemT) -> tuple[list[ItemT], FloodChange | None]:
        """Take a read: return the reads to pass on now (this one, or none) and a flood change, if any."""
        out, change = self.poll(now)
        if self._tokens >= 1.0 and not self._waiting:
            self._tokens -= 1.0
            out.append(item)
            return out, change
        if self._waiting:
            # The newest read wins the waiting place; the older one is dropped.
            self.dropped += 1
            self._last_drop = now
            if not self.flooding:
                self.flooding = True
                change = FloodChange(True, self.dropped)
        self._waiting = [item]
        return out, change

    def poll(self, now: float) -> tuple[list[ItemT], FloodChange | None]:
        """Pass on the waiting read once a token is back; end a flood that has calmed down."""
        self._refill(now)
        out: list[ItemT] = []
        if self._waiting and self._tokens >= 1.0:
            self._tokens -= 1.0
            out.append(self._waiting.pop())
        change = None
        if self.flooding and not self._waiting and self._last_drop is not None and now - self._last_drop >= self.calm_s:
            self.flooding = False
            change = FloodChange(False, self.dropped)
            self.dropped = 0
        return out, change

    def next_due(self) -> float | None:
        """Return the monotonic time at which ``poll`` has something to do, or None."""
        due: list[float] = []
        if self._waiting and self._updated is not None:
            due.append(self._updated + max(0.0, 1.0 - self._tokens) / self.rate)
        if self.flooding and self._last_drop is not None:
            due.append(self._last_drop + self.calm_s)
        return min(due) if due else None

    def _refill(self, now: float) -> None:
        if self._updated is not None and now > self._updated:
            self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate)
        if self._updated is None or now > self._updated:
            self._updated = now
