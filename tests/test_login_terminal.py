"""`sekisho-agent terminal` wiring: the running agent locks an open session and records it in its outbox."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sekisho.agents.login.messages import message
from sekisho.agents.login.pam_client import ask_agent
from sekisho.agents.login.run import start_terminal
from sekisho.agents.login.sessions import LoginSessions
from sekisho.agents.runtime.agent import Agent
from sekisho.drivers.smartcard.simulated import SimulatedBackend, SimulatedCard
from sekisho.protocol import events

READER = "Sim Reader 0"


def _outbox_types(agent: Agent) -> list[str]:
    return [
        events.decode_event(raw, topic_agent=agent.config.agent_id).type for _, raw in agent.outbox.pending(limit=1000)
    ]


def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_terminal_agent_locks_an_open_session(agent_setup: Callable[..., Any], tmp_path: Path) -> None:
    setup = agent_setup()
    marker = tmp_path / "locked"
    lock = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('{{session}}')"]
    # JSON arrays of strings are valid TOML arrays.
    (setup.config_path.parent / "login.toml").write_text(f"lock_command = {json.dumps(lock)}\nend_command = []\n")
    backend = SimulatedBackend((READER,))
    card = SimulatedCard(uid=bytes.fromhex("04A1B2C3D4E5F6"), uid_only=True)
    backend.insert(card, READER)
    agent = Agent(setup.config)
    running = start_terminal(agent, setup.config_path, "t-hr-01", backend=backend, poll_s=0.05)
    try:
        # What the PAM helper writes on a grant and at open_session (another process, its own connection).
        registry = LoginSessions(agent.config.state_dir)
        registry.granted("alice", "p-alice", READER, "c-alice")
        registry.opened("alice", "42")
        registry.close()
        _wait(lambda: running.watcher.current_person() == "p-alice")
        backend.remove(READER)
        _wait(lambda: marker.exists() and marker.read_text() == "42")  # loginctl's session id substituted
        _wait(lambda: "session.locked" in _outbox_types(agent))
        assert running.watcher.current_person() is None
    finally:
        running.stop()


def test_terminal_agent_answers_pam_auth_on_its_socket(agent_setup: Callable[..., Any], tmp_path: Path) -> None:
    setup = agent_setup()
    agent = Agent(setup.config)
    socket_path = tmp_path / "pam" / "pam.sock"
    running = start_terminal(
        agent, setup.config_path, "t-hr-01", backend=SimulatedBackend((READER,)), pam_socket=socket_path
    )
    try:
        out = io.StringIO()
        # No policy has reached this agent yet: refused, and recorded in the agent's own outbox.
        assert ask_agent(str(socket_path), "t-hr-01", {"PAM_USER": "alice", "PAM_TYPE": "auth"}, out) == 1
        assert message("no_policy") in out.getvalue()
        _wait(lambda: "login.denied" in _outbox_types(agent))
    finally:
        running.stop()
    assert not socket_path.exists()
