"""The controller store on SQLite and PostgreSQL: idempotent batches, hash chains, gaps, dead letters."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from alembic.script import ScriptDirectory
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from sekisho.controller.store import (
    DUPLICATE_ID,
    SEQ_CONFLICT,
    SEQUENCE_GAP,
    AgentExists,
    AgentNotFound,
    DeadLetterIn,
    Store,
    default_url,
    make_engine,
    upgrade,
)
from sekisho.controller.store.chain import record_bytes
from sekisho.controller.store.db import alembic_config
from sekisho.controller.store.models import DeadLetter, Event
from sekisho.controller.store.redaction import letter_mac
from sekisho.protocol import errors, mynumber
from sekisho.protocol.canonical import canonical_bytes

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

T0 = datetime(2026, 11, 23, 9, 0, 0, 123456, tzinfo=UTC)


def event_rows(store: Store, agent_id: str) -> list[dict[str, Any]]:
    """Return every stored column of an agent's events, in chain order."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(Event.__table__).where(Event.agent_id == agent_id).order_by(Event.chain_index))
        return [dict(row._mapping) for row in rows]


def synthetic_my_number() -> str:
    """Return a 12-digit number with a valid My Number check digit (made up, belongs to nobody)."""
    first11 = "12345678901"
    return first11 + str(mynumber.check_digit(first11))


# --- schema and engine -----------------------------------------------------------------------------


def test_default_url_points_into_var_dir(tmp_path: Path) -> None:
    assert default_url(tmp_path / "var") == f"sqlite:///{tmp_path / 'var' / 'controller.db'}"


def test_sqlite_engine_settings_and_parent_directory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'deep' / 'er' / 'controller.db'}"
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        engine.dispose()
    assert (tmp_path / "deep" / "er").is_dir()


def test_upgrade_twice_is_a_no_op(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            head = ScriptDirectory.from_config(alembic_config()).get_current_head()
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    finally:
        engine.dispose()


# --- agents ----------------------------------------------------------------------------------------


def test_register_revoke_and_keys(store: Store, make_agent: MakeAgent) -> None:
    a, b = make_agent(agent_id="term-a"), make_agent(agent_id="term-b")
    store.register_agent(a.agent_id, a.pem)
    store.register_agent(a.agent_id, a.pem)  # same key again: fine
    store.register_agent(b.agent_id, b.pem)
    with pytest.raises(AgentExists):
        store.register_agent(a.agent_id, b.pem)
    with pytest.raises(ValueError):
        store.register_agent("Not An Id", a.pem)
    with pytest.raises(ValueError):
        store.register_agent("term-c", "not a pem")
    assert store.agent_keys() == {a.agent_id: a.pem, b.agent_id: b.pem}

    store.revoke_agent(b.agent_id)
    assert store.agent_keys() == {a.agent_id: a.pem}
    assert store.agent_keys(include_revoked=True) == {a.agent_id: a.pem, b.agent_id: b.pem}
    with pytest.raises(AgentExists):
        store.register_agent(b.agent_id, b.pem)
    store.register_agent(b.agent_id, a.pem, replace=True)
    assert store.agent_keys()[b.agent_id] == a.pem
    with pytest.raises(AgentNotFound):
        store.revoke_agent("term-nobody")
    assert [agent.id for agent in store.list_agents()] == ["term-a", "term-b"]


def test_heartbeat_keeps_the_newest(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    info = {"version": "0.1.0", "outbox_depth": 3, "clock_offset_ms": -12, "policy_version": 4}
    assert store.record_heartbeat(agent.agent_id, info, T0)
    assert not store.record_heartbeat(agent.agent_id, {**info, "outbox_depth": 99}, T0 - timedelta(seconds=5))
    assert not store.record_heartbeat("term-nobody", info, T0)
    (row,) = store.list_agents()
    assert (row.version, row.outbox_depth, row.clock_offset_ms, row.policy_version) == ("0.1.0", 3, -12, 4)
    assert row.last_seen_at == T0
    assert row.last_heartbeat == info


# --- storing events --------------------------------------------------------------------------------


def test_store_and_read_back(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    events = agent.events(range(1, 11))
    result = store.store_batch(events, [], T0)

    assert result.stored == [(agent.agent_id, seq) for seq in range(1, 11)]
    assert (result.duplicates, result.dead_lettered, result.gaps) == ([], [], [])
    assert store.event_seqs(agent.agent_id) == list(range(1, 11))
    assert store.count_events() == store.count_events(agent.agent_id) == 10
    stream = store.get_stream(agent.agent_id)
    assert stream is not None
    assert (stream.chain_length, stream.max_seq, stream.contiguous_seq) == (10, 10, 10)

    rows = event_rows(store, agent.agent_id)
    assert [row["chain_index"] for row in rows] == list(range(1, 11))
    assert rows[0]["prev_hash"] == "0" * 64
    assert all(rows[i]["prev_hash"] == rows[i - 1]["hash"] for i in range(1, 10))
    assert stream.head_hash == rows[-1]["hash"]
    for row, ev in zip(rows, events, strict=True):
        assert row["raw"].encode() == ev.raw
        assert row["event_id"] == ev.id
        assert row["payload"] == ev.payload
        assert row["occurred_at"] == ev.occurred_at
        assert row["occurred_at"].tzinfo is not None and row["occurred_at"].utcoffset() == timedelta(0)
        assert row["received_at"] == T0
    assert store.verify_chains() == []
    assert store.verify_chains(agent.agent_id, signatures=True) == []


def test_datetimes_round_trip_exactly_as_aware_utc(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    tokyo = timezone(timedelta(hours=9))
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    received = datetime(2026, 1, 2, 12, 4, 6, 1, tzinfo=tokyo)  # 03:04:06.000001 UTC
    store.store_batch([agent.event(1, at=at)], [], received)
    (row,) = store.list_events(agent_id=agent.agent_id)
    assert row.occurred_at == at and row.occurred_at.utcoffset() == timedelta(0)
    assert row.received_at == received and row.received_at.tzinfo == UTC
    assert row.received_at.microsecond == 1
    assert store.verify_chains(signatures=True) == []


def test_restoring_the_same_batch_counts_duplicates_and_changes_nothing(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    events = agent.events(range(1, 21))
    store.store_batch(events, [], T0)
    before = event_rows(store, agent.agent_id)
    stream_before = store.get_stream(agent.agent_id)

    again = store.store_batch(events[5:] + events[:5], [], T0 + timedelta(minutes=1))
    assert again.stored == [] and again.dead_lettered == []
    assert sorted(again.duplicates) == [(agent.agent_id, seq) for seq in range(1, 21)]
    assert event_rows(store, agent.agent_id) == before
    stream_after = store.get_stream(agent.agent_id)
    assert stream_before is not None and stream_after is not None
    assert (stream_after.chain_length, stream_after.head_hash) == (20, stream_before.head_hash)


def test_duplicates_inside_one_batch_are_stored_once(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    one, two = agent.event(1), agent.event(2)
    result = store.store_batch([one, two, one, two, one], [], T0)
    assert result.stored == [(agent.agent_id, 1), (agent.agent_id, 2)]
    assert result.duplicates == [(agent.agent_id, 1), (agent.agent_id, 2), (agent.agent_id, 1)]
    assert store.count_events() == 2


def test_out_of_order_arrival_chains_in_arrival_order(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    arrivals = [[3], [1, 5], [2], [4]]
    for i, seqs in enumerate(arrivals):
        store.store_batch(agent.events(seqs), [], T0 + timedelta(seconds=i))
    rows = event_rows(store, agent.agent_id)
    assert [row["seq"] for row in rows] == [3, 1, 5, 2, 4]
    assert store.event_seqs(agent.agent_id) == [1, 2, 3, 4, 5]
    stream = store.get_stream(agent.agent_id)
    assert stream is not None and (stream.max_seq, stream.contiguous_seq) == (5, 5)
    assert store.list_findings(open_only=True) == []
    assert store.verify_chains(signatures=True) == []


def test_gap_findings_are_created_split_and_resolved(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    events = {seq: agent.event(seq) for seq in range(1, 11)}

    first = store.store_batch([events[1], events[2], events[7], events[10]], [], T0)
    assert [(g.agent_id, g.first_seq, g.last_seq) for g in first.gaps] == [
        (agent.agent_id, 3, 6),
        (agent.agent_id, 8, 9),
    ]
    gap_3_6, gap_8_9 = (g.id for g in first.gaps)
    stream = store.get_stream(agent.agent_id)
    assert stream is not None and (stream.max_seq, stream.contiguous_seq) == (10, 2)

    # A hole in the middle of 3..6: the finding keeps 3..3 and a new one covers 5..6.
    second = store.store_batch([events[4]], [], T0)
    assert second.gaps == [] and second.resolved_gaps == []
    open_gaps = {(f.first_seq, f.last_seq): f for f in store.list_findings(open_only=True, kind=SEQUENCE_GAP)}
    assert set(open_gaps) == {(3, 3), (5, 6), (8, 9)}
    assert open_gaps[(3, 3)].id == gap_3_6
    assert open_gaps[(5, 6)].detail["split_from"] == gap_3_6

    third = store.store_batch([events[3], events[9], events[8]], [], T0)
    assert sorted(third.resolved_gaps) == sorted([gap_3_6, gap_8_9])
    stream = store.get_stream(agent.agent_id)
    assert stream is not None and stream.contiguous_seq == 4

    store.store_batch([events[6], events[5]], [], T0)
    assert store.list_findings(open_only=True) == []
    resolved = store.list_findings(kind=SEQUENCE_GAP, agent_id=agent.agent_id)
    assert len(resolved) == 3 and all(f.resolved_at is not None and f.resolution for f in resolved)
    stream = store.get_stream(agent.agent_id)
    assert stream is not None and (stream.max_seq, stream.contiguous_seq) == (10, 10)
    assert store.verify_chains(signatures=True) == []


def test_first_event_after_a_jump_reports_the_gap_from_one(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    result = store.store_batch([agent.event(4)], [], T0)
    assert [(g.first_seq, g.last_seq) for g in result.gaps] == [(1, 3)]


def test_awkward_payload_text_round_trips(store: Store, make_agent: MakeAgent) -> None:
    """NUL, quotes, backslashes, astral and line-separator characters survive both backends exactly."""
    agent = make_agent(store)
    note = 'nul\x00 tab\t quote" back\\ emoji\U0001f600 ls\u2028 日本語'
    events = [
        agent.event(1, payload={"n": 1, "note": note}),
        agent.event(2, payload={"n": 2**62}),
        agent.event(3, clock_synced=True, clock_offset_ms=-(2**62)),
    ]
    assert len(store.store_batch(events, [], T0).stored) == 3
    rows = store.list_events(agent_id=agent.agent_id)
    assert rows[0].payload["note"] == note and rows[1].payload["n"] == 2**62
    assert (rows[2].clock_synced, rows[2].clock_offset_ms) == (True, -(2**62))
    assert store.verify_chains(signatures=True) == []


def test_a_batch_larger_than_one_lookup_chunk(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    events = agent.events(range(1, 1301))
    assert len(store.store_batch(events[:700], [], T0).stored) == 700
    result = store.store_batch(events, [], T0)
    assert (len(result.stored), len(result.duplicates)) == (600, 700)
    assert store_state(store, agent.agent_id) == (list(range(1, 1301)), 1300, 1300, 1300)
    assert store.verify_chains() == []


def test_a_dead_lettered_seq_does_not_carry_the_contiguous_seq_over_a_hole(store: Store, make_agent: MakeAgent) -> None:
    # Found while speeding up ingest (issue 14): with seq 3 kept as a (verified, acked) dead letter and seq 4
    # missing, the walk began at the next stored seq and called 1..6 contiguous.
    agent = make_agent(store)
    events = {seq: agent.event(seq) for seq in range(1, 7)}
    store.store_batch([events[1], events[2], events[5], events[6]], [], T0)
    letter = DeadLetterIn(
        topic=f"sekisho/v1/agents/{agent.agent_id}/events",
        raw=events[3].raw,
        reason=errors.MY_NUMBER,
        detail="synthetic",
        agent_id=agent.agent_id,
        seq=3,
        ackable=True,
    )
    store.store_batch([], [letter], T0)
    stream = store.get_stream(agent.agent_id)
    assert stream is not None and (stream.max_seq, stream.contiguous_seq) == (6, 3)
    assert {(f.first_seq, f.last_seq) for f in store.list_findings(open_only=True, kind=SEQUENCE_GAP)} == {(4, 4)}

    store.store_batch([events[4]], [], T0)
    stream = store.get_stream(agent.agent_id)
    assert stream is not None and stream.contiguous_seq == 6
    assert store.list_findings(open_only=True, kind=SEQUENCE_GAP) == []


# --- dead letters and conflicts --------------------------------------------------------------------


def test_dead_letters_are_stored_with_reason(store: Store, controller_key: Ed25519PrivateKey) -> None:
    raw = b'{"event": {"v": 99}}'
    letter = DeadLetterIn(
        topic="sekisho/v1/agents/term-x/events",
        raw=raw,
        reason=errors.UNSUPPORTED_VERSION,
        detail="envelope version 99",
        agent_id="term-x",
        seq=7,
    )
    result = store.store_batch([], [letter], T0)
    assert result.dead_lettered == [("term-x", 7)]
    (row,) = store.list_dead_letters()
    assert (row.reason, row.detail, row.topic, row.agent_id, row.seq) == (
        "unsupported_version",
        "envelope version 99",
        "sekisho/v1/agents/term-x/events",
        "term-x",
        7,
    )
    assert row.payload == raw.decode()  # clean JSON is kept byte for byte
    # A MAC keyed from the controller's key, never a plain digest of what arrived.
    assert row.payload_mac == letter_mac(controller_key, raw) and row.size == len(raw)
    assert row.payload_mac != hashlib.sha256(raw).hexdigest()
    assert row.received_at == T0


@pytest.mark.parametrize(
    "shape",
    ["json-string", "json-int", "json-float", "json-escaped", "json-key", "text-grouped", "binary", "fullwidth"],
)
def test_dead_letter_with_a_my_number_is_stored_redacted(
    store: Store, controller_key: Ed25519PrivateKey, shape: str
) -> None:
    number = synthetic_my_number()
    grouped = f"{number[:4]}-{number[4:8]}-{number[8:]}"
    fullwidth = number.translate(str.maketrans("0123456789", "０１２３４５６７８９"))
    escaped = "".join(f"\\u{ord(c):04x}" for c in number)
    raw = {
        "json-string": json.dumps({"event": {"payload": {"note": f"番号 {number}"}}}).encode(),
        "json-int": b'{"event": {"payload": {"n": ' + number.encode() + b"}}}",
        "json-float": b'{"n": ' + number.encode() + b".0}",
        "json-escaped": b'{"note": "' + escaped.encode() + b'"}',
        "json-key": json.dumps({number: 1}).encode(),
        "text-grouped": f"not json: holder {grouped} end".encode(),
        "binary": b"\xff\xfe" + number.encode() + b" \x00\x01",
        "fullwidth": f"テキスト{fullwidth}です".encode(),
    }[shape]
    store.store_batch([], [DeadLetterIn("sekisho/v1/agents/term-x/events", raw, errors.MY_NUMBER, "mine")], T0)

    with store.engine.connect() as conn:
        (row,) = conn.execute(select(DeadLetter.__table__)).all()
    stored = " ".join(str(value) for value in row)
    for form in (number, grouped, fullwidth):
        assert form not in stored
    assert not mynumber.contains_my_number(stored)
    assert "[REDACTED:my_number]" in row.payload or row.payload.startswith("base64:")
    # No unkeyed digest of the refused bytes: refilling the redacted digits cannot be checked against it.
    assert row.payload_mac == letter_mac(controller_key, raw) and row.size == len(raw)
    assert hashlib.sha256(raw).hexdigest() not in stored
    if shape == "binary":
        assert row.payload.startswith("base64:")


def test_event_id_reused_by_another_agent_is_dead_lettered(store: Store, make_agent: MakeAgent) -> None:
    a, b = make_agent(store, "a"), make_agent(store, "b")
    original = a.event(1)
    store.store_batch([original], [], T0)
    clash = b.event(5, event_id=original.id)
    same_batch = [b.event(6), b.event(7, event_id=original.id)]
    result = store.store_batch([clash, *same_batch], [], T0)
    assert result.stored == [(b.agent_id, 6)]
    assert result.dead_lettered == [(b.agent_id, 5), (b.agent_id, 7)]
    letters = store.list_dead_letters()
    assert [letter.reason for letter in letters] == [DUPLICATE_ID, DUPLICATE_ID]
    assert letters[0].payload.encode() == clash.raw
    assert store.event_seqs(b.agent_id) == [6]
    assert store.verify_chains(signatures=True) == []


def test_reused_seq_with_another_event_is_kept_as_dead_letter(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    store.store_batch([agent.event(1)], [], T0)
    before = event_rows(store, agent.agent_id)
    other = agent.event(1, payload={"n": 100})
    result = store.store_batch([other], [], T0)
    assert result.dead_lettered == [(agent.agent_id, 1)] and result.duplicates == []
    assert [letter.reason for letter in store.list_dead_letters()] == [SEQ_CONFLICT]
    assert event_rows(store, agent.agent_id) == before
    [finding] = store.list_findings(kind=SEQ_CONFLICT)
    assert (finding.agent_id, finding.first_seq, finding.detail["event_id"]) == (agent.agent_id, 1, other.id)


# --- conflicting duplicates: evidence and a finding, never acked and dropped (issue 10, item 6) -----


def test_same_seq_and_id_with_other_content_is_evidence_and_a_finding(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    original = agent.event(1)
    store.store_batch([original, agent.event(2)], [], T0)
    before = event_rows(store, agent.agent_id)
    # Signed by the agent's own key: the same seq and id, a different story.
    conflicting = agent.event(1, event_id=original.id, payload={"n": 1, "note": "another story"})
    assert conflicting.raw != original.raw

    result = store.store_batch([conflicting], [], T0 + timedelta(minutes=1))
    assert (result.stored, result.duplicates, result.dead_lettered) == ([], [], [(agent.agent_id, 1)])
    [letter] = store.list_dead_letters()
    assert (letter.reason, letter.agent_id, letter.seq, letter.event_id) == (
        SEQ_CONFLICT,
        agent.agent_id,
        1,
        original.id,
    )
    assert letter.payload.encode() == conflicting.raw  # the whole signed message is kept as evidence
    assert "other content" in letter.detail
    [conflict] = result.conflicts
    [finding] = store.list_findings(open_only=True, kind=SEQ_CONFLICT)
    assert (conflict.finding_id, conflict.dead_letter_id, conflict.seq) == (finding.id, letter.id, 1)
    assert (finding.agent_id, finding.first_seq, finding.last_seq) == (agent.agent_id, 1, 1)
    assert finding.detail["dead_letter_id"] == letter.id and finding.detail["count"] == 1
    assert finding.detail["reason"].startswith("possible tampering")
    assert event_rows(store, agent.agent_id) == before  # the stored event is never overwritten

    # The same conflicting bytes again (a redelivery): one more piece of evidence, counted on the open finding.
    again = store.store_batch([conflicting], [], T0 + timedelta(minutes=2))
    assert again.dead_lettered == [(agent.agent_id, 1)] and len(store.list_dead_letters()) == 2
    [finding] = store.list_findings(open_only=True, kind=SEQ_CONFLICT)
    assert finding.detail["count"] == 2
    assert store.verify_chains(signatures=True) == []


def test_an_exact_duplicate_stays_harmless(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    event = agent.event(1)
    store.store_batch([event], [], T0)
    result = store.store_batch([event, event], [], T0 + timedelta(minutes=1))
    assert (result.duplicates, result.dead_lettered, result.conflicts) == ([(agent.agent_id, 1)] * 2, [], [])
    assert store.list_dead_letters() == [] and store.list_findings() == []


def test_a_conflict_inside_one_batch_is_caught_too(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent(store)
    first = agent.event(1)
    second = agent.event(1, event_id=first.id, payload={"n": 7})
    result = store.store_batch([first, first, second], [], T0)
    assert result.stored == [(agent.agent_id, 1)] and result.duplicates == [(agent.agent_id, 1)]
    assert [(c.kind, c.event_id) for c in result.conflicts] == [(SEQ_CONFLICT, first.id)]
    assert [letter.payload.encode() for letter in store.list_dead_letters()] == [second.raw]


def test_an_event_id_reused_is_a_finding_too(store: Store, make_agent: MakeAgent) -> None:
    a, b = make_agent(store, "a"), make_agent(store, "b")
    original = a.event(1)
    store.store_batch([original], [], T0)
    result = store.store_batch([b.event(5, event_id=original.id), a.event(2, event_id=original.id)], [], T0)
    assert sorted((c.kind, c.agent_id, c.seq) for c in result.conflicts) == [
        (DUPLICATE_ID, a.agent_id, 2),
        (DUPLICATE_ID, b.agent_id, 5),
    ]
    assert {f.agent_id for f in store.list_findings(open_only=True, kind=DUPLICATE_ID)} == {a.agent_id, b.agent_id}


def test_events_of_unregistered_agents_are_dead_lettered(store: Store, make_agent: MakeAgent) -> None:
    stranger = make_agent(agent_id="term-stranger")
    known = make_agent(store)
    result = store.store_batch([stranger.event(1), known.event(1)], [], T0)
    assert result.stored == [(known.agent_id, 1)]
    assert result.dead_lettered == [("term-stranger", 1)]
    assert [letter.reason for letter in store.list_dead_letters()] == [errors.UNKNOWN_AGENT]


# --- reads -----------------------------------------------------------------------------------------


def test_list_events_pages_and_filters(store: Store, make_agent: MakeAgent) -> None:
    a, b = make_agent(store, "a"), make_agent(store, "b")
    batch = []
    for seq in range(1, 11):
        batch.append(a.event(seq, at=T0 + timedelta(minutes=seq)))
        if seq % 2:
            batch.append(b.event(seq, type="agent.started", payload={"version": "1.0", "outbox_depth": seq}, at=T0))
    store.store_batch(batch, [], T0)

    pages, after = [], None
    while page := store.list_events(after_id=after, limit=4):
        pages.append(page)
        after = page[-1].id
    ids = [row.id for page in pages for row in page]
    assert len(ids) == 15 and ids == sorted(ids) and [len(p) for p in pages] == [4, 4, 4, 3]

    assert [row.seq for row in store.list_events(agent_id=a.agent_id, limit=100)] == list(range(1, 11))
    started = store.list_events(type="agent.started")
    assert {row.agent_id for row in started} == {b.agent_id} and len(started) == 5
    window = store.list_events(agent_id=a.agent_id, since=T0 + timedelta(minutes=3), until=T0 + timedelta(minutes=6))
    assert [row.seq for row in window] == [3, 4, 5]
    later = store.list_events(agent_id=a.agent_id, after_id=window[-1].id, limit=2)
    assert [row.seq for row in later] == [6, 7]
    with pytest.raises(ValueError):
        store.list_events(limit=0)


def test_policy_versions_and_issued_commands(store: Store, make_agent: MakeAgent) -> None:
    assert store.current_policy_version() is None
    first = store.add_policy_version({"rules": []}, created_by="admin", source_sha256="a" * 64, comment="first")
    second = store.add_policy_version({"rules": [1]}, created_by="admin", source_sha256="b" * 64)
    assert (first.version, second.version) == (1, 2)
    current = store.current_policy_version()
    assert current is not None and current.version == 2 and current.document == {"rules": [1]}
    got = store.get_policy_version(1)
    assert got is not None and got.comment == "first" and got.created_at.tzinfo is not None
    assert store.get_policy_version(3) is None

    agent = make_agent(store)
    command = store.add_issued_command(
        command_id=uuid.uuid4().hex,
        agent_id=agent.agent_id,
        name="unlock",
        args={"door": "d1"},
        issued_at=T0,
        expires_at=T0 + timedelta(seconds=30),
        nonce="n1",
    )
    assert command.name == "unlock"
    with pytest.raises(IntegrityError):
        store.add_issued_command(
            command_id=uuid.uuid4().hex,
            agent_id=agent.agent_id,
            name="unlock",
            args={},
            issued_at=T0,
            expires_at=T0,
            nonce="n1",
        )


# --- concurrency -----------------------------------------------------------------------------------


def test_two_workers_storing_the_same_agent_keep_one_consistent_chain(
    db_url: str, make_agent: MakeAgent, controller_key: Ed25519PrivateKey
) -> None:
    engines = [make_engine(db_url), make_engine(db_url)]
    try:
        stores = [Store(engine, signing_key=controller_key) for engine in engines]
        agent = make_agent(stores[0])
        events = agent.events(range(1, 301))
        # Each worker gets overlapping, differently ordered batches: every event reaches both.
        plans = [
            [events[i : i + 25] for i in range(0, 300, 25)],
            [list(reversed(events[i : i + 40])) for i in range(0, 300, 40)],
        ]
        results: list[list[Any]] = [[], []]
        failures: list[BaseException] = []
        start = threading.Barrier(2)

        def work(index: int) -> None:
            try:
                start.wait()
                for batch in plans[index]:
                    results[index].append(stores[index].store_batch(batch, [], T0))
            except BaseException as err:  # surfaced to the test thread below
                failures.append(err)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not failures, failures

        stored = [key for worker in results for result in worker for key in result.stored]
        duplicates = [key for worker in results for result in worker for key in result.duplicates]
        assert sorted(stored) == [(agent.agent_id, seq) for seq in range(1, 301)]
        assert len(duplicates) == 300
        assert store_state(stores[0], agent.agent_id) == (list(range(1, 301)), 300, 300, 300)
        assert stores[1].verify_chains(signatures=True) == []
        assert stores[0].list_findings(open_only=True) == []
    finally:
        for engine in engines:
            engine.dispose()


def store_after(start: threading.Barrier, store: Store, batch: list[Any], results: list[Any], index: int) -> None:
    """Wait for the other worker, then store one batch and keep its result."""
    start.wait()
    results[index] = store.store_batch(batch, [], T0)


def test_one_event_id_raced_by_two_agents_is_stored_once(
    db_url: str, make_agent: MakeAgent, controller_key: Ed25519PrivateKey
) -> None:
    """Workers lock different streams, so only the unique index sees the clash; the loser retries."""
    engines = [make_engine(db_url), make_engine(db_url)]
    try:
        stores = [Store(engine, signing_key=controller_key) for engine in engines]
        agents = [make_agent(stores[0], "race"), make_agent(stores[0], "race")]
        for round_ in range(5):
            shared = uuid.uuid4().hex
            first = round_ * 100 + 1
            batches = [
                [*agent.events(range(first, first + 99)), agent.event(first + 99, event_id=shared)] for agent in agents
            ]
            results: list[Any] = [None, None]
            start = threading.Barrier(2)
            threads = [
                threading.Thread(target=store_after, args=(start, stores[i], batches[i], results, i)) for i in range(2)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert all(result is not None for result in results)
            assert sorted(len(result.stored) for result in results) == [99, 100]
            assert sorted(len(result.dead_lettered) for result in results) == [0, 1]
        assert [letter.reason for letter in stores[0].list_dead_letters()] == [DUPLICATE_ID] * 5
        assert stores[0].verify_chains(signatures=True) == []
    finally:
        for engine in engines:
            engine.dispose()


def store_state(store: Store, agent_id: str) -> tuple[list[int], int, int, int]:
    """Return (seqs, chain_length, max_seq, contiguous_seq) of one agent."""
    stream = store.get_stream(agent_id)
    assert stream is not None
    return store.event_seqs(agent_id), stream.chain_length, stream.max_seq, stream.contiguous_seq


# --- the chain record format ------------------------------------------------------------------------


@given(
    agent=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True),
    seq=st.integers(min_value=1, max_value=2**63 - 1),
    chain_index=st.integers(min_value=1, max_value=2**63 - 1),
    event_type=st.text(min_size=1, max_size=20),
    raw=st.text(max_size=200),
    micros=st.integers(min_value=0, max_value=10**15),
)
def test_record_bytes_are_canonical_bytes(
    agent: str, seq: int, chain_index: int, event_type: str, raw: str, micros: int
) -> None:
    occurred = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    fields = {
        "agent": agent,
        "seq": seq,
        "chain_index": chain_index,
        "event_id": uuid.uuid4().hex,
        "type": event_type,
        "raw": raw,
    }
    ours = record_bytes(**fields, occurred_at=occurred, received_at=occurred)
    wire = occurred.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert ours == canonical_bytes({**fields, "occurred_at": wire, "received_at": wire})


# --- property: any interleaving and duplication ends in the same exact state -------------------------

SEQ_PLAN = st.lists(st.tuples(st.sampled_from([0, 1]), st.integers(min_value=1, max_value=25)), min_size=1, max_size=60)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=SEQ_PLAN, cuts=st.lists(st.integers(min_value=1, max_value=60), max_size=6))
def test_any_interleaving_stores_each_seq_once_and_gaps_cover_the_holes(
    store: Store, plan: list[tuple[int, int]], cuts: list[int], make_agent: MakeAgent
) -> None:
    # The store is shared by all examples; fresh agents keep each example independent.
    agents = [make_agent(store, "p"), make_agent(store, "q")]
    built: dict[tuple[int, int], Any] = {}
    arrivals = []
    for which, seq in plan:
        if (which, seq) not in built:
            built[which, seq] = agents[which].event(seq)
        arrivals.append(built[which, seq])
    bounds = sorted({0, len(arrivals), *(c for c in cuts if c < len(arrivals))})
    for start, end in itertools.pairwise(bounds):
        store.store_batch(arrivals[start:end], [], T0)

    for which, agent in enumerate(agents):
        wanted = sorted({seq for w, seq in plan if w == which})
        assert store.event_seqs(agent.agent_id) == wanted
        if not wanted:
            stream = store.get_stream(agent.agent_id)
            assert stream is None or stream.chain_length == 0
            continue
        assert store.verify_chains(agent.agent_id, signatures=True) == []
        missing = set(range(1, wanted[-1] + 1)) - set(wanted)
        covered: list[int] = []
        for finding in store.list_findings(open_only=True, kind=SEQUENCE_GAP, agent_id=agent.agent_id):
            assert finding.first_seq is not None and finding.last_seq is not None
            covered.extend(range(finding.first_seq, finding.last_seq + 1))
        assert sorted(covered) == sorted(missing)  # exactly, and no seq in two findings
        contiguous = 0
        while contiguous + 1 in set(wanted):
            contiguous += 1
        assert store_state(store, agent.agent_id) == (wanted, len(wanted), wanted[-1], contiguous)
