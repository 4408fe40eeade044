"""The controller's record store: one object over the database, made of the record families in this package.

``Store`` owns the engine and its retried transactions (``records``) and offers every family's methods:
agents and their key history (``agents``), enrolment tokens, devices and certificates (``enrolment``),
events with their chains, gaps and dead letters
(``events``), findings (``findings``), policy versions and issued commands (``policy``), the admin audit trail
(``audit``), the signed checkpoint log they append to (``checkpoints``), `records verify` (``verification``) and
the heads held outside the database, agents' receipts and the heads file (``receipts``). The
media-loan register builds on it in ``controller/media/register.py``.

A controller opens it with its signing key (``Store(engine, signing_key=…)``, see ``service.open_store``):
the checkpoint log and the key lines are signed with it. A store opened without one writes them unsigned
(tests, tools); `records verify` with the controller's key reports every such entry.

Every method runs in its own transaction and keeps no state between calls, so any number of
controller workers (threads or processes) may share one database. Writers of the same agent's
stream are serialised by a row lock on its ``streams`` row (PostgreSQL) or by SQLite's single
writer lock, taken at BEGIN IMMEDIATE.
"""

from __future__ import annotations

from sekisho.controller.store.agents import AgentRecords
from sekisho.controller.store.audit import AuditRecords
from sekisho.controller.store.enrolment import EnrolmentRecords
from sekisho.controller.store.events import EventRecords
from sekisho.controller.store.findings import FindingRecords
from sekisho.controller.store.policy import PolicyRecords
from sekisho.controller.store.receipts import ReceiptRecords
from sekisho.controller.store.record_log import RecordLogRecords
from sekisho.controller.store.verification import VerificationRecords


class Store(
    AgentRecords,
    AuditRecords,
    EnrolmentRecords,
    EventRecords,
    FindingRecords,
    PolicyRecords,
    ReceiptRecords,
    RecordLogRecords,
    VerificationRecords,
):
    """The controller's persistent records, on an engine made by ``db.make_engine``."""
