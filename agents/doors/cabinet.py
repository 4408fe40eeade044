"""Key cabinets: which key is out, who took it, and the key-lending register events (鍵の貸し出し管理簿).

Each slot has a presence switch (``KeySlot.index`` on the board). A grant at the cabinet opens a
*session* for the people it was given to; it lasts until the door is shut again (or the grant window
passes unopened), plus a short grace for the last switch to settle. A cabinet without a door sensor
keeps the session for ``unlock_s + held_open_s`` after the grant.

- A key leaving its slot during a session of someone allowed that slot (``slot.allowed``, or the
  door's ``allowed`` when the slot names nobody) → ``key.taken`` with ``due_at`` = now + ``loan_hours``.
- A key leaving with no session, or in the session of someone not allowed that slot →
  ``door.alarm key_taken_without_grant`` (naming the session holder, if any). The slot is still
  recorded as out, so its return is matched.
- A key arriving in a slot → ``key.returned`` (person: the session holder, if any). If the person
  returning does not hold that slot's loan → ``wrong_slot=true`` (on the wire: "returned by someone other
  than the borrower"). Only when that person also has a key of this cabinet out — theirs may be the key that
  went into this slot — is it a ``door.alarm key_wrong_slot``; anyone else returned this slot's own key for
  a colleague, which is no alarm (the controller's register shows it as such, controller/doors/apply.py).

Limitation: a presence switch only says *a* key is in the slot, not *which* key. A key put into another
key's empty slot is seen as that slot's key coming back; it is caught only because the person
returning is not that slot's borrower and their own slot stays out. Tagged keys (RFID fobs per key) would
be needed to do better.

Loans live in the door state store, so they survive an agent restart; the first settled report of each
slot after a start is reconciled with it (a key back while the agent was down is recorded as returned;
a slot found empty with no loan raises ``key_taken_without_grant``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sekisho.agents.doors.actions import Action, Emit, compact
from sekisho.agents.doors.debounce import DEFAULT_DEBOUNCE_S, Debouncer
from sekisho.agents.doors.store import DoorStateStore, KeyLoan
from sekisho.protocol import timefmt
from sekisho.protocol.policy import Door, KeyCabinet, KeySlot, SitePolicy

log = logging.getLogger(__name__)

# The session outlives the door's closing by this much, for a slot switch settling a moment after.
SESSION_GRACE_S = 2.0


@dataclass(slots=True)
class _Session:
    holders: tuple[str, ...]
    ends_at: float | None  # None: until the door is secured


class KeyCabinetTracker:
    """The key cabinets of one agent: slot inputs, sessions from grants, loans in the state store."""

    def __init__(
        self,
        store: DoorStateStore,
        *,
        debounce_s: float = DEFAULT_DEBOUNCE_S,
        session_grace_s: float = SESSION_GRACE_S,
    ) -> None:
        self._store = store
        self._debounce_s = debounce_s
        self._grace = session_grace_s
        self._doors: dict[str, Door] = {}
        self._cabinets: dict[str, KeyCabinet] = {}
        self._by_index: dict[int, list[tuple[str, KeySlot]]] = {}
        self._inputs: dict[tuple[str, int], Debouncer] = {}
        self._sessions: dict[str, _Session] = {}

    def update_policy(self, policy: SitePolicy | None) -> None:
        """Take the cabinets of a new policy (without a policy the last known ones stay)."""
        if policy is None:
            return
        self._doors = {d.id: d for d in policy.doors if d.kind == "key_cabinet"}
        self._cabinets = {c.door: c for c in policy.key_cabinets if c.door in self._doors}
        by_index: dict[int, list[tuple[str, KeySlot]]] = {}
        for cabinet in self._cabinets.values():
            for slot in cabinet.slots:
                by_index.setdefault(slot.index, []).append((cabinet.door, slot))
        for index, users in by_index.items():
            if len(users) > 1:
                log.warning("slot input %d is named by several cabinets: %s", index, [d for d, _ in users])
        self._by_index = by_index
        for key in [k for k in self._inputs if k[0] not in self._cabinets]:
            del self._inputs[key]

    def is_cabinet(self, door_id: str) -> bool:
        """Tell whether a door is a key cabinet with slots in the policy."""
        return door_id in self._cabinets

    # --- sessions -----------------------------------------------------------------------------

    def session_started(self, door_id: str, persons: tuple[str, ...], mono: float) -> None:
        """Open (or widen) the session of a grant at a cabinet."""
        door = self._doors.get(door_id)
        if door is None:
            return
        ends_at = None if door.sensor is not None else mono + door.unlock_s + door.held_open_s
        current = self._sessions.get(door_id)
        if current is not None and self._active(current, mono):
            holders = current.holders + tuple(p for p in persons if p not in current.holders)
            self._sessions[door_id] = _Session(holders, ends_at if current.ends_at is not None else None)
        else:
            self._sessions[door_id] = _Session(tuple(persons), ends_at)

    def session_ended(self, door_id: str, mono: float) -> None:
        """End the session once the door is secured (after the grace)."""
        session = self._sessions.get(door_id)
        if session is not None and session.ends_at is None:
            session.ends_at = mono + self._grace

    def holders(self, door_id: str, mono: float) -> tuple[str, ...]:
        """Return the people whose session is open at a cabinet."""
        session = self._sessions.get(door_id)
        return session.holders if session is not None and self._active(session, mono) else ()

    @staticmethod
    def _active(session: _Session, mono: float) -> bool:
        return session.ends_at is None or mono < session.ends_at

    # --- slot inputs --------------------------------------------------------------------------

    def slot_changed(self, index: int, present: bool, mono: float, now: datetime) -> list[Action]:
        """Take a raw key-presence report (True: a key is in the slot); it counts once it has held."""
        out = self.tick(mono, now)
        users = self._by_index.get(index)
        if not users:
            log.debug("key slot input %d is not a slot of any cabinet", index)
            return out
        for door_id, _slot in users:
            self._inputs.setdefault((door_id, index), Debouncer(self._debounce_s)).feed(mono, present)
        return out

    def tick(self, mono: float, now: datetime) -> list[Action]:
        """Settle the slot inputs that have held long enough, in time order."""
        out: list[Action] = []
        due = sorted((d, key) for key, deb in self._inputs.items() if (d := deb.due()) is not None and d <= mono)
        for at, (door_id, index) in due:
            previous, present = self._inputs[(door_id, index)].commit()
            slot = next((s for d, s in self._by_index.get(index, []) if d == door_id), None)
            if slot is not None:
                out.extend(self._settled(door_id, slot, previous, present, at, now))
        for door_id in [d for d, s in self._sessions.items() if not self._active(s, mono)]:
            del self._sessions[door_id]
        return out

    def next_deadline(self) -> float | None:
        """Return when the next slot input settles or a session ends, or None."""
        deadlines = [d for deb in self._inputs.values() if (d := deb.due()) is not None]
        deadlines += [s.ends_at for s in self._sessions.values() if s.ends_at is not None]
        return min(deadlines) if deadlines else None

    def loans(self, door_id: str) -> dict[int, KeyLoan]:
        """Return the keys out of a cabinet, by slot."""
        return self._store.loans(door_id)

    def _settled(
        self, door_id: str, slot: KeySlot, previous: bool | None, present: bool, at: float, now: datetime
    ) -> list[Action]:
        loan = self._store.loans(door_id).get(slot.index)
        if previous is None:
            return self._reconcile(door_id, slot, present, loan, now)
        holders = self.holders(door_id, at)
        if present:
            return self._returned(door_id, slot, loan, holders)
        return self._taken(door_id, slot, holders, now)

    def _allowed(self, door_id: str, slot: KeySlot) -> list[str]:
        return slot.allowed if slot.allowed is not None else self._doors[door_id].allowed

    def _taken(self, door_id: str, slot: KeySlot, holders: tuple[str, ...], now: datetime) -> list[Action]:
        allowed = self._allowed(door_id, slot)
        taker = next((p for p in holders if p in allowed), None)
        if taker is not None:
            due = now + timedelta(hours=slot.loan_hours)
            self._store.record_loan(KeyLoan(door_id, slot.index, slot.key, taker, True, now, due))
            payload = {
                "door": door_id,
                "slot": slot.index,
                "key": slot.key,
                "person": taker,
                "due_at": timefmt.fmt(due),
            }
            return [Emit("key.taken", payload)]
        holder = holders[0] if holders else None
        self._store.record_loan(KeyLoan(door_id, slot.index, slot.key, holder, False, now, None))
        detail = f"key {slot.key} taken " + (f"by {holder}, not allowed this slot" if holder else "with no grant")
        return [self._alarm(door_id, "key_taken_without_grant", slot, holder, detail)]

    def _returned(self, door_id: str, slot: KeySlot, loan: KeyLoan | None, holders: tuple[str, ...]) -> list[Action]:
        self._store.close_loan(door_id, slot.index)
        borrower = loan.person if loan is not None else None
        if borrower is not None and borrower in holders:
            returner: str | None = borrower
        else:
            returner = holders[0] if holders else None
        wrong = returner is not None and borrower is not None and returner != borrower
        payload = {"door": door_id, "slot": slot.index, "key": slot.key, "person": returner, "wrong_slot": wrong}
        out: list[Action] = [Emit("key.returned", compact(payload))]
        # The loan of this slot is closed already: any loan of the returner's still open is another slot's.
        holds_other = returner is not None and any(
            other.person == returner for other in self._store.loans(door_id).values()
        )
        if wrong and holds_other:
            detail = f"slot {slot.index} ({slot.key}) was out with {borrower}, returned in {returner}'s session"
            out.append(self._alarm(door_id, "key_wrong_slot", slot, returner, detail))
        return out

    def _reconcile(
        self, door_id: str, slot: KeySlot, present: bool, loan: KeyLoan | None, now: datetime
    ) -> list[Action]:
        if present and loan is not None:
            self._store.close_loan(door_id, slot.index)
            payload = {"door": door_id, "slot": slot.index, "key": slot.key, "wrong_slot": False}
            return [Emit("key.returned", payload)]
        if not present and loan is None:
            self._store.record_loan(KeyLoan(door_id, slot.index, slot.key, None, False, now, None))
            detail = f"key {slot.key} missing when the agent started, with no loan on record"
            return [self._alarm(door_id, "key_taken_without_grant", slot, None, detail)]
        return []

    @staticmethod
    def _alarm(door_id: str, kind: str, slot: KeySlot, person: str | None, detail: str) -> Emit:
        payload = {"door": door_id, "alarm": kind, "slot": slot.index, "person": person, "detail": detail[:300]}
        return Emit("door.alarm", compact(payload))
