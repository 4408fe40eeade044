"""`sekisho alerts …` (issue 13) through typer's runner on a real controller.toml and store (SQLite, PostgreSQL).

Alerts come from real signed events through the alert engine (tests/reports_fixtures.py), notifications through
the real escalation and delivery job; the commands run in Japanese (tests/conftest.py pins it) and once as a
real `sekisho` process with SEKISHO_LANG=en. Every change must leave its admin-trail row naming the CLI's
operator (``cli:<user>@<host>``); a refusal is one line on stderr with exit code 1, never a traceback.
"""

from __future__ import annotations

import getpass
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from alert_fixtures import ESCALATION_ALERTS, WEBHOOK_SECRET, HookReceiver, alert_policy
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pypdf import PdfReader
from reports_fixtures import T0, Site
from sqlalchemy import select
from typer.testing import CliRunner, Result

from sekisho.cli import app as sekisho_app
from sekisho.common import i18n
from sekisho.controller.alerts import texts
from sekisho.controller.alerts.channels import WebhookChannel, WebhookSettings
from sekisho.controller.alerts.delivery import Channels, DeliveryJob
from sekisho.controller.alerts.engine import AlertEngine
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store import Store
from sekisho.controller.store.models import AdminAuditEntry, Alert, AlertNotification, AlertSilence
from sekisho.lab import write_toml
from sekisho.protocol import signing, timefmt

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

CLI_ACTOR = f"cli:{getpass.getuser()}@{socket.gethostname()}"
SEKISHO = Path(sys.executable).parent / "sekisho"
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


@dataclass
class Desk:
    """A controller.toml over the test store, the demo site's agents and the controller's alert jobs."""

    config: Path
    site: Site
    engine: AlertEngine

    @property
    def store(self) -> Store:
        """Return the site's store."""
        return self.site.store

    def invoke(self, *args: str) -> Result:
        """Run `sekisho ARGS --config controller.toml` in this process (wide, so nothing wraps)."""
        return CliRunner().invoke(sekisho_app, [*args, "--config", str(self.config)], env={"COLUMNS": "250"})

    def run(self, *args: str) -> str:
        """Run a command that must succeed; return its standard output."""
        result = self.invoke(*args)
        assert result.exit_code == 0, result.output
        return result.stdout

    def refused(self, *args: str, code: int = 1) -> str:
        """Run a command that must be refused with ``code`` and no traceback; return its one line of stderr."""
        result = self.invoke(*args)
        assert result.exit_code == code, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
        if code == 1:
            assert result.stdout == ""
            assert result.stderr.count("\n") == 1, result.stderr
        return result.stderr.strip()

    def alerts(self) -> dict[str, Any]:
        """Raise the demo's alerts from signed events: a forced door (critical) and a blocked USB stick (medium)."""
        self.site.send("door.alarm", {"door": "room-hr", "alarm": "forced_open"}, T0)
        self.site.send("door.alarm", {"door": "room-hr", "alarm": "forced_open"}, T0 + timedelta(minutes=1))
        payload = {"terminal": "t-hr-01", "vendor_product": "0781:5581", "device_hash": "ab" * 16}
        self.site.send("usb.blocked", payload | {"reason": "not_registered"}, T0 + timedelta(minutes=5), self.site.term)
        self.engine.follow()
        with self.store.engine.connect() as conn:
            return {row.rule: row for row in conn.execute(select(*Alert.__table__.columns))}

    def alert(self, alert_id: int) -> Any:
        """Return one alert row as stored now."""
        with self.store.engine.connect() as conn:
            return conn.execute(select(*Alert.__table__.columns).where(Alert.id == alert_id)).one()

    def trail(self, target: str) -> list[Any]:
        """Return the admin-trail rows about a target, oldest first."""
        a = AdminAuditEntry.__table__.c
        with self.store.engine.connect() as conn:
            query = select(a.action, a.actor, a.via, a.old, a.new, a.detail).where(a.target == target)
            return list(conn.execute(query.order_by(a.id)))


@pytest.fixture
def desk(tmp_path: Path, db_url: str, store: Store, controller_key: Ed25519PrivateKey, make_agent: MakeAgent) -> Desk:
    key_path = tmp_path / "pki" / "signing.key"
    key_path.parent.mkdir()
    key_path.write_bytes(signing.private_key_pem(controller_key))
    key_path.chmod(0o600)
    config = write_toml(
        tmp_path / "controller.toml",
        {
            "profile": "dev",
            "var_dir": str(tmp_path / "var"),
            "database_url": db_url,
            "ca_cert": str(tmp_path / "pki" / "missing-ca.crt"),
            "tls_cert": str(tmp_path / "pki" / "missing.crt"),
            "tls_key": str(tmp_path / "pki" / "missing.key"),
            "signing_key": str(key_path),
        },
    )
    site = Site(store, make_agent)
    # The demo policy with an alerts section (contacts, a roster, a door chain, a SIEM webhook chain).
    PolicyService(store, controller_key).apply(
        alert_policy(ESCALATION_ALERTS), source_sha256="1" * 64, created_by="test"
    )
    return Desk(config, site, AlertEngine(store, clock=site.clock))


def _english(desk: Desk, *args: str) -> str:
    """Run a real `sekisho` process with SEKISHO_LANG=en (the language is read once per process)."""
    env = {k: v for k, v in os.environ.items() if k not in i18n.LANG_VARIABLES}
    env |= {"SEKISHO_LANG": "en", "COLUMNS": "250"}
    out = subprocess.run(
        [str(SEKISHO), *args, "--config", str(desk.config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _ids(json_lines: str) -> list[int]:
    return [int(json.loads(line)["id"]) for line in json_lines.splitlines()]


# --- reading ------------------------------------------------------------------------------------------------


def test_list_and_show_speak_japanese_in_the_consoles_order(desk: Desk) -> None:
    raised = desk.alerts()
    door, usb = raised["door_forced"], raised["usb_blocked"]
    listed = desk.run("alerts", "list")
    assert "アラート" in listed and "重要度" in listed and "Alerts" not in listed
    door_line = next(line for line in listed.splitlines() if "扉のこじ開け: room-hr" in line)
    usb_line = next(line for line in listed.splitlines() if "USB デバイスを遮断: t-hr-01" in line)
    # Severity and handling in words, times in JST as the console writes them, the critical door first.
    assert "緊急" in door_line and "未対応" in door_line and "状態が継続中" in door_line
    assert "2026/11/17 (火) 09:00" in door_line and "2026/11/17 (火) 09:01" in door_line
    assert "中" in usb_line and "継続する状態なし" in usb_line
    assert listed.index("扉のこじ開け") < listed.index("USB デバイスを遮断")

    lines = [json.loads(line) for line in desk.run("alerts", "list", "--json").splitlines()]
    assert [(a["id"], a["rule"], a["severity"], a["state"]) for a in lines] == [
        (door.id, "door_forced", "critical", "open"),
        (usb.id, "usb_blocked", "medium", "open"),
    ]
    assert lines[0]["title"] == {"ja": "扉のこじ開け: room-hr", "en": "Door forced open: room-hr"}
    assert (lines[0]["count"], lines[0]["first_at"]) == (2, "2026-11-17T09:00:00+09:00")
    only = desk.run("alerts", "list", "--severity", "medium", "--json").splitlines()
    assert [json.loads(line)["id"] for line in only] == [usb.id]
    assert desk.run("alerts", "list", "--rule", "door_held_open").startswith("該当するアラートはありません")

    shown = desk.run("alerts", "show", str(door.id))
    assert f"#{door.id} 扉のこじ開け: room-hr" in shown
    assert "door=room-hr" in shown and "対応手順:" in shown
    assert texts.procedure("ja", "door_forced") in shown
    assert "根拠のイベント" in shown and shown.count("door.alarm") == 2 and "forced_open" in shown
    assert "履歴" in shown and "発生" in shown  # alert.opened in words
    detail = json.loads(desk.run("alerts", "show", str(door.id), "--json"))
    assert detail["alert"]["id"] == door.id and detail["procedure"]["en"] == texts.procedure("en", "door_forced")
    assert [e["type"] for e in detail["events"]] == ["door.alarm", "door.alarm"]
    assert detail["history"][0]["action"] == "alert.opened"
    assert desk.refused("alerts", "show", "999999") == "✗ アラート 999999 はありません"
    assert desk.refused("alerts", "list", "--state", "closed", code=2)


def test_list_and_show_speak_english_with_sekisho_lang_en(desk: Desk) -> None:
    door = desk.alerts()["door_forced"]
    listed = _english(desk, "alerts", "list")
    door_line = next(line for line in listed.splitlines() if "Door forced open: room-hr" in line)
    assert "Critical" in door_line and "Not acknowledged" in door_line
    assert "Tue 17 Nov 2026 09:00" in door_line
    assert "USB device blocked on t-hr-01" in listed
    assert not JAPANESE.search(listed), listed
    shown = _english(desk, "alerts", "show", str(door.id))
    assert "What to do:" in shown and texts.procedure("en", "door_forced") in shown
    assert "Events behind the alert" in shown and "Opened" in shown
    assert not JAPANESE.search(shown), shown


# --- handling -----------------------------------------------------------------------------------------------


def test_ack_resolve_reopen_name_the_cli_operator_and_a_refusal_writes_nothing(desk: Desk) -> None:
    door = desk.alerts()["door_forced"]
    ident = str(door.id)
    assert desk.run("alerts", "ack", ident, "--comment", "警備員が現場へ向かいます").strip() == (
        f"アラート {door.id} を対応中にしました"
    )
    # Acknowledged already: refused in the command line's words, one line, exit 1.
    line = desk.refused("alerts", "ack", ident, "--comment", "二重の確認")
    assert line.startswith(f"✗ アラート {door.id} は未対応ではありません")
    # The door is still forced open: resolving needs a stated override; nothing is written without one.
    line = desk.refused("alerts", "resolve", ident, "--note", "扉を確認", "--cause", "intrusion")
    assert "状態がまだ継続しています" in line and "--override" in line
    assert desk.alert(door.id).state == "acknowledged"
    assert desk.refused("alerts", "resolve", ident, "--note", "  ", "--cause", "intrusion") == (
        "✗ --note を指定してください"
    )
    desk.refused("alerts", "resolve", ident, "--note", "x", "--cause", "aliens", code=2)
    desk.run(
        "alerts", "resolve", ident, "--note", "扉を閉めて施錠を確認", "--cause", "intrusion",
        "--override", "扉センサーの故障で開のまま",
    )  # fmt: skip
    row = desk.alert(door.id)
    assert (row.state, row.cause, row.resolved_by, row.acked_by) == ("resolved", "intrusion", CLI_ACTOR, CLI_ACTOR)
    assert door.id not in _ids(desk.run("alerts", "list", "--json"))  # unresolved ones by default
    assert door.id in _ids(desk.run("alerts", "list", "--all", "--json"))
    desk.run("alerts", "reopen", ident, "--reason", "再度こじ開けの疑い")
    assert desk.alert(door.id).state == "open"

    people = [(r.action, r.actor, r.via) for r in desk.trail(f"alert:{door.id}") if r.actor != "system"]
    assert people == [
        ("alert.acknowledged", CLI_ACTOR, "cli"),
        ("alert.resolved", CLI_ACTOR, "cli"),
        ("alert.reopened", CLI_ACTOR, "cli"),
    ]
    acked, resolved, reopened = (r for r in desk.trail(f"alert:{door.id}") if r.actor == CLI_ACTOR)
    assert acked.new["comment"] == "警備員が現場へ向かいます"
    assert (resolved.new["cause"], resolved.new["override"]) == ("intrusion", "扉センサーの故障で開のまま")
    assert reopened.new == {"reason": "再度こじ開けの疑い"}
    shown = desk.run("alerts", "show", ident)
    assert "未対応" in shown.split("対応手順")[0]  # open again
    assert "再開" in shown and CLI_ACTOR in shown
    assert desk.run("records", "verify").startswith("OK: ")


# --- silences -----------------------------------------------------------------------------------------------


def test_silence_add_list_end(desk: Desk) -> None:
    out = desk.run(
        "alerts", "silence", "add", "--rule", "door_forced", "--label", "door=room-hr", "--hours", "2",
        "--reason", "扉の交換工事",
    )  # fmt: skip
    added = re.search(r"通知停止 (\d+) を追加しました", out)
    assert added is not None, out
    silence_id = int(added.group(1))
    # ISO times without an offset are JST.
    desk.run(
        "alerts", "silence", "add", "--maintenance", "--label", "agent=door-hr-01", "--start", "2030-01-07T09:00",
        "--until", "2030-01-07T17:00", "--reason", "定期点検",
    )  # fmt: skip
    with desk.store.engine.connect() as conn:
        rows = list(conn.execute(select(*AlertSilence.__table__.columns).order_by(AlertSilence.id)))
    assert [(r.kind, r.rule, r.matchers, r.created_by) for r in rows] == [
        ("silence", "door_forced", {"door": "room-hr"}, CLI_ACTOR),
        ("maintenance", None, {"agent": "door-hr-01"}, CLI_ACTOR),
    ]
    assert rows[0].ends_at - rows[0].starts_at == timedelta(hours=2)
    assert (rows[1].starts_at, rows[1].ends_at) == (
        datetime(2030, 1, 7, 0, tzinfo=UTC),
        datetime(2030, 1, 7, 8, tzinfo=UTC),
    )

    listed = [json.loads(line) for line in desk.run("alerts", "silence", "list", "--json").splitlines()]
    assert [(s["id"], s["kind"]) for s in listed] == [(silence_id, "silence"), (rows[1].id, "maintenance")]
    assert listed[1]["starts_at"] == "2030-01-07T09:00:00+09:00"
    table = desk.run("alerts", "silence", "list")
    assert "扉の交換工事" in table and "保守作業" in table and "2030/01/07 (月) 09:00" in table

    assert desk.run("alerts", "silence", "end", str(silence_id)).strip() == f"通知停止 {silence_id} を終了しました"
    assert _ids(desk.run("alerts", "silence", "list", "--json")) == [rows[1].id]
    assert desk.refused("alerts", "silence", "end", str(silence_id)).startswith(
        f"✗ 通知停止 {silence_id} は有効ではありません"
    )
    assert [(r.action, r.actor) for r in desk.trail(f"silence:{silence_id}")] == [
        ("alert.silence.create", CLI_ACTOR),
        ("alert.silence.end", CLI_ACTOR),
    ]
    # Never everything, never longer than 31 days, exactly one of --until / --hours, known labels only.
    assert "すべてを対象にする通知停止はできません" in desk.refused(
        "alerts", "silence", "add", "--hours", "1", "--reason", "全部止めたい"
    )
    assert "最長 31 日" in desk.refused(
        "alerts", "silence", "add", "--rule", "door_forced", "--hours", "800", "--reason", "長期"
    )
    desk.refused("alerts", "silence", "add", "--rule", "door_forced", "--reason", "期間なし", code=2)
    desk.refused("alerts", "silence", "add", "--label", "colour=red", "--hours", "1", "--reason", "x", code=2)
    with desk.store.engine.connect() as conn:
        assert len(conn.execute(select(AlertSilence.id)).all()) == 2


# --- notifications that could not be delivered ---------------------------------------------------------------


def test_a_dead_notification_is_listed_replayed_by_the_cli_then_delivered(desk: Desk) -> None:
    usb = desk.alerts()["usb_blocked"]
    desk.engine.escalate()
    # No webhook configured yet: the SIEM's notification fails permanently and lands in the dead letters.
    DeliveryJob(desk.store, Channels(), clock=desk.site.clock).deliver()
    n = AlertNotification.__table__.c
    with desk.store.engine.connect() as conn:
        (dead,) = conn.execute(select(*n).where(n.alert_id == usb.id)).all()
    assert (dead.state, dead.channel, dead.target) == ("dead", "webhook", "soc")

    table = desk.run("alerts", "notifications")
    assert "送信できなかった通知" in table and "no webhook is configured" in table
    assert "新しいアラート" in table  # the notification's kind in words
    listed = [json.loads(line) for line in desk.run("alerts", "notifications", "--json").splitlines()]
    assert dead.id in [d["id"] for d in listed]

    out = desk.run("alerts", "notifications", "replay", str(dead.id))
    assert out.strip() == f"通知 {dead.id} を送信待ちに戻しました"
    assert dead.id not in _ids(desk.run("alerts", "notifications", "--json"))
    assert desk.refused("alerts", "notifications", "replay", str(dead.id)) == (
        f"✗ 通知 {dead.id} は送信できなかった通知の一覧にありません"
    )
    replayed = [r for r in desk.trail(f"alert:{usb.id}") if r.action == "alert.notification_replayed"]
    assert [(r.actor, r.detail) for r in replayed] == [(CLI_ACTOR, {"notification": dead.id})]

    # The receiver is configured now: the controller's next round delivers the replayed notification, signed.
    desk.site.clock.now = timefmt.now() + timedelta(minutes=1)
    with HookReceiver(WEBHOOK_SECRET, desk.site.clock) as hooks:
        hook = WebhookSettings(url=hooks.url, secret=WEBHOOK_SECRET, timeout_s=5.0)
        DeliveryJob(desk.store, Channels(webhooks=WebhookChannel({"soc": hook})), clock=desk.site.clock).deliver()
        assert [(d.notification, d.verified, d.status) for d in hooks.deliveries] == [(dead.id, True, 200)]
    result = CliRunner().invoke(sekisho_app, ["alerts", "notifications"])  # no --config: a usage error, not a crash
    assert result.exit_code == 2 and "--config" in result.output


# --- incident reports ---------------------------------------------------------------------------------------


def test_incident_create_list_and_pdf_recorded_as_an_export(desk: Desk, tmp_path: Path) -> None:
    raised = desk.alerts()
    ids = sorted(a.id for a in raised.values())
    out = desk.run("alerts", "incident", "create", *map(str, ids), "--title", "人事部 管理区域への侵入")
    created = re.search(r"事案報告 (\d+)（下書き）を作成しました", out)
    assert created is not None and "アラート 2 件" in out, out
    incident_id = int(created.group(1))
    listed = desk.run("alerts", "incident", "list")
    assert "人事部 管理区域への侵入" in listed and "下書き" in listed and "2026/12/17" in listed  # final due: 30 days
    assert [(r.action, r.actor) for r in desk.trail(f"incident:{incident_id}")] == [("incident.create", CLI_ACTOR)]

    pdf = tmp_path / "out" / "incident.pdf"
    pdf.parent.mkdir()
    assert desk.run("alerts", "incident", "pdf", str(incident_id), "--output", str(pdf)).strip() == (
        f"{pdf} に書き出しました"
    )
    assert stat.S_IMODE(pdf.stat().st_mode) == 0o600
    text = "".join("".join(page.extract_text().split()) for page in PdfReader(io.BytesIO(pdf.read_bytes())).pages)
    for expected in ("人事部管理区域への侵入", "扉のこじ開け", "USBデバイスを遮断", CLI_ACTOR):
        assert expected in text, expected
    export = desk.trail(f"incident:{incident_id}")[-1]
    assert (export.action, export.actor, export.via) == ("export.pdf", CLI_ACTOR, "cli")
    assert export.detail["rows"] == 2 and export.detail["filters"] == {"incident": incident_id}

    assert desk.refused("alerts", "incident", "create", "999999") == "✗ アラート 999999 はありません"
    missing = tmp_path / "out" / "none.pdf"
    assert desk.refused("alerts", "incident", "pdf", "999999", "--output", str(missing)) == (
        "✗ 事案報告 999999 はありません"
    )
    assert not missing.exists()
    assert desk.run("records", "verify").startswith("OK: ")
