"""Incident records built from alerts: the draft's facts, edits with optimistic locking, status, trail, PDF.

Alerts come from real signed events through the alert engine (tests/reports_fixtures.py), on SQLite and
PostgreSQL; the PDF is rendered by WeasyPrint and read back with pypdf.
"""

from __future__ import annotations

import io
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from pypdf import PdfReader
from reports_fixtures import T0, Site
from sqlalchemy import select

from sekisho.controller.alerts import incidents
from sekisho.controller.alerts.engine import AlertEngine
from sekisho.controller.store import Store
from sekisho.controller.store.audit import Operator
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.models import AdminAuditEntry, Alert
from sekisho.protocol import mynumber

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

KEIBI = Operator("user:keibi.hanako", "web", "192.0.2.10")
SOC = Operator("user:soc.taro", "web", "192.0.2.11")
# Built here, never stored: the guard must refuse it wherever it is typed.
NOT_A_REAL_NUMBER = "24681357902" + str(mynumber.check_digit("24681357902"))


@pytest.fixture
def site(store: Store, make_agent: MakeAgent) -> Site:
    return Site(store, make_agent)


def _alerts(site: Site) -> list[int]:
    """A forced door, held open again and again, and a blocked stick: two alerts from real events."""
    site.send("door.alarm", {"door": "room-hr", "alarm": "forced_open"}, T0)
    site.send("door.alarm", {"door": "room-hr", "alarm": "forced_open"}, T0 + timedelta(minutes=1))
    payload = {"terminal": "t-hr-01", "vendor_product": "0781:5581", "device_hash": "ab" * 16, "reason": "x"}
    site.send("usb.blocked", payload, T0 + timedelta(minutes=5), site.term)
    AlertEngine(site.store, clock=site.clock).follow()
    with site.store.engine.connect() as conn:
        return list(conn.execute(select(Alert.id).order_by(Alert.id)).scalars())


def _create(site: Site, alert_ids: list[int], title: str = "") -> int:
    with write_transaction(site.store.engine) as conn:
        return incidents.create_from_alerts(conn, site.store.signing_key, KEIBI, alert_ids, title, site.clock())


def _read(site: Site, incident_id: int) -> dict[str, Any]:
    with site.store.engine.connect() as conn:
        return incidents.read(conn, incident_id)


def test_a_draft_starts_from_its_alerts(site: Site) -> None:
    alert_ids = _alerts(site)
    incident_id = _create(site, alert_ids, "人事部 管理区域への侵入")
    found = _read(site, incident_id)
    incident = found["incident"]
    assert (incident.title, incident.status, incident.version) == ("人事部 管理区域への侵入", "draft", 1)
    assert incident.occurred_at == T0  # the first event behind the alerts
    summary = incident.report["summary"].splitlines()
    assert summary[0].startswith("2026/11/17 09:00 扉のこじ開け: room-hr") and summary[0].endswith("（2件）")
    assert "USB デバイスを遮断" in summary[1]
    assert [a.id for a in found["alerts"]] == alert_ids
    assert [e["ref"] for e in incident.evidence] == [f"alert:{i}" for i in alert_ids]
    assert found["deadlines"].final - incident.found_at == timedelta(days=30)


def test_edits_are_locked_by_version_guarded_and_in_the_trail(site: Site) -> None:
    incident_id = _create(site, _alerts(site))
    now = site.clock()
    with write_transaction(site.store.engine) as conn:
        version = incidents.update_report(
            conn, site.store.signing_key, KEIBI, incident_id, 1, {"cause": "扉の施錠不良", "people_count": 0}, now
        )
    assert version == 2
    # A colleague who loaded version 1 does not overwrite the change without seeing it.
    with (
        pytest.raises(incidents.IncidentRefused, match=r"changed by user:keibi\.hanako"),
        write_transaction(site.store.engine) as conn,
    ):
        incidents.update_report(conn, site.store.signing_key, SOC, incident_id, 1, {"cause": "不明"}, now)
    with pytest.raises(mynumber.MyNumberFound), write_transaction(site.store.engine) as conn:
        incidents.update_report(
            conn, site.store.signing_key, SOC, incident_id, 2, {"data_items": f"番号 {NOT_A_REAL_NUMBER}"}, now
        )
    with pytest.raises(incidents.IncidentRefused, match="unknown field"), write_transaction(site.store.engine) as conn:
        incidents.update_report(conn, site.store.signing_key, SOC, incident_id, 2, {"secret": "x"}, now)
    with write_transaction(site.store.engine) as conn:
        incidents.update_report(conn, site.store.signing_key, SOC, incident_id, 2, {"malicious": True}, now)
    incident = _read(site, incident_id)["incident"]
    assert (incident.report["cause"], incident.people_count, incident.version) == ("扉の施錠不良", 0, 3)
    assert _read(site, incident_id)["deadlines"].final - incident.found_at == timedelta(days=60)
    a = AdminAuditEntry.__table__.c
    with site.store.engine.connect() as conn:
        trail = conn.execute(
            select(a.action, a.actor, a.old, a.new).where(a.target == f"incident:{incident_id}").order_by(a.id)
        ).all()
    assert [(r.action, r.actor) for r in trail] == [
        ("incident.create", KEIBI.actor),
        ("incident.update", KEIBI.actor),
        ("incident.update", SOC.actor),
    ]
    assert trail[1].old == {"cause": "", "people_count": None} and trail[1].new == {
        "cause": "扉の施錠不良",
        "people_count": 0,
    }


def test_status_moves_forward_only_and_records_the_report_times(site: Site) -> None:
    incident_id = _create(site, _alerts(site))
    sent = site.clock() + timedelta(days=2)
    with write_transaction(site.store.engine) as conn:
        incidents.advance(conn, site.store.signing_key, KEIBI, incident_id, "preliminary", sent)
    with (
        pytest.raises(incidents.IncidentRefused, match="only moves forward"),
        write_transaction(site.store.engine) as conn,
    ):
        incidents.advance(conn, site.store.signing_key, KEIBI, incident_id, "draft", sent)
    with write_transaction(site.store.engine) as conn:
        incidents.advance(conn, site.store.signing_key, KEIBI, incident_id, "closed", sent + timedelta(days=20))
    incident = _read(site, incident_id)["incident"]
    assert (incident.status, incident.preliminary_reported_at) == ("closed", sent)
    with pytest.raises(incidents.IncidentRefused, match="closed"), write_transaction(site.store.engine) as conn:
        incidents.update_report(
            conn, site.store.signing_key, KEIBI, incident_id, incident.version, {"other": "x"}, sent
        )


def test_the_pdf_holds_the_report_the_alerts_and_who_exported_it(site: Site) -> None:
    incident_id = _create(site, _alerts(site), "人事部 管理区域への侵入")
    with write_transaction(site.store.engine) as conn:
        incidents.update_report(
            conn, site.store.signing_key, KEIBI, incident_id, 1, {"prevention": "扉センサーの交換と巡回の追加"}, T0
        )
    pdf = incidents.render_pdf(_read(site, incident_id), exporter="keibi.hanako", exported_at=T0 + timedelta(hours=3))
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    squeezed = "".join(text.split())
    for expected in (
        "人事部管理区域への侵入",
        "再発防止のための措置",
        "扉センサーの交換と巡回の追加",
        "扉のこじ開け",
        "keibi.hanako",
    ):
        assert expected in squeezed, expected
    assert "2026/11/17(火)12:00" in squeezed  # exported at, in JST


def test_a_closed_report_takes_no_more_alerts(site: Site) -> None:
    first, *others = _alerts(site)
    incident_id = _create(site, [first])
    with write_transaction(site.store.engine) as conn:
        assert incidents.link_alerts(conn, site.store.signing_key, KEIBI, incident_id, others, site.clock()) == 1
        incidents.advance(conn, site.store.signing_key, KEIBI, incident_id, "closed", site.clock())
    with pytest.raises(incidents.IncidentRefused, match="closed"), write_transaction(site.store.engine) as conn:
        incidents.link_alerts(conn, site.store.signing_key, KEIBI, incident_id, [first], site.clock())
