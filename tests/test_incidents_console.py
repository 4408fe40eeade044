"""Incident records in the console and the API (issue 13): drafted from one alert or several, the report form
with CSRF and optimistic locking, the My Number guard, the status forward only after a confirmation, deadlines
and "overdue" in words, linking more alerts, the PDF and its export row in the admin trail, read-only roles,
and the undelivered-notification list with its replay button.

Alerts come from real signed events through the real AlertEngine (as tests/test_alerts_console.py raises them);
users sign in through the real form; SQLite and PostgreSQL through the ``store`` fixture. Forms are submitted as
a browser would: read from the served page (every input, textarea and ticked box), changed, posted.
"""

from __future__ import annotations

import io
import re
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from accounts_fixtures import PASSWORD
from fastapi.testclient import TestClient
from pypdf import PdfReader
from reports_fixtures import JST, T0
from sqlalchemy import select
from test_alerts_console import Alerts

from sekisho.controller.accounts.roles import ADMIN_ROLES, Role
from sekisho.controller.alerts import incidents
from sekisho.controller.alerts.delivery import Channels, DeliveryJob
from sekisho.controller.alerts.escalate import queue
from sekisho.controller.alerts.plan import Position
from sekisho.controller.api import incidents as incidents_api
from sekisho.controller.console import i18n
from sekisho.controller.console.incidents_web import FIELD_LABELS
from sekisho.controller.store import Store
from sekisho.controller.store.audit import Operator
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.models import AdminAuditEntry, AlertNotification, Incident
from sekisho.protocol import mynumber

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

# Obviously made up (repeated digits), completed with its check digit at run time: the guard must refuse it.
NOT_A_REAL_NUMBER = "11112222333" + str(mynumber.check_digit("11112222333"))
PAGE = "/console/incidents"
SETUP = Operator("user:setup", "cli")


class Incidents(Alerts):
    """The alerts test site, with users of chosen names (so a page can be seen naming the other editor)."""

    def person(self, role: Role, login: str, name: str, kana: str) -> TestClient:
        """Create a user of the role with this name, sign it in through the form, return its client."""
        self.state.accounts.create_user(
            login=login, display_name=name, kana=kana, role=role, password=PASSWORD, areas=(), created_by="test"
        )
        if role in ADMIN_ROLES:
            self.web.totp_secrets[login], _ = self.state.accounts.enrol_totp(login, by="test")
        client = self.web.client()
        assert self.web.sign_in(client, login).status_code == 303
        return client

    def draft(self, alert_ids: list[int], title: str = "") -> int:
        """Draft a report through the service the console and the API call."""
        return incidents_api.create(self.state, SETUP, alert_ids, title)

    def incident(self, incident_id: int) -> Any:
        """Return the stored incident row."""
        with self.store.engine.connect() as conn:
            row = conn.execute(select(*Incident.__table__.columns).where(Incident.id == incident_id)).first()
        assert row is not None
        return row

    def incident_trail(self, incident_id: int) -> list[Any]:
        """Return the admin-trail rows about an incident (action, actor, via, detail)."""
        t = AdminAuditEntry.__table__.c
        with self.store.engine.connect() as conn:
            return list(
                conn.execute(
                    select(t.action, t.actor, t.via, t.detail)
                    .where(t.target == f"incident:{incident_id}")
                    .order_by(t.id)
                )
            )


@pytest.fixture
def site(tmp_path: Path, store: Store, make_agent: MakeAgent) -> Incidents:
    """Three alerts from real events: a forced door (critical), a door held open and closed again, a blocked stick."""
    s = Incidents(tmp_path, store, make_agent)
    s.alarm("forced_open", 0)
    s.alarm("held_open", 1)
    s.alarm("held_open", 2, cleared=True)
    s.events.usb("usb.blocked", T0 + timedelta(minutes=4))
    s.follow()
    return s


# --- reading pages and submitting their forms as a browser would -----------------------------------------


class FormReader(HTMLParser):
    """The fields one form of a page submits: inputs (ticked boxes only), textareas, and its action."""

    def __init__(self, form_id: str) -> None:
        super().__init__(convert_charrefs=True)
        self.form_id = form_id
        self.inside = False
        self.action = ""
        self.fields: list[tuple[str, str]] = []
        self._textarea: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "form" and found.get("id") == self.form_id:
            self.inside, self.action = True, found.get("action", "")
        elif not self.inside or "name" not in found:
            return
        elif tag == "input" and (found.get("type") not in ("checkbox", "radio") or "checked" in found):
            self.fields.append((found["name"], found.get("value", "")))
        elif tag == "textarea":
            self._textarea, self._text = found["name"], []

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea" and self._textarea is not None:
            self.fields.append((self._textarea, "".join(self._text)))
            self._textarea = None
        elif tag == "form" and self.inside:
            self.inside = False


def read_form(page: str, form_id: str) -> tuple[str, dict[str, list[str]]]:
    """Return a form's action and its fields as a browser would send them."""
    reader = FormReader(form_id)
    reader.feed(page)
    assert reader.action, f"no form {form_id}"
    fields: dict[str, list[str]] = {}
    for name, value in reader.fields:
        fields.setdefault(name, []).append(value)
    return reader.action, fields


def submit(client: TestClient, page: str, form_id: str, **changes: str | list[str]) -> Any:
    """Post a form of a page with some fields changed (a list for repeated fields)."""
    action, fields = read_form(page, form_id)
    for name, value in changes.items():
        fields[name] = value if isinstance(value, list) else [value]
    return client.post(action, data=fields)


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def _main(page: str) -> str:
    return page.split('<main id="main"', 1)[1]


def _part(page: str, element_id: str) -> str:
    start = page.index(f'id="{element_id}"')
    return page[start : start + 4000]


def _textarea(page: str, name: str) -> str:
    return dict(read_form(page, "incident-form")[1].items())[name][0]


# --- drafting -----------------------------------------------------------------------------------------------


def test_a_report_is_drafted_from_one_alert_on_its_page(site: Incidents) -> None:
    forced = site.alert("door_forced")
    client = site.signed_in(Role.SECURITY)
    login = site.last_login
    alert_page = client.get(f"/console/alerts/{forced.id}").text
    assert 'id="incident-form"' in alert_page and "このアラートを含む事案報告はありません" in alert_page
    assert client.post(PAGE, data={"alert": str(forced.id)}).status_code == 403  # no CSRF token

    made = submit(client, alert_page, "incident-form")
    assert made.status_code == 303, made.text
    incident_id = int(made.headers["location"].rsplit("/", 1)[1])
    assert made.headers["location"] == f"{PAGE}/{incident_id}"
    page = client.get(made.headers["location"]).text
    assert f"#{incident_id} 扉のこじ開け: room-hr" in page  # the alert's title when none is given
    assert "下書き" in page and f'href="/console/alerts/{forced.id}"' in page
    assert "2026/11/17 09:00 扉のこじ開け: room-hr" in _textarea(page, "summary")
    assert f"/console/incidents/{incident_id}.pdf" in page
    assert [(r.action, r.actor, r.via) for r in site.incident_trail(incident_id)] == [
        ("incident.create", f"user:{login}", "web")
    ]
    # The alert's page now names its report.
    assert f'href="/console/incidents/{incident_id}"' in client.get(f"/console/alerts/{forced.id}").text


def test_a_report_is_drafted_from_several_alerts_ticked_on_the_list(site: Incidents) -> None:
    forced, usb = site.alert("door_forced"), site.alert("usb_blocked")
    client = site.signed_in(Role.SECURITY)
    listing = client.get("/console/alerts").text
    # Ticked in the table, sent by one button of a GET form: the list itself still changes nothing.
    assert f'name="alert" value="{forced.id}" form="incident-pick"' in listing
    assert 'method="get" action="/console/incidents/new" id="incident-pick"' in listing
    assert 'method="post"' not in _main(listing)
    chosen = client.get(f"{PAGE}/new", params={"alert": [str(forced.id), str(usb.id)]})
    assert chosen.status_code == 200, chosen.text
    assert "扉のこじ開け" in chosen.text and "USB デバイスを遮断" in chosen.text
    made = submit(client, chosen.text, "incident-new", title="人事部 管理区域への侵入")
    assert made.status_code == 303, made.text
    incident_id = int(made.headers["location"].rsplit("/", 1)[1])
    found = incidents_api.read(site.state, incident_id)
    assert found["incident"].title == "人事部 管理区域への侵入"
    assert [a.id for a in found["alerts"]] == [forced.id, usb.id]

    nothing = client.get(f"{PAGE}/new")
    assert nothing.status_code == 422 and "アラートを 1 件以上選んでください" in nothing.text
    unknown = client.get(f"{PAGE}/new", params={"alert": "999999"})
    assert unknown.status_code == 422 and "その番号のアラートはありません" in unknown.text
    listed = client.get(PAGE).text
    row = listed[listed.index(f'id="incident-{incident_id}"') :]
    assert "人事部 管理区域への侵入" in row and re.search(r'<td class="num">2</td>', row[: row.index("</tr>")])

    auditor = site.signed_in(Role.AUDITOR)
    assert 'form="incident-pick"' not in auditor.get("/console/alerts").text
    assert auditor.get(f"{PAGE}/new", params={"alert": str(forced.id)}).status_code == 403


# --- the report form ----------------------------------------------------------------------------------------


def test_the_form_labels_are_the_ppc_forms_words_in_japanese_and_english_from_the_catalogue() -> None:
    for name, ja, en in incidents.REPORT_FIELDS:
        assert FIELD_LABELS[name] == en
        assert i18n.gettext("ja", en) == ja and i18n.gettext("en", en) == en


def test_the_report_form_saves_every_field_with_times_typed_in_jst(site: Incidents) -> None:
    forced, usb = site.alert("door_forced"), site.alert("usb_blocked")
    incident_id = site.draft([forced.id, usb.id])
    client = site.signed_in(Role.SECURITY)
    login = site.last_login
    page = client.get(f"{PAGE}/{incident_id}").text
    for _name, ja, _en in incidents.REPORT_FIELDS:
        assert ja in page
    assert 'name="version" value="1"' in page
    assert [e for e in read_form(page, "incident-form")[1]["ev_ref"]] == [f"alert:{forced.id}", f"alert:{usb.id}", ""]

    texts = {name: f"{ja}の記載\r\n二行目" for name, ja, _en in incidents.REPORT_FIELDS}
    answer = submit(
        client, page, "incident-form", title="人事部 管理区域への侵入", found_at="2026-11-17T09:05",
        occurred_at="2026-11-17T08:50", people_count="12", malicious="yes", ev_remove="1",
        ev_kind=["alert", "alert", "camera"], ev_ref=[f"alert:{forced.id}", f"alert:{usb.id}", "cam-3 08:45-09:10"],
        ev_note=["door_forced", "usb_blocked", "扉前の映像"], **texts,
    )  # fmt: skip
    assert answer.status_code == 303, answer.text
    row = site.incident(incident_id)
    assert row.found_at == datetime(2026, 11, 17, 9, 5, tzinfo=JST)  # a datetime-local input is JST
    assert row.occurred_at == datetime(2026, 11, 17, 8, 50, tzinfo=JST)
    assert (row.people_count, row.malicious, row.version, row.title) == (12, True, 2, "人事部 管理区域への侵入")
    assert row.report["cause"] == "原因の記載\n二行目"  # the browser's CRLF kept as the report's LF
    assert [e["ref"] for e in row.evidence] == [f"alert:{forced.id}", "cam-3 08:45-09:10"]
    trail = site.incident_trail(incident_id)
    assert [(r.action, r.actor, r.via) for r in trail][-1] == ("incident.update", f"user:{login}", "web")

    saved = client.get(f"{PAGE}/{incident_id}").text
    assert _textarea(saved, "prevention") == "再発防止のための措置の記載\n二行目"
    assert 'name="version" value="2"' in saved
    # Possibly intentional: the final report is due 60 days after discovery, shown in JST.
    assert "2027/01/16 (土) 09:05" in _part(saved, "incident-final")
    assert "2026/11/22 (日) 09:05" in _part(saved, "incident-preliminary")
    history = _part(saved, "incident-history")
    assert "変更" in history and "再発防止のための措置" in history

    # Saving again unchanged writes nothing (the times typed to the minute do not count as a change).
    assert submit(client, saved, "incident-form").status_code == 303
    assert site.incident(incident_id).version == 2 and len(site.incident_trail(incident_id)) == len(trail)

    client.get(f"/console/lang/en?next={PAGE}/{incident_id}")
    english = client.get(f"{PAGE}/{incident_id}").text
    assert "Measures against recurrence" in english and "Possibly intentional" in english
    assert "Sat 16 Jan 2027 09:05" in english


def test_a_stale_save_keeps_what_was_typed_and_names_who_changed_the_report(site: Incidents) -> None:
    incident_id = site.draft([site.alert("door_forced").id])
    hanako = site.person(Role.SECURITY, "keibi.hanako", "警備 花子", "けいび はなこ")
    ichiro = site.person(Role.IT_ADMIN, "joho.ichiro", "情報 一郎", "じょうほう いちろう")
    hanako_page = hanako.get(f"{PAGE}/{incident_id}").text
    ichiro_page = ichiro.get(f"{PAGE}/{incident_id}").text  # both read version 1

    assert submit(hanako, hanako_page, "incident-form", cause="扉の施錠不良").status_code == 303
    late = submit(ichiro, ichiro_page, "incident-form", cause="カードの貸し借り", prevention="入退室記録の定期確認")
    assert late.status_code == 409, late.text
    notice = _part(late.text, "incident-stale")
    assert "警備 花子" in notice and "2026/12/07 (月) 10:00" in notice
    # Ichiro's own text stays in the fields; the text saved now is shown under the field it differs in.
    assert _textarea(late.text, "cause") == "カードの貸し借り"
    assert _textarea(late.text, "prevention") == "入退室記録の定期確認"
    assert "扉の施錠不良" in _part(late.text, "saved-cause")
    assert 'id="saved-summary"' not in late.text  # unchanged there: nothing to compare
    assert 'name="version" value="2"' in late.text
    row = site.incident(incident_id)
    assert (row.report["cause"], row.report["prevention"], row.version) == ("扉の施錠不良", "", 2)

    # Having seen it, he saves on top of version 2.
    again = submit(ichiro, late.text, "incident-form", cause="扉の施錠不良、カードの貸し借り")
    assert again.status_code == 303, again.text
    row = site.incident(incident_id)
    assert (row.report["cause"], row.report["prevention"], row.version) == (
        "扉の施錠不良、カードの貸し借り", "入退室記録の定期確認", 3,
    )  # fmt: skip
    assert [r.actor for r in site.incident_trail(incident_id)][-2:] == ["user:keibi.hanako", "user:joho.ichiro"]


def test_a_my_number_typed_into_the_report_is_refused_and_never_echoed(site: Incidents) -> None:
    incident_id = site.draft([site.alert("door_forced").id])
    client = site.signed_in(Role.SECURITY)
    page = client.get(f"{PAGE}/{incident_id}").text
    for changes in (
        {"data_items": f"氏名、番号 {NOT_A_REAL_NUMBER}", "cause": "扉の施錠不良"},
        {"ev_note": ["door_forced", f"本人の番号 {NOT_A_REAL_NUMBER}"], "ev_kind": ["alert", "memo"],
         "ev_ref": [f"alert:{site.alert('door_forced').id}", "聞き取り"], "cause": "扉の施錠不良"},
    ):  # fmt: skip
        refused = submit(client, page, "incident-form", **changes)
        assert refused.status_code == 422, refused.text
        assert "マイナンバー" in refused.text and NOT_A_REAL_NUMBER not in refused.text
        assert _textarea(refused.text, "cause") == "扉の施錠不良"  # the rest of what was typed is kept
    assert site.incident(incident_id).version == 1
    assert [r.action for r in site.incident_trail(incident_id)] == ["incident.create"]
    api = site.api(Role.SECURITY).patch(
        f"/api/v1/incidents/{incident_id}", json={"version": 1, "changes": {"summary": NOT_A_REAL_NUMBER}}
    )
    assert api.status_code == 422 and NOT_A_REAL_NUMBER not in api.text


def test_bad_values_are_refused_in_words_and_keep_the_form(site: Incidents) -> None:
    incident_id = site.draft([site.alert("door_forced").id])
    client = site.signed_in(Role.SECURITY)
    page = client.get(f"{PAGE}/{incident_id}").text
    no_title = submit(client, page, "incident-form", title="", cause="扉の施錠不良")
    assert no_title.status_code == 422 and "件名を入力してください" in no_title.text
    assert _textarea(no_title.text, "cause") == "扉の施錠不良"
    no_time = submit(client, page, "incident-form", found_at="")
    assert no_time.status_code == 422 and "発覚日時（日本時間）を入力してください" in no_time.text
    bad_time = submit(client, page, "incident-form", occurred_at="17/11/2026")
    assert bad_time.status_code == 422 and "日付と時刻（日本時間）を入力してください" in bad_time.text
    people = submit(client, page, "incident-form", people_count="十二")
    assert people.status_code == 422 and "0 以上の整数" in people.text
    assert site.incident(incident_id).version == 1


# --- status, deadlines, linking ----------------------------------------------------------------------------


def test_the_status_moves_forward_only_each_step_after_a_confirmation(site: Incidents) -> None:
    incident_id = site.draft([site.alert("door_forced").id])
    client = site.signed_in(Role.SECURITY)
    token = _csrf(client.get(f"{PAGE}/{incident_id}").text)
    url = f"{PAGE}/{incident_id}/status"
    page = client.get(f"{PAGE}/{incident_id}").text
    steps = _part(page, "incident-advance")
    assert "速報を報告済みにする" in steps and "確報を報告済みにする" in steps and "この事案を完了にする" in steps

    asked = client.post(url, data={"csrf_token": token, "status": "preliminary"})
    assert asked.status_code == 200 and "個人情報保護委員会への速報を、いま報告済みにしますか" in asked.text
    assert site.incident(incident_id).status == "draft"  # only asked, not done
    done = submit(client, asked.text, "status-confirm-form")
    assert done.status_code == 303
    row = site.incident(incident_id)
    assert (row.status, row.preliminary_reported_at) == ("preliminary", site.clock())
    page = client.get(f"{PAGE}/{incident_id}").text
    assert "速報済" in _part(page, "incident-status") and "報告済" in _part(page, "incident-preliminary")
    assert "速報を報告済みにする" not in _part(page, "incident-advance")

    again = client.post(url, data={"csrf_token": token, "status": "preliminary", "confirm": "yes"})
    assert again.status_code == 409 and "状態は先に進むだけです" in again.text
    back = client.post(url, data={"csrf_token": token, "status": "draft", "confirm": "yes"})
    assert back.status_code == 422 and site.incident(incident_id).status == "preliminary"

    closed = client.post(url, data={"csrf_token": token, "status": "closed", "confirm": "yes"})
    assert closed.status_code == 303
    page = client.get(f"{PAGE}/{incident_id}").text
    assert 'id="incident-form"' not in page and 'id="incident-advance"' not in page and "完了" in page
    late = client.post(f"{PAGE}/{incident_id}", data={"csrf_token": token, "version": "3", "cause": "x"})
    assert late.status_code == 409 and "完了しているため" in late.text
    statuses = [r.action for r in site.incident_trail(incident_id) if r.action == "incident.status"]
    assert len(statuses) == 2

    # A report without its summary is not marked as sent.
    empty = site.draft([site.alert("usb_blocked").id])
    incidents_api.update(site.state, SETUP, empty, 1, {"summary": ""})
    refused = client.post(f"{PAGE}/{empty}/status", data={"csrf_token": token, "status": "final", "confirm": "yes"})
    assert refused.status_code == 409 and "概要を記入してください" in refused.text


def test_deadlines_show_overdue_in_words_until_the_report_is_sent(site: Incidents) -> None:
    late = site.draft([site.alert("door_forced").id], "人事部 管理区域への侵入")
    incidents_api.update(site.state, SETUP, late, 1, {"found_at": T0})  # found 17 Nov; today is 7 Dec (JST)
    closed = site.draft([site.alert("usb_blocked").id], "USB の持ち込み")
    incidents_api.advance(site.state, SETUP, closed, "closed")
    client = site.signed_in(Role.AUDITOR)
    page = client.get(PAGE).text
    assert page.index(f'id="incident-{late}"') < page.index(f'id="incident-{closed}"')  # open ones first
    row = page[page.index(f'id="incident-{late}"') :]
    cells = re.findall(r"<td>(.*?)</td>", row[: row.index("</tr>")], flags=re.S)
    assert "2026/11/22 (日) 09:00" in cells[3] and "期限超過: 未報告" in cells[3]  # the preliminary report
    assert "2026/12/17 (木) 09:00" in cells[4] and "期限超過" not in cells[4] and "未報告" in cells[4]
    assert "期限超過" not in page[page.index(f'id="incident-{closed}"') :]
    api = site.api(Role.AUDITOR).get("/api/v1/incidents").json()
    flags = {i["id"]: (i["deadlines"]["preliminary"]["overdue"], i["deadlines"]["final"]["overdue"]) for i in api}
    assert flags == {late: (True, False), closed: (False, False)}

    incidents_api.advance(site.state, SETUP, late, "preliminary")
    row = client.get(PAGE).text
    assert "期限超過" not in row and "報告済" in row
    incidents_api.update(site.state, SETUP, late, 3, {"found_at": T0 - timedelta(days=25)})  # final due 22 Nov
    assert "期限超過: 未報告" in client.get(f"{PAGE}/{late}").text


def test_more_alerts_are_linked_by_number(site: Incidents) -> None:
    forced, held, usb = site.alert("door_forced"), site.alert("door_held_open"), site.alert("usb_blocked")
    incident_id = site.draft([forced.id])
    client = site.signed_in(Role.SECURITY)
    page = client.get(f"{PAGE}/{incident_id}").text
    assert 'id="link-form"' in page
    bad = submit(client, page, "link-form", alerts="扉の件")
    assert bad.status_code == 422 and "アラート番号（数字）" in bad.text
    missing = submit(client, page, "link-form", alerts="999999")
    assert missing.status_code == 422 and "その番号のアラートはありません" in missing.text
    linked = submit(client, page, "link-form", alerts=f"#{held.id}, {usb.id}")
    assert linked.status_code == 303
    found = incidents_api.read(site.state, incident_id)
    assert [a.id for a in found["alerts"]] == [forced.id, held.id, usb.id]
    assert [e["ref"] for e in found["incident"].evidence][-2:] == [f"alert:{held.id}", f"alert:{usb.id}"]
    rows = _part(client.get(f"{PAGE}/{incident_id}").text, "incident-alerts")
    assert f'href="/console/alerts/{usb.id}"' in rows and "USB デバイスを遮断" in rows


# --- the PDF -----------------------------------------------------------------------------------------------


def test_the_pdf_holds_the_report_and_who_exported_it_and_the_export_is_in_the_trail(site: Incidents) -> None:
    forced = site.alert("door_forced")
    incident_id = site.draft([forced.id], "人事部 管理区域への侵入")
    incidents_api.update(site.state, SETUP, incident_id, 1, {"prevention": "扉センサーの交換と巡回の追加"})
    client = site.person(Role.SECURITY, "keibi.hanako", "警備 花子", "けいび はなこ")
    answer = client.get(f"{PAGE}/{incident_id}.pdf")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/pdf"
    disposition = answer.headers["content-disposition"]
    assert disposition == f'attachment; filename="incident-{incident_id}-20261207-1000.pdf"'
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(answer.content)).pages)
    squeezed = "".join(text.split())
    for expected in (
        "人事部管理区域への侵入",
        "再発防止のための措置",
        "扉センサーの交換と巡回の追加",
        "警備花子(keibi.hanako)",
    ):
        assert expected in squeezed, expected
    exports = [r for r in site.incident_trail(incident_id) if r.action == "export.pdf"]
    assert [(r.actor, r.via) for r in exports] == [("user:keibi.hanako", "web")]
    assert exports[0].detail["rows"] == 1 and exports[0].detail["filters"] == {"incident": incident_id, "version": 2}
    history = _part(client.get(f"{PAGE}/{incident_id}").text, "incident-history")
    assert "PDF に出力" in history and "警備 花子" in history
    assert client.get(f"{PAGE}/999999.pdf").status_code == 404


# --- roles --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.AUDITOR, Role.FACILITY_MANAGER])
def test_a_reader_sees_the_report_and_the_pdf_without_controls_and_its_posts_are_refused(
    site: Incidents, role: Role
) -> None:
    forced = site.alert("door_forced")
    incident_id = site.draft([forced.id], "人事部 管理区域への侵入")
    incidents_api.update(site.state, SETUP, incident_id, 1, {"cause": "扉の施錠不良"})
    client = site.signed_in(role)
    assert 'href="/console/incidents"' in client.get(PAGE).text  # in the menu
    page = client.get(f"{PAGE}/{incident_id}")
    assert page.status_code == 200
    assert "扉の施錠不良" in _part(page.text, "r-cause") and f"{PAGE}/{incident_id}.pdf" in page.text
    main = _main(page.text)
    assert "<form" not in main and "<textarea" not in main and "<input" not in main
    assert 'id="incident-form"' not in client.get(f"/console/alerts/{forced.id}").text
    token = _csrf(page.text)  # its own session's token (the sign-out form carries it)
    for path, form in (
        (f"{PAGE}/{incident_id}", {"version": "2", "cause": "見ました"}),
        (f"{PAGE}/{incident_id}/status", {"status": "closed", "confirm": "yes"}),
        (f"{PAGE}/{incident_id}/alerts", {"alerts": str(forced.id)}),
        (PAGE, {"alert": str(forced.id)}),
    ):
        assert client.post(path, data={"csrf_token": token, **form}).status_code == 403, path
    assert client.get(f"{PAGE}/{incident_id}.pdf").status_code == 200
    row = site.incident(incident_id)
    assert (row.version, row.status) == (2, "draft")
    api = site.api(role)
    assert api.get(f"/api/v1/incidents/{incident_id}").status_code == 200
    assert api.patch(f"/api/v1/incidents/{incident_id}", json={"version": 2, "changes": {}}).status_code == 403
    assert api.post("/api/v1/incidents", json={"alerts": [forced.id]}).status_code == 403


def test_an_area_manager_has_no_incident_reports(site: Incidents) -> None:
    client = site.signed_in(Role.AREA_MANAGER)
    assert client.get(PAGE).status_code == 403
    assert 'href="/console/incidents"' not in client.get("/console/muster").text


# --- the API ------------------------------------------------------------------------------------------------


def test_the_api_drafts_edits_advances_links_and_exports_with_the_token_as_operator(site: Incidents) -> None:
    forced, held, usb = site.alert("door_forced"), site.alert("door_held_open"), site.alert("usb_blocked")
    api = site.api(Role.SECURITY)
    made = api.post("/api/v1/incidents", json={"alerts": [forced.id, usb.id], "title": "人事部 管理区域への侵入"})
    assert made.status_code == 201, made.text
    body = made.json()
    incident_id = body["incident"]["id"]
    assert body["incident"]["status_label"] == {"ja": "下書き", "en": "draft"}
    assert [a["id"] for a in body["alerts"]] == [forced.id, usb.id]
    assert body["incident"]["created_by"].startswith("token:api-security-")
    assert body["incident"]["deadlines"]["final"]["due"].endswith("+09:00")
    assert api.post("/api/v1/incidents", json={"alerts": []}).status_code == 422
    assert api.post("/api/v1/incidents", json={"alerts": [999999]}).status_code == 422
    assert api.post("/api/v1/incidents", json={"alerts": [forced.id], "owner": "x"}).status_code == 422

    listed = api.get("/api/v1/incidents").json()
    assert [(i["id"], i["alerts"], i["status"]) for i in listed] == [(incident_id, 2, "draft")]
    assert api.get(f"/api/v1/incidents/{incident_id}").json()["incident"]["report"]["summary"]
    assert api.get("/api/v1/incidents/999999").status_code == 404

    url = f"/api/v1/incidents/{incident_id}"
    changes = {"cause": "扉の施錠不良", "people_count": 3, "found_at": "2026-11-17T09:00:00+09:00", "malicious": True,
               "evidence": [{"kind": "camera", "ref": "cam-3", "note": "扉前"}]}  # fmt: skip
    edited = api.patch(url, json={"version": 1, "changes": changes})
    assert edited.status_code == 200, edited.text
    incident = edited.json()["incident"]
    assert (incident["version"], incident["people_count"], incident["found_at"]) == (2, 3, "2026-11-17T09:00:00+09:00")
    assert incident["deadlines"]["final"]["due"] == "2027-01-16T09:00:00+09:00"
    stale = api.patch(url, json={"version": 1, "changes": {"cause": "不明"}})
    assert stale.status_code == 409 and "changed by token:api-security-" in stale.json()["detail"]
    for bad in ({"people_count": -1}, {"people_count": True}, {"secret": "x"}, {"found_at": "2026-11-17T09:00"},
                {"found_at": None}, {"title": ""}):  # fmt: skip
        assert api.patch(url, json={"version": 2, "changes": bad}).status_code == 422, bad
    assert api.patch("/api/v1/incidents/999999", json={"version": 1, "changes": {}}).status_code == 404

    assert api.post(f"{url}/status", json={"status": "preliminary"}).json()["incident"]["status"] == "preliminary"
    assert api.post(f"{url}/status", json={"status": "draft"}).status_code == 409
    assert api.post(f"{url}/status", json={"status": "sent"}).status_code == 422
    linked = api.post(f"{url}/alerts", json={"alerts": [held.id]})
    assert [a["id"] for a in linked.json()["alerts"]] == [forced.id, held.id, usb.id]
    assert api.post(f"{url}/alerts", json={"alerts": [999999]}).status_code == 422

    pdf = api.get(f"{url}.pdf")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    assert pdf.headers["content-disposition"].startswith(f'attachment; filename="incident-{incident_id}-')
    trail = site.incident_trail(incident_id)
    assert [(r.action, r.via) for r in trail] == [
        ("incident.create", "api"), ("incident.update", "api"), ("incident.status", "api"), ("incident.link", "api"),
        ("export.pdf", "api"),
    ]  # fmt: skip
    assert all(r.actor.startswith("token:api-security-") for r in trail)


# --- undelivered notifications --------------------------------------------------------------------------


def test_undelivered_notifications_are_listed_and_replayed_from_the_console(site: Incidents) -> None:
    forced = site.alert("door_forced")
    with write_transaction(site.store.engine) as conn:
        queue(conn, forced.id, "opened", 0, Position(0, 0), "email", "keibi@example.invalid", "guard", "ja",
              site.clock())  # fmt: skip
    DeliveryJob(site.store, Channels(), clock=site.clock).deliver()  # no SMTP relay configured: dead at once
    with site.store.engine.connect() as conn:
        dead_id = conn.execute(
            select(AlertNotification.id).where(AlertNotification.target == "keibi@example.invalid")
        ).scalar_one()

    auditor = site.signed_in(Role.AUDITOR)
    assert 'href="/console/alerts/notifications"' in auditor.get("/console/alerts").text
    page = auditor.get("/console/alerts/notifications")
    assert page.status_code == 200
    row = _part(page.text, "notifications")
    assert f'href="/console/alerts/{forced.id}"' in row and "扉のこじ開け" in row and "メール" in row
    assert "guard" in row and "keibi@example.invalid" in row and "SMTP" in row
    assert "/replay" not in page.text
    token = _csrf(page.text)
    replay = f"/console/alerts/notifications/{dead_id}/replay"
    assert auditor.post(replay, data={"csrf_token": token}).status_code == 403

    handler = site.signed_in(Role.SECURITY)
    listed = handler.get("/console/alerts/notifications").text
    assert f'action="{replay}"' in listed
    assert handler.post(replay, data={"csrf_token": _csrf(listed)}).status_code == 303
    after = handler.get("/console/alerts/notifications").text
    assert "再送を待つ通知はありません" in after
    twice = handler.post(replay, data={"csrf_token": _csrf(listed)})
    assert twice.status_code == 409 and 'id="notification-error"' in twice.text
    action, actor, via = site.trail(forced.id)[-1]
    assert (action, actor, via) == ("alert.notification_replayed", f"user:{site.last_login}", "web")
