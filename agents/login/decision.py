"""The terminal login decision: a pure function of the cached policy, the user, the card and the finger.

Checks run in the order that gives the person the most useful reason while leaking the least:
policy first (nothing else matters without one), then the account and the hours (no card or finger can
fix those), then the card (identify, prove, belong, active), then the finger. ``refuse_early`` runs the
first stages alone so the PAM helper reads the card and asks for a finger only when they can still matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from sekisho.agents.runtime.schedules import JST, person_current, schedule_allows
from sekisho.protocol.policy import Card, Person, SitePolicy

__all__ = ["JST", "CardCheck", "FingerCheck", "LoginDecision", "decide_login", "refuse_early", "schedule_allows"]

PolicyState = Literal["none", "valid", "expired"]
LoginReason = Literal[
    "granted",
    "no_policy",
    "policy_expired",
    "unknown_user",
    "not_designated",
    "outside_hours",
    "no_card",
    "card_timeout",
    "unknown_card",
    "card_bound_to_other",
    "card_inactive",
    "card_auth_failed",
    "uid_only_not_allowed",
    "fingerprint_mismatch",
    "fingerprint_timeout",
    "fingerprint_unavailable",
    "fingerprint_not_enrolled",
    "internal_error",
]
FingerOutcome = Literal["match", "no_match", "timeout", "retry_exhausted", "unavailable", "not_enrolled"]
Method = Literal["card", "fingerprint"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CardCheck:
    """What the smart-card driver found: presence, which enrolled card (if any), and whether it proved itself."""

    present: bool
    reader: str | None = None
    card_id: str | None = None
    uid_hash: str | None = None
    uid_masked: str | None = None
    authenticated: bool = False
    weak: bool = False
    # The card (or its reader) stopped answering before the check was over: nothing it said counts.
    timed_out: bool = False
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class FingerCheck:
    """What the fingerprint driver reported for the user: the outcome and how many scans it took."""

    outcome: FingerOutcome
    attempts: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginDecision:
    """The verdict: granted or not, the precise reason, who it was, and whether the card check was weak."""

    granted: bool
    reason: LoginReason
    person_id: str | None = None
    weak: bool = False
    methods: tuple[Method, ...] = field(default_factory=tuple)
    card_id: str | None = None
    detail: str = ""


def _deny(
    reason: LoginReason,
    person: Person | None = None,
    detail: str = "",
    *,
    card_id: str | None = None,
    weak: bool = False,
) -> LoginDecision:
    person_id = person.id if person else None
    return LoginDecision(granted=False, reason=reason, person_id=person_id, detail=detail, card_id=card_id, weak=weak)


def _find_card(cards: Sequence[Card], check: CardCheck) -> Card | None:
    # The driver names the enrolled card it matched (also for contact cards without a UID); a bare UID
    # hash is the fallback for callers that only identified the card.
    if check.card_id is not None:
        return next((c for c in cards if c.id == check.card_id), None)
    if check.uid_hash is not None:
        return next((c for c in cards if c.uid_hash == check.uid_hash), None)
    return None


def refuse_early(
    policy: SitePolicy | None,
    policy_state: PolicyState,
    policy_expired_at: datetime | None,
    terminal_id: str,
    user: str,
    now: datetime,
    card: CardCheck | None = None,
) -> LoginDecision | None:
    """Return the refusal due from policy, account, hours and (if given) card checks, or None if all pass."""
    if policy is None or policy_state == "none":
        return _deny("no_policy")
    if policy_state == "expired":
        grace = timedelta(hours=policy.login.expired_policy_grace_hours)
        if policy_expired_at is None or now > policy_expired_at + grace:
            return _deny("policy_expired")

    person = next((p for p in policy.people if user in p.logins), None)
    if person is None:
        if user in policy.login_directory:
            # A site account, just not a handler of any terminal of this agent (the bundle omits such people).
            return _deny("not_designated", detail="not a designated handler of this terminal")
        return _deny("unknown_user")
    terminal = next((t for t in policy.terminals if t.id == terminal_id), None)
    if terminal is None:
        return _deny("not_designated", person, f"terminal {terminal_id!r} is not in the policy")
    if person.id not in terminal.handlers:
        return _deny("not_designated", person)
    if not person_current(person, now.astimezone(JST).date()):
        return _deny("not_designated", person, "person inactive or outside valid_from/valid_until")

    if terminal.schedule is not None:
        schedule = next((s for s in policy.schedules if s.id == terminal.schedule), None)
        # A terminal naming a schedule the bundle lacks is a broken policy: refuse rather than ignore it.
        if schedule is None or not schedule_allows(schedule, now):
            return _deny("outside_hours", person)

    if card is None:
        return None
    if not card.present:
        return _deny("no_card", person, card.detail)
    if card.timed_out:
        # Fail closed, whoever the card claimed to be: a check that did not finish proved nothing.
        return _deny("card_timeout", person, card.detail, card_id=card.card_id)
    found = _find_card(policy.cards, card)
    if found is None:
        return _deny("unknown_card", person, card.detail)
    if card.weak and not policy.login.allow_uid_only:
        return _deny("uid_only_not_allowed", person, card_id=found.id, weak=True)
    if not card.authenticated:
        return _deny("card_auth_failed", person, card.detail, card_id=found.id, weak=card.weak)
    if found.person != person.id:
        # Only "not yours" — never whose card it is.
        return _deny("card_bound_to_other", person, card_id=found.id)
    if found.status != "active":
        return _deny("card_inactive", person, f"card status {found.status}", card_id=found.id)
    return None


_FINGER_REASONS: dict[FingerOutcome, LoginReason] = {
    "no_match": "fingerprint_mismatch",
    # No readable scan in all attempts: to the user that is "not recognised, try again".
    "retry_exhausted": "fingerprint_mismatch",
    "timeout": "fingerprint_timeout",
    "unavailable": "fingerprint_unavailable",
    "not_enrolled": "fingerprint_not_enrolled",
}


def decide_login(
    policy: SitePolicy | None,
    policy_state: PolicyState,
    policy_expired_at: datetime | None,
    terminal_id: str,
    user: str,
    card: CardCheck,
    finger: FingerCheck,
    now: datetime,
) -> LoginDecision:
    """Decide one terminal login from the cached policy, the card check and the fingerprint check."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    early = refuse_early(policy, policy_state, policy_expired_at, terminal_id, user, now, card)
    if early is not None:
        return early
    assert policy is not None  # refuse_early returned no_policy otherwise
    person = next(p for p in policy.people if user in p.logins)
    found = _find_card(policy.cards, card)
    card_id = found.id if found else None
    if finger.outcome != "match":
        return _deny(_FINGER_REASONS[finger.outcome], person, finger.detail, card_id=card_id, weak=card.weak)
    return LoginDecision(
        granted=True,
        reason="granted",
        person_id=person.id,
        weak=card.weak,
        methods=("card", "fingerprint"),
        card_id=card_id,
    )
