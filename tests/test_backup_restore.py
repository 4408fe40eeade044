"""`sekisho controller backup` / `restore`: exact round trips, a refused forgery, and policy versions that never
go backwards for real agents (whose policy cache refuses rollbacks), with the lost event window named."""

from __future__ import annotations

import io
import json
import shutil
import signal
import sqlite3
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import func, inspect, select, table
from support.lab import lab_on
from support.site import Site, wait_for
from typer.testing import CliRunner

from sekisho.agents.runtime.policy_cache import PolicyCache
from sekisho.cli import app
from sekisho.controller.backup.archive import write_archive
from sekisho.controller.backup.restore import open_backup, plan_restore
from sekisho.controller.config import load_config
from sekisho.controller.policy.floor import floor_path, read_floor
from sekisho.controller.service import open_store
from sekisho.controller.store import DeadLetterIn, Store, make_engine
from sekisho.controller.store.models import Event
from sekisho.deploy.pki import PkiPaths
from sekisho.lab import Lab, write_toml
from sekisho.lab.pgcluster import pg_database
from sekisho.protocol import errors, signing, timefmt

if TYPE_CHECKING:
    from store_fixtures import FakeAgent, MakeAgent

DEMO_POLICY = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
AGENT = "term-hr-01"
runner = CliRunner()


def cli(*args: str, ok: bool = True) -> str:
    """Run `sekisho ARGS` in this process; return its output (asserting the exit status).

    The output is Japanese (tests/conftest.py pins SEKISHO_LANG=ja); wide, so no message is wrapped.
    """
    result = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "250"})
    assert (result.exit_code == 0) is ok, result.output
    return result.output


def row_counts(url: str) -> dict[str, int]:
    """Count the rows of every table (but alembic's) independently of the backup code."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            names = sorted(n for n in inspect(conn).get_table_names() if n != "alembic_version")
            return {n: int(conn.execute(select(func.count()).select_from(table(n))).scalar_one()) for n in names}
    finally:
        engine.dispose()


def controller_toml(pki: Path, root: Path, database_url: str | None = None) -> Path:
    """Write a controller.toml that only the store commands use (no broker needed)."""
    paths = PkiPaths.at(pki)
    return write_toml(
        root / "controller.toml",
        {
            "profile": "dev",
            "var_dir": str(root / "var"),
            "database_url": database_url,
            "ca_cert": str(paths.ca_cert),
            "tls_cert": str(paths.controller_cert),
            "tls_key": str(paths.controller_key),
            "signing_key": str(paths.controller_signing_key),
        },
    )


def populate(store: Store, make_agent: MakeAgent, *, events: int, policies: int) -> list[FakeAgent]:
    """Put rows in most tables: agents and key lines, events with a gap, a dead letter, policies, a heartbeat."""
    a, b = make_agent(store), make_agent(store)
    store.store_batch(a.events(range(1, events + 1)))
    store.store_batch(b.events([1, 2, 5]))  # a gap: a sequence_gap finding
    letter = DeadLetterIn(topic="x", raw=b"{}", reason=errors.MALFORMED, detail="test", agent_id=a.agent_id, seq=None)
    store.store_batch([], [letter])
    for n in range(1, policies + 1):
        store.add_policy_version({"site": f"s{n}"}, created_by="test", source_sha256="0" * 64)
    store.record_heartbeat(a.agent_id, {"next_seq": events + 1, "policy_version": policies}, seen_at=timefmt.now())
    return [a, b]


# --- SQLite: why not cp, and an exact round trip ---------------------------------------------------------------


def test_cp_of_the_live_database_misses_what_the_wal_holds_backup_does_not(
    pki: Path, tmp_path: Path, make_agent: MakeAgent
) -> None:
    config = controller_toml(pki, tmp_path)
    cfg = load_config(config)
    url = cfg.resolved_database_url()
    store = open_store(cfg)
    try:
        populate(store, make_agent, events=20, policies=2)
        live = row_counts(url)
        # What users tried: the controller still running, its recent commits in controller.db-wal.
        copied = tmp_path / "cp.db"
        shutil.copyfile(cfg.var_dir / "controller.db", copied)
        with sqlite3.connect(copied) as plain:
            events_in_cp = plain.execute("SELECT count(*) FROM events").fetchone()[0]
        assert events_in_cp < live["events"] == 23
        out = cli("controller", "backup", "--config", str(config), "--output", str(tmp_path / "b.tar.gz"))
    finally:
        store.engine.dispose()
    assert "バックアップしました" in out and f"{sum(live.values())} 行" in out
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))["manifest"]  # type: ignore[arg-type]
    assert manifest["tables"] == live
    assert manifest["policy_version"] == 2
    assert oct((tmp_path / "b.tar.gz").stat().st_mode & 0o777) == "0o600"


def test_sqlite_round_trip_restores_exact_counts_and_names_the_lost_events(
    pki: Path, tmp_path: Path, make_agent: MakeAgent
) -> None:
    config = controller_toml(pki, tmp_path)
    cfg = load_config(config)
    url = cfg.resolved_database_url()
    store = open_store(cfg)
    try:
        a, b = populate(store, make_agent, events=10, policies=3)
        at_backup = row_counts(url)
        cli("controller", "backup", "--config", str(config), "--output", str(tmp_path / "b.tar.gz"))
        # After the backup: more events and two more policy versions, which the restore loses.
        store.store_batch(a.events(range(11, 15)))
        store.store_batch(b.events([6]))
        for n in (4, 5):
            store.add_policy_version({"site": f"s{n}"}, created_by="test", source_sha256="0" * 64)
    finally:
        store.engine.dispose()

    out = cli("controller", "restore", "--config", str(config), "--input", str(tmp_path / "b.tar.gz"), "--yes")
    assert "ポリシー版 4–5 はバックアップ後に公開されたため失われます" in out
    assert "ポリシー版 3 を版 6 として再発行しました" in out
    assert f"{a.agent_id} seq 11–14（4 件）" in out and f"{b.agent_id} seq 6–6（1 件）" in out
    safety = sorted(cfg.var_dir.glob("before-restore-*.tar.gz"))
    assert len(safety) == 1 and str(safety[0]) in out.replace("\n", "")

    after = row_counts(url)
    # Exactly what was backed up, plus the re-issued version, the restore's own three findings and its row in
    # the admin audit trail (with the checkpoint sealing it), and the re-issued version's record log entry.
    changed = ("policy_versions", "findings", "admin_audit", "checkpoints", "record_log")
    assert {k: v for k, v in after.items() if k not in changed} == {
        k: v for k, v in at_backup.items() if k not in changed
    }
    assert after["policy_versions"] == at_backup["policy_versions"] + 1
    assert after["findings"] == at_backup["findings"] + 3
    # Checkpoints: one sealing the audit row, one sealing the re-issued version in the record log (issue 14).
    assert (after["admin_audit"], after["checkpoints"]) == (at_backup["admin_audit"] + 1, at_backup["checkpoints"] + 2)
    assert after["record_log"] == at_backup["record_log"] + 1
    store = Store(make_engine(url))
    try:
        (restored,) = store.list_findings(kind="restored_from_backup")
        assert restored.detail["policy_versions_lost"] == [4, 5]
        lost = {(f.agent_id, f.first_seq, f.last_seq) for f in store.list_findings(kind="restore_lost_events")}
        assert lost == {(a.agent_id, 11, 14), (b.agent_id, 6, 6)}
        current = store.current_policy_version()
        assert current is not None and current.version == 6 and current.document == {"site": "s3"}
        assert store.event_seqs(a.agent_id) == list(range(1, 11))
        assert store.verify_chains() == []
    finally:
        store.engine.dispose()


def test_a_forged_or_altered_backup_and_a_newer_schema_are_refused(
    pki: Path, tmp_path: Path, make_agent: MakeAgent
) -> None:
    config = controller_toml(pki, tmp_path)
    cfg = load_config(config)
    store = open_store(cfg)
    try:
        populate(store, make_agent, events=3, policies=1)
    finally:
        store.engine.dispose()
    good = tmp_path / "b.tar.gz"
    cli("controller", "backup", "--config", str(config), "--output", str(good))
    before = row_counts(cfg.resolved_database_url())

    with tarfile.open(good) as tar:
        doc = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        data = tar.extractfile("database.sqlite3").read()  # type: ignore[union-attr]
    copy = tmp_path / "database.sqlite3"
    copy.write_bytes(data)
    fields = {k: v for k, v in doc["manifest"].items() if k != "format"}

    # Signed by another key: not this site's backup.
    write_archive(tmp_path / "other.tar.gz", fields, copy, signing.generate_key())
    # The data changed after signing.
    copy.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    altered = tmp_path / "altered2.tar.gz"
    with tarfile.open(altered, "w:gz") as tar:
        manifest = json.dumps(doc).encode()
        for name, body in (("manifest.json", manifest), ("database.sqlite3", copy.read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    # Signed by the right key but from a schema this code does not know.
    copy.write_bytes(data)
    key = signing.load_private_key(cfg.signing_key)
    write_archive(tmp_path / "future.tar.gz", {**fields, "schema_revision": "9999_future"}, copy, key)

    expected = {
        # (the command line's language: Japanese in the tests)
        "other.tar.gz": "マニフェストの署名がコントローラーの鍵で検証できません",
        "altered2.tar.gz": "署名付きマニフェストと一致しません",
        "future.tar.gz": "このコードより新しいものです",
    }
    for name, reason in expected.items():
        out = cli("controller", "restore", "--config", str(config), "--input", str(tmp_path / name), "--yes", ok=False)
        assert "復元を拒否しました" in out and reason in out, (name, out)
    assert row_counts(cfg.resolved_database_url()) == before


def test_an_agent_reporting_an_absurd_version_is_named_not_followed(
    pki: Path, tmp_path: Path, make_agent: MakeAgent
) -> None:
    config = controller_toml(pki, tmp_path)
    cfg = load_config(config)
    store = open_store(cfg)
    try:
        a, b = populate(store, make_agent, events=2, policies=2)
        cli("controller", "backup", "--config", str(config), "--output", str(tmp_path / "b.tar.gz"))
        store.record_heartbeat(b.agent_id, {"next_seq": 3, "policy_version": 2**31 - 2}, seen_at=timefmt.now())
        store.record_heartbeat(a.agent_id, {"next_seq": 3, "policy_version": 7}, seen_at=timefmt.now())
    finally:
        store.engine.dispose()
    key = signing.load_private_key(cfg.signing_key)
    with tempfile.TemporaryDirectory() as tmp:
        manifest, _ = open_backup(tmp_path / "b.tar.gz", key, Path(tmp))
    plan = plan_restore(cfg, manifest)
    assert plan.floor == 7
    assert plan.implausible_reports == {b.agent_id: 2**31 - 2}


# --- real agents: policy versions stay monotonic after a restore ----------------------------------------------


def agent_cache(lab: Lab) -> PolicyCache:
    """Read the agent's own policy cache file as the agent would on its next start."""
    creds = lab.root / "agents" / AGENT / "state"
    key = signing.load_public_key(PkiPaths.at(lab.pki_dir).controller_signing_pub)
    return PolicyCache(creds, key, AGENT)


def cached_version(lab: Lab) -> int | None:
    """Return the version the agent holds (its cache file is replaced atomically on every apply)."""
    return agent_cache(lab).version


def handlers_in_cache(lab: Lab) -> list[str]:
    """Return the handlers of the agent's terminal in the bundle it holds."""
    bundle = agent_cache(lab).current()
    assert bundle is not None
    (terminal,) = bundle.bundle.policy["terminals"]
    return list(terminal["handlers"])


@pytest.fixture
def lab(pki: Path, tmp_path: Path) -> Iterator[Lab]:
    """A lab with a running broker, the demo policy's terminal agent registered and a policy version 1."""
    lab = lab_on(pki, tmp_path / "site")
    lab.start_broker()
    lab.write_controller_config(batch_wait_ms=5)
    lab.add_agent(AGENT, heartbeat_interval_s=1, resend_after_s=3)
    lab.register_agents(AGENT)
    try:
        yield lab
    finally:
        lab.stop_all()


def start_controller(lab: Lab) -> subprocess.Popen[bytes]:
    """Start `controller serve` in its own process (SQLite's locks are per process: the test reads beside it)."""
    proc = lab.spawn_controller(http=True)
    Site(lab).wait_ready()
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a controller cleanly and wait for it."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def apply(lab: Lab, tmp_path: Path, handlers: str) -> None:
    """Apply the demo policy with the HR terminal's handlers replaced."""
    policy = tmp_path / "site.yaml"
    policy.write_text(DEMO_POLICY.read_text().replace("handlers: [p-0001, p-0002]", f"handlers: [{handlers}]"))
    lab.sekisho("policy", "apply", str(policy), "--config", str(lab.controller_config))


def events_of(url: str, type_: str) -> list[dict[str, Any]]:
    """Return the stored payloads of the agent's events of one type."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Event.payload).where(Event.agent_id == AGENT, Event.type == type_))
            return [dict(r) for r in rows.scalars()]
    finally:
        engine.dispose()


@pytest.mark.broker
def test_after_a_restore_the_agents_accept_the_next_version_and_a_revocation_reaches_them(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEKISHO_LANG", "en")  # the `sekisho` commands below speak English (asserted on)
    config = str(lab.controller_config)
    cfg = load_config(lab.controller_config)
    url = cfg.resolved_database_url()
    apply(lab, tmp_path, "p-0001, p-0002")
    ctl = start_controller(lab)
    lab.spawn("agent", "run", "--config", str(lab.agent_config(AGENT)), log_name=AGENT)
    try:
        wait_for(lambda: cached_version(lab) == 1, 30, "the agent to apply version 1")
        wait_for(lambda: bool(events_of(url, "agent.policy_applied")), 30, "the agent's first events stored")
        lab.sekisho("controller", "backup", "--config", config, "--output", str(tmp_path / "b.tar.gz"))
        at_backup = Store(make_engine(url))
        kept = at_backup.get_stream(AGENT)
        at_backup.engine.dispose()
        assert kept is not None
        apply(lab, tmp_path, "p-0002")
        apply(lab, tmp_path, "p-0001")
        wait_for(lambda: cached_version(lab) == 3, 30, "the agent to apply version 3")
        wait_for(
            lambda: any(e["policy_version"] == 3 for e in events_of(url, "agent.policy_applied")),
            30,
            "the agent's v3 event stored",
        )
    finally:
        stop(ctl)
    replaced = Store(make_engine(url))
    held = replaced.get_stream(AGENT)
    replaced.engine.dispose()
    assert held is not None and held.max_seq > kept.max_seq

    done = lab.sekisho("controller", "restore", "--config", config, "--input", str(tmp_path / "b.tar.gz"), "--yes")
    out = done.stdout.replace("\n", " ")
    assert "policy versions 2–3 were published after the backup" in out
    assert "re-issued as version 4" in out
    assert f"{AGENT} seq {kept.max_seq + 1}–{held.max_seq}" in out

    ctl = start_controller(lab)
    try:
        # The restored policy (handlers p-0001, p-0002) comes back under a number the agent accepts.
        wait_for(lambda: cached_version(lab) == 4, 30, "the agent to accept the re-issued version 4")
        assert handlers_in_cache(lab) == ["p-0001", "p-0002"]
        # A revocation after the restore reaches the agent.
        apply(lab, tmp_path, "p-0002")
        wait_for(lambda: cached_version(lab) == 5, 30, "the agent to apply the revocation as version 5")
        assert handlers_in_cache(lab) == ["p-0002"]
        # The agent's next events follow the lost ones: ingest names the same window as a sequence gap.
        store = Store(make_engine(url))
        try:
            wait_for(lambda: bool(store.list_findings(kind="sequence_gap", agent_id=AGENT)), 30, "the gap finding")
            (gap,) = store.list_findings(kind="sequence_gap", agent_id=AGENT)
            assert (gap.first_seq, gap.last_seq) == (kept.max_seq + 1, held.max_seq)
            (lost,) = store.list_findings(kind="restore_lost_events", agent_id=AGENT)
            assert (lost.first_seq, lost.last_seq) == (kept.max_seq + 1, held.max_seq)
        finally:
            store.engine.dispose()
        rollbacks = [e for e in events_of(url, "agent.policy_rejected") if e.get("reason") == errors.ROLLBACK]
        assert rollbacks == []
    finally:
        stop(ctl)


@pytest.mark.broker
def test_with_the_floor_and_the_database_lost_the_agents_heartbeats_lift_the_version(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEKISHO_LANG", "en")  # the `sekisho` commands below speak English (asserted on)
    config = str(lab.controller_config)
    cfg = load_config(lab.controller_config)
    url = cfg.resolved_database_url()
    apply(lab, tmp_path, "p-0001, p-0002")
    ctl = start_controller(lab)
    lab.spawn("agent", "run", "--config", str(lab.agent_config(AGENT)), log_name=AGENT)
    try:
        wait_for(lambda: cached_version(lab) == 1, 30, "the agent to apply version 1")
        lab.sekisho("controller", "backup", "--config", config, "--output", str(tmp_path / "b.tar.gz"))
        apply(lab, tmp_path, "p-0002")
        apply(lab, tmp_path, "p-0001")
        wait_for(lambda: cached_version(lab) == 3, 30, "the agent to apply version 3")
    finally:
        stop(ctl)
    # The controller's disk is gone: the database and the floor beside it.
    assert read_floor(cfg.var_dir) == 3
    for path in cfg.var_dir.glob("controller.db*"):
        path.unlink()
    floor_path(cfg.var_dir).unlink()

    done = lab.sekisho("controller", "restore", "--config", config, "--input", str(tmp_path / "b.tar.gz"), "--yes")
    assert "the lost event window is unknown now" in done.stdout.replace("\n", " ")
    assert "re-issued" not in done.stdout

    ctl = start_controller(lab)
    try:
        # Version 1 is published again and refused as a rollback; the agent's heartbeat (version 3) makes the
        # controller re-issue the restored policy above it.
        wait_for(lambda: cached_version(lab) == 4, 60, "the agent to accept the version re-issued above 3")
        assert handlers_in_cache(lab) == ["p-0001", "p-0002"]
        store = Store(make_engine(url))
        try:
            (reissued,) = store.list_findings(kind="policy_version_reissued", agent_id=AGENT)
            assert reissued.detail["reported"] == 3 and reissued.detail["issued"] == 4
        finally:
            store.engine.dispose()
        apply(lab, tmp_path, "p-0002")
        wait_for(lambda: cached_version(lab) == 5, 30, "the revocation to reach the agent as version 5")
    finally:
        stop(ctl)


# --- PostgreSQL ------------------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_round_trip_with_pg_dump(pki: Path, tmp_path: Path, pg_server: str, make_agent: MakeAgent) -> None:
    with pg_database(pg_server) as url:
        config = controller_toml(pki, tmp_path, database_url=url)
        cfg = load_config(config)
        store = open_store(cfg)
        try:
            a, _b = populate(store, make_agent, events=12, policies=2)
            at_backup = row_counts(url)
            out = cli("controller", "backup", "--config", str(config), "--output", str(tmp_path / "pg.tar.gz"))
            assert "postgresql" in out
            store.store_batch(a.events(range(13, 20)))
            store.add_policy_version({"site": "s3"}, created_by="test", source_sha256="0" * 64)
        finally:
            store.engine.dispose()
        out = cli("controller", "restore", "--config", str(config), "--input", str(tmp_path / "pg.tar.gz"), "--yes")
        assert "ポリシー版 2 を版 4 として再発行しました" in out and f"{a.agent_id} seq 13–19（7 件）" in out
        after = row_counts(url)
        changed = ("policy_versions", "findings", "admin_audit", "checkpoints", "record_log")
        assert {k: v for k, v in after.items() if k not in changed} == {
            k: v for k, v in at_backup.items() if k not in changed
        }
        assert after["findings"] == at_backup["findings"] + 2
        assert after["admin_audit"] == at_backup["admin_audit"] + 1  # the restore itself
        store = Store(make_engine(url))
        try:
            assert store.event_seqs(a.agent_id) == list(range(1, 13))
            assert store.verify_chains() == []
        finally:
            store.engine.dispose()
