"""Door registers projected from stored, signed events, on SQLite and PostgreSQL: key loans (taken, returned,
overdue, wrong slot, return without loan), who is inside (late events judged by when they happened), visits
with escorts, the locker log, idempotent re-projection and rebuild, and the cursor never skipping an
uncommitted event."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, insert, select, text, update

from sekisho.common.i18n import localize
from sekisho.controller.doors.apply import UNREADABLE_EVENT
from sekisho.controller.doors.jobs import DoorRegisterKeeper
from sekisho.controller.doors.projector import REGISTER_TABLES, DoorProjector
from sekisho.controller.doors.registers import DoorRegisters, loan_state
from sekisho.controller.policy.loader import parse_policy
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store import Store
from sekisho.controller.store.models import Base, Event, ProjectionCursor
from sekisho.protocol import signing, timefmt

if TYPE_CHECKING:
    from store_fixtures import FakeAgent, MakeAgent

JST = ZoneInfo("Asia/Tokyo")
DEMO = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
# Synthetic times: a Tuesday morning at the demo site.
T0 = datetime(2026, 11, 17, 9, 0, tzinfo=JST)
# A back door into the same controlled room, on its own agent: events of one area from two agents.
BACK_DOOR = """  - id: room-hr-2
    name: 人事部 管理区域 裏口
    kind: room
    agent: door-hr-02
    area: a-hr-room
    allowed: [p-0001, p-0002, p-0006]
    readers: [{id: rdr-hr2-in, direction: entry}, {id: rdr-hr2-out, direction: exit}]
"""


def site_yaml(agents: dict[str, str] | None = None) -> str:
    """Return the demo site with the back door (door agents optionally renamed)."""
    text_ = DEMO.read_text(encoding="utf-8").replace("\nkey_cabinets:", "\n" + BACK_DOOR + "\nkey_cabinets:", 1)
    for old, new in (agents or {}).items():
        text_ = text_.replace(f"agent: {old}", f"agent: {new}")
    return text_


class Doors:
    """The demo site's two door agents, signing real events into a store, and the projection over it."""

    def __init__(self, store: Store, make_agent: MakeAgent) -> None:
        self.store = store
        PolicyService(store, signing.generate_key()).apply(
            parse_policy(site_yaml()), source_sha256="0" * 64, created_by="test"
        )
        self.front = make_agent(store, agent_id="door-hr-01")
        self.back = make_agent(store, agent_id="door-hr-02")
        self._seqs: dict[str, int] = defaultdict(int)
        # A small batch so that every test also crosses batch boundaries.
        self.projector = DoorProjector(store, batch=3)
        self.registers = DoorRegisters(store)

    def send(self, type_: str, payload: dict[str, Any], at: datetime, agent: FakeAgent | None = None) -> int:
        """Sign and store one event as the agent would send it; return its events.id."""
        agent = agent or self.front
        self._seqs[agent.agent_id] += 1
        event = agent.event(self._seqs[agent.agent_id], type=type_, payload=payload, at=at)
        result = self.store.store_batch([event])
        assert result.stored == [(agent.agent_id, event.seq)]
        with self.store.engine.connect() as conn:
            return int(conn.execute(select(Event.id).where(Event.event_id == event.id)).scalar_one())

    def pass_door(self, person: str, direction: str, at: datetime, door: str = "room-hr", **extra: Any) -> int:
        """Record a grant at a room reader (entry or exit), as the door agent emits one per person passing."""
        agent = self.back if door == "room-hr-2" else self.front
        payload = {
            "door": door,
            "person": person,
            "card_masked": "****-00" + person[-2:],
            "rule": f"doors.{door}.allowed",
            "direction": direction,
            "reader": f"rdr-{'hr2' if door == 'room-hr-2' else 'hr'}-{'in' if direction == 'entry' else 'out'}",
            **extra,
        }
        return self.send("door.access_granted", payload, at, agent)

    def take(self, person: str, slot: int, key: str, at: datetime, hours: int = 8) -> int:
        """Record a key leaving its cabinet slot."""
        due = timefmt.fmt(at + timedelta(hours=hours))
        return self.send(
            "key.taken", {"door": "keys-01", "slot": slot, "key": key, "person": person, "due_at": due}, at
        )

    def give_back(self, slot: int, key: str, at: datetime, person: str | None = None, wrong_slot: bool = False) -> int:
        """Record a key coming back into a cabinet slot."""
        payload = {"door": "keys-01", "slot": slot, "key": key, "person": person, "wrong_slot": wrong_slot}
        return self.send("key.returned", payload, at)

    def inside(self, area: str = "a-hr-room") -> dict[str, datetime | None]:
        """Return person → entered_at of everyone inside an area now (after projecting)."""
        self.projector.run()
        return {row.person: row.entered_at for row in self.registers.inside(area)}

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """Return every register row, in primary-key order, to compare two projections."""
        with self.store.engine.connect() as conn:
            return {
                table.name: [dict(row._mapping) for row in conn.execute(select(table).order_by(*table.primary_key))]
                for table in REGISTER_TABLES
            }


@pytest.fixture
def doors(store: Store, make_agent: MakeAgent) -> Doors:
    return Doors(store, make_agent)


# --- key-lending register --------------------------------------------------------------------------


def test_key_loan_taken_returned_and_overdue_raised_once(doors: Doors) -> None:
    taken_id = doors.take("p-0001", 0, "k-archive", T0, hours=8)
    assert doors.projector.run() == 1
    [loan] = doors.registers.loans(open_=True)
    assert loan.id == taken_id and (loan.cabinet, loan.slot, loan.key, loan.person) == (
        "keys-01",
        0,
        "k-archive",
        "p-0001",
    )
    assert loan.taken_at == T0 and loan.due_at == T0 + timedelta(hours=8) and loan.agent_id == "door-hr-01"
    assert loan_state(loan, T0 + timedelta(hours=1)) == "open"

    assert doors.registers.check_overdue(T0 + timedelta(hours=7)) == []
    [finding_id] = doors.registers.check_overdue(T0 + timedelta(hours=9))
    assert doors.registers.check_overdue(T0 + timedelta(hours=10)) == []
    [finding] = doors.store.list_findings(kind="key_loan_overdue")
    assert finding.id == finding_id and finding.agent_id == "door-hr-01" and finding.resolved_at is None
    assert finding.detail["loan"] == taken_id and finding.detail["key"] == "k-archive"
    assert finding.detail["person"] == "p-0001"
    assert [r.id for r in doors.registers.loans(overdue=True, now=T0 + timedelta(hours=9))] == [taken_id]

    returned_id = doors.give_back(0, "k-archive", T0 + timedelta(hours=10), person="p-0001")
    doors.projector.run()
    loan = doors.registers.loan(taken_id)  # type: ignore[assignment]
    assert loan is not None and loan.returned_at == T0 + timedelta(hours=10) and loan.returned_by == "p-0001"
    assert loan.returned_slot == 0 and not loan.wrong_slot and not loan.return_only
    assert loan_state(loan, T0 + timedelta(hours=11)) == "returned" and returned_id > taken_id
    assert doors.registers.loans(open_=True) == [] and [r.id for r in doors.registers.loans(open_=False)] == [taken_id]
    [finding] = doors.store.list_findings(kind="key_loan_overdue")
    assert finding.resolved_at is not None and "returned" in (finding.resolution or "")
    assert "p-0001" in (finding.resolution or "")


def test_wrong_slot_closes_the_loan_of_that_slots_key(doors: Doors) -> None:
    archive = doors.take("p-0001", 0, "k-archive", T0)
    rack = doors.take("p-0002", 2, "k-server-rack", T0 + timedelta(minutes=1), hours=2)
    # p-0001 puts the archive key into slot 2: the slot of the server-rack key is full again.
    doors.give_back(2, "k-archive", T0 + timedelta(minutes=30), person="p-0001", wrong_slot=True)
    doors.projector.run()
    closed = doors.registers.loan(rack)
    assert closed is not None and closed.wrong_slot and closed.returned_by == "p-0001" and closed.returned_slot == 2
    assert closed.returned_at == T0 + timedelta(minutes=30)
    still_out = doors.registers.loan(archive)
    assert still_out is not None and still_out.returned_at is None and not still_out.wrong_slot
    assert [r.id for r in doors.registers.loans(open_=True)] == [archive]


def test_return_without_loan_is_flagged_and_a_late_taking_completes_it(doors: Doors) -> None:
    lone = doors.give_back(1, "k-cabinet-hr", T0 + timedelta(hours=2), person="p-0002")
    doors.projector.run()
    [row] = doors.registers.loans()
    assert row.id == lone and row.return_only and row.person is None and row.taken_at is None
    assert loan_state(row, T0 + timedelta(hours=3)) == "return_only"
    assert doors.registers.loans(open_=True) == [] and doors.registers.check_overdue(T0 + timedelta(days=2)) == []

    # The cabinet was offline when the key was taken: the taking arrives after its return.
    doors.take("p-0002", 1, "k-cabinet-hr", T0)
    doors.projector.run()
    [row] = doors.registers.loans()
    assert row.id == lone and not row.return_only and row.person == "p-0002" and row.taken_at == T0
    assert row.returned_at == T0 + timedelta(hours=2) and loan_state(row, T0 + timedelta(hours=3)) == "returned"


# --- who is inside, visits, the door log -----------------------------------------------------------


def test_presence_by_occurred_time_with_a_late_exit_ignored(doors: Doors) -> None:
    doors.pass_door("p-0001", "entry", T0)
    doors.pass_door("p-0002", "entry", T0 + timedelta(minutes=1), area="a-hr-room")
    assert doors.inside() == {"p-0001": T0, "p-0002": T0 + timedelta(minutes=1)}
    doors.pass_door("p-0001", "exit", T0 + timedelta(hours=1))
    assert set(doors.inside()) == {"p-0002"}
    # p-0001 comes back through the back door; then the front door agent, offline until now, delivers
    # an exit from before that entry. It happened, but it does not take p-0001 out.
    doors.pass_door("p-0001", "entry", T0 + timedelta(hours=3), door="room-hr-2")
    late_exit = doors.pass_door("p-0001", "exit", T0 + timedelta(hours=2))
    assert doors.inside() == {"p-0001": T0 + timedelta(hours=3), "p-0002": T0 + timedelta(minutes=1)}
    [via] = [row.door for row in doors.registers.inside() if row.person == "p-0001"]
    assert via == "room-hr-2"
    exits = [row for row in doors.registers.log(person="p-0001") if row.direction == "exit"]
    assert late_exit in [row.id for row in exits]
    # The same the other way round: an entry older than the exit on record does not bring p-0002 back in.
    doors.pass_door("p-0002", "exit", T0 + timedelta(hours=5))
    doors.pass_door("p-0002", "entry", T0 + timedelta(hours=4), door="room-hr-2")
    assert set(doors.inside()) == {"p-0001"}
    assert doors.inside("a-hr-desk") == {}


def test_a_two_person_grant_moves_both_people(doors: Doors) -> None:
    doors.pass_door("p-0002", "entry", T0, second_person="p-0001")
    assert doors.inside() == {"p-0001": T0, "p-0002": T0}
    # Should the agent also record the other person's own passage, it changes nothing that matters.
    doors.pass_door("p-0001", "entry", T0 + timedelta(seconds=1))
    assert set(doors.inside()) == {"p-0001", "p-0002"}
    doors.pass_door("p-0001", "exit", T0 + timedelta(hours=1), second_person="p-0002")
    assert doors.inside() == {}


def test_lockers_and_cabinets_change_no_presence_and_the_locker_log_filters(doors: Doors) -> None:
    doors.send(
        "door.access_granted",
        {"door": "locker-01", "person": "p-0003", "card_masked": "****-0003", "rule": "r", "direction": "both"},
        T0,
    )
    doors.send(
        "door.access_granted",
        {"door": "keys-01", "person": "p-0002", "card_masked": "****-0002", "rule": "r", "direction": "entry"},
        T0 + timedelta(seconds=5),
    )
    doors.send("door.opened", {"door": "locker-01", "person": "p-0003"}, T0 + timedelta(seconds=2))
    doors.send("door.closed", {"door": "locker-01", "open_seconds": 40}, T0 + timedelta(seconds=42))
    doors.send("door.alarm", {"door": "locker-01", "alarm": "held_open"}, T0 + timedelta(seconds=33))
    doors.send("door.locked", {"door": "locker-01", "cause": "closed"}, T0 + timedelta(seconds=43))
    doors.send(
        "door.access_denied",
        {"door": "locker-02", "reason": "two_person_timeout", "person": "p-0001", "card_masked": "****-0001"},
        T0 + timedelta(minutes=1),
    )
    doors.send("door.opened", {"door": "room-hr", "forced": True}, T0 + timedelta(minutes=2))
    doors.send(
        "door.mode_changed",
        {"door": "room-hr", "mode": "lockdown", "previous": "normal", "command_id": "a" * 32},
        T0 + timedelta(minutes=3),
    )
    doors.send(
        "door.unlocked",
        {"door": "room-hr", "cause": "remote", "command_id": "b" * 32, "requested_by": "p-0002"},
        T0 + timedelta(minutes=4),
    )
    assert doors.inside() == {}

    lockers = doors.registers.log(kind="locker")
    assert [(r.door, r.type, r.reason) for r in lockers] == [
        ("locker-01", "door.access_granted", "r"),
        ("locker-01", "door.opened", None),
        ("locker-01", "door.closed", None),
        ("locker-01", "door.alarm", "held_open"),
        ("locker-02", "door.access_denied", "two_person_timeout"),
    ]
    assert all(r.area == "a-hr-room" for r in lockers) and lockers[2].detail == "open_seconds: 40"
    room = doors.registers.log(door="room-hr")
    assert [(r.type, r.reason, r.person) for r in room] == [
        ("door.opened", "forced", None),
        ("door.mode_changed", "lockdown", None),
        ("door.unlocked", "remote", "p-0002"),
    ]
    assert [r.door_kind for r in doors.registers.log(kind="key_cabinet")] == ["key_cabinet"]
    # door.locked is not a line of the log; since/until bound the time it happened.
    assert all(r.type != "door.locked" for r in doors.registers.log())
    window = doors.registers.log(since=T0 + timedelta(seconds=30), until=T0 + timedelta(minutes=2))
    assert [r.type for r in window] == ["door.closed", "door.alarm", "door.access_denied"]
    with pytest.raises(ValueError, match="since: 時刻にはタイムゾーンが必要です") as naive:  # tests run in ja
        doors.registers.log(since=datetime(2026, 12, 1))  # naive on purpose
    assert localize(naive.value, "en") == "since needs a time zone (e.g. +09:00)"


def test_visitor_with_escort_in_the_visitor_log(doors: Doors) -> None:
    doors.pass_door("p-0002", "entry", T0)
    first = doors.pass_door("p-0006", "entry", T0 + timedelta(seconds=8), visitor=True, escort="p-0002")
    doors.projector.run()
    [visit] = doors.registers.visits(open_=True)
    assert (visit.id, visit.visitor, visit.escort, visit.area) == (first, "p-0006", "p-0002", "a-hr-room")
    assert visit.entered_at == T0 + timedelta(seconds=8) and visit.exited_at is None and visit.doors == ["room-hr"]
    presence = {row.person: row for row in doors.registers.inside()}
    assert presence["p-0006"].visitor and presence["p-0006"].escort == "p-0002" and not presence["p-0002"].visitor
    [line] = doors.registers.log(person="p-0006")
    assert line.visitor and line.escort == "p-0002"

    doors.pass_door("p-0006", "exit", T0 + timedelta(hours=1), door="room-hr-2")
    doors.pass_door("p-0002", "exit", T0 + timedelta(hours=1, seconds=3), door="room-hr-2")
    doors.projector.run()
    assert doors.registers.visits(open_=True) == [] and doors.inside() == {}
    [visit] = doors.registers.visits(open_=False)
    assert visit.exited_at == T0 + timedelta(hours=1) and visit.doors == ["room-hr", "room-hr-2"]

    # The policy names p-0006 a visitor: a grant without the flag is still a visit (here unescorted).
    second = doors.pass_door("p-0006", "entry", T0 + timedelta(hours=2))
    doors.projector.run()
    [again] = doors.registers.visits(open_=True)
    assert again.id == second and again.escort is None
    assert [v.id for v in doors.registers.visits(since=T0 + timedelta(hours=1, minutes=30))] == [second]
    assert [v.id for v in doors.registers.visits(since=T0)] == [first, second]


def test_a_visitors_exit_that_arrives_before_the_entry_makes_one_visit(doors: Doors) -> None:
    exit_id = doors.pass_door("p-0006", "exit", T0 + timedelta(hours=1), visitor=True)
    doors.projector.run()
    [visit] = doors.registers.visits()
    assert visit.id == exit_id and visit.entered_at is None and visit.exited_at == T0 + timedelta(hours=1)
    doors.pass_door("p-0006", "entry", T0, visitor=True, escort="p-0001")
    doors.projector.run()
    [visit] = doors.registers.visits()
    assert visit.entered_at == T0 and visit.escort == "p-0001" and visit.doors == ["room-hr", "room-hr"]


# --- projection: idempotent, rebuildable, never skipping ------------------------------------------


def scenario(doors: Doors) -> None:
    """A morning of the demo site: keys, entries, a visitor, a late exit, lockers and noise."""
    doors.take("p-0001", 0, "k-archive", T0, hours=1)
    doors.pass_door("p-0001", "entry", T0 + timedelta(minutes=1))
    doors.pass_door("p-0002", "entry", T0 + timedelta(minutes=2))
    doors.pass_door("p-0006", "entry", T0 + timedelta(minutes=2, seconds=5), visitor=True, escort="p-0002")
    doors.send("test.synthetic", {"n": 1}, T0 + timedelta(minutes=3))
    doors.take("p-0002", 2, "k-server-rack", T0 + timedelta(minutes=4))
    doors.give_back(2, "k-archive", T0 + timedelta(minutes=5), person="p-0001", wrong_slot=True)
    doors.give_back(1, "k-cabinet-hr", T0 + timedelta(minutes=6))
    doors.pass_door("p-0001", "exit", T0 + timedelta(minutes=7), door="room-hr-2")
    doors.pass_door("p-0001", "entry", T0 + timedelta(minutes=9), door="room-hr-2")
    doors.pass_door("p-0001", "exit", T0 + timedelta(minutes=8))
    doors.pass_door("p-0006", "exit", T0 + timedelta(minutes=30))
    doors.send("door.alarm", {"door": "locker-02", "alarm": "tamper"}, T0 + timedelta(minutes=31))


def test_reprojection_changes_nothing_and_rebuild_gives_identical_tables(doors: Doors) -> None:
    scenario(doors)
    assert doors.projector.run() == 12
    [finding_id] = doors.registers.check_overdue(T0 + timedelta(hours=2))
    before = doors.tables()
    assert len(before["key_loans"]) == 3 and len(before["visits"]) == 1 and len(before["door_log"]) == 8
    assert any(loan["overdue_finding_id"] == finding_id for loan in before["key_loans"])
    last_id = doors.store.list_events(limit=1000)[-1].id
    assert doors.projector.position() == last_id

    # Every event applied a second time (as after a crash between apply and cursor): nothing changes.
    with doors.store.engine.begin() as conn:
        conn.execute(update(ProjectionCursor).values(position=0))
    assert doors.projector.run() == 12
    assert doors.tables() == before and doors.projector.position() == last_id
    assert doors.projector.run() == 0

    assert doors.projector.rebuild() == 12
    assert doors.tables() == before and doors.projector.position() == last_id
    # Re-running the overdue check after the rebuild raises nothing new: the loan still points at its finding.
    assert doors.registers.check_overdue(T0 + timedelta(hours=3)) == []
    assert len(doors.store.list_findings(kind="key_loan_overdue")) == 1


def test_keeper_projects_and_checks_overdue(doors: Doors) -> None:
    doors.take("p-0001", 0, "k-archive", timefmt.now() - timedelta(hours=3), hours=1)
    keeper = DoorRegisterKeeper(doors.projector, doors.registers, overdue_every_s=3600)
    keeper.run_once()
    assert len(doors.registers.loans(overdue=True)) == 1
    [finding] = doors.store.list_findings(open_only=True, kind="key_loan_overdue")
    assert finding.agent_id == "door-hr-01"


def test_a_stored_payload_its_model_refuses_is_a_finding_and_the_projection_goes_on(doors: Doors) -> None:
    edited = doors.pass_door("p-0001", "entry", T0)
    # The stored row is edited behind ingest's back (the signed raw event is untouched): no person any more.
    with doors.store.engine.begin() as conn:
        conn.execute(
            update(Event).where(Event.id == edited).values(payload={"door": "room-hr", "card_masked": "x", "rule": "r"})
        )
    last = doors.pass_door("p-0002", "entry", T0 + timedelta(minutes=1))
    assert doors.projector.run() == 2
    assert doors.projector.position() == last
    assert set(doors.inside()) == {"p-0002"}
    assert [row.person for row in doors.registers.log()] == ["p-0002"]
    [finding] = doors.store.list_findings(open_only=True, kind=UNREADABLE_EVENT)
    assert (finding.agent_id, finding.first_seq, finding.last_seq) == ("door-hr-01", 1, 1)
    assert finding.detail["event"] == edited and finding.detail["type"] == "door.access_granted"
    assert finding.detail["error"] == "person: Field required"
    # Projecting it again (a rebuild) raises no second finding for the same event.
    assert doors.projector.rebuild() == 2
    assert len(doors.store.list_findings(kind=UNREADABLE_EVENT)) == 1


def _waits_for_events_lock(engine: Engine) -> bool:
    """Tell whether some session is waiting for a lock on the events table (PostgreSQL)."""
    with engine.connect() as conn:
        waiting = conn.execute(
            text("SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass AND NOT granted")
        ).scalar()
    return bool(waiting)


def test_projection_waits_for_an_uncommitted_event_with_a_lower_id(doors: Doors) -> None:
    if doors.store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite writers take turns: a lower id can never commit after a higher one")
    engine = doors.store.engine
    slow = engine.connect()
    slow_tx = slow.begin()
    # An ingest transaction that drew its id first and commits last.
    slow.execute(
        insert(Event).values(
            agent_id="door-hr-02",
            seq=1,
            event_id="f" * 32,
            type="door.access_granted",
            occurred_at=T0,
            received_at=T0,
            stored_at=T0,
            clock_synced=True,
            payload={"door": "room-hr-2", "person": "p-0001", "card_masked": "x", "rule": "r", "direction": "entry"},
            raw="{}",
            chain_index=1,
            prev_hash="0" * 64,
            hash="1" * 64,
        )
    )
    try:
        doors.pass_door("p-0002", "entry", T0 + timedelta(minutes=1))
        done = threading.Event()
        worker = threading.Thread(target=lambda: (doors.projector.run(), done.set()))
        worker.start()
        # The projection is seen waiting for the ingest transaction's lock on events (not merely slow)...
        deadline = time.monotonic() + 4  # within the projector's lock_timeout_s (5 s)
        while not _waits_for_events_lock(engine):
            assert not done.is_set(), "the projection moved past an id that was not committed yet"
            assert time.monotonic() < deadline, "the projection never waited for the uncommitted event"
            time.sleep(0.02)
        assert not done.is_set()  # ...and has not finished meanwhile
        slow_tx.commit()
    finally:
        slow.close()
    worker.join(10)
    assert done.is_set()
    assert doors.inside() == {"p-0001": T0, "p-0002": T0 + timedelta(minutes=1)}


def test_migration_0003_matches_the_models(store: Store) -> None:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert conn.execute(text("SELECT position FROM projection_cursors WHERE name = 'doors'")).scalar() == 0
