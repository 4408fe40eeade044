"""The alerts pages and the alerts API (issue 13): list, filters, detail, acknowledge / resolve / reopen, silences,
the wall board, roles and CSRF, and the live stream.

Alerts are raised from real signed events (the demo site's door agent and terminals) stored in a real store
(SQLite and PostgreSQL) and read by the real AlertEngine; console users sign in through the real form. The
streams are read from a real HTTP server (uvicorn on a loopback port) with a bounded wait.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import uvicorn
from accounts_fixtures import Clock
from accounts_fixtures import Site as AccountsSite
from fastapi.testclient import TestClient
from reports_fixtures import T0
from reports_fixtures import Site as EventSite
from sqlalchemy import select

from sekisho.controller.accounts.roles import Role
from sekisho.controller.alerts.delivery import Channels, DeliveryJob
from sekisho.controller.alerts.engine import AlertEngine
from sekisho.controller.alerts.escalate import queue
from sekisho.controller.alerts.plan import Position
from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import AlertsConfig, ControllerConfig
from sekisho.controller.store import Store
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.models import AdminAuditEntry, Alert, AlertNotification
from sekisho.protocol import mynumber

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

# Obviously made up (sequential digits), completed with the check digit at run time so the guard must refuse it.
FAKE_MY_NUMBER = "12345678901" + str(mynumber.check_digit("12345678901"))
PAGE = "/console/alerts"


class Alerts:
    """Signed events in a store with the demo policy, the alert engine over them, and the console app with users."""

    def __init__(self, tmp_path: Path, store: Store, make_agent: MakeAgent) -> None:
        self.events = EventSite(store, make_agent)
        config = ControllerConfig(
            profile="production", var_dir=tmp_path, ca_cert=tmp_path / "ca.pem", tls_cert=tmp_path / "c.pem",
            tls_key=tmp_path / "c.key", signing_key=tmp_path / "missing.key", api_auth_failures=1000,
        )  # fmt: skip
        self.clock = Clock()
        self.state = AppState(config, store, None, clock=self.clock)
        self.web = AccountsSite(self.state, self.clock)
        # Wired as the controller wires them: the engine rings the app's bell when it changed alerts.
        self.engine = AlertEngine(store, clock=self.clock, on_change=self.state.alert_bell.ring)
        self.store = store
        self._logins = 0
        self.last_login = ""

    def signed_in(self, role: Role) -> TestClient:
        """Return a client signed in through the form as a new user of the role."""
        self._logins += 1
        login = self.web.user(role, f"{role.value.replace('_', '-')}-{self._logins}")
        self.last_login = login
        client = self.web.client()
        answer = self.web.sign_in(client, login)
        assert answer.status_code == 303, answer.text
        return client

    def api(self, role: Role) -> TestClient:
        """Return an API client with a personal token of a new user of the role."""
        self._logins += 1
        login = self.web.user(role, f"api-{role.value.replace('_', '-')}-{self._logins}")
        token = self.state.accounts.create_token(login, "test", None, by="test").token
        return TestClient(create_app(self.state), base_url="https://testserver",
                          headers={"Authorization": f"Bearer {token}"}, follow_redirects=False)  # fmt: skip

    def alarm(self, kind: str, minute: int, *, cleared: bool = False) -> None:
        """The door agent reports (or clears) an alarm at the controlled room's door."""
        at = T0 + timedelta(minutes=minute)
        self.events.send("door.alarm_cleared" if cleared else "door.alarm", {"door": "room-hr", "alarm": kind}, at)

    def follow(self) -> None:
        """Let the alert engine read what was stored."""
        self.engine.follow()

    def alert(self, rule: str) -> Any:
        """Return the (newest) alert of a rule."""
        with self.store.engine.connect() as conn:
            row = conn.execute(
                select(*Alert.__table__.columns).where(Alert.rule == rule).order_by(Alert.id.desc()).limit(1)
            ).first()
        assert row is not None, rule
        return row

    def trail(self, alert_id: int) -> list[tuple[str, str, str]]:
        """Return (action, actor, via) of the admin-trail rows about an alert."""
        t = AdminAuditEntry.__table__.c
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(t.action, t.actor, t.via).where(t.target == f"alert:{alert_id}").order_by(t.id))
            return [(r.action, r.actor, r.via) for r in rows]


@pytest.fixture
def site(tmp_path: Path, store: Store, make_agent: MakeAgent) -> Alerts:
    """Four alerts from real events: a forced door (critical, still active), a door held open (high, cleared),
    a passback denial (medium), and a blocked USB stick (medium) that security already resolved."""
    s = Alerts(tmp_path, store, make_agent)
    s.alarm("forced_open", 0)
    s.alarm("held_open", 1)
    s.alarm("held_open", 2, cleared=True)
    s.events.send(
        "door.access_denied",
        {"door": "room-hr", "reason": "passback", "card_masked": "****-0001", "person": "p-0001"},
        T0 + timedelta(minutes=3),
    )
    s.events.usb("usb.blocked", T0 + timedelta(minutes=4))
    s.follow()
    usb = s.alert("usb_blocked")
    client = s.api(Role.SECURITY)
    done = client.post(f"/api/v1/alerts/{usb.id}/resolve", json={"note": "本人に確認、私物", "cause": "operational"})
    assert done.status_code == 200, done.text
    return s


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def _row(page: str, alert_id: int) -> str:
    start = page.index(f'id="alert-{alert_id}"')
    return page[start : page.index("</tr>", start)]


def _order(page: str) -> list[int]:
    return [int(x) for x in re.findall(r'data-alert-id="(\d+)"', page)]


# --- the list --------------------------------------------------------------------------------------------


def test_the_list_shows_unresolved_first_by_severity_with_names_times_and_states(site: Alerts) -> None:
    forced, held = site.alert("door_forced"), site.alert("door_held_open")
    passback, usb = site.alert("passback"), site.alert("usb_blocked")
    client = site.signed_in(Role.SECURITY)
    page = client.get(PAGE)
    assert page.status_code == 200, page.text
    text = page.text
    assert "<h1>アラート</h1>" in text
    assert _order(text) == [forced.id, held.id, passback.id, usb.id]
    row = _row(text, forced.id)
    assert "緊急" in row and "扉のこじ開け: 人事部 管理区域 扉" in row
    assert 'title="ID: room-hr"' in row and 'title="ID: a-hr-room"' in row  # ids on hover only
    assert "2026/11/17 (火) 09:00" in row  # first seen, JST
    assert "未対応" in row and "状態が継続中" in row
    # A cleared condition is not a resolution: the held-open alert is still unresolved, its condition cleared.
    held_row = _row(text, held.id)
    assert "状態は解消" in held_row and "未対応" in held_row and "解決済み" not in held_row
    assert "解決済み" in _row(text, usb.id)
    assert "見本 太郎" in _row(text, passback.id) and 'title="ID: p-0001"' in _row(text, passback.id)
    # Live: the table names its stream, and the page has a refresh link and the script for the live part.
    assert 'data-stream="/console/alerts/stream?since=' in text and 'id="alerts-refresh"' in text
    assert '<script src="/console/static/alerts.js" defer></script>' in text
    assert "/console/alerts/board" in text and "/console/alerts/silences" in text
    # Never a bulk clear: no form on the list changes anything.
    assert 'method="post"' not in text.split('<main id="main"', 1)[1]

    client.get("/console/lang/en?next=/console/alerts")
    english = client.get(PAGE).text
    assert "Door forced open: 人事部 管理区域 扉" in english and "Critical" in english
    assert "Not acknowledged" in english and "Condition cleared" in english and "Resolved" in english
    assert "Tue 17 Nov 2026 09:00" in english


def test_filters_narrow_the_list_and_pages_follow_the_keyset(site: Alerts) -> None:
    forced, held = site.alert("door_forced"), site.alert("door_held_open")
    passback, usb = site.alert("passback"), site.alert("usb_blocked")
    client = site.signed_in(Role.AUDITOR)
    cases = {
        "state=resolved": [usb.id],
        "state=unresolved": [forced.id, held.id, passback.id],
        "state=open&severity=critical": [forced.id],
        "rule=passback": [passback.id],
        "door=room-hr": [forced.id, held.id, passback.id],
        "person=p-0001": [passback.id],
        "terminal=t-hr-01": [usb.id],
        "area=a-hr-room&severity=high": [held.id],
        "from=2026-11-17&to=2026-11-17": [forced.id, held.id, passback.id, usb.id],
        "from=2026-11-18": [],
        "state=&severity=&rule=&door=": [forced.id, held.id, passback.id, usb.id],  # the form's empty fields
    }
    for query, expected in cases.items():
        page = client.get(f"{PAGE}?{query}")
        assert page.status_code == 200, (query, page.text)
        assert _order(page.text) == expected, query
        if not expected:
            assert "条件に合うアラートはありません" in page.text
    assert client.get(f"{PAGE}?severity=urgent").status_code == 400
    assert client.get(f"{PAGE}?rule=no_such_rule").status_code == 422
    stale = client.get(f"{PAGE}?cursor=bm90LWEtY3Vyc29y")
    assert stale.status_code == 422 and "最初のページから" in stale.text

    # The API pages through the same order one alert at a time, each page starting after the last one shown.
    api = site.api(Role.AUDITOR)
    seen: list[int] = []
    cursor = ""
    for _ in range(10):
        answer = api.get("/api/v1/alerts", params={"limit": 1, "cursor": cursor})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        seen += [item["id"] for item in body["items"]]
        if body["next_cursor"] is None:
            break
        cursor = body["next_cursor"]
    assert seen == [forced.id, held.id, passback.id, usb.id]
    assert api.get("/api/v1/alerts", params={"state": "open", "door": "room-hr"}).json()["items"][0]["id"] == forced.id
    assert api.get("/api/v1/alerts", params={"cursor": "bm90LWEtY3Vyc29y"}).status_code == 422
    assert api.get("/api/v1/alerts", params={"limit": 501}).status_code == 422


# --- one alert -------------------------------------------------------------------------------------------


def test_the_detail_page_shows_what_where_the_procedure_events_history_and_timelines(site: Alerts) -> None:
    forced = site.alert("door_forced")
    client = site.signed_in(Role.SECURITY)
    page = client.get(f"{PAGE}/{forced.id}")
    assert page.status_code == 200, page.text
    text = page.text
    assert "扉のこじ開け: 人事部 管理区域 扉" in text and "緊急" in text
    assert "対応手順" in text and 'id="alert-procedure"' in text
    assert 'href="/console/timeline/door/room-hr?from=2026-11-17&amp;to=2026-11-17"' in text
    assert 'href="/console/timeline/area/a-hr-room?from=2026-11-17&amp;to=2026-11-17"' in text
    events = text[text.index('id="alert-events"') :]
    events = events[: events.index("</table>")]
    assert "警報" in events and "door-hr-01" in events and "人事部 管理区域 扉" in events and "forced_open" in events
    assert "2026/11/17 (火) 09:00:00" in events
    history = text[text.index('id="alert-history"') :]
    assert "発生" in history and "sekisho（自動）" in history
    # The security user gets the forms; the condition is active, so resolving asks for an override.
    assert f'action="/console/alerts/{forced.id}/acknowledge"' in text
    assert 'name="override"' in text and "継続中のまま解決する理由" in text
    for cause in ("侵入", "誤報", "機器の故障"):
        assert cause in text
    # The held-open alert's condition has cleared: no override field.
    held = client.get(f"{PAGE}/{site.alert('door_held_open').id}").text
    assert 'name="override"' not in held and "状態は解消" in held
    assert client.get(f"{PAGE}/999999").status_code == 404


def test_security_acknowledges_with_a_comment_and_resolves_with_an_override_through_the_forms(site: Alerts) -> None:
    forced = site.alert("door_forced")
    client = site.signed_in(Role.SECURITY)
    login = site.last_login
    token = _csrf(client.get(f"{PAGE}/{forced.id}").text)
    url = f"{PAGE}/{forced.id}"

    empty = client.post(f"{url}/acknowledge", data={"csrf_token": token, "comment": "   "})
    assert empty.status_code == 422 and "コメントを入力してください" in empty.text
    assert site.alert("door_forced").state == "open"

    ok = client.post(f"{url}/acknowledge", data={"csrf_token": token, "comment": "警備員が扉へ向かいます"})
    assert ok.status_code == 303 and ok.headers["location"] == url
    after = site.alert("door_forced")
    assert (after.state, after.acked_by, after.ack_comment) == (
        "acknowledged",
        f"user:{login}",
        "警備員が扉へ向かいます",
    )
    again = client.post(f"{url}/acknowledge", data={"csrf_token": token, "comment": "二度目"})
    assert again.status_code == 409 and "すでに対応中または解決済み" in again.text

    # The door is still forced open: resolving without saying why is refused, with the reason on the page.
    refused = client.post(f"{url}/resolve", data={"csrf_token": token, "note": "異常なし", "cause": "false_alarm"})
    assert refused.status_code == 409 and "状態がまだ継続しています" in refused.text
    assert "異常なし" in refused.text  # what was typed is kept
    assert site.alert("door_forced").state == "acknowledged"
    bad_cause = client.post(f"{url}/resolve", data={"csrf_token": token, "note": "x", "cause": "weather"})
    assert bad_cause.status_code == 422 and "原因を一覧から選んでください" in bad_cause.text

    resolved = client.post(
        f"{url}/resolve",
        data={
            "csrf_token": token,
            "note": "扉を確認、施錠済み",
            "cause": "false_alarm",
            "override": "センサー不良、交換手配済み",
        },
    )
    assert resolved.status_code == 303
    done = site.alert("door_forced")
    assert (done.state, done.cause, done.override, done.resolved_by) == (
        "resolved", "false_alarm", "センサー不良、交換手配済み", f"user:{login}",
    )  # fmt: skip
    page = client.get(url).text
    assert "解決済み" in page and "誤報" in page and "センサー不良、交換手配済み" in page
    assert f'action="{url}/reopen"' in page and f'action="{url}/resolve"' not in page
    history = page[page.index('id="alert-history"') :]
    assert history.index("対応中") < history.index("解決済み") and "警備員が扉へ向かいます" in history
    assert "試験 太郎" in history  # who, by name (the login on hover)

    no_reason = client.post(f"{url}/reopen", data={"csrf_token": token, "reason": ""})
    assert no_reason.status_code == 422 and "理由を入力してください" in no_reason.text
    reopened = client.post(f"{url}/reopen", data={"csrf_token": token, "reason": "カメラ映像で人影を確認"})
    assert reopened.status_code == 303 and site.alert("door_forced").state == "open"
    assert [a for a, _, _ in site.trail(forced.id)][-3:] == ["alert.acknowledged", "alert.resolved", "alert.reopened"]
    assert site.trail(forced.id)[-1][1:] == (f"user:{login}", "web")


def test_a_cleared_condition_resolves_without_an_override(site: Alerts) -> None:
    held = site.alert("door_held_open")
    client = site.signed_in(Role.IT_ADMIN)
    token = _csrf(client.get(f"{PAGE}/{held.id}").text)
    answer = client.post(
        f"{PAGE}/{held.id}/resolve", data={"csrf_token": token, "note": "閉扉を確認", "cause": "operational"}
    )
    assert answer.status_code == 303
    assert (site.alert("door_held_open").state, site.alert("door_held_open").override) == ("resolved", None)


def test_a_my_number_in_a_comment_is_refused_and_never_echoed(site: Alerts) -> None:
    forced = site.alert("door_forced")
    client = site.signed_in(Role.SECURITY)
    token = _csrf(client.get(f"{PAGE}/{forced.id}").text)
    answer = client.post(
        f"{PAGE}/{forced.id}/acknowledge", data={"csrf_token": token, "comment": f"番号 {FAKE_MY_NUMBER} の人"}
    )
    assert answer.status_code == 422 and "マイナンバー" in answer.text
    assert FAKE_MY_NUMBER not in answer.text
    assert site.alert("door_forced").state == "open"
    assert [a for a, _, _ in site.trail(forced.id)] == ["alert.opened"]
    api = site.api(Role.SECURITY).post(f"/api/v1/alerts/{forced.id}/acknowledge", json={"comment": FAKE_MY_NUMBER})
    assert api.status_code == 422 and FAKE_MY_NUMBER not in api.text


def test_a_post_without_or_with_a_forged_csrf_token_is_refused(site: Alerts) -> None:
    forced = site.alert("door_forced")
    client = site.signed_in(Role.SECURITY)
    client.get(f"{PAGE}/{forced.id}")
    form = {"comment": "向かいます"}
    assert client.post(f"{PAGE}/{forced.id}/acknowledge", data=form).status_code == 403
    forged = client.post(f"{PAGE}/{forced.id}/acknowledge", data={**form, "csrf_token": "x" * 43})
    assert forged.status_code == 403
    assert site.alert("door_forced").state == "open"


@pytest.mark.parametrize("role", [Role.AUDITOR, Role.FACILITY_MANAGER])
def test_a_reader_sees_the_alerts_without_controls_and_its_post_is_refused(site: Alerts, role: Role) -> None:
    forced = site.alert("door_forced")
    client = site.signed_in(role)
    page = client.get(f"{PAGE}/{forced.id}")
    assert page.status_code == 200 and "扉のこじ開け" in page.text
    assert "/acknowledge" not in page.text and "/resolve" not in page.text and 'id="alert-actions"' not in page.text
    silences = client.get(f"{PAGE}/silences").text
    assert 'id="silence-form"' not in silences
    # Its own session with its valid CSRF token (the sign-out form carries it) does not make it a handler.
    token = _csrf(page.text)
    refused = client.post(f"{PAGE}/{forced.id}/acknowledge", data={"csrf_token": token, "comment": "見ました"})
    assert refused.status_code == 403
    assert client.post(f"{PAGE}/silences", data={"csrf_token": token, "reason": "x"}).status_code == 403
    assert site.alert("door_forced").state == "open" and len(site.trail(forced.id)) == 1
    api = site.api(role)
    assert api.get(f"/api/v1/alerts/{forced.id}").status_code == 200
    assert api.post(f"/api/v1/alerts/{forced.id}/acknowledge", json={"comment": "見ました"}).status_code == 403


def test_an_area_manager_has_no_alerts(site: Alerts) -> None:
    client = site.signed_in(Role.AREA_MANAGER)
    assert client.get(PAGE).status_code == 403
    assert client.get(f"{PAGE}/board").status_code == 403
    assert 'href="/console/alerts"' not in client.get("/console/muster").text


# --- silences and the board -------------------------------------------------------------------------------


def test_silences_are_added_listed_and_ended_with_who_and_why(site: Alerts) -> None:
    client = site.signed_in(Role.SECURITY)
    page = client.get(f"{PAGE}/silences")
    assert page.status_code == 200 and "実施中・予定の通知停止や保守作業はありません" in page.text
    token = _csrf(page.text)
    form = {"csrf_token": token, "kind": "maintenance", "door": "room-hr", "starts": "2026-12-07T10:00",
            "ends": "2026-12-07T12:00", "reason": "保守業者による錠交換"}  # fmt: skip
    everything = client.post(f"{PAGE}/silences", data={**form, "door": ""})
    assert everything.status_code == 422 and "すべてを止める通知停止はできません" in everything.text
    backwards = client.post(f"{PAGE}/silences", data={**form, "ends": "2026-12-07T09:00"})
    assert backwards.status_code == 422 and "終了は開始より後" in backwards.text
    added = client.post(f"{PAGE}/silences", data=form)
    assert added.status_code == 303
    listed = client.get(f"{PAGE}/silences").text
    table = listed[listed.index('id="silences"') :]
    assert "保守作業" in table and "人事部 管理区域 扉" in table and "保守業者による錠交換" in table
    assert "2026/12/07 (月) 10:00" in table and "2026/12/07 (月) 12:00" in table  # JST as typed
    api = site.api(Role.AUDITOR).get("/api/v1/alerts/silences").json()
    assert [(s["kind"], s["matchers"], s["starts_at"]) for s in api] == [
        ("maintenance", {"door": "room-hr"}, "2026-12-07T10:00:00+09:00")
    ]
    silence_id = api[0]["id"]
    ended = client.post(f"{PAGE}/silences/{silence_id}/end", data={"csrf_token": token})
    assert ended.status_code == 303
    assert "実施中・予定の通知停止や保守作業はありません" in client.get(f"{PAGE}/silences").text
    twice = client.post(f"{PAGE}/silences/{silence_id}/end", data={"csrf_token": token})
    assert twice.status_code == 409 and "すでに終了" in twice.text
    t = AdminAuditEntry.__table__.c
    with site.store.engine.connect() as conn:
        rows = conn.execute(select(t.action, t.actor).where(t.target == f"silence:{silence_id}").order_by(t.id)).all()
    assert [tuple(r) for r in rows] == [
        ("alert.maintenance.create", f"user:{site.last_login}"),
        ("alert.maintenance.end", f"user:{site.last_login}"),
    ]


def test_the_wall_board_shows_doors_open_alerts_by_severity_keys_and_agents(site: Alerts) -> None:
    site.events.send("door.opened", {"door": "room-hr", "forced": True}, T0 + timedelta(minutes=5))
    site.events.take("p-0002", 1, "k-cabinet-hr", T0 + timedelta(minutes=6))
    site.events.project()
    client = site.signed_in(Role.SECURITY)
    page = client.get(f"{PAGE}/board")
    assert page.status_code == 200, page.text
    text = page.text
    assert "状況表示ボード" in text and 'class="site-nav"' not in text and "<form" not in text  # no controls
    assert 'data-refresh="/console/alerts/board/fragment"' in text
    panels = client.get(f"{PAGE}/board/fragment").text
    assert "<html" not in panels

    def figure(tile: str) -> str:
        part = panels[panels.index(f'id="{tile}"') :]
        found = re.search(r'class="board-figure">(\d+)<', part)
        assert found, tile
        return found.group(1)

    assert figure("board-doors") == "1" and figure("board-keys") == "1"
    assert figure("board-alerts") == "3"  # forced, held open, passback; the resolved USB alert is not counted
    critical = panels[panels.index('id="board-severity-critical"') :]
    assert re.search(r'class="board-count">1<', critical[: critical.index("</li>")])
    assert 'id="board-agents"' in panels  # security reads the fleet
    fm = site.signed_in(Role.FACILITY_MANAGER).get(f"{PAGE}/board/fragment").text
    assert 'id="board-doors"' in fm and 'id="board-agents"' not in fm  # no fleet.read: left out, not empty


# --- the API --------------------------------------------------------------------------------------------


def test_the_api_reads_and_changes_alerts_with_the_token_as_operator(site: Alerts) -> None:
    forced = site.alert("door_forced")
    api = site.api(Role.SECURITY)
    one = api.get(f"/api/v1/alerts/{forced.id}")
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["alert"]["title"] == {"ja": "扉のこじ開け: room-hr", "en": "Door forced open: room-hr"}
    assert body["alert"]["first_at"] == "2026-11-17T09:00:00+09:00"
    assert body["events"][0]["summary"] == {"door": "room-hr", "alarm": "forced_open"}
    assert [h["action"] for h in body["history"]] == ["alert.opened"]
    assert api.get("/api/v1/alerts/999999").status_code == 404

    acked = api.post(f"/api/v1/alerts/{forced.id}/acknowledge", json={"comment": "向かいます"})
    assert acked.status_code == 200 and acked.json()["state"] == "acknowledged"
    assert acked.json()["acked_by"].startswith("token:api-security-")
    assert api.post(f"/api/v1/alerts/{forced.id}/acknowledge", json={"comment": "again"}).status_code == 409
    assert api.post(f"/api/v1/alerts/{forced.id}/acknowledge", json={}).status_code == 422
    active = api.post(f"/api/v1/alerts/{forced.id}/resolve", json={"note": "確認", "cause": "test"})
    assert active.status_code == 409 and "override" in active.json()["detail"]
    resolved = api.post(
        f"/api/v1/alerts/{forced.id}/resolve", json={"note": "確認", "cause": "test", "override": "試験のため"}
    )
    assert resolved.status_code == 200 and resolved.json()["state"] == "resolved"
    reopened = api.post(f"/api/v1/alerts/{forced.id}/reopen", json={"reason": "再確認"})
    assert reopened.status_code == 200 and reopened.json()["state"] == "open"
    assert api.post("/api/v1/alerts/999999/acknowledge", json={"comment": "x"}).status_code == 404
    assert [a for a, _, via in site.trail(forced.id) if via == "api"] == [
        "alert.acknowledged", "alert.resolved", "alert.reopened",
    ]  # fmt: skip

    made = api.post(
        "/api/v1/alerts/silences",
        json={"kind": "silence", "rule": "usb_blocked", "ends_at": "2026-12-07T18:00:00+09:00", "reason": "棚卸し"},
    )
    assert made.status_code == 201, made.text
    assert made.json()["created_by"].startswith("token:api-security-")
    assert (
        api.post("/api/v1/alerts/silences", json={"ends_at": "2026-12-07T18:00:00+09:00", "reason": "全部"}).status_code
        == 422
    )
    assert api.post(f"/api/v1/alerts/silences/{made.json()['id']}/end").json()["ended_at"] is not None


def test_a_dead_notification_is_listed_and_replayed(site: Alerts) -> None:
    forced = site.alert("door_forced")
    with write_transaction(site.store.engine) as conn:
        queue(conn, forced.id, "opened", 0, Position(0, 0), "email", "keibi@example.invalid", "guard", "ja",
              site.clock())  # fmt: skip
    # No SMTP relay configured: the delivery job fails it for good.
    DeliveryJob(site.store, Channels(), clock=site.clock).deliver()
    reader = site.api(Role.AUDITOR)
    dead = reader.get("/api/v1/alerts/notifications/dead").json()
    assert [(d["alert_id"], d["state"], d["target"]) for d in dead] == [(forced.id, "dead", "keibi@example.invalid")]
    assert "SMTP" in dead[0]["last_error"]
    assert reader.post(f"/api/v1/alerts/notifications/{dead[0]['id']}/replay").status_code == 403
    handler = site.api(Role.IT_ADMIN)
    assert handler.post(f"/api/v1/alerts/notifications/{dead[0]['id']}/replay").status_code == 202
    with site.store.engine.connect() as conn:
        state = conn.execute(select(AlertNotification.state).where(AlertNotification.id == dead[0]["id"])).scalar_one()
    assert state == "pending" and reader.get("/api/v1/alerts/notifications/dead").json() == []
    assert handler.post(f"/api/v1/alerts/notifications/{dead[0]['id']}/replay").status_code == 409
    action, actor, via = site.trail(forced.id)[-1]
    assert (action, actor.startswith("token:api-it-admin-"), via) == ("alert.notification_replayed", True, "api")


# --- the live streams (a real HTTP server) ----------------------------------------------------------------


class Server:
    """The controller's app served by uvicorn on a loopback port in a thread."""

    def __init__(self, state: AppState) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture
def served(site: Alerts) -> Iterator[Server]:
    with Server(site.state) as running:
        yield running


class Stream:
    """One SSE connection read line by line, every read bounded by the socket's timeout."""

    def __init__(self, port: int, path: str, headers: dict[str, str]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream", **headers})
        self.response = self.conn.getresponse()

    def events(self, until: float) -> Iterator[tuple[str, str]]:
        """Yield (event name, data) as they arrive, until the deadline (monotonic seconds)."""
        name, data = "message", []
        while time.monotonic() < until:
            line = self.response.readline().decode()
            if not line:
                return
            line = line.rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                yield name, "\n".join(data)
                name, data = "message", []
            elif line.startswith(": connected"):
                yield "connected", ""

    def close(self) -> None:
        self.conn.close()


def test_the_api_stream_sends_a_change_made_after_it_opened(site: Alerts, served: Server) -> None:
    forced = site.alert("door_forced")
    token = site.state.accounts.create_token(site.web.user(Role.AUDITOR, "stream-reader"), "s", None, by="t").token
    stream = Stream(served.port, "/api/v1/alerts/stream?max_s=60", {"Authorization": f"Bearer {token}"})
    try:
        assert stream.response.status == 200
        assert stream.response.getheader("content-type", "").startswith("text/event-stream")
        events = stream.events(time.monotonic() + 30)
        assert next(events) == ("connected", "")
        # Opened now: what existed before is not sent again; the acknowledgement made next is.
        handler = site.api(Role.SECURITY)
        assert (
            handler.post(f"/api/v1/alerts/{forced.id}/acknowledge", json={"comment": "向かいます"}).status_code == 200
        )
        name, data = next(e for e in events if e[0] == "alert")
        change = json.loads(data)
        assert name == "alert"
        assert (change["id"], change["state"], change["version"]) == (forced.id, "acknowledged", forced.version + 1)
        assert set(change) == {"id", "version", "rule", "severity", "state", "condition", "count", "labels",
                               "updated_at"}  # fmt: skip
        assert change["labels"]["door"] == "room-hr" and change["updated_at"].endswith("+09:00")
        # A new alert from a new event reaches the stream too.
        site.alarm("tamper", 10)
        site.follow()
        name, data = next(e for e in events if e[0] == "alert")
        assert json.loads(data)["rule"] == "door_tamper"
    finally:
        stream.close()


def test_the_engine_bell_brings_a_new_alert_to_an_open_stream_without_waiting_for_the_poll(site: Alerts) -> None:
    # A poll interval of a minute: only the engine's ring can bring a change within the socket's 10 s timeout.
    site.state.config = site.state.config.model_copy(update={"alerts": AlertsConfig(stream_poll_s=60)})
    token = site.state.accounts.create_token(site.web.user(Role.AUDITOR, "bell-reader"), "s", None, by="t").token
    with Server(site.state) as served:
        stream = Stream(served.port, "/api/v1/alerts/stream?max_s=120", {"Authorization": f"Bearer {token}"})
        try:
            events = stream.events(time.monotonic() + 30)
            assert next(events) == ("connected", "")
            for kind, rule in (("tamper", "door_tamper"), ("relay_fault", "relay_fault")):
                # The second one certainly finds the stream waiting: it has just sent the first.
                site.alarm(kind, 10)
                site.follow()
                name, data = next(e for e in events if e[0] == "alert")
                assert (name, json.loads(data)["rule"]) == ("alert", rule)
                assert site.state.alert_bell.listeners == 1
        finally:
            stream.close()


def test_the_console_stream_sends_rows_that_pass_the_filter_and_removes_those_that_leave_it(
    site: Alerts, served: Server
) -> None:
    forced, passback = site.alert("door_forced"), site.alert("passback")
    client = site.signed_in(Role.SECURITY)
    page = client.get(f"{PAGE}?state=unresolved").text
    stream_path = re.search(r'data-stream="([^"]+)"', page)
    assert stream_path and "state=unresolved" in stream_path.group(1)
    path = stream_path.group(1).replace("&amp;", "&") + "&max_s=60"
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    stream = Stream(served.port, path, {"Cookie": cookie})
    try:
        assert stream.response.status == 200
        events = stream.events(time.monotonic() + 30)
        assert next(events) == ("connected", "")
        api = site.api(Role.SECURITY)
        assert api.post(f"/api/v1/alerts/{forced.id}/acknowledge", json={"comment": "向かいます"}).status_code == 200
        assert (
            api.post(f"/api/v1/alerts/{passback.id}/resolve", json={"note": "誤操作", "cause": "misuse"}).status_code
            == 200
        )
        # The stream starts at the page's as-of: rows already shown may come again (same version, the script
        # skips them); then the acknowledged row and the removal of the resolved one.
        found: dict[tuple[str, int], dict[str, Any]] = {}
        for name, data in events:
            change = json.loads(data)
            found[(name, change["id"])] = change
            acked = found.get(("alert", forced.id), {}).get("version") == forced.version + 1
            if acked and ("gone", passback.id) in found:
                break
        row = found[("alert", forced.id)]
        assert row["version"] == forced.version + 1 and row["state"] == "acknowledged", found
        assert ("gone", passback.id) in found, found
        assert row["html"].startswith(f'<tr id="alert-{forced.id}"') and "対応中" in row["html"]
        assert row["key"][:2] == [0, 0]  # unresolved, critical: the script sorts new rows with it
    finally:
        stream.close()
    # A stream opened with max_s=0 gives only its opening lines and ends (what a probe or the role matrix uses).
    short = client.get("/console/alerts/stream?max_s=0")
    assert short.status_code == 200 and short.text.startswith("retry: ")
