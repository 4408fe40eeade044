"""A bell the alert engine rings when it changed alerts, so this process's live streams look at once.

The engine runs in a thread; each SSE stream is a coroutine on the server's event loop. A stream listens while
it waits between its looks at the alerts table, and a ring (from any thread) ends that wait. The bell carries
no data: the stream still reads what changed from the table (controller/alerts/listing.py ``ChangeFeed``), so a
ring that comes too early or twice costs one cheap read, and a missed one costs only the poll interval.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Bell:
    """Wakes the waiting listeners of this process; safe to ring from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def ring(self) -> None:
        """Wake every listener now."""
        with self._lock:
            listeners = list(self._listeners)
        for loop, rung in listeners:
            try:
                loop.call_soon_threadsafe(rung.set)
            except RuntimeError:  # its loop closed under it: nothing is waiting there any more
                continue

    @contextmanager
    def listening(self) -> Iterator[asyncio.Event]:
        """Listen from the running event loop: the event is set by each ring until the block ends."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._listeners.add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                self._listeners.discard(entry)

    @property
    def listeners(self) -> int:
        """Tell how many streams listen now."""
        with self._lock:
            return len(self._listeners)


async def wait_for(rung: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``rung`` is set (then clear it) or ``timeout_s`` has passed."""
    try:
        await asyncio.wait_for(rung.wait(), timeout_s)
    except TimeoutError:
        return
    rung.clear()
