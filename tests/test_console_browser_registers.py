# ruff: noqa: F811  (the shared fixtures are imported by name: tests/console_browser.py)
"""A facility manager in Debian's chromium against the real site (broker, controller, door agent): filters the key
register to overdue loans, exports CSV (read back: BOM, Japanese names intact, rows match the filter) and PDF (text
extracted: names, the filter and the verification line). Screenshots under tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from console_browser import BrowserSite, browser, console_site, save_screenshot, signed_in  # noqa: F401
from pypdf import PdfReader
from support.site import wait_for

from sekisho.controller.accounts.roles import Role
from sekisho.controller.reports.exports import BOM
from sekisho.protocol import timefmt

pytestmark = pytest.mark.broker

SignedIn = Callable[..., Any]


def _open_loans(site: BrowserSite) -> list[tuple[str, str]]:
    with site.controller.store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT key, person FROM key_loans WHERE returned_at IS NULL AND taken_at IS NOT NULL ORDER BY id"
        ).all()
    return [(str(k), str(p)) for k, p in rows]


def test_a_facility_manager_filters_overdue_keys_and_exports_csv_and_pdf(
    console_site: BrowserSite,
    signed_in: SignedIn,
) -> None:
    site = console_site
    # Through the real door agent: 見本 花子 takes the server-rack key (due in 2 hours), 見本 太郎 the archive
    # key (due in 8 hours).
    for person, slot in (("p-0002", 2), ("p-0001", 0)):
        site.enter(person)  # the cabinet is inside the controlled room
        site.wait_inside(person)
        site.door.key_loan(person, slot, taking=True)
    try:
        wait_for(lambda: len(_open_loans(site)) == 2, 30, "both key loans in the register")
    except AssertionError:
        raise AssertionError(
            f"{_open_loans(site)}; taken {site.events('key.taken')}; denied {site.events('door.access_denied')}"
        ) from None
    # Three hours on (the app's clock; no waiting): the server-rack key is overdue, the archive key is not.
    site.state.clock = lambda: timefmt.now() + timedelta(hours=3)

    page = signed_in(Role.FACILITY_MANAGER)
    page.goto(site.url("/console/keys"))
    body = page.locator("table.register tbody tr")
    assert body.count() == 2
    assert "延滞" in body.nth(0).inner_text() and "見本 花子" in body.nth(0).inner_text()
    save_screenshot(page, "registers-keys")

    page.check("input[name=type][value=overdue]")
    page.click("form.filters button[type=submit]")
    page.wait_for_load_state()
    assert "type=overdue" in page.url
    assert body.count() == 1
    shown = body.nth(0).inner_text()
    assert "見本 花子" in shown and "サーバーラックの鍵" in shown and "見本 太郎" not in shown
    verification = page.locator("footer .verification").inner_text()
    assert "検証済み" in verification
    save_screenshot(page, "registers-keys-overdue")

    with page.expect_download() as got_csv:
        page.click("a:has-text('CSV出力')")
    data = Path(got_csv.value.path()).read_bytes()
    assert data.startswith(BOM)
    rows = list(csv.reader(io.StringIO(data[len(BOM) :].decode("utf-8"), newline="")))
    assert ["出力者 / exported by", "施設 花子 (facility)"] in rows
    assert any(row[:1] == ["種別 / event types"] and "延滞" in row[1] for row in rows)
    header = next(i for i, row in enumerate(rows) if row and row[0] == "貸出日時 / taken")
    data_rows = [row for row in rows[header + 1 :] if row and not row[0].startswith("以上")]
    assert len(data_rows) == 1
    (loan,) = data_rows
    assert "見本 花子（みほん はなこ）" in loan and "p-0002" in loan and "延滞 / overdue" in loan
    assert "サーバーラックの鍵" in loan

    with page.expect_download() as got_pdf:
        page.click("a:has-text('PDF出力')")
    pdf = Path(got_pdf.value.path()).read_bytes()
    assert pdf.startswith(b"%PDF")
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)
    squeezed = "".join(text.split())
    assert "見本花子" in squeezed and "サーバーラックの鍵" in squeezed
    assert "延滞" in squeezed  # the filter
    assert "検証済み" in squeezed  # the verification line
    assert "見本太郎" not in squeezed

    # Both exports are in the admin audit trail with the facility manager as the actor.
    actions = [(row.action, row.actor, row.target) for row in site.controller.store.list_admin(action="export.*")]
    assert ("export.csv", "user:facility", "keys") in actions and ("export.pdf", "user:facility", "keys") in actions

    # The print view is the same page; the timeline of the borrower is one click away.
    page.click("table.register tbody tr >> nth=0 >> a[href='/console/timeline/person/p-0002']")
    page.wait_for_load_state()
    assert "/console/timeline/person/p-0002" in page.url and "見本 花子" in page.inner_text("h1")
    save_screenshot(page, "registers-timeline-person")
