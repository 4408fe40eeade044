"""Who is calling: a request becomes an ``Actor`` from a bearer token, a session cookie, or the open dev mode.

Order: a bearer token (a user's ``skt_…`` token, else a legacy ``api_tokens``/``api_read_tokens`` entry)
wins over a cookie; then the ``sekisho_session`` cookie; then, in the dev profile without legacy tokens and
before the first console user exists, anyone on loopback (config.py allows that profile on loopback only).

Bearer failures (wrong or, on the API, missing tokens) count against the client address in
``ApiAuth.limiter`` exactly as before accounts existed. A stale session cookie does not: session ids are
256 random bits (nothing to guess), and a browser keeps sending the cookie of a session that ended.

CSRF: a session-authenticated request with any method but GET/HEAD/OPTIONS must carry the session's CSRF
token in the ``X-CSRF-Token`` header or the ``csrf_token`` form field. The token is an HMAC of the raw
session id, so it is per session, needs no storage, and cannot be made without the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from typing import TYPE_CHECKING

from fastapi import HTTPException, Request, status
from starlette.concurrency import run_in_threadpool

from sekisho.common.i18n import M_
from sekisho.controller.accounts.roles import Actor, Permission, Role
from sekisho.controller.api.auth import Principal, Scope, client_key

if TYPE_CHECKING:
    from sekisho.controller.api.deps import AppState

log = logging.getLogger(__name__)

SESSION_COOKIE = "sekisho_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEV_ACTOR = Actor(None, "dev", "dev profile (loopback, no users yet)", Role.IT_ADMIN, None, "dev")
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


class LoginRequired(HTTPException):
    """401 for a request without valid credentials; console pages turn it into a redirect to the sign-in page."""

    def __init__(self, detail: str, *, bearer: bool) -> None:
        super().__init__(
            status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"} if bearer else None
        )


def csrf_token(session_id: str) -> str:
    """Return the CSRF token of a session (an HMAC keyed by the raw session id)."""
    mac = hmac.new(session_id.encode(), b"sekisho console csrf v1", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.sekisho
    return state


def _host(request: Request) -> str | None:
    # uvicorn puts the X-Forwarded-For address here only for proxies in its forwarded_allow_ips (127.0.0.1).
    return request.client.host if request.client else None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def legacy_actor(principal: Principal, host: str | None) -> Actor:
    """Map a legacy shared token to a service actor: api_tokens → it_admin, api_read_tokens → auditor."""
    role = Role.IT_ADMIN if principal.may(Scope.WRITE) else Role.AUDITOR
    return Actor(None, principal.name, f"service token {principal.name}", role, None, "token", host)


def _api_path(request: Request) -> bool:
    return not request.url.path.startswith("/console")


async def _open_dev(state: AppState) -> bool:
    if not state.auth.open_dev:
        return False
    return not await run_in_threadpool(state.accounts.any_user)


async def _from_bearer(state: AppState, offered: str, host: str | None, where: str) -> Actor:
    client = client_key(host)
    wait = state.auth.limiter.retry_after(client)
    if wait is not None:
        raise HTTPException(
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            detail="too many failed authentications from this address; retry later",
            headers={"Retry-After": str(wait)},
        )
    actor = await run_in_threadpool(state.accounts.token_actor, offered, host) if offered else None
    if actor is None and offered:
        principal = state.auth.lookup(offered)
        actor = legacy_actor(principal, host) if principal is not None else None
    if actor is None:
        state.auth.limiter.failed(client, f"{'wrong' if offered else 'no'} token on {where}")
        raise LoginRequired("missing or invalid API token", bearer=True)
    return actor


async def authenticate(request: Request) -> Actor:
    """Return who is calling, or raise 401 (LoginRequired) or 429 (an address locked out)."""
    state = _state(request)
    host = _host(request)
    where = f"{request.method} {request.url.path}"
    if await _open_dev(state):
        return DEV_ACTOR
    offered = _bearer(request)
    if offered is not None:
        return await _from_bearer(state, offered, host, where)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        actor = await run_in_threadpool(state.accounts.session_actor, cookie, host)
        if actor is not None:
            return actor
        raise LoginRequired(
            M_("the session has ended; sign in again"),
            bearer=_api_path(request),
        )
    if _api_path(request):
        # As before accounts: a missing token on the API counts as a failed attempt of this address.
        return await _from_bearer(state, "", host, where)
    raise LoginRequired(M_("sign in first"), bearer=False)


async def identify(request: Request) -> Actor | None:
    """Return who is calling if valid credentials came along, else None; never refuses (e.g. /readyz)."""
    state = _state(request)
    if await _open_dev(state):
        return DEV_ACTOR
    if _bearer(request) is None and not request.cookies.get(SESSION_COOKIE):
        return None  # no credentials is no failure here
    try:
        return await authenticate(request)
    except HTTPException:
        return None


async def check_csrf(request: Request) -> None:
    """Refuse (403) a session's state-changing request without its CSRF token (header or form field)."""
    session_id = request.cookies.get(SESSION_COOKIE, "")
    offered = request.headers.get(CSRF_HEADER)
    if offered is None and request.headers.get("content-type", "").startswith(_FORMS):
        value = (await request.form()).get(CSRF_FIELD)
        offered = value if isinstance(value, str) else None
    expected = csrf_token(session_id)
    if not offered or not hmac.compare_digest(offered.encode(), expected.encode()):
        log.warning("console: %s %s refused: %s CSRF token", request.method, request.url.path,
                    "wrong" if offered else "no")  # fmt: skip
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            M_("missing or invalid CSRF token; reload the page"),
        )


async def authorize_request(request: Request, permission: Permission) -> Actor:
    """Authenticate the caller, refuse it (403) unless its role holds the permission, and check CSRF."""
    actor = await authenticate(request)
    if not actor.may(permission):
        log.warning("%s (%s) refused on %s %s: needs %s", actor.audit_name, actor.role.value, request.method,
                    request.url.path, permission.value)  # fmt: skip
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            M_(
                "the role %(role)s lacks the permission %(permission)s",
                role=actor.role.value,
                permission=permission.value,
            ),
        )
    if actor.via == "session" and request.method.upper() not in SAFE_METHODS:
        await check_csrf(request)
    request.state.actor = actor
    return actor
