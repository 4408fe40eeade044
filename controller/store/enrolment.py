"""Enrolment records: one-time tokens, refusals, enrolled devices and the certificates issued to agents.

A token is claimed, the agent registered (with its controller-signed key line, through the same path as
`register-agent`), its device noted and its certificate recorded in one transaction: a refused or failed
enrolment leaves the token's uses as they were, and two devices presenting the same one-use token at once
cannot both get in (the claim is a conditional UPDATE of ``uses_left``; the loser finds 0 rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from sqlalchemy import Connection, Table, delete, desc, insert, select, update

from sekisho.controller.store.agents import ACTIVE, check_registrable, register_agent_in
from sekisho.controller.store.audit import AdminAction, Operator, append_admin
from sekisho.controller.store.checkpoints import CheckpointRecords
from sekisho.controller.store.models import Agent, AgentCertificate, EnrolRefusal, EnrolToken, FleetDevice
from sekisho.controller.store.records import aware_utc

_TOKENS = cast(Table, EnrolToken.__table__)
_REFUSALS = cast(Table, EnrolRefusal.__table__)
_DEVICES = cast(Table, FleetDevice.__table__)
_CERTS = cast(Table, AgentCertificate.__table__)
_AGENTS = cast(Table, Agent.__table__)


class Reason(StrEnum):
    """Why an enrolment or renewal was refused (enrol_refusals.reason), stable for scripts and alerts."""

    UNKNOWN_TOKEN = "unknown_token"  # noqa: S105 (a reason code, not a secret)
    TOKEN_REVOKED = "token_revoked"  # noqa: S105 (a reason code, not a secret)
    TOKEN_EXPIRED = "token_expired"  # noqa: S105 (a reason code, not a secret)
    TOKEN_USED = "token_used"  # noqa: S105 (a reason code, not a secret)
    WRONG_KIND = "wrong_kind"
    NAME_REQUIRED = "name_required"
    NAME_MISMATCH = "name_mismatch"
    BAD_NAME = "bad_name"
    DUPLICATE_NAME = "duplicate_name"
    CLONE = "clone"
    BAD_REQUEST = "bad_request"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_AGENT = "unknown_agent"
    UNKNOWN_CERTIFICATE = "unknown_certificate"
    CERTIFICATE_EXPIRED = "certificate_expired"
    SAME_KEY = "same_key"


Issue = Callable[[str], x509.Certificate]


class EnrolRefused(Exception):
    """An enrolment or renewal that must not go ahead; reason is one of the codes above."""

    def __init__(self, reason: str, message: str, *, token_id: str | None = None, name: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.token_id = token_id
        self.name = name


@dataclass(frozen=True)
class Enrolled:
    """What an enrolment wrote: the agent, the key line's action and the certificate issued."""

    agent_id: str
    kind: str
    action: str | None
    certificate: x509.Certificate
    token_id: str


def cert_sha256(cert: x509.Certificate) -> str:
    """Return a certificate's SHA-256 fingerprint as hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _record_cert(
    conn: Connection, agent_id: str, cert: x509.Certificate, issuer_sha256: str, via: str, now: datetime
) -> None:
    conn.execute(
        insert(_CERTS).values(
            agent_id=agent_id,
            serial=format(cert.serial_number, "x"),
            sha256=cert_sha256(cert),
            issuer_sha256=issuer_sha256,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            issued_at=now,
            via=via,
        )
    )


class EnrolmentRecords(CheckpointRecords):
    """The enrolment tables; enrol() and renew() also register agents and record certificates."""

    # --- tokens -------------------------------------------------------------------------------------

    def add_token(self, token: EnrolToken, *, audit: AdminAction | None = None) -> None:
        """Store a new token (only the hash of its secret is in it); audit: its admin audit row, same transaction."""
        if audit is not None:
            self._ensure_sealed()

        def work(conn: Connection) -> None:
            conn.execute(
                insert(_TOKENS).values(
                    {c.name: getattr(token, c.name) for c in _TOKENS.columns if getattr(token, c.name) is not None}
                )
            )
            if audit is not None:
                append_admin(conn, self.signing_key, audit, token.created_at)

        self.write(work)

    def list_tokens(self) -> list[EnrolToken]:
        """Return every token, newest first."""
        return self.read(select(EnrolToken).order_by(desc(EnrolToken.created_at), EnrolToken.id))

    def revoke_token(self, token_id: str, when: datetime, *, operator: Operator | None = None) -> bool:
        """Revoke a token so it can no longer be used; False if there is no such token (or it is revoked).

        operator: who did it; an admin audit row (fleet.token.revoke) is written with the change.
        """
        at = aware_utc(when, "when")
        stmt = update(_TOKENS).where(_TOKENS.c.id == token_id, _TOKENS.c.revoked_at.is_(None)).values(revoked_at=at)
        if operator is not None:
            self._ensure_sealed()

        def work(conn: Connection) -> bool:
            if conn.execute(stmt).rowcount == 0:
                return False
            if operator is not None:
                entry = operator.action(
                    "fleet.token.revoke", f"token:{token_id}", old={"revoked_at": None}, new={"revoked_at": at}
                )
                append_admin(conn, self.signing_key, entry, at)
            return True

        return self.write(work)

    def agent_exists(self, agent_id: str) -> bool:
        """Tell whether an agent of this name is registered (active or revoked)."""
        with self.engine.connect() as conn:
            return conn.execute(select(_AGENTS.c.id).where(_AGENTS.c.id == agent_id)).first() is not None

    # --- refusals -----------------------------------------------------------------------------------

    def record_refusal(
        self,
        reason: str,
        detail: str,
        *,
        at: datetime,
        token_id: str | None = None,
        kind: str | None = None,
        name: str | None = None,
        machine_id_sha256: str | None = None,
        client: str | None = None,
    ) -> None:
        """Record one refused enrolment or renewal with its reason."""
        values = {
            "at": aware_utc(at, "at"),
            "reason": reason[:32],
            "token_id": token_id,
            "kind": kind[:16] if kind else None,
            "name": name[:64] if name else None,
            "machine_id_sha256": machine_id_sha256,
            "client": client[:64] if client else None,
            "detail": detail[:500],
        }
        self.write(lambda conn: conn.execute(insert(_REFUSALS).values(values)))

    def list_refusals(self, limit: int = 100) -> list[EnrolRefusal]:
        """Return the latest refusals, newest first."""
        return self.read(select(EnrolRefusal).order_by(desc(EnrolRefusal.id)).limit(limit))

    # --- enrolment ----------------------------------------------------------------------------------

    def enrol(
        self,
        *,
        secret_sha256: str,
        kind: str,
        name: str | None,
        machine_id_sha256: str,
        public_key_pem: str,
        now: datetime,
        check_name: Callable[[str], None],
        issue: Issue,
        issuer_sha256: str,
        key_grace: timedelta | None = None,
    ) -> Enrolled:
        """Claim a token, register the agent, note its device and record its certificate, all or nothing.

        Raises EnrolRefused (nothing written) with the reason: unknown, revoked, expired or used-up token,
        wrong kind, a name missing, different from the token's, invalid or taken, or a machine-id already
        enrolled under another active agent (a cloned machine).
        """
        now = aware_utc(now, "now")
        self._ensure_sealed()

        def work(conn: Connection) -> Enrolled:
            token = conn.execute(select(_TOKENS).where(_TOKENS.c.secret_sha256 == secret_sha256)).first()
            if token is None:
                raise EnrolRefused(Reason.UNKNOWN_TOKEN, "unknown enrolment token", name=name)

            def refuse(reason: str, message: str, who: str | None = name) -> EnrolRefused:
                return EnrolRefused(reason, message, token_id=token.id, name=who)

            if token.revoked_at is not None:
                raise refuse(Reason.TOKEN_REVOKED, "this enrolment token was revoked")
            if aware_utc(token.expires_at, "expires_at") <= now:
                raise refuse(Reason.TOKEN_EXPIRED, "this enrolment token has expired: ask for a new one")
            if token.uses_left <= 0:
                raise refuse(Reason.TOKEN_USED, "this enrolment token has been used already: ask for a new one")
            if token.kind != kind:
                raise refuse(Reason.WRONG_KIND, f"this token enrols a {token.kind}, not a {kind}")
            if token.name and name and token.name != name:
                raise refuse(Reason.NAME_MISMATCH, f"this token enrols {token.name!r}, not {name!r}")
            agent_id = token.name or name
            if not agent_id:
                raise refuse(Reason.NAME_REQUIRED, "this token names no agent: give the device a name (--name)")
            try:
                check_name(agent_id)
                check_registrable(agent_id, public_key_pem)
            except ValueError as err:
                raise refuse(Reason.BAD_NAME, str(err), agent_id) from err
            existing = conn.execute(select(_AGENTS.c.status).where(_AGENTS.c.id == agent_id)).first()
            if existing is not None and not token.reenrol:
                raise refuse(
                    Reason.DUPLICATE_NAME,
                    f"an agent named {agent_id!r} is already enrolled: to replace it, enrol with a token made by "
                    f"`sekisho fleet token create --reenrol {agent_id}`",
                    agent_id,
                )
            clone = conn.execute(
                select(_DEVICES.c.agent_id)
                .join(_AGENTS, _AGENTS.c.id == _DEVICES.c.agent_id)
                .where(
                    _DEVICES.c.machine_id_sha256 == machine_id_sha256,
                    _DEVICES.c.agent_id != agent_id,
                    _AGENTS.c.status == ACTIVE,
                )
                .limit(1)
            ).first()
            if clone is not None:
                raise refuse(
                    Reason.CLONE,
                    f"this machine (same machine-id) is already enrolled as {clone.agent_id!r}: a cloned disk or VM "
                    "image must get its own machine-id (systemd-machine-id-setup) before it enrols; to move "
                    f"{clone.agent_id!r} here, use a --reenrol {clone.agent_id} token",
                    agent_id,
                )
            # The claim: only one of two concurrent requests finds a use left (the other updates 0 rows).
            claimed = conn.execute(
                update(_TOKENS)
                .where(_TOKENS.c.id == token.id, _TOKENS.c.uses_left > 0, _TOKENS.c.revoked_at.is_(None))
                .values(uses_left=_TOKENS.c.uses_left - 1, last_used_at=now)
            ).rowcount
            if claimed != 1:
                raise refuse(Reason.TOKEN_USED, "this enrolment token has been used already: ask for a new one")
            action = register_agent_in(
                conn,
                self.signing_key,
                agent_id,
                public_key_pem,
                replace=bool(token.reenrol),
                when=now,
                key_grace=key_grace,
            )
            conn.execute(delete(_DEVICES).where(_DEVICES.c.agent_id == agent_id))
            conn.execute(
                insert(_DEVICES).values(
                    agent_id=agent_id,
                    kind=kind,
                    machine_id_sha256=machine_id_sha256,
                    enrolled_at=now,
                    token_id=token.id,
                )
            )
            cert = issue(agent_id)
            _record_cert(conn, agent_id, cert, issuer_sha256, "enrol", now)
            return Enrolled(agent_id=agent_id, kind=kind, action=action, certificate=cert, token_id=token.id)

        return self.write(work)

    # --- renewal ------------------------------------------------------------------------------------

    def renew(
        self, *, agent_id: str, current_sha256: str, now: datetime, issue: Issue, issuer_sha256: str
    ) -> x509.Certificate:
        """Issue and record a new certificate for an active agent that shows an unexpired one of its own.

        The certificate shown must be one this controller issued to the agent since its current key was
        registered (so a re-enrolled agent's old device cannot renew), and must not have expired: an agent
        offline past expiry re-enrols with a token for its name. The caller has checked the request's
        signature against the agent's registered key.
        """
        now = aware_utc(now, "now")

        def work(conn: Connection) -> x509.Certificate:
            agent = conn.execute(
                select(_AGENTS.c.status, _AGENTS.c.registered_at).where(_AGENTS.c.id == agent_id)
            ).first()
            if agent is None or agent.status != ACTIVE:
                raise EnrolRefused(
                    Reason.UNKNOWN_AGENT, f"agent {agent_id!r} is not enrolled or is revoked", name=agent_id
                )
            shown = conn.execute(
                select(_CERTS.c.not_after, _CERTS.c.issued_at).where(
                    _CERTS.c.agent_id == agent_id, _CERTS.c.sha256 == current_sha256
                )
            ).first()
            registered = aware_utc(agent.registered_at, "registered_at")
            if shown is None or aware_utc(shown.issued_at, "issued_at") < registered:
                raise EnrolRefused(
                    Reason.UNKNOWN_CERTIFICATE,
                    "the certificate shown is not this agent's current one: re-enrol with a token for its name",
                    name=agent_id,
                )
            if aware_utc(shown.not_after, "not_after") <= now:
                raise EnrolRefused(
                    Reason.CERTIFICATE_EXPIRED,
                    "the certificate has expired: re-enrol with `sekisho fleet token create --reenrol NAME`",
                    name=agent_id,
                )
            cert = issue(agent_id)
            _record_cert(conn, agent_id, cert, issuer_sha256, "renew", now)
            return cert

        return self.write(work)

    def certificates(self, agent_id: str) -> list[AgentCertificate]:
        """Return the certificates issued to an agent, oldest first."""
        return self.read(
            select(AgentCertificate).where(AgentCertificate.agent_id == agent_id).order_by(AgentCertificate.id)
        )

    def device(self, agent_id: str) -> FleetDevice | None:
        """Return how an agent was enrolled, if it was."""
        found = self.read(select(FleetDevice).where(FleetDevice.agent_id == agent_id))
        return found[0] if found else None
