"""Debouncing of contact inputs (door sensors, key-slot switches): a level counts once it has held."""

from __future__ import annotations

DEFAULT_DEBOUNCE_S = 0.05


class Debouncer:
    """One input: the raw level as last reported, and the stable level once it held for ``debounce_s``.

    Time is the caller's monotonic clock; nothing happens by itself. ``due()`` says when the raw level
    will have held long enough, and the owner calls ``commit()`` at (or after) that moment, so a level
    that bounced back before then never becomes stable and never produces an event.
    """

    def __init__(self, debounce_s: float = DEFAULT_DEBOUNCE_S) -> None:
        if debounce_s < 0:
            raise ValueError("debounce_s must not be negative")
        self.debounce_s = debounce_s
        self.stable: bool | None = None  # None: no level has held yet since start
        self.raw: bool | None = None
        self.raw_since = 0.0

    def feed(self, now: float, level: bool) -> bool:
        """Record a reported level; return True if it differs from the previous raw level (a raw edge)."""
        if level == self.raw:
            return False
        self.raw = level
        self.raw_since = now
        return True

    def due(self) -> float | None:
        """Return when the raw level becomes stable, or None if nothing is pending."""
        if self.raw is None or self.raw == self.stable:
            return None
        return self.raw_since + self.debounce_s

    def commit(self) -> tuple[bool | None, bool]:
        """Make the raw level the stable one; return (previous stable level, new stable level)."""
        if self.raw is None:
            raise RuntimeError("nothing to commit")
        previous, self.stable = self.stable, self.raw
        return previous, self.raw

    @property
    def pending(self) -> bool:
        """Tell whether a raw level differs from the stable one."""
        return self.raw is not None and self.raw != self.stable
