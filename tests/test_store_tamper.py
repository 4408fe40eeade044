"""Tampering with stored events directly in SQL is found by verify_chains, and the broken record is named."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Connection, delete, insert, select, update

from sekisho.controller.store import Store, record_hash
from sekisho.controller.store.models import ZERO_HASH, Event, Stream
from sekisho.protocol import signing
from sekisho.protocol.events import build_event, decode_event

pytest_plugins = ("store_fixtures",)

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
    assert store.verify_chains(keys=store.agent_keys()) == []
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
    problems = store.verify_chains(keys=store.agent_keys() if keys else None)
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
    )


def where(agent: FakeAgent, chain_index: int) -> Any:
    """Return the WHERE clause selecting one record of the agent."""
    return (Event.agent_id == agent.agent_id) & (Event.chain_index == chain_index)


def test_edited_payload_column_is_named(store: Store, victim: FakeAgent) -> None:
    tamper(store, update(Event).where(where(victim, 20)).values(payload={"n": 999}))
    problem = only_problem(store)
    assert (problem.agent_id, problem.chain_index, problem.seq) == (victim.agent_id, 20, 20)
    assert problem.problem == "stored column payload differs from signed event"


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


def test_forged_record_with_recomputed_chain_needs_the_signature_check(store: Store, victim: FakeAgent) -> None:
    """Someone who can write the database can recompute every hash; only the agent's key exposes a forgery."""
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
    statements: list[Any] = []
    prev_hash = original["prev_hash"]
    for row in later:
        if row["chain_index"] == 20:
            row = {**row, "raw": forged_raw.decode(), "payload": forged.payload}
        row["hash"] = rehash(row, prev_hash)
        statements.append(
            update(Event)
            .where(where(victim, row["chain_index"]))
            .values(raw=row["raw"], payload=row["payload"], hash=row["hash"], prev_hash=prev_hash)
        )
        prev_hash = row["hash"]
    statements.append(update(Stream).where(Stream.agent_id == victim.agent_id).values(head_hash=prev_hash))
    tamper(store, *statements)

    assert store.verify_chains() == []  # the hash chain alone cannot tell
    problem = only_problem(store, keys=True)
    assert (problem.agent_id, problem.chain_index, problem.seq, problem.event_id) == (
        victim.agent_id,
        20,
        20,
        original["event_id"],
    )
    assert problem.problem == "signature invalid"


def test_verifying_one_agent_only(store: Store, victim: FakeAgent) -> None:
    tamper(store, update(Event).where(where(victim, 5)).values(payload=json.loads('{"n": 6}')))
    assert [p.chain_index for p in store.verify_chains(victim.agent_id)] == [5]
    bystander = next(agent for agent in store.agent_keys() if agent.startswith("bystander"))
    assert store.verify_chains(bystander, keys=store.agent_keys()) == []
