"""The controller's periodic overdue check: an unreturned loan past its end becomes a finding, once."""

from __future__ import annotations

import logging
import threading

from controller.media.service import MediaService

log = logging.getLogger(__name__)


class OverdueWatch:
    """Runs MediaService.check_overdue every minute in a background thread."""

    CHECK_EVERY_S = 60.0

    def __init__(self, media: MediaService, *, every_s: float = CHECK_EVERY_S) -> None:
        self.media = media
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="media-overdue", daemon=True)
        self._failing = False

    def start(self) -> None:
        """Start the periodic check."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the periodic check."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.media.check_overdue()
                if self._failing:
                    log.info("media overdue check works again")
                    self._failing = False
            except Exception:  # a database hiccup must not end the watch; log it once, not every minute
                if not self._failing:
                    log.exception("media overdue check failed; will retry")
                self._failing = True
            self._stop.wait(self.every_s)
