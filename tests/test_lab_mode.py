"""Simulated backends chosen by configuration are refused outside lab mode (SEKISHO_LAB=1): a doors.toml with
board.kind = "simulated" on a real door box used to run without a word, and its relays never moved."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from sekisho.agents.doors.run import DoorsSetupError, start_doors
from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config
from sekisho.agents.runtime.lab_mode import LAB_ENV, lab_mode
from sekisho.deploy.pki import AgentCredentials, PkiPaths, issue_agent
from sekisho.drivers.locker import SimulatedLockerBoard
from sekisho.lab import write_toml
from sekisho.protocol import messages, signing

AGENT = "door-lab-01"
SIMULATED = 'site_key_file = "site.key"\n[board]\nkind = "simulated"\nrelays = 2\ndoors = 2\n'


@pytest.fixture
def agent_toml(pki: Path, tmp_path: Path) -> Path:
    """A door agent's config (no broker needed) with a doors.toml naming a simulated board beside it."""
    creds = AgentCredentials.at(pki, AGENT)
    if not creds.tls_cert.exists():
        issue_agent(pki, AGENT)
    config = write_toml(
        tmp_path / "agent" / "agent.toml",
        {
            "agent_id": AGENT,
            "broker_port": 9,  # nothing listens
            "ca_cert": str(creds.ca_cert),
            "tls_cert": str(creds.tls_cert),
            "tls_key": str(creds.tls_key),
            "signing_key": str(creds.signing_key),
            "controller_public_key": str(creds.controller_signing_pub),
            "state_dir": str(tmp_path / "agent" / "state"),
        },
    )
    (config.parent / "site.key").write_bytes(b"lab-site-key-0123456789abcdef")
    doors = config.parent / "doors.toml"
    doors.write_text(SIMULATED)
    doors.chmod(0o600)
    return config


@pytest.fixture
def agent(agent_toml: Path, pki: Path) -> Iterator[Agent]:
    """The door agent, constructed (not started), with a signed policy in its cache."""
    running = Agent(load_config(agent_toml))
    key = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
    bundle = messages.build_bundle(key, agent=AGENT, version=1, policy={"site": "lab"}, lifetime=timedelta(hours=1))
    running.policy.offer(bundle)
    try:
        yield running
    finally:
        running.stop()


def test_lab_mode_is_exactly_sekisho_lab_1() -> None:
    assert lab_mode({LAB_ENV: "1"})
    for value in ("", "0", "true", "yes", " 1"):
        assert not lab_mode({LAB_ENV: value})
    assert not lab_mode({})


def test_a_simulated_board_is_refused_outside_lab_mode(
    agent: Agent, agent_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(LAB_ENV, raising=False)
    refused = r'board.kind = "simulated".*シミュレーションは実運用では使えません.*SEKISHO_LAB=1'  # tests run in ja
    with pytest.raises(DoorsSetupError, match=refused):
        start_doors(agent, agent_toml)
    assert not agent.alive()  # nothing was started


def test_a_simulated_board_runs_in_lab_mode(agent: Agent, agent_toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LAB_ENV, "1")
    doors = start_doors(agent, agent_toml)
    try:
        assert isinstance(doors.board, SimulatedLockerBoard)
    finally:
        doors.stop()


def test_the_door_agent_command_says_why_and_exits_non_zero(agent_toml: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != LAB_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "sekisho", "agent", "doors", "--config", str(agent_toml)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "シミュレーションは実運用では使えません" in done.stderr and "Traceback" not in done.stderr
    english = subprocess.run(
        [sys.executable, "-m", "sekisho", "agent", "doors", "--config", str(agent_toml)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "SEKISHO_LANG": "en"},
        check=False,
    )
    assert english.returncode == 2 and "refused outside lab mode" in english.stderr, english.stderr
