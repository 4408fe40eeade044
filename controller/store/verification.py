"""`records verify`: every chain, key line and checkpoint re-checked against the controller-signed log.

One read transaction (one snapshot, despite concurrent ingest) walks, in this order:

1. the checkpoint log (checkpoints.py): linked, unedited, each entry signed with the controller's key;
   what its entries say is the expected state;
2. the agents' key histories (``agent_keys``): every line signed and recorded in the log, none missing,
   and ``agents`` agreeing with the newest line (key and revoked or not);
3. every agent's event chain (chain.py): linked, unedited, each record's columns equal to its signed
   wire bytes and its signature valid for the key registered when it was received; its end and its
   ``streams`` row equal to the head the newest signed checkpoint gives it. A stream the log names but
   the tables lack entirely is found too;
4. the dead letters' chain, held against its signed head the same way;
5. the admin audit trail's chain (audit.py), held against its signed head the same way;
6. the record log (record_log.py): each tracked table's chain of row digests against its signed head, and
   every row of policy_versions, issued_commands, media_loans and media_loan_log against its last digest.

What it does not check is listed in NOT_CHECKED, and `records verify` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Table, select

from sekisho.controller.store.audit import verify_admin
from sekisho.controller.store.chain import ChainProblem, KeyHistory, KeySpan, verify_letters, verify_stream
from sekisho.controller.store.checkpoints import LogState, key_line_digest, read_log, row_key_line
from sekisho.controller.store.models import Agent, AgentKey, Event, Stream
from sekisho.controller.store.record_log import TRACKED
from sekisho.controller.store.record_log import verify_stream as verify_record_stream
from sekisho.controller.store.records import Records
from sekisho.protocol import errors, signing
from sekisho.protocol.canonical import canonical_bytes

# Around a key replacement or revocation, the key on either side is accepted for this long (ingest
# workers re-read keys every key_refresh_s); `records verify` widens it to 3 × key_refresh_s if larger.
KEY_GRACE = timedelta(minutes=5)

# What `records verify` does not check, and why (docs/operations.md says the same).
NOT_CHECKED = (
    "findings (raised and updated by many writers without the signing key; not yet in the record log)",
    "a media loan's link to its overdue finding (media_loans.overdue_finding_id)",
    "heartbeat columns of agents (last_seen_at, version, outbox_depth…)",
    "door registers (derived from the events: sekisho doors rebuild)",
    "the dead letters' digest of the refused bytes (payload_mac), and the row ids of events and dead letters",
)

_AGENTS = cast(Table, Agent.__table__)
_AGENT_KEYS = cast(Table, AgentKey.__table__)
_STREAMS = cast(Table, Stream.__table__)
_EVENTS = cast(Table, Event.__table__)


@dataclass(frozen=True, slots=True)
class Verification:
    """What `records verify` found: the problems (first per chain) and what was checked."""

    problems: list[ChainProblem]
    streams: int = 0
    records: int = 0
    dead_letters: int = 0
    admin_records: int = 0
    tracked_rows: int = 0
    checkpoints: int = 0
    head: tuple[int, str] | None = None
    genesis_at: datetime | None = None
    controller_signatures: bool = False
    agent_signatures: bool = False
    not_checked: tuple[str, ...] = field(default=NOT_CHECKED)


def _key_problem(row: Any, text: str) -> ChainProblem:
    return ChainProblem(row.agent_id, None, None, None, row.id, f"key line version {row.version}: {text}", "agent_keys")


def _line_problem(row: Any, state: LogState, controller_key: signing.Verifier | None) -> str | None:
    body = row_key_line(row)
    recorded = state.key_lines.get(row.id)
    if recorded is None:
        return "not recorded in the checkpoint log: line inserted"
    checkpoint, agent, version, digest = recorded
    if (agent, version) != (row.agent_id, row.version) or digest != key_line_digest(body):
        return f"differs from what signed checkpoint #{checkpoint} recorded: line edited"
    if controller_key is not None:
        if row.signature is None:
            return "not signed (written without the controller's signing key)"
        try:
            signing.verify_canonical(controller_key, "agent_key", canonical_bytes(body), row.signature)
        except errors.Rejected:
            return "signature invalid"
    return None


def read_key_histories(
    conn: Connection,
    state: LogState,
    controller_key: signing.Verifier | None,
    grace: timedelta,
    agent_id: str | None = None,
) -> tuple[dict[str, KeyHistory], list[ChainProblem]]:
    """Check the key lines and ``agents`` against the log; return each agent's trusted history and the problems."""
    problems: list[ChainProblem] = []
    spans: dict[str, list[KeySpan]] = {}
    newest: dict[str, Any] = {}
    broken: set[str] = set()
    seen: set[int] = set()
    query = select(_AGENT_KEYS).order_by(_AGENT_KEYS.c.agent_id, _AGENT_KEYS.c.version)
    if agent_id is not None:
        query = query.where(_AGENT_KEYS.c.agent_id == agent_id)
    for row in conn.execute(query):
        seen.add(row.id)
        if row.agent_id in broken:
            continue
        expected = len(spans.get(row.agent_id, [])) + 1
        problem = _line_problem(row, state, controller_key)
        if problem is None and row.version != expected:
            problem = f"line(s) missing before version {row.version}: deleted"
        key = None
        if problem is None and row.action != "revoke":
            try:
                key = signing.Verifier(signing.load_public_key_pem(row.public_key_pem.encode()))
            except ValueError:
                problem = "public key does not load"
        if problem is not None:
            # Nothing after a bad line is trusted: its events are then checked against no key at all.
            problems.append(_key_problem(row, problem))
            broken.add(row.agent_id)
            continue
        spans.setdefault(row.agent_id, []).append(KeySpan(row.version, row.valid_from, key, row.previous_until))
        newest[row.agent_id] = row
    for line_id, (checkpoint, agent, version, _) in sorted(state.key_lines.items()):
        if line_id not in seen and (agent_id is None or agent == agent_id):
            problems.append(
                ChainProblem(
                    agent,
                    None,
                    None,
                    None,
                    line_id,
                    f"key line version {version} missing (recorded by signed checkpoint #{checkpoint}): deleted",
                    "agent_keys",
                )
            )
            broken.add(agent)
    agents = select(_AGENTS.c.id, _AGENTS.c.public_key_pem, _AGENTS.c.status).order_by(_AGENTS.c.id)
    if agent_id is not None:
        agents = agents.where(_AGENTS.c.id == agent_id)
    listed = set()
    for enrolled in conn.execute(agents):
        listed.add(enrolled.id)
        line = newest.get(enrolled.id)
        if enrolled.id in broken:
            continue
        text = None
        if line is None:
            text = "no signed key line for this agent: row inserted"
        elif enrolled.public_key_pem != line.public_key_pem:
            text = f"public_key_pem differs from signed key line version {line.version}: key swapped"
        elif (enrolled.status == "revoked") != (line.action == "revoke"):
            text = f"status {enrolled.status!r} differs from signed key line version {line.version} ({line.action})"
        if text is not None:
            problems.append(ChainProblem(enrolled.id, None, None, None, None, text, "agents"))
    for missing in sorted(set(newest) - listed):
        problems.append(ChainProblem(missing, None, None, None, None, "agents row missing: deleted", "agents"))
    histories = {agent: KeyHistory(lines, grace) for agent, lines in spans.items() if agent not in broken}
    return histories, problems


class VerificationRecords(Records):
    """`records verify` over the whole store (``verify_records``), or as a list of problems (``verify_chains``)."""

    def verify_records(
        self,
        agent_id: str | None = None,
        *,
        signatures: bool = True,
        controller_key: Ed25519PublicKey | None = None,
        key_grace: timedelta = KEY_GRACE,
    ) -> Verification:
        """Re-check the log, key histories, event chains and dead letters (or one agent's) in one snapshot.

        controller_key (default: the public half of the store's signing key) checks the controller's
        signatures on the log and key lines; without either they are not checked. signatures=False skips
        the agents' signatures on events (the chains and signed heads are still checked).
        """
        if controller_key is None and self.signing_key is not None:
            controller_key = self.signing_key.public_key()
        verifier = signing.Verifier(controller_key) if controller_key is not None else None
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # One snapshot for the log, the key lines, the stream rows and the records.
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                return self._verify(conn, agent_id, signatures, verifier, key_grace)

    def verify_chains(self, agent_id: str | None = None, *, signatures: bool = False) -> list[ChainProblem]:
        """Return the problems verify_records finds (the first of each chain); [] if everything is intact."""
        return self.verify_records(agent_id, signatures=signatures).problems

    @staticmethod
    def _verify(
        conn: Connection,
        agent_id: str | None,
        signatures: bool,
        controller_key: signing.Verifier | None,
        grace: timedelta,
    ) -> Verification:
        state, problems = read_log(conn, controller_key)
        histories, key_problems = read_key_histories(conn, state, controller_key, grace, agent_id)
        problems.extend(key_problems)
        if agent_id is not None:
            agent_ids = [agent_id]
        else:
            found = set(conn.execute(select(_STREAMS.c.agent_id)).scalars())
            # Records without a stream row, and streams the log names but the tables lack, are findings too.
            found.update(conn.execute(select(_EVENTS.c.agent_id).distinct()).scalars())
            found.update(state.streams)
            agent_ids = sorted(found)
        records = 0
        for one in agent_ids:
            keys = histories.get(one) if signatures else None
            legacy = state.legacy.get(one, 0) if state.genesis_at is not None else None
            problem, walked = verify_stream(conn, one, signed=state.streams.get(one), legacy_length=legacy, keys=keys)
            if problem is None and signatures and keys is None and walked:
                problem = ChainProblem(one, None, None, None, None, "no trusted key history: signatures not checked")
            if problem is not None:
                problems.append(problem)
            records += walked
        letters = admin = tracked_rows = 0
        if agent_id is None:
            letter_problem, letters = verify_letters(conn, state.letters)
            if letter_problem is not None:
                problems.append(letter_problem)
            admin_problem, admin = verify_admin(conn, state.admin)
            if admin_problem is not None:
                problems.append(admin_problem)
            for tracked in TRACKED:
                row_problems, rows = verify_record_stream(conn, tracked, state.records.get(tracked.stream))
                problems.extend(row_problems)
                tracked_rows += rows
        if (
            state.entries == 0
            and not any(p.table == "checkpoints" for p in problems)
            and (records or letters or admin or histories or tracked_rows)
        ):
            empty = (
                "the checkpoint log is empty: nothing is sealed (a controller seals the records as they stand when it "
                "first starts after the upgrade; if one has started since, the log was deleted)"
            )
            problems.insert(0, ChainProblem(None, None, None, None, None, empty, "checkpoints"))
        return Verification(
            problems=problems,
            streams=len(agent_ids),
            records=records,
            dead_letters=letters,
            admin_records=admin,
            tracked_rows=tracked_rows,
            checkpoints=state.entries,
            head=state.head,
            genesis_at=state.genesis_at,
            controller_signatures=controller_key is not None,
            agent_signatures=signatures,
        )
