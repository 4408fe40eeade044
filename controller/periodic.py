"""A background job that runs every N seconds and outlives its own failures."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class PeriodicJob:
    """Runs `run_once` now and then every `every_s` seconds until stopped.

    A failure is logged once and its recovery once (not every round): a database or broker hiccup
    must neither end the job nor flood the log.
    """

    name = "periodic job"
    every_s = 60.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._failing = False

    def poke(self) -> None:
        """Run the next round now instead of at the end of the wait (something it should look at happened)."""
        self._wake.set()

    def run_once(self) -> None:
        """Do one round of the job."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the periodic thread."""
        self._thread.start()

    @property
    def running(self) -> bool:
        """Tell whether the job's thread is alive (the service watchdog asks)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop the thread after its current round."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                if self._failing:
                    log.info("%s works again", self.name)
                    self._failing = False
            except Exception:  # keep going: the next round may succeed
                if not self._failing:
                    log.exception("%s failed; will retry every %.0f s", self.name, self.every_s)
                self._failing = True
            self._wake.wait(self.every_s)
            self._wake.clear()
