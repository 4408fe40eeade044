"""The register and timeline pages, their JSON API and exports, and the key counter tablet (issue 12 items 3-5),
through the real app with real sessions on a store holding real signed events (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import struct
import zlib
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
from sqlalchemy import select

from sekisho.controller.accounts.roles import Role
from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import ControllerConfig
from sekisho.controller.console.register_query import REGISTER_PAGES
from sekisho.controller.doors.projector import DoorProjector
from sekisho.controller.reports.exports import BOM
from sekisho.controller.store import Store
from sekisho.controller.store.models import AdminAuditEntry, KeyLoan
from sekisho.protocol import signing

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

NOW = T0 + timedelta(hours=12)  # 21:00 JST on Tuesday 17 November 2026


class Web:
    """The demo site's events in a store, and a production app over it with console users."""

    def __init__(self, tmp_path: Path, store: Store, make_agent: MakeAgent) -> None:
        self.site = Site(store, make_agent)
        s = self.site
        s.take("p-0002", 0, "k-archive", T0, hours=1)  # overdue by 21:00
        s.take("p-0001", 2, "k-server-rack", T0 + timedelta(hours=11), hours=8)  # out, not due
        s.take("p-0003", 1, "k-cabinet-hr", T0 + timedelta(minutes=5))
        s.give_back(1, "k-cabinet-hr", T0 + timedelta(hours=2), person="p-0003")  # returned
        for minute in range(5):
            s.pass_door("p-0001" if minute % 2 == 0 else "p-0003", "entry", T0 + timedelta(minutes=10 + minute))
        s.pass_door("p-0001", "exit", T0 - timedelta(days=3))  # outside today and this week
        s.locker("p-0001", T0 + timedelta(minutes=30))
        s.login("p-0001", "mihon.taro", T0 + timedelta(minutes=40))
        s.usb("usb.blocked", T0 + timedelta(minutes=50), person="p-0001")
        s.project()
        key = signing.generate_key()
        (tmp_path / "signing.key").write_bytes(signing.private_key_pem(key))
        config = ControllerConfig(
            profile="production", var_dir=tmp_path, ca_cert=tmp_path / "ca.pem", tls_cert=tmp_path / "c.pem",
            tls_key=tmp_path / "c.key", signing_key=tmp_path / "signing.key",
        )  # fmt: skip
        self.clock = Clock()
        self.clock.now = NOW
        self.state = AppState(config, store, None, clock=self.clock)
        self.accounts = Accounts(self.state, self.clock)
        self.store = store

    def client_as(self, role: Role, areas: tuple[str, ...] = (), login: str | None = None) -> TestClient:
        """Return a client signed in as a new user of the role."""
        login = self.accounts.user(role, login, areas=areas)
        client = self.accounts.client()
        signed = self.accounts.sign_in(client, login)
        assert signed.status_code == 303, signed.text
        return client

    def audit(self, action: str) -> list[AdminAuditEntry]:
        """Return the admin audit rows of an action."""
        return self.store.list_admin(action=action)


@pytest.fixture
def web(tmp_path: Path, store: Store, make_agent: MakeAgent) -> Web:
    return Web(tmp_path, store, make_agent)


def text_of(html: str) -> str:
    """Return a page's visible text roughly (tags dropped, ruby readings kept)."""
    return unescape(re.sub(r"<[^>]+>", " ", html))


def table_rows(html: str) -> list[str]:
    """Return the text of each row of the register table's body."""
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [text_of(row) for row in body.split("</tr>") if "<td" in row]


def read_csv(data: bytes) -> list[list[str]]:
    assert data.startswith(BOM)
    return list(csv.reader(io.StringIO(data[len(BOM) :].decode("utf-8"), newline="")))


def data_rows(rows: list[list[str]]) -> list[list[str]]:
    """Return the CSV's data rows: after the header row, before the closing row."""
    start = next(i for i, row in enumerate(rows) if row and row[0].startswith(("貸出日時", "日時")))
    return [row for row in rows[start + 1 :] if row and not row[0].startswith("以上")]


# --- pages ------------------------------------------------------------------------------------------


def test_every_register_page_renders_in_japanese_and_english_with_names(web: Web) -> None:
    client = web.client_as(Role.FACILITY_MANAGER)
    for register in REGISTER_PAGES:
        ja = client.get(register.path)
        assert ja.status_code == 200, (register.path, ja.text[:500])
        assert '<html lang="ja">' in ja.text and "<table" in ja.text
        assert "<th" in ja.text and "<td" in ja.text
        # The tabs to every register, this one marked current.
        assert f'<li><a href="{register.path}" aria-current="page">' in ja.text, register.path
        assert all(f'<a href="{other.path}"' in ja.text for other in REGISTER_PAGES)
    keys = client.get("/console/keys")
    assert "鍵貸出管理簿" in keys.text
    # Names, not ids: kanji with the kana as ruby, the id on hover, a link to the person's timeline.
    assert '<a href="/console/timeline/person/p-0002"><span class="person idhover" title="ID: p-0002">' in keys.text
    assert "<rt>みほん はなこ</rt>" in keys.text and ">p-0002<" not in keys.text
    client.get("/console/lang/en")
    en = client.get("/console/keys")
    assert '<html lang="en">' in en.text and "Key-lending register" in en.text and "overdue" in text_of(en.text)
    rooms = client.get("/console/registers/rooms")
    assert "Room entry/exit log" in rooms.text and "access granted" in text_of(rooms.text)


def test_the_key_register_shows_overdue_first_then_out_then_returned_and_filters_to_overdue(web: Web) -> None:
    client = web.client_as(Role.FACILITY_MANAGER)
    rows = table_rows(client.get("/console/keys").text)
    assert len(rows) == 3
    assert "延滞" in rows[0] and "見本 花子" in rows[0] and "書庫の鍵" in rows[0]
    assert "貸出中" in rows[1] and "見本 太郎" in rows[1]
    assert "返却済" in rows[2] and "試験 次郎" in rows[2]
    overdue = client.get("/console/keys?type=overdue")
    only = table_rows(overdue.text)
    assert len(only) == 1 and "見本 花子" in only[0]
    # The filter is stated on the page, and the export buttons carry it.
    assert "延滞" in text_of(overdue.text.split('class="filter-summary"', 1)[1].split("</dl>", 1)[0])
    assert 'href="/api/v1/registers/keys.csv?type=overdue"' in overdue.text
    # The verification line names what was checked.
    assert "検証済み" in overdue.text and "status-ok" in overdue.text


def test_presets_and_dates_narrow_the_rows(web: Web) -> None:
    client = web.client_as(Role.FACILITY_MANAGER)
    everything = table_rows(client.get("/console/registers/rooms?limit=100").text)
    today = table_rows(client.get("/console/registers/rooms?preset=today&limit=100").text)
    assert len(everything) == 6 and len(today) == 5
    earlier = table_rows(client.get("/console/registers/rooms?from=2026-11-14&to=2026-11-14").text)
    assert len(earlier) == 1 and "退室" in earlier[0]
    person = table_rows(client.get("/console/registers/rooms?person=p-0003&limit=100").text)
    assert len(person) == 2 and all("試験 次郎" in row for row in person)
    bad = client.get("/console/registers/rooms?from=2026-13-01")
    assert bad.status_code == 422 and "日付" in bad.text


def test_keyset_pages_go_forward_and_back(web: Web) -> None:
    client = web.client_as(Role.FACILITY_MANAGER)
    first = client.get("/console/registers/rooms?limit=2")
    page1 = table_rows(first.text)
    next_link = unescape(re.search(r'rel="next" href="([^"]+)"', first.text).group(1))  # type: ignore[union-attr]
    second = client.get(next_link)
    page2 = table_rows(second.text)
    assert len(page2) == 2 and not set(page1) & set(page2)
    third_link = unescape(re.search(r'rel="next" href="([^"]+)"', second.text).group(1))  # type: ignore[union-attr]
    third = client.get(third_link)
    back = unescape(re.search(r'rel="prev" href="([^"]+)"', third.text).group(1))  # type: ignore[union-attr]
    assert table_rows(client.get(back).text) == page2
    back_again = unescape(re.search(r'rel="prev" href="([^"]+)"', second.text).group(1))  # type: ignore[union-attr]
    assert table_rows(client.get(back_again).text) == page1
    assert client.get("/console/registers/rooms?cursor=bm90LWEtY3Vyc29y").status_code == 422


def test_an_area_manager_sees_only_their_areas(web: Web) -> None:
    client = web.client_as(Role.AREA_MANAGER, areas=("a-hr-desk",))
    # The room entry/exit log is narrowed to their area (the room's entries are in another one).
    page = client.get("/console/registers/rooms")
    rows = table_rows(page.text)
    assert page.status_code == 200 and len(rows) == 1 and "見本 太郎" not in rows[0] and "試験 次郎" not in rows[0]
    assert client.get("/console/registers/rooms?area=a-hr-room").status_code == 403
    assert client.get("/console/keys").status_code == 403
    assert client.get("/console/timeline/area/a-hr-room").status_code == 403
    assert client.get("/console/timeline/person/p-0001").status_code == 403
    assert client.get("/api/v1/registers/rooms.csv?area=a-hr-room").status_code == 403
    assert client.get("/console/timeline/area/a-hr-desk").status_code == 200
    # Someone looking after the room sees its log.
    room = web.client_as(Role.AREA_MANAGER, areas=("a-hr-room",), login="room-manager")
    assert "見本 太郎" in room.get("/console/registers/rooms").text


def test_exports_stream_with_bom_and_are_recorded_with_the_actor(web: Web) -> None:
    client = web.client_as(Role.FACILITY_MANAGER)
    answer = client.get("/api/v1/registers/keys.csv?type=overdue")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    assert "attachment" in answer.headers["content-disposition"]
    rows = read_csv(answer.content)
    assert ["出力者 / exported by", "試験 太郎 (facility-manager)"] in rows
    body = data_rows(rows)
    assert len(body) == 1 and "見本 花子（みほん はなこ）" in body[0] and "延滞 / overdue" in body[0]
    (row,) = web.audit("export.csv")
    assert row.actor == "user:facility-manager" and row.via == "web" and row.target == "keys"
    assert row.detail["filters"] == {"types": ["overdue"]} and row.detail["rows"] == 1
    pdf = client.get("/api/v1/registers/keys.pdf?type=overdue")
    assert pdf.content.startswith(b"%PDF")
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
    assert "見本" in text and "延滞" in text
    assert len(web.audit("export.pdf")) == 1
    timeline = client.get("/api/v1/timelines/person/p-0001.csv?preset=this_month")
    assert timeline.status_code == 200 and "見本 太郎" in timeline.content.decode("utf-8")
    # An auditor may export; an area manager may not export a site-wide register.
    auditor = web.client_as(Role.AUDITOR)
    assert auditor.get("/api/v1/registers/logins.csv").status_code == 200
    area = web.client_as(Role.AREA_MANAGER, areas=("a-hr-room",), login="room-manager")
    assert area.get("/api/v1/registers/keys.csv").status_code == 403


def test_the_json_api_mirrors_the_pages(web: Web) -> None:
    client = web.client_as(Role.AUDITOR)
    first = client.get("/api/v1/registers/keys?limit=1").json()
    assert first["register"] == "keys" and first["title"]["ja"] == "鍵貸出管理簿"
    (row,) = first["rows"]
    assert row["values"]["person"] == {"id": "p-0002", "name": "見本 花子", "kana": "みほん はなこ"}
    assert row["values"]["due_at"].endswith("+09:00") and "overdue" in row["flags"]
    assert first["verification"]["state"] == "verified"
    second = client.get(f"/api/v1/registers/keys?limit=1&cursor={first['next_cursor']}").json()
    assert second["rows"][0]["values"]["person"]["id"] == "p-0001"
    assert client.get("/api/v1/registers/keys?limit=501").status_code == 422
    assert client.get("/api/v1/registers/keys?cursor=garbage").status_code == 422
    assert client.get("/api/v1/registers/rooms?person=<script>").status_code == 422
    timeline = client.get("/api/v1/timelines/person/p-0001").json()
    kinds = {r["kind"] for r in timeline["rows"]}
    assert {"room", "locker", "login", "usb", "key"} <= kinds, kinds
    assert TestClient(create_app(web.state)).get("/api/v1/registers/keys").status_code == 401


def test_the_person_timeline_page_merges_the_day(web: Web) -> None:
    client = web.client_as(Role.AUDITOR)
    page = client.get("/console/timeline/person/p-0001")
    assert page.status_code == 200 and "見本 太郎" in page.text
    text = text_of(page.text)
    for shown in ("ロッカー", "入退室", "ログイン", "USB", "鍵"):
        assert shown in text, shown
    assert "前の日" in page.text and 'href="/api/v1/timelines/person/p-0001.csv' in page.text
    # The day before has only the exit three days ago… not even that: it was on the 14th.
    assert "退室" in text_of(client.get("/console/timeline/person/p-0001?from=2026-11-14&to=2026-11-14").text)
    assert client.get("/console/timeline/door/room-hr").status_code == 200
    assert client.get("/console/timeline/terminal/t-hr-01").status_code == 200


# --- the key counter --------------------------------------------------------------------------------


def png(width: int = 4, height: int = 2) -> bytes:
    """Return a small valid PNG (a drawn signature stands in for it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes([0, 0, 0, 255] * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]


def test_the_counter_lends_with_a_signature_and_takes_back_with_audit_rows(web: Web) -> None:
    client = web.client_as(Role.FACILITY_MANAGER)
    page = client.get("/console/keys/counter")
    assert page.status_code == 200 and 'id="c-signature-pad"' in page.text
    image = png()
    form = {
        "key": "倉庫の鍵",
        "borrower": "p-0003",
        "due": "2026-11-18T09:00",
        "signature": "data:image/png;base64," + base64.b64encode(image).decode(),
    }
    # A forged post (no CSRF token) is refused and writes nothing.
    assert client.post("/console/keys/counter/lend", data=form).status_code == 403
    assert web.audit("key.counter.lend") == []
    token = csrf_of(page.text)
    lent = client.post("/console/keys/counter/lend", data={**form, "csrf_token": token})
    assert lent.status_code == 303, lent.text
    (row,) = web.audit("key.counter.lend")
    assert row.actor == "user:facility-manager" and row.new["borrower"] == "p-0003"
    assert row.new["signature_sha256"] == hashlib.sha256(image).hexdigest()
    # The key register shows it with the cabinet's loans, and the signature is served back, checked.
    keys = table_rows(client.get("/console/keys?type=open").text)
    assert any("倉庫の鍵" in r and "試験 次郎" in r and "受付カウンター" in r for r in keys), keys
    signature = client.get(f"/console/keys/counter/{-row.id}/signature.png")
    assert signature.status_code == 200 and signature.content == image
    # The same key cannot go out twice; a bad signature or a past due time is refused.
    again = client.post("/console/keys/counter/lend", data={**form, "csrf_token": token})
    assert again.status_code == 422 and "貸出中" in again.text
    unsigned = client.post(
        "/console/keys/counter/lend", data={**form, "key": "別の鍵", "signature": "", "csrf_token": token}
    )
    assert unsigned.status_code == 422 and "署名" in unsigned.text
    fake = "data:image/png;base64," + base64.b64encode(b"GIF89a....").decode()
    assert (
        client.post(
            "/console/keys/counter/lend", data={**form, "key": "別の鍵", "signature": fake, "csrf_token": token}
        ).status_code
        == 422
    )
    late = {**form, "key": "別の鍵", "due": "2026-11-17T08:00", "csrf_token": token}
    assert client.post("/console/keys/counter/lend", data=late).status_code == 422
    my_number = {**form, "key": "鍵 123456789018", "csrf_token": token}
    assert client.post("/console/keys/counter/lend", data=my_number).status_code == 422
    assert len(web.audit("key.counter.lend")) == 1
    # A rebuild of the door projection keeps the counter loan (its record is the audit row).
    DoorProjector(web.store).rebuild()
    with web.store.engine.connect() as conn:
        assert conn.execute(select(KeyLoan.key).where(KeyLoan.id == -row.id)).scalar_one() == "倉庫の鍵"
    # Taken back by a colleague.
    forged = client.post("/console/keys/counter/return", data={"loan": -row.id, "returned_by": "p-0001"})
    assert forged.status_code == 403
    back = client.post(
        "/console/keys/counter/return", data={"loan": -row.id, "returned_by": "p-0001", "csrf_token": token}
    )
    assert back.status_code == 303
    (returned,) = web.audit("key.counter.return")
    assert returned.new["returned_by"] == "p-0001"
    assert "試験 次郎" in " ".join(table_rows(client.get("/console/keys?type=returned").text))
    assert "貸出中のカウンター管理の鍵はありません" in client.get("/console/keys/counter").text


def test_only_facility_managers_open_the_counter(web: Web) -> None:
    for role in (Role.AUDITOR, Role.AREA_MANAGER):
        client = web.client_as(role)
        assert client.get("/console/keys/counter").status_code == 403
