"""The media register page (電子媒体台帳, issue 12 item 3): inventory with states, borrowers and due times, lend and
return from the console with CSRF, the role matrix and the admin audit trail, its JSON API and exports, through
the real app with real sessions on a store holding the demo policy (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta
from html import unescape
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from accounts_fixtures import Clock
from accounts_fixtures import Site as Accounts
from fastapi.testclient import TestClient
from pypdf import PdfReader
from reports_fixtures import T0, Site

from sekisho.controller.accounts.roles import Role
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import ControllerConfig
from sekisho.controller.reports.exports import BOM
from sekisho.controller.store import Store
from sekisho.controller.store.models import AdminAuditEntry, LoanRecord
from sekisho.protocol import signing

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

NOW = T0 + timedelta(hours=12)  # 21:00 JST on Tuesday 17 November 2026
PAGE = "/console/registers/media-register"
# Twelve digits with a valid check digit, obviously synthetic (the same one the other My Number tests use).
SYNTHETIC_MY_NUMBER = "123456789018"


class Web:
    """The demo policy (three registered media) in a store, and a production app over it with console users."""

    def __init__(self, tmp_path: Path, store: Store, make_agent: MakeAgent) -> None:
        Site(store, make_agent)  # applies the demo site's policy
        key = signing.generate_key()
        (tmp_path / "signing.key").write_bytes(signing.private_key_pem(key))
        config = ControllerConfig(
            profile="production", var_dir=tmp_path, ca_cert=tmp_path / "ca.pem", tls_cert=tmp_path / "c.pem",
            tls_key=tmp_path / "c.key", signing_key=tmp_path / "signing.key",
            # The test moves the clock past a loan's due time: sessions must outlive that.
            session_idle_s=24 * 3600, session_lifetime_s=7 * 24 * 3600,
        )  # fmt: skip
        self.clock = Clock()
        self.clock.now = NOW
        self.state = AppState(config, store, None, clock=self.clock)
        self.accounts = Accounts(self.state, self.clock)
        self.store = store

    def client_as(self, role: Role, login: str | None = None) -> TestClient:
        """Return a client signed in as a new user of the role."""
        login = self.accounts.user(role, login)
        client = self.accounts.client()
        assert self.accounts.sign_in(client, login).status_code == 303
        return client

    def audit(self, action: str) -> list[AdminAuditEntry]:
        """Return the admin audit rows of an action."""
        return self.store.list_admin(action=action)

    def loans(self) -> list[LoanRecord]:
        """Return every media loan stored."""
        from sqlalchemy import select

        return self.store.read(select(LoanRecord))


@pytest.fixture
def web(tmp_path: Path, store: Store, make_agent: MakeAgent) -> Web:
    return Web(tmp_path, store, make_agent)


def text_of(html: str) -> str:
    """Return a page's visible text roughly (tags dropped, ruby readings kept)."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def row_of(html: str, medium: str) -> str:
    """Return the text of the register row of one medium."""
    found = re.search(rf'<tr class="row-[a-z_]+" data-medium="{medium}">(.*?)</tr>', html, re.S)
    assert found, f"no row for {medium}"
    return text_of(found.group(1))


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]


def lend_form(token: str, **changes: object) -> dict[str, object]:
    """Return a valid lend of the first HR USB stick to 見本 太郎, approved by 見本 花子 (an area manager)."""
    form: dict[str, object] = {
        "csrf_token": token,
        "medium": "m-0001",
        "person": "p-0001",
        "terminal": ["t-hr-01"],
        "due": "2026-11-18T09:00",
        "purpose": "給与データの受け渡し (demo)",
        "approved_by": "p-0002",
    }
    form.update(changes)
    return form


def test_the_register_lists_every_medium_in_store_with_japanese_names(web: Web) -> None:
    client = web.client_as(Role.AUDITOR)
    page = client.get(PAGE)
    assert page.status_code == 200 and "電子媒体台帳" in page.text
    for medium in ("m-0001", "m-0002", "m-0003"):
        assert "保管中" in row_of(page.text, medium)
    assert "人事部 USBメモリ 1 (demo)" in row_of(page.text, "m-0001") and "外付けディスク" in row_of(
        page.text, "m-0003"
    )
    # The id only on hover; the loans link narrows the loans register to the medium.
    assert 'title="ID: m-0001"' in page.text and 'href="/console/registers/media?medium=m-0001"' in page.text
    # The verification line says these records are not hash-chained, as the media loans register does.
    assert "ハッシュチェーン対象外" in page.text
    # An auditor sees no write control.
    assert (
        "/lend" not in page.text
        and "/return" not in page.text
        and 'name="csrf_token" value' not in page.text.split("<main", 1)[1]
    )
    client.get("/console/lang/en")
    english = client.get(PAGE)
    assert "Media register" in english.text and "in store" in row_of(english.text, "m-0002")


def test_lend_and_return_round_trip_shows_in_the_register_the_loans_and_the_audit_trail(web: Web) -> None:
    client = web.client_as(Role.FACILITY_MANAGER)
    page = client.get(PAGE)
    assert 'id="media-lend-form"' in page.text
    token = csrf_of(page.text)
    # Without the CSRF token nothing happens.
    assert client.post(f"{PAGE}/lend", data=lend_form("")).status_code == 403
    assert web.loans() == [] and web.audit("media.loan.create") == []
    lent = client.post(f"{PAGE}/lend", data=lend_form(token))
    assert lent.status_code == 303, lent.text
    assert lent.headers["location"] == f"{PAGE}?done=lent"
    shown = client.get(lent.headers["location"])
    row = row_of(shown.text, "m-0001")
    assert "貸出中" in row and "見本 太郎" in row and "人事 給与端末1" in row and "2026/11/18 (水) 09:00" in row
    assert 'title="ID: p-0001"' in shown.text and "媒体を貸し出しました" in shown.text
    # The admin audit trail names the signed-in user, via the web console.
    (created,) = web.audit("media.loan.create")
    assert created.actor == "user:facility-manager" and created.via == "web"
    assert created.new["medium"] == "m-0001" and created.new["person"] == "p-0001"
    (loan,) = web.loans()
    assert loan.starts_at == NOW and loan.created_by == "試験 太郎 (facility-manager)"
    # The same medium cannot go out twice: 409 from the service, shown as a refusal with the reason.
    again = client.post(f"{PAGE}/lend", data=lend_form(token))
    assert again.status_code == 422 and "貸出中" in again.text and 'role="alert"' in again.text
    # Overdue after its due time, on the app's clock.
    web.clock.now = NOW + timedelta(hours=13)
    assert "延滞" in row_of(client.get(PAGE).text, "m-0001")
    assert "延滞" in row_of(client.get(f"{PAGE}?type=overdue").text, "m-0001")
    assert "m-0002" not in client.get(f"{PAGE}?type=overdue").text.split("<tbody>", 1)[1]
    # The loans register, narrowed to the medium, has the loan.
    loans = client.get("/console/registers/media?medium=m-0001")
    assert loans.status_code == 200 and "見本 太郎" in text_of(loans.text.split("<tbody>", 1)[1])
    assert "m-0001" in text_of(loans.text.split('class="filter-summary"', 1)[1].split("</dl>", 1)[0])
    assert "見本 太郎" not in text_of(client.get("/console/registers/media?medium=m-0002").text.split("<tbody>")[1])
    # Return.
    returned = client.post(f"{PAGE}/return", data={"csrf_token": token, "loan": loan.id})
    assert returned.status_code == 303
    assert "保管中" in row_of(client.get(PAGE).text, "m-0001")
    (ended,) = web.audit("media.loan.return")
    assert ended.actor == "user:facility-manager" and ended.target == f"loan:{loan.id}"
    twice = client.post(f"{PAGE}/return", data={"csrf_token": token, "loan": loan.id})
    assert twice.status_code == 422 and "返却済み" in twice.text
    assert len(web.audit("media.loan.return")) == 1
    # The register keeps the last loan and the count.
    assert "1件" in row_of(client.get(PAGE).text, "m-0001")


def test_a_my_number_in_the_purpose_is_refused_with_the_reason_and_nothing_changes(web: Web) -> None:
    client = web.client_as(Role.IT_ADMIN)
    token = csrf_of(client.get(PAGE).text)
    refused = client.post(f"{PAGE}/lend", data=lend_form(token, purpose=f"番号 {SYNTHETIC_MY_NUMBER}"))
    assert refused.status_code == 422
    assert "マイナンバー" in refused.text and "purpose" in refused.text
    assert SYNTHETIC_MY_NUMBER not in refused.text  # never echoed back
    assert web.loans() == [] and web.audit("media.loan.create") == []
    assert "保管中" in row_of(client.get(PAGE).text, "m-0001")
    # Other refusals say why too: an unknown medium, a borrower approving their own loan, a due time before now.
    unknown = client.post(f"{PAGE}/lend", data=lend_form(token, medium="m-9999"))
    assert unknown.status_code == 422 and "台帳にありません" in unknown.text
    own = client.post(f"{PAGE}/lend", data=lend_form(token, person="p-0002"))
    assert own.status_code == 422 and "承認できません" in own.text
    past = client.post(f"{PAGE}/lend", data=lend_form(token, due="2026-11-17T08:00"))
    assert past.status_code == 422 and "返却予定は開始より後にしてください" in past.text
    client.get("/console/lang/en")
    english = client.post(f"{PAGE}/lend", data=lend_form(token, medium="m-9999"))
    assert "is not registered" in english.text and "台帳にありません" not in english.text
    assert web.loans() == []


def test_readers_without_media_lend_get_no_form_and_their_post_is_refused(web: Web) -> None:
    for role in (Role.AUDITOR, Role.SECURITY):
        client = web.client_as(role, login=f"reader-{role.value}".replace("_", "-"))
        page = client.get(PAGE)
        assert page.status_code == 200 and 'id="media-lend-form"' not in page.text
        # A forged POST with the reader's own valid CSRF token.
        token = csrf_of(page.text)
        assert client.post(f"{PAGE}/lend", data=lend_form(token)).status_code == 403
        assert client.post(f"{PAGE}/return", data={"csrf_token": token, "loan": "loan-20261117-001"}).status_code == 403
    assert web.loans() == [] and web.audit("media.loan.create") == []
    area = web.client_as(Role.AREA_MANAGER)
    assert area.get(PAGE).status_code == 403
    assert area.get("/api/v1/registers/media-register").status_code == 403


def test_filters_json_and_exports(web: Web) -> None:
    manager = web.client_as(Role.FACILITY_MANAGER)
    token = csrf_of(manager.get(PAGE).text)
    assert manager.post(f"{PAGE}/lend", data=lend_form(token)).status_code == 303
    client = web.client_as(Role.AUDITOR)
    only_disk = client.get(f"{PAGE}?kind=usb_disk").text.split("<tbody>", 1)[1]
    assert "m-0003" in only_disk and "m-0001" not in only_disk
    by_label = client.get(f"{PAGE}?label=USBメモリ 2").text.split("<tbody>", 1)[1]
    assert "m-0002" in by_label and "m-0001" not in by_label
    by_holder = client.get(f"{PAGE}?person=p-0001").text.split("<tbody>", 1)[1]
    assert "m-0001" in by_holder and "m-0002" not in by_holder
    assert client.get(f"{PAGE}?type=lent").status_code == 422
    assert client.get(f"{PAGE}?label={SYNTHETIC_MY_NUMBER}").status_code == 422
    found = client.get("/api/v1/registers/media-register?type=on_loan").json()
    assert found["register"] == "media-register" and found["title"]["ja"] == "電子媒体台帳"
    (row,) = found["rows"]
    assert row["values"]["person"] == {"id": "p-0001", "name": "見本 太郎", "kana": "みほん たろう"}
    assert row["values"]["ends_at"] == "2026-11-18T09:00:00+09:00" and row["state"] == "on_loan"
    assert row["loan"] and found["verification"]["state"] == "not_chained"
    assert client.get("/api/v1/registers/media-register?kind=floppy").status_code == 422
    answer = client.get("/api/v1/registers/media-register.csv?type=on_loan")
    assert answer.status_code == 200 and answer.content.startswith(BOM)
    rows = list(csv.reader(io.StringIO(answer.content[len(BOM) :].decode("utf-8"), newline="")))
    assert rows[0] == ["電子媒体台帳 / Media register"]
    assert any(r[:2] == ["出力者 / exported by", "試験 太郎 (auditor)"] for r in rows)
    assert any(r and r[0] == "検証 / verification" and "ハッシュチェーン対象外" in r[1] for r in rows)
    assert any(r and r[0] == "種別 / event types" and "貸出中 / on loan" in r[1] for r in rows)
    header = next(i for i, r in enumerate(rows) if r and r[0] == "媒体 / medium")
    body = [r for r in rows[header + 1 :] if r and not r[0].startswith("以上")]
    assert len(body) == 1 and body[0][1] == "m-0001" and "見本 太郎（みほん たろう）" in body[0]
    (exported,) = web.audit("export.csv")
    assert exported.actor == "user:auditor" and exported.target == "media-register"
    assert exported.detail["filters"] == {"types": ["on_loan"]}
    pdf = client.get("/api/v1/registers/media-register.pdf")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
    assert "電子媒体台帳" in text and "見本" in text and "ハッシュチェーン対象外" in text
    assert len(web.audit("export.pdf")) == 1
