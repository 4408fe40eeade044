"""The start-up notice of the day: deterministic by JST date, rotating through the policy's notices."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest

from sekisho.agents.login.messages import MESSAGES, bilingual, message
from sekisho.agents.login.notices import notice_for, notice_now

NOTICES = ["画面をのぞき見されないように", "USBメモリは貸出記録簿に記入", "離席時はカードを抜く"]


def test_same_day_same_notice_and_each_day_the_next() -> None:
    day = date(2026, 11, 24)
    assert notice_for(day, NOTICES) == notice_for(day, list(NOTICES))
    week = [notice_for(day + timedelta(days=i), NOTICES) for i in range(6)]
    first = NOTICES.index(week[0])  # type: ignore[arg-type]
    assert week == [NOTICES[(first + i) % 3] for i in range(6)]


def test_no_notices_means_none() -> None:
    assert notice_for(date(2026, 11, 24), []) is None


def test_single_notice_every_day() -> None:
    assert {notice_for(date(2026, 1, 1) + timedelta(days=i), ["only"]) for i in range(10)} == {"only"}


def test_the_day_turns_at_midnight_jst() -> None:
    # 15:30 UTC is 00:30 JST the next day.
    moment = datetime.fromisoformat("2026-11-24T15:30:00+00:00")
    assert notice_now(moment, NOTICES) == notice_for(date(2026, 11, 25), NOTICES)
    assert notice_now(moment - timedelta(hours=1), NOTICES) == notice_for(date(2026, 11, 24), NOTICES)


@pytest.mark.parametrize("reason", sorted(MESSAGES))
def test_every_message_is_japanese_then_english(reason: str) -> None:
    ja, en = bilingual(reason).split("\n")
    assert ja == message(reason) and en == message(reason, "en")
    assert any(ord(ch) > 0x3000 for ch in ja) and en.isascii()


def test_unknown_reason_reads_as_internal_error_not_blank() -> None:
    assert message("no-such-reason") == message("internal_error")


def test_account_reasons_read_alike_so_the_prompt_does_not_reveal_accounts() -> None:
    assert bilingual("unknown_user") == bilingual("not_designated")


def test_every_login_reason_has_its_own_entry() -> None:
    from typing import get_args

    from sekisho.agents.login.decision import LoginReason

    assert set(get_args(LoginReason)) <= set(MESSAGES)
