"""Take a backup, and put one back without letting policy versions go backwards.

A restore brings back the records as they were at the backup. Two things after that moment cannot come
back and are named instead:

- policy versions published after the backup. Agents hold them and refuse anything older as a rollback,
  so the restored policy is re-issued above the highest version known to have been published: the floor
  beside the database (controller/policy/floor.py), the database being replaced, the backup itself and the
  versions agents reported in their heartbeats. Agents that report an even higher one later get the same
  treatment from the running controller (PolicyKeeper).
- events stored after the backup. Agents dropped them from their outboxes once acknowledged. Each agent's
  lost range (the backup's highest seq + 1 up to what the replaced database held) is printed and recorded
  as a ``restore_lost_events`` finding; where the replaced database is unreadable, the agents' next events
  raise ``sequence_gap`` findings over the same range.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from alembic.script import ScriptDirectory
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Table, insert
from sqlalchemy.exc import SQLAlchemyError

from sekisho.common.i18n import _
from sekisho.controller.backup.archive import (
    DATA_NAMES,
    BackupError,
    Manifest,
    file_sha256,
    read_archive,
    write_archive,
)
from sekisho.controller.backup.dumps import (
    backend_of,
    copy_sqlite,
    dump_postgres,
    live_state,
    load_postgres,
    load_sqlite,
    sqlite_file,
)
from sekisho.controller.backup.state import DatabaseState
from sekisho.controller.config import ControllerConfig
from sekisho.controller.policy.floor import MAX_REPORTED_JUMP, raise_floor, read_floor
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store.db import alembic_config, private_dir
from sekisho.controller.store.models import Finding
from sekisho.protocol import signing, timefmt

RESTORED = "restored_from_backup"
LOST_EVENTS = "restore_lost_events"
_FINDINGS = cast(Table, Finding.__table__)


def take_backup(
    cfg: ControllerConfig, output: Path, key: Ed25519PrivateKey, *, now: datetime | None = None
) -> Manifest:
    """Copy the configured database consistently and write it with a signed manifest to output."""
    url = cfg.resolved_database_url()
    backend = backend_of(url)
    private_dir(cfg.var_dir)
    created = now or timefmt.now()
    # The copy waits in a private folder beside the database, never in a shared /tmp.
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=cfg.var_dir) as tmp:
        data = Path(tmp) / DATA_NAMES[backend]
        state = copy_sqlite(sqlite_file(url), data) if backend == "sqlite" else dump_postgres(url, data)
        digest, size = file_sha256(data)
        fields: dict[str, Any] = {
            "backend": backend,
            "created_at": timefmt.fmt(created),
            "controller_key_id": signing.key_id(key.public_key()),
            **state.manifest_fields(),
            "data": {"sha256": digest, "size": size},
        }
        write_archive(output, fields, data, key)
    return Manifest({**fields, "format": 1})


def code_revisions() -> set[str]:
    """Return every Alembic revision this code knows."""
    script = ScriptDirectory.from_config(alembic_config())
    return {rev.revision for rev in script.walk_revisions()}


@dataclass(frozen=True, slots=True)
class LostWindow:
    """Events of one agent stored after the backup and not in it: seqs first..last."""

    agent: str
    first_seq: int
    last_seq: int


@dataclass(slots=True)
class RestorePlan:
    """What a restore will do and what it knows it loses, worked out before anything is changed."""

    manifest: Manifest
    before: DatabaseState | None
    before_error: str | None
    floor_file: int
    floor: int
    lost: list[LostWindow] = field(default_factory=list)
    implausible_reports: dict[str, int] = field(default_factory=dict)

    @property
    def lost_policy_versions(self) -> tuple[int, int] | None:
        """Return the range of policy versions published after the backup, if any are known."""
        if self.floor > self.manifest.policy_version:
            return self.manifest.policy_version + 1, self.floor
        return None


def plan_restore(cfg: ControllerConfig, manifest: Manifest) -> RestorePlan:
    """Check a verified backup against this code and the database it replaces; raise BackupError if refused."""
    url = cfg.resolved_database_url()
    if manifest.backend != backend_of(url):
        raise BackupError(
            _(
                "the backup is of a %(backup)s database; this controller uses %(here)s",
                backup=manifest.backend,
                here=backend_of(url),
            )
        )
    revision = manifest.schema_revision
    if revision is not None and revision not in code_revisions():
        raise BackupError(
            _(
                "the backup's schema revision %(revision)s is newer than this code knows: upgrade sekisho first",
                revision=repr(revision),
            )
        )
    before: DatabaseState | None = None
    before_error: str | None = None
    exists = manifest.backend == "postgresql" or sqlite_file(url).is_file()
    if exists:
        try:
            before = live_state(url)
        except SQLAlchemyError as err:
            before_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    else:
        before_error = "no database yet"
    floor_file = read_floor(cfg.var_dir)
    known = max(floor_file, manifest.policy_version, before.policy_version if before else 0)
    reports = before.reported_policy if before else {}
    # A heartbeat is signed by its agent but says what it likes: a report far above everything else known
    # would push every later version up to it (and toward the column's limit), so it is named, not followed.
    believed = {a: v for a, v in reports.items() if v <= known + MAX_REPORTED_JUMP}
    implausible = {a: v for a, v in reports.items() if a not in believed}
    floor = max(known, *believed.values()) if believed else known
    plan = RestorePlan(manifest, before, before_error, floor_file, floor, implausible_reports=implausible)
    if before is not None:
        backup_seqs = manifest.stream_max_seq
        for agent, head in sorted(before.streams.items()):
            kept = backup_seqs.get(agent, 0)
            if head.max_seq > kept:
                plan.lost.append(LostWindow(agent, kept + 1, head.max_seq))
    return plan


@dataclass(slots=True)
class RestoreReport:
    """What a restore did."""

    plan: RestorePlan
    safety_copy: Path | None
    safety_error: str | None
    restored_version: int
    issued_version: int | None
    counts: dict[str, int]


def _safety_copy(cfg: ControllerConfig, plan: RestorePlan, key: Ed25519PrivateKey) -> tuple[Path | None, str | None]:
    """Back up the database about to be replaced, so a wrong restore can itself be undone."""
    if plan.before is None:
        return None, plan.before_error
    stamp = timefmt.now().strftime("%Y%m%dT%H%M%SZ")
    target = cfg.var_dir / f"before-restore-{stamp}.tar.gz"
    try:
        take_backup(cfg, target, key)
    except (BackupError, OSError, SQLAlchemyError) as err:
        return None, str(err)
    return target, None


def _record(cfg: ControllerConfig, report: RestoreReport, key: Ed25519PrivateKey) -> None:
    from sekisho.controller.service import open_store

    plan = report.plan
    now = timefmt.now()
    lost_versions = plan.lost_policy_versions
    detail = {
        "backup_created_at": plan.manifest.created_at,
        "backup_checkpoint_head": plan.manifest.fields.get("checkpoint_head"),
        "replaced_checkpoint_head": None
        if plan.before is None or plan.before.checkpoint_head is None
        else {"n": plan.before.checkpoint_head[0], "hash": plan.before.checkpoint_head[1]},
        "replaced_database": "read" if plan.before is not None else f"unreadable: {plan.before_error}",
        "policy_version_restored": report.restored_version,
        "policy_version_floor": plan.floor,
        "policy_version_issued": report.issued_version,
        "policy_versions_lost": None if lost_versions is None else list(lost_versions),
        "lost_event_windows": [[w.agent, w.first_seq, w.last_seq] for w in plan.lost],
        "implausible_policy_reports": plan.implausible_reports,
    }
    store = open_store(cfg)
    try:

        def work(conn: Any) -> None:
            conn.execute(insert(_FINDINGS).values(kind=RESTORED, detail=detail, created_at=now))
            for window in plan.lost:
                conn.execute(
                    insert(_FINDINGS).values(
                        kind=LOST_EVENTS,
                        agent_id=window.agent,
                        first_seq=window.first_seq,
                        last_seq=window.last_seq,
                        detail={
                            "backup_created_at": plan.manifest.created_at,
                            "count": window.last_seq - window.first_seq + 1,
                        },
                        created_at=now,
                    )
                )

        store.write(work)
    finally:
        store.engine.dispose()


def apply_restore(cfg: ControllerConfig, plan: RestorePlan, data: Path, key: Ed25519PrivateKey) -> RestoreReport:
    """Replace the database with the backup's copy, check it, bring its schema up and re-issue the policy."""
    from sekisho.controller.service import open_store

    url = cfg.resolved_database_url()
    private_dir(cfg.var_dir)
    safety, safety_error = _safety_copy(cfg, plan, key)
    if plan.manifest.backend == "sqlite":
        load_sqlite(data, sqlite_file(url))
    else:
        load_postgres(data, url)
    counts = live_state(url).tables
    if counts != plan.manifest.tables:
        raise BackupError(
            _(
                "restored row counts differ from the manifest: %(restored)s != %(signed)s",
                restored=counts,
                signed=plan.manifest.tables,
            )
        )
    store = open_store(cfg)  # brings an older backup's schema up to this code's
    try:
        restored = store.current_policy_version()
        restored_version = restored.version if restored is not None else 0
        issued: int | None = None
        if restored is not None and plan.floor >= restored_version and plan.floor > plan.manifest.policy_version:
            issued = PolicyService(store, key).reissue_above(
                plan.floor,
                created_by="restore",
                comment=(
                    f"restore of the backup of {plan.manifest.created_at}: version {restored_version} re-issued "
                    f"above {plan.floor}, the highest version agents may hold"
                ),
            )
            if issued is not None:
                raise_floor(cfg.var_dir, issued)
    finally:
        store.engine.dispose()
    report = RestoreReport(plan, safety, safety_error, restored_version, issued, counts)
    _record(cfg, report, key)
    return report


def open_backup(path: Path, key: Ed25519PrivateKey, into: Path) -> tuple[Manifest, Path]:
    """Verify a backup file with the controller's key and extract its copy into a folder."""
    return read_archive(path, key.public_key(), into)
