"""Observer lists for card and reader diffs; a failing observer is logged and does not starve the others."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

_LOG = logging.getLogger(__name__)

EventT = TypeVar("EventT")


class ObserverList(Generic[EventT]):
    """Callbacks subscribed to one kind of diff."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._callbacks: list[Callable[[EventT], None]] = []
        # Re-entrant: an observer may subscribe or unsubscribe from inside its own callback.
        self.lock = threading.RLock()

    def add(self, callback: Callable[[EventT], None]) -> Callable[[], None]:
        """Register a callback; return a function that removes it."""
        with self.lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self.lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def deliver(self, event: EventT) -> None:
        """Call every callback with the event, logging (not raising) a callback's failure."""
        with self.lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            self.deliver_to(callback, event)

    def deliver_to(self, callback: Callable[[EventT], None], event: EventT) -> None:
        """Call one callback with the event, logging (not raising) its failure."""
        try:
            callback(event)
        except Exception:
            _LOG.exception("%s observer failed", self._kind)

    def deliver_queued(self, events: queue.SimpleQueue[EventT | None], timeout: float) -> None:
        """Wait up to ``timeout`` for a queued event, then deliver it and all queued behind it (None only wakes)."""
        try:
            item = events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return
        while True:
            if item is not None:
                self.deliver(item)
            try:
                item = events.get_nowait()
            except queue.Empty:
                return
