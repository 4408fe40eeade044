"""The JSON-line reports a firmware stub writes on stdout, as its in-process helper collects and awaits them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

Report = dict[str, Any]


def follow_reports(stream: Iterable[str | bytes] | None, reports: list[Report], changed: threading.Condition) -> None:
    """Append every JSON line of ``stream`` to ``reports`` and wake waiters (thread target; ends at EOF)."""
    if stream is not None:
        for text in stream:
            try:
                report = json.loads(text)
            except ValueError:
                continue  # not a report (a stray print): the stub's protocol is JSON lines only
            with changed:
                reports.append(report)
                changed.notify_all()
    with changed:
        changed.notify_all()  # waiters learn the stream ended (the stub stopped)


def wait_for_report(
    changed: threading.Condition,
    view: Callable[[], list[Report]],
    predicate: Callable[[Report], bool],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], bool],
) -> None:
    """Wait until a report in ``view()`` satisfies ``predicate``; TimeoutError if it does not or the stub died."""
    deadline = time.monotonic() + timeout
    with changed:
        while not any(predicate(report) for report in view()):
            left = deadline - time.monotonic()
            if left <= 0 or not alive():
                raise TimeoutError(f"timed out waiting for {what}")
            changed.wait(left)
