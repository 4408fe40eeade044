"""Whole-pipeline test helpers: a Site wraps a Lab (PKI, real broker, configs, processes) with checks."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from sqlalchemy import Engine, func, select

from sekisho.agents.runtime.errors import OutboxError
from sekisho.agents.runtime.outbox import Outbox
from sekisho.controller.config import load_config
from sekisho.controller.store import Store, make_engine
from sekisho.controller.store.models import Event
from sekisho.lab import Lab


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll until predicate() is true; fail the test naming what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Site:
    """A Lab plus the checks the pipeline tests make on it."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._engines: list[Engine] = []

    def close(self) -> None:
        """Dispose of the engines behind the stores this site opened (their pooled connections close)."""
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()

    @property
    def url(self) -> str:
        """The controller's database URL."""
        return load_config(self.lab.controller_config).resolved_database_url()

    def store(self) -> Store:
        """Open the controller's store (the test's own connection, closed by close())."""
        engine = make_engine(self.url)
        self._engines.append(engine)
        return Store(engine)

    def synthetic_seqs(self, agent: str) -> list[int]:
        """Return the sorted stored seqs of an agent's test.synthetic events (duplicates kept)."""
        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(Event.payload).where(Event.agent_id == agent, Event.type == "test.synthetic")
                ).scalars()
                return sorted(int(p["n"]) for p in rows)
        finally:
            engine.dispose()

    def count_events(self) -> int:
        """Return how many events are stored."""
        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(Event)).scalar_one())
        finally:
            engine.dispose()

    def outbox_depth(self, agent: str) -> int:
        """Return an agent's outbox depth (0 if it has none yet, or is still creating it)."""
        path = self.lab.root / "agents" / agent / "state" / "outbox.sqlite3"
        try:
            return Outbox.inspect(path).depth
        except OutboxError:
            # The file appears before its tables: an agent starting up has an outbox that is not readable
            # yet. Callers poll with a deadline, so a really damaged outbox still fails them.
            return 0

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until `controller serve` answers /readyz with ok."""

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.lab.http_port}/readyz", timeout=2) as r:
                    return bool(json.loads(r.read())["status"] == "ok")
            except (urllib.error.URLError, OSError, ValueError):
                return False

        wait_for(ready, timeout, "the controller to be ready")
