"""Media register: lend / return / revoke as policy versions, validations, loan-preserving apply, overdue, inventory."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError

from sekisho.common.i18n import localize
from sekisho.controller.media.service import MediaConflict, MediaRefused, MediaService
from sekisho.controller.policy.loader import PolicyError, load_policy_file, parse_policy
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.controller.store.models import Event
from sekisho.protocol import messages, signing, timefmt

DEMO = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
# The demo site plus what the refusals need: a chief officer, a leaver, a retired medium.
EXTRA = """
  - {id: m-0009, name: 廃止済みUSB (test), department: 人事部, status: retired, serial_sha256: %s}
""" % ("a" * 64)
EXTRA_PEOPLE = """
  - {id: p-0008, name: 責任 者子, department: 総務部, roles: [chief_officer]}
  - {id: p-0009, name: 退職 五郎, department: 人事部, roles: [designated_handler], active: false}
"""


def site_yaml(*, drop_medium: str | None = None) -> str:
    """Return the demo site YAML with the test additions (optionally without one medium)."""
    text_ = DEMO.read_text(encoding="utf-8").rstrip("\n") + "\n" + EXTRA
    text_ = text_.replace("\ncards:", EXTRA_PEOPLE + "\ncards:", 1)
    if drop_medium:
        text_ = "\n".join(line for line in text_.splitlines() if f"id: {drop_medium}," not in line) + "\n"
    return text_


class Site:
    """A store on SQLite with the demo policy applied and a signing key."""

    def __init__(self, tmp_path: Path) -> None:
        self.engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
        upgrade(self.engine)
        self.store = Store(self.engine)
        self.key = signing.generate_key()
        self.policy = PolicyService(self.store, self.key)
        self.media = MediaService(self.store, self.policy)
        assert self.policy.apply(parse_policy(site_yaml()), source_sha256="0" * 64, created_by="test") == 1

    def lend(self, **overrides: Any) -> tuple[str, int]:
        """Lend m-0001 to p-0001 on t-hr-01 for a day, approved by p-0002, unless overridden."""
        args: dict[str, Any] = {
            "medium": "m-0001",
            "person": "p-0001",
            "terminals": ["t-hr-01"],
            "starts_at": None,
            "ends_at": timefmt.now() + timedelta(days=1),
            "purpose": "給与データ移送 (test)",
            "read_only": True,
            "approved_by": "p-0002",
            "created_by": "tester",
        }
        args.update(overrides)
        return self.media.lend(**args)

    def bundle_loans(self, agent: str) -> list[dict[str, Any]]:
        """Open the signed bundle of one agent and return the loans it carries."""
        raw = self.policy.bundles()[agent]
        return messages.open_bundle(raw, self.key.public_key(), agent).bundle.policy["loans"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.engine.dispose()


def test_lend_is_a_new_version_only_the_named_terminals_get(site: Site) -> None:
    loan_id, version = site.lend()
    assert version == 2 and loan_id.startswith("loan-")
    loans = site.bundle_loans("term-hr-01")
    assert [loan["id"] for loan in loans] == [loan_id]
    assert loans[0]["medium"] == "m-0001" and loans[0]["read_only"] is True and loans[0]["returned_at"] is None
    assert site.bundle_loans("term-acc-01") == [] and site.bundle_loans("door-hr-01") == []
    # The borrower's bundle entry travels with the loan; the medium too.
    raw = site.policy.bundles()["term-hr-01"]
    policy = messages.open_bundle(raw, site.key.public_key(), "term-hr-01").bundle.policy
    assert [m["id"] for m in policy["media"]] == ["m-0001"]
    record = site.media.register.get_loan(loan_id)
    assert record is not None and record.lent_version == 2 and record.created_by == "tester"


def test_return_and_revoke_end_the_loan_in_new_versions(site: Site) -> None:
    first, _ = site.lend()
    assert site.media.return_medium(first, received_by="p-0002") == 3
    [loan] = site.bundle_loans("term-hr-01")
    assert loan["id"] == first and loan["returned_at"] is not None
    # The medium is back, so it can go out again; revoke ends that one early.
    second, v4 = site.lend(terminals=["t-hr-01", "t-acc-01"], person="p-0003")
    assert v4 == 4 and [loan["id"] for loan in site.bundle_loans("term-acc-01")] == [second]
    assert site.media.revoke(second, "異動のため / transferred", revoked_by="p-0002") == 5
    assert all(loan["returned_at"] for loan in site.bundle_loans("term-acc-01"))
    record = site.media.register.get_loan(second)
    assert record is not None and record.revoked_at is not None and record.revoke_reason.startswith("異動")
    with pytest.raises(MediaConflict, match="取消済み") as ended:  # the process language (tests: ja)
        site.media.return_medium(second, received_by="p-0002")
    assert localize(ended.value, "en") == f"loan {second} has already ended: it was revoked"
    log = site.media.register.list_loan_log()
    assert [(e.action, e.loan_id, e.version) for e in log] == [
        ("lend", first, 2),
        ("return", first, 3),
        ("lend", second, 4),
        ("revoke", second, 5),
    ]
    assert log[1].actor == "p-0002" and log[3].detail["reason"].startswith("異動")
    assert [r.id for r in site.media.loans(person="p-0003")] == [second]
    assert [r.id for r in site.media.loans(medium="m-0001", active=True)] == []


@pytest.mark.parametrize(
    ("overrides", "error", "needle", "english"),
    [
        ({"medium": "m-0404"}, MediaRefused, "台帳にありません", "not registered"),
        ({"medium": "m-0009"}, MediaRefused, "貸出できません（retired）", "it is retired"),
        ({"approved_by": "p-0001"}, MediaRefused, "職務の分離", "separation of duties"),
        ({"approved_by": "p-0003"}, MediaRefused, "区域責任者・責任者ではありません", "area_manager or chief_officer"),
        ({"person": "p-0009"}, MediaRefused, "在籍していません", "inactive"),
        ({"terminals": ["t-nowhere"]}, MediaRefused, "端末がありません: t-nowhere", "unknown terminal(s): t-nowhere"),
        ({"ends_at": datetime(2020, 1, 1, tzinfo=UTC)}, MediaRefused, "開始より後に", "after starts_at"),
    ],
)
def test_lend_refusals(
    site: Site, overrides: dict[str, Any], error: type[Exception], needle: str, english: str
) -> None:
    """Each refusal says why in the process language (Japanese here), and the same message reads in English."""
    with pytest.raises(error, match=re.escape(needle)) as refused:
        site.lend(**overrides)
    assert english in localize(refused.value, "en")
    assert site.store.current_policy_version().version == 1  # type: ignore[union-attr]
    assert site.media.register.list_loans() == [] and site.media.register.list_loan_log() == []


def test_chief_officer_may_approve_and_overlap_is_refused(site: Site) -> None:
    site.lend(approved_by="p-0008")
    with pytest.raises(MediaConflict, match=r"は貸出 loan-.* で p-0001 に .*まで貸出中です"):
        site.lend(person="p-0003", terminals=["t-acc-01"])
    # Later windows do not overlap: a reservation is fine.
    later = timefmt.now() + timedelta(days=3)
    site.lend(starts_at=later, ends_at=later + timedelta(hours=4))


def test_policy_apply_keeps_loans_and_refuses_to_orphan_one(site: Site) -> None:
    loan_id, _ = site.lend()
    # Re-applying the YAML (it has no loans: key) changes nothing and keeps the loan.
    assert site.policy.plan(parse_policy(site_yaml())).empty
    changed = parse_policy(site_yaml().replace("name: 仮名 三郎", "name: 仮名 三郎 (改)"))
    diff = site.policy.plan(changed)
    assert "loans" not in diff.changes and diff.changes["people"]["changed"] == ["p-0004"]
    assert site.policy.apply(changed, source_sha256="1" * 64, created_by="test") == 3
    assert [loan["id"] for loan in site.bundle_loans("term-hr-01")] == [loan_id]
    # Removing the lent medium would orphan the loan: refused, naming it.
    with pytest.raises(PolicyError, match=f"貸出 {loan_id}.*未返却") as orphaned:
        site.policy.apply(parse_policy(site_yaml(drop_medium="m-0001")), source_sha256="2" * 64, created_by="t")
    assert "is outstanding but the YAML removes its medium" in localize(orphaned.value.problems[0], "en")
    # A loans: key in the YAML cannot rewrite the register.
    with pytest.raises(PolicyError, match="sekisho media lend/return/revoke` で管理します"):
        site.policy.plan(parse_policy(site_yaml() + "loans: []\n"))
    # Once returned, the medium may leave the register; the loan goes with it (the register keeps it).
    site.media.return_medium(loan_id, received_by="p-0002")
    diff = site.policy.plan(parse_policy(site_yaml(drop_medium="m-0001")))
    assert diff.changes["media"]["removed"] == ["m-0001"] and diff.changes["loans"]["removed"] == [loan_id]
    assert site.media.register.get_loan(loan_id) is not None


def test_demo_policy_still_applies_with_media(tmp_path: Path) -> None:
    policy, _ = load_policy_file(DEMO)
    assert [m.id for m in policy.media] == ["m-0001", "m-0002", "m-0003"]
    assert "loans" not in policy.model_fields_set


def test_overdue_finding_raised_once_and_resolved_on_return(site: Site) -> None:
    loan_id, _ = site.lend(ends_at=timefmt.now() + timedelta(hours=1))
    assert site.media.check_overdue() == []
    later = timefmt.now() + timedelta(hours=2)
    [finding_id] = site.media.check_overdue(later)
    assert site.media.check_overdue(later + timedelta(minutes=1)) == []
    [finding] = site.store.list_findings(kind="media_loan_overdue")
    assert finding.id == finding_id and finding.agent_id == "term-hr-01" and finding.resolved_at is None
    assert finding.detail["loan"] == loan_id and finding.detail["person"] == "p-0001"
    site.media.return_medium(loan_id, received_by="p-0002")
    [finding] = site.store.list_findings(kind="media_loan_overdue")
    assert finding.resolved_at is not None and "return" in (finding.resolution or "")
    assert site.store.list_findings(open_only=True, kind="media_loan_overdue") == []


def test_overdue_medium_is_still_out(site: Site) -> None:
    loan_id, _ = site.lend(ends_at=timefmt.now() + timedelta(seconds=1))
    time.sleep(1.2)
    # Past its end but not received back: the medium cannot go out again until someone records the return.
    with pytest.raises(MediaConflict, match=loan_id):
        site.lend(person="p-0003", terminals=["t-acc-01"])
    site.media.return_medium(loan_id, received_by="p-0002")
    site.lend(person="p-0003", terminals=["t-acc-01"])


def test_inventory_shows_borrower_due_overdue_and_last_seen(site: Site) -> None:
    due = timefmt.now() + timedelta(hours=1)
    loan_id, _ = site.lend(ends_at=due)
    lines = {line.medium.id: line for line in site.media.inventory()}
    assert set(lines) == {"m-0001", "m-0002", "m-0003", "m-0009"}
    assert lines["m-0001"].state == "on_loan" and lines["m-0001"].loan.person == "p-0001"  # type: ignore[union-attr]
    assert lines["m-0001"].loan.ends_at == due.replace(microsecond=due.microsecond)  # type: ignore[union-attr]
    assert lines["m-0002"].state == "in_store" and lines["m-0002"].last_seen_at is None
    assert lines["m-0009"].state == "retired"
    overdue = {line.medium.id: line for line in site.media.inventory(due + timedelta(minutes=1))}
    assert overdue["m-0001"].overdue and overdue["m-0001"].state == "overdue"
    assert [loan.id for loan in site.media.overdue(due + timedelta(minutes=1))] == [loan_id]
    # A terminal reported the medium (agents/usb adds "medium" to usb.* payloads).
    agent_key = signing.generate_key()
    site.store.register_agent("term-hr-01", signing.public_key_pem(agent_key.public_key()).decode())
    seen = datetime(2026, 11, 30, 1, 2, 3, tzinfo=UTC)
    with site.engine.begin() as conn:
        for seq, (kind, medium) in enumerate([("usb.allowed", "m-0001"), ("usb.blocked", "m-0404")], 1):
            conn.execute(
                insert(Event).values(
                    agent_id="term-hr-01",
                    seq=seq,
                    event_id=f"e{seq}",
                    type=kind,
                    occurred_at=seen,
                    received_at=seen,
                    stored_at=seen,
                    clock_synced=True,
                    payload={"medium": medium},
                    raw="{}",
                    chain_index=seq,
                    prev_hash="0" * 64,
                    hash=str(seq) * 64,
                )
            )
    line = {line.medium.id: line for line in site.media.inventory()}["m-0001"]
    assert line.last_seen_at == seen and line.last_seen_agent == "term-hr-01" and line.last_seen_type == "usb.allowed"


def test_loan_log_is_append_only(site: Site) -> None:
    site.lend()
    with site.engine.begin() as conn, pytest.raises(DBAPIError, match="append-only"):
        conn.execute(text("UPDATE media_loan_log SET actor = 'someone else'"))
    with site.engine.begin() as conn, pytest.raises(DBAPIError, match="append-only"):
        conn.execute(text("DELETE FROM media_loan_log"))
    assert len(site.media.register.list_loan_log()) == 1
