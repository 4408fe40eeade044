"""A demo site that signs real events into a store and projects them, for the register and export tests."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import select

from sekisho.controller.doors.projector import DoorProjector
from sekisho.controller.policy.loader import parse_policy
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.reports.service import Reports
from sekisho.controller.store import Store
from sekisho.controller.store.models import Event
from sekisho.protocol import signing, timefmt

if TYPE_CHECKING:
    from store_fixtures import FakeAgent, MakeAgent

JST = ZoneInfo("Asia/Tokyo")
DEMO = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
# Synthetic times: Tuesday 17 November 2026, 09:00 JST at the demo site.
T0 = datetime(2026, 11, 17, 9, 0, tzinfo=JST)


class Clock:
    """A clock the test sets (no wall clock in these tests)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Site:
    """The demo site's door agent and two terminals, signing real events into a store, and the reports over it."""

    def __init__(self, store: Store, make_agent: MakeAgent) -> None:
        self.store = store
        PolicyService(store, signing.generate_key()).apply(
            parse_policy(DEMO.read_text(encoding="utf-8")), source_sha256="0" * 64, created_by="test"
        )
        self.door = make_agent(store, agent_id="door-hr-01")
        self.term = make_agent(store, agent_id="term-hr-01")
        self.acc = make_agent(store, agent_id="term-acc-01")
        self._seqs: dict[str, int] = defaultdict(int)
        self.projector = DoorProjector(store)
        self.clock = Clock(T0 + timedelta(hours=12))
        self.reports = Reports(store, clock=self.clock)

    def send(self, type_: str, payload: dict[str, Any], at: datetime, agent: FakeAgent | None = None) -> int:
        """Sign and store one event as the agent would send it; return its events.id."""
        agent = agent or self.door
        self._seqs[agent.agent_id] += 1
        event = agent.event(self._seqs[agent.agent_id], type=type_, payload=payload, at=at)
        result = self.store.store_batch([event])
        assert result.stored == [(agent.agent_id, event.seq)]
        with self.store.engine.connect() as conn:
            return int(conn.execute(select(Event.id).where(Event.event_id == event.id)).scalar_one())

    def pass_door(self, person: str, direction: str, at: datetime, **extra: Any) -> int:
        """A grant at the controlled room's entry or exit reader."""
        payload = {
            "door": "room-hr",
            "person": person,
            "card_masked": "****-00" + person[-2:],
            "rule": "doors.room-hr.allowed",
            "direction": direction,
            "reader": "rdr-hr-in" if direction == "entry" else "rdr-hr-out",
            **extra,
        }
        return self.send("door.access_granted", payload, at)

    def deny(self, person: str | None, at: datetime, door: str = "room-hr") -> int:
        """A refusal at a door."""
        payload = {"door": door, "reason": "not_allowed", "card_masked": "****-0099", "person": person}
        return self.send("door.access_denied", {k: v for k, v in payload.items() if v is not None}, at)

    def locker(self, person: str, at: datetime, locker: str = "locker-01") -> int:
        """A grant at a locker."""
        payload = {"door": locker, "person": person, "card_masked": "****-0001", "rule": "r", "direction": "both"}
        return self.send("door.access_granted", payload, at)

    def take(self, person: str, slot: int, key: str, at: datetime, hours: int = 8) -> int:
        """A key leaving its cabinet slot."""
        due = timefmt.fmt(at + timedelta(hours=hours))
        payload = {"door": "keys-01", "slot": slot, "key": key, "person": person, "due_at": due}
        return self.send("key.taken", payload, at)

    def give_back(self, slot: int, key: str, at: datetime, person: str | None = None, wrong_slot: bool = False) -> int:
        """A key coming back into a cabinet slot (wrong_slot as the agent sets it: returner ≠ borrower)."""
        payload = {"door": "keys-01", "slot": slot, "key": key, "person": person, "wrong_slot": wrong_slot}
        return self.send("key.returned", payload, at)

    def login(self, person: str, user: str, at: datetime, terminal: str = "t-hr-01", granted: bool = True) -> int:
        """A login decision at a terminal."""
        agent = self.term if terminal == "t-hr-01" else self.acc
        if granted:
            payload: dict[str, Any] = {"terminal": terminal, "person": person, "user": user, "methods": ["card"]}
            return self.send("login.granted", payload, at, agent)
        payload = {"terminal": terminal, "user": user, "reason": "not_designated", "person": person}
        return self.send("login.denied", payload, at, agent)

    def usb(self, type_: str, at: datetime, person: str | None = None, **extra: Any) -> int:
        """A USB event at the HR terminal."""
        payload: dict[str, Any] = {"terminal": "t-hr-01", "vendor_product": "0781:5581", "device_hash": "ab" * 16}
        if person:
            payload["person"] = person
        if type_ == "usb.blocked":
            payload.setdefault("reason", "not_registered")
        if type_ == "usb.allowed":
            payload.setdefault("rule", "medium m-0001")
        payload.update(extra)
        return self.send(type_, payload, at, self.term)

    def project(self) -> None:
        """Bring the door registers up to date."""
        self.projector.run()
