"""Registered agents: enrolment with their Ed25519 keys, revocation, and the latest heartbeat of each.

Every enrolment, key replacement and revocation also adds a controller-signed line to the agent's key
history (``agent_keys``) and records it in the checkpoint log, so `records verify` checks each event
against the key that was registered when it was received, and a key swapped in ``agents`` shows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Table, column, insert, inspect, or_, select, table, update

from sekisho.controller.store.audit import Operator, append_admin
from sekisho.controller.store.checkpoints import CheckpointRecords, add_key_line, row_key_line
from sekisho.controller.store.models import Agent, AgentKey, UTCDateTime
from sekisho.controller.store.records import aware_utc, int_or_none
from sekisho.protocol import errors, mynumber, signing, timefmt, topics
from sekisho.protocol.canonical import canonical_bytes
from sekisho.protocol.revocations import RevocationList, serial_text

ACTIVE = "active"
REVOKED = "revoked"
# Actions of a key-history line (agent_keys.action).
REGISTER = "register"
REPLACE = "replace"
REVOKE = "revoke"

# Workers store heartbeats seconds apart at most; a stored one newer than this is from before a clock step back.
HEARTBEAT_CLOCK_STEP = timedelta(minutes=5)

_AGENTS = cast(Table, Agent.__table__)
_AGENT_KEYS = cast(Table, AgentKey.__table__)
# The certificates enrolment records (controller/store/enrolment.py); only the columns revocation needs, so this
# module reads them without depending on that one. The serial is lower-case hex there.
_CERTIFICATES = table(
    "agent_certificates",
    column("agent_id"),
    column("serial"),
    column("issued_at", UTCDateTime),
    column("not_after", UTCDateTime),
)


@dataclass(frozen=True, slots=True)
class VouchedKeys:
    """The keys ingest may use for one agent, each vouched for by a controller-signed key line.

    current: the key in force (None once the agent is revoked; then revoked_key is its last key, used only to
    prove that an event came from it, so that it can be kept and acknowledged). previous/previous_until: the
    key the newest replace line replaced, accepted for events received before previous_until.
    """

    current: str | None
    previous: str | None = None
    previous_until: datetime | None = None
    rotated_at: datetime | None = None
    revoked_key: str | None = None


def _key_digest(public_key_pem: str) -> str:
    """Name a public key in an audit row by its SHA-256 (the PEM itself is in the key history)."""
    return hashlib.sha256(public_key_pem.encode()).hexdigest()


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
    key_grace: timedelta | None = None,
) -> str | None:
    """Register or replace an agent's key inside the caller's transaction; return the key line's action.

    None when the same key is already active (nothing written). Enrolment uses this with its token in one
    transaction (controller/fleet/enrol_service.py); the caller has checked the arguments (check_registrable)
    and made sure the checkpoint log has begun. key_grace: on a replacement of an active agent's key, how
    long events signed with the replaced key are still accepted (signed into the line as previous_until).
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
    # A revoked agent's old key gets no grace: whatever it signed after the revocation stays refused.
    previous_until = (
        when + key_grace
        if action == REPLACE and row is not None and row.status == ACTIVE and key_grace and key_grace > timedelta(0)
        else None
    )
    add_key_line(
        conn,
        signer,
        agent_id=agent_id,
        action=action,
        public_key_pem=public_key_pem,
        valid_from=when,
        previous_until=previous_until,
    )
    return action


class AgentRecords(CheckpointRecords):
    """The ``agents`` table and its key history: who may send events, with which key, and when last heard from."""

    def register_agent(
        self,
        agent_id: str,
        public_key_pem: str,
        *,
        replace: bool = False,
        registered_at: datetime | None = None,
        key_grace: timedelta | None = None,
        operator: Operator | None = None,
    ) -> str | None:
        """Enrol an agent with its Ed25519 public key (idempotent for the same key); return the key line's action.

        key_grace: on a replacement, how long events signed with the replaced key are still accepted.
        operator: who did it; an admin audit row (agent.register / agent.replace) is written in the same
        transaction as the key line (none when nothing changed).
        """
        check_registrable(agent_id, public_key_pem)
        when = aware_utc(registered_at or timefmt.now(), "registered_at")
        self._ensure_sealed()

        def work(conn: Connection) -> str | None:
            old = conn.execute(
                select(_AGENTS.c.public_key_pem, _AGENTS.c.status).where(_AGENTS.c.id == agent_id)
            ).first()
            action = register_agent_in(
                conn, self.signing_key, agent_id, public_key_pem, replace=replace, when=when, key_grace=key_grace
            )
            if action is not None and operator is not None:
                entry = operator.action(
                    f"agent.{action}",
                    f"agent:{agent_id}",
                    old=None if old is None else {"status": old.status, "key": _key_digest(old.public_key_pem)},
                    new={"status": ACTIVE, "key": _key_digest(public_key_pem)},
                    detail={"key_grace_s": int(key_grace.total_seconds())} if key_grace and old is not None else None,
                )
                append_admin(conn, self.signing_key, entry, when)
            return action

        return self.write(work, retry_unique=True)

    def revoke_agent(self, agent_id: str, *, operator: Operator | None = None) -> None:
        """Mark an agent revoked: its key is no longer offered for verifying new events.

        operator: who did it; an admin audit row (agent.revoke) is written with the key line.
        """
        self._ensure_sealed()

        def work(conn: Connection) -> None:
            row = conn.execute(
                select(_AGENTS.c.public_key_pem, _AGENTS.c.status).where(_AGENTS.c.id == agent_id)
            ).first()
            if row is None:
                raise AgentNotFound(agent_id)
            if row.status == REVOKED:
                return
            now = timefmt.now()
            conn.execute(update(_AGENTS).where(_AGENTS.c.id == agent_id).values(status=REVOKED))
            add_key_line(
                conn,
                self.signing_key,
                agent_id=agent_id,
                action=REVOKE,
                public_key_pem=row.public_key_pem,
                valid_from=now,
            )
            if operator is not None:
                entry = operator.action(
                    "agent.revoke", f"agent:{agent_id}", old={"status": row.status}, new={"status": REVOKED}
                )
                append_admin(conn, self.signing_key, entry, now)

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

    def vouched_key_sets(self, controller_key: signing.Verifier) -> tuple[dict[str, VouchedKeys], list[str]]:
        """Return every agent's vouched keys (see VouchedKeys), and the agents no signed line vouches for.

        Like vouched_agent_keys, only lines with a valid controller signature count, and ``agents`` must agree
        with the newest one (key, and revoked or not).
        """
        with self.engine.connect() as conn:
            agents = {
                row.id: row for row in conn.execute(select(_AGENTS.c.id, _AGENTS.c.public_key_pem, _AGENTS.c.status))
            }
            lines: dict[str, list[Any]] = {}
            for row in conn.execute(select(_AGENT_KEYS).order_by(_AGENT_KEYS.c.agent_id, _AGENT_KEYS.c.version)):
                lines.setdefault(row.agent_id, []).append(row)

        def signed(line: Any) -> bool:
            if line.signature is None:
                return False
            try:
                body = canonical_bytes(row_key_line(line))
                signing.verify_canonical(controller_key, "agent_key", body, line.signature)
            except errors.Rejected:
                return False
            return True

        found: dict[str, VouchedKeys] = {}
        refused: list[str] = []
        for agent, enrolled in agents.items():
            history = lines.get(agent, [])
            newest = history[-1] if history else None
            revoked = enrolled.status != ACTIVE
            if (
                newest is None
                or newest.public_key_pem != enrolled.public_key_pem
                or (newest.action == REVOKE) != revoked
                or not signed(newest)
            ):
                refused.append(agent)
                continue
            if revoked:
                found[agent] = VouchedKeys(current=None, revoked_key=newest.public_key_pem)
                continue
            keys = VouchedKeys(current=newest.public_key_pem)
            if newest.action == REPLACE and newest.previous_until is not None and len(history) >= 2:
                before = history[-2]
                if before.action != REVOKE and signed(before):
                    keys = VouchedKeys(
                        current=newest.public_key_pem,
                        previous=before.public_key_pem,
                        previous_until=newest.previous_until,
                        rotated_at=newest.valid_from,
                    )
            found[agent] = keys
        return found, sorted(refused)

    def revocation_list(self, now: datetime | None = None) -> RevocationList:
        """Return what the broker must refuse: revoked agents, and the certificates of replaced keys.

        A certificate recorded for an agent (by enrolment) before the agent's newest replace line is refused by
        its serial until it expires (the TLS handshake refuses it after that); a renewal (same key, new
        certificate) does not revoke the one it renews, which runs out on its own.
        """
        at = aware_utc(now or timefmt.now(), "now")
        with self.engine.connect() as conn:
            names = frozenset(conn.execute(select(_AGENTS.c.id).where(_AGENTS.c.status != ACTIVE)).scalars())
            replaced: dict[str, datetime] = {}
            for row in conn.execute(
                select(_AGENT_KEYS.c.agent_id, _AGENT_KEYS.c.valid_from)
                .where(_AGENT_KEYS.c.action == REPLACE)
                .order_by(_AGENT_KEYS.c.version)
            ):
                replaced[row.agent_id] = row.valid_from
            serials: dict[str, str] = {}
            if replaced and inspect(conn).has_table("agent_certificates"):
                for cert in conn.execute(select(_CERTIFICATES)):
                    since = replaced.get(cert.agent_id)
                    if cert.agent_id in names or since is None:
                        continue
                    issued, expires = aware_utc(cert.issued_at, "issued_at"), aware_utc(cert.not_after, "not_after")
                    if issued < since and expires > at:
                        serials[serial_text(int(cert.serial, 16))] = cert.agent_id
        return RevocationList(names, serials, issued_at=at)

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
            # Heartbeats may be handled by different workers out of order: keep the newest. One "older" by
            # more than any such reordering means the controller's clock stepped back: take it, or the fleet
            # view would show the heartbeat from before the step until the clock passed it again.
            last = _AGENTS.c.last_seen_at
            stmt = (
                update(_AGENTS)
                .where(_AGENTS.c.id == agent_id)
                .where(or_(last.is_(None), last <= seen, last > seen + HEARTBEAT_CLOCK_STEP))
                .values(**values)
            )
            return conn.execute(stmt).rowcount > 0

        return self.write(work)

    def list_agents(self) -> list[Agent]:
        """Return every registered agent, ordered by id."""
        return self.read(select(Agent).order_by(Agent.id))
