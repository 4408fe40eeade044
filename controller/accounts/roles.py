"""The role matrix: which role may do what, for every page and every API route (issue 12).

``MATRIX`` is the one table that decides. A route states what it needs with ``require(Permission.X)``
(a FastAPI dependency returning the authenticated ``Actor``); a route without one must be listed in
``PUBLIC_ROUTES`` — ``routes_without_a_rule(app)`` names every route that is neither, and a test fails on
any (tests/test_role_matrix.py), so a new route cannot be added without deciding who may use it.

Each permission is a read, a write (changes something on the site or in its records) or self-service
(a signed-in person's own password, sign-out, language: open to every role, auditors included, because
it changes nothing of the site). The auditor holds no write permission: checked at import.
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import Mount

from sekisho.common.i18n import M_, N_


class Role(StrEnum):
    """What a console user is, as stored in console_users.role."""

    IT_ADMIN = "it_admin"  # 情報システム
    FACILITY_MANAGER = "facility_manager"  # 総務・施設管理
    SECURITY = "security"  # 警備・情報セキュリティ
    AUDITOR = "auditor"  # 監査 (read-only)
    AREA_MANAGER = "area_manager"  # 区域責任者 (own areas only)


# Catalogue msgids: shown with _() (or gettext(lang, …)) where they are printed.
ROLE_LABELS: dict[Role, str] = {
    Role.IT_ADMIN: N_("IT admin"),
    Role.FACILITY_MANAGER: N_("facility manager"),
    Role.SECURITY: N_("security staff"),
    Role.AUDITOR: N_("auditor (read-only)"),
    Role.AREA_MANAGER: N_("area manager"),
}

# Roles that must have a second factor (TOTP) before they may sign in to the console.
ADMIN_ROLES = frozenset({Role.IT_ADMIN, Role.SECURITY})


def parse_role(text: str) -> Role:
    """Return the role named by text (it-admin, it_admin, IT_ADMIN …); ValueError for anything else."""
    try:
        return Role(text.strip().lower().replace("-", "_"))
    except ValueError:
        choices = ", ".join(r.value.replace("_", "-") for r in Role)
        raise ValueError(
            M_("unknown role %(role)s (choose from %(choices)s)", role=repr(text), choices=choices)
        ) from None


class Permission(StrEnum):
    """A named thing a role may do; routes and pages ask for exactly one."""

    CONSOLE_VIEW = "console.view"
    ACCOUNT_SELF = "account.self"
    RECORDS_READ = "records.read"
    ALERTS_READ = "alerts.read"
    ALERTS_ACK = "alerts.ack"
    HEALTH_READ = "health.read"
    FLEET_READ = "fleet.read"
    FLEET_ADMIN = "fleet.admin"
    REGISTERS_READ = "registers.read"
    AREAS_READ = "areas.read"
    REGISTERS_EXPORT = "registers.export"
    KEYS_LEND = "keys.lend"
    MUSTER_CONFIRM = "muster.confirm"
    MEDIA_READ = "media.read"
    MEDIA_LEND = "media.lend"
    MEDIA_ADMIN = "media.admin"
    DOORS_COMMAND = "doors.command"
    POLICY_READ = "policy.read"
    POLICY_ADMIN = "policy.admin"
    USERS_READ = "users.read"
    USERS_ADMIN = "users.admin"
    AUDIT_READ = "audit.read"
    REVIEWS_SIGNOFF = "reviews.signoff"


Kind = Literal["read", "write", "self"]

IT, FM, SEC, AUD, AM = Role.IT_ADMIN, Role.FACILITY_MANAGER, Role.SECURITY, Role.AUDITOR, Role.AREA_MANAGER
EVERYONE = frozenset(Role)

# (kind, roles, what it covers). One line per permission: the table docs/console.md prints.
_TABLE: dict[Permission, tuple[Kind, frozenset[Role], str]] = {
    Permission.CONSOLE_VIEW: ("read", EVERYONE, "the console's home page"),
    Permission.ACCOUNT_SELF: ("self", EVERYONE, "own password, sign-out, language"),
    Permission.RECORDS_READ: ("read", frozenset({IT, SEC, AUD}), "raw events and dead letters"),
    Permission.ALERTS_READ: ("read", frozenset({IT, FM, SEC, AUD}), "findings and alerts"),
    Permission.ALERTS_ACK: ("write", frozenset({IT, SEC}), "acknowledge and resolve alerts"),
    Permission.HEALTH_READ: ("read", frozenset({IT, SEC, AUD}), "/readyz detail and /metrics"),
    Permission.FLEET_READ: ("read", frozenset({IT, SEC, AUD}), "agents, their health, the revocation list"),
    Permission.FLEET_ADMIN: ("write", frozenset({IT}), "enrol, revoke and re-key agents"),
    Permission.REGISTERS_READ: ("read", frozenset({IT, FM, SEC, AUD}), "site-wide registers (keys, door log)"),
    Permission.AREAS_READ: ("read", EVERYONE, "area registers (presence, visits); area managers their own"),
    Permission.REGISTERS_EXPORT: ("read", EVERYONE, "CSV/PDF exports (area managers: their areas)"),
    Permission.KEYS_LEND: ("write", frozenset({FM}), "lend and return plain keys at the counter"),
    Permission.MUSTER_CONFIRM: ("write", frozenset({FM, SEC}), "tick 'confirmed safe' on the muster list"),
    Permission.MEDIA_READ: ("read", frozenset({IT, FM, SEC, AUD}), "media register and loans"),
    Permission.MEDIA_LEND: ("write", frozenset({IT, FM}), "lend, return and revoke media loans"),
    Permission.MEDIA_ADMIN: ("write", frozenset({IT}), "register and retire media"),
    Permission.DOORS_COMMAND: ("write", frozenset({FM, SEC}), "remote unlock and lock-down"),
    Permission.POLICY_READ: ("read", frozenset({IT, FM, SEC, AUD}), "the site policy and its versions"),
    Permission.POLICY_ADMIN: ("write", frozenset({IT}), "change and publish the site policy"),
    Permission.USERS_READ: ("read", frozenset({IT, AUD}), "console users, roles and API tokens"),
    Permission.USERS_ADMIN: ("write", frozenset({IT}), "create users, set roles, issue API tokens"),
    Permission.AUDIT_READ: ("read", frozenset({IT, SEC, AUD}), "the admin audit trail"),
    Permission.REVIEWS_SIGNOFF: ("write", frozenset({FM, AM}), "sign off a monthly review"),
}

MATRIX: dict[Permission, frozenset[Role]] = {p: roles for p, (_, roles, _) in _TABLE.items()}
KIND: dict[Permission, Kind] = {p: kind for p, (kind, _, _) in _TABLE.items()}
DESCRIPTION: dict[Permission, str] = {p: what for p, (_, _, what) in _TABLE.items()}
WRITE_PERMISSIONS = frozenset(p for p, kind in KIND.items() if kind == "write")

if set(MATRIX) != set(Permission):  # pragma: no cover - a programming error, caught at import
    raise RuntimeError(f"permissions without a rule: {sorted(set(Permission) - set(MATRIX))}")
if any(AUD in MATRIX[p] for p in WRITE_PERMISSIONS):  # pragma: no cover
    raise RuntimeError("the auditor role must never hold a write permission")


def allows(role: Role, permission: Permission) -> bool:
    """Tell whether the role holds the permission."""
    return role in MATRIX[permission]


Via = Literal["session", "token", "cli", "dev"]


@dataclass(frozen=True)
class Actor:
    """Who is acting: a console user (session or API token), a legacy service token, the CLI or dev mode.

    ``areas`` is None for every role but the area manager, whose queries are limited to these areas.
    """

    user_id: int | None
    login: str
    display_name: str
    role: Role
    areas: frozenset[str] | None
    via: Via
    client: str | None = None
    # The SHA-256 of the session id (via "session"): password change ends every other session.
    session_sha256: str | None = None
    # The API token's id (via "token" with a per-user token); legacy tokens have none.
    token_id: str | None = None

    @property
    def audit_name(self) -> str:
        """Return the actor string of the admin audit trail.

        user:<login> (a console session), token:<login>/<token id> (a user's personal API token, so a leaked
        token's actions can be told apart), token:<name> (a legacy service token), cli:… or dev:….
        """
        if self.via == "cli":
            return f"cli:{self.login}"
        if self.via == "dev":
            return "dev:loopback"
        if self.user_id is None:
            return f"token:{self.login}"
        if self.via == "token" and self.token_id:
            return f"token:{self.login}/{self.token_id}"
        return f"user:{self.login}"

    def may(self, permission: Permission) -> bool:
        """Tell whether this actor's role holds the permission."""
        return allows(self.role, permission)

    def sees_area(self, area: str) -> bool:
        """Tell whether this actor may see records of the area."""
        return self.areas is None or area in self.areas

    @classmethod
    def cli(cls) -> Actor:
        """Return the actor of a `sekisho` command run on the controller host (whoever can read its config)."""
        who = f"{getpass.getuser()}@{socket.gethostname()}"
        return cls(None, who, who, Role.IT_ADMIN, None, "cli")


# Routes anyone may call. Devices enrol with a one-time token and renew with their registered key (never a
# user); load balancers probe health; the sign-in page must be reachable signed out. Nothing else.
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/healthz"),
        ("GET", "/readyz"),  # status only; the detail needs health.read (controller/api/app.py)
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/oauth2-redirect"),
        ("GET", "/redoc"),
        ("GET", "/api/v1/enrol/ca"),
        ("POST", "/api/v1/enrol"),
        ("POST", "/api/v1/enrol/renew"),
        ("GET", "/console/login"),
        ("POST", "/console/login"),
        ("GET", "/console/lang/{lang}"),  # the language switch works on the sign-in page too
    }
)
# Mounted static files (CSS, htmx) are public too; nothing else may be mounted without a rule.
PUBLIC_MOUNTS: frozenset[str] = frozenset({"/console/static", "/static"})

PERMISSION_ATTRIBUTE = "sekisho_permission"


def require(permission: Permission) -> Any:
    """Return a FastAPI dependency that authenticates the caller and refuses it unless its role may do this.

    Session callers also need the CSRF token on every state-changing request. The dependency returns the
    ``Actor``; 401 without valid credentials, 403 for a role without the permission or a bad CSRF token,
    429 from an address locked out after failed authentications.
    """
    from sekisho.controller.accounts.authn import authorize_request

    async def dependency(request: Request) -> Actor:
        return await authorize_request(request, permission)

    setattr(dependency, PERMISSION_ATTRIBUTE, permission)
    dependency.__name__ = f"require_{permission.value.replace('.', '_')}"
    return Depends(dependency)


def _permission_of(dependant: Any) -> Permission | None:
    stack = list(dependant.dependencies) if dependant is not None else []
    while stack:
        dependant = stack.pop()
        found = getattr(dependant.call, PERMISSION_ATTRIBUTE, None)
        if isinstance(found, Permission):
            return found
        stack.extend(dependant.dependencies)
    return None


@dataclass(frozen=True)
class Operation:
    """One method of one route as the app serves it (router prefixes and dependencies applied)."""

    method: str
    path: str
    permission: Permission | None
    kind: Literal["api", "mount", "other"]


def operations(app: FastAPI) -> Iterator[Operation]:
    """Yield every (method, path) the app serves with the permission it requires (None: no rule)."""
    # FastAPI keeps included routers as one entry of app.routes each; iter_route_contexts walks into them
    # with the prefix and the router-level dependencies applied.
    for context in iter_route_contexts(app.routes):
        original = context.original_route
        if isinstance(original, APIRoute):
            permission = _permission_of(context.dependant)
            for method in sorted(context.methods or ()):
                yield Operation(method, str(context.path), permission, "api")
        elif isinstance(original, Mount):
            yield Operation("*", str(context.path), None, "mount")
        else:
            for method in sorted(getattr(original, "methods", None) or {"*"}):
                yield Operation(method, str(context.path), None, "other")


def routes_without_a_rule(app: FastAPI) -> list[str]:
    """Name every route that neither requires a permission nor is public (it must get one or the other)."""
    missing: list[str] = []
    for op in operations(app):
        if op.method == "HEAD" or op.permission is not None or (op.method, op.path) in PUBLIC_ROUTES:
            continue
        if op.kind == "mount" and op.path in PUBLIC_MOUNTS:
            continue
        missing.append(f"{op.method} {op.path}")
    return missing


def all_routes_have_a_rule(app: FastAPI) -> bool:
    """Tell whether every route of the app requires a permission or is listed as public."""
    return not routes_without_a_rule(app)
