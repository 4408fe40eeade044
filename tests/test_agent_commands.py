"""Commands: only a verified, fresh, single-use command for this agent runs; every outcome is an event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from sekisho.agents.runtime.commands import HANDLER_FAILED, CommandDispatcher
from sekisho.agents.runtime.outbox import Outbox
from sekisho.protocol import errors, events, messages, signing, timefmt

AGENT = "door-001"


@pytest.fixture(scope="module")
def ctl_key():
    return signing.generate_key()


@pytest.fixture(scope="module")
def agent_key():
    return signing.generate_key()


@pytest.fixture
def outbox(tmp_path: Path, agent_key) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite3", signing_key=agent_key, agent_id=AGENT)
    yield box
    box.close()


def recorded(outbox: Outbox) -> list[events.DecodedEvent]:
    return [events.decode_event(wire, topic_agent=AGENT) for _seq, wire in outbox.pending(0, 1000)]


def dispatcher(tmp_path: Path, ctl_key, outbox: Outbox, **kw) -> CommandDispatcher:
    return CommandDispatcher(
        agent_id=AGENT,
        controller_key=ctl_key.public_key(),
        nonce_path=tmp_path / "nonces.sqlite3",
        emit=outbox.append,
        **kw,
    )


def command(key, name: str = "agent.ping", *, agent: str = AGENT, **kw) -> tuple[str, bytes]:
    return messages.build_command(key, agent=agent, name=name, **kw)


def test_good_command_is_executed_and_recorded(tmp_path: Path, ctl_key, outbox: Outbox) -> None:
    d = dispatcher(tmp_path, ctl_key, outbox)
    command_id, raw = command(ctl_key)
    outcome = d.handle(raw)
    assert (outcome.executed, outcome.command_id, outcome.result) == (True, command_id, "pong")
    [event] = recorded(outbox)
    assert event.type == "agent.command_executed"
    assert event.payload == {"command_id": command_id, "name": "agent.ping", "result": "pong"}
    d.close()


def test_registered_handler_gets_the_verified_command(tmp_path: Path, ctl_key, outbox: Outbox) -> None:
    d = dispatcher(tmp_path, ctl_key, outbox)
    seen: list[messages.VerifiedCommand] = []
    d.register("door.unlock", lambda c: seen.append(c) or "unlocked")
    _id, raw = command(ctl_key, "door.unlock", args={"door": "d1", "seconds": 5})
    assert d.handle(raw).result == "unlocked"
    assert seen[0].command.args == {"door": "d1", "seconds": 5}
    with pytest.raises(ValueError, match="twice"):
        d.register("door.unlock", lambda c: None)
    d.close()


def test_replay_is_refused_even_after_restart(tmp_path: Path, ctl_key, outbox: Outbox) -> None:
    runs: list[str] = []
    d = dispatcher(tmp_path, ctl_key, outbox)
    d.register("door.unlock", lambda c: runs.append(c.command.id) or "ok")
    command_id, raw = command(ctl_key, "door.unlock")
    assert d.handle(raw).executed
    again = d.handle(raw)
    assert (again.executed, again.reason, again.command_id) == (False, errors.REPLAY, command_id)
    d.close()

    restarted = dispatcher(tmp_path, ctl_key, outbox)
    restarted.register("door.unlock", lambda c: runs.append(c.command.id) or "ok")
    assert restarted.handle(raw).reason == errors.REPLAY
    assert runs == [command_id]
    types = [(e.type, e.payload.get("reason")) for e in recorded(outbox)]
    assert types == [
        ("agent.command_executed", None),
        ("agent.command_rejected", "replay"),
        ("agent.command_rejected", "replay"),
    ]
    restarted.close()


def _tamper(raw: bytes) -> bytes:
    doc = json.loads(raw)
    doc["command"]["args"] = {"door": "vault"}
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda k: command(k, issued_at=timefmt.now() - timedelta(minutes=5), lifetime=timedelta(minutes=1))[1],
            errors.EXPIRED,
        ),
        (lambda k: command(k, issued_at=timefmt.now() + timedelta(hours=1))[1], errors.NOT_YET_VALID),
        (lambda k: command(k, agent="door-002")[1], errors.WRONG_AGENT),
        (lambda k: command(signing.generate_key())[1], errors.BAD_SIGNATURE),
        (lambda k: _tamper(command(k)[1]), errors.BAD_SIGNATURE),
        (lambda k: command(k, "vault.open_everything")[1], errors.UNKNOWN_TYPE),
        (lambda k: b"\x00garbage", errors.MALFORMED),
    ],
    ids=["expired", "future", "wrong-agent", "forged", "tampered", "unknown-name", "garbage"],
)
def test_bad_commands_are_rejected_with_reason(tmp_path: Path, ctl_key, outbox: Outbox, make, reason) -> None:
    d = dispatcher(tmp_path, ctl_key, outbox)
    ran: list[object] = []
    d.register("door.unlock", ran.append)
    outcome = d.handle(make(ctl_key))
    assert (outcome.executed, outcome.reason) == (False, reason)
    [event] = recorded(outbox)
    assert event.type == "agent.command_rejected"
    assert event.payload["reason"] == reason
    assert ran == []
    d.close()


def test_failing_handler_is_recorded_not_raised(tmp_path: Path, ctl_key, outbox: Outbox) -> None:
    d = dispatcher(tmp_path, ctl_key, outbox)

    def broken(c: messages.VerifiedCommand) -> str:
        raise RuntimeError("relay stuck")

    d.register("door.unlock", broken)
    command_id, raw = command(ctl_key, "door.unlock")
    outcome = d.handle(raw)
    assert (outcome.executed, outcome.reason, outcome.detail) == (False, HANDLER_FAILED, "RuntimeError")
    [event] = recorded(outbox)
    assert event.payload == {
        "reason": HANDLER_FAILED,
        "detail": "RuntimeError",
        "command_id": command_id,
        "name": "door.unlock",
    }
    d.close()


def test_resend_built_in_calls_back(tmp_path: Path, ctl_key, outbox: Outbox) -> None:
    calls: list[int] = []
    d = dispatcher(tmp_path, ctl_key, outbox, on_resend=lambda: calls.append(1))
    assert d.names == ["agent.ping", "agent.resend"]
    assert d.handle(command(ctl_key, "agent.resend")[1]).executed
    assert calls == [1]
    d.close()


def test_damaged_nonce_store_is_set_aside_and_commands_refused_for_the_window(
    tmp_path: Path, ctl_key, outbox: Outbox
) -> None:
    (tmp_path / "nonces.sqlite3").write_bytes(b"not a database at all" * 100)
    d = dispatcher(tmp_path, ctl_key, outbox)
    outcome = d.handle(command(ctl_key)[1])
    assert (outcome.executed, outcome.reason) == (False, errors.REPLAY)
    assert "reset" in outcome.detail
    assert [p.name for p in tmp_path.glob("nonces.sqlite3.damaged-*")]
    d.close()
