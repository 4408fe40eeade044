"""The login decision: every reason, in the order that tells the person the most useful thing."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

import jpholiday
import pytest

from sekisho.agents.login.decision import JST, CardCheck, FingerCheck, LoginDecision, decide_login, refuse_early
from sekisho.protocol.policy import SitePolicy

TERMINAL = "t-hr-01"
# Tuesday 2026-11-24, 10:00 JST: a working day inside the office schedule.
WORKDAY = datetime(2026, 11, 24, 10, 0, tzinfo=JST)


def uid_hash(n: int) -> str:
    return f"{n:064x}"


def make_policy(**changes: Any) -> SitePolicy:
    """Return a small site policy for terminal t-hr-01; keyword arguments replace whole top-level sections."""
    doc: dict[str, Any] = {
        "site": {"name": "本社"},
        "login": {"allow_uid_only": False, "expired_policy_grace_hours": 4, "notices": ["a", "b"]},
        "schedules": [
            {
                "id": "office",
                "name": "平日日中",
                "weekdays": ["mon", "tue", "wed", "thu", "fri"],
                "start": "08:00",
                "end": "20:00",
                "exception_days": ["2026-12-29"],
            }
        ],
        "people": [
            {"id": "p-alice", "name": "Alice", "roles": ["designated_handler"], "logins": ["alice"]},
            {"id": "p-bob", "name": "Bob", "roles": ["designated_handler"], "logins": ["bob"]},
            {"id": "p-carol", "name": "Carol", "roles": ["staff"], "logins": ["carol"]},
            {"id": "p-dave", "name": "Dave", "active": False, "logins": ["dave"]},
            {"id": "p-erin", "name": "Erin", "valid_until": "2026-10-31", "logins": ["erin"]},
        ],
        "cards": [
            {"id": "c-alice", "person": "p-alice", "kind": "piv", "uid_hash": uid_hash(1)},
            {"id": "c-bob", "person": "p-bob", "kind": "piv", "uid_hash": uid_hash(2)},
            {"id": "c-alice-old", "person": "p-alice", "kind": "piv", "uid_hash": uid_hash(3), "status": "lost"},
            {"id": "c-alice-felica", "person": "p-alice", "kind": "felica", "uid_hash": uid_hash(4)},
        ],
        "terminals": [
            {
                "id": TERMINAL,
                "name": "人事PC",
                "agent": "term-001",
                "handlers": ["p-alice", "p-bob", "p-dave", "p-erin"],
                "schedule": "office",
            }
        ],
    }
    doc.update(changes)
    return SitePolicy.model_validate(doc)


POLICY = make_policy()
GOOD_CARD = CardCheck(present=True, card_id="c-alice", uid_hash=uid_hash(1), authenticated=True)
MATCH = FingerCheck(outcome="match", attempts=1)


def decide(
    user: str = "alice",
    card: CardCheck = GOOD_CARD,
    finger: FingerCheck = MATCH,
    now: datetime = WORKDAY,
    policy: SitePolicy | None = POLICY,
    state: str = "valid",
    expired_at: datetime | None = None,
) -> LoginDecision:
    return decide_login(policy, state, expired_at, TERMINAL, user, card, finger, now)  # type: ignore[arg-type]


def test_designated_handler_with_card_and_finger_is_granted() -> None:
    d = decide()
    assert (d.granted, d.reason, d.person_id, d.weak, d.methods, d.card_id) == (
        True,
        "granted",
        "p-alice",
        False,
        ("card", "fingerprint"),
        "c-alice",
    )


def test_no_policy() -> None:
    assert decide(policy=None, state="none").reason == "no_policy"
    assert decide(state="none").reason == "no_policy"


def test_expired_policy_is_honoured_only_within_the_grace_period() -> None:
    expired_at = WORKDAY - timedelta(hours=3)
    assert decide(state="expired", expired_at=expired_at).granted  # 3 h < 4 h grace
    late = decide(state="expired", expired_at=WORKDAY - timedelta(hours=4, seconds=1))
    assert (late.granted, late.reason) == (False, "policy_expired")
    assert decide(state="expired", expired_at=None).reason == "policy_expired"
    no_grace = make_policy(login={"expired_policy_grace_hours": 0})
    assert decide(policy=no_grace, state="expired", expired_at=WORKDAY - timedelta(seconds=1)).reason == (
        "policy_expired"
    )


def test_unknown_user() -> None:
    d = decide(user="mallory")
    assert (d.reason, d.person_id) == ("unknown_user", None)


@pytest.mark.parametrize("user", ["carol", "dave", "erin"], ids=["not-a-handler", "inactive", "past-valid-until"])
def test_not_designated(user: str) -> None:
    assert decide(user=user).reason == "not_designated"


def test_terminal_missing_from_policy_designates_nobody() -> None:
    d = decide_login(POLICY, "valid", None, "t-other", "alice", GOOD_CARD, MATCH, WORKDAY)
    assert d.reason == "not_designated"


def test_person_before_valid_from_is_not_designated() -> None:
    people = [p.model_dump(mode="json") for p in POLICY.people]
    people[0]["valid_from"] = "2026-12-01"
    assert decide(policy=make_policy(people=people)).reason == "not_designated"


def test_revoked_person_in_a_newer_policy_stays_revoked() -> None:
    terminals = [t.model_dump(mode="json") for t in POLICY.terminals]
    terminals[0]["handlers"] = ["p-bob"]
    newer = make_policy(terminals=terminals)
    assert decide(policy=newer).reason == "not_designated"
    # Within the grace period of an expired newer policy the revocation still holds.
    assert decide(policy=newer, state="expired", expired_at=WORKDAY - timedelta(hours=1)).reason == "not_designated"


def test_real_japanese_public_holiday_is_outside_hours() -> None:
    holiday = date(2026, 11, 23)
    assert jpholiday.is_holiday_name(holiday) == "勤労感謝の日" and holiday.strftime("%a") == "Mon"
    assert decide(now=datetime.combine(holiday, time(10, 0), JST)).reason == "outside_hours"
    schedules = [s.model_dump(mode="json") for s in POLICY.schedules]
    schedules[0]["on_public_holidays"] = True
    assert decide(policy=make_policy(schedules=schedules), now=datetime.combine(holiday, time(10, 0), JST)).granted


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 29, 10, 0, tzinfo=JST),  # a Tuesday, but a site closure (exception day)
        datetime(2026, 11, 28, 10, 0, tzinfo=JST),  # Saturday
        datetime(2026, 11, 24, 7, 59, tzinfo=JST),  # before the window
        datetime(2026, 11, 24, 20, 0, tzinfo=JST),  # the end is exclusive
    ],
    ids=["exception-day", "weekend", "early", "at-end"],
)
def test_outside_hours(moment: datetime) -> None:
    assert decide(now=moment).reason == "outside_hours"


def test_schedule_is_judged_in_jst_not_utc() -> None:
    # 23:30 UTC Monday is 08:30 JST Tuesday: inside the window.
    assert decide(now=datetime.fromisoformat("2026-11-23T23:30:00+00:00")).granted
    # 12:00 UTC Tuesday is 21:00 JST: outside.
    assert decide(now=datetime.fromisoformat("2026-11-24T12:00:00+00:00")).reason == "outside_hours"


def test_terminal_without_schedule_allows_any_time() -> None:
    terminals = [t.model_dump(mode="json") | {"schedule": None} for t in POLICY.terminals]
    assert decide(policy=make_policy(terminals=terminals), now=datetime(2026, 11, 23, 3, 0, tzinfo=JST)).granted


@pytest.mark.parametrize(
    ("card", "reason"),
    [
        (CardCheck(present=False), "no_card"),
        (CardCheck(present=True, uid_hash=uid_hash(99)), "unknown_card"),
        (CardCheck(present=True), "unknown_card"),
        (CardCheck(present=True, card_id="c-bob", authenticated=True), "card_bound_to_other"),
        (CardCheck(present=True, card_id="c-alice-old", authenticated=True), "card_inactive"),
        (CardCheck(present=True, card_id="c-alice", authenticated=False), "card_auth_failed"),
        # A clone of Bob's card fails to prove itself: that, not whose card it copies, is the reason.
        (CardCheck(present=True, card_id="c-bob", authenticated=False), "card_auth_failed"),
        (CardCheck(present=True, card_id="c-alice-felica", authenticated=True, weak=True), "uid_only_not_allowed"),
        # A card that stopped answering proved nothing, whatever it had said before.
        (CardCheck(present=True, timed_out=True), "card_timeout"),
        (CardCheck(present=True, card_id="c-alice", uid_hash=uid_hash(1), timed_out=True), "card_timeout"),
        (CardCheck(present=True, card_id="c-bob", timed_out=True), "card_timeout"),
    ],
)
def test_card_reasons(card: CardCheck, reason: str) -> None:
    d = decide(card=card)
    assert (d.granted, d.reason) == (False, reason)


def test_uid_only_card_is_granted_weak_when_the_site_allows_it() -> None:
    policy = make_policy(login={"allow_uid_only": True})
    d = decide(policy=policy, card=CardCheck(present=True, uid_hash=uid_hash(4), authenticated=True, weak=True))
    assert (d.granted, d.reason, d.weak, d.card_id) == (True, "granted", True, "c-alice-felica")


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        ("no_match", "fingerprint_mismatch"),
        ("retry_exhausted", "fingerprint_mismatch"),
        ("timeout", "fingerprint_timeout"),
        ("unavailable", "fingerprint_unavailable"),
        ("not_enrolled", "fingerprint_not_enrolled"),
    ],
)
def test_fingerprint_reasons(outcome: str, reason: str) -> None:
    d = decide(finger=FingerCheck(outcome=outcome))  # type: ignore[arg-type]
    assert (d.granted, d.reason, d.person_id, d.card_id) == (False, reason, "p-alice", "c-alice")


def test_order_account_and_hours_before_card_and_card_before_finger() -> None:
    no_card = CardCheck(present=False)
    miss = FingerCheck(outcome="no_match")
    assert decide(user="carol", card=no_card, finger=miss).reason == "not_designated"
    assert decide(card=no_card, finger=miss, now=datetime(2026, 11, 28, 10, 0, tzinfo=JST)).reason == "outside_hours"
    assert decide(card=no_card, finger=miss).reason == "no_card"
    assert decide(policy=None, state="none", user="mallory").reason == "no_policy"


def test_refuse_early_without_card_lets_a_designated_handler_through() -> None:
    assert refuse_early(POLICY, "valid", None, TERMINAL, "alice", WORKDAY) is None
    early = refuse_early(POLICY, "valid", None, TERMINAL, "carol", WORKDAY)
    assert early is not None and early.reason == "not_designated"


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        decide(now=datetime(2026, 11, 24, 10, 0))


def test_person_left_out_of_the_agents_slice_is_not_designated() -> None:
    # The controller sends a terminal agent only its handlers, plus the site's login names.
    sliced = SitePolicy.model_validate(make_policy().for_agent(make_policy().terminals[0].agent))
    assert "p-carol" not in {p.id for p in sliced.people} and "carol" in sliced.login_directory
    assert decide(policy=sliced, user="carol").reason == "not_designated"
    assert decide(policy=sliced, user="mallory").reason == "unknown_user"
    assert decide(policy=sliced, user="alice").granted
