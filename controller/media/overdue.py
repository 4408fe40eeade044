"""The controller's periodic overdue check: an unreturned loan past its end becomes a finding, once."""

from __future__ import annotations

from sekisho.controller.media.service import MediaService
from sekisho.controller.periodic import PeriodicJob


class OverdueWatch(PeriodicJob):
    """Runs MediaService.check_overdue every minute in a background thread."""

    name = "media overdue check"
    # One process raises the overdue findings (two at once could both raise the same loan's).
    leader_only = True
    CHECK_EVERY_S = 60.0

    def __init__(self, media: MediaService, *, every_s: float = CHECK_EVERY_S) -> None:
        self.media = media
        self.every_s = every_s
        super().__init__()

    def run_once(self) -> None:
        """Raise findings for overdue loans that have none yet."""
        self.media.check_overdue()
