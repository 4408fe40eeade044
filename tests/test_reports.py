"""Registers, timelines and the muster list (controller/reports), on SQLite and PostgreSQL, from real signed events:
JST presets, every filter, keyset pages stable across inserts, names with kana, the correct-slot return fix,
muster ticks per stay, merged timelines, and "do the chains behind these rows verify"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from reports_fixtures import JST, T0, Site
from sqlalchemy import update

from sekisho.controller.doors.registers import DoorRegisters
from sekisho.controller.reports.filters import Filter, FilterError, preset_range
from sekisho.controller.reports.muster import MusterError
from sekisho.controller.reports.paging import CursorError, Ref
from sekisho.controller.reports.timelines import Subject
from sekisho.controller.reports.verify import ChainCheck
from sekisho.controller.store import Store
from sekisho.controller.store.models import Event
from sekisho.protocol.policy import SitePolicy

if TYPE_CHECKING:
    from store_fixtures import MakeAgent


@pytest.fixture
def site(store: Store, make_agent: MakeAgent) -> Site:
    return Site(store, make_agent)


def names(page_rows: list, column: str = "person") -> list[str | None]:  # type: ignore[type-arg]
    return [v.name if isinstance(v := r.values.get(column), Ref) else v for r in page_rows]


# --- presets ---------------------------------------------------------------------------------------


def test_presets_are_jst_calendar_periods_with_monday_weeks() -> None:
    # Sunday 22 November 2026, 23:30 JST is 14:30 UTC: still "this week" of Monday 16th.
    sunday_night = datetime(2026, 11, 22, 14, 30, tzinfo=UTC)
    since, until = preset_range("this_week", sunday_night)
    assert since.astimezone(JST) == datetime(2026, 11, 16, tzinfo=JST)
    assert until.astimezone(JST) == datetime(2026, 11, 23, tzinfo=JST)
    # Monday 00:10 JST is Sunday 15:10 UTC: a new week, and "today" is the Monday in JST, not Sunday in UTC.
    monday = datetime(2026, 11, 22, 15, 10, tzinfo=UTC)
    assert preset_range("this_week", monday)[0].astimezone(JST) == datetime(2026, 11, 23, tzinfo=JST)
    assert preset_range("today", monday)[0].astimezone(JST) == datetime(2026, 11, 23, tzinfo=JST)
    since, until = preset_range("this_month", datetime(2026, 12, 31, 16, 0, tzinfo=UTC))  # 1 Jan 01:00 JST
    assert (since.astimezone(JST).date().isoformat(), until.astimezone(JST).date().isoformat()) == (
        "2027-01-01",
        "2027-02-01",
    )
    with pytest.raises(FilterError):
        preset_range("yesterday", monday)
    with pytest.raises(FilterError):
        Filter(since=datetime(2026, 1, 1))  # naive: its zone would be a guess


# --- key register ------------------------------------------------------------------------------------


def test_correct_slot_return_by_colleague_is_not_wrong_slot_issue12(site: Site) -> None:
    """Regression (issue 12): a colleague returning a key to its own slot read "別スロットへ返却 / wrong slot 0"."""
    taken = site.take("p-0002", 0, "k-archive", T0 - timedelta(hours=2))
    # The agent flags wrong_slot whenever the returner is not the borrower; p-0001 holds no other key.
    site.give_back(0, "k-archive", T0 - timedelta(hours=1), person="p-0001", wrong_slot=True)
    # A real wrong slot: p-0001 holds the archive key and puts it into the server-rack key's slot.
    archive = site.take("p-0001", 0, "k-archive", T0)
    rack = site.take("p-0002", 2, "k-server-rack", T0 + timedelta(minutes=1))
    site.give_back(2, "k-server-rack", T0 + timedelta(minutes=30), person="p-0001", wrong_slot=True)
    site.project()
    registers = DoorRegisters(site.store)
    colleague = registers.loan(taken)
    assert colleague is not None and colleague.returned_at is not None and not colleague.wrong_slot
    assert colleague.returned_by == "p-0001" and colleague.returned_slot == 0
    wrong = registers.loan(rack)
    assert wrong is not None and wrong.wrong_slot and wrong.returned_by == "p-0001"
    assert registers.loan(archive).returned_at is None  # type: ignore[union-attr]

    rows = {r.key.id: r for r in site.reports.page("keys", Filter()).rows}
    note = str(rows[taken].values["note"])
    assert "代理返却" in note and "別スロット" not in note and "wrong slot" not in note
    assert "returned_by_colleague" in rows[taken].flags and "wrong_slot" not in rows[taken].flags
    assert "別スロットへ返却（スロット2）" in str(rows[rack].values["note"]) and "wrong_slot" in rows[rack].flags


def test_key_register_overdue_first_then_out_then_returned_with_names(site: Site) -> None:
    site.take("p-0001", 0, "k-archive", T0, hours=8)  # due 17:00
    site.take("p-0002", 2, "k-server-rack", T0 + timedelta(minutes=5), hours=2)  # due 11:05
    site.take("p-0002", 1, "k-cabinet-hr", T0 + timedelta(minutes=10), hours=1)
    site.give_back(1, "k-cabinet-hr", T0 + timedelta(minutes=40), person="p-0002")
    site.take("p-0001", 1, "k-cabinet-hr", T0 + timedelta(hours=1), hours=1)  # due 11:00: most overdue
    site.project()
    site.clock.now = T0 + timedelta(hours=3)  # 12:00
    page = site.reports.page("keys", Filter())
    states = [(r.values["key"].id, r.values["state"]) for r in page.rows]  # type: ignore[union-attr]
    assert states == [
        ("k-cabinet-hr", "延滞 / overdue"),
        ("k-server-rack", "延滞 / overdue"),
        ("k-archive", "貸出中 / out"),
        ("k-cabinet-hr", "返却済 / returned"),
    ]
    first = page.rows[0].values
    person = first["person"]
    assert isinstance(person, Ref) and (person.id, person.name, person.kana) == ("p-0001", "見本 太郎", "みほん たろう")
    assert first["department"] == "人事部" and first["key"].name == "人事 キャビネットの鍵"  # type: ignore[union-attr]
    assert first["cabinet"].name == "鍵管理ボックス"  # type: ignore[union-attr]
    assert page.verification.state == "verified" and page.verification.agents == ("door-hr-01",)
    # Person and department filters.
    assert {r.values["person"].id for r in site.reports.page("keys", Filter(person="p-0002")).rows} == {"p-0002"}  # type: ignore[union-attr]
    assert len(site.reports.page("keys", Filter(department="経理部")).rows) == 0
    assert len(site.reports.page("keys", Filter(department="人事部")).rows) == 4


# --- door log, logins, USB: every filter ----------------------------------------------------------------


def test_room_locker_login_and_usb_filters(site: Site) -> None:
    yesterday = T0 - timedelta(days=1)
    site.pass_door("p-0001", "entry", yesterday)
    site.pass_door("p-0001", "entry", T0)
    site.pass_door("p-0003", "entry", T0 + timedelta(minutes=1))
    site.deny("p-0004", T0 + timedelta(minutes=2))
    site.locker("p-0002", T0 + timedelta(minutes=3))
    site.pass_door("p-0006", "entry", T0 + timedelta(minutes=4), visitor=True, escort="p-0002")
    site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=5))
    site.login("p-0003", "shiken.jiro", T0 + timedelta(minutes=6), terminal="t-acc-01", granted=False)
    site.usb("usb.blocked", T0 + timedelta(minutes=7), person="p-0001")
    site.usb("usb.allowed", T0 + timedelta(minutes=8), person="p-0002", medium="m-0001")
    site.project()
    site.clock.now = T0 + timedelta(hours=1)
    today = Filter.for_period("today", site.clock.now)
    reports = site.reports

    rooms = reports.page("rooms", today).rows
    assert names(rooms) == [
        "来訪 五郎 (保守業者)",
        "仮名 三郎",
        "試験 次郎",
        "見本 太郎",
    ]  # newest first; not yesterday
    visit = rooms[0]
    assert visit.kind == "visit" and visit.values["escort"].name == "見本 花子"  # type: ignore[union-attr]
    assert visit.values["direction"] == "入室 / in" and visit.values["area"].name == "人事部 管理区域"  # type: ignore[union-attr]
    assert len(reports.page("rooms", Filter()).rows) == 5
    assert names(reports.page("rooms", today.narrowed(types=frozenset({"door.access_denied"}))).rows) == ["仮名 三郎"]
    assert names(reports.page("rooms", today.narrowed(department="経理部")).rows) == ["試験 次郎"]
    # The escort's filter finds the visit they escorted.
    assert names(reports.page("rooms", today.narrowed(person="p-0002")).rows) == ["来訪 五郎 (保守業者)"]
    assert names(reports.page("lockers", today).rows) == ["見本 花子"]
    assert names(reports.page("lockers", today.narrowed(door="locker-02")).rows) == []
    assert len(reports.page("rooms", today.narrowed(area="a-hr-desk")).rows) == 0

    logins = reports.page("logins", today).rows
    assert names(logins) == ["試験 次郎", "見本 太郎"]
    assert logins[0].values["terminal"].name == "経理 端末1" and "denied" in logins[0].flags  # type: ignore[union-attr]
    assert names(reports.page("logins", today.narrowed(terminal="t-hr-01")).rows) == ["見本 太郎"]
    assert names(reports.page("logins", today.narrowed(person="p-0003")).rows) == ["試験 次郎"]
    assert names(reports.page("logins", today.narrowed(agent="term-acc-01")).rows) == ["試験 次郎"]

    usb = reports.page("usb", today).rows
    assert names(usb) == ["見本 花子", "見本 太郎"]
    assert usb[0].values["medium"].name == "人事部 USBメモリ 1 (demo)"  # type: ignore[union-attr]
    assert names(reports.page("usb", today.narrowed(types=frozenset({"usb.blocked"}))).rows) == ["見本 太郎"]
    # Outside the period: nothing.
    tomorrow = Filter.for_period("today", site.clock.now + timedelta(days=1))
    assert reports.page("usb", tomorrow).rows == [] and reports.page("usb", tomorrow).verification.state == "empty"

    visits = reports.page("visits", today).rows
    assert names(visits, "visitor") == ["来訪 五郎 (保守業者)"] and visits[0].values["state"] == "在室中 / inside"


def test_keyset_pages_are_stable_across_inserts_and_bad_cursors_are_refused(site: Site) -> None:
    for i in range(7):
        site.pass_door("p-0001" if i % 2 else "p-0002", "entry", T0 + timedelta(minutes=10 * i))
    site.project()
    reports = site.reports
    first = reports.page("rooms", Filter(), limit=3)
    assert [r.key.at for r in first.rows] == [T0 + timedelta(minutes=m) for m in (60, 50, 40)]
    assert first.next_cursor is not None
    # Meanwhile: a newer event, and a late one that happened between the rows of page 1 and page 2.
    site.pass_door("p-0003", "entry", T0 + timedelta(hours=5))
    site.pass_door("p-0003", "exit", T0 + timedelta(minutes=35))
    site.project()
    second = reports.page("rooms", Filter(), cursor=first.next_cursor, limit=3)
    third = reports.page("rooms", Filter(), cursor=second.next_cursor, limit=3)
    assert third.next_cursor is None
    times = [r.key.at for r in second.rows + third.rows]
    assert times == [T0 + timedelta(minutes=m) for m in (35, 30, 20, 10, 0)]  # nothing repeated, nothing skipped
    for bad in ("", "not-a-cursor", "W10", "WzEsMCxudWxsLDAsMCxudWxsXQ", "x" * 500):
        with pytest.raises(CursorError):
            reports.page("rooms", Filter(), cursor=bad)
    with pytest.raises(ValueError):
        reports.page("rooms", Filter(), limit=0)
    with pytest.raises(LookupError):
        reports.page("no-such-register", Filter())


def test_key_register_pages_keep_their_as_of(site: Site) -> None:
    """Overdue is judged at the moment the first page was read, on every page of that reading."""
    for slot, key, minutes in ((0, "k-archive", 0), (1, "k-cabinet-hr", 1), (2, "k-server-rack", 2)):
        site.take("p-0002", slot, key, T0 + timedelta(minutes=minutes), hours=1)
    site.project()
    site.clock.now = T0 + timedelta(minutes=30)
    first = site.reports.page("keys", Filter(), limit=2)
    site.clock.now = T0 + timedelta(hours=5)  # all overdue now; the reading started before
    rest = site.reports.page("keys", Filter(), cursor=first.next_cursor, limit=2)
    assert [r.values["key"].id for r in first.rows + rest.rows] == ["k-server-rack", "k-cabinet-hr", "k-archive"]  # type: ignore[union-attr]
    assert {r.values["state"] for r in first.rows + rest.rows} == {"貸出中 / out"}


# --- muster list -------------------------------------------------------------------------------------------


def test_muster_list_with_safe_ticks_per_stay(site: Site) -> None:
    site.pass_door("p-0001", "entry", T0)
    site.pass_door("p-0003", "entry", T0 + timedelta(minutes=1))
    site.pass_door("p-0006", "entry", T0 + timedelta(minutes=2), visitor=True, escort="p-0002")
    site.project()
    reports = site.reports
    areas = {a.area.id: a for a in reports.muster()}
    assert set(areas) == {"a-hr-room", "a-hr-desk"} and areas["a-hr-desk"].lines == ()
    room = areas["a-hr-room"]
    assert [line.person.name for line in room.lines] == ["見本 太郎", "試験 次郎", "来訪 五郎 (保守業者)"]
    assert room.unconfirmed == 3 and room.lines[2].visitor and room.lines[2].escort.name == "見本 花子"  # type: ignore[union-attr]

    assert reports.mark_safe("a-hr-room", "p-0001", by="user:somu") == T0
    reports.mark_safe("a-hr-room", "p-0003", by="user:somu")
    room = reports.muster("a-hr-room")[0]
    assert [line.safe for line in room.lines] == [True, True, False] and room.lines[0].checked_by == "user:somu"
    with pytest.raises(MusterError):
        reports.mark_safe("a-hr-room", "p-0004", by="user:somu")  # not inside
    with pytest.raises(ValueError):
        reports.mark_safe("a-hr-room", "p-0003", by="123456789018")  # a valid My Number shape is refused

    # p-0001 leaves and comes back: the old tick does not cover the new stay.
    site.pass_door("p-0001", "exit", T0 + timedelta(minutes=10))
    site.pass_door("p-0001", "entry", T0 + timedelta(minutes=20))
    site.project()
    room = reports.muster("a-hr-room")[0]
    assert [(line.person.id, line.safe) for line in room.lines] == [
        ("p-0003", True),
        ("p-0006", False),
        ("p-0001", False),
    ]
    assert reports.clear_safe("a-hr-room") == 2
    assert reports.muster("a-hr-room")[0].unconfirmed == 3
    _, status = reports.muster_page("a-hr-room")
    assert status.state == "verified" and status.agents == ("door-hr-01",)


# --- timelines -----------------------------------------------------------------------------------------------


def test_person_timeline_merges_every_record_kind_by_time(site: Site) -> None:
    site.pass_door("p-0001", "entry", T0)
    site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=1))
    site.usb("usb.blocked", T0 + timedelta(minutes=2), person="p-0001")
    site.take("p-0001", 0, "k-archive", T0 + timedelta(minutes=3))
    site.locker("p-0001", T0 + timedelta(minutes=4))
    site.give_back(0, "k-archive", T0 + timedelta(minutes=5), person="p-0001")
    site.pass_door("p-0006", "entry", T0 + timedelta(minutes=6), visitor=True, escort="p-0001")
    site.pass_door("p-0002", "entry", T0 + timedelta(minutes=7))  # someone else
    site.project()
    site.store.record_admin("user:somu", "web", "127.0.0.1", "person.update", "person:p-0001", detail={"n": 1})
    reports = site.reports
    whole = reports.timeline(Subject("person", "p-0001"), Filter(), limit=50)
    kinds = [r.kind for r in whole.rows]
    assert kinds[1:] == ["visit", "key", "locker", "key", "usb", "login", "room"]
    assert kinds[0] == "admin" and "user:somu" in str(whole.rows[0].values["detail"])
    assert "見本 太郎" in whole.spec.ja and "人事部" in whole.spec.ja
    assert whole.verification.state == "verified"
    assert set(whole.verification.agents) == {"door-hr-01", "term-hr-01"}
    # Paged two at a time, the same rows in the same order.
    paged, cursor = [], None
    while True:
        page = reports.timeline(Subject("person", "p-0001"), Filter(), cursor=cursor, limit=2)
        paged += page.rows
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [r.key for r in paged] == [r.key for r in whole.rows]
    # Filtered by period and type.
    only_keys = reports.timeline(Subject("person", "p-0001"), Filter(types=frozenset({"key.taken"})), limit=50)
    assert [r.kind for r in only_keys.rows] == ["key"]
    door = reports.timeline(Subject("door", "keys-01"), Filter(), limit=50)
    assert [str(r.values["event"]).split(":")[0] for r in door.rows] == [
        "鍵の返却 / key returned",
        "鍵の貸出 / key taken",
    ]
    terminal = reports.timeline(Subject("terminal", "t-hr-01"), Filter(), limit=50)
    assert [r.kind for r in terminal.rows] == ["usb", "login"]
    area = reports.timeline(Subject("area", "a-hr-room"), Filter.for_period("today", T0), limit=50)
    assert len(area.rows) == 6  # 3 room grants, the locker, key taken and returned


# --- verification ------------------------------------------------------------------------------------------------


def test_pages_say_whether_the_chains_behind_the_rows_verify(site: Site) -> None:
    site.pass_door("p-0001", "entry", T0)
    site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=1))
    site.project()
    reports = site.reports
    assert reports.page("rooms", Filter()).verification.state == "verified"
    assert reports.page("media", Filter()).verification.state == "not_chained"
    # Someone edits a stored login event in the database.
    with site.store.engine.begin() as conn:
        conn.execute(update(Event).where(Event.type == "login.granted").values(payload={"terminal": "t-hr-01"}))
    status = ChainCheck(site.store).check(["term-hr-01"], full=True)
    assert status.state == "broken" and "term-hr-01" in status.problems[0] and not status.ok
    assert "検証失敗" in status.text("ja") and "NOT VERIFIED" in status.text("en")
    assert reports.reading("logins", Filter()).verification.state == "broken"  # exports always walk in full
    # The door chain is untouched.
    assert reports.page("rooms", Filter()).verification.state == "verified"


def test_kana_stays_out_of_agent_bundles() -> None:
    from pathlib import Path

    from sekisho.controller.policy.loader import parse_policy

    policy: SitePolicy = parse_policy((Path(__file__).resolve().parents[1] / "deploy/demo/site.yaml").read_text())
    assert policy.people[0].kana == "みほん たろう"
    bundle = policy.for_agent("door-hr-01")
    assert bundle["people"] and all("kana" not in p for p in bundle["people"])
    assert all("kana" not in p for p in SitePolicy(site=policy.site, people=[]).model_dump()["people"])
    stored = policy.model_dump(mode="json")
    assert stored["people"][0]["kana"] == "みほん たろう"
    assert SitePolicy.model_validate(stored).people[0].kana == "みほん たろう"
