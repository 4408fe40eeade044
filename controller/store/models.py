"""The controller's tables as typed SQLAlchemy models (the Alembic migrations mirror these)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so later migrations can refer to them on both backends.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-numbers an INTEGER PRIMARY KEY (the rowid alias); BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")

ZERO_HASH = "0" * 64


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware (SQLite has no zone, so store UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes and normalise to UTC (naive UTC for SQLite)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime whatever the driver or session time zone gave back."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every controller table."""

    metadata = MetaData(naming_convention=NAMING)


class Agent(Base):
    """An enrolled endpoint agent and its public signing key."""

    __tablename__ = "agents"
    __table_args__ = (CheckConstraint("status IN ('active', 'revoked')", name="status"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key_pem: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="active")
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    version: Mapped[str | None] = mapped_column(String(32))
    outbox_depth: Mapped[int | None] = mapped_column(BigInteger)
    clock_offset_ms: Mapped[int | None] = mapped_column(BigInteger)
    policy_version: Mapped[int | None] = mapped_column(BigInteger)
    last_heartbeat: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Event(Base):
    """One stored event: the signed wire bytes, their parsed columns and its place in the hash chain."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("agent_id", "seq"),
        UniqueConstraint("agent_id", "chain_index"),
        Index(None, "type", "occurred_at"),
        Index(None, "agent_id", "occurred_at"),
        Index(None, "person", "occurred_at"),
        Index(None, "account", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(64), ForeignKey("agents.id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(32), unique=True)
    type: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    stored_at: Mapped[datetime] = mapped_column(UTCDateTime)
    clock_synced: Mapped[bool] = mapped_column(Boolean)
    clock_offset_ms: Mapped[int | None] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    raw: Mapped[str] = mapped_column(Text)
    chain_index: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    # Copied from the payload at ingest (chain.subject_columns) so one person's events are read by index.
    person: Mapped[str | None] = mapped_column(String(64), nullable=True)
    account: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Stream(Base):
    """The head of one agent's hash chain and how far its sequence numbers are complete."""

    __tablename__ = "streams"

    agent_id: Mapped[str] = mapped_column(String(64), ForeignKey("agents.id"), primary_key=True)
    chain_length: Mapped[int] = mapped_column(BigInteger, default=0)
    head_hash: Mapped[str] = mapped_column(String(64), default=ZERO_HASH)
    max_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    contiguous_seq: Mapped[int] = mapped_column(BigInteger, default=0)


class AgentKey(Base):
    """One line of an agent's key history: registered, replaced or revoked, signed by the controller.

    Lines are only ever added. A key is valid from its line's valid_from until the agent's next line;
    a revoke line ends the validity of the key it names. See controller/store/checkpoints.py.
    """

    __tablename__ = "agent_keys"
    __table_args__ = (
        CheckConstraint("action IN ('register', 'replace', 'revoke')", name="action"),
        UniqueConstraint("agent_id", "version"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(64), ForeignKey("agents.id"))
    version: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))
    public_key_pem: Mapped[str] = mapped_column(Text)
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The controller's Ed25519 signature over the line; NULL only until the first seal after an upgrade.
    signature: Mapped[str | None] = mapped_column(Text)
    # On a replace line: events signed with the replaced key are accepted (and marked) when received before
    # this (the rotation's grace window, revision 0007). Signed with the line when set.
    previous_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Checkpoint(Base):
    """One entry of the controller-signed checkpoint log: a hash chain over everything the store seals.

    Entry n's body (canonical JSON) names the stream heads an ingest batch advanced, the dead-letter
    chain head, a key-history line, the admin audit trail's head, or, for the first entry (genesis), the
    whole state at the time.
    """

    __tablename__ = "checkpoints"
    __table_args__ = (
        CheckConstraint("kind IN ('genesis', 'ingest', 'agent_key', 'admin', 'records', 'records_seal')", name="kind"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    body: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    # NULL when written by a store opened without the controller's signing key (verify reports it).
    signature: Mapped[str | None] = mapped_column(Text)


class VerifiedPoint(Base):
    """How far a full walk from the start verified one chain (an agent's events, or the checkpoint log).

    Signed with the controller's signing key (the key that signs the checkpoint log), so a database writer
    without it cannot move a point forward or clear a problem. A console worker trusts a point whose
    signature verifies and whose record at chain_index still has hash, and walks only what follows
    (controller/reports/verify.py); the background walk refreshes the points. For the log, chain_index is
    the entry number and state is what the walked prefix says (the folded LogState), as JSON.
    """

    __tablename__ = "verified_points"
    __table_args__ = (CheckConstraint("kind IN ('agent', 'log')", name="kind"),)

    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    chain: Mapped[str] = mapped_column(String(64), primary_key=True)
    chain_index: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    log_entry: Mapped[int] = mapped_column(BigInteger)
    log_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str | None] = mapped_column(Text, nullable=True)
    problem: Mapped[str | None] = mapped_column(Text, nullable=True)
    verified_at: Mapped[datetime] = mapped_column(UTCDateTime)
    verified_by: Mapped[str] = mapped_column(String(200))
    signature: Mapped[str] = mapped_column(Text)


class DeadLetter(Base):
    """A message that could not be stored as an event, kept (redacted) with the reason, in one hash chain."""

    __tablename__ = "dead_letters"
    __table_args__ = (UniqueConstraint("chain_index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    topic: Mapped[str] = mapped_column(Text)
    # Free text, not the agents key: the agent may be unknown or the id itself malformed.
    agent_id: Mapped[str | None] = mapped_column(Text)
    seq: Mapped[int | None] = mapped_column(BigInteger)
    event_id: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    # HMAC-SHA256 of the bytes that arrived, keyed from the controller's signing key (redaction.letter_mac);
    # NULL when the store had no key. Never a plain digest: that would confirm guesses of a redacted value.
    payload_mac: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    chain_index: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class Finding(Base):
    """Something the controller noticed and an operator may need to act on (e.g. a sequence gap)."""

    __tablename__ = "findings"
    __table_args__ = (Index(None, "agent_id", "kind", "first_seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    agent_id: Mapped[str | None] = mapped_column(String(64))
    first_seq: Mapped[int | None] = mapped_column(BigInteger)
    last_seq: Mapped[int | None] = mapped_column(BigInteger)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resolution: Mapped[str | None] = mapped_column(Text)


class PolicyVersion(Base):
    """One published version of the site policy document."""

    __tablename__ = "policy_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    source_sha256: Mapped[str] = mapped_column(String(64))
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    comment: Mapped[str] = mapped_column(Text, default="")


class IssuedCommand(Base):
    """A signed command the controller sent to an agent (kept to audit it and refuse nonce reuse)."""

    __tablename__ = "issued_commands"
    __table_args__ = (Index(None, "agent_id", "issued_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    args: Mapped[dict[str, Any]] = mapped_column(JSON)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    nonce: Mapped[str] = mapped_column(String(64), unique=True)


class LoanRecord(Base):
    """A medium loan as the 貸出記録 register keeps it, long after it has left the policy bundles."""

    __tablename__ = "media_loans"
    __table_args__ = (
        Index(None, "medium", "starts_at"),
        Index(None, "person", "starts_at"),
        # The media-loan register newest first (revision 0010).
        Index(None, "starts_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    medium: Mapped[str] = mapped_column(String(64))
    person: Mapped[str] = mapped_column(String(64))
    terminals: Mapped[list[str]] = mapped_column(JSON)
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime)
    purpose: Mapped[str] = mapped_column(Text)
    read_only: Mapped[bool] = mapped_column(Boolean)
    approved_by: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lent_version: Mapped[int] = mapped_column(Integer)
    returned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    received_by: Mapped[str | None] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoke_reason: Mapped[str | None] = mapped_column(Text)
    ended_version: Mapped[int | None] = mapped_column(Integer)
    overdue_finding_id: Mapped[int | None] = mapped_column(BigInteger)

    def ended(self) -> bool:
        """Tell whether the loan was returned or revoked."""
        return self.returned_at is not None or self.revoked_at is not None


class LoanLogEntry(Base):
    """One append-only line of the loan log: who lent, returned or revoked which loan, when, in which version."""

    __tablename__ = "media_loan_log"
    __table_args__ = (
        CheckConstraint("action IN ('lend', 'return', 'revoke')", name="action"),
        Index(None, "loan_id"),
        Index(None, "medium", "at"),
        Index(None, "person", "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    action: Mapped[str] = mapped_column(String(16))
    loan_id: Mapped[str] = mapped_column(String(64), ForeignKey("media_loans.id"))
    medium: Mapped[str] = mapped_column(String(64))
    person: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


# --- door registers (controller.doors): derived from the events table, rebuilt by `sekisho doors rebuild` ----------


class ProjectionCursor(Base):
    """How far a projection has read the events table (the last events.id it applied)."""

    __tablename__ = "projection_cursors"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class KeyLoan(Base):
    """One line of the key-lending register (鍵貸出管理簿): a key taken from a cabinet slot and its return.

    The id is the events.id of the event that opened the line (the key.taken, or a lone key.returned),
    so a rebuild from the events gives every line its old id back.
    """

    __tablename__ = "key_loans"
    __table_args__ = (
        Index(None, "cabinet", "key", "taken_at"),
        Index(None, "person", "taken_at"),
        Index(None, "returned_at", "due_at"),
        # Register pages (revision 0010): keys out newest first, returned newest first, a person's returns.
        Index(None, "returned_at", "taken_at"),
        Index(None, "returned_by", "returned_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    agent_id: Mapped[str] = mapped_column(String(64))
    cabinet: Mapped[str] = mapped_column(String(64))
    slot: Mapped[int | None] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(64))
    person: Mapped[str | None] = mapped_column(String(64))
    taken_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    returned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    returned_by: Mapped[str | None] = mapped_column(String(64))
    returned_slot: Mapped[int | None] = mapped_column(Integer)
    wrong_slot: Mapped[bool] = mapped_column(Boolean, default=False)
    return_only: Mapped[bool] = mapped_column(Boolean, default=False)
    taken_event_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    returned_event_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    overdue_finding_id: Mapped[int | None] = mapped_column(BigInteger)


class DoorLogEntry(Base):
    """One door event of interest (grant, denial, opening, closing, alarm, unlock, mode change); id = events.id."""

    __tablename__ = "door_log"
    __table_args__ = (
        Index(None, "door", "occurred_at"),
        Index(None, "door_kind", "occurred_at"),
        Index(None, "person", "occurred_at"),
        Index(None, "occurred_at"),
        # Area filter and area timeline (revision 0010).
        Index(None, "area", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(32), unique=True)
    agent_id: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    door: Mapped[str] = mapped_column(String(64))
    door_kind: Mapped[str | None] = mapped_column(String(16))
    area: Mapped[str | None] = mapped_column(String(64))
    person: Mapped[str | None] = mapped_column(String(64))
    card_masked: Mapped[str | None] = mapped_column(String(32))
    reader: Mapped[str | None] = mapped_column(String(64))
    direction: Mapped[str | None] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(String(200))
    detail: Mapped[str | None] = mapped_column(Text)
    visitor: Mapped[bool] = mapped_column(Boolean, default=False)
    escort: Mapped[str | None] = mapped_column(String(64))
    second_person: Mapped[str | None] = mapped_column(String(64))
    slot: Mapped[int | None] = mapped_column(Integer)
    passback: Mapped[bool] = mapped_column(Boolean, default=False)


class AreaPresence(Base):
    """Where one person is in one area: inside since entered_at, or out since exited_at (its latest movement)."""

    __tablename__ = "area_presence"
    __table_args__ = (Index(None, "area", "inside"),)

    area: Mapped[str] = mapped_column(String(64), primary_key=True)
    person: Mapped[str] = mapped_column(String(64), primary_key=True)
    inside: Mapped[bool] = mapped_column(Boolean)
    entered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    exited_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    door: Mapped[str] = mapped_column(String(64))
    visitor: Mapped[bool] = mapped_column(Boolean, default=False)
    escort: Mapped[str | None] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(32))


class Visit(Base):
    """One visit of the visitor log (来訪者記録): a visitor, the escort, the area, in and out; id = events.id."""

    __tablename__ = "visits"
    __table_args__ = (
        Index(None, "visitor", "entered_at"),
        Index(None, "area", "exited_at"),
        Index(None, "entered_at"),
        # An escort's visits (revision 0010).
        Index(None, "escort", "entered_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    agent_id: Mapped[str] = mapped_column(String(64))
    visitor: Mapped[str] = mapped_column(String(64))
    escort: Mapped[str | None] = mapped_column(String(64))
    area: Mapped[str] = mapped_column(String(64))
    entered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    exited_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    doors: Mapped[list[str]] = mapped_column(JSON)
    entry_event_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    exit_event_id: Mapped[str | None] = mapped_column(String(32), unique=True)


class EnrolToken(Base):
    """A one-time (or few-times) enrolment token: only the SHA-256 of its secret is kept (controller/fleet)."""

    __tablename__ = "enrol_tokens"
    __table_args__ = (
        CheckConstraint("kind IN ('terminal', 'door')", name="kind"),
        CheckConstraint("uses_left >= 0", name="uses_left"),
    )

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    # Set: the device must enrol under this name; with reenrol it may replace the agent of that name.
    name: Mapped[str | None] = mapped_column(String(64))
    reenrol: Mapped[bool] = mapped_column(Boolean, default=False)
    uses: Mapped[int] = mapped_column(Integer)
    uses_left: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EnrolRefusal(Base):
    """One refused enrolment or renewal, with its reason (reuse, expired, wrong kind, unknown token, clone…)."""

    __tablename__ = "enrol_refusals"
    __table_args__ = (Index(None, "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str] = mapped_column(String(32))
    token_id: Mapped[str | None] = mapped_column(String(16))
    kind: Mapped[str | None] = mapped_column(String(16))
    # Free text, not the agents key: the name asked for may be taken, reserved or malformed.
    name: Mapped[str | None] = mapped_column(String(64))
    machine_id_sha256: Mapped[str | None] = mapped_column(String(64))
    client: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)


class FleetDevice(Base):
    """How an agent was enrolled: its kind and the hash of its machine-id (to notice a cloned machine)."""

    __tablename__ = "fleet_devices"
    __table_args__ = (Index(None, "machine_id_sha256"),)

    agent_id: Mapped[str] = mapped_column(String(64), ForeignKey("agents.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    machine_id_sha256: Mapped[str] = mapped_column(String(64))
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime)
    token_id: Mapped[str | None] = mapped_column(String(16))


class AgentCertificate(Base):
    """A TLS client certificate the controller issued to an agent (enrolment or renewal)."""

    __tablename__ = "agent_certificates"
    __table_args__ = (
        CheckConstraint("via IN ('enrol', 'renew')", name="via"),
        Index(None, "agent_id", "issued_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(64), ForeignKey("agents.id"))
    serial: Mapped[str] = mapped_column(String(40), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    issuer_sha256: Mapped[str] = mapped_column(String(64))
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[datetime] = mapped_column(UTCDateTime)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    via: Mapped[str] = mapped_column(String(8))


class AdminAuditEntry(Base):
    """One admin change, export or remote command: who, when, from where, what, old → new (issue 12).

    The rows form one hash chain (controller/store/audit.py) sealed by the signed checkpoint log, like the
    dead letters; `records verify` names a row edited, deleted or inserted in the database.
    """

    __tablename__ = "admin_audit"
    __table_args__ = (
        UniqueConstraint("chain_index"),
        CheckConstraint("via IN ('web', 'api', 'cli', 'system')", name="via"),
        Index(None, "at"),
        Index(None, "actor", "at"),
        Index(None, "action", "at"),
        Index(None, "target", "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    # "user:<login>", "token:<login>/<name>", "cli:<os-user>@<host>" or "system".
    actor: Mapped[str] = mapped_column(String(200))
    via: Mapped[str] = mapped_column(String(8))
    client: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(Text)
    old: Mapped[Any] = mapped_column(JSON, nullable=True)
    new: Mapped[Any] = mapped_column(JSON, nullable=True)
    detail: Mapped[Any] = mapped_column(JSON, nullable=True)
    chain_index: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class ConsoleUser(Base):
    """A person who signs in to the console or holds API tokens: name (kanji) with reading, role, areas."""

    __tablename__ = "console_users"
    __table_args__ = (
        CheckConstraint("role IN ('it_admin', 'facility_manager', 'security', 'auditor', 'area_manager')", name="role"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128))
    kana: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(32))
    # Area managers see only these areas; empty for every other role (they see the whole site).
    areas: Mapped[list[str]] = mapped_column(JSON)
    language: Mapped[str] = mapped_column(String(8), default="ja")
    password_hash: Mapped[str] = mapped_column(String(255))
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Base32 TOTP secret (RFC 6238) once enrolled; the last accepted time step refuses a replayed code.
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    totp_enrolled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ConsoleSession(Base):
    """A signed-in browser: only the SHA-256 of the random session id in its cookie is kept."""

    __tablename__ = "console_sessions"
    __table_args__ = (Index(None, "user_id"),)

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("console_users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    client: Mapped[str | None] = mapped_column(String(64))


class ConsoleApiToken(Base):
    """A user's API token: acts with the user's role and areas; only the SHA-256 of the secret is kept."""

    __tablename__ = "console_api_tokens"
    __table_args__ = (Index(None, "user_id"), UniqueConstraint("user_id", "name"))

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("console_users.id"))
    name: Mapped[str] = mapped_column(String(64))
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_client: Mapped[str | None] = mapped_column(String(64))


class LoginAttempt(Base):
    """One console sign-in attempt and its outcome (ok, bad_password, locked_out, refused_locked, …)."""

    __tablename__ = "console_login_attempts"
    __table_args__ = (Index(None, "login", "at"), Index(None, "client", "at"), Index(None, "at"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    # As typed (bounded, My-Number-redacted): an unknown login is recorded too, it is what an attacker tried.
    login: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int | None] = mapped_column(BigInteger)
    # The client key (IPv4 address or IPv6 /64) failures are counted under.
    client: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(String(255))


class ControllerProcess(Base):
    """One running controller process (serve or ingest) as it last reported itself: `sekisho controller status`.

    Written by the process every process_beat_s and deleted when it stops cleanly; a process that died keeps
    its last row, and the age of beat_at says so.
    """

    __tablename__ = "controller_processes"

    worker_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    beat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ready: Mapped[bool] = mapped_column(Boolean)
    # The background jobs this process leads at beat_at (names of their locks).
    leads: Mapped[list[str]] = mapped_column(JSON)
    # Ingest counters at beat_at: connected, stored, waiting, dead_lettered.
    ingest: Mapped[dict[str, Any]] = mapped_column(JSON)


class MusterCheck(Base):
    """A "confirmed safe" tick on the muster list (controller/reports/muster.py): one person, one area, one stay.

    entered_at is the entry time of the stay it confirms: after a new entry the tick no longer counts.
    """

    __tablename__ = "muster_checks"

    area: Mapped[str] = mapped_column(String(64), primary_key=True)
    person: Mapped[str] = mapped_column(String(64), primary_key=True)
    entered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    checked_by: Mapped[str] = mapped_column(String(200))
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Alert(Base):
    """An alert for security staff (issue 13): one per rule and subject while it lives, repeats counted.

    ``open_key`` is the dedup key while the alert is not resolved and NULL after, so the unique constraint lets
    any number of workers raise the same condition at once and still get one live alert. Lifecycle transitions
    go into the admin audit trail (actions ``alert.*``), which `records verify` checks.
    """

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("open_key"),
        CheckConstraint("state IN ('open', 'acknowledged', 'resolved')", name="state"),
        CheckConstraint("condition IN ('active', 'cleared', 'none')", name="condition"),
        CheckConstraint("severity IN ('critical', 'high', 'medium', 'low')", name="severity"),
        Index(None, "state", "severity", "last_at"),
        Index(None, "updated_at"),
        Index(None, "esc_next_at"),
        Index(None, "dedup_key", "resolved_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(48))
    dedup_key: Mapped[str] = mapped_column(String(400))
    open_key: Mapped[str | None] = mapped_column(String(400))
    severity: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16))
    condition: Mapped[str] = mapped_column(String(8))
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    count: Mapped[int] = mapped_column(BigInteger)
    first_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_at: Mapped[datetime] = mapped_column(UTCDateTime)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    cleared_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    acked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    acked_by: Mapped[str | None] = mapped_column(String(200))
    ack_comment: Mapped[str | None] = mapped_column(Text)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resolved_by: Mapped[str | None] = mapped_column(String(200))
    resolution: Mapped[str | None] = mapped_column(Text)
    cause: Mapped[str | None] = mapped_column(String(32))
    override: Mapped[str | None] = mapped_column(Text)
    silenced_by: Mapped[int | None] = mapped_column(BigInteger)
    inhibited_by: Mapped[str | None] = mapped_column(String(400))
    escalation: Mapped[str | None] = mapped_column(String(64))
    # The escalation chain's run: started at, restarted (re-trigger) count, the last step done, the next due.
    esc_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    esc_epoch: Mapped[int] = mapped_column(Integer, default=0)
    esc_round: Mapped[int | None] = mapped_column(Integer)
    esc_step: Mapped[int | None] = mapped_column(Integer)
    esc_next_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retrigger_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column(BigInteger, default=1)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AlertEvent(Base):
    """An event behind an alert (the first ones of a group; the alert's count says how many in all)."""

    __tablename__ = "alert_events"

    alert_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("alerts.id"), primary_key=True)
    event_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class AlertSilence(Base):
    """A silence or maintenance window: matching alerts are recorded but notify nobody (who, why, until when)."""

    __tablename__ = "alert_silences"
    __table_args__ = (
        CheckConstraint("kind IN ('silence', 'maintenance')", name="kind"),
        Index(None, "ends_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    rule: Mapped[str | None] = mapped_column(String(48))
    matchers: Mapped[dict[str, Any]] = mapped_column(JSON)
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_by: Mapped[str | None] = mapped_column(String(200))


class AlertNotification(Base):
    """One notification to one recipient on one channel: the durable outbox the delivery job drains.

    The unique key makes an escalation step's notifications exactly-once per (alert, chain run, position,
    recipient) however many workers run the step or how often a restarted controller retries it.
    """

    __tablename__ = "alert_notifications"
    __table_args__ = (
        UniqueConstraint("alert_id", "kind", "epoch", "round", "step", "channel", "target"),
        CheckConstraint("state IN ('pending', 'sent', 'dead', 'cancelled')", name="state"),
        CheckConstraint("channel IN ('email', 'webhook', 'syslog')", name="channel"),
        Index(None, "state", "next_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("alerts.id"))
    kind: Mapped[str] = mapped_column(String(16))
    epoch: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(8))
    target: Mapped[str] = mapped_column(String(254))
    contact: Mapped[str | None] = mapped_column(String(64))
    language: Mapped[str] = mapped_column(String(2))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    next_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class Incident(Base):
    """A draft incident report (漏えい等事案) built from alerts: the facts a PPC breach report asks for (issue 13).

    Edited in the console by security staff; every change is a row of the admin trail with old → new, so the
    report's history is as tamper-evident as the alerts it came from.
    """

    __tablename__ = "incidents"
    __table_args__ = (
        CheckConstraint("status IN ('draft', 'preliminary', 'final', 'closed')", name="status"),
        Index(None, "status", "found_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    found_at: Mapped[datetime] = mapped_column(UTCDateTime)
    occurred_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    malicious: Mapped[bool] = mapped_column(Boolean, default=False)
    # The report's items (個人情報保護委員会への報告事項), free text checked by the My Number guard.
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    people_count: Mapped[int | None] = mapped_column(BigInteger)
    evidence: Mapped[list[Any]] = mapped_column(JSON)
    preliminary_reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    final_reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_by: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column(BigInteger, default=1)


class IncidentAlert(Base):
    """An alert an incident report was built from (its related events and timelines are one click away)."""

    __tablename__ = "incident_alerts"

    incident_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("incidents.id"), primary_key=True)
    alert_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("alerts.id"), primary_key=True)


class RecordLogEntry(Base):
    """One change of a tracked row (policy version, issued command, media loan, loan log line), chained (issue 14).

    Each tracked table is one ``stream`` of this log: the row's key and the digest of its content after the
    change, hash-chained per stream and sealed by the signed checkpoint log (controller/store/record_log.py).
    """

    __tablename__ = "record_log"
    __table_args__ = (
        UniqueConstraint("stream", "chain_index"),
        CheckConstraint("op IN ('seal', 'insert', 'update')", name="op"),
        Index(None, "stream", "row_key"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    stream: Mapped[str] = mapped_column(String(32))
    chain_index: Mapped[int] = mapped_column(BigInteger)
    row_key: Mapped[str] = mapped_column(String(128))
    op: Mapped[str] = mapped_column(String(8))
    digest: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
