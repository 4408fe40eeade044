"""Policy versions, issued commands and media loans are chained and sealed: `records verify` names a row edited,
inserted or deleted directly in the database, and the record log rewritten (controller/store/record_log.py).

Each test runs on SQLite and on a private PostgreSQL cluster (the store fixtures).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, insert, select, text, update
from typer.testing import CliRunner

from sekisho.cli import app as sekisho_app
from sekisho.controller.media.register import MediaRegister
from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.controller.store.models import Checkpoint, IssuedCommand, LoanRecord, PolicyVersion, RecordLogEntry
from sekisho.controller.store.record_log import entry_hash

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def verify(config: Path, *, code: int) -> str:
    """Run `sekisho records verify` in process; check its exit code and return what it printed."""
    result = CliRunner().invoke(sekisho_app, ["records", "verify", "--config", str(config)], env={"COLUMNS": "400"})
    assert result.exit_code == code, result.output
    return result.output


def lend(store: Store, loan_id: str, version: int) -> None:
    """Record a loan with its policy version and log line, as the media service does."""
    MediaRegister(store).add_loan_version(
        {"loans": [loan_id]},
        base_version=version - 1,
        created_by="test",
        comment="",
        log={"action": "lend", "loan_id": loan_id, "medium": "m-0001", "person": "p-0001", "actor": "t", "detail": {}},
        new_loan={
            "id": loan_id,
            "medium": "m-0001",
            "person": "p-0001",
            "terminals": ["t-1"],
            "starts_at": T0,
            "ends_at": T0 + timedelta(days=1),
            "purpose": "audit",
            "read_only": True,
            "approved_by": "p-0002",
        },
        at=T0,
    )


@pytest.fixture
def filled(store: Store) -> Store:
    """Two policy versions, one command and one loan (version 3), all written through the store."""
    store.add_policy_version({"v": 1}, created_by="alice", source_sha256="0" * 64, created_at=T0)
    store.add_policy_version({"v": 2}, created_by="alice", source_sha256="1" * 64, created_at=T0)
    store.add_issued_command(
        command_id="c" * 32,
        agent_id="door-1",
        name="door.unlock",
        args={"door": "d-1"},
        issued_at=T0,
        expires_at=T0 + timedelta(minutes=5),
        nonce="n" * 32,
    )
    lend(store, "loan-1", 3)
    assert store.verify_chains() == []
    return store


def lines_of(output: str, table: str) -> list[str]:
    """Return the record_log lines verify printed for one tracked table."""
    return [line for line in output.splitlines() if line.startswith(f"record_log {table} ")]


def test_an_intact_store_verifies_and_counts_the_rows(filled: Store, controller_toml: Path) -> None:
    output = verify(controller_toml, code=0)
    # 3 policy versions, 1 command, 1 loan, 1 loan log line.
    assert "6 policy/command/loan row(s)" in output
    assert "policy versions" not in output.split("not checked:")[-1]


def test_an_edited_policy_version_is_named(filled: Store, controller_toml: Path) -> None:
    with filled.engine.begin() as conn:
        conn.execute(update(PolicyVersion).where(PolicyVersion.version == 2).values(document={"v": "changed"}))
    [line] = lines_of(verify(controller_toml, code=1), "policy_versions")
    assert line.endswith("key=2: policy_versions 2: differs from its last logged state: row edited")


def test_a_command_inserted_directly_is_named(filled: Store, controller_toml: Path) -> None:
    with filled.engine.begin() as conn:
        conn.execute(
            insert(IssuedCommand).values(
                id="d" * 32,
                agent_id="door-1",
                name="door.unlock",
                args={"door": "d-1"},
                issued_at=T0,
                expires_at=T0,
                nonce="m" * 32,
            )
        )
    [line] = lines_of(verify(controller_toml, code=1), "issued_commands")
    assert f"issued_commands {'d' * 32}: not in the record log: row inserted" in line


def test_an_edited_loan_and_a_deleted_command_are_named(filled: Store, controller_toml: Path) -> None:
    with filled.engine.begin() as conn:
        conn.execute(update(LoanRecord).where(LoanRecord.id == "loan-1").values(ends_at=T0 + timedelta(days=30)))
        conn.execute(delete(IssuedCommand))
        # The overdue finding's link is rewritten by writers without the key: not part of the record.
        conn.execute(update(LoanRecord).values(overdue_finding_id=7))
    output = verify(controller_toml, code=1)
    [loan] = lines_of(output, "media_loans")
    assert "media_loans loan-1: differs from its last logged state: row edited" in loan
    [command] = lines_of(output, "issued_commands")
    assert "in the record log but missing: row deleted" in command


def test_a_rewritten_record_log_is_named(filled: Store, controller_toml: Path) -> None:
    """Edit a version, then make its log entry say the new digest and re-hash the stream: the signed head differs."""
    from sekisho.controller.store.record_log import BY_STREAM, row_digest

    tracked = BY_STREAM["policy_versions"]
    with filled.engine.begin() as conn:
        conn.execute(update(PolicyVersion).where(PolicyVersion.version == 1).values(comment="nothing to see"))
        row = conn.execute(select(*tracked.table.columns).where(PolicyVersion.version == 1)).one()
        entries = conn.execute(
            select(RecordLogEntry.__table__)
            .where(RecordLogEntry.stream == "policy_versions")
            .order_by(RecordLogEntry.chain_index)
        ).all()
        prev = "0" * 64
        for entry in entries:
            values: dict[str, Any] = dict(entry._mapping)
            if values["row_key"] == "1":
                values["digest"] = row_digest(tracked, row)
            values["prev_hash"] = prev
            prev = values["hash"] = entry_hash(prev, values)
            conn.execute(update(RecordLogEntry).where(RecordLogEntry.id == entry.id).values(**values))
    [line] = lines_of(verify(controller_toml, code=1), "policy_versions")
    assert "head differs from signed checkpoint #" in line and "record log rewritten" in line


def test_rows_from_before_the_upgrade_are_sealed_once(tmp_path: Path, controller_key: Ed25519PrivateKey) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0015")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO policy_versions (version, created_at, created_by, source_sha256, document, comment) "
                    "VALUES (1, '2026-11-01 00:00:00.000000', 'old', :sha, :doc, '')"
                ),
                {"sha": "0" * 64, "doc": json.dumps({"v": 1})},
            )
        upgrade(url)
        store = Store(engine, signing_key=controller_key)
        store.seal_existing()  # what a controller start does
        store.seal_existing()  # and again: sealed once
        with engine.connect() as conn:
            kinds = conn.execute(select(Checkpoint.kind).order_by(Checkpoint.id)).scalars().all()
            ops = conn.execute(select(RecordLogEntry.op)).scalars().all()
        assert kinds == ["genesis", "records_seal"] and ops == ["seal"]
        assert store.verify_chains() == []
        store.add_policy_version({"v": 2}, created_by="alice", source_sha256="1" * 64)
        with engine.begin() as conn:
            conn.execute(update(PolicyVersion).where(PolicyVersion.version == 1).values(created_by="someone"))
        [problem] = store.verify_chains()
        assert (problem.table, problem.agent_id, problem.event_id) == ("record_log", "policy_versions", "1")
    finally:
        engine.dispose()
