"""End to end through the command line, as an administrator works: policy distribution, refusals that
are recorded as events, commands and their replay, and `records verify` naming a tampered record."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from support.mqtt import connect_client
from support.site import Site, wait_for

from sekisho.controller.store.models import Event
from sekisho.deploy.pki import PkiPaths
from sekisho.protocol import errors, messages, signing, timefmt, topics

pytestmark = pytest.mark.broker

DEMO_POLICY = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
AGENT = "term-hr-01"


def events_of(site: Site, type_: str) -> list[dict]:
    store = site.store()
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(Event.payload).where(Event.agent_id == AGENT, Event.type == type_).order_by(Event.id)
        )
        return [dict(r) for r in rows.scalars()]


def publish_as_controller(site: Site, channel: str, raw: bytes, *, retain: bool = False) -> None:
    client = connect_client(site.lab.pki_dir, site.lab.broker.controller_port, "controller-test", identity="controller")
    try:
        client.publish_wait(topics.topic(AGENT, channel), raw, retain=retain)
    finally:
        client.close()


def test_policy_distribution_commands_and_refusals_are_recorded(site: Site, tmp_path: Path) -> None:
    lab = site.lab
    lab.add_agent(AGENT, heartbeat_interval_s=2, resend_after_s=3)
    lab.register_agents(AGENT)
    lab.spawn_controller(http=True)
    site.wait_ready()
    lab.spawn("agent", "run", "--config", str(lab.agent_config(AGENT)), log_name=AGENT)
    config = str(lab.controller_config)

    dry = lab.sekisho("policy", "apply", str(DEMO_POLICY), "--config", config, "--dry-run")
    assert "dry run" in dry.stdout and "t-hr-01" in dry.stdout
    assert site.store().current_policy_version() is None

    applied = lab.sekisho("policy", "apply", str(DEMO_POLICY), "--config", config)
    assert "stored policy version 1" in applied.stdout
    wait_for(lambda: any(e["policy_version"] == 1 for e in events_of(site, "agent.policy_applied")), 30, "v1 applied")

    # Revoke a designated handler: the next version reaches the terminal at once.
    revoked = tmp_path / "site.yaml"
    revoked.write_text(DEMO_POLICY.read_text().replace("handlers: [p-0001, p-0002]", "handlers: [p-0002]"))
    lab.sekisho("policy", "apply", str(revoked), "--config", config)
    wait_for(lambda: any(e["policy_version"] == 2 for e in events_of(site, "agent.policy_applied")), 30, "v2 applied")
    status = lab.sekisho("agent", "status", "--config", str(lab.agent_config(AGENT)))
    assert "2" in status.stdout and "valid" in status.stdout

    # A forged bundle (another key) and an expired one are refused, and the refusal is on record.
    forged = messages.build_bundle(
        signing.generate_key(), agent=AGENT, version=3, policy={}, lifetime=timedelta(hours=1)
    )
    publish_as_controller(site, topics.POLICY, forged, retain=True)
    key = signing.load_private_key(PkiPaths.at(lab.pki_dir).controller_signing_key)
    expired = messages.build_bundle(
        key,
        agent=AGENT,
        version=4,
        policy={},
        lifetime=timedelta(hours=1),
        issued_at=timefmt.now() - timedelta(hours=2),
    )
    publish_as_controller(site, topics.POLICY, expired, retain=True)

    def refused(reason: str) -> bool:
        return any(e["reason"] == reason for e in events_of(site, "agent.policy_rejected"))

    wait_for(lambda: refused(errors.BAD_SIGNATURE) and refused(errors.EXPIRED), 30, "both refusals recorded")

    # A command is carried out once; the same signed bytes replayed are refused and recorded.
    saved = tmp_path / "ping.cmd"
    lab.sekisho("controller", "send-command", AGENT, "agent.ping", "--config", config, "--save-to", str(saved))
    wait_for(lambda: len(events_of(site, "agent.command_executed")) == 1, 30, "the command to run")
    publish_as_controller(site, topics.COMMANDS, saved.read_bytes())
    wait_for(
        lambda: any(e["reason"] == errors.REPLAY for e in events_of(site, "agent.command_rejected")),
        30,
        "the replay to be refused",
    )
    assert len(events_of(site, "agent.command_executed")) == 1


def test_records_verify_names_the_tampered_record(site: Site) -> None:
    lab = site.lab
    lab.add_agent(AGENT, resend_after_s=3)
    lab.register_agents(AGENT)
    lab.spawn_controller(http=True)
    site.wait_ready()
    sim = lab.spawn(
        "agent",
        "simulate",
        "--config",
        str(lab.agent_config(AGENT)),
        "--count",
        "40",
        "--exit-when-drained",
        "--timeout",
        "60",
        log_name=AGENT,
    )
    assert sim.wait(timeout=90) == 0
    lab.stop_all()
    config = str(lab.controller_config)
    ok = lab.sekisho("records", "verify", "--config", config)
    assert "chains intact" in ok.stdout

    db = sqlite3.connect(lab.root / "controller" / "controller.db")
    with db:
        db.execute("UPDATE events SET payload = json_set(payload, '$.n', 999) WHERE chain_index = 20")
    bad = lab.sekisho("records", "verify", "--config", config, check=False)
    assert bad.returncode == 1
    [line] = [line for line in bad.stdout.splitlines() if line.startswith(AGENT)]
    assert "chain_index=20 " in line

    with db:
        db.execute("UPDATE events SET payload = json_set(payload, '$.n', 18) WHERE chain_index = 20")
        db.execute("DELETE FROM events WHERE chain_index = 30")
    gone = lab.sekisho("records", "verify", "--config", config, check=False)
    assert gone.returncode == 1
    assert "chain_index=31" in gone.stdout and "missing record(s) before chain index 31" in gone.stdout
    db.close()
