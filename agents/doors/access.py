"""The door access rules that span several taps, and the state they keep between taps.

``AccessController`` takes each tap's single-tap verdict (``checks.check_card``) and adds the steps
that need memory, each an explicit pending state with a deadline on the monotonic clock: card + PIN
(with the lock-out after wrong PINs), the two-person rule, visitors waiting for an escort, and
anti-passback (kept in the SQLite state so it survives a restart). Every tap yields ``card.presented``
and then exactly one of ``door.access_granted`` / ``door.access_denied`` / ``door.access_pending`` for
that card; a pending tap is settled later by a grant that names it (``second_person``, ``escort``) or
by a denial when its deadline passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from sekisho.agents.doors.actions import Action, Emit, Feedback, Mode, Passage, Unlock, compact
from sekisho.agents.doors.checks import (
    CardCheck,
    CardEvidence,
    DenyReason,
    PolicyState,
    check_card,
    escort_window,
    is_visitor,
    passback_area,
)
from sekisho.agents.doors.store import DoorStateStore
from sekisho.protocol.pin import verify_pin
from sekisho.protocol.policy import Door, DoorReader, Person, SitePolicy

log = logging.getLogger(__name__)

# Wrong PINs in a row before a person's PIN is locked, and for how long (docs/doors.md).
PIN_ATTEMPTS = 3
PIN_LOCKOUT_S = 300.0
# Keypad input longer than this is wrong anyway; the buffer is bounded so a stuck key costs nothing.
_MAX_KEYS = 16
# How often the anti-passback reset timeout is swept (monotonic seconds).
PASSBACK_SWEEP_S = 30.0
# Recent grants are kept as escort candidates this long (the policy's largest escort window).
_ESCORT_MEMORY_S = 120.0


@dataclass(slots=True)
class _Tap:
    """A tap that passed the single-tap checks and waits for, or completes, a multi-step rule."""

    door: Door
    reader: DoorReader
    person: Person
    evidence: CardEvidence
    rule: str
    at: float
    pin_checked: bool = False
    passback: bool = False


@dataclass(slots=True)
class _Wait:
    tap: _Tap
    until: float
    digits: str = field(default="")


class AccessController:
    """The multi-tap rules on top of ``check_card``: PIN, two-person, escort, anti-passback."""

    def __init__(
        self,
        store: DoorStateStore,
        *,
        pin_attempts: int = PIN_ATTEMPTS,
        pin_lockout_s: float = PIN_LOCKOUT_S,
    ) -> None:
        self._store = store
        self._pin_attempts = pin_attempts
        self._pin_lockout_s = pin_lockout_s
        self._pins: dict[str, _Wait] = {}  # by reader id
        self._pairs: dict[str, _Wait] = {}  # by door id: the first of two people
        self._visitors: dict[str, list[_Wait]] = {}  # by door id
        self._escorts: dict[str, list[tuple[str, float]]] = {}  # by door id: recent non-visitor grants
        self._pin_failures: dict[str, tuple[int, float]] = {}  # person → (wrong PINs in a row, last at)
        self._pin_locked: dict[str, float] = {}
        self._readers: dict[str, str] = {}  # reader id → door id, from the last policy that had doors
        self._areas: dict[str, int] = {}  # anti-passback area → reset minutes (0: never)
        self._next_sweep = 0.0

    # --- policy -------------------------------------------------------------------------------

    def update_policy(
        self,
        policy: SitePolicy | None,
        policy_state: PolicyState,
        now: datetime,
        mono: float,
        *,
        mode_of: Callable[[str], Mode] | None = None,
    ) -> list[Action]:
        """Take a new policy (or its loss): re-check every pending tap against it."""
        if policy is not None:
            self._readers = {r.id: d.id for d in policy.doors for r in d.readers}
            areas: dict[str, int] = {}
            for door in policy.doors:
                if door.anti_passback == "off":
                    continue
                area, minutes = passback_area(door), door.passback_reset_minutes
                # Doors sharing an area should share the timeout; the shortest non-zero one applies.
                if minutes:
                    areas[area] = min(areas.get(area) or minutes, minutes)
                else:
                    areas.setdefault(area, 0)
            self._areas = areas
        out: list[Action] = []
        for reader_id, wait in list(self._pins.items()):
            check = self._recheck(wait.tap, policy, policy_state, now, mode_of)
            if not check.ok:
                del self._pins[reader_id]
                out.extend(self._deny_tap(wait.tap, check.reason or "no_policy", check.detail, check.person))
        for door_id, wait in list(self._pairs.items()):
            check = self._recheck(wait.tap, policy, policy_state, now, mode_of)
            if not check.ok:
                del self._pairs[door_id]
                out.extend(self._deny_tap(wait.tap, check.reason or "no_policy", check.detail, check.person))
        for door_id, waits in list(self._visitors.items()):
            keep = []
            for wait in waits:
                check = self._recheck(wait.tap, policy, policy_state, now, mode_of)
                if check.ok:
                    keep.append(wait)
                else:
                    out.extend(self._deny_tap(wait.tap, check.reason or "no_policy", check.detail, check.person))
            self._visitors[door_id] = keep
        return out

    def door_of_reader(self, reader_id: str) -> str | None:
        """Return the door a reader belonged to in the last policy held (for events without a policy)."""
        return self._readers.get(reader_id)

    def end_door(self, door_id: str, reason: DenyReason, detail: str = "") -> list[Action]:
        """Refuse every tap waiting at a door (lock-down, door removed) with the given reason."""
        out: list[Action] = []
        for reader_id, wait in list(self._pins.items()):
            if wait.tap.door.id == door_id:
                del self._pins[reader_id]
                out.extend(self._deny_tap(wait.tap, reason, detail))
        pair = self._pairs.pop(door_id, None)
        if pair is not None:
            out.extend(self._deny_tap(pair.tap, reason, detail))
        for wait in self._visitors.pop(door_id, []):
            out.extend(self._deny_tap(wait.tap, reason, detail))
        self._escorts.pop(door_id, None)
        return out

    # --- taps and keys ------------------------------------------------------------------------

    def card_presented(
        self,
        *,
        policy: SitePolicy | None,
        policy_state: PolicyState,
        reader_id: str,
        evidence: CardEvidence,
        now: datetime,
        mono: float,
        mode_of: Callable[[str], Mode] | None = None,
    ) -> list[Action]:
        """Decide one tap; the actions start with ``card.presented`` and hold one decision for this card."""
        check = check_card(policy, policy_state, reader_id, evidence, now, mode_of=mode_of)
        door_id = check.door.id if check.door is not None else self._readers.get(reader_id, reader_id)
        out: list[Action] = []
        # A card at a reader that was waiting for a PIN ends that wait (the person walked away).
        stale = self._pins.pop(reader_id, None)
        if stale is not None:
            out.extend(self._deny_tap(stale.tap, "pin_timeout", "another card was presented"))
        out.append(
            Emit(
                "card.presented",
                {
                    "reader": reader_id,
                    "card_hash": evidence.card_hash,
                    "card_masked": evidence.card_masked,
                    "door": door_id,
                    "weak": evidence.weak,
                },
            )
        )
        if not check.ok:
            reason = check.reason or "no_policy"
            detail = check.detail
            if reason == "not_allowed" and check.door is not None and self._visitors.get(check.door.id):
                reason, detail = "escort_not_allowed", "not allowed at this door, so cannot escort a visitor"
            out.extend(
                self._deny(
                    door_id,
                    reason,
                    reader_id=reader_id,
                    reader=check.reader,
                    door=check.door,
                    evidence=evidence,
                    person=check.person.id if check.person else None,
                    detail=detail,
                )
            )
            return out
        assert check.door is not None and check.reader is not None and check.person is not None
        assert check.rule is not None
        tap = _Tap(check.door, check.reader, check.person, evidence, check.rule, mono)
        door = tap.door
        if door.pin_required:
            if not tap.person.pin_hash:
                return out + self._deny_tap(tap, "pin_not_set")
            locked = self._pin_locked.get(tap.person.id)
            if locked is not None and mono < locked:
                return out + self._deny_tap(tap, "pin_locked", f"PIN locked for {int(locked - mono) + 1} s more")
        if self._passback(tap, now, out):
            if door.anti_passback == "hard":
                area = passback_area(door)
                return out + self._deny_tap(tap, "passback", f"already inside {area}; exit first")
            tap.passback = True
        if door.pin_required:
            self._pins[reader_id] = _Wait(tap, mono + door.pin_timeout_s)
            return [*out, self._pending(tap, "pin", door.pin_timeout_s)]
        return out + self._proceed(tap, mono)

    def keys_entered(
        self,
        *,
        policy: SitePolicy | None,
        policy_state: PolicyState,
        reader_id: str,
        keys: str,
        now: datetime,
        mono: float,
        mode_of: Callable[[str], Mode] | None = None,
    ) -> list[Action]:
        """Take keypad input at a reader: digits, ``*`` clears, ``#`` submits the PIN being waited for."""
        wait = self._pins.get(reader_id)
        if wait is None:
            return []
        for key in keys:
            if key == "#":
                del self._pins[reader_id]
                return self._submit_pin(wait, policy, policy_state, now, mono, mode_of)
            if key == "*":
                wait.digits = ""
            elif key in "0123456789" and len(wait.digits) < _MAX_KEYS:
                wait.digits += key
        return []

    def _submit_pin(
        self,
        wait: _Wait,
        policy: SitePolicy | None,
        policy_state: PolicyState,
        now: datetime,
        mono: float,
        mode_of: Callable[[str], Mode] | None,
    ) -> list[Action]:
        tap = wait.tap
        person_id = tap.person.id
        try:
            ok = verify_pin(wait.digits, tap.person.pin_hash or "")
        except ValueError:
            return self._deny_tap(tap, "pin_not_set", "PIN hash unusable")
        if not ok:
            count, last = self._pin_failures.get(person_id, (0, mono))
            # Wrong entries far apart are typos, not a search: the count starts again after a quiet spell.
            failures = (count if mono - last < self._pin_lockout_s else 0) + 1
            detail = f"wrong PIN {failures} of {self._pin_attempts}"
            if failures >= self._pin_attempts:
                self._pin_failures.pop(person_id, None)
                self._pin_locked[person_id] = mono + self._pin_lockout_s
                detail += f"; PIN locked for {int(self._pin_lockout_s)} s"
            else:
                self._pin_failures[person_id] = (failures, mono)
            return self._deny_tap(tap, "pin_wrong", detail, pin_checked=True)
        self._pin_failures.pop(person_id, None)
        # The policy may have changed while the person typed.
        check = self._recheck(tap, policy, policy_state, now, mode_of)
        if not check.ok:
            return self._deny_tap(tap, check.reason or "no_policy", check.detail, check.person, pin_checked=True)
        return self._proceed(replace(tap, pin_checked=True, rule=tap.rule + "+pin"), mono)

    # --- timers -------------------------------------------------------------------------------

    def tick(self, now: datetime, mono: float) -> list[Action]:
        """Settle every wait whose deadline passed, and sweep the anti-passback reset timeout."""
        out: list[Action] = []
        for reader_id, wait in list(self._pins.items()):
            if mono >= wait.until:
                del self._pins[reader_id]
                out.extend(self._deny_tap(wait.tap, "pin_timeout", f"no PIN within {wait.tap.door.pin_timeout_s} s"))
        for door_id, wait in list(self._pairs.items()):
            if mono >= wait.until:
                del self._pairs[door_id]
                window = wait.tap.door.two_person_window_s
                out.extend(self._deny_tap(wait.tap, "two_person_timeout", f"no second person within {window} s"))
        for door_id, waits in list(self._visitors.items()):
            for wait in [w for w in waits if mono >= w.until]:
                waits.remove(wait)
                out.extend(self._deny_tap(wait.tap, "visitor_without_escort", "no escort badged in time"))
            if not waits:
                del self._visitors[door_id]
        for door_id, escorts in list(self._escorts.items()):
            self._escorts[door_id] = [(p, at) for p, at in escorts if mono - at <= _ESCORT_MEMORY_S]
        for person_id, until in list(self._pin_locked.items()):
            if mono >= until:
                del self._pin_locked[person_id]
        if mono >= self._next_sweep:
            self._next_sweep = mono + PASSBACK_SWEEP_S
            for area, minutes in self._areas.items():
                if minutes:
                    for person in self._store.expire(area, now - timedelta(minutes=minutes)):
                        out.append(self._forgiven(area, person, "timeout"))
        return out

    def next_deadline(self) -> float | None:
        """Return the monotonic time of the next wait deadline or passback sweep, or None."""
        deadlines = [w.until for w in self._pins.values()] + [w.until for w in self._pairs.values()]
        deadlines += [w.until for waits in self._visitors.values() for w in waits]
        if any(self._areas.values()):
            deadlines.append(self._next_sweep)
        return min(deadlines) if deadlines else None

    # --- anti-passback ------------------------------------------------------------------------

    def record_passages(self, door: Door, passages: tuple[Passage, ...], now: datetime) -> None:
        """Record in the persistent state who went through an anti-passback door, and which way."""
        if door.anti_passback == "off":
            return
        area = passback_area(door)
        for passage in passages:
            if passage.direction == "entry":
                self._store.record_entry(area, passage.person, door.id, now)
            elif passage.direction == "exit":
                self._store.record_exit(area, passage.person)

    def forgive(self, area: str, person: str | None, *, command_id: str | None) -> tuple[list[Action], list[str]]:
        """Forget who is inside an area (all, or one person); return the event and the people forgotten."""
        forgotten = self._store.forgive(area, person)
        payload = compact({"area": area, "person": person, "cause": "command", "command_id": command_id})
        return [Emit("door.passback_forgiven", payload)], forgotten

    def passback_areas(self) -> dict[str, int]:
        """Return the anti-passback areas of the current policy and their reset minutes."""
        return dict(self._areas)

    def _passback(self, tap: _Tap, now: datetime, out: list[Action]) -> bool:
        door = tap.door
        if door.anti_passback == "off" or tap.reader.direction != "entry":
            return False  # exits are never refused: nobody is held inside by the card system
        area = passback_area(door)
        entry = self._store.inside(area, tap.person.id)
        if entry is None:
            return False
        minutes = self._areas.get(area, door.passback_reset_minutes)
        if minutes and entry.entered_at <= now - timedelta(minutes=minutes):
            self._store.forgive(area, tap.person.id)
            out.append(self._forgiven(area, tap.person.id, "timeout"))
            return False
        return True

    def _forgiven(self, area: str, person: str, cause: str) -> Emit:
        return Emit("door.passback_forgiven", {"area": area, "person": person, "cause": cause})

    # --- the multi-person rules ---------------------------------------------------------------

    def _proceed(self, tap: _Tap, mono: float) -> list[Action]:
        door = tap.door
        if is_visitor(tap.person):
            return self._visitor(tap, mono)
        waiting = [w for w in self._visitors.pop(door.id, []) if w.tap.person.id != tap.person.id]
        if waiting:
            return self._escort_arrived(tap, waiting, mono)
        if door.two_person:
            first = self._pairs.get(door.id)
            if first is None:
                self._pairs[door.id] = _Wait(tap, mono + door.two_person_window_s)
                return [self._pending(tap, "second_person", door.two_person_window_s)]
            if first.tap.person.id == tap.person.id:
                return self._deny_tap(tap, "two_person_same_person", "the second card must be another person's")
            del self._pairs[door.id]
            out = self._grant(tap, rule=tap.rule + "+two_person", second_person=first.tap.person.id, also=[first.tap])
            self._remember_escorts(door.id, mono, tap, first.tap)
            return [*out, Unlock(door.id, (self._passage(first.tap), self._passage(tap)))]
        self._remember_escorts(door.id, mono, tap)
        return [*self._grant(tap, rule=tap.rule), Unlock(door.id, (self._passage(tap),))]

    def _visitor(self, tap: _Tap, mono: float) -> list[Action]:
        door = tap.door
        lookback = escort_window(door)
        first = self._pairs.get(door.id)
        if door.two_person and first is not None and not is_visitor(first.tap.person):
            # The escort tapped first and waits for a partner: the visitor completes the pair.
            del self._pairs[door.id]
            escort = first.tap.person.id
            rule = tap.rule + "+escort+two_person"
            out = self._grant(tap, rule=rule, escort=escort, second_person=escort, visitor=True, also=[first.tap])
            return [*out, Unlock(door.id, (self._passage(first.tap), self._passage(tap)))]
        recent = [p for p, at in self._escorts.get(door.id, []) if mono - at <= lookback and p != tap.person.id]
        if recent:
            escort = recent[-1]
            rule = tap.rule + ("+escort+two_person" if door.two_person else "+escort")
            second = escort if door.two_person else None
            out = self._grant(tap, rule=rule, escort=escort, second_person=second, visitor=True)
            return [*out, Unlock(door.id, (self._passage(tap),))]
        waits = [w for w in self._visitors.get(door.id, []) if w.tap.person.id != tap.person.id]
        waits.append(_Wait(tap, mono + lookback))
        self._visitors[door.id] = waits
        return [self._pending(tap, "escort", lookback)]

    def _escort_arrived(self, escort: _Tap, visitors: list[_Wait], mono: float) -> list[Action]:
        door = escort.door
        names = ", ".join(w.tap.person.id for w in visitors)
        second = visitors[0].tap.person.id if door.two_person else None
        # The escort's own passage is on the record too, before the visitors it let in.
        out = self._grant(escort, rule=escort.rule, second_person=second, detail=f"escorting {names}"[:300])
        for wait in visitors:
            rule = wait.tap.rule + ("+escort+two_person" if door.two_person else "+escort")
            out += self._grant(
                wait.tap,
                rule=rule,
                escort=escort.person.id,
                second_person=escort.person.id if door.two_person else None,
                visitor=True,
                feedback=False,
            )
        self._remember_escorts(door.id, mono, escort)
        passages = (self._passage(escort), *(self._passage(w.tap) for w in visitors))
        return [*out, Unlock(door.id, passages)]

    def _remember_escorts(self, door_id: str, mono: float, *taps: _Tap) -> None:
        escorts = self._escorts.setdefault(door_id, [])
        escorts.extend((t.person.id, mono) for t in taps if not is_visitor(t.person))

    @staticmethod
    def _passage(tap: _Tap) -> Passage:
        return Passage(tap.person.id, tap.reader.direction, tap.door.area)

    def _recheck(
        self,
        tap: _Tap,
        policy: SitePolicy | None,
        policy_state: PolicyState,
        now: datetime,
        mode_of: Callable[[str], Mode] | None,
    ) -> CardCheck:
        check = check_card(policy, policy_state, tap.reader.id, tap.evidence, now, mode_of=mode_of)
        if check.ok and check.door is not None and check.door.id != tap.door.id:
            return replace(check, reason="unknown_reader", detail="the reader moved to another door")
        return check

    # --- events -------------------------------------------------------------------------------

    def _fields(self, door: Door | None, reader: DoorReader | None, evidence: CardEvidence) -> dict[str, object]:
        return {
            "reader": reader.id if reader is not None else None,
            "direction": reader.direction if reader is not None else None,
            "area": door.area if door is not None else None,
            "card_masked": evidence.card_masked,
            "card_hash": evidence.card_hash,
            "weak": evidence.weak,
        }

    def _grant(
        self,
        tap: _Tap,
        *,
        rule: str,
        second_person: str | None = None,
        escort: str | None = None,
        visitor: bool = False,
        detail: str = "",
        also: list[_Tap] | None = None,
        feedback: bool = True,
    ) -> list[Action]:
        involved = [tap, *(also or [])]
        passback = any(t.passback for t in involved)
        payload = {
            "door": tap.door.id,
            "person": tap.person.id,
            "rule": rule[:100],
            **self._fields(tap.door, tap.reader, tap.evidence),
            "pin_checked": tap.pin_checked,
            "second_person": second_person,
            "escort": escort,
            "visitor": visitor,
            "passback": passback,
            "detail": detail,
        }
        out: list[Action] = [Emit("door.access_granted", compact(payload))]
        for t in involved:
            if t.passback:
                # Soft anti-passback: let them in, and tell security who re-entered without leaving.
                area = passback_area(t.door)
                out.append(
                    Emit(
                        "door.alarm",
                        {
                            "door": t.door.id,
                            "alarm": "passback",
                            "person": t.person.id,
                            "reader": t.reader.id,
                            "detail": f"entered {area} again without an exit",
                        },
                    )
                )
        if feedback:
            out.append(Feedback(tap.reader.id, True))
        return out

    def _pending(self, tap: _Tap, waiting_for: Literal["pin", "second_person", "escort"], until_s: int) -> Emit:
        payload = {
            "door": tap.door.id,
            "person": tap.person.id,
            "waiting_for": waiting_for,
            "until_s": until_s,
            **self._fields(tap.door, tap.reader, tap.evidence),
            "pin_checked": tap.pin_checked,
            "passback": tap.passback,
        }
        return Emit("door.access_pending", compact(payload))

    def _deny_tap(
        self,
        tap: _Tap,
        reason: str,
        detail: str = "",
        person: Person | None = None,
        *,
        pin_checked: bool | None = None,
    ) -> list[Action]:
        return self._deny(
            tap.door.id,
            reason,
            reader=tap.reader,
            reader_id=tap.reader.id,
            door=tap.door,
            evidence=tap.evidence,
            person=(person or tap.person).id,
            detail=detail,
            pin_checked=tap.pin_checked if pin_checked is None else pin_checked,
        )

    def _deny(
        self,
        door_id: str,
        reason: str,
        *,
        reader_id: str,
        reader: DoorReader | None,
        door: Door | None,
        evidence: CardEvidence,
        person: str | None,
        detail: str = "",
        pin_checked: bool = False,
    ) -> list[Action]:
        payload = {
            "door": door_id,
            "reason": reason,
            "person": person,
            **self._fields(door, reader, evidence),
            "pin_checked": pin_checked,
            "detail": detail[:300],
        }
        return [Emit("door.access_denied", compact(payload)), Feedback(reader_id, False)]
