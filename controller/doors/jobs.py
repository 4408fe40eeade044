"""The running controller's door job: project new events every second, check overdue keys every minute."""

from __future__ import annotations

import time

from sekisho.controller.doors.projector import DoorProjector
from sekisho.controller.doors.registers import DoorRegisters
from sekisho.controller.periodic import PeriodicJob


class DoorRegisterKeeper(PeriodicJob):
    """Keeps the door registers at most about a second behind the events table and raises overdue keys.

    Polling the events table (not a call from the ingest worker) is what lets any number of ingest
    processes feed it: the cursor lives in the database, and a projection failure never holds back
    an ingest acknowledgement.
    """

    name = "door registers"
    every_s = 1.0
    # Safe twice (the processes take turns on the locked cursor row), but each extra process only queues for
    # that lock and repeats the overdue sweep: one leader does it, another takes over when it dies.
    leader_only = True
    OVERDUE_EVERY_S = 60.0

    def __init__(
        self, projector: DoorProjector, registers: DoorRegisters, *, overdue_every_s: float = OVERDUE_EVERY_S
    ) -> None:
        """Project every second; check overdue keys every ``overdue_every_s`` seconds."""
        self.projector = projector
        self.registers = registers
        self.overdue_every_s = overdue_every_s
        self._overdue_checked_at: float | None = None
        super().__init__()

    def run_once(self) -> None:
        """Project what was stored since the last round; check overdue loans when a minute has passed."""
        self.projector.run()
        now = time.monotonic()
        if self._overdue_checked_at is None or now - self._overdue_checked_at >= self.overdue_every_s:
            # After the projection, so that a key whose return is already stored is not called overdue.
            self.registers.check_overdue()
            self._overdue_checked_at = now
