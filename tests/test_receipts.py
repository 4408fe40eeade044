"""Heads held outside the database: agents' receipts and the heads file find what the checkpoint log cannot.

Someone who can write the database *and* sign as the controller (or who restores an older database) leaves
a database that agrees with itself: `records verify` alone finds nothing. The controller's signed receipts,
kept by the agents (`records verify --receipts DIR`), and the heads file it exports (`--heads FILE`) still
show it. Each test here runs on SQLite and on a private PostgreSQL cluster (the store fixtures).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, select, update
from support.lab import running_site
from support.site import wait_for
from typer.testing import CliRunner

from sekisho.agents.runtime.receipts import RECEIPTS_FILE, ReceiptKeeper
from sekisho.cli import app as sekisho_app
from sekisho.controller.heads import HeadsExport
from sekisho.controller.ingest.worker import ReceiptTakers
from sekisho.controller.store import Store, record_hash
from sekisho.controller.store.events import BatchResult
from sekisho.controller.store.models import Checkpoint, Event, Stream
from sekisho.protocol import messages, signing, timefmt

if TYPE_CHECKING:
    from store_fixtures import FakeAgent, MakeAgent

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
BATCHES = 5
PER_BATCH = 10


def heartbeat(agent: FakeAgent, *, receipts: bool) -> dict[str, Any]:
    """Return the heartbeat fields the controller records for an agent (asking for receipts or not)."""
    body = messages.build_heartbeat(
        agent.key,
        agent=agent.agent_id,
        at=timefmt.fmt(timefmt.now()),
        version="test",
        boot_id="0" * 32,
        outbox_depth=0,
        next_seq=1,
        policy_state="none",
        receipts=messages.RECEIPTS_FORMAT if receipts else None,
    )
    return dict(json.loads(body)["heartbeat"])


def store_with_receipts(
    store: Store, controller_key: Ed25519PrivateKey, agent: FakeAgent, state_dir: Path, *, first_seq: int = 1
) -> list[BatchResult]:
    """Store batches of the agent's events; keep each batch's ack the way ingest and the agent do."""
    takers = ReceiptTakers(store, refresh_s=0.0)
    keeper = ReceiptKeeper(state_dir, agent.agent_id, every_s=0.0)
    results = []
    for batch in range(BATCHES):
        start = first_seq + batch * PER_BATCH
        seqs = list(range(start, start + PER_BATCH))
        result = store.store_batch(agent.events(seqs), [], T0 + timedelta(seconds=batch))
        receipt = takers.receipt(agent.agent_id, result)
        raw = messages.build_ack(controller_key, agent.agent_id, seqs, receipt=receipt)
        # What the agent's sender does with an ack: verify it, and keep it if it carries a receipt.
        keeper.keep(raw, messages.open_ack(raw, controller_key.public_key(), agent.agent_id))
        results.append(result)
    keeper.flush()
    return results


def verify(config: Path, *options: str, code: int) -> str:
    """Run `sekisho records verify` in process; check its exit code and return what it printed."""
    result = CliRunner().invoke(
        sekisho_app, ["records", "verify", "--config", str(config), *options], env={"COLUMNS": "400"}
    )
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture
def receipted(
    store: Store, controller_key: Ed25519PrivateKey, make_agent: MakeAgent, tmp_path: Path
) -> tuple[FakeAgent, Path]:
    """An agent that asked for receipts, 50 events stored in 5 batches, and its receipts.json in a folder."""
    agent = make_agent(store, "rcpt")
    assert store.record_heartbeat(agent.agent_id, heartbeat(agent, receipts=True), T0)
    collected = tmp_path / "collected" / agent.agent_id
    collected.mkdir(parents=True)
    store_with_receipts(store, controller_key, agent, collected)
    return agent, tmp_path / "collected"


def test_acks_carry_receipts_only_for_agents_that_ask(
    store: Store, controller_key: Ed25519PrivateKey, make_agent: MakeAgent, tmp_path: Path
) -> None:
    # An older agent refuses an ack with a field it does not know (extra=forbid) and then never drops its events.
    old = make_agent(store, "old")
    store.record_heartbeat(old.agent_id, heartbeat(old, receipts=False), T0)
    result = store.store_batch(old.events([1, 2]), [], T0)
    assert ReceiptTakers(store, refresh_s=0.0).receipt(old.agent_id, result) is None
    ack = json.loads(messages.build_ack(controller_key, old.agent_id, [1, 2]))
    assert set(ack["ack"]) == {"v", "agent", "ranges", "controller_time"}

    new = make_agent(store, "new")
    store.record_heartbeat(new.agent_id, heartbeat(new, receipts=True), T0)
    result = store.store_batch(new.events([1, 2, 3]), [], T0)
    receipt = ReceiptTakers(store, refresh_s=0.0).receipt(new.agent_id, result)
    assert receipt is not None and receipt.length == 3 and receipt.checkpoint == result.checkpoint
    with store.engine.connect() as conn:
        head = conn.execute(select(Stream.head_hash).where(Stream.agent_id == new.agent_id)).scalar_one()
        logged = conn.execute(select(Checkpoint.hash).where(Checkpoint.id == receipt.checkpoint)).scalar_one()
    assert (receipt.head, receipt.checkpoint_hash) == (head, logged)


def test_receipts_of_an_intact_store_verify(receipted: tuple[FakeAgent, Path], controller_toml: Path) -> None:
    agent, collected = receipted
    kept = json.loads((collected / agent.agent_id / RECEIPTS_FILE).read_text())
    assert kept["agent"] == agent.agent_id and len(kept["receipts"]) == BATCHES
    output = verify(controller_toml, "--receipts", str(collected), code=0)
    assert f"{BATCHES} receipt(s)" in output and "chains intact" in output


def rehash_format_1(row: Any, prev_hash: str, chain_index: int) -> str:
    """Recompute a record's hash as a genesis-sealed (format 1) record, at a new chain index."""
    return record_hash(
        prev_hash,
        agent=row.agent_id,
        seq=row.seq,
        chain_index=chain_index,
        event_id=row.event_id,
        type=row.type,
        occurred_at=row.occurred_at,
        received_at=row.received_at,
        raw=row.raw,
    )


def test_a_rehashed_chain_with_a_new_log_is_named_by_the_receipts(
    store: Store, receipted: tuple[FakeAgent, Path], controller_toml: Path
) -> None:
    """An insider deletes one event, renumbers and re-hashes the chain, rewrites streams and re-creates the log."""
    agent, collected = receipted
    gone = 23
    with store.engine.begin() as conn:
        conn.execute(delete(Event).where(Event.agent_id == agent.agent_id, Event.chain_index == gone))
        rows = conn.execute(
            select(Event.__table__).where(Event.agent_id == agent.agent_id).order_by(Event.chain_index)
        ).all()
        prev = "0" * 64
        for index, row in enumerate(rows, start=1):
            digest = rehash_format_1(row, prev, index)
            conn.execute(
                update(Event).where(Event.id == row.id).values(chain_index=-index, prev_hash=prev, hash=digest)
            )
            prev = digest
        conn.execute(update(Event).where(Event.agent_id == agent.agent_id).values(chain_index=-Event.chain_index))
        length = BATCHES * PER_BATCH - 1
        conn.execute(
            update(Stream).where(Stream.agent_id == agent.agent_id).values(chain_length=length, head_hash=prev)
        )
        conn.execute(delete(Checkpoint))
    # The controller's key signs the new log: a database that agrees with itself, validly signed throughout.
    assert store.seal_existing() == 1
    clean = verify(controller_toml, code=0)
    assert "chains intact" in clean

    output = verify(controller_toml, "--receipts", str(collected), code=1)
    lines = [line for line in output.splitlines() if line.startswith(f"stream {agent.agent_id}: receipt #")]
    # Every receipt names the stream: re-sealing as genesis made the attacker re-hash every record.
    assert len(lines) == BATCHES, output
    last = lines[-1]
    assert f"from {agent.agent_id} says head " in last
    assert f"at index {BATCHES * PER_BATCH}, database has no record there" in last
    middle = next(line for line in lines if f"at index {3 * PER_BATCH}," in line)
    with store.engine.connect() as conn:
        now = conn.execute(
            select(Event.hash).where(Event.agent_id == agent.agent_id, Event.chain_index == 3 * PER_BATCH)
        ).scalar_one()
    assert middle.endswith(f"database has {now}")
    # The checkpoints the receipts name are gone from the re-created log (it holds only its new genesis).
    assert "the log has no #" in output


def test_a_forged_receipt_is_reported_not_trusted(
    store: Store, receipted: tuple[FakeAgent, Path], controller_toml: Path
) -> None:
    agent, collected = receipted
    forger = signing.generate_key()
    with store.engine.connect() as conn:
        head = conn.execute(select(Stream.head_hash).where(Stream.agent_id == agent.agent_id)).scalar_one()
        checkpoint = conn.execute(select(Checkpoint.id, Checkpoint.hash).order_by(Checkpoint.id.desc())).first()
    assert checkpoint is not None
    receipt = messages.Receipt(length=999, head=head, checkpoint=checkpoint.id, checkpoint_hash=checkpoint.hash)
    forged = messages.build_ack(forger, agent.agent_id, [1], receipt=receipt).decode()
    doc = {"format": messages.RECEIPTS_FORMAT, "agent": agent.agent_id, "receipts": [forged, "not even json"]}
    (collected / "forged.json").write_text(json.dumps(doc))
    (collected / "broken.json").write_text("{")

    output = verify(controller_toml, "--receipts", str(collected), code=1)
    assert "receipt forged.json[0]: not signed by the controller, not trusted (bad_signature)" in output
    assert "receipt forged.json[1]: not signed by the controller, not trusted" in output
    assert "receipt file broken.json: unreadable" in output
    # Nothing the forged receipt says is used: no line about index 999.
    assert "index 999" not in output
    assert f"{BATCHES} receipt(s)" in output


def test_heads_file_export_and_a_database_cut_back(
    store: Store,
    controller_key: Ed25519PrivateKey,
    make_agent: MakeAgent,
    controller_toml: Path,
    tmp_path: Path,
) -> None:
    heads = tmp_path / "outside" / "heads.jsonl"
    heads.parent.mkdir()
    export = HeadsExport(store, heads, every_s=60.0)
    agent = make_agent(store, "cut")
    numbers = []
    for batch in range(3):
        seqs = range(1 + batch * PER_BATCH, 1 + (batch + 1) * PER_BATCH)
        numbers.append(store.store_batch(agent.events(seqs), [], T0).checkpoint)
        export.run_once()
        export.run_once()  # unchanged: no second line for the same head
    lines = [json.loads(line) for line in heads.read_text().splitlines()]
    assert [line["n"] for line in lines] == numbers
    assert HeadsExport(store, heads, every_s=60.0)._last == numbers[-1]  # a restart continues the file
    assert "3 exported head(s)" in verify(controller_toml, "--heads", str(heads), code=0)

    # Cut back as a restored backup would: the last batch's records, stream head and checkpoint all gone.
    with store.engine.begin() as conn:
        kept = conn.execute(
            select(Event.hash).where(Event.agent_id == agent.agent_id, Event.chain_index == 2 * PER_BATCH)
        ).scalar_one()
        conn.execute(delete(Event).where(Event.agent_id == agent.agent_id, Event.chain_index > 2 * PER_BATCH))
        conn.execute(
            update(Stream)
            .where(Stream.agent_id == agent.agent_id)
            .values(chain_length=2 * PER_BATCH, head_hash=kept, max_seq=2 * PER_BATCH, contiguous_seq=2 * PER_BATCH)
        )
        conn.execute(delete(Checkpoint).where(Checkpoint.id == numbers[-1]))
    assert "chains intact" in verify(controller_toml, code=0)  # consistent and validly signed throughout
    output = verify(controller_toml, "--heads", str(heads), code=1)
    assert f"heads file line 3 says signed checkpoint #{numbers[-1]} has hash {lines[-1]['hash']}" in output
    assert f"the log has no #{numbers[-1]} (cut back or re-created)" in output

    # A line someone added without the controller's key is reported, not trusted.
    with heads.open("a") as f:
        f.write(json.dumps({**lines[0], "hash": "f" * 64}) + "\n")
    output = verify(controller_toml, "--heads", str(heads), code=1)
    assert "heads file line 4: not signed by the controller, not trusted (bad_signature)" in output


def test_the_agent_keeps_the_longest_receipt_when_the_stream_goes_back(
    controller_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    keeper = ReceiptKeeper(tmp_path, "term-x", keep=3, every_s=0.0)

    def ack(length: int) -> tuple[bytes, messages.Ack]:
        receipt = messages.Receipt(length=length, head="a" * 64, checkpoint=length, checkpoint_hash="b" * 64)
        raw = messages.build_ack(controller_key, "term-x", [length], receipt=receipt)
        return raw, messages.open_ack(raw, controller_key.public_key(), "term-x")

    for length in (10, 20, 5, 6, 7, 8):
        keeper.keep(*ack(length))
    kept = json.loads((tmp_path / RECEIPTS_FILE).read_text())["receipts"]
    lengths = [json.loads(raw)["ack"]["receipt"]["length"] for raw in kept]
    # Bounded, newest kept, and the receipt for 20 records stays: it is what shows the controller went back.
    assert lengths == [20, 6, 7, 8]
    again = ReceiptKeeper(tmp_path, "term-x", keep=3, every_s=0.0)
    again.keep(*ack(9))
    kept = json.loads((tmp_path / RECEIPTS_FILE).read_text())["receipts"]
    assert [json.loads(raw)["ack"]["receipt"]["length"] for raw in kept] == [20, 7, 8, 9]


@pytest.mark.broker
def test_a_real_agent_ends_up_holding_a_receipt_that_verifies(pki: Path, tmp_path: Path) -> None:
    """A real agent process, a real broker with TLS and ACLs, and the controller: receipts.json verifies."""
    agent = "term-rc1"
    heads = tmp_path / "outside" / "heads.jsonl"
    heads.parent.mkdir()
    site = running_site(pki, tmp_path / "site", agents=(agent,), heads_file=str(heads), heads_every_s=1)
    with site as (lab, ctl):
        state = lab.root / "agents" / agent / "state"
        args = ["agent", "simulate", "--config", str(lab.agent_config(agent)), "--count", "5"]
        # Twice: the first run's heartbeat may reach the controller after its events were acked.
        for _ in range(2):
            done = lab.sekisho(*args, "--exit-when-drained", "--timeout", "60", check=False)
            assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: (state / RECEIPTS_FILE).exists(), 10, "the agent's receipts file")
        kept = json.loads((state / RECEIPTS_FILE).read_text())
        assert kept["agent"] == agent and kept["receipts"]
        newest = json.loads(kept["receipts"][-1])["ack"]["receipt"]
        stream = ctl.store.get_stream(agent)
        # The agent's last ack covered its whole stream: 10 synthetic events and what the runs said of themselves.
        assert stream is not None and newest["length"] == stream.chain_length >= 10
        output = verify(lab.controller_config, "--receipts", str(state), code=0)
        assert "chains intact" in output and " 0 receipt(s)" not in output
        status = lab.sekisho("agent", "status", "--config", str(lab.agent_config(agent)), check=False)
        assert status.returncode == 0, status.stderr
        assert f"newest: {newest['length']} record(s), checkpoint #{newest['checkpoint']}" in status.stdout
        # The controller's heads export job wrote the receipt's checkpoint, or a later one, outside the database.
        wait_for(lambda: heads.exists() and heads.read_text().count("\n") >= 1, 10, "the heads file")
        last = json.loads(heads.read_text().splitlines()[-1])
        wait_for(
            lambda: json.loads(heads.read_text().splitlines()[-1])["n"] >= newest["checkpoint"], 10, "the newest head"
        )
        assert last["signature"]
        output = verify(lab.controller_config, "--heads", str(heads), code=0)
        assert " 0 exported head(s)" not in output
