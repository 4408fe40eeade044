"""Single-tap card checks at doors: pure functions of the cached signed policy and one tap.

``check_card`` decides a tap from the policy alone (works with the controller unreachable). Checks run
in this order, and the first refusal is the reason recorded (the reasons are stable snake_case codes;
docs/doors.md lists them)::

    no_policy / policy_expired      fail closed: no valid bundle, no door opens by card
    unknown_reader                  the reader is not a reader of any door in this agent's policy
    lockdown                        the door is in lock-down: every card is refused
    card_timeout                    the card stopped answering before its check was over (PC/SC readers)
    unknown_card                    no card with this keyed hash (or id)
    card_auth_failed                the card did not prove it holds its enrolled key
    card_inactive                   suspended, revoked or lost
    card_not_valid                  outside the card's valid_from / valid_until
    person_inactive                 the holder is inactive or outside their valid dates (JST day)
    not_allowed                     not on the door's list (a key cabinet: nor on any slot's list)
    exception_day / holiday / outside_hours   the door's schedule (Japanese public holidays known)

The rules that span several taps (PIN entry, two people, escorts, anti-passback) keep state and live
in ``access``; what they need to know of the policy alone (a door's passback area, who is a visitor,
how long a visitor may wait) is here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, get_args

from sekisho.agents.doors.actions import Mode
from sekisho.agents.runtime.schedules import JST, person_current, schedule_refusal
from sekisho.protocol.policy import Card, Door, DoorReader, Person, SitePolicy

PolicyState = Literal["none", "valid", "expired"]
DenyReason = Literal[
    "no_policy",
    "policy_expired",
    "unknown_reader",
    "lockdown",
    "card_timeout",
    "unknown_card",
    "card_auth_failed",
    "card_inactive",
    "card_not_valid",
    "person_inactive",
    "not_allowed",
    "exception_day",
    "holiday",
    "outside_hours",
    "pin_not_set",
    "pin_locked",
    "pin_wrong",
    "pin_timeout",
    "passback",
    "two_person_same_person",
    "two_person_timeout",
    "visitor_without_escort",
    "escort_not_allowed",
]
REASONS: tuple[str, ...] = get_args(DenyReason)
_SCHEDULE_REASONS: dict[str, DenyReason] = {
    "exception_day": "exception_day",
    "holiday": "holiday",
    "outside_hours": "outside_hours",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class CardEvidence:
    """What a reader driver learnt from a card: the keyed hash, a masked form, and whether it was weak."""

    card_hash: str
    card_masked: str
    weak: bool
    card_id: str | None = None
    # The card was matched to an enrolled key but failed to prove it holds it (a clone, a copied certificate).
    auth_failed: bool = False
    # The card (or its reader) stopped answering before the check was over: it proved nothing.
    timed_out: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CardCheck:
    """The single-tap verdict: a refusal reason or None, with whatever was identified along the way."""

    reason: DenyReason | None
    door: Door | None = None
    reader: DoorReader | None = None
    card: Card | None = None
    person: Person | None = None
    rule: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Tell whether the tap passed every single-tap check."""
        return self.reason is None


def find_reader(policy: SitePolicy, reader_id: str) -> tuple[Door, DoorReader] | None:
    """Return the door and reader a reader id belongs to in this policy."""
    for door in policy.doors:
        for reader in door.readers:
            if reader.id == reader_id:
                return door, reader
    return None


def find_card(policy: SitePolicy, evidence: CardEvidence) -> Card | None:
    """Return the enrolled card the evidence names (by id if the driver matched one, else by keyed hash)."""
    if evidence.card_id is not None:
        return next((c for c in policy.cards if c.id == evidence.card_id), None)
    return next((c for c in policy.cards if c.uid_hash == evidence.card_hash), None)


def allowed_rule(policy: SitePolicy, door: Door, person_id: str) -> str | None:
    """Return the policy rule that lets a person open a door, or None."""
    if person_id in door.allowed:
        return f"doors.{door.id}.allowed"
    if door.kind == "key_cabinet":
        # Someone allowed one slot's key must be able to open the cabinet to take it.
        cabinet = next((c for c in policy.key_cabinets if c.door == door.id), None)
        if cabinet is not None and any(person_id in (s.allowed or []) for s in cabinet.slots):
            return f"key_cabinets.{door.id}.slots"
    return None


def passback_area(door: Door) -> str:
    """Return the area whose anti-passback state a door keeps (the door itself if it names no area)."""
    return door.area or door.id


def is_visitor(person: Person) -> bool:
    """Tell whether a person needs an escort (role ``visitor``)."""
    return "visitor" in person.roles


def escort_window(door: Door) -> int:
    """Return how many seconds an escort's grant and a visitor's tap may lie apart (at most the two-person window)."""
    if door.two_person:
        return min(door.escort_window_s, door.two_person_window_s)
    return door.escort_window_s


def check_card(
    policy: SitePolicy | None,
    policy_state: PolicyState,
    reader_id: str,
    evidence: CardEvidence,
    now: datetime,
    *,
    mode_of: Callable[[str], Mode] | None = None,
) -> CardCheck:
    """Decide one tap from the policy alone (no PIN, partner, escort or passback): the first refusal, or ok."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if policy is None or policy_state == "none":
        return CardCheck(reason="policy_expired" if policy_state == "expired" else "no_policy")
    found = find_reader(policy, reader_id)
    door, reader = found if found is not None else (None, None)
    card = find_card(policy, evidence)
    person = next((p for p in policy.people if p.id == card.person), None) if card is not None else None
    # What was identified goes into every refusal, so the record says whose card it was.
    seen = CardCheck(reason=None, door=door, reader=reader, card=card, person=person)

    def refuse(reason: DenyReason, detail: str = "") -> CardCheck:
        return replace(seen, reason=reason, detail=detail)

    if policy_state != "valid":
        return refuse("policy_expired")
    if door is None:
        return refuse("unknown_reader")
    if mode_of is not None and mode_of(door.id) == "lockdown":
        return refuse("lockdown")
    if evidence.timed_out:
        return refuse("card_timeout", "the card stopped answering before its check was over")
    if card is None or person is None:
        return refuse("unknown_card")
    if evidence.auth_failed:
        return refuse("card_auth_failed", f"card {card.id} did not prove its enrolled key")
    if card.status != "active":
        return refuse("card_inactive", f"card {card.id} is {card.status}")
    if not card.valid_at(now):
        return refuse("card_not_valid", f"card {card.id} outside its validity window")
    if not person_current(person, now.astimezone(JST).date()):
        return refuse("person_inactive")
    rule = allowed_rule(policy, door, person.id)
    if rule is None:
        return refuse("not_allowed")
    if door.schedule is not None:
        schedule = next((s for s in policy.schedules if s.id == door.schedule), None)
        if schedule is None:
            # A door naming a schedule its bundle lacks is a broken policy: refuse rather than ignore it.
            return refuse("outside_hours", f"schedule {door.schedule} not in the policy")
        refusal = schedule_refusal(schedule, now)
        if refusal is not None:
            return refuse(_SCHEDULE_REASONS.get(refusal, "outside_hours"), f"schedule {schedule.id}")
    return replace(seen, rule=rule)


def modes_lookup(modes: Mapping[str, Mode]) -> Callable[[str], Mode]:
    """Return a mode_of function over a door-id → mode mapping (normal when absent)."""
    return lambda door_id: modes.get(door_id, "normal")
