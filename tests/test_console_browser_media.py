# ruff: noqa: F811  (the shared fixtures are imported by name: tests/console_browser.py)
"""A facility manager in Debian's chromium against the real site (broker, controller, door agent) lends a USB
stick from the media register page (電子媒体台帳) and sees it lent, is told why a purpose holding a My Number is
refused (the refusal swapped in place), and takes the stick back. Screenshots under tests/artifacts/."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from console_browser import BrowserSite, browser, console_site, save_screenshot, signed_in  # noqa: F401
from support.site import wait_for

from sekisho.controller.accounts.roles import Role
from sekisho.protocol import timefmt

pytestmark = pytest.mark.broker

SignedIn = Callable[..., Any]
PAGE = "/console/registers/media-register"
# Twelve digits with a valid check digit, obviously synthetic.
SYNTHETIC_MY_NUMBER = "123456789018"
JST = ZoneInfo("Asia/Tokyo")


def _outstanding(site: BrowserSite) -> list[tuple[str, str]]:
    with site.controller.store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT medium, person FROM media_loans WHERE returned_at IS NULL AND revoked_at IS NULL ORDER BY id"
        ).all()
    return [(str(m), str(p)) for m, p in rows]


def test_a_facility_manager_lends_a_medium_from_the_register_and_takes_it_back(
    console_site: BrowserSite,
    signed_in: SignedIn,
) -> None:
    site = console_site
    page = signed_in(Role.FACILITY_MANAGER)
    page.goto(site.url(PAGE))
    row = page.locator("tr[data-medium='m-0002']")
    assert "保管中" in row.inner_text()
    # The row's "lend" link opens the form with the medium chosen.
    row.locator("a:has-text('貸出')").click()
    page.wait_for_load_state()
    assert page.input_value("#l-medium") == "m-0002"
    page.select_option("#l-person", "p-0001")
    page.check("input[name=terminal][value=t-hr-01]")
    due = (timefmt.now() + timedelta(hours=4)).astimezone(JST).strftime("%Y-%m-%dT%H:%M")
    page.fill("#l-due", due)
    page.select_option("#l-approver", "p-0002")

    # A My Number in the purpose: refused with the reason where the form was, nothing recorded.
    page.fill("#l-purpose", f"番号 {SYNTHETIC_MY_NUMBER}")
    page.click("#media-lend-form button[type=submit]")
    alert = page.locator("#media-live [role=alert]")
    alert.wait_for()
    assert "マイナンバー" in alert.inner_text()
    assert SYNTHETIC_MY_NUMBER not in page.content()
    assert _outstanding(site) == []
    save_screenshot(page, "media-register-refused")

    page.select_option("#l-medium", "m-0002")
    page.select_option("#l-person", "p-0001")
    page.check("input[name=terminal][value=t-hr-01]")
    page.fill("#l-due", due)
    page.select_option("#l-approver", "p-0002")
    page.fill("#l-purpose", "監査資料の受け渡し (demo)")
    page.click("#media-lend-form button[type=submit]")
    page.locator("#media-live [role=status]:has-text('媒体を貸し出しました')").wait_for()
    lent = page.locator("tr[data-medium='m-0002']").inner_text()
    assert "貸出中" in lent and "見本 太郎" in lent and "人事 給与端末1" in lent
    assert _outstanding(site) == [("m-0002", "p-0001")]
    (audit,) = site.controller.store.list_admin(action="media.loan.create")
    assert audit.actor == "user:facility" and audit.via == "web" and audit.new["medium"] == "m-0002"
    save_screenshot(page, "media-register-lent")

    # The stick comes back with one button on its row.
    page.locator("tr[data-medium='m-0002'] button:has-text('返却')").click()
    page.locator("#media-live [role=status]:has-text('返却を記録しました')").wait_for()
    wait_for(lambda: _outstanding(site) == [], 10, "the loan ended")
    assert "保管中" in page.locator("tr[data-medium='m-0002']").inner_text()
    (returned,) = site.controller.store.list_admin(action="media.loan.return")
    assert returned.actor == "user:facility"
    save_screenshot(page, "media-register-returned")
