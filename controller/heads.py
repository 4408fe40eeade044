"""The heads file: the newest signed checkpoint appended to a file outside the database, now and then.

Certificate Transparency's answer to a log that could rewrite itself is signed tree heads that others keep.
Here the controller keeps them itself, outside the database: every ``heads_every_s`` the newest signed
checkpoint (number, hash, signature, time) is appended as one JSON line to ``heads_file`` (opened with
O_APPEND, fsynced), if it moved since the last line. ``sekisho records verify --heads FILE`` then holds
each line against the log: a database restored to an earlier state, or a log deleted and begun again, no
longer has a checkpoint a line names (controller/store/receipts.py ``check_heads``).

Put the file where the database's writers cannot rewrite it: another disk, a host that only appends
(remote syslog, a WORM share), or copy it off regularly. Several workers may append to one file; a line
written twice is harmless.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sekisho.controller.periodic import PeriodicJob
from sekisho.controller.store.receipts import heads_line, last_heads_number
from sekisho.controller.store.store import Store

log = logging.getLogger(__name__)


def append_line(path: Path, line: bytes) -> None:
    """Append one line to the heads file and flush it to disk (create it 0640 if missing)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o640)
    try:
        # One write(2) of a short line under O_APPEND: concurrent writers never interleave within it.
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


class HeadsExport(PeriodicJob):
    """Appends the newest signed checkpoint to the heads file when it has moved."""

    name = "heads export"

    def __init__(self, store: Store, path: Path, every_s: float) -> None:
        super().__init__()
        self.store = store
        self.path = path
        self.every_s = every_s
        self._last: int | None = last_heads_number(path)

    def run_once(self) -> None:
        """Append a line for the newest checkpoint if it differs from the last line written."""
        newest = self.store.newest_checkpoint()
        if newest is None:
            return
        number, digest, signature, created_at = newest
        if number == self._last:
            return
        if self._last is not None and number < self._last:
            # The log is shorter than a head already exported: cut back or begun again. Written anyway, so
            # the file shows the drop; `records verify --heads` names the checkpoints that are gone.
            log.error(
                "the checkpoint log's newest entry is #%d, but #%d was exported before: the database was cut back",
                number,
                self._last,
            )
        append_line(self.path, heads_line(number, digest, signature, created_at))
        self._last = number
