"""FastAPI dependencies: the store, the ingest status, and who is calling (bearer tokens with scopes)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sekisho.controller.api.auth import ApiAuth, Principal, Throttled, Unauthenticated, required_scope
from sekisho.controller.config import ControllerConfig
from sekisho.controller.fleet.metrics import PublicationStats
from sekisho.controller.ingest.worker import IngestStats
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """What the routers need, set once at start-up (no per-request globals)."""

    config: ControllerConfig
    store: Store
    ingest: IngestStats | None
    # Called after the API stored a new policy version (the running controller publishes it at once).
    on_policy_change: Callable[[], None] | None = None
    # Loaded once by create_app from config.signing_key; None if unreadable (policy writes then answer 503).
    signing_key: Ed25519PrivateKey | None = None
    # The policy keeper's publication counts (/metrics); None in a process that does not publish.
    publications: PublicationStats | None = None
    # The time agents' states are judged at (tests pass a controlled clock).
    clock: Callable[[], datetime] = timefmt.now
    # Tokens and the failed-authentication limiter of this process, built from config.
    auth: ApiAuth = field(init=False)

    def __post_init__(self) -> None:
        self.auth = ApiAuth.from_config(self.config)


def get_state(request: Request) -> AppState:
    """Return the application state."""
    state: AppState = request.app.state.sekisho
    return state


StateDep = Annotated[AppState, Depends(get_state)]
_bearer = HTTPBearer(auto_error=False)


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _where(request: Request) -> str:
    return f"{request.method} {request.url.path}"


def _client(request: Request) -> str | None:
    # uvicorn puts the X-Forwarded-For address here only for proxies in its forwarded_allow_ips (127.0.0.1).
    return request.client.host if request.client else None


def authorize(request: Request, state: StateDep, credentials: Credentials) -> Principal:
    """Return who is calling, refusing unless the token holds the scope this request's method needs.

    401 without a configured token, 403 for a read-only token on a write route, 429 (with Retry-After) from
    an address locked out after too many failed attempts. Dev profile without tokens (loopback): anyone.
    """
    offered = credentials.credentials if credentials else None
    try:
        principal = state.auth.authenticate(offered, _client(request), _where(request))
    except Throttled as err:
        raise HTTPException(
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            detail="too many failed authentications from this address; retry later",
            headers={"Retry-After": str(err.retry_after)},
        ) from err
    except Unauthenticated as err:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API token",
            headers={"WWW-Authenticate": "Bearer"},
        ) from err
    scope = required_scope(request.method)
    if not principal.may(scope):
        log.warning("API: %s refused on %s: needs the %s scope", principal.name, _where(request), scope)
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN, detail=f"this token lacks the {scope} scope {request.method} needs"
        )
    return principal


def identify(request: Request, state: StateDep, credentials: Credentials) -> Principal | None:
    """Return who is calling if a valid token came along, else None (for routes open to anyone, e.g. /readyz)."""
    offered = credentials.credentials if credentials else None
    return state.auth.identify(offered, _client(request), _where(request))


# Every /api router depends on AuthDep: the route's method decides the scope (auth.required_scope).
AuthDep = Depends(authorize)
PrincipalDep = Annotated[Principal, Depends(authorize)]
OptionalPrincipalDep = Annotated[Principal | None, Depends(identify)]
