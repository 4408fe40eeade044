"""The controller's record store: one object over the database, made of the record families in this package.

``Store`` owns the engine and its retried transactions (``records``) and offers every family's methods:
agents (``agents``), events with their chains, gaps and dead letters (``events``), findings
(``findings``), policy versions and issued commands (``policy``). The media-loan register builds on
it in ``controller/media/register.py``.

Every method runs in its own transaction and keeps no state between calls, so any number of
controller workers (threads or processes) may share one database. Writers of the same agent's
stream are serialised by a row lock on its ``streams`` row (PostgreSQL) or by SQLite's single
writer lock, taken at BEGIN IMMEDIATE.
"""

from __future__ import annotations

from sekisho.controller.store.agents import AgentRecords
from sekisho.controller.store.events import EventRecords
from sekisho.controller.store.findings import FindingRecords
from sekisho.controller.store.policy import PolicyRecords


class Store(AgentRecords, EventRecords, FindingRecords, PolicyRecords):
    """The controller's persistent records, on an engine made by ``db.make_engine``."""
