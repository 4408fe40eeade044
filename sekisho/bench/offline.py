"""An agent for in-process benchmarks: its own PKI, a signed policy in its cache, no broker (controller down)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import AgentConfig
from sekisho.deploy.pki import PkiPaths, init_pki, issue_agent
from sekisho.protocol import messages, signing


def offline_agent(root: Path, agent_id: str, policy: dict[str, Any]) -> Agent:
    """Build an agent under ``root`` whose cache holds ``policy`` signed by the controller; not started."""
    pki = root / "pki"
    init_pki(pki)
    creds = issue_agent(pki, agent_id)
    agent = Agent(
        AgentConfig(
            agent_id=agent_id,
            ca_cert=creds.ca_cert,
            tls_cert=creds.tls_cert,
            tls_key=creds.tls_key,
            signing_key=creds.signing_key,
            controller_public_key=creds.controller_signing_pub,
            state_dir=root / "state",
        )
    )
    key = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
    outcome = agent.policy.offer(
        messages.build_bundle(key, agent=agent_id, version=1, policy=policy, lifetime=timedelta(hours=12))
    )
    if outcome.status == "rejected":
        agent.stop()
        raise RuntimeError(f"benchmark policy refused: {outcome.reason}")
    return agent
