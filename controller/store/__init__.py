"""The controller's storage layer: SQLAlchemy models, Alembic migrations and the record store."""

from sekisho.controller.store.agents import AgentExists, AgentNotFound
from sekisho.controller.store.chain import ChainProblem, record_hash
from sekisho.controller.store.db import default_url, make_engine, upgrade
from sekisho.controller.store.events import (
    DUPLICATE_ID,
    SEQ_CONFLICT,
    SEQUENCE_GAP,
    BatchResult,
    Conflict,
    DeadLetterIn,
    GapFinding,
)
from sekisho.controller.store.policy import PolicyVersionConflict
from sekisho.controller.store.store import Store
from sekisho.controller.store.verification import NOT_CHECKED, Verification

__all__ = [
    "DUPLICATE_ID",
    "NOT_CHECKED",
    "SEQUENCE_GAP",
    "SEQ_CONFLICT",
    "AgentExists",
    "AgentNotFound",
    "BatchResult",
    "ChainProblem",
    "Conflict",
    "DeadLetterIn",
    "GapFinding",
    "PolicyVersionConflict",
    "Store",
    "Verification",
    "default_url",
    "make_engine",
    "record_hash",
    "upgrade",
]
