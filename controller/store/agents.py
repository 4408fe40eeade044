"""Registered agents: enrolment with their Ed25519 keys, revocation, and the latest heartbeat of each.

Every enrolment, key replacement and revocation also adds a controller-signed line to the agent's key
history (``agent_keys``) and records it in the checkpoint log, so `records verify` checks each event
against the key that was registered when it was received, and a key swapped in ``agents`` shows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Table, insert, or_, select, update

from sekisho.controller.store.checkpoints import CheckpointRecords, add_key_line, row_key_line
from sekisho.controller.store.models import Agent, AgentKey
from sekisho.controller.store.records import aware_utc, int_or_none
from sekisho.protocol import errors, mynumber, signing, timefmt, topics
from sekisho.protocol.canonical import canonical_bytes

ACTIVE = "active"
REVOKED = "revoked"
# Actions of a key-history line (agent_keys.action).
REGISTER = "register"
REPLACE = "replace"
REVOKE = "revoke"

_AGENTS = cast(Table, Agent.__table__)
_AGENT_KEYS = cast(Table, AgentKey.__table__)


class AgentExists(Exception):
    """The agent is already registered with another key or is revoked; pass replace=True to re-enrol."""


class AgentNotFound(LookupError):
    """No agent with that id is registered."""


def check_registrable(agent_id: str, public_key_pem: str) -> None:
    """Raise ValueError unless the id can be an agent's and the key is an Ed25519 public key in PEM."""
    try:
        topics.check_agent_id(agent_id)
    except errors.Rejected as err:
        raise ValueError(err.detail) from err
    if mynumber.contains_my_number(agent_id):
        # Every event of such an agent would be refused (the header is scanned too): say so now.
        raise ValueError("agent id: looks like a My Number (12 digits with a valid check digit); choose another")
    signing.load_public_key_pem(public_key_pem.encode())  # raises ValueError if not Ed25519 PEM


def register_agent_in(
    conn: Connection,
    signer: Ed25519PrivateKey | None,
    agent_id: str,
    public_key_pem: str,
    *,
    replace: bool,
    when: datetime,
) -> str | None:
    """Register or replace an agent's key inside the caller's transaction; return the key line's action.

    None when the same key is already active (nothing written). Enrolment uses this with its token in one
    transaction (controller/fleet/enrolment.py); the caller has checked the arguments (check_registrable)
    and made sure the checkpoint log has begun.
    """
    row = conn.execute(select(_AGENTS.c.public_key_pem, _AGENTS.c.status).where(_AGENTS.c.id == agent_id)).first()
    if row is None:
        action = REGISTER
        conn.execute(
            insert(_AGENTS).values(id=agent_id, public_key_pem=public_key_pem, status=ACTIVE, registered_at=when)
        )
    elif row.public_key_pem == public_key_pem and row.status == ACTIVE:
        return None
    elif not replace:
        raise AgentExists(f"agent {agent_id!r} is already registered ({row.status}, other key?)")
    else:
        action = REPLACE
        conn.execute(
            update(_AGENTS)
            .where(_AGENTS.c.id == agent_id)
            .values(public_key_pem=public_key_pem, status=ACTIVE, registered_at=when)
        )
    add_key_line(conn, signer, agent_id=agent_id, action=action, public_key_pem=public_key_pem, valid_from=when)
    return action


class AgentRecords(CheckpointRecords):
    """The ``agents`` table and its key history: who may send events, with which key, and when last heard from."""

    def register_agent(
        self, agent_id: str, public_key_pem: str, *, replace: bool = False, registered_at: datetime | None = None
    ) -> None:
        """Enrol an agent with its Ed25519 public key (idempotent for the same key)."""
        check_registrable(agent_id, public_key_pem)
        when = aware_utc(registered_at or timefmt.now(), "registered_at")
        self._ensure_sealed()
        self.write(
            lambda conn: register_agent_in(
                conn, self.signing_key, agent_id, public_key_pem, replace=replace, when=when
            ),
            retry_unique=True,
        )

    def revoke_agent(self, agent_id: str) -> None:
        """Mark an agent revoked: its key is no longer offered for verifying new events."""
        self._ensure_sealed()

        def work(conn: Connection) -> None:
            row = conn.execute(
                select(_AGENTS.c.public_key_pem, _AGENTS.c.status).where(_AGENTS.c.id == agent_id)
            ).first()
            if row is None:
                raise AgentNotFound(agent_id)
            if row.status == REVOKED:
                return
            conn.execute(update(_AGENTS).where(_AGENTS.c.id == agent_id).values(status=REVOKED))
            add_key_line(
                conn,
                self.signing_key,
                agent_id=agent_id,
                action=REVOKE,
                public_key_pem=row.public_key_pem,
                valid_from=timefmt.now(),
            )

        self.write(work, retry_unique=True)

    def key_history(self, agent_id: str) -> list[AgentKey]:
        """Return the lines of one agent's key history, oldest first."""
        return self.read(select(AgentKey).where(AgentKey.agent_id == agent_id).order_by(AgentKey.version))

    def agent_keys(self, *, include_revoked: bool = False) -> dict[str, str]:
        """Return agent id → public key PEM, for active agents (or all, to re-verify old records)."""
        stmt = select(_AGENTS.c.id, _AGENTS.c.public_key_pem)
        if not include_revoked:
            stmt = stmt.where(_AGENTS.c.status == ACTIVE)
        with self.engine.connect() as conn:
            return {row.id: row.public_key_pem for row in conn.execute(stmt)}

    def vouched_agent_keys(self, controller_key: signing.Verifier) -> tuple[dict[str, str], list[str]]:
        """Return active agents' keys that their newest controller-signed key line vouches for, and the refused.

        Ingest takes keys from here rather than from ``agents`` alone: a key swapped into ``agents`` by
        someone who can write the database but not sign as the controller is not used to accept events
        (``records verify`` reports it too). Returns ({agent: public key PEM}, [agents refused]).
        """
        with self.engine.connect() as conn:
            active = dict(
                conn.execute(select(_AGENTS.c.id, _AGENTS.c.public_key_pem).where(_AGENTS.c.status == ACTIVE)).all()
            )
            newest: dict[str, Any] = {}
            for row in conn.execute(select(_AGENT_KEYS).order_by(_AGENT_KEYS.c.agent_id, _AGENT_KEYS.c.version)):
                newest[row.agent_id] = row
        trusted: dict[str, str] = {}
        refused: list[str] = []
        for agent, pem in active.items():
            line = newest.get(agent)
            if line is None or line.action == REVOKE or line.public_key_pem != pem or line.signature is None:
                refused.append(agent)
                continue
            try:
                body = canonical_bytes(row_key_line(line))
                signing.verify_canonical(controller_key, "agent_key", body, line.signature)
            except errors.Rejected:
                refused.append(agent)
                continue
            trusted[agent] = pem
        return trusted, sorted(refused)

    def record_heartbeat(self, agent_id: str, info: dict[str, Any], seen_at: datetime) -> bool:
        """Record an agent's latest heartbeat; older heartbeats than the one stored are ignored.

        A heartbeat with a My-Number-like value in any field is not recorded at all (False), like an old
        one: ingest refuses such heartbeats already (protocol.messages.open_heartbeat); this is the backstop.
        """
        seen = aware_utc(seen_at, "seen_at")
        version = info.get("version")
        values = {
            "last_seen_at": seen,
            "version": version[:32] if isinstance(version, str) else None,
            "outbox_depth": int_or_none(info.get("outbox_depth")),
            "clock_offset_ms": int_or_none(info.get("clock_offset_ms")),
            "policy_version": int_or_none(info.get("policy_version")),
            "last_heartbeat": info,
        }
        # The stored values too: cutting the version at 32 characters may shorten a longer digit run to 12.
        if next(mynumber.find_my_numbers([info, values["version"]]), None) is not None:
            return False

        def work(conn: Connection) -> bool:
            # Heartbeats may be handled by different workers out of order: keep the newest.
            stmt = (
                update(_AGENTS)
                .where(_AGENTS.c.id == agent_id)
                .where(or_(_AGENTS.c.last_seen_at.is_(None), _AGENTS.c.last_seen_at <= seen))
                .values(**values)
            )
            return conn.execute(stmt).rowcount > 0

        return self.write(work)

    def list_agents(self) -> list[Agent]:
        """Return every registered agent, ordered by id."""
        return self.read(select(Agent).order_by(Agent.id))
