"""The fleet at a glance: each agent's state (online / stale / offline / revoked) and its last reported health.

States come from the age of the last heartbeat against the interval the agent reports (agents too old to
report one are taken to use ``agent_heartbeat_interval_s``):

- online:  age ≤ interval + ``agent_online_grace_s``
- stale:   age ≤ ``agent_offline_after`` × interval + grace (a heartbeat or two missed)
- offline: older, or never seen
- revoked: the agent is revoked, whatever it still sends

The clock is a parameter, so tests (and ``sekisho fleet status --at``) judge at a chosen moment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from sekisho.protocol import errors, timefmt

if TYPE_CHECKING:
    from sekisho.controller.config import ControllerConfig
    from sekisho.controller.store.models import Agent
    from sekisho.controller.store.store import Store

AgentState = Literal["online", "stale", "offline", "revoked"]
STATES: tuple[AgentState, ...] = ("online", "stale", "offline", "revoked")
# A fingerprint summary names at most this many people without a finger (the JSON has all counts).
_MISSING_SHOWN = 20


@dataclass(frozen=True, slots=True)
class Thresholds:
    """How old a heartbeat may be for each state."""

    default_interval_s: float = 30
    grace_s: float = 15
    offline_after: float = 3.0

    @classmethod
    def from_config(cls, config: ControllerConfig) -> Thresholds:
        """Read the thresholds from the controller configuration."""
        return cls(config.agent_heartbeat_interval_s, config.agent_online_grace_s, config.agent_offline_after)

    def state(self, age_s: float | None, interval_s: float | None) -> AgentState:
        """Return the state for a heartbeat ``age_s`` seconds old (None: never seen)."""
        if age_s is None:
            return "offline"
        interval = interval_s if interval_s and interval_s > 0 else self.default_interval_s
        if age_s <= interval + self.grace_s:
            return "online"
        if age_s <= self.offline_after * interval + self.grace_s:
            return "stale"
        return "offline"


class LastErrorPublic(BaseModel):
    """An agent's most recent error as it reported it: a code and a time."""

    code: str
    at: datetime
    count: int = 1


class FingerprintSummary(BaseModel):
    """A terminal's fingerprint enrolment status: finger counts per person (no template ever leaves it)."""

    checked_at: datetime | None
    error: str | None
    people: int
    enrolled_people: int
    not_enrolled: list[str]
    counts: dict[str, int]
    truncated: bool = False


class AgentHealth(BaseModel):
    """One agent's state and health, as `sekisho fleet status` and /api/v1/agents show it."""

    id: str
    status: str
    state: AgentState
    kind: str | None
    registered_at: datetime
    last_seen_at: datetime | None
    last_seen_age_s: float | None
    heartbeat_interval_s: float
    version: str | None
    outbox_depth: int | None
    oldest_unacked_age_s: int | None
    clock_offset_ms: int | None
    policy_version: int | None
    current_policy_version: int | None
    policy_current: bool | None
    policy_state: str | None
    cert_not_after: datetime | None
    cert_days_left: float | None
    last_error: LastErrorPublic | None
    fingerprints: FingerprintSummary | None


def _time(value: Any) -> datetime | None:
    try:
        return timefmt.parse(value)
    except errors.Rejected:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _last_error(hb: dict[str, Any]) -> LastErrorPublic | None:
    raw = hb.get("last_error")
    if not isinstance(raw, dict) or not isinstance(raw.get("code"), str):
        return None
    at = _time(raw.get("at"))
    if at is None:
        return None
    return LastErrorPublic(code=raw["code"][:64], at=at, count=_int(raw.get("count")) or 1)


def _fingerprints(hb: dict[str, Any]) -> FingerprintSummary | None:
    raw = hb.get("fingerprints")
    if not isinstance(raw, dict):
        return None
    enrolled = raw.get("enrolled")
    counts = {str(k): v for k, v in enrolled.items() if _int(v) is not None} if isinstance(enrolled, dict) else {}
    missing = sorted(person for person, count in counts.items() if count == 0)
    return FingerprintSummary(
        checked_at=_time(raw.get("checked_at")),
        error=raw.get("error") if isinstance(raw.get("error"), str) else None,
        people=len(counts),
        enrolled_people=len(counts) - len(missing),
        not_enrolled=missing,
        counts=counts,
        truncated=raw.get("truncated") is True,
    )


def agent_health(row: Agent, thresholds: Thresholds, now: datetime, current_policy: int | None) -> AgentHealth:
    """Judge one agent's state at ``now`` and gather what its last heartbeat said."""
    hb: dict[str, Any] = row.last_heartbeat if isinstance(row.last_heartbeat, dict) else {}
    interval = _int(hb.get("interval_s")) or thresholds.default_interval_s
    age = max(0.0, (now - row.last_seen_at).total_seconds()) if row.last_seen_at is not None else None
    state: AgentState = "revoked" if row.status == "revoked" else thresholds.state(age, interval)
    not_after = _time(hb.get("cert_not_after"))
    kind = hb.get("kind")
    policy_state = hb.get("policy_state")
    return AgentHealth(
        id=row.id,
        status=row.status,
        state=state,
        kind=kind if isinstance(kind, str) else None,
        registered_at=row.registered_at,
        last_seen_at=row.last_seen_at,
        last_seen_age_s=round(age, 1) if age is not None else None,
        heartbeat_interval_s=interval,
        version=row.version,
        outbox_depth=row.outbox_depth,
        oldest_unacked_age_s=_int(hb.get("oldest_unacked_age_s")),
        clock_offset_ms=row.clock_offset_ms,
        policy_version=row.policy_version,
        current_policy_version=current_policy,
        policy_current=None if current_policy is None else row.policy_version == current_policy,
        policy_state=policy_state if isinstance(policy_state, str) else None,
        cert_not_after=not_after,
        cert_days_left=round((not_after - now).total_seconds() / 86400, 1) if not_after is not None else None,
        last_error=_last_error(hb),
        fingerprints=_fingerprints(hb),
    )


def fleet_health(store: Store, thresholds: Thresholds, now: datetime | None = None) -> list[AgentHealth]:
    """Return every registered agent's health at ``now`` (default: the current time), ordered by id."""
    moment = now or timefmt.now()
    current = store.current_policy_version()
    version = current.version if current is not None else None
    return [agent_health(row, thresholds, moment, version) for row in store.list_agents()]


def count_states(agents: list[AgentHealth]) -> dict[str, int]:
    """Return how many agents are in each state (every state present, zero included)."""
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    for agent in agents:
        counts[agent.state] += 1
    return counts


def fingerprint_text(summary: FingerprintSummary | None) -> str:
    """Render a fingerprint summary for the table: "3/4 enrolled (p-9 none)", or the sensor's error."""
    if summary is None:
        return "-"
    if summary.error:
        return f"error: {summary.error}"
    text = f"{summary.enrolled_people}/{summary.people}"
    if summary.not_enrolled:
        shown = ", ".join(summary.not_enrolled[:_MISSING_SHOWN])
        more = len(summary.not_enrolled) - _MISSING_SHOWN
        text += f" (none: {shown}{f' +{more}' if more > 0 else ''})"
    return text + (" …" if summary.truncated else "")
