"""A background job that runs every N seconds and outlives its own failures."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from sekisho.controller.leader import Elector

log = logging.getLogger(__name__)


class PeriodicJob:
    """Runs `run_once` now and then every `every_s` seconds until stopped.

    A failure is logged once and its recovery once (not every round): a database or broker hiccup
    must neither end the job nor flood the log.

    A job that must run in one process only (of several controllers on one database) is given an elector
    (`lead_by`): its rounds then run only while this process leads the job's lock, and a process that does
    not lead looks again every `check_s` so that it takes over quickly (controller/leader.py).
    """

    name = "periodic job"
    every_s = 60.0
    # True for a job that must run in one process at a time when several controllers share a database: the
    # controller then gives it its elector (lead_by). Each job says why it is or is not.
    leader_only: ClassVar[bool] = False

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._failing = False
        self._elector: Elector | None = None
        self._leading = False

    def lead_by(self, elector: Elector) -> None:
        """Run this job only while this process leads its lock (named after the job); call before start."""
        self._elector = elector
        elector.want(self.name)

    def leads(self) -> bool:
        """Tell whether this process may do this job's work now (always, for a job that is not single)."""
        return self._elector is None or self._elector.leads(self.name)

    def leadership_changed(self, leading: bool) -> None:
        """Hear that this process became (or stopped being) the job's leader; a job with memory resets it here."""

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

    def _follow_leadership(self) -> bool:
        """Note a change of leadership (logged, told to the job); return whether this round may run."""
        leading = self.leads()
        if leading != self._leading:
            self._leading = leading
            worker = self._elector.identity.worker_id if self._elector is not None else "?"
            if leading:
                log.info("%s: %s is now the leader", self.name, worker)
            else:
                log.info("%s: %s is no longer the leader", self.name, worker)
            self.leadership_changed(leading)
        return leading

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._elector is not None and not self._follow_leadership():
                # Not the leader: look again soon, so that a dead leader's job resumes within about check_s.
                self._wake.wait(min(self.every_s, self._elector.check_s))
                self._wake.clear()
                continue
            try:
                self.run_once()
                if self._failing:
                    log.info("%s works again", self.name)
                    self._failing = False
            except Exception:  # keep going: the next round may succeed
                if not self._failing:
                    log.exception("%s failed; will retry every %g s", self.name, self.every_s)
                self._failing = True
            self._wake.wait(self.every_s)
            self._wake.clear()
