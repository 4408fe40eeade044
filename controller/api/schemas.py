"""Response models of the read API (XPublic naming as in the house style)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sekisho.common.i18n import M_
from sekisho.protocol import mynumber


def _no_my_number(value: str) -> str:
    if mynumber.contains_my_number(value):
        # The field name is in the error's "loc"; the value is never repeated (see controller/api/privacy.py).
        raise ValueError(M_("looks like a My Number (12 digits with a valid check digit); refused, value not shown"))
    return value


# Every free-text or id field a request may store: refused with 422 if it looks like a My Number.
# (MediaService checks the same fields again, for the CLI and any other caller.)
AdminText = Annotated[str, AfterValidator(_no_my_number)]


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


class MediaLoanBase(BaseModel):
    """What a loan says: which medium, to whom, on which terminals, for which window and purpose."""

    medium: str = Field(max_length=64)
    person: str = Field(max_length=64)
    terminals: list[str] = Field(min_length=1, max_length=50)
    ends_at: datetime
    purpose: str = Field(min_length=1, max_length=100)
    read_only: bool = True
    approved_by: str = Field(max_length=64)


class MediaLoanCreate(MediaLoanBase):
    """A lend request; starts_at defaults to now, times need an offset (e.g. +09:00)."""

    model_config = ConfigDict(extra="forbid")

    # The base's text fields again, as AdminText: a request is checked, a stored loan is only served.
    medium: AdminText = Field(max_length=64)
    person: AdminText = Field(max_length=64)
    terminals: list[AdminText] = Field(min_length=1, max_length=50)
    purpose: AdminText = Field(min_length=1, max_length=100)
    approved_by: AdminText = Field(max_length=64)
    starts_at: datetime | None = None
    recorded_by: AdminText = Field(default="api", min_length=1, max_length=128, description="who records the loan")


class MediaLoanPublic(MediaLoanBase):
    """A loan of the register with its state (times in UTC)."""

    id: str
    starts_at: datetime
    state: str
    overdue: bool
    created_by: str
    created_at: datetime
    lent_version: int
    returned_at: datetime | None
    received_by: str | None
    revoked_at: datetime | None
    revoke_reason: str | None
    ended_version: int | None


class MediaLoanReturn(BaseModel):
    """Who received a medium back, and when (default: now)."""

    model_config = ConfigDict(extra="forbid")

    received_by: AdminText = Field(min_length=1, max_length=128)
    returned_at: datetime | None = None


class MediaLoanRevoke(BaseModel):
    """Why a loan ends early, and who ends it."""

    model_config = ConfigDict(extra="forbid")

    reason: AdminText = Field(min_length=1, max_length=500)
    revoked_by: AdminText = Field(default="api", min_length=1, max_length=128)


class MediaLoanChange(BaseModel):
    """The result of a loan action: the loan and the policy version that carries it to the terminals."""

    loan: MediaLoanPublic
    version: int


class MediumPublic(BaseModel):
    """One line of the media inventory (棚卸し)."""

    id: str
    name: str
    kind: str
    department: str
    status: str
    state: str
    overdue: bool
    loan: MediaLoanPublic | None
    last_seen_at: datetime | None
    last_seen_agent: str | None
    last_seen_type: str | None
