# ruff: noqa: F811  (the shared fixtures are imported by name: tests/console_browser.py)
"""The console in a real browser (issue 12 tests): Debian's chromium against the real server, broker and agent.

An auditor opens the muster list, sees no write control, and a forged POST is refused; a security user
sends a remote unlock that reaches the door agent over the broker, with the operator in the audit trail;
the language switch; the muster list follows a person entering the room without a reload. Screenshots go
to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from console_browser import BrowserSite, browser, console_site, save_screenshot, signed_in  # noqa: F401
from support.site import wait_for

from sekisho.controller.accounts.roles import Role

pytestmark = pytest.mark.broker
SignedIn = Callable[..., Any]


def _audit(site: BrowserSite, action: str) -> list[dict[str, Any]]:
    with site.controller.store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT actor, via, target, new, detail FROM admin_audit WHERE action = ? ORDER BY id", (action,)
        ).all()
    loaded = [[json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v for v in row] for row in rows]
    return [dict(zip(("actor", "via", "target", "new", "detail"), row, strict=True)) for row in loaded]


def test_auditor_sees_the_muster_list_without_any_write_control_and_a_forged_post_is_refused(
    console_site: BrowserSite, signed_in: SignedIn
) -> None:
    console_site.enter("p-0001")
    console_site.wait_inside("p-0001")
    page = signed_in(Role.AUDITOR)
    page.goto(console_site.url("/console/muster"))
    assert page.locator("h1").inner_text() == "在室者"
    room = page.locator("#area-a-hr-room")
    room.locator('tr[data-person="p-0001"]').wait_for()
    assert "見本 太郎" in room.inner_text()
    # Not one tick control anywhere: no form posting to the confirm route, no button in the list.
    assert page.locator('form[action="/console/muster/confirm"]').count() == 0
    assert page.locator("#muster-live button").count() == 0
    save_screenshot(page, "muster-auditor")

    # The auditor's own session with its valid CSRF token (the sign-out form carries it): still refused.
    token = page.locator('form[action="/console/logout"] input[name="csrf_token"]').get_attribute("value")
    assert token
    forged = page.request.post(
        console_site.url("/console/muster/confirm"),
        form={"csrf_token": token, "area": "a-hr-room", "person": "p-0001", "action": "confirm"},
        max_redirects=0,
    )
    assert forged.status == 403
    assert _audit(console_site, "muster.mark_safe") == []
    page.reload()
    assert "未確認" in page.locator('#area-a-hr-room tr[data-person="p-0001"]').inner_text()


def test_security_sends_a_remote_unlock_that_reaches_the_door_agent_with_the_operator_audited(
    console_site: BrowserSite, signed_in: SignedIn
) -> None:
    board = console_site.door.board
    relay = next(d.relay for d in console_site.policy.doors if d.id == "room-hr")
    before = len(board.relay_log())
    page = signed_in(Role.SECURITY)
    page.goto(console_site.url("/console/doors"))
    page.check("#action-unlock")
    page.select_option("#target", "door:room-hr")
    page.fill("#seconds", "3")
    page.fill("#reason", "搬入業者の入室のため (test)")
    page.click("form.door-command-form button[type=submit]")
    assert page.locator("h1").inner_text() == "操作の確認"
    assert "人事部 管理区域 扉" in page.locator("#confirm-target").inner_text()
    save_screenshot(page, "door-command-confirm")
    page.click("#send-command")
    page.wait_for_url(re.compile(r"/console/doors/commands\?ids="))
    command_id = page.url.rsplit("=", 1)[1]
    # The status page follows the agent's answer by itself (htmx polling), or on reload without htmx.
    row = page.locator(f'tr[data-command="{command_id}"]')
    deadline_ok = False
    for _ in range(15):
        if row.get_attribute("data-state") == "executed":
            deadline_ok = True
            break
        page.wait_for_timeout(1000)
        if page.locator("#command-live[hx-get]").count() == 0:
            page.reload()
    assert deadline_ok, row.inner_text()
    assert "扉エージェントが実行しました" in row.inner_text()
    save_screenshot(page, "door-command-executed")

    # The door agent received it over the broker and drove the lock relay of that door.
    changes = board.relay_log()[before:]
    assert any(c.relay == relay and c.on and c.cause == "command" for c in changes), changes
    unlocked = [e for e in console_site.events("door.unlocked") if e.get("command_id") == command_id]
    assert unlocked and unlocked[0]["cause"] == "command" and unlocked[0]["requested_by"] == "security"
    executed = [e for e in console_site.events("agent.command_executed") if e.get("command_id") == command_id]
    assert executed and executed[0]["name"] == "door.unlock"
    # The authenticated operator, not free text, is in the admin audit trail with the reason.
    rows = [r for r in _audit(console_site, "door.command") if r["new"]["command_id"] == command_id]
    assert len(rows) == 1
    assert rows[0]["actor"] == "user:security" and rows[0]["via"] == "web" and rows[0]["target"] == "agent:door-hr-01"
    assert rows[0]["detail"] == {"reason": "搬入業者の入室のため (test)"}
    assert rows[0]["new"]["args"] == {"door": "room-hr", "seconds": 3, "requested_by": "security"}


def test_language_switch_japanese_english_japanese(console_site: BrowserSite, signed_in: SignedIn) -> None:
    page = signed_in(Role.FACILITY_MANAGER)
    page.goto(console_site.url("/console/muster"))
    assert page.locator("html").get_attribute("lang") == "ja"
    assert page.locator("h1").inner_text() == "在室者"
    page.click("a.lang-switch")
    page.wait_for_url(re.compile(r"/console/muster$"))
    assert page.locator("html").get_attribute("lang") == "en"
    assert page.locator("h1").inner_text() == "Who is inside"
    assert "Controlled area" in page.locator("#area-a-hr-room h2").inner_text()
    save_screenshot(page, "muster-english")
    page.click("a.lang-switch")
    page.wait_for_url(re.compile(r"/console/muster$"))
    assert page.locator("html").get_attribute("lang") == "ja"
    assert page.locator("h1").inner_text() == "在室者"
    assert "管理区域" in page.locator("#area-a-hr-room h2").inner_text()


def test_muster_list_follows_a_person_entering_without_a_reload(console_site: BrowserSite, signed_in: SignedIn) -> None:
    page = signed_in(Role.FACILITY_MANAGER)
    page.goto(console_site.url("/console/muster?area=a-hr-room"))
    assert page.locator("#muster-live[hx-trigger='every 5s']").count() == 1, (
        "htmx is not set up (requirements/assets.py)"
    )
    assert page.locator('tr[data-person="p-0003"]').count() == 0
    # Marks this very document: a reload would lose it.
    page.evaluate("window.sekishoTestMarker = 'same page'")
    console_site.enter("p-0003")  # a card tap at the entry reader, the door agent, the broker, the controller
    console_site.wait_inside("p-0003")
    page.locator('tr[data-person="p-0003"]').wait_for(timeout=15_000)
    assert "試験 次郎" in page.locator('tr[data-person="p-0003"]').inner_text()
    assert page.evaluate("window.sekishoTestMarker") == "same page"
    save_screenshot(page, "muster-live")

    # A facility manager ticks the person safe; the list says who confirmed.
    page.locator('tr[data-person="p-0003"] button').click()
    page.wait_for_load_state()
    wait_for(lambda: bool(_audit(console_site, "muster.mark_safe")), 10, "the tick in the audit trail")
    assert "安全確認済み" in page.locator('tr[data-person="p-0003"]').inner_text()
    assert _audit(console_site, "muster.mark_safe")[-1]["actor"] == "user:facility"
