"""Lend, return and revoke registered media; each loan change is a new policy version the terminals get at once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from sekisho.common.i18n import M_
from sekisho.controller.media.register import MediaRegister
from sekisho.controller.policy.service import PolicyService, carry_loans
from sekisho.controller.store.audit import SYSTEM, Operator
from sekisho.controller.store.models import LoanRecord
from sekisho.controller.store.policy import PolicyVersionConflict
from sekisho.controller.store.store import Store
from sekisho.protocol import mynumber, timefmt
from sekisho.protocol.policy import MediaLoan, Medium, SitePolicy

log = logging.getLogger(__name__)

JST = ZoneInfo("Asia/Tokyo")
APPROVER_ROLES = frozenset({"area_manager", "chief_officer"})
_ATTEMPTS = 5


class MediaError(ValueError):
    """A refused media action; the message says why (Japanese first, then English)."""


class MediaRefused(MediaError):
    """The request breaks a rule of the register (unknown medium, approver, person…): HTTP 422."""


class MediaConflict(MediaError):
    """The request collides with the register's state (medium already lent, loan already ended): HTTP 409."""


class LoanNotFound(MediaError, LookupError):
    """No loan with that id is in the register: HTTP 404."""


@dataclass(frozen=True)
class MediumStatus:
    """One line of the inventory: a registered medium, where it is and when a terminal last saw it."""

    medium: Medium
    state: str
    loan: LoanRecord | None
    overdue: bool
    last_seen_at: datetime | None
    last_seen_agent: str | None
    last_seen_type: str | None


def loan_state(loan: LoanRecord, now: datetime) -> str:
    """Name a loan's state: revoked, returned, reserved, overdue or on_loan."""
    if loan.revoked_at is not None:
        return "revoked"
    if loan.returned_at is not None:
        return "returned"
    if now < loan.starts_at:
        return "reserved"
    return "overdue" if now >= loan.ends_at else "on_loan"


def new_loan_id(register: MediaRegister, when: datetime) -> str:
    """Return the next readable loan id of the day (JST), e.g. loan-20261130-003."""
    prefix = f"loan-{when.astimezone(JST):%Y%m%d}-"
    taken = {r.id for r in register.list_loans(id_prefix=prefix)}
    n = len(taken) + 1
    while f"{prefix}{n:03d}" in taken:
        n += 1
    return f"{prefix}{n:03d}"


def refuse_my_numbers(**fields: Any) -> None:
    """Refuse admin input with a My-Number-like value in any field; the message names fields, never values."""
    found = [name for name, value in fields.items() if next(mynumber.find_my_numbers(value), None) is not None]
    if found:
        raise MediaRefused(
            M_(
                "%(fields)s: looks like a My Number (12 digits with a valid check digit); nothing recorded, value "
                "not shown",
                fields=", ".join(found),
            )
        )


def _aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise MediaRefused(M_("%(name)s needs a time zone", name=name))
    return moment.astimezone(UTC)


class MediaService:
    """The media loan register on top of the policy versions: validates, records, and re-versions the policy."""

    def __init__(
        self, store: Store, policy_service: PolicyService, *, clock: Callable[[], datetime] = timefmt.now
    ) -> None:
        """Keep the register in this store and change loans through this policy service; clock gives "now"."""
        self.store = store
        self.register = MediaRegister(store)
        self.policy = policy_service
        # The console passes the app's clock, so "overdue" and "due in the past" agree with its pages.
        self.clock = clock

    # --- reading -----------------------------------------------------------------------------------

    def _current(self) -> tuple[int, SitePolicy]:
        current = self.policy.current()
        if current is None:
            raise MediaRefused(M_("no site policy applied yet (sekisho policy apply)"))
        return current

    def loan(self, loan_id: str) -> LoanRecord:
        """Return one loan of the register or raise LoanNotFound."""
        refuse_my_numbers(loan=loan_id)  # the refusals below repeat the id
        found = self.register.get_loan(loan_id)
        if found is None:
            raise LoanNotFound(M_("no loan %(loan)s", loan=loan_id))
        return found

    def loans(
        self,
        *,
        active: bool = False,
        medium: str | None = None,
        person: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[LoanRecord]:
        """Return register loans by medium, person or period; active = not yet returned or revoked."""
        return self.register.list_loans(
            medium=medium, person=person, since=since, until=until, outstanding=True if active else None
        )

    def overdue(self, now: datetime | None = None) -> list[LoanRecord]:
        """Return loans past their end and neither returned nor revoked."""
        moment = _aware(now or self.clock(), "now")
        return [loan for loan in self.register.list_loans(outstanding=True) if loan.ends_at <= moment]

    def inventory(self, now: datetime | None = None) -> list[MediumStatus]:
        """Take stock (棚卸し): every registered medium, its current loan, overdue flag and last sighting."""
        moment = _aware(now or self.clock(), "now")
        current = self.policy.current()
        media = current[1].media if current else []
        outstanding = self.register.list_loans(outstanding=True)
        lines = []
        for medium in media:
            mine = [loan for loan in outstanding if loan.medium == medium.id]
            started = [loan for loan in mine if loan.starts_at <= moment]
            loan = started[0] if started else (mine[0] if mine else None)
            state = loan_state(loan, moment) if loan else "in_store"
            if medium.status != "active":
                state = medium.status
            seen = self.register.last_medium_sighting(medium.id)
            lines.append(
                MediumStatus(
                    medium=medium,
                    state=state,
                    loan=loan,
                    overdue=bool(loan and loan_state(loan, moment) == "overdue"),
                    last_seen_at=seen.occurred_at if seen else None,
                    last_seen_agent=seen.agent_id if seen else None,
                    last_seen_type=seen.type if seen else None,
                )
            )
        return lines

    # --- changing ----------------------------------------------------------------------------------

    def lend(
        self,
        medium: str,
        person: str,
        terminals: list[str],
        starts_at: datetime | None,
        ends_at: datetime,
        purpose: str,
        read_only: bool,
        approved_by: str,
        created_by: str,
        operator: Operator = SYSTEM,
    ) -> tuple[str, int]:
        """Lend a registered medium for named terminals and a window; return the loan id and new version.

        operator: who does it (CLI user, API caller), for the admin audit row written with the loan.
        """
        # First, before any refusal below repeats an input: the API and the CLI both come through here.
        refuse_my_numbers(
            medium=medium,
            person=person,
            terminals=terminals,
            purpose=purpose,
            approved_by=approved_by,
            recorded_by=created_by,
        )
        for attempt in range(1, _ATTEMPTS + 1):
            now = self.clock()
            start = _aware(starts_at, "starts_at") if starts_at else now
            end = _aware(ends_at, "ends_at")
            version, policy = self._current()
            self._check_lend(policy, medium, person, terminals, start, end, approved_by, now)
            loan_id = new_loan_id(self.register, now)
            try:
                loan = MediaLoan(
                    id=loan_id,
                    medium=medium,
                    person=person,
                    terminals=list(dict.fromkeys(terminals)),
                    starts_at=start,
                    ends_at=end,
                    purpose=purpose,
                    read_only=read_only,
                    approved_by=approved_by,
                )
            except ValidationError as err:
                raise MediaRefused(M_("invalid loan: %(problem)s", problem=_first_error(err))) from err
            document = self._with_loans(policy, [*carry_loans(policy.loans, now), loan])
            row = loan.model_dump(exclude={"returned_at"})
            try:
                stored = self.register.add_loan_version(
                    document,
                    base_version=version,
                    created_by=created_by,
                    comment=f"media lend {loan_id}: {medium} → {person}",
                    new_loan=row,
                    log=self._log(
                        "lend",
                        loan,
                        created_by,
                        {
                            "terminals": loan.terminals,
                            "purpose": purpose,
                            "starts_at": timefmt.fmt(start),
                            "ends_at": timefmt.fmt(end),
                            "read_only": read_only,
                            "approved_by": approved_by,
                        },
                    ),
                    at=now,
                    audit=operator.action(
                        "media.loan.create",
                        f"loan:{loan_id}",
                        new={
                            "medium": medium,
                            "person": person,
                            "terminals": loan.terminals,
                            "starts_at": timefmt.fmt(start),
                            "ends_at": timefmt.fmt(end),
                            "purpose": purpose,
                            "read_only": read_only,
                            "approved_by": approved_by,
                            "recorded_by": created_by,
                        },
                    ),
                )
            except PolicyVersionConflict:
                if attempt == _ATTEMPTS:
                    raise MediaConflict(M_("the policy kept changing; try again")) from None
                continue
            log.info("lent %s to %s as %s (policy version %d)", medium, person, loan_id, stored.version)
            return loan_id, stored.version
        raise AssertionError("unreachable")

    def return_medium(
        self,
        loan_id: str,
        returned_at: datetime | None = None,
        received_by: str = "",
        operator: Operator = SYSTEM,
    ) -> int:
        """Record that a lent medium came back; the loan ends in a new policy version, which is returned."""
        refuse_my_numbers(loan=loan_id, received_by=received_by)
        when = _aware(returned_at, "returned_at") if returned_at else None
        if when is not None and when > self.clock() + timedelta(minutes=5):
            raise MediaRefused(M_("returned_at lies in the future"))
        return self._end(loan_id, "return", received_by or "unknown", when, reason=None, operator=operator)

    def revoke(self, loan_id: str, reason: str, revoked_by: str = "", operator: Operator = SYSTEM) -> int:
        """End a loan early (e.g. the borrower left); terminals stop allowing the medium at once."""
        refuse_my_numbers(loan=loan_id, reason=reason, revoked_by=revoked_by)
        if not reason.strip():
            raise MediaRefused(M_("a reason is required to revoke a loan"))
        return self._end(loan_id, "revoke", revoked_by or "unknown", None, reason=reason.strip(), operator=operator)

    def check_overdue(self, now: datetime | None = None) -> list[int]:
        """Raise one media_loan_overdue finding per overdue loan (idempotent); return the new finding ids."""
        moment = _aware(now or self.clock(), "now")
        current = self.policy.current()
        agents = {t.id: t.agent for t in current[1].terminals} if current else {}
        created = []
        for loan in self.overdue(moment):
            if loan.overdue_finding_id is not None:
                continue
            detail = {
                "loan": loan.id,
                "medium": loan.medium,
                "person": loan.person,
                "terminals": loan.terminals,
                "due": timefmt.fmt(loan.ends_at),
            }
            # Findings belong to an agent: the first terminal's, or the controller's if it left the policy.
            agent = next((agents[t] for t in loan.terminals if t in agents), "controller")
            finding = self.register.open_overdue_finding(loan.id, agent_id=agent, detail=detail, at=moment)
            if finding is not None:
                log.warning("media loan %s overdue since %s (finding %d)", loan.id, loan.ends_at, finding)
                created.append(finding)
        return created

    # --- helpers -----------------------------------------------------------------------------------

    def _end(
        self,
        loan_id: str,
        action: str,
        actor: str,
        returned_at: datetime | None,
        reason: str | None,
        operator: Operator = SYSTEM,
    ) -> int:
        for attempt in range(1, _ATTEMPTS + 1):
            now = self.clock()
            record = self.loan(loan_id)
            if record.ended():
                if record.returned_at:
                    raise MediaConflict(M_("loan %(loan)s has already ended: it was returned", loan=loan_id))
                raise MediaConflict(M_("loan %(loan)s has already ended: it was revoked", loan=loan_id))
            version, policy = self._current()
            ended_at = returned_at or now
            loans = []
            for loan in carry_loans(policy.loans, now):
                loans.append(loan.model_copy(update={"returned_at": ended_at}) if loan.id == loan_id else loan)
            values: dict[str, Any] = (
                {"returned_at": ended_at, "received_by": actor}
                if action == "return"
                else {"revoked_at": ended_at, "revoke_reason": reason}
            )
            detail: dict[str, Any] = {"at": timefmt.fmt(ended_at)}
            if reason is not None:
                detail["reason"] = reason
            try:
                stored = self.register.add_loan_version(
                    self._with_loans(policy, loans),
                    base_version=version,
                    created_by=actor,
                    comment=f"media {action} {loan_id}",
                    end_loan=values,
                    log={
                        "action": action,
                        "loan_id": loan_id,
                        "medium": record.medium,
                        "person": record.person,
                        "actor": actor,
                        "detail": detail,
                    },
                    at=now,
                    audit=operator.action(
                        f"media.loan.{action}",
                        f"loan:{loan_id}",
                        old={"state": loan_state(record, now), "returned_at": None, "revoked_at": None},
                        new={key: timefmt.fmt(v) if isinstance(v, datetime) else v for key, v in values.items()},
                    ),
                )
            except PolicyVersionConflict:
                if attempt == _ATTEMPTS:
                    raise MediaConflict(M_("the policy kept changing; try again")) from None
                continue
            log.info("%s of loan %s recorded (policy version %d)", action, loan_id, stored.version)
            return stored.version
        raise AssertionError("unreachable")

    @staticmethod
    def _with_loans(policy: SitePolicy, loans: list[MediaLoan]) -> dict[str, Any]:
        doc = policy.model_dump(mode="json")
        doc["loans"] = [loan.model_dump(mode="json") for loan in loans]
        try:
            return SitePolicy.model_validate(doc).model_dump(mode="json")
        except ValidationError as err:
            raise MediaRefused(M_("the loan does not fit the policy: %(problem)s", problem=_first_error(err))) from err

    @staticmethod
    def _log(action: str, loan: MediaLoan, actor: str, detail: dict[str, Any]) -> dict[str, Any]:
        return {
            "action": action,
            "loan_id": loan.id,
            "medium": loan.medium,
            "person": loan.person,
            "actor": actor,
            "detail": detail,
        }

    def _check_lend(
        self,
        policy: SitePolicy,
        medium_id: str,
        person_id: str,
        terminals: list[str],
        start: datetime,
        end: datetime,
        approver_id: str,
        now: datetime,
    ) -> None:
        medium = next((m for m in policy.media if m.id == medium_id), None)
        if medium is None:
            raise MediaRefused(M_("medium %(medium)s is not registered", medium=medium_id))
        if medium.status != "active":
            raise MediaRefused(
                M_("medium %(medium)s cannot be lent: it is %(status)s", medium=medium_id, status=medium.status)
            )
        people = {p.id: p for p in policy.people}
        person = people.get(person_id)
        if person is None or not person.active:
            raise MediaRefused(M_("borrower %(person)s is unknown or inactive", person=person_id))
        if (person.valid_until and person.valid_until < end.astimezone(JST).date()) or (
            person.valid_from and person.valid_from > start.astimezone(JST).date()
        ):
            raise MediaRefused(M_("the loan window lies outside the validity of borrower %(person)s", person=person_id))
        if not terminals:
            raise MediaRefused(M_("name at least one terminal"))
        known = {t.id for t in policy.terminals}
        unknown = [t for t in terminals if t not in known]
        if unknown:
            raise MediaRefused(M_("unknown terminal(s): %(terminals)s", terminals=", ".join(unknown)))
        if approver_id == person_id:
            raise MediaRefused(M_("%(person)s cannot approve their own loan (separation of duties)", person=person_id))
        approver = people.get(approver_id)
        if approver is None or not approver.active or not APPROVER_ROLES & set(approver.roles):
            raise MediaRefused(
                M_("approver %(approver)s must be an active area_manager or chief_officer", approver=approver_id)
            )
        if end <= start:
            raise MediaRefused(M_("ends_at must be after starts_at"))
        if end <= now:
            raise MediaRefused(M_("ends_at lies in the past"))
        for other in self.register.list_loans(medium=medium_id, outstanding=True):
            # An unreturned loan past its end still holds the medium: it is out until someone receives it.
            other_end = other.ends_at if other.ends_at > now else datetime.max.replace(tzinfo=UTC)
            if other.starts_at < end and start < other_end:
                raise MediaConflict(
                    M_(
                        "medium %(medium)s is already lent as %(loan)s to %(person)s until %(until)s JST",
                        medium=medium_id,
                        loan=other.id,
                        person=other.person,
                        until=f"{other.ends_at.astimezone(JST):%Y-%m-%d %H:%M}",
                    )
                )


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
