# ruff: noqa: F811  (the shared fixtures are imported by name: tests/console_browser.py)
"""The alerts pages in a real browser (issue 13 tests): Debian's chromium against the real server, broker and agent.

The door agent (on the board stub) sees the controlled room's door open without a grant and publishes a signed
``door.alarm forced_open`` over the broker; the controller stores it and its alert engine raises the alert, which
appears on an open alerts page without a reload (Server-Sent Events). A security user acknowledges it with a
comment; the door closes (``door.alarm_cleared``) and the alert, its condition cleared, is resolved. An auditor
sees the alerts and no control, and a forged POST with the auditor's own CSRF token is refused. Screenshots go to
tests/artifacts/ (git-ignored).
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
from sekisho.controller.alerts import texts

pytestmark = pytest.mark.broker
SignedIn = Callable[..., Any]
LIVE_TEXT = "自動更新中"


def _audit(site: BrowserSite, action: str) -> list[tuple[str, str, Any]]:
    with site.controller.store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT actor, via, new FROM admin_audit WHERE action = ? ORDER BY id", (action,)
        ).all()
    return [(r[0], r[1], json.loads(r[2]) if isinstance(r[2], str) else r[2]) for r in rows]


def _forced_alert(site: BrowserSite) -> tuple[int, str] | None:
    with site.controller.store.engine.connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT id, state FROM alerts WHERE rule = 'door_forced' ORDER BY id DESC LIMIT 1"
        ).first()
    return (int(row[0]), str(row[1])) if row else None


def _sensor(site: BrowserSite) -> int:
    sensor = next(d.sensor for d in site.policy.doors if d.id == "room-hr")
    assert sensor is not None
    return sensor


def _door_settled(site: BrowserSite) -> None:
    # The board's inputs reached the agent (the door is known shut): an opening now is forced, not "found open".
    attached = site.door.attached
    wait_for(lambda: attached.inputs_reported, 20, "the door agent to read the board's inputs")
    wait_for(lambda: site.door.attached.core.door_states().get("room-hr") is not None, 20, "the room door")


def test_a_forced_door_appears_live_and_security_acknowledges_and_resolves_it(
    console_site: BrowserSite, signed_in: SignedIn
) -> None:
    page = signed_in(Role.SECURITY)
    page.goto(console_site.url("/console/alerts?state=unresolved"))
    assert page.locator("h1").inner_text() == "アラート"
    live = page.locator("#alerts-live")
    page.wait_for_function("() => document.getElementById('alerts-live').textContent.includes('自動更新中')")
    assert LIVE_TEXT in live.inner_text()
    # The sound toggle: off by default, remembered in this browser.
    sound = page.locator("#alerts-sound")
    assert sound.is_visible() and sound.get_attribute("aria-pressed") == "false"
    sound.click()
    assert sound.get_attribute("aria-pressed") == "true"
    assert page.evaluate("() => window.localStorage.getItem('sekisho.alerts.sound')") == "on"
    # A mark on this document: still there afterwards means the row came without a reload.
    page.evaluate("() => { window.sekishoSamePage = true; }")

    _door_settled(console_site)
    board, sensor = console_site.door.board, _sensor(console_site)
    board.open_door(sensor)  # nobody tapped a card: the agent reports it forced open
    row = page.locator("#alerts-rows tr[data-severity='critical']", has_text="扉のこじ開け")
    row.wait_for(timeout=30_000)
    assert page.evaluate("() => window.sekishoSamePage === true")
    assert "人事部 管理区域 扉" in row.inner_text() and "未対応" in row.inner_text()
    assert "状態が継続中" in row.inner_text()
    assert "forced_open" in [p.get("alarm") for p in console_site.events("door.alarm")]
    save_screenshot(page, "alerts-live-security")
    found = _forced_alert(console_site)
    assert found is not None
    alert_id = found[0]
    # Ticked for an incident report with the keyboard; the tick survives the row's live updates below.
    page.locator(f"#pick-{alert_id}").focus()
    page.keyboard.press("Space")
    assert page.locator(f"#pick-{alert_id}").is_checked()

    # The acknowledgement is made on the alert's page in another tab; the list tab follows it live.
    detail = page.context.new_page()
    detail.set_default_timeout(15_000)
    detail.goto(console_site.url(f"/console/alerts/{alert_id}"))
    assert "扉のこじ開け" in detail.locator("#alert-title").inner_text()
    assert detail.locator("#alert-procedure").inner_text() == texts.procedure("ja", "door_forced")
    assert detail.locator("#resolve-override").count() == 1  # the door is still open: an override is asked for
    detail.fill("#ack-comment", "警備員が現場へ向かいます (test)")
    detail.click("#ack-form button[type=submit]")
    detail.wait_for_load_state()
    assert "対応中" in detail.locator("#alert-state").inner_text()
    assert "警備員が現場へ向かいます (test)" in detail.locator("#alert-ack").inner_text()
    page.locator(f"#alert-{alert_id}", has_text="対応中").wait_for(timeout=15_000)
    assert page.evaluate("() => window.sekishoSamePage === true")
    assert page.locator(f"#pick-{alert_id}").is_checked()

    # The door closes: the agent clears the alarm; the alert's condition shows cleared (not resolved).
    board.close_door(sensor)

    def cleared() -> bool:
        detail.reload()
        return "状態は解消" in detail.locator("#alert-condition").inner_text()

    wait_for(cleared, 30, "the forced-open condition to clear")
    assert "対応中" in detail.locator("#alert-state").inner_text()
    assert detail.locator("#resolve-override").count() == 0  # nothing active: no override needed
    detail.fill("#resolve-note", "扉を確認、異常なし。試験のための開扉 (test)")
    detail.select_option("#resolve-cause", "test")
    detail.click("#resolve-form button[type=submit]")
    detail.wait_for_load_state()
    assert "解決済み" in detail.locator("#alert-state").inner_text()
    assert "試験" in detail.locator("#alert-resolution").inner_text()
    history = detail.locator("#alert-history").inner_text()
    assert "対応中" in history and "解決済み" in history and "警備 次郎" in history
    save_screenshot(detail, "alerts-detail-resolved")
    # With the unresolved filter, the list drops the resolved alert without a reload.
    page.locator(f"#alert-{alert_id}").wait_for(state="detached", timeout=15_000)
    assert page.evaluate("() => window.sekishoSamePage === true")

    acked = _audit(console_site, "alert.acknowledged")
    assert acked[-1][:2] == ("user:security", "web") and acked[-1][2]["comment"] == "警備員が現場へ向かいます (test)"
    assert _audit(console_site, "alert.resolved")[-1][:2] == ("user:security", "web")
    detail.close()

    # An incident report from the list: tick, the one button, then name it and draft it (no script needed).
    page.goto(console_site.url("/console/alerts?state=resolved"))
    page.locator(f"#pick-{alert_id}").focus()
    page.keyboard.press("Space")
    page.click("#incident-pick button[type=submit]")
    page.wait_for_url("**/console/incidents/new?alert=*")
    assert "扉のこじ開け" in page.locator("#incident-new-alerts").inner_text()
    page.fill("#incident-title-input", "人事部 管理区域 扉の試験 (test)")
    page.click("#incident-new button[type=submit]")
    page.wait_for_url(re.compile(r".*/console/incidents/\d+$"))
    assert "人事部 管理区域 扉の試験 (test)" in page.locator("#incident-heading").inner_text()
    assert page.locator("#incident-form").count() == 1
    save_screenshot(page, "incident-draft-security")
    made = _audit(console_site, "incident.create")
    assert made[-1][:2] == ("user:security", "web") and made[-1][2]["alerts"] == [alert_id]


def test_an_auditor_sees_the_alerts_without_controls_and_a_forged_post_is_refused(
    console_site: BrowserSite, signed_in: SignedIn
) -> None:
    _door_settled(console_site)
    board, sensor = console_site.door.board, _sensor(console_site)
    board.open_door(sensor)
    wait_for(lambda: (_forced_alert(console_site) or (0, ""))[1] == "open", 30, "an open forced-door alert")
    board.close_door(sensor)
    found = _forced_alert(console_site)
    assert found is not None
    alert_id = found[0]
    trail_before = len(_audit(console_site, "alert.acknowledged"))

    page = signed_in(Role.AUDITOR)
    page.goto(console_site.url("/console/alerts"))
    page.locator(f"#alert-{alert_id}").wait_for()
    assert page.locator("main form[method='post']").count() == 0
    page.goto(console_site.url(f"/console/alerts/{alert_id}"))
    assert "扉のこじ開け" in page.locator("#alert-title").inner_text()
    assert page.locator("#alert-actions").count() == 0
    assert page.locator("form[action$='/acknowledge'], form[action$='/resolve'], form[action$='/reopen']").count() == 0
    save_screenshot(page, "alerts-detail-auditor")

    # The auditor's own session and its valid CSRF token (the sign-out form carries it): still refused.
    token = page.locator('form[action="/console/logout"] input[name="csrf_token"]').get_attribute("value")
    assert token
    forged = page.request.post(
        console_site.url(f"/console/alerts/{alert_id}/acknowledge"),
        form={"csrf_token": token, "comment": "監査が確認"},
        max_redirects=0,
    )
    assert forged.status == 403
    assert len(_audit(console_site, "alert.acknowledged")) == trail_before
    assert _forced_alert(console_site) == (alert_id, "open")

    # The wall board: large figures, no controls, readable by the auditor too.
    page.goto(console_site.url("/console/alerts/board"))
    assert page.locator("#board-alerts .board-figure").inner_text().isdigit()
    assert page.locator("form, button, input, select").count() == 0
    save_screenshot(page, "alerts-board")
