"""Media register and loans: inventory, loan queries, and lend / return / revoke (each a new policy version).

A change stored here is published to the terminals at once by the running controller (``on_policy_change``);
without one, its policy keeper notices the new version within 5 s.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status

from sekisho.common.i18n import M_, message_of
from sekisho.controller.accounts.roles import Permission, require
from sekisho.controller.api.deps import AppState, StateDep
from sekisho.controller.api.schemas import (
    MediaLoanChange,
    MediaLoanCreate,
    MediaLoanPublic,
    MediaLoanReturn,
    MediaLoanRevoke,
    MediumPublic,
)
from sekisho.controller.audit.api import OperatorDep
from sekisho.controller.media.service import LoanNotFound, MediaConflict, MediaError, MediaService, loan_state
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store.models import LoanRecord
from sekisho.protocol import timefmt

log = logging.getLogger(__name__)

media = APIRouter(prefix="/api/v1/media", tags=["media"])
READ = [require(Permission.MEDIA_READ)]
LEND = [require(Permission.MEDIA_LEND)]


def _reading(state: AppState) -> MediaService:
    # Reading needs no key; PolicyService only signs in bundles(), which the reads never call.
    return MediaService(state.store, PolicyService(state.store, state.signing_key))  # type: ignore[arg-type]


def _writing(state: AppState) -> MediaService:
    if state.signing_key is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, M_("the controller's signing key is unavailable"))
    return MediaService(state.store, PolicyService(state.store, state.signing_key))


def _http_error(err: MediaError) -> HTTPException:
    # The service names fields, never values; the app's handler redacts the detail too and gives it in the
    # request's language (api/privacy.py), so the Message goes through as it is.
    detail = message_of(err)
    if isinstance(err, LoanNotFound):
        return HTTPException(status.HTTP_404_NOT_FOUND, detail)
    if isinstance(err, MediaConflict):
        return HTTPException(status.HTTP_409_CONFLICT, detail)
    return HTTPException(422, detail)


def _public(loan: LoanRecord, now: datetime) -> MediaLoanPublic:
    state = loan_state(loan, now)
    return MediaLoanPublic.model_validate(
        {
            **{c: getattr(loan, c) for c in MediaLoanPublic.model_fields if hasattr(loan, c)},
            "state": state,
            "overdue": state == "overdue",
        }
    )


def _changed(state: AppState, media_service: MediaService, loan_id: str, version: int) -> MediaLoanChange:
    if state.on_policy_change is not None:
        try:
            state.on_policy_change()
        except Exception:  # the keeper retries within 5 s; the loan is stored either way
            log.exception("immediate policy publication failed; the policy keeper retries")
    return MediaLoanChange(loan=_public(media_service.loan(loan_id), timefmt.now()), version=version)


@media.get("", response_model=list[MediumPublic], dependencies=READ)
def inventory(state: StateDep) -> list[MediumPublic]:
    """Take stock of every registered medium: status, current loan, overdue, last seen by a terminal."""
    now = timefmt.now()
    return [
        MediumPublic(
            id=line.medium.id,
            name=line.medium.name,
            kind=line.medium.kind,
            department=line.medium.department,
            status=line.medium.status,
            state=line.state,
            overdue=line.overdue,
            loan=_public(line.loan, now) if line.loan else None,
            last_seen_at=line.last_seen_at,
            last_seen_agent=line.last_seen_agent,
            last_seen_type=line.last_seen_type,
        )
        for line in _reading(state).inventory(now)
    ]


@media.get("/loans", response_model=list[MediaLoanPublic], dependencies=READ)
def list_loans(
    state: StateDep,
    active: bool = False,
    medium: Annotated[str | None, Query(max_length=64)] = None,
    person: Annotated[str | None, Query(max_length=64)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[MediaLoanPublic]:
    """List the loan register by medium, person or period (windows overlapping [since, until))."""
    now = timefmt.now()
    try:
        rows = _reading(state).loans(active=active, medium=medium, person=person, since=since, until=until)
    except ValueError as err:  # a naive since/until
        raise HTTPException(422, str(err)) from err
    return [_public(r, now) for r in rows]


@media.get("/loans/{loan_id}", response_model=MediaLoanPublic, dependencies=READ)
def get_loan(state: StateDep, loan_id: str) -> MediaLoanPublic:
    """Return one loan of the register."""
    try:
        return _public(_reading(state).loan(loan_id), timefmt.now())
    except MediaError as err:
        raise _http_error(err) from err


@media.post("/loans", response_model=MediaLoanChange, status_code=status.HTTP_201_CREATED, dependencies=LEND)
def lend(state: StateDep, body: MediaLoanCreate, operator: OperatorDep) -> MediaLoanChange:
    """Lend a registered medium; refusals answer 422 (rule broken) or 409 (medium already out)."""
    service = _writing(state)
    try:
        loan_id, version = service.lend(
            body.medium,
            body.person,
            body.terminals,
            body.starts_at,
            body.ends_at,
            body.purpose,
            body.read_only,
            body.approved_by,
            body.recorded_by,
            operator=operator,
        )
    except MediaError as err:
        raise _http_error(err) from err
    return _changed(state, service, loan_id, version)


@media.post("/loans/{loan_id}/return", response_model=MediaLoanChange, dependencies=LEND)
def return_medium(state: StateDep, loan_id: str, body: MediaLoanReturn, operator: OperatorDep) -> MediaLoanChange:
    """Record a medium's return; 409 if the loan already ended."""
    service = _writing(state)
    try:
        version = service.return_medium(loan_id, body.returned_at, body.received_by, operator=operator)
    except MediaError as err:
        raise _http_error(err) from err
    return _changed(state, service, loan_id, version)


@media.post("/loans/{loan_id}/revoke", response_model=MediaLoanChange, dependencies=LEND)
def revoke(state: StateDep, loan_id: str, body: MediaLoanRevoke, operator: OperatorDep) -> MediaLoanChange:
    """End a loan early; 409 if it already ended."""
    service = _writing(state)
    try:
        version = service.revoke(loan_id, body.reason, body.revoked_by, operator=operator)
    except MediaError as err:
        raise _http_error(err) from err
    return _changed(state, service, loan_id, version)
