"""`sekisho controller backup` and `sekisho controller restore`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from sekisho.common.i18n import _
from sekisho.controller.backup.archive import BackupError
from sekisho.controller.backup.restore import RestorePlan, apply_restore, open_backup, plan_restore, take_backup
from sekisho.controller.config import ControllerConfig, load_config
from sekisho.protocol import signing

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=_("controller.toml"), exists=True, dir_okay=False)]


def _config(path: Path) -> ControllerConfig:
    try:
        return load_config(path)
    except (ValueError, OSError) as err:
        err_console.print(_("[red]invalid controller config %(path)s:[/red] %(err)s", path=path, err=err))
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
        err_console.print(_("[yellow]not written to the admin audit trail: %(err)s[/yellow]", err=err))
    finally:
        engine.dispose()


def _signing_key(cfg: ControllerConfig) -> Ed25519PrivateKey:
    try:
        return signing.load_private_key(cfg.signing_key)
    except (OSError, ValueError) as err:
        err_console.print(
            _(
                "[red]cannot read the controller's signing key %(signing_key)s:[/red] the backup manifest "
                "is signed and verified with it (run this as the controller's user)",
                signing_key=cfg.signing_key,
            )
        )
        raise typer.Exit(2) from err


def backup(
    config: ConfigOpt,
    output: Annotated[
        Path, typer.Option("--output", "-o", help=_("backup file to write (tar.gz, 0600)"), dir_okay=False)
    ],
) -> None:
    """Copy the store consistently (SQLite online backup / pg_dump) with a signed manifest."""
    cfg = _config(config)
    key = _signing_key(cfg)
    try:
        manifest = take_backup(cfg, output, key)
    except (BackupError, OSError, SQLAlchemyError) as err:
        err_console.print(_("[red]backup failed:[/red] %(err)s", err=err))
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
    console.print(_("backed up to %(output)s", output=output))
    console.print(
        "  "
        + _(
            "%(backend)s, schema %(schema)s, %(tables)s tables, %(rows)s rows, policy version %(policy_version)s, "
            "%(streams)s agent stream(s), checkpoint head %(head)s, taken %(taken)s",
            backend=manifest.backend,
            schema=manifest.schema_revision,
            tables=len(manifest.tables),
            rows=rows,
            policy_version=manifest.policy_version,
            streams=len(manifest.stream_max_seq),
            head="#" + str(head["n"]) if head else _("none"),
            taken=manifest.created_at,
        )
    )


def _show_plan(plan: RestorePlan) -> None:
    m = plan.manifest
    console.print(
        _(
            "backup of %(created_at)s: %(backend)s, schema %(schema_revision)s, %(sum)s rows, policy "
            "version %(policy_version)s",
            created_at=m.created_at,
            backend=m.backend,
            schema_revision=m.schema_revision,
            sum=sum(m.tables.values()),
            policy_version=m.policy_version,
        )
    )
    if plan.before is None:
        console.print(_("database replaced: not readable (%(before_error)s)", before_error=plan.before_error))
    else:
        console.print(
            _(
                "database replaced: %(sum)s rows, policy version %(policy_version)s",
                sum=sum(plan.before.tables.values()),
                policy_version=plan.before.policy_version,
            )
        )
    lost_versions = plan.lost_policy_versions
    if lost_versions is not None:
        console.print(
            _(
                "[yellow]policy versions %(lost_versions)s–%(lost_versions2)s were published after the "
                "backup and are lost[/yellow]: the restored policy is re-issued above %(floor)s; re-apply "
                "the changes made since the backup (revocations first)",
                lost_versions=lost_versions[0],
                lost_versions2=lost_versions[1],
                floor=plan.floor,
            )
        )
    for agent, version in sorted(plan.implausible_reports.items()):
        console.print(
            _(
                "[yellow]agent %(agent)s reported policy version %(version)s: implausible, not followed[/yellow]",
                agent=agent,
                version=version,
            )
        )
    if plan.before is None:
        console.print(
            _(
                "the lost event window is unknown now: each agent's next events raise a sequence_gap "
                "finding from the backup's seq on"
            )
        )
    elif not plan.lost:
        console.print(_("no stored event is lost"))
    for window in plan.lost:
        console.print(
            _(
                "[yellow]lost events: %(agent)s seq %(first_seq)s–%(last_seq)s (%(last_seq2)s)[/yellow]",
                agent=window.agent,
                first_seq=window.first_seq,
                last_seq=window.last_seq,
                last_seq2=window.last_seq - window.first_seq + 1,
            )
        )


def restore(
    config: ConfigOpt,
    input_file: Annotated[
        Path,
        typer.Option("--input", "-i", help=_("backup file made by `controller backup`"), exists=True, dir_okay=False),
    ],
    yes: Annotated[bool, typer.Option("--yes", help=_("do not ask for confirmation"))] = False,
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
            err_console.print(_("[red]restore refused:[/red] %(err)s", err=err))
            raise typer.Exit(1) from err
        _show_plan(plan)
        question = _("controller stopped? restore now?")
        if not yes and not typer.confirm(question):
            console.print(_("nothing changed"))
            raise typer.Exit(1)
        try:
            report = apply_restore(cfg, plan, data, key)
        except (BackupError, OSError, SQLAlchemyError) as err:
            err_console.print(_("[red]restore failed:[/red] %(err)s", err=err))
            raise typer.Exit(1) from err
    if report.safety_copy is not None:
        console.print(_("the replaced database was saved to %(safety_copy)s", safety_copy=report.safety_copy))
    elif plan.before is not None:
        console.print(
            _("[yellow]no copy of the replaced database: %(safety_error)s[/yellow]", safety_error=report.safety_error)
        )
    rows, tables = sum(report.counts.values()), len(report.counts)
    console.print(_("restored: %(rows)s rows in %(tables)s tables, as the manifest says", rows=rows, tables=tables))
    if report.issued_version is not None:
        console.print(
            _(
                "policy version %(restored_version)s re-issued as version %(issued_version)s (agents "
                "refuse older ones)",
                restored_version=report.restored_version,
                issued_version=report.issued_version,
            )
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
    console.print(_("recorded as findings: %(kinds)s", kinds=kinds))
