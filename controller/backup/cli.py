"""`sekisho controller backup` and `sekisho controller restore`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from sekisho.controller.backup.archive import BackupError
from sekisho.controller.backup.restore import RestorePlan, apply_restore, open_backup, plan_restore, take_backup
from sekisho.controller.config import ControllerConfig, load_config
from sekisho.protocol import signing

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="controller.toml", exists=True, dir_okay=False)]


def _config(path: Path) -> ControllerConfig:
    try:
        return load_config(path)
    except (ValueError, OSError) as err:
        err_console.print(f"[red]設定を読めません / invalid controller config {path}:[/red] {err}")
        raise typer.Exit(2) from err


def _audit(cfg: ControllerConfig, key: Ed25519PrivateKey, action: str, target: str, detail: dict[str, Any]) -> None:
    """Record a backup or restore in the admin audit trail (after it: a restore replaces the trail too)."""
    from sekisho.controller.audit.operators import cli_operator
    from sekisho.controller.store import Store, make_engine

    operator = cli_operator()
    engine = make_engine(cfg.resolved_database_url())
    try:
        Store(engine, signing_key=key).record_admin(
            operator.actor, operator.via, operator.client, action, target, detail=detail
        )
    except (SQLAlchemyError, ValueError) as err:
        err_console.print(f"[yellow]監査記録に書けません / not written to the admin audit trail: {err}[/yellow]")
    finally:
        engine.dispose()


def _signing_key(cfg: ControllerConfig) -> Ed25519PrivateKey:
    try:
        return signing.load_private_key(cfg.signing_key)
    except (OSError, ValueError) as err:
        err_console.print(
            f"[red]署名鍵を読めません / cannot read the controller's signing key {cfg.signing_key}:[/red] the backup "
            "manifest is signed and verified with it (run this as the controller's user)"
        )
        raise typer.Exit(2) from err


def backup(
    config: ConfigOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="backup file to write (tar.gz, 0600)", dir_okay=False)],
) -> None:
    """Copy the store consistently (SQLite online backup / pg_dump) with a signed manifest."""
    cfg = _config(config)
    key = _signing_key(cfg)
    try:
        manifest = take_backup(cfg, output, key)
    except (BackupError, OSError, SQLAlchemyError) as err:
        err_console.print(f"[red]バックアップできません / backup failed:[/red] {err}")
        raise typer.Exit(1) from err
    rows = sum(manifest.tables.values())
    head = manifest.fields.get("checkpoint_head")
    _audit(
        cfg,
        key,
        "backup.create",
        f"backup:{output.name}",
        {"taken": manifest.created_at, "rows": rows, "policy_version": manifest.policy_version},
    )
    console.print(f"バックアップしました / backed up to {output}")
    console.print(
        f"  {manifest.backend}, schema {manifest.schema_revision}, {len(manifest.tables)} tables, {rows} rows, "
        f"policy version {manifest.policy_version}, {len(manifest.stream_max_seq)} agent stream(s), "
        f"checkpoint head {'#' + str(head['n']) if head else 'none'}, taken {manifest.created_at}"
    )


def _show_plan(plan: RestorePlan) -> None:
    m = plan.manifest
    console.print(
        f"バックアップ / backup of {m.created_at}: {m.backend}, schema {m.schema_revision}, "
        f"{sum(m.tables.values())} rows, policy version {m.policy_version}"
    )
    if plan.before is None:
        console.print(f"置き換えるデータベース / database replaced: not readable ({plan.before_error})")
    else:
        console.print(
            f"置き換えるデータベース / database replaced: {sum(plan.before.tables.values())} rows, "
            f"policy version {plan.before.policy_version}"
        )
    lost_versions = plan.lost_policy_versions
    if lost_versions is not None:
        console.print(
            f"[yellow]ポリシー版 {lost_versions[0]}–{lost_versions[1]} は失われます / policy versions "
            f"{lost_versions[0]}–{lost_versions[1]} were published after the backup and are lost[/yellow]: the "
            f"restored policy is re-issued above {plan.floor}; re-apply the changes made since the backup "
            "(revocations first)"
        )
    for agent, version in sorted(plan.implausible_reports.items()):
        console.print(f"[yellow]agent {agent} reported policy version {version}: implausible, not followed[/yellow]")
    if plan.before is None:
        console.print(
            "失われたイベントの範囲は今は不明です / the lost event window is unknown now: each agent's next events "
            "raise a sequence_gap finding from the backup's seq on"
        )
    elif not plan.lost:
        console.print("失われたイベントはありません / no stored event is lost")
    for window in plan.lost:
        console.print(
            f"[yellow]失われるイベント / lost events: {window.agent} seq {window.first_seq}–{window.last_seq} "
            f"({window.last_seq - window.first_seq + 1})[/yellow]"
        )


def restore(
    config: ConfigOpt,
    input_file: Annotated[
        Path, typer.Option("--input", "-i", help="backup file made by `controller backup`", exists=True, dir_okay=False)
    ],
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
) -> None:
    """Verify a backup, replace the store with it, keep policy versions monotonic and name what was lost."""
    cfg = _config(config)
    key = _signing_key(cfg)
    cfg.var_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".restore-", dir=cfg.var_dir) as tmp:
        try:
            manifest, data = open_backup(input_file, key, Path(tmp))
            plan = plan_restore(cfg, manifest)
        except BackupError as err:
            err_console.print(f"[red]復元を拒否しました / restore refused:[/red] {err}")
            raise typer.Exit(1) from err
        _show_plan(plan)
        question = "コントローラーを停止しましたか。復元しますか / controller stopped? restore now?"
        if not yes and not typer.confirm(question):
            console.print("中止しました / nothing changed")
            raise typer.Exit(1)
        try:
            report = apply_restore(cfg, plan, data, key)
        except (BackupError, OSError, SQLAlchemyError) as err:
            err_console.print(f"[red]復元に失敗しました / restore failed:[/red] {err}")
            raise typer.Exit(1) from err
    if report.safety_copy is not None:
        console.print(f"置き換えたデータベースの控え / the replaced database was saved to {report.safety_copy}")
    elif plan.before is not None:
        console.print(f"[yellow]控えなし / no copy of the replaced database: {report.safety_error}[/yellow]")
    rows, tables = sum(report.counts.values()), len(report.counts)
    console.print(f"復元しました / restored: {rows} rows in {tables} tables, as the manifest says")
    if report.issued_version is not None:
        console.print(
            f"ポリシー版 {report.restored_version} を版 {report.issued_version} として再発行 / policy version "
            f"{report.restored_version} re-issued as version {report.issued_version} (agents refuse older ones)"
        )
    _audit(
        cfg,
        key,
        "backup.restore",
        f"backup:{input_file.name}",
        {
            "taken": plan.manifest.created_at,
            "rows": rows,
            "restored_policy_version": report.restored_version,
            "issued_policy_version": report.issued_version,
        },
    )
    kinds = "restored_from_backup" + (", restore_lost_events" if plan.lost else "")
    console.print(f"記録しました / recorded as findings: {kinds}")
