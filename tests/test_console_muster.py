"""The muster page (issue 12, items 3 and 6): who is inside each area, safe ticks, roles, CSRF, live fragment.

Through the real app (TestClient) on a real store (SQLite and PostgreSQL) holding real signed door events
projected into the registers, with real console users signing in through the form.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from accounts_fixtures import Clock
from accounts_fixtures import Site as AccountsSite
from fastapi.testclient import TestClient
from reports_fixtures import T0
from reports_fixtures import Site as EventSite

from sekisho.controller.accounts.roles import Role
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import ControllerConfig
from sekisho.controller.store import Store

if TYPE_CHECKING:
    from store_fixtures import MakeAgent


class Muster:
    """Events signed into a store (the demo policy) and a production console app over it with users."""

    def __init__(self, tmp_path: Path, store: Store, make_agent: MakeAgent) -> None:
        self.events = EventSite(store, make_agent)
        config = ControllerConfig(
            profile="production", var_dir=tmp_path, ca_cert=tmp_path / "ca.pem", tls_cert=tmp_path / "c.pem",
            tls_key=tmp_path / "c.key", signing_key=tmp_path / "missing.key", api_auth_failures=1000,
        )  # fmt: skip
        self.web = AccountsSite(AppState(config, store, None, clock=Clock()), Clock())
        self.web.state.clock = self.web.clock
        self.store = store

    def signed_in(self, role: Role, login: str | None = None, areas: tuple[str, ...] = ()) -> TestClient:
        """Return a client signed in as a new user of the role."""
        login = self.web.user(role, login, areas)
        client = self.web.client()
        answer = self.web.sign_in(client, login)
        assert answer.status_code == 303, answer.text
        return client

    def audit_rows(self, action: str) -> list[tuple[str, str, str]]:
        """Return (actor, via, target) of the admin audit rows of an action."""
        with self.store.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT actor, via, target FROM admin_audit WHERE action = '" + action + "' ORDER BY id"
            ).all()
        return [(r[0], r[1], r[2]) for r in rows]


@pytest.fixture
def muster(tmp_path: Path, store: Store, make_agent: MakeAgent) -> Muster:
    site = Muster(tmp_path, store, make_agent)
    site.events.pass_door("p-0001", "entry", T0)
    site.events.pass_door("p-0003", "entry", T0 + timedelta(minutes=1))
    site.events.pass_door("p-0006", "entry", T0 + timedelta(minutes=2), visitor=True, escort="p-0002")
    site.events.project()
    return site


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def _section(page: str, area: str) -> str:
    start = page.index(f'id="area-{area}"')
    end = page.find("</section>", start)
    return page[start:end]


def test_muster_shows_names_per_area_controlled_first_in_japanese_and_english(muster: Muster) -> None:
    client = muster.signed_in(Role.FACILITY_MANAGER)
    page = client.get("/console/muster")
    assert page.status_code == 200, page.text
    text = page.text
    assert "在室者" in text
    # The controlled area (管理区域) comes before the handling area (取扱区域).
    assert text.index('id="area-a-hr-room"') < text.index('id="area-a-hr-desk"')
    room = _section(text, "a-hr-room")
    assert "管理区域" in room and "見本 太郎" in room and "みほん たろう" in room and "試験 次郎" in room
    assert "来訪 五郎" in room and "来訪者" in room and "見本 花子" in room  # the visitor and the escort
    assert 'title="ID: p-0001"' in room  # id on hover, not in the text
    assert re.search(r'class="count-inside">3<', room) and re.search(r'class="count-unconfirmed">3<', room)
    assert "誰もいません" in _section(text, "a-hr-desk")
    assert "2026/11/17 (火) 09:00" in room  # entry time in JST
    assert 'hx-trigger="every 5s"' in text or 'id="muster-refresh"' in text

    client.get("/console/lang/en?next=/console/muster")
    english = client.get("/console/muster").text
    assert "Who is inside" in english and "Controlled area" in english and "Not confirmed" in english
    assert "見本 太郎" in english  # names stay as written


def test_tick_is_recorded_shown_and_audited_and_can_be_undone(muster: Muster) -> None:
    client = muster.signed_in(Role.SECURITY)
    page = client.get("/console/muster")
    token = _csrf(page.text)
    answer = client.post(
        "/console/muster/confirm",
        data={"csrf_token": token, "area": "a-hr-room", "person": "p-0003", "action": "confirm"},
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/console/muster#area-a-hr-room"
    room = _section(client.get("/console/muster").text, "a-hr-room")
    assert re.search(r'class="count-safe">1<', room) and re.search(r'class="count-unconfirmed">2<', room)
    line = room[room.index('data-person="p-0003"') :]
    line = line[: line.index("</tr>")]
    assert "安全確認済み" in line and "試験 太郎 (security)" in line  # who confirmed, by name
    assert muster.audit_rows("muster.mark_safe") == [("user:security", "web", "area:a-hr-room/person:p-0003")]
    assert muster.events.reports.muster("a-hr-room")[0].lines[1].safe

    undo = client.post(
        "/console/muster/confirm",
        data={"csrf_token": token, "area": "a-hr-room", "person": "p-0003", "action": "clear"},
    )
    assert undo.status_code == 303
    assert muster.audit_rows("muster.clear_safe") == [("user:security", "web", "area:a-hr-room/person:p-0003")]
    assert not muster.events.reports.muster("a-hr-room")[0].lines[1].safe

    # Someone not inside cannot be ticked: refused, nothing recorded.
    outside = client.post(
        "/console/muster/confirm", data={"csrf_token": token, "area": "a-hr-room", "person": "p-0004"}
    )
    assert outside.status_code == 409
    assert len(muster.audit_rows("muster.mark_safe")) == 1


def test_auditor_sees_no_tick_control_and_a_forged_post_is_refused(muster: Muster) -> None:
    client = muster.signed_in(Role.AUDITOR)
    page = client.get("/console/muster")
    assert page.status_code == 200 and "見本 太郎" in page.text
    assert "/console/muster/confirm" not in page.text and "<button" not in _section(page.text, "a-hr-room")
    # The auditor's own session and its valid CSRF token (from the sign-out form) do not make a tick.
    token = _csrf(page.text)
    forged = client.post("/console/muster/confirm", data={"csrf_token": token, "area": "a-hr-room", "person": "p-0001"})
    assert forged.status_code == 403
    assert muster.audit_rows("muster.mark_safe") == []
    assert not muster.events.reports.muster("a-hr-room")[0].lines[0].safe


def test_tick_without_or_with_a_wrong_csrf_token_is_refused(muster: Muster) -> None:
    client = muster.signed_in(Role.FACILITY_MANAGER)
    client.get("/console/muster")
    form = {"area": "a-hr-room", "person": "p-0001"}
    assert client.post("/console/muster/confirm", data=form).status_code == 403
    assert client.post("/console/muster/confirm", data={**form, "csrf_token": "x" * 43}).status_code == 403
    assert muster.audit_rows("muster.mark_safe") == []
    assert not muster.events.reports.muster("a-hr-room")[0].lines[0].safe


def test_area_manager_sees_only_their_areas(muster: Muster) -> None:
    client = muster.signed_in(Role.AREA_MANAGER, "kanri", areas=("a-hr-desk",))
    page = client.get("/console/muster")
    assert page.status_code == 200
    assert 'id="area-a-hr-desk"' in page.text and 'id="area-a-hr-room"' not in page.text
    assert "見本 太郎" not in page.text
    assert client.get("/console/muster?area=a-hr-room").status_code == 403
    assert client.get("/console/muster/fragment?area=a-hr-room").status_code == 403
    assert client.get("/console/muster/print?area=a-hr-room").status_code == 403
    # Area managers hold no muster.confirm: no control, and a POST is refused.
    assert "/console/muster/confirm" not in page.text
    token = _csrf(page.text)
    refused = client.post(
        "/console/muster/confirm", data={"csrf_token": token, "area": "a-hr-desk", "person": "p-0001"}
    )
    assert refused.status_code == 403


def test_fragment_follows_new_entries_and_print_view_has_sign_off(muster: Muster) -> None:
    client = muster.signed_in(Role.FACILITY_MANAGER)
    before = client.get("/console/muster/fragment?area=a-hr-room")
    assert before.status_code == 200
    assert "<html" not in before.text and "見本 花子" not in before.text.split("付添者")[0]
    muster.events.pass_door("p-0002", "entry", T0 + timedelta(minutes=30))
    muster.events.project()
    after = client.get("/console/muster/fragment?area=a-hr-room").text
    assert re.search(r'class="count-inside">4<', after) and 'data-person="p-0002"' in after
    printed = client.get("/console/muster/print").text
    assert "署名" in printed and "見本 太郎（みほん たろう）" in printed and "印刷者" in printed
    assert "/console/muster/confirm" not in printed
    assert client.get("/console/muster?area=no-such-area").status_code == 404
