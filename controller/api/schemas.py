"""Response models of the read API (XPublic naming as in the house style)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class EventPublic(BaseModel):
    """A stored event as served by the API."""

    id: int
    agent_id: str
    seq: int
    event_id: str
    type: str
    occurred_at: datetime
    received_at: datetime
    clock_synced: bool
    clock_offset_ms: int | None
    payload: dict[str, Any]
    chain_index: int
    hash: str


class EventPage(BaseModel):
    """One page of events with the cursor for the next page."""

    items: list[EventPublic]
    next_after_id: int | None


class DeadLetterPublic(BaseModel):
    """A refused message and why (payload already redacted by the store)."""

    id: int
    received_at: datetime
    topic: str
    agent_id: str | None
    seq: int | None
    reason: str
    detail: str
    size: int


class FindingPublic(BaseModel):
    """Something the alert work should look at, e.g. a sequence gap."""

    id: int
    kind: str
    agent_id: str
    first_seq: int | None
    last_seq: int | None
    created_at: datetime
    resolved_at: datetime | None
    resolution: str | None


class AgentPublic(BaseModel):
    """A registered agent and its last reported health."""

    id: str
    status: str
    registered_at: datetime
    last_seen_at: datetime | None
    version: str | None
    outbox_depth: int | None
    clock_offset_ms: int | None
    policy_version: int | None


class Health(BaseModel):
    """Liveness or readiness answer."""

    status: str
    checks: dict[str, Any] = {}
