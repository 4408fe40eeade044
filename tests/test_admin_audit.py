"""The admin audit trail (issue 12, item 2): who changed what, when, from where, old → new, tamper-evident.

Each admin path is driven through its real code (the CLI through typer's runner on a real database, the
services the API calls) and must leave its row with the operator, old and new values. The trail is a hash
chain sealed by the controller-signed checkpoints: a row edited, deleted or inserted directly in SQL is
named by `sekisho records verify` (exit code 1, the row's chain index and id). A value that looks like a My
Number is refused with nothing written. The store tests run on SQLite and PostgreSQL (store fixture).
"""

from __future__ import annotations

import getpass
import json
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, func, insert, select, update
from test_media import site_yaml
from typer.testing import CliRunner

from sekisho.cli import app as sekisho_app
from sekisho.common.i18n import localize
from sekisho.controller.media.service import MediaRefused, MediaService
from sekisho.controller.policy.loader import parse_policy
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store import Store
from sekisho.controller.store.audit import AuditRefused, Operator, admin_hash
from sekisho.controller.store.models import AdminAuditEntry, Checkpoint, IssuedCommand, LoanRecord, PolicyVersion
from sekisho.lab import write_toml
from sekisho.protocol import mynumber, signing, timefmt

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
ALICE = Operator("user:alice", "web", "192.0.2.10")
CLI_ACTOR = f"cli:{getpass.getuser()}@{socket.gethostname()}"


def synthetic_my_number(rng: random.Random) -> str:
    """Return 12 random digits whose last is the check digit: made up here, accepted by the checksum."""
    first11 = "".join(rng.choice("0123456789") for _ in range(11))
    return first11 + str(mynumber.check_digit(first11))


@pytest.fixture
def number() -> str:
    """A synthetic number the My Number guard must refuse (never a real one)."""
    value = synthetic_my_number(random.Random(20261207))
    assert mynumber.contains_my_number(value)
    return value


def rows(store: Store) -> list[AdminAuditEntry]:
    """Return every audit row, in chain order."""
    return store.list_admin(limit=10_000)


def checkpoints(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Checkpoint)).scalar_one())


def tamper(store: Store, *statements: Any) -> None:
    """Run raw statements, as someone with direct database access could."""
    with store.engine.begin() as conn:
        for statement in statements:
            conn.execute(statement)


def only_problem(store: Store) -> Any:
    problems = store.verify_chains()
    assert len(problems) == 1, problems
    return problems[0]


@pytest.fixture
def trail(store: Store) -> Store:
    """A store with five audit rows from three operators."""
    bob = Operator("token:bob/nightly", "api", "192.0.2.11")
    store.record_admin(*_who(ALICE), "media.loan.create", "loan:loan-1", None, {"purpose": "棚卸し"}, at=T0)
    store.record_admin(*_who(bob), "policy.apply", "policy", {"version": 1}, {"version": 2}, at=T0)
    store.record_admin("system", "system", None, "backup.create", "backup:a.tar.gz", detail={"rows": 3}, at=T0)
    store.record_admin(*_who(ALICE), "door.command", "agent:door-1", new={"name": "door.unlock"}, at=T0)
    store.record_admin(*_who(ALICE), "media.loan.return", "loan:loan-1", {"state": "on_loan"}, {"x": 1}, at=T0)
    assert store.verify_chains() == []
    return store


def _who(operator: Operator) -> tuple[str, str, str | None]:
    return operator.actor, operator.via, operator.client


# --- the chain, on both backends ----------------------------------------------------------------------


def test_rows_chain_verify_and_read_back(trail: Store) -> None:
    report = trail.verify_records()
    assert report.problems == [] and report.admin_records == 5
    written = rows(trail)
    assert [r.chain_index for r in written] == [1, 2, 3, 4, 5]
    first = written[0]
    assert (first.actor, first.via, first.client, first.action, first.target) == (
        "user:alice",
        "web",
        "192.0.2.10",
        "media.loan.create",
        "loan:loan-1",
    )
    assert first.old is None and first.new == {"purpose": "棚卸し"} and first.at == T0
    # Each row's hash follows from the one before (the same rule verify applies).
    assert written[1].prev_hash == first.hash and admin_hash(first.hash, written[1]) == written[1].hash
    assert [r.action for r in trail.list_admin(actor="user:alice")] == [
        "media.loan.create",
        "door.command",
        "media.loan.return",
    ]
    assert [r.chain_index for r in trail.list_admin(action="media.*")] == [1, 5]
    assert [r.chain_index for r in trail.list_admin(actor="token:*")] == [2]
    assert trail.list_admin(since=T0 + timedelta(seconds=1)) == []


def test_an_edited_row_is_named(trail: Store) -> None:
    tamper(trail, update(AdminAuditEntry).where(AdminAuditEntry.chain_index == 2).values(new={"version": 9}))
    problem = only_problem(trail)
    assert (problem.table, problem.chain_index, problem.problem) == (
        "admin_audit",
        2,
        "hash mismatch: admin record edited",
    )
    assert problem.event_id == "policy.apply" and problem.row_id is not None


def test_an_edited_actor_is_named(trail: Store) -> None:
    tamper(trail, update(AdminAuditEntry).where(AdminAuditEntry.chain_index == 4).values(actor="user:mallory"))
    problem = only_problem(trail)
    assert (problem.chain_index, problem.agent_id, problem.problem) == (
        4,
        "user:mallory",
        "hash mismatch: admin record edited",
    )


def test_a_deleted_row_is_named(trail: Store) -> None:
    tamper(trail, delete(AdminAuditEntry).where(AdminAuditEntry.chain_index == 3))
    problem = only_problem(trail)
    assert (problem.chain_index, problem.problem) == (4, "missing admin record(s) before chain index 4: deleted")


def test_deleted_last_rows_are_named(trail: Store) -> None:
    tamper(trail, delete(AdminAuditEntry).where(AdminAuditEntry.chain_index >= 4))
    problem = only_problem(trail)
    assert problem.table == "admin_audit" and problem.chain_index == 4
    assert problem.problem.startswith("last admin record(s) deleted: the chain ends at index 3, signed checkpoint #")
    assert problem.problem.endswith("has 5 (chain index 4–5 missing)")


def test_an_inserted_row_with_a_correct_link_is_named(trail: Store) -> None:
    last = rows(trail)[-1]
    forged: dict[str, Any] = {
        "at": T0,
        "actor": "user:alice",
        "via": "web",
        "client": None,
        "action": "user.create",
        "target": "user:mallory",
        "old": None,
        "new": {"role": "it_admin"},
        "detail": None,
        "chain_index": 6,
        "prev_hash": last.hash,
    }
    forged["hash"] = admin_hash(last.hash, forged)
    tamper(trail, insert(AdminAuditEntry).values(**forged))
    problem = only_problem(trail)
    assert problem.chain_index == 6
    assert "admin record(s) beyond the last signed checkpoint" in problem.problem and "inserted" in problem.problem


def test_an_inserted_row_in_the_middle_is_named(trail: Store) -> None:
    tamper(trail, update(AdminAuditEntry).where(AdminAuditEntry.chain_index >= 3).values(
        chain_index=AdminAuditEntry.chain_index + 10))  # fmt: skip
    second = rows(trail)[1]
    forged = {"at": T0, "actor": "system", "via": "system", "client": None, "action": "agent.register",
              "target": "agent:evil", "old": None, "new": None, "detail": None, "chain_index": 3,
              "prev_hash": second.hash}  # fmt: skip
    forged["hash"] = admin_hash(second.hash, forged)
    tamper(trail, insert(AdminAuditEntry).values(**forged))
    problem = only_problem(trail)
    assert (problem.chain_index, problem.problem) == (13, "missing admin record(s) before chain index 13: deleted")


def test_a_chain_rewritten_whole_is_named_against_the_signed_head(trail: Store) -> None:
    written = rows(trail)
    prev = written[0].prev_hash
    statements = []
    for row in written:
        columns = {c.name: getattr(row, c.name) for c in AdminAuditEntry.__table__.columns}
        if row.chain_index == 2:
            columns["new"] = {"version": 1}
        columns["prev_hash"] = prev
        columns["hash"] = prev = admin_hash(prev, columns)
        statements.append(update(AdminAuditEntry).where(AdminAuditEntry.id == row.id).values(
            new=columns["new"], prev_hash=columns["prev_hash"], hash=columns["hash"]))  # fmt: skip
    tamper(trail, *statements)
    problem = only_problem(trail)
    assert problem.problem.startswith("head differs from signed checkpoint #")
    assert problem.problem.endswith("admin records replaced and rehashed")


# --- the My Number guard -------------------------------------------------------------------------------


def test_a_my_number_in_any_value_is_refused_and_nothing_written(trail: Store, number: str) -> None:
    before = (len(rows(trail)), checkpoints(trail))
    spaced = f"{number[:4]} {number[4:8]}\u3000{number[8:]}"
    cases: list[dict[str, Any]] = [
        {"detail": {"note": f"個人番号 {spaced}"}},
        {"new": {"purpose": number}},
        {"old": {"list": [int(number)]}},
        {"target": f"person:{number}"},
    ]
    for case in cases:
        args: dict[str, Any] = {"target": "loan:x", **case}
        with pytest.raises(mynumber.MyNumberFound) as info:
            trail.record_admin("user:alice", "web", None, "media.loan.create", **args)
        assert number not in str(info.value) and "マイナンバー" in str(info.value)
        assert "looks like a My Number" in localize(info.value, "en")
    assert (len(rows(trail)), checkpoints(trail)) == before
    assert trail.verify_chains() == []


def test_malformed_rows_are_refused(store: Store) -> None:
    for actor, via, action in (("", "cli", "a.b"), ("x", "mail", "a.b"), ("x", "cli", "Not Dotted")):
        with pytest.raises(AuditRefused):
            store.record_admin(actor, via, None, action, "t")
    with pytest.raises(AuditRefused):
        store.record_admin("x", "cli", None, "a.b", "t", detail={"n": float("nan")})
    assert rows(store) == []


# --- wired paths: media, policy, agents, tokens ----------------------------------------------------------


@dataclass
class Site:
    store: Store
    policy: PolicyService
    media: MediaService


@pytest.fixture
def site(store: Store, controller_key: Ed25519PrivateKey) -> Site:
    policy = PolicyService(store, controller_key)
    assert policy.apply(parse_policy(site_yaml()), source_sha256="0" * 64, created_by="test", operator=ALICE) == 1
    return Site(store, policy, MediaService(store, policy))


def lend(site: Site, operator: Operator, **overrides: Any) -> tuple[str, int]:
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
    return site.media.lend(**args, operator=operator)


def test_policy_apply_writes_its_row_with_the_version_and_changes(site: Site) -> None:
    [applied] = rows(site.store)
    assert (applied.actor, applied.via, applied.action, applied.target) == (
        "user:alice",
        "web",
        "policy.apply",
        "policy",
    )
    assert applied.old is None and applied.new == {"source_sha256": "0" * 64, "comment": "", "version": 1}
    assert "m-0001" in applied.detail["changes"]["media"]["added"]
    renamed = site_yaml().replace("name: 見本 太郎", "name: 見本 太郎 (改名)", 1)
    assert site.policy.apply(parse_policy(renamed), source_sha256="1" * 64, created_by="t", operator=ALICE) == 2
    second = rows(site.store)[-1]
    assert second.old == {"version": 1, "source_sha256": "0" * 64} and second.new["version"] == 2
    assert site.store.verify_chains() == []


def test_media_lend_return_revoke_write_rows_with_old_and_new(site: Site) -> None:
    first, version = lend(site, ALICE)
    created = rows(site.store)[-1]
    assert (created.action, created.target, created.actor, created.client) == (
        "media.loan.create",
        f"loan:{first}",
        "user:alice",
        "192.0.2.10",
    )
    assert created.old is None and created.new["purpose"] == "給与データ移送 (test)"
    assert created.new["person"] == "p-0001" and created.detail == {"policy_version": version}
    site.media.return_medium(first, received_by="p-0002", operator=ALICE)
    returned = rows(site.store)[-1]
    assert returned.action == "media.loan.return" and returned.old["state"] == "on_loan"
    assert returned.new["received_by"] == "p-0002" and returned.new["returned_at"]
    second, _ = lend(site, Operator("token:bob/tablet", "api", "192.0.2.11"), person="p-0003")
    site.media.revoke(second, "異動のため", revoked_by="p-0002", operator=ALICE)
    revoked = rows(site.store)[-1]
    assert (revoked.action, revoked.new["revoke_reason"]) == ("media.loan.revoke", "異動のため")
    assert [r.actor for r in site.store.list_admin(action="media.loan.create")] == ["user:alice", "token:bob/tablet"]
    assert site.store.verify_chains() == []


def test_a_loan_purpose_with_a_my_number_writes_nothing(site: Site, number: str) -> None:
    before = (len(rows(site.store)), checkpoints(site.store))
    with pytest.raises(MediaRefused) as info:
        lend(site, ALICE, purpose=f"移送 {number[:6]}-{number[6:]}")
    assert "purpose" in str(info.value) and number not in str(info.value)
    assert (len(rows(site.store)), checkpoints(site.store)) == before
    assert site.store.read(select(LoanRecord)) == []
    assert len(site.store.read(select(PolicyVersion))) == 1


def test_a_refused_audit_row_rolls_the_change_back(site: Site, number: str) -> None:
    """The change and its row commit together: the row refused in the transaction takes the change with it."""
    document = dict(site.store.read(select(PolicyVersion))[0].document)
    with pytest.raises(mynumber.MyNumberFound):
        site.store.add_policy_version(
            document,
            created_by="t",
            source_sha256="2" * 64,
            audit=ALICE.action("policy.apply", "policy", detail={"ticket": number}),
        )
    assert len(site.store.read(select(PolicyVersion))) == 1 and len(rows(site.store)) == 1


def test_agent_register_replace_revoke_and_token_revoke_write_rows(store: Store) -> None:
    first, second = signing.generate_key(), signing.generate_key()
    pem = signing.public_key_pem(first.public_key()).decode()
    store.register_agent("term-a", pem, operator=ALICE)
    store.register_agent("term-a", pem, operator=ALICE)  # the same key: nothing changed, no row
    store.register_agent("term-a", signing.public_key_pem(second.public_key()).decode(), replace=True, operator=ALICE)
    store.revoke_agent("term-a", operator=ALICE)
    written = rows(store)
    assert [r.action for r in written] == ["agent.register", "agent.replace", "agent.revoke"]
    assert written[0].old is None and written[0].new["status"] == "active"
    assert written[1].old["key"] != written[1].new["key"]
    assert (written[2].old, written[2].new) == ({"status": "active"}, {"status": "revoked"})
    assert store.revoke_token("t-missing", T0, operator=ALICE) is False
    assert len(rows(store)) == 3 and store.verify_chains() == []


# --- through the command line ----------------------------------------------------------------------------


@dataclass
class Cli:
    config: Path
    store: Store
    tmp: Path

    def run(self, *args: str, code: int = 0) -> str:
        result = CliRunner().invoke(sekisho_app, [*args, "--config", str(self.config)], env={"COLUMNS": "250"})
        assert result.exit_code == code, result.output
        return result.output


@pytest.fixture
def cli(tmp_path: Path, db_url: str, store: Store, controller_key: Ed25519PrivateKey) -> Iterator[Cli]:
    """A controller.toml on the test database, signed with the store's key; the demo policy applied."""
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
            # No broker certificates: a command is recorded, then publishing it fails (exit 1).
            "ca_cert": str(tmp_path / "pki" / "missing-ca.crt"),
            "tls_cert": str(tmp_path / "pki" / "missing.crt"),
            "tls_key": str(tmp_path / "pki" / "missing.key"),
            "signing_key": str(key_path),
        },
    )
    PolicyService(store, controller_key).apply(parse_policy(site_yaml()), source_sha256="0" * 64, created_by="t")
    yield Cli(config, store, tmp_path)


def test_cli_agent_register_and_revoke_name_the_os_user_and_host(cli: Cli) -> None:
    public = cli.tmp / "agent.pub"
    public.write_bytes(signing.public_key_pem(signing.generate_key().public_key()))
    cli.run("controller", "register-agent", "term-cli", "--public-key", str(public))
    cli.run("controller", "revoke-agent", "term-cli")
    written = rows(cli.store)
    assert [(r.action, r.actor, r.via) for r in written] == [
        ("agent.register", CLI_ACTOR, "cli"),
        ("agent.revoke", CLI_ACTOR, "cli"),
    ]


def test_cli_door_unlock_records_the_operator_and_reason(cli: Cli) -> None:
    # Recorded (command and audit row in one transaction) before publishing, which fails here.
    cli.run("doors", "unlock", "room-hr", "--requested-by", "reception", "--reason", "業者の搬入", code=1)
    [row] = rows(cli.store)
    [command] = cli.store.read(select(IssuedCommand))
    assert (row.action, row.actor, row.via, row.target) == (
        "door.command",
        CLI_ACTOR,
        "cli",
        f"agent:{command.agent_id}",
    )
    assert row.new["command_id"] == command.id and row.new["name"] == "door.unlock"
    assert row.new["args"]["requested_by"] == "reception" and row.detail == {"reason": "業者の搬入"}


def test_cli_door_command_reason_with_a_my_number_is_refused(cli: Cli, number: str) -> None:
    output = cli.run("doors", "lockdown", "--all", "--reason", f"連絡先 {number}", code=2)
    assert "reason" in output and "マイナンバー" in output and number not in output
    assert rows(cli.store) == [] and cli.store.read(select(IssuedCommand)) == []


def test_cli_records_verify_names_an_edited_deleted_and_inserted_audit_row(cli: Cli) -> None:
    for n in range(1, 5):
        cli.store.record_admin(CLI_ACTOR, "cli", None, "fleet.token.create", f"token:t-{n}", new={"uses": n})
    output = cli.run("records", "verify")
    assert output.startswith("OK: ") and "4 admin record(s)" in output
    # Inserted after the last sealed row, correctly linked and hashed: beyond the signed head.
    last = rows(cli.store)[-1]
    forged = {"at": T0, "actor": "system", "via": "system", "client": None, "action": "user.create",
              "target": "user:mallory", "old": None, "new": None, "detail": None, "chain_index": 5,
              "prev_hash": last.hash}  # fmt: skip
    forged["hash"] = admin_hash(last.hash, forged)
    tamper(cli.store, insert(AdminAuditEntry).values(**forged))
    output = cli.run("records", "verify", code=1)
    assert output.startswith("BROKEN: 1 problem(s)")
    assert "admin_audit chain_index=5 " in output and "beyond the last signed checkpoint" in output
    tamper(cli.store, delete(AdminAuditEntry).where(AdminAuditEntry.chain_index == 5))
    assert cli.run("records", "verify").startswith("OK: ")
    # Edited.
    tamper(cli.store, update(AdminAuditEntry).where(AdminAuditEntry.chain_index == 2).values(new={"uses": 99}))
    output = cli.run("records", "verify", code=1)
    [line] = [line for line in output.splitlines() if line.startswith("admin_audit ")]
    assert line.startswith("admin_audit chain_index=2 row_id=")
    assert line.endswith(f"action=fleet.token.create actor={CLI_ACTOR}: hash mismatch: admin record edited")
    # Deleted.
    tamper(cli.store, delete(AdminAuditEntry).where(AdminAuditEntry.chain_index == 2))
    output = cli.run("records", "verify", code=1)
    assert "admin_audit chain_index=3 " in output and "missing admin record(s) before chain index 3: deleted" in output


def test_cli_audit_log_shows_and_filters_the_trail(cli: Cli) -> None:
    cli.store.record_admin("user:alice", "web", "192.0.2.10", "media.loan.create", "loan:[red]x", new={"a": [1]})
    cli.store.record_admin(CLI_ACTOR, "cli", None, "policy.apply", "policy", old={"version": 1}, new={"version": 2})
    output = cli.run("audit", "log")
    # In Japanese: tests/conftest.py pins the command lines' language (the catalogue has the English).
    assert "管理操作の監査記録" in output and "操作者" in output and "Admin audit trail" not in output
    assert "loan:[red]x" in output and "user:alice" in output and "policy.apply" in output
    lines = cli.run("audit", "log", "--json", "--action", "policy.*").splitlines()
    [entry] = [json.loads(line) for line in lines]
    assert (entry["actor"], entry["old"], entry["new"]) == (CLI_ACTOR, {"version": 1}, {"version": 2})
    assert cli.run("audit", "log", "--actor", "user:bob").startswith("該当する記録はありません")


# --- through the API: the authenticated operator ---------------------------------------------------------


def test_api_media_loan_records_the_token_user_and_address(tmp_path: Path, store: Store) -> None:
    from accounts_fixtures import WRITE, make_site

    from sekisho.controller.accounts.roles import Role

    site = make_site(tmp_path, store)
    login = site.user(Role.FACILITY_MANAGER, "suzuki")
    token = site.accounts.create_token(login, "tablet", None, by="test")
    client = site.client("192.0.2.44", headers={"Authorization": f"Bearer {token.token}"})
    body = {
        "medium": "m-0001",
        "person": "p-0001",
        "terminals": ["t-hr-01"],
        "ends_at": (timefmt.now() + timedelta(days=1)).isoformat(),
        "purpose": "監査対応",
        "approved_by": "p-0002",
        "recorded_by": "p-0002",
    }
    made = client.post("/api/v1/media/loans", json=body)
    assert made.status_code == 201, made.text
    [row] = store.list_admin(action="media.loan.create")
    assert row.actor == f"token:suzuki/{token.id}" and (row.via, row.client) == ("api", "192.0.2.44")
    assert row.target == f"loan:{made.json()['loan']['id']}" and row.new["purpose"] == "監査対応"
    # A service token of the config is named as such.
    legacy = site.client("192.0.2.45", headers={"Authorization": f"Bearer {WRITE}"})
    loan_id = made.json()["loan"]["id"]
    assert legacy.post(f"/api/v1/media/loans/{loan_id}/return", json={"received_by": "p-0002"}).status_code == 200
    returned = store.list_admin(action="media.loan.return")[0]
    assert returned.actor.startswith("token:") and returned.client == "192.0.2.45"
    # A purpose holding a My Number: 422, nothing written.
    number = synthetic_my_number(random.Random(7))
    before = len(rows(store))
    refused = client.post("/api/v1/media/loans", json={**body, "purpose": f"個人番号 {number}"})
    assert refused.status_code == 422 and number not in refused.text
    assert len(rows(store)) == before
