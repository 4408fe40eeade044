"""The site policy model: what the controller authors from YAML and what agents enforce.

The foundation covers people, cards, terminals, doors and areas; capabilities extend it. Every model
forbids unknown keys so a typo in site.yaml is an error, not a silently ignored rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from sekisho.protocol.alert_policy import AlertSettings
from sekisho.protocol.pin import PIN_HASH_PATTERN

Ident = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
AgentId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Name = Annotated[str, Field(min_length=1, max_length=100)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Site(_Model):
    """The organisation and place this policy governs."""

    name: Name
    timezone: Literal["Asia/Tokyo"] = "Asia/Tokyo"


class Person(_Model):
    """Someone who may hold cards and rights; never carries a My Number."""

    id: Ident
    name: Name
    kana: Name | None = Field(
        default=None, description="the reading of the name (よみ), shown with it in registers; optional (issue 12)"
    )
    department: Name | None = None
    roles: list[Literal["designated_handler", "area_manager", "chief_officer", "auditor", "staff", "visitor"]] = Field(
        default_factory=list
    )
    active: bool = True
    valid_from: date | None = None
    valid_until: date | None = None
    logins: list[Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_.-]{0,31}$")]] = Field(
        default_factory=list, description="OS account names this person logs in as on terminals"
    )
    pin_hash: str | None = Field(
        default=None,
        pattern=PIN_HASH_PATTERN,
        description="door PIN as pbkdf2_sha256$iterations$salt$hash (`sekisho doors hash-pin`); never the PIN",
    )

    @model_serializer(mode="wrap")
    def _without_unset_kana(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # kana came later: left out when unset, so stored versions, diffs and bundles read as before,
        # and an agent of an older release (extra="forbid") never sees a key it does not know.
        data: dict[str, Any] = handler(self)
        if data.get("kana") is None:
            data.pop("kana", None)
        return data


class Card(_Model):
    """A credential bound to one person; the identifier is stored only as a keyed hash."""

    id: Ident
    person: Ident
    kind: Literal["piv", "felica", "mifare", "osdp", "other"] = "felica"
    uid_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="HMAC-SHA256 of the card UID, site key")
    status: Literal["active", "suspended", "revoked", "lost"] = "active"
    public_key_pem: str | None = Field(
        default=None,
        max_length=4096,
        description="the card's authentication public key (enrolled from its certificate) for challenge-response",
    )
    valid_from: datetime | None = Field(default=None, description="the credential works from this moment")
    valid_until: datetime | None = Field(default=None, description="the credential stops working at this moment")

    @model_validator(mode="after")
    def _validity(self) -> Card:
        for moment in (self.valid_from, self.valid_until):
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"card {self.id!r}: times need a time zone (e.g. +09:00)")
        if self.valid_from and self.valid_until and self.valid_until <= self.valid_from:
            raise ValueError(f"card {self.id!r}: valid_until must be after valid_from")
        return self

    def valid_at(self, moment: datetime) -> bool:
        """Tell whether the credential is active and inside its validity window at this moment."""
        if self.status != "active":
            return False
        if self.valid_from is not None and moment < self.valid_from:
            return False
        return self.valid_until is None or moment < self.valid_until


class Schedule(_Model):
    """When something is allowed: weekdays and a daily window in site time (JST), holidays optional."""

    id: Ident
    name: Name
    weekdays: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(min_length=1)
    start: time
    end: time
    on_public_holidays: bool = Field(default=False, description="allow on Japanese public holidays")
    exception_days: list[date] = Field(default_factory=list, description="site closure days (always denied)")

    @model_validator(mode="after")
    def _window(self) -> Schedule:
        if self.end <= self.start:
            raise ValueError(f"schedule {self.id!r}: end must be after start (windows across midnight: use two)")
        return self


class LoginSettings(_Model):
    """Site-wide rules of the terminal login guard."""

    allow_uid_only: bool = Field(default=False, description="accept UID-only cards (flagged weak in every event)")
    expired_policy_grace_hours: int = Field(default=0, ge=0, le=72)
    end_session_after_card_removed_s: int = Field(default=300, ge=0, le=86_400)
    notices: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list, description="security notices shown at login, one per day in rotation"
    )


class Area(_Model):
    """A controlled area (管理区域) or handling area (取扱区域)."""

    id: Ident
    name: Name
    kind: Literal["controlled", "handling", "general"] = "controlled"


class Terminal(_Model):
    """A My Number terminal and the designated handlers who may log in to it."""

    id: Ident
    name: Name
    agent: AgentId
    area: Ident | None = None
    handlers: list[Ident] = Field(default_factory=list)
    schedule: Ident | None = Field(default=None, description="login allowed only within this schedule")


class DoorReader(_Model):
    """A card reader of a door, as named in the door agent's reader configuration."""

    id: Ident
    direction: Literal["entry", "exit", "both"] = Field(
        default="both", description="entry/exit readers drive anti-passback and the room's who-is-inside"
    )


class KeySlot(_Model):
    """One slot of a key cabinet: which key lives there and who may take it."""

    index: int = Field(ge=0, le=255, description="the slot's presence input on the cabinet's board")
    key: Ident
    name: Name
    allowed: list[Ident] | None = Field(default=None, description="people who may take it (default: the door's)")
    loan_hours: int = Field(default=8, ge=1, le=24 * 30, description="the key is due back after this many hours")


class Door(_Model):
    """A room door, locker or key cabinet served by a door agent (see docs/doors.md)."""

    id: Ident
    name: Name
    kind: Literal["room", "locker", "key_cabinet"]
    agent: AgentId
    area: Ident | None = None
    allowed: list[Ident] = Field(default_factory=list, description="people allowed to open it")
    readers: list[DoorReader] = Field(default_factory=list)
    relay: int = Field(default=0, ge=0, le=255, description="the lock relay on the door agent's board")
    sensor: int | None = Field(default=None, ge=0, le=255, description="the door sensor input (None: no sensor)")
    schedule: Ident | None = Field(default=None, description="opens only within this schedule")
    unlock_s: int = Field(default=5, ge=1, le=60, description="re-lock if not opened within this time")
    held_open_s: int = Field(default=30, ge=5, le=3600, description="alarm if open longer than this")
    fail_mode: Literal["secure", "safe"] = Field(
        default="secure", description="secure: stays locked without power; safe: opens (egress). Lockers: secure"
    )
    pin_required: bool = False
    pin_timeout_s: int = Field(default=10, ge=3, le=60)
    two_person: bool = Field(default=False, description="two different authorised cards within two_person_window_s")
    two_person_window_s: int = Field(default=15, ge=2, le=120)
    anti_passback: Literal["off", "soft", "hard"] = Field(
        default="off", description="soft: allow and report a passback; hard: refuse it"
    )
    passback_reset_minutes: int = Field(default=0, ge=0, le=24 * 60, description="0: never forgets by itself")
    escort_window_s: int = Field(default=20, ge=2, le=120, description="a visitor's escort must badge within this")

    @model_validator(mode="after")
    def _shape(self) -> Door:
        if self.kind != "room" and self.fail_mode != "secure":
            raise ValueError(f"door {self.id!r}: a {self.kind} must fail secure")
        if self.anti_passback != "off" and not {r.direction for r in self.readers} >= {"entry", "exit"}:
            raise ValueError(f"door {self.id!r}: anti-passback needs an entry and an exit reader")
        if len({r.id for r in self.readers}) != len(self.readers):
            raise ValueError(f"door {self.id!r}: duplicate reader id")
        return self


class KeyCabinet(_Model):
    """The slots of a key cabinet door (kind key_cabinet)."""

    door: Ident
    slots: list[KeySlot] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> KeyCabinet:
        if len({s.index for s in self.slots}) != len(self.slots):
            raise ValueError(f"key cabinet {self.door!r}: duplicate slot index")
        if len({s.key for s in self.slots}) != len(self.slots):
            raise ValueError(f"key cabinet {self.door!r}: duplicate key id")
        return self


class Medium(_Model):
    """A registered electronic medium (電子媒体台帳): the only kind of USB storage a terminal may mount."""

    id: Ident
    name: Name
    kind: Literal["usb_memory", "usb_disk", "sd_card", "other"] = "usb_memory"
    serial_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 (hex) of the USB serial string")
    device_hash: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9+/]{43}=$",
        description="USBGuard's device hash as drivers.usb computes it (base64 SHA-256 of product name, id, serial "
        "and descriptors); pins the exact device",
    )
    department: Name
    status: Literal["active", "lost", "retired", "disposed"] = "active"


class MediaLoan(_Model):
    """A medium lent to one person, for named terminals, within a window (貸出記録)."""

    id: Ident
    medium: Ident
    person: Ident
    terminals: list[Ident] = Field(min_length=1)
    starts_at: datetime
    ends_at: datetime
    purpose: Name
    read_only: bool = True
    approved_by: Ident
    returned_at: datetime | None = None

    @model_validator(mode="after")
    def _window(self) -> MediaLoan:
        for moment in (self.starts_at, self.ends_at, self.returned_at):
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"loan {self.id!r}: times need a time zone (e.g. +09:00)")
        if self.ends_at <= self.starts_at:
            raise ValueError(f"loan {self.id!r}: ends_at must be after starts_at")
        return self

    def active_at(self, moment: datetime) -> bool:
        """Tell whether the loan allows use at this moment (in its window and not returned)."""
        return self.returned_at is None and self.starts_at <= moment < self.ends_at


class SitePolicy(_Model):
    """The whole site policy as authored in site.yaml."""

    site: Site
    bundle_lifetime_hours: int = Field(default=168, ge=1, le=24 * 90)
    login: LoginSettings = Field(default_factory=LoginSettings)
    schedules: list[Schedule] = Field(default_factory=list)
    people: list[Person] = Field(default_factory=list)
    cards: list[Card] = Field(default_factory=list)
    areas: list[Area] = Field(default_factory=list)
    terminals: list[Terminal] = Field(default_factory=list)
    doors: list[Door] = Field(default_factory=list)
    key_cabinets: list[KeyCabinet] = Field(default_factory=list)
    media: list[Medium] = Field(default_factory=list)
    loans: list[MediaLoan] = Field(default_factory=list, description="managed by `sekisho media lend/return`")
    login_directory: list[Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_.-]{0,31}$")]] = Field(
        default_factory=list,
        description="derived by for_agent: every login name on the site (names only), so a terminal can tell "
        "'not designated here' from 'no such user' without receiving the other people",
    )
    # The controller's alert rules, contacts and escalation chains: signed with the policy, never sliced to agents.
    alerts: AlertSettings = Field(default_factory=AlertSettings)

    @model_validator(mode="after")
    def _check_references(self) -> SitePolicy:
        def unique(kind: str, ids: list[str]) -> set[str]:
            seen: set[str] = set()
            for i in ids:
                if i in seen:
                    raise ValueError(f"duplicate {kind} id {i!r}")
                seen.add(i)
            return seen

        people = unique("person", [p.id for p in self.people])
        areas = unique("area", [a.id for a in self.areas])
        unique("card", [c.id for c in self.cards])
        unique("terminal", [t.id for t in self.terminals])
        unique("door", [d.id for d in self.doors])
        unique("card uid_hash", [c.uid_hash for c in self.cards])
        for c in self.cards:
            if c.person not in people:
                raise ValueError(f"card {c.id!r} names unknown person {c.person!r}")
        schedules = unique("schedule", [s.id for s in self.schedules])
        unique("login", [name for p in self.people for name in p.logins])
        for t in self.terminals:
            if t.schedule is not None and t.schedule not in schedules:
                raise ValueError(f"terminal {t.id!r} names unknown schedule {t.schedule!r}")
            if t.area is not None and t.area not in areas:
                raise ValueError(f"terminal {t.id!r} names unknown area {t.area!r}")
            for h in t.handlers:
                if h not in people:
                    raise ValueError(f"terminal {t.id!r} names unknown handler {h!r}")
        for d in self.doors:
            if d.area is not None and d.area not in areas:
                raise ValueError(f"door {d.id!r} names unknown area {d.area!r}")
            if d.schedule is not None and d.schedule not in schedules:
                raise ValueError(f"door {d.id!r} names unknown schedule {d.schedule!r}")
            for pid in d.allowed:
                if pid not in people:
                    raise ValueError(f"door {d.id!r} names unknown person {pid!r}")
        readers = [(d.agent, r.id) for d in self.doors for r in d.readers]
        if len(set(readers)) != len(readers):
            raise ValueError("a reader serves two doors of one agent")
        doors_by_id = {d.id: d for d in self.doors}
        unique("key cabinet", [c.door for c in self.key_cabinets])
        for cabinet in self.key_cabinets:
            door = doors_by_id.get(cabinet.door)
            if door is None or door.kind != "key_cabinet":
                raise ValueError(f"key cabinet {cabinet.door!r} is not a door of kind key_cabinet")
            for slot in cabinet.slots:
                for pid in slot.allowed or []:
                    if pid not in people:
                        raise ValueError(f"key cabinet {cabinet.door!r} slot {slot.index} names unknown person {pid!r}")
        for person in self.people:
            if person.valid_from and person.valid_until and person.valid_until < person.valid_from:
                raise ValueError(f"person {person.id!r}: valid_until before valid_from")
        for roster in self.alerts.rosters:
            if roster.hours not in schedules:
                raise ValueError(f"alerts: roster {roster.id!r} names unknown schedule {roster.hours!r}")
        media = unique("medium", [m.id for m in self.media])
        unique("medium serial", [m.serial_sha256 for m in self.media])
        terminals = {t.id for t in self.terminals}
        unique("loan", [loan.id for loan in self.loans])
        for loan in self.loans:
            if loan.medium not in media:
                raise ValueError(f"loan {loan.id!r} names unknown medium {loan.medium!r}")
            for pid in (loan.person, loan.approved_by):
                if pid not in people:
                    raise ValueError(f"loan {loan.id!r} names unknown person {pid!r}")
            for tid in loan.terminals:
                if tid not in terminals:
                    raise ValueError(f"loan {loan.id!r} names unknown terminal {tid!r}")
        return self

    def agent_ids(self) -> list[str]:
        """Return every agent id that enforces part of this policy."""
        return sorted({t.agent for t in self.terminals} | {d.agent for d in self.doors})

    def for_agent(self, agent: str) -> dict[str, Any]:
        """Return the slice of the policy one agent needs (least privilege: only its people and cards)."""
        return AgentSlicer(self).slice(agent)


def _in_order(positions: dict[str, int], wanted: Iterable[str]) -> list[int]:
    return sorted(positions[i] for i in set(wanted) if i in positions)


class AgentSlicer:
    """Cut one policy into per-agent slices, indexing it once (a thousand slices in one pass, not a thousand scans).

    Each slice is what ``SitePolicy.for_agent`` documents, with every list in the policy's own order, so the
    bytes signed do not depend on how the slice was found.
    """

    def __init__(self, policy: SitePolicy) -> None:
        self.policy = policy
        self._terminals: dict[str, list[Terminal]] = {}
        for terminal in policy.terminals:
            self._terminals.setdefault(terminal.agent, []).append(terminal)
        self._doors: dict[str, list[Door]] = {}
        for door in policy.doors:
            self._doors.setdefault(door.agent, []).append(door)
        self._cabinets: dict[str, list[int]] = {}
        for index, cabinet in enumerate(policy.key_cabinets):
            self._cabinets.setdefault(cabinet.door, []).append(index)
        self._loans: dict[str, list[int]] = {}
        for index, loan in enumerate(policy.loans):
            for terminal_id in set(loan.terminals):
                self._loans.setdefault(terminal_id, []).append(index)
        self._people = {person.id: index for index, person in enumerate(policy.people)}
        self._cards: dict[str, list[int]] = {}
        for index, card in enumerate(policy.cards):
            self._cards.setdefault(card.person, []).append(index)
        self._media = {medium.id: index for index, medium in enumerate(policy.media)}
        self._login_directory = sorted({name for person in policy.people for name in person.logins})

    def slice(self, agent: str) -> dict[str, Any]:
        """Return the slice of the policy one agent needs (see ``SitePolicy.for_agent``)."""
        policy = self.policy
        terminals = self._terminals.get(agent, [])
        doors = self._doors.get(agent, [])
        cabinets = [policy.key_cabinets[i] for i in sorted(i for d in doors for i in self._cabinets.get(d.id, []))]
        people_ids = {h for t in terminals for h in t.handlers} | {p for d in doors for p in d.allowed}
        people_ids |= {p for c in cabinets for s in c.slots for p in (s.allowed or [])}
        area_ids = {t.area for t in terminals if t.area} | {d.area for d in doors if d.area}
        terminal_ids = {t.id for t in terminals}
        # Only loans for this agent's terminals travel to it, with their media and borrowers.
        loans = [policy.loans[i] for i in sorted({i for t in terminal_ids for i in self._loans.get(t, [])})]
        people_ids |= {loan.person for loan in loans}
        card_people = set(people_ids)
        people_ids |= {loan.approved_by for loan in loans}  # named in the loan; their cards stay home
        medium_ids = {loan.medium for loan in loans}
        schedule_ids = {t.schedule for t in terminals} | {d.schedule for d in doors}
        part = SitePolicy(
            site=policy.site,
            bundle_lifetime_hours=policy.bundle_lifetime_hours,
            login=policy.login,
            schedules=[s for s in policy.schedules if s.id in schedule_ids],
            # Readings stay home: agents decide by id, and an older agent would refuse the unknown key.
            people=[policy.people[i].model_copy(update={"kana": None}) for i in _in_order(self._people, people_ids)],
            cards=[policy.cards[i] for i in sorted(i for p in card_people for i in self._cards.get(p, []))],
            areas=[a for a in policy.areas if a.id in area_ids],
            terminals=terminals,
            doors=doors,
            key_cabinets=cabinets,
            media=[policy.media[i] for i in _in_order(self._media, medium_ids)],
            loans=[
                loan.model_copy(update={"terminals": [t for t in loan.terminals if t in terminal_ids]})
                for loan in loans
            ],
            # Terminals only: login names, no other personal data, so a refusal names the right reason.
            login_directory=self._login_directory if terminals else [],
        )
        # Without the alerts section: contacts and escalation are the controller's business, not a door's.
        return part.model_dump(mode="json", exclude={"alerts"})
