"""Tampering with the store directly in SQL is found by `records verify`, and what was changed is named.

The attacker here can write the database but has not got the controller's signing key: deleting records
and rewinding `streams`, deleting a whole stream, swapping an agent's key, editing a dead letter or a
checkpoint are all found against the controller-signed checkpoint log (controller/store/checkpoints.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, delete, insert, select, update
from typer.testing import CliRunner

from sekisho.cli import app as sekisho_app
from sekisho.controller.store import DeadLetterIn, Store, make_engine, record_hash, upgrade
from sekisho.controller.store.checkpoints import entry_hash
from sekisho.controller.store.db import alembic_config
from sekisho.controller.store.models import ZERO_HASH, Agent, AgentKey, Checkpoint, DeadLetter, Event, Stream
from sekisho.lab.pgcluster import pg_database
from sekisho.protocol import signing, timefmt
from sekisho.protocol.canonical import canonical_bytes
from sekisho.protocol.events import build_event, decode_event

if TYPE_CHECKING:
    from store_fixtures import FakeAgent, MakeAgent

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
COUNT = 50


@pytest.fixture
def victim(store: Store, make_agent: MakeAgent) -> FakeAgent:
    """Store 50 events of one agent (and a few of a bystander whose chain must stay clean)."""
    agent = make_agent(store, "victim")
    events = agent.events(range(1, COUNT + 1))
    for start in range(0, COUNT, 10):
        store.store_batch(events[start : start + 10], [], T0 + timedelta(seconds=start))
    bystander = make_agent(store, "bystander")
    store.store_batch(bystander.events(range(1, 6)), [], T0)
    assert store.verify_chains(signatures=True) == []
    return agent


def tamper(store: Store, *statements: Any) -> None:
    """Run raw statements against the database, as someone with direct database access could."""
    with store.engine.begin() as conn:
        for statement in statements:
            conn.execute(statement)


def row_at(conn: Connection, agent_id: str, chain_index: int) -> dict[str, Any]:
    """Return every column of one stored record."""
    found = conn.execute(
        select(Event.__table__).where(Event.agent_id == agent_id, Event.chain_index == chain_index)
    ).one()
    return dict(found._mapping)


def only_problem(store: Store, *, keys: bool = False) -> Any:
    """Return the single problem verify_chains reports (the bystander's chain must stay clean)."""
    problems = store.verify_chains(signatures=keys)
    assert len(problems) == 1, problems
    return problems[0]


def rehash(row: dict[str, Any], prev_hash: str) -> str:
    """Recompute a record's hash the way a knowledgeable attacker would."""
    return record_hash(
        prev_hash,
        agent=row["agent_id"],
        seq=row["seq"],
        chain_index=row["chain_index"],
        event_id=row["event_id"],
        type=row["type"],
        occurred_at=row["occurred_at"],
        received_at=row["received_at"],
        raw=row["raw"],
        stored_at=row["stored_at"],
    )


def where(agent: FakeAgent, chain_index: int) -> Any:
    """Return the WHERE clause selecting one record of the agent."""
    return (Event.agent_id == agent.agent_id) & (Event.chain_index == chain_index)


def test_edited_payload_column_is_named(store: Store, victim: FakeAgent) -> None:
    tamper(store, update(Event).where(where(victim, 20)).values(payload={"n": 999}))
    problem = only_problem(store)
    assert (problem.agent_id, problem.chain_index, problem.seq) == (victim.agent_id, 20, 20)
    assert problem.problem == "stored column payload differs from signed event"


def test_edited_person_column_is_named(store: Store, victim: FakeAgent) -> None:
    # The registers find a person's rows by this copy of the payload: moved to someone else, the rows would
    # vanish from that person's register while the signed raw still verifies.
    tamper(store, update(Event).where(where(victim, 20)).values(person="p-someone-else"))
    problem = only_problem(store)
    assert (problem.agent_id, problem.chain_index) == (victim.agent_id, 20)
    assert problem.problem == "stored column person differs from signed event"


def test_edited_payload_type_is_named(store: Store, victim: FakeAgent) -> None:
    # 1 → true: equal in Python (1 == True), different in the signed JSON.
    tamper(store, update(Event).where(where(victim, 1)).values(payload={"n": True}))
    problem = only_problem(store)
    assert (problem.chain_index, problem.problem) == (1, "stored column payload differs from signed event")


def test_edited_raw_is_named(store: Store, victim: FakeAgent) -> None:
    with store.engine.connect() as conn:
        raw = row_at(conn, victim.agent_id, 20)["raw"]
    assert '"n":20' in raw
    tamper(store, update(Event).where(where(victim, 20)).values(raw=raw.replace('"n":20', '"n":21')))
    problem = only_problem(store)
    assert (problem.chain_index, problem.seq, problem.problem) == (20, 20, "hash mismatch: record edited")
    assert problem.row_id is not None


def test_edited_seq_column_is_named(store: Store, victim: FakeAgent) -> None:
    tamper(store, update(Event).where(where(victim, 20)).values(seq=1000))
    problem = only_problem(store)
    assert problem.chain_index == 20
    assert problem.problem == "hash mismatch: record edited"


def test_deleted_record_is_named(store: Store, victim: FakeAgent) -> None:
    tamper(store, delete(Event).where(where(victim, 20)))
    problem = only_problem(store)
    assert problem.chain_index == 21
    assert problem.problem == "missing record(s) before chain index 21"


def test_fabricated_record_with_a_broken_link_is_named(store: Store, victim: FakeAgent) -> None:
    with store.engine.connect() as conn:
        template = row_at(conn, victim.agent_id, COUNT)
    fake = {**template, "seq": 999, "event_id": uuid.uuid4().hex, "chain_index": COUNT + 1, "prev_hash": ZERO_HASH}
    del fake["id"]
    fake["hash"] = rehash(fake, ZERO_HASH)
    tamper(store, insert(Event).values(**fake))
    problem = only_problem(store)
    assert (problem.chain_index, problem.seq, problem.problem) == (COUNT + 1, 999, "record inserted/reordered")


def test_fabricated_record_with_a_correct_link_is_named(store: Store, victim: FakeAgent) -> None:
    with store.engine.connect() as conn:
        template = row_at(conn, victim.agent_id, COUNT)
    fake = {**template, "seq": 999, "event_id": uuid.uuid4().hex, "chain_index": COUNT + 1}
    del fake["id"]
    fake["prev_hash"] = template["hash"]
    fake["hash"] = rehash(fake, template["hash"])
    tamper(store, insert(Event).values(**fake))
    problem = only_problem(store)
    assert problem.chain_index == COUNT + 1
    assert problem.problem == "record beyond the stream head: record inserted"


def test_reordered_records_are_named(store: Store, victim: FakeAgent) -> None:
    # Swap chain positions 10 and 11 (via a free index, because (agent, chain_index) is unique).
    tamper(
        store,
        update(Event).where(where(victim, 10)).values(chain_index=-1),
        update(Event).where(where(victim, 11)).values(chain_index=10),
        update(Event).where(where(victim, -1)).values(chain_index=11),
    )
    problem = only_problem(store)
    assert (problem.chain_index, problem.problem) == (10, "record inserted/reordered")


def test_deleted_last_record_is_named(store: Store, victim: FakeAgent) -> None:
    tamper(store, delete(Event).where(where(victim, COUNT)))
    problem = only_problem(store)
    assert problem.agent_id == victim.agent_id
    assert problem.chain_index == COUNT
    assert problem.problem == "stream head does not match: last record(s) deleted"


def test_deleted_stream_row_is_named(store: Store, victim: FakeAgent) -> None:
    tamper(store, delete(Stream).where(Stream.agent_id == victim.agent_id))
    problem = only_problem(store)
    assert (problem.agent_id, problem.problem) == (victim.agent_id, "stream row missing")


def test_forged_record_with_recomputed_chain_and_head_is_found(store: Store, victim: FakeAgent) -> None:
    """Someone who can write the database can recompute every hash and the stream head, not the signed checkpoint."""
    forger = signing.generate_key()
    with store.engine.connect() as conn:
        original = row_at(conn, victim.agent_id, 20)
        later = [row_at(conn, victim.agent_id, index) for index in range(20, COUNT + 1)]
    forged_raw = build_event(
        forger,
        agent=victim.agent_id,
        seq=20,
        type="test.synthetic",
        payload={"n": 20, "note": "nothing happened here"},
        at=original["occurred_at"],
        event_id=original["event_id"],
    )
    forged = decode_event(forged_raw)
    prev_hash = rewrite_chain(store, victim, later, {20: (forged_raw.decode(), forged.payload)}, original["prev_hash"])
    tamper(store, update(Stream).where(Stream.agent_id == victim.agent_id).values(head_hash=prev_hash))

    problem = only_problem(store)  # the hash chain agrees with `streams`; the signed head does not
    assert (problem.agent_id, problem.chain_index) == (victim.agent_id, COUNT)
    assert problem.problem.startswith("head differs from signed checkpoint #")
    problem = only_problem(store, keys=True)  # the agent's signature names the forged record itself
    assert (problem.agent_id, problem.chain_index, problem.seq, problem.event_id) == (
        victim.agent_id,
        20,
        20,
        original["event_id"],
    )
    assert problem.problem == "signature invalid"


def rewrite_chain(
    store: Store, agent: FakeAgent, rows: list[dict[str, Any]], replace: dict[int, tuple[str, Any]], prev_hash: str
) -> str:
    """Rewrite records (raw and payload of the chain indexes in replace) and rehash the chain; return its new head."""
    statements: list[Any] = []
    for row in rows:
        if row["chain_index"] in replace:
            raw, payload = replace[row["chain_index"]]
            row = {**row, "raw": raw, "payload": payload}
        row["hash"] = rehash(row, prev_hash)
        statements.append(
            update(Event)
            .where(where(agent, row["chain_index"]))
            .values(raw=row["raw"], payload=row["payload"], hash=row["hash"], prev_hash=prev_hash)
        )
        prev_hash = row["hash"]
    tamper(store, *statements)
    return prev_hash


def test_verifying_one_agent_only(store: Store, victim: FakeAgent) -> None:
    tamper(store, update(Event).where(where(victim, 5)).values(payload=json.loads('{"n": 6}')))
    assert [p.chain_index for p in store.verify_chains(victim.agent_id)] == [5]
    bystander = next(agent for agent in store.agent_keys() if agent.startswith("bystander"))
    assert store.verify_chains(bystander, signatures=True) == []


# --- deletions the chain alone cannot see, held against the signed checkpoints (issue 10, item 5) -----


def rewind_stream(agent: FakeAgent, length: int, head_hash: str) -> Any:
    """Return the UPDATE that makes the agent's streams row look as if it had only `length` records."""
    return (
        update(Stream)
        .where(Stream.agent_id == agent.agent_id)
        .values(chain_length=length, head_hash=head_hash, max_seq=length, contiguous_seq=length)
    )


def test_deleted_tail_with_streams_rewound_is_named(store: Store, victim: FakeAgent) -> None:
    with store.engine.connect() as conn:
        kept = row_at(conn, victim.agent_id, COUNT - 2)
    tamper(
        store,
        delete(Event).where(Event.agent_id == victim.agent_id, Event.chain_index > COUNT - 2),
        rewind_stream(victim, COUNT - 2, kept["hash"]),
    )
    problem = only_problem(store, keys=True)
    assert (problem.agent_id, problem.chain_index, problem.table) == (victim.agent_id, COUNT - 1, "events")
    assert problem.problem.startswith(
        f"last record(s) deleted: the chain ends at index {COUNT - 2}, signed checkpoint #"
    )
    assert problem.problem.endswith(
        f"has {COUNT} record(s), seq up to {COUNT} (chain index {COUNT - 1}–{COUNT} missing)"
    )


def test_deleted_stream_is_named(store: Store, victim: FakeAgent) -> None:
    tamper(
        store,
        delete(Event).where(Event.agent_id == victim.agent_id),
        delete(Stream).where(Stream.agent_id == victim.agent_id),
    )
    problem = only_problem(store, keys=True)
    assert (problem.agent_id, problem.chain_index) == (victim.agent_id, 1)
    assert problem.problem.startswith(
        "stream deleted: all records missing, and its streams row: the chain ends at index 0"
    )
    assert f"has {COUNT} record(s)" in problem.problem


def test_deleted_agent_with_all_it_had_is_named(store: Store, victim: FakeAgent) -> None:
    tamper(
        store,
        delete(Event).where(Event.agent_id == victim.agent_id),
        delete(Stream).where(Stream.agent_id == victim.agent_id),
        delete(AgentKey).where(AgentKey.agent_id == victim.agent_id),
        delete(Agent).where(Agent.id == victim.agent_id),
    )
    problems = {p.table: p for p in store.verify_chains(signatures=True)}
    assert set(problems) == {"agent_keys", "events"}
    assert problems["agent_keys"].agent_id == victim.agent_id
    assert re.fullmatch(
        r"key line version 1 missing \(recorded by signed checkpoint #\d+\): deleted", problems["agent_keys"].problem
    )
    assert problems["events"].problem.startswith("stream deleted: all records missing")


def resigned(raw: str, key: Ed25519PrivateKey) -> str:
    """Return a stored event re-signed with another key (same body, so every column still matches)."""
    body = json.loads(raw)["event"]
    return canonical_bytes({"event": body, "sig": signing.sign(key, "event", body)}).decode()


def test_swapped_key_with_resigned_events_is_named(store: Store, victim: FakeAgent) -> None:
    attacker = signing.generate_key()
    with store.engine.connect() as conn:
        rows = [row_at(conn, victim.agent_id, index) for index in range(1, COUNT + 1)]
    forged = {row["chain_index"]: (resigned(row["raw"], attacker), row["payload"]) for row in rows}
    head = rewrite_chain(store, victim, rows, forged, ZERO_HASH)
    attacker_pem = signing.public_key_pem(attacker.public_key()).decode()
    tamper(
        store,
        update(Stream).where(Stream.agent_id == victim.agent_id).values(head_hash=head),
        update(Agent).where(Agent.id == victim.agent_id).values(public_key_pem=attacker_pem),
    )
    problems = {p.table: p for p in store.verify_chains(signatures=True)}
    assert set(problems) == {"agents", "events"}
    assert problems["agents"].agent_id == victim.agent_id
    assert problems["agents"].problem == "public_key_pem differs from signed key line version 1: key swapped"
    assert (problems["events"].chain_index, problems["events"].problem) == (1, "signature invalid")


def test_swapped_key_in_the_key_history_too_is_named(store: Store, victim: FakeAgent, controller_key: Any) -> None:
    attacker = signing.generate_key()
    attacker_pem = signing.public_key_pem(attacker.public_key()).decode()
    tamper(
        store,
        update(Agent).where(Agent.id == victim.agent_id).values(public_key_pem=attacker_pem),
        update(AgentKey).where(AgentKey.agent_id == victim.agent_id).values(public_key_pem=attacker_pem),
    )
    problems = {p.table: p for p in store.verify_chains(signatures=True)}
    assert set(problems) == {"agent_keys", "events"}
    assert problems["agent_keys"].agent_id == victim.agent_id
    assert re.fullmatch(
        r"key line version 1: differs from what signed checkpoint #\d+ recorded: line edited",
        problems["agent_keys"].problem,
    )
    # Nothing after a bad line is trusted, so the agent's events are checked against no key at all.
    assert problems["events"].problem == "no trusted key history: signatures not checked"

    # A whole new line naming the attacker's key, even one signed with some key, is not in the log.
    [line] = store.key_history(victim.agent_id)
    tamper(store, update(AgentKey).where(AgentKey.id == line.id).values(public_key_pem=victim.pem))
    forged = {
        "agent_id": victim.agent_id,
        "version": 2,
        "action": "replace",
        "public_key_pem": attacker_pem,
        "valid_from": T0,
        "registered_at": T0,
        "signature": signing.sign(attacker, "agent_key", {"agent": victim.agent_id}),
    }
    tamper(store, insert(AgentKey).values(**forged))
    problems = {p.table: p for p in store.verify_chains(signatures=True)}
    assert problems["agent_keys"].problem == "key line version 2: not recorded in the checkpoint log: line inserted"
    assert set(problems) == {"agent_keys", "events"}


def test_revoked_agent_made_active_again_is_named(store: Store, victim: FakeAgent) -> None:
    store.revoke_agent(victim.agent_id)
    assert store.verify_chains(signatures=True) == []
    tamper(store, update(Agent).where(Agent.id == victim.agent_id).values(status="active"))
    problem = only_problem(store)
    assert (problem.table, problem.problem) == (
        "agents",
        "status 'active' differs from signed key line version 2 (revoke)",
    )


def test_edited_stored_at_is_named(store: Store, victim: FakeAgent) -> None:
    with store.engine.connect() as conn:
        stored_at = row_at(conn, victim.agent_id, 20)["stored_at"]
    tamper(store, update(Event).where(where(victim, 20)).values(stored_at=stored_at + timedelta(days=1)))
    problem = only_problem(store)
    assert (problem.chain_index, problem.problem) == (20, "hash mismatch: record edited")


# --- key rotation: every event against the key registered when it was received ----------------------


def test_key_rotation_verifies_each_event_against_its_key(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent()  # not registered yet: registered below at chosen times
    store.register_agent(agent.agent_id, agent.pem, registered_at=T0)
    old_key = agent.key
    store.store_batch(agent.events(range(1, 6)), [], T0 + timedelta(minutes=1))
    agent.key = signing.generate_key()
    rotated = T0 + timedelta(hours=1)
    store.register_agent(agent.agent_id, agent.pem, replace=True, registered_at=rotated)
    store.store_batch(agent.events(range(6, 11)), [], rotated + timedelta(minutes=1))
    # A worker that had not re-read the keys yet still accepted the old key for a moment: no false alarm.
    late = dataclasses.replace(agent, key=old_key)
    store.store_batch([late.event(11)], [], rotated + timedelta(seconds=30))
    assert [line.action for line in store.key_history(agent.agent_id)] == ["register", "replace"]
    assert store.verify_chains(signatures=True) == []

    # Long after the rotation, the old key no longer counts.
    store.store_batch([late.event(12)], [], rotated + timedelta(hours=1))
    problem = only_problem(store, keys=True)
    assert (problem.agent_id, problem.seq, problem.problem) == (agent.agent_id, 12, "signature invalid")


def test_events_stored_after_revocation_are_named(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    store.store_batch(agent.events(range(1, 3)), [], timefmt.now())
    store.revoke_agent(agent.agent_id)
    store.store_batch([agent.event(3)], [], timefmt.now() + timedelta(hours=1))
    problem = only_problem(store, keys=True)
    assert (problem.seq, problem.table) == (3, "events")
    assert problem.problem.startswith("stored after the agent was revoked (")


# --- dead letters and the checkpoint log itself --------------------------------------------------------


def letters(count: int) -> list[DeadLetterIn]:
    """Return dead letters as ingest makes them from refused messages."""
    return [
        DeadLetterIn("sekisho/v1/agents/term-x/events", f'{{"n": {n}}}'.encode(), "schema", f"bad {n}", "term-x", n)
        for n in range(1, count + 1)
    ]


def test_dead_letter_tampering_is_named(store: Store, victim: FakeAgent) -> None:
    store.store_batch([], letters(3), T0)
    store.store_batch([], letters(2), T0)
    assert store.verify_records().dead_letters == 5
    assert store.verify_chains(signatures=True) == []
    tamper(store, update(DeadLetter).where(DeadLetter.chain_index == 2).values(detail="nothing to see"))
    problem = only_problem(store)
    assert (problem.table, problem.chain_index, problem.problem) == (
        "dead_letters",
        2,
        "hash mismatch: dead letter edited",
    )
    tamper(store, delete(DeadLetter).where(DeadLetter.chain_index >= 2))
    problem = only_problem(store)
    assert (problem.table, problem.chain_index) == ("dead_letters", 2)
    assert re.fullmatch(
        r"last dead letter\(s\) deleted: the chain ends at index 1, signed checkpoint #\d+ has 5 "
        r"\(chain index 2–5 missing\)",
        problem.problem,
    )


def test_checkpoint_tampering_is_named(store: Store, victim: FakeAgent) -> None:
    report = store.verify_records()
    assert report.head is not None and report.checkpoints == report.head[0] and report.controller_signatures
    with store.engine.connect() as conn:
        number, body = conn.execute(
            select(Checkpoint.id, Checkpoint.body).where(Checkpoint.body.contains(f'"length":{COUNT}'))
        ).one()
    # Edited and rehashed: the controller's signature no longer matches.
    edited = body.replace(f'"length":{COUNT}', f'"length":{COUNT - 2}')
    tamper(
        store,
        update(Checkpoint)
        .where(Checkpoint.id == number)
        .values(body=edited, hash=entry_hash(checkpoint_prev(store, number), edited)),
    )
    problem = store.verify_chains()[0]
    assert (problem.table, problem.row_id, problem.problem) == ("checkpoints", number, "checkpoint signature invalid")

    # A checkpoint in the middle deleted.
    tamper(store, delete(Checkpoint).where(Checkpoint.id == 3))
    problem = store.verify_chains()[0]
    assert (problem.table, problem.row_id, problem.problem) == (
        "checkpoints",
        4,
        "checkpoint(s) missing before #4: entries deleted",
    )


def checkpoint_prev(store: Store, number: int) -> str:
    """Return the prev_hash a checkpoint holds."""
    with store.engine.connect() as conn:
        return str(conn.execute(select(Checkpoint.prev_hash).where(Checkpoint.id == number)).scalar_one())


def test_a_store_without_the_signing_key_writes_checkpoints_verify_reports(store: Store, victim: FakeAgent) -> None:
    keyless = Store(store.engine)
    keyless.store_batch([victim.event(COUNT + 1)], [], T0)
    assert keyless.verify_chains(signatures=True) == []  # no controller key at hand: signatures not checked
    problems = store.verify_chains()
    assert (problems[0].table, problems[0].problem) == (
        "checkpoints",
        "checkpoint not signed (written without the controller's signing key)",
    )
    # Nothing after it is trusted: the record it would have covered is beyond the last signed head.
    assert problems[1].problem.startswith("record(s) beyond the last signed checkpoint")
    assert len(problems) == 2


def test_a_consistent_rollback_of_log_and_records_is_the_stated_limit(store: Store, victim: FakeAgent) -> None:
    """Cutting the log back together with everything recorded after it is not found (heads held outside are)."""
    store.store_batch(victim.events(range(COUNT + 1, COUNT + 11)), [], T0 + timedelta(hours=1))
    last = store.verify_records().head
    assert last is not None
    with store.engine.connect() as conn:
        kept = row_at(conn, victim.agent_id, COUNT)
    tamper(
        store,
        delete(Checkpoint).where(Checkpoint.id == last[0]),
        delete(Event).where(Event.agent_id == victim.agent_id, Event.chain_index > COUNT),
        rewind_stream(victim, COUNT, kept["hash"]),
    )
    report = store.verify_records()
    assert report.problems == []
    assert report.head is not None and report.head != last  # what a saved `records verify` head line shows


# --- through the command line: `sekisho records verify` and `controller register-agent --replace` -----


def run_cli(*args: str, code: int = 0) -> str:
    """Run `sekisho …` in process; check its exit code and return what it printed."""
    result = CliRunner().invoke(sekisho_app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == code, result.output
    return result.output


def verify_lines(config: Path, agent: FakeAgent) -> tuple[str, list[str]]:
    """Run `records verify` expecting BROKEN; return its output and its lines naming the agent."""
    output = run_cli("records", "verify", "--config", str(config), code=1)
    assert output.startswith("BROKEN: ")
    assert "not checked: findings" in output and "checkpoint head: #" in output
    return output, [line for line in output.splitlines() if agent.agent_id in line]


def test_cli_verify_is_clean_and_says_what_it_does_not_check(controller_toml: Path, victim: FakeAgent) -> None:
    output = run_cli("records", "verify", "--config", str(controller_toml))
    assert f"OK: 2 stream(s), {COUNT + 5} record(s), 0 dead letter(s)" in output and "chains intact" in output
    assert "checkpoint head: #" in output and "genesis (log begun): 20" in output
    assert "not checked: findings" in output and "overdue_finding_id" in output
    # Policy versions, commands and loans are in the record log now (issue 14): checked, so not in that list.
    assert "policy/command/loan row(s)" in output and "issued commands" not in output.split("not checked:")[-1]


def test_cli_verify_names_a_deleted_tail_with_streams_rewound(
    store: Store, controller_toml: Path, victim: FakeAgent
) -> None:
    with store.engine.connect() as conn:
        kept = row_at(conn, victim.agent_id, COUNT - 1)
    tamper(store, delete(Event).where(where(victim, COUNT)), rewind_stream(victim, COUNT - 1, kept["hash"]))
    _, [line] = verify_lines(controller_toml, victim)
    assert line.startswith(f"{victim.agent_id} chain_index={COUNT} ")
    assert f"last record(s) deleted: the chain ends at index {COUNT - 1}" in line
    assert f"(chain index {COUNT}–{COUNT} missing)" in line


def test_cli_verify_names_a_deleted_stream(store: Store, controller_toml: Path, victim: FakeAgent) -> None:
    tamper(
        store,
        delete(Event).where(Event.agent_id == victim.agent_id),
        delete(Stream).where(Stream.agent_id == victim.agent_id),
    )
    output, [line] = verify_lines(controller_toml, victim)
    assert line.startswith(f"{victim.agent_id} chain_index=1 ")
    assert "stream deleted: all records missing, and its streams row" in line and f"has {COUNT} record(s)" in line
    assert "BROKEN: 1 problem(s)" in output


def test_cli_verify_names_a_swapped_key(store: Store, controller_toml: Path, victim: FakeAgent) -> None:
    attacker = signing.generate_key()
    with store.engine.connect() as conn:
        rows = [row_at(conn, victim.agent_id, index) for index in range(1, COUNT + 1)]
    forged = {row["chain_index"]: (resigned(row["raw"], attacker), row["payload"]) for row in rows}
    head = rewrite_chain(store, victim, rows, forged, ZERO_HASH)
    attacker_pem = signing.public_key_pem(attacker.public_key()).decode()
    tamper(
        store,
        update(Stream).where(Stream.agent_id == victim.agent_id).values(head_hash=head),
        update(Agent).where(Agent.id == victim.agent_id).values(public_key_pem=attacker_pem),
    )
    _, lines = verify_lines(controller_toml, victim)
    assert any(line.startswith(f"agents {victim.agent_id} ") and line.endswith("key swapped") for line in lines)
    assert any(
        line.startswith(f"{victim.agent_id} chain_index=1 ") and line.endswith("signature invalid") for line in lines
    )


def test_cli_key_rotation_with_replace_verifies_clean(
    store: Store, controller_toml: Path, victim: FakeAgent, tmp_path: Path
) -> None:
    new_key = signing.generate_key()
    public = tmp_path / "new-signing.pub"
    public.write_bytes(signing.public_key_pem(new_key.public_key()))
    config = str(controller_toml)
    run_cli(
        "controller", "register-agent", victim.agent_id, "--public-key", str(public), "--replace", "--config", config
    )
    rotated = dataclasses.replace(victim, key=new_key)
    store.store_batch(rotated.events(range(COUNT + 1, COUNT + 11)), [], timefmt.now())
    assert [line.action for line in store.key_history(victim.agent_id)] == ["register", "replace"]
    output = run_cli("records", "verify", "--config", config)
    assert "chains intact" in output and f"{COUNT + 15} record(s)" in output


# --- a database from before the checkpoint log: sealed as it stands at the first start ----------------

SIGNED_CHECKPOINTS = "0005"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def bare_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of an empty database on each backend, not migrated yet."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old' / 'controller.db'}"
        return
    with pg_database(request.getfixturevalue("pg_server")) as url:
        yield url


def old_records(agent: FakeAgent, seqs: range, received_at: datetime) -> list[dict[str, Any]]:
    """Return event rows as the store wrote them before the log existed (record format 1, no stored_at)."""
    rows: list[dict[str, Any]] = []
    prev_hash = ZERO_HASH
    for index, seq in enumerate(seqs, start=1):
        ev = agent.event(seq, at=received_at)
        row = {
            "agent_id": agent.agent_id,
            "seq": seq,
            "event_id": ev.id,
            "type": ev.type,
            "occurred_at": ev.occurred_at,
            "received_at": received_at,
            "stored_at": received_at,
            "clock_synced": ev.clock_synced,
            "clock_offset_ms": ev.clock_offset_ms,
            "payload": ev.payload,
            "raw": ev.raw.decode(),
            "chain_index": index,
            "prev_hash": prev_hash,
        }
        row["hash"] = prev_hash = rehash({**row, "stored_at": None}, prev_hash)
        rows.append(row)
    return rows


def test_an_upgraded_database_is_sealed_as_it_stands(
    bare_url: str, make_agent: MakeAgent, controller_key: Ed25519PrivateKey
) -> None:
    script = ScriptDirectory.from_config(alembic_config())
    before = script.get_revision(SIGNED_CHECKPOINTS).down_revision
    assert isinstance(before, str)
    upgrade(bare_url, before)
    active, revoked = make_agent(prefix="old"), make_agent(prefix="gone")
    engine = make_engine(bare_url)
    try:
        with engine.begin() as conn:
            for agent, status in ((active, "active"), (revoked, "revoked")):
                conn.execute(
                    insert(Agent).values(id=agent.agent_id, public_key_pem=agent.pem, status=status, registered_at=T0)
                )
                rows = old_records(agent, range(1, 6), T0 + timedelta(minutes=1))
                conn.execute(insert(Event), rows)
                conn.execute(
                    insert(Stream).values(
                        agent_id=agent.agent_id, chain_length=5, head_hash=rows[-1]["hash"], max_seq=5, contiguous_seq=5
                    )
                )
            letters_then = sa.Table("dead_letters", sa.MetaData(), autoload_with=conn)
            letter = {
                "received_at": T0,
                "topic": "sekisho/v1/agents/term-x/events",
                "reason": "malformed",
                "detail": "not JSON",
                "payload": "garbage",
                "size": 7,
            }
            digest = {name: "0" * 64 for name in ("payload_sha256", "payload_mac") if name in letters_then.c}
            conn.execute(insert(letters_then), [{**letter, **digest}, {**letter, **digest, "detail": "again"}])

        upgrade(bare_url)
        store = Store(engine, signing_key=controller_key)
        lines = [store.key_history(agent.agent_id) for agent in (active, revoked)]
        assert [[(line.action, line.signature) for line in agent_lines] for agent_lines in lines] == [
            [("register", None)],
            [("register", None), ("revoke", None)],
        ]
        # Not sealed yet: the records are not covered by any signed checkpoint, and verify says so.
        assert {p.problem for p in store.verify_chains() if p.table == "events"} == {
            "5 record(s) not covered by any signed checkpoint: records inserted"
        }

        assert store.seal_existing() == 1
        assert store.seal_existing() is None
        assert all(line.signature for agent_lines in lines for line in store.key_history(agent_lines[0].agent_id))
        report = store.verify_records()
        assert (report.problems, report.records, report.dead_letters, report.checkpoints) == ([], 10, 2, 1)
        assert report.genesis_at is not None

        # Records stored from now on are in format 2 (stored_at covered) and chain on from the old heads.
        store.store_batch(active.events(range(6, 9)), [], timefmt.now())
        assert store.verify_chains(signatures=True) == []
        tamper(store, update(Event).where(where(active, 7)).values(stored_at=T0))
        assert only_problem(store).problem == "hash mismatch: record edited"
        tamper(store, update(Event).where(where(active, 7)).values(stored_at=T0 + timedelta(minutes=1)))
        assert only_problem(store).chain_index == 7
    finally:
        engine.dispose()


def test_cli_verify_without_the_private_key_needs_the_public_one(
    controller_toml: Path, victim: FakeAgent, controller_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """An auditor may hold only signing.pub: with --controller-key it is enough; with neither, verify refuses."""
    (tmp_path / "pki" / "signing.key").unlink()
    refused = run_cli("records", "verify", "--config", str(controller_toml), code=2)
    assert "--controller-key" in refused
    public = tmp_path / "pki" / "signing.pub"
    public.write_bytes(signing.public_key_pem(controller_key.public_key()))
    output = run_cli("records", "verify", "--config", str(controller_toml), "--controller-key", str(public))
    assert "chains intact" in output
    other = tmp_path / "other.pub"
    other.write_bytes(signing.public_key_pem(signing.generate_key().public_key()))
    wrong = run_cli("records", "verify", "--config", str(controller_toml), "--controller-key", str(other), code=1)
    assert "checkpoints #1: checkpoint signature invalid" in wrong
