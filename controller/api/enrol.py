"""/api/v1/enrol: devices enrol with a one-time token and renew their certificates (no API token needed).

These routes sit outside the bearer-token routers on purpose: a device has no API token, it proves itself
with the enrolment token's secret (enrolment) or its registered Ed25519 key (renewal); see
controller/fleet/enrol_service.py. Failed proofs count against the client address like failed API tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from fastapi import APIRouter, HTTPException, Request, Response, status
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from sekisho.controller.api.auth import client_key
from sekisho.controller.api.deps import AppState, StateDep
from sekisho.controller.fleet.enrol_service import EnrolmentService, EnrolmentUnavailable
from sekisho.controller.store.enrolment import EnrolRefused, Reason
from sekisho.protocol import enrolment

log = logging.getLogger(__name__)

enrol = APIRouter(prefix="/api/v1/enrol", tags=["enrolment"])

# Refusals that mean "this caller could not prove anything": counted like a wrong API token.
_FAILED_PROOF = frozenset({Reason.UNKNOWN_TOKEN, Reason.BAD_REQUEST, Reason.BAD_SIGNATURE, Reason.UNKNOWN_AGENT})
# Everything else is a genuine device told why (used, expired, wrong kind, duplicate, clone…).
_CONFLICTS = frozenset({Reason.DUPLICATE_NAME, Reason.CLONE})

A = TypeVar("A", bound=BaseModel)


def enrolment_service(request: Request, state: AppState) -> EnrolmentService:
    """Return the app's enrolment service, made on first use with the state's clock."""
    # One service per app: it caches the CA files it read.
    service: EnrolmentService | None = getattr(request.app.state, "enrolment", None)
    if service is None:
        service = EnrolmentService(state.config, state.store, clock=state.clock)
        request.app.state.enrolment = service
    return service


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


async def _body(request: Request) -> bytes:
    # Read at most the largest request there is: an endless body is refused, not buffered.
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > enrolment.MAX_REQUEST_BYTES):
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "request too large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > enrolment.MAX_REQUEST_BYTES:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "request too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _refused(err: EnrolRefused) -> HTTPException:
    code = status.HTTP_409_CONFLICT if err.reason in _CONFLICTS else status.HTTP_403_FORBIDDEN
    if err.reason == Reason.BAD_REQUEST:
        code = status.HTTP_400_BAD_REQUEST
    return HTTPException(code, enrolment.Refusal(reason=err.reason, message=err.message).model_dump())


async def _handle(request: Request, state: AppState, work: Callable[[EnrolmentService, bytes, str | None], A]) -> A:
    client = _client(request)
    key = client_key(client)
    wait = state.auth.limiter.retry_after(key)
    if wait is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "too many failed attempts from this address; retry later",
            headers={"Retry-After": str(wait)},
        )
    raw = await _body(request)
    service = enrolment_service(request, state)
    try:
        return await run_in_threadpool(work, service, raw, client)
    except EnrolmentUnavailable as err:
        log.error("enrolment unavailable: %s", err)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "enrolment is not available on this controller"
        ) from err
    except EnrolRefused as err:
        log.warning("%s refused from %s: %s (%s)", request.url.path, client, err.reason, err.message)
        if err.reason in _FAILED_PROOF:
            state.auth.limiter.failed(key, f"{err.reason} on POST {request.url.path}")
        raise _refused(err) from err


@enrol.get("/ca")
def enrol_ca(request: Request, state: StateDep) -> Response:
    """Return the CA that signed this API's HTTPS certificate (devices check it against their token)."""
    try:
        pem = enrolment_service(request, state).api_ca_pem
    except EnrolmentUnavailable as err:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "enrolment is not available on this controller"
        ) from err
    return Response(pem, media_type="application/x-pem-file")


@enrol.post("", response_model=enrolment.EnrolAnswer)
async def enrol_device(request: Request, state: StateDep) -> enrolment.EnrolAnswer:
    """Enrol a device: token, CSR and signing key in a request signed with that key (protocol/enrolment.py)."""
    return await _handle(request, state, lambda s, raw, client: s.enrol(raw, client))


@enrol.post("/renew", response_model=enrolment.RenewAnswer)
async def renew_certificate(request: Request, state: StateDep) -> enrolment.RenewAnswer:
    """Renew an agent's certificate: a CSR for a new key, signed with the agent's registered Ed25519 key."""
    return await _handle(request, state, lambda s, raw, client: s.renew(raw, client))
