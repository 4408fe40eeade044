"""The escalation planner: who is on duty (JST business hours, closures, Japanese holidays) and chain timing."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import jpholiday
import pytest

from sekisho.controller.alerts.plan import (
    JST,
    Position,
    Shift,
    due_at,
    duty_shift,
    first_position,
    next_due_at,
    next_position,
    on_duty,
    positions_due,
    recipients,
    retrigger_at,
)
from sekisho.protocol.alert_policy import AlertSettings, Escalation, Step
from sekisho.protocol.policy import Schedule, SitePolicy

NEW_YORK = ZoneInfo("America/New_York")

SCHEDULES: dict[str, Any] = {
    "office": {
        "id": "office",
        "name": "平日日中",
        "weekdays": ["mon", "tue", "wed", "thu", "fri"],
        "start": "09:00",
        "end": "18:00",
        # Tue 2026-12-29 and Thu 2026-12-31: year-end closure, neither a public holiday.
        "exception_days": ["2026-12-29", "2026-12-31"],
    },
    "office-holidays": {
        "id": "office-holidays",
        "name": "祝日も営業",
        "weekdays": ["mon", "tue", "wed", "thu", "fri"],
        "start": "09:00",
        "end": "18:00",
        "on_public_holidays": True,
        # Tue 2026-11-03 文化の日: a holiday the site works in general, closed this year.
        "exception_days": ["2026-11-03"],
    },
}

ALERTS: dict[str, Any] = {
    "contacts": [
        {"id": "guard-desk", "name": "警備室", "email": "guard@example.invalid"},
        {"id": "night-guard", "name": "夜間警備", "email": "night@example.invalid"},
        {"id": "holiday-duty", "name": "休日当番", "email": "holiday@example.invalid"},
        {"id": "sec-lead", "name": "セキュリティ責任者", "email": "lead@example.invalid"},
        {"id": "soc", "name": "SOC", "webhook": "soc"},
    ],
    "rosters": [
        {
            "id": "duty",
            "hours": "office",
            "business": ["guard-desk", "sec-lead"],
            "after_hours": ["night-guard"],
            "holiday": ["holiday-duty"],
        },
        # No holiday contacts: holidays fall back to after_hours.
        {"id": "plain", "hours": "office", "business": ["guard-desk"], "after_hours": ["night-guard"]},
        {
            "id": "works-holidays",
            "hours": "office-holidays",
            "business": ["guard-desk"],
            "after_hours": ["night-guard"],
            "holiday": ["holiday-duty"],
        },
    ],
}

SETTINGS = AlertSettings.model_validate(ALERTS)
SCHEDULE_MAP = {sid: Schedule.model_validate(doc) for sid, doc in SCHEDULES.items()}


def jst(year: int, month: int, day: int, hour: int, minute: int, second: int = 0, micro: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=JST)


def test_the_holidays_used_here_are_real_japanese_holidays() -> None:
    """The table below relies on these days being (or not being) public holidays; say so if jpholiday disagrees."""
    assert jpholiday.is_holiday_name(date(2026, 11, 23)) == "勤労感謝の日"
    assert jpholiday.is_holiday_name(date(2027, 1, 1)) == "元日"
    assert jpholiday.is_holiday_name(date(2026, 5, 6)) == "憲法記念日 振替休日"
    assert jpholiday.is_holiday_name(date(2026, 9, 22)) == "国民の休日"
    assert jpholiday.is_holiday_name(date(2026, 11, 3)) == "文化の日"
    for workday in (date(2026, 11, 24), date(2026, 12, 29), date(2026, 12, 31), date(2026, 11, 22)):
        assert not jpholiday.is_holiday(workday)


DUTY_CASES: list[tuple[str, str, datetime, Shift, list[str]]] = [
    # (case, roster, moment, shift, contact ids)
    ("weekday inside hours", "duty", jst(2026, 11, 24, 10, 0), "business", ["guard-desk", "sec-lead"]),
    ("exactly start is inside", "duty", jst(2026, 11, 24, 9, 0), "business", ["guard-desk", "sec-lead"]),
    ("just before start", "duty", jst(2026, 11, 24, 8, 59, 59, 999999), "after_hours", ["night-guard"]),
    ("just before end", "duty", jst(2026, 11, 24, 17, 59, 59, 999999), "business", ["guard-desk", "sec-lead"]),
    ("exactly end is outside", "duty", jst(2026, 11, 24, 18, 0), "after_hours", ["night-guard"]),
    ("weekday night", "duty", jst(2026, 11, 24, 23, 0), "after_hours", ["night-guard"]),
    ("saturday daytime", "duty", jst(2026, 11, 28, 10, 0), "after_hours", ["night-guard"]),
    ("sunday daytime", "duty", jst(2026, 11, 29, 10, 0), "after_hours", ["night-guard"]),
    ("closure day in exception_days", "duty", jst(2026, 12, 29, 10, 0), "after_hours", ["night-guard"]),
    ("second closure day", "duty", jst(2026, 12, 31, 12, 0), "after_hours", ["night-guard"]),
    ("day after a closure is business", "duty", jst(2026, 12, 30, 10, 0), "business", ["guard-desk", "sec-lead"]),
    ("勤労感謝の日 daytime", "duty", jst(2026, 11, 23, 10, 0), "holiday", ["holiday-duty"]),
    ("勤労感謝の日 night", "duty", jst(2026, 11, 23, 22, 0), "holiday", ["holiday-duty"]),
    ("元日", "duty", jst(2027, 1, 1, 10, 0), "holiday", ["holiday-duty"]),
    ("振替休日", "duty", jst(2026, 5, 6, 10, 0), "holiday", ["holiday-duty"]),
    ("国民の休日", "duty", jst(2026, 9, 22, 10, 0), "holiday", ["holiday-duty"]),
    ("holiday defaults to after_hours", "plain", jst(2026, 11, 23, 10, 0), "holiday", ["night-guard"]),
    ("plain roster business", "plain", jst(2026, 11, 24, 10, 0), "business", ["guard-desk"]),
    # Input in other zones is judged in JST.
    ("UTC evening is a JST holiday", "duty", datetime(2026, 11, 22, 15, 30, tzinfo=UTC), "holiday", ["holiday-duty"]),
    ("UTC holiday date is JST Tuesday", "duty", datetime(2026, 11, 23, 16, 0, tzinfo=UTC), "after_hours",
     ["night-guard"]),
    ("UTC 08:59 is JST 17:59", "duty", datetime(2026, 11, 24, 8, 59, tzinfo=UTC), "business",
     ["guard-desk", "sec-lead"]),
    ("UTC 09:00 is JST 18:00", "duty", datetime(2026, 11, 24, 9, 0, tzinfo=UTC), "after_hours", ["night-guard"]),
    ("New York Monday is JST Tuesday", "duty", datetime(2026, 11, 23, 20, 0, tzinfo=NEW_YORK), "business",
     ["guard-desk", "sec-lead"]),
    # on_public_holidays=True: the site works the holiday, so business hours hold inside the window.
    ("working holiday inside window", "works-holidays", jst(2026, 11, 23, 10, 0), "business", ["guard-desk"]),
    ("working holiday outside window", "works-holidays", jst(2026, 11, 23, 20, 0), "holiday", ["holiday-duty"]),
    ("closure beats working holiday", "works-holidays", jst(2026, 11, 3, 10, 0), "holiday", ["holiday-duty"]),
    ("working-holiday roster weekday", "works-holidays", jst(2026, 11, 24, 10, 0), "business", ["guard-desk"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("roster", "moment", "shift", "expected"),
    [case[1:] for case in DUTY_CASES],
    ids=[case[0] for case in DUTY_CASES],
)
def test_on_duty(roster: str, moment: datetime, shift: Shift, expected: list[str]) -> None:
    assert duty_shift(SETTINGS, SCHEDULE_MAP, roster, moment) == shift
    assert [c.id for c in on_duty(SETTINGS, SCHEDULE_MAP, roster, moment)] == expected


def test_on_duty_from_a_site_policy() -> None:
    """The controller feeds the planner straight from a signed policy's sections."""
    policy = SitePolicy.model_validate(
        {"site": {"name": "本社"}, "schedules": list(SCHEDULES.values()), "alerts": ALERTS}
    )
    schedules = {s.id: s for s in policy.schedules}
    on = on_duty(policy.alerts, schedules, "duty", jst(2026, 11, 23, 10, 0))
    assert [(c.name, c.email) for c in on] == [("休日当番", "holiday@example.invalid")]


def test_unknown_roster_is_a_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match="unknown roster 'nobody'"):
        on_duty(SETTINGS, SCHEDULE_MAP, "nobody", jst(2026, 11, 24, 10, 0))


def test_roster_whose_schedule_is_missing_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="unknown schedule 'office'"):
        on_duty(SETTINGS, {}, "duty", jst(2026, 11, 24, 10, 0))


def test_naive_moment_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        on_duty(SETTINGS, SCHEDULE_MAP, "duty", datetime(2026, 11, 24, 10, 0))


RECIPIENT_CASES: list[tuple[str, list[str], datetime, list[str]]] = [
    ("business: roster overlap kept once", ["roster:duty", "guard-desk", "soc", "roster:plain"],
     jst(2026, 11, 24, 10, 0), ["guard-desk", "sec-lead", "soc"]),
    ("after hours: roster overlap kept once", ["roster:duty", "guard-desk", "soc", "roster:plain"],
     jst(2026, 11, 24, 22, 0), ["night-guard", "guard-desk", "soc"]),
    ("holiday", ["roster:duty", "guard-desk", "soc", "roster:plain"],
     jst(2026, 11, 23, 10, 0), ["holiday-duty", "guard-desk", "soc", "night-guard"]),
    ("contact first, then its roster", ["sec-lead", "roster:duty"], jst(2026, 11, 24, 10, 0),
     ["sec-lead", "guard-desk"]),
    ("same roster twice", ["roster:plain", "roster:plain"], jst(2026, 11, 24, 10, 0), ["guard-desk"]),
    ("contacts only", ["soc", "sec-lead", "soc"], jst(2026, 11, 24, 10, 0), ["soc", "sec-lead"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("notify", "moment", "expected"),
    [case[1:] for case in RECIPIENT_CASES],
    ids=[case[0] for case in RECIPIENT_CASES],
)
def test_recipients(notify: list[str], moment: datetime, expected: list[str]) -> None:
    step = Step(after_minutes=0, notify=notify)
    assert [c.id for c in recipients(SETTINGS, SCHEDULE_MAP, step, moment)] == expected


def test_recipients_unknown_contact_is_a_key_error() -> None:
    # A Step built outside AlertSettings is not reference-checked, so the planner must say so itself.
    with pytest.raises(KeyError, match="unknown contact 'ghost'"):
        recipients(SETTINGS, SCHEDULE_MAP, Step(after_minutes=0, notify=["ghost"]), jst(2026, 11, 24, 10, 0))


def chain(minutes: list[int], repeat: int = 2, loop_after: int = 15, ack: int | None = 60) -> Escalation:
    return Escalation(
        id="c",
        steps=[Step(after_minutes=m, notify=["guard-desk"]) for m in minutes],
        repeat=repeat,
        loop_after_minutes=loop_after,
        ack_timeout_minutes=ack,
    )


START = jst(2026, 11, 24, 10, 0)
# Steps at 0, 10, 25 minutes; a round lasts 25 + 15 = 40 minutes; three rounds.
CHAIN = chain([0, 10, 25], repeat=2, loop_after=15)
ALL = [Position(r, s) for r in range(3) for s in range(3)]


@pytest.mark.parametrize(
    ("pos", "minutes"),
    [
        (Position(0, 0), 0),
        (Position(0, 1), 10),
        (Position(0, 2), 25),
        (Position(1, 0), 40),
        (Position(1, 1), 50),
        (Position(1, 2), 65),
        (Position(2, 0), 80),
        (Position(2, 1), 90),
        (Position(2, 2), 105),
    ],
)
def test_due_at_across_rounds(pos: Position, minutes: int) -> None:
    assert due_at(CHAIN, START, pos) == START + timedelta(minutes=minutes)


def test_next_position_walks_every_round_then_ends() -> None:
    walked = [first_position()]
    while (nxt := next_position(CHAIN, walked[-1])) is not None:
        walked.append(nxt)
    assert walked == ALL
    assert walked == sorted(walked)  # Position order is chain order


def test_repeat_zero_gives_one_round() -> None:
    once = chain([0, 5], repeat=0, loop_after=30)
    assert next_position(once, Position(0, 0)) == Position(0, 1)
    assert next_position(once, Position(0, 1)) is None
    assert positions_due(once, START, None, START + timedelta(days=1)) == [Position(0, 0), Position(0, 1)]
    with pytest.raises(ValueError, match="no position"):
        due_at(once, START, Position(1, 0))


def test_single_step_chain_loops_on_loop_after() -> None:
    single = chain([0], repeat=3, loop_after=20)
    times = [due_at(single, START, Position(r, 0)) for r in range(4)]
    assert times == [START + timedelta(minutes=20 * r) for r in range(4)]
    assert next_position(single, Position(3, 0)) is None


@pytest.mark.parametrize("bad", [Position(0, 3), Position(3, 0), Position(-1, 0), Position(0, -1)])
def test_due_at_refuses_a_position_outside_the_chain(bad: Position) -> None:
    with pytest.raises(ValueError):
        due_at(CHAIN, START, bad)


POSITIONS_DUE_CASES: list[tuple[str, Position | None, int, list[Position]]] = [
    # (case, after, now in minutes after START, expected)
    ("before the start", None, -1, []),
    ("at the start", None, 0, [Position(0, 0)]),
    ("first step already done", Position(0, 0), 9, []),
    ("second step on time", Position(0, 0), 10, [Position(0, 1)]),
    ("down for an hour: catch up across a loop", Position(0, 0), 70,
     [Position(0, 1), Position(0, 2), Position(1, 0), Position(1, 1), Position(1, 2)]),
    ("inside the loop pause", Position(0, 2), 39, []),
    ("loop pause over", Position(0, 2), 40, [Position(1, 0)]),
    ("never started, long after", None, 10_000, ALL),
    ("after the last position", Position(2, 2), 10_000, []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("after", "minutes", "expected"),
    [case[1:] for case in POSITIONS_DUE_CASES],
    ids=[case[0] for case in POSITIONS_DUE_CASES],
)
def test_positions_due(after: Position | None, minutes: int, expected: list[Position]) -> None:
    assert positions_due(CHAIN, START, after, START + timedelta(minutes=minutes)) == expected


def test_positions_due_catches_up_every_missed_step_exactly_once() -> None:
    """A lead that polls now and then, and is down for a long while, notifies each position once, never early."""
    polls = [0, 1, 9, 10, 11, 12, 26, 27, 95, 96, 104, 105, 106, 500]  # down from minute 27 to 95
    done: Position | None = None
    notified: list[tuple[Position, int]] = []
    for minute in polls:
        now = START + timedelta(minutes=minute)
        for pos in positions_due(CHAIN, START, done, now):
            assert due_at(CHAIN, START, pos) <= now
            notified.append((pos, minute))
            done = pos
    assert [pos for pos, _ in notified] == ALL
    # The outage: everything due from minute 40 to 90 went out at the first poll after it, minute 95.
    assert [pos for pos, minute in notified if minute == 95] == [
        Position(1, 0), Position(1, 1), Position(1, 2), Position(2, 0), Position(2, 1)
    ]  # fmt: skip


def test_steps_with_the_same_delay_are_due_together() -> None:
    burst = chain([0, 0, 5], repeat=0)
    assert positions_due(burst, START, None, START) == [Position(0, 0), Position(0, 1)]


def test_next_position_survives_a_chain_shortened_under_a_running_alert() -> None:
    """A policy update may drop steps or rounds while an alert is at a later position."""
    assert next_position(CHAIN, Position(0, 7)) == Position(1, 0)
    assert next_position(CHAIN, Position(5, 0)) is None
    assert positions_due(CHAIN, START, Position(0, 7), START + timedelta(minutes=40)) == [Position(1, 0)]
    with pytest.raises(ValueError):
        next_position(CHAIN, Position(-1, 0))


def test_next_due_at() -> None:
    assert next_due_at(CHAIN, START, None) == START
    assert next_due_at(CHAIN, START, Position(0, 2)) == START + timedelta(minutes=40)
    assert next_due_at(CHAIN, START, Position(2, 2)) is None


def test_chain_time_is_elapsed_time_across_a_daylight_saving_change() -> None:
    """An alert opened in a zone with DST: 60 minutes later is 60 real minutes, given in JST."""
    # 2026-11-01 01:30 EDT; New York falls back at 02:00 EDT to 01:00 EST.
    started = datetime(2026, 11, 1, 1, 30, tzinfo=NEW_YORK)
    hourly = chain([0, 60], repeat=0)
    due = due_at(hourly, started, Position(0, 1))
    assert due.timestamp() - started.timestamp() == 3600
    assert due.utcoffset() == timedelta(hours=9)
    assert positions_due(hourly, started, Position(0, 0), due - timedelta(seconds=1)) == []
    assert positions_due(hourly, started, Position(0, 0), due) == [Position(0, 1)]


def test_inputs_in_other_zones_give_the_same_instants() -> None:
    start_utc = START.astimezone(UTC)
    assert due_at(CHAIN, start_utc, Position(1, 1)) == due_at(CHAIN, START, Position(1, 1))
    now_utc = (START + timedelta(minutes=70)).astimezone(UTC)
    assert positions_due(CHAIN, START, Position(0, 0), now_utc) == POSITIONS_DUE_CASES[4][3]


def test_retrigger_at() -> None:
    acked = START + timedelta(minutes=12)
    again = retrigger_at(CHAIN, acked)
    assert again == acked + timedelta(minutes=60)
    assert retrigger_at(CHAIN, acked.astimezone(UTC)) == again
    # The lead restarts the chain from that moment: round 0, step 0 is due at once, step 1 ten minutes on.
    assert again is not None
    assert positions_due(CHAIN, again, None, again) == [first_position()]
    assert due_at(CHAIN, again, Position(0, 1)) == again + timedelta(minutes=10)


def test_retrigger_at_none_without_an_ack_timeout() -> None:
    assert retrigger_at(chain([0, 10], ack=None), START) is None


def test_naive_chain_times_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        due_at(CHAIN, datetime(2026, 11, 24, 10, 0), first_position())
    with pytest.raises(ValueError, match="naive"):
        positions_due(CHAIN, START, None, datetime(2026, 11, 24, 10, 0))
