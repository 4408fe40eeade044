"""Who is looking at a console page, and what their role may see: the console's side of controller/accounts.

controller/accounts/roles.py holds the role matrix and the `require(permission)` dependency; every console
page depends on it (or is one of its PUBLIC_ROUTES), and the header shows only what the role may open.
"""

from __future__ import annotations

from typing import Annotated, Final

from sekisho.controller.accounts.roles import Actor, Permission, Role, allows, require

# The first screen of each role (docs/console.md): where /console/ sends someone after signing in.
ROLE_HOME: Final[dict[Role, str]] = {
    Role.FACILITY_MANAGER: "/console/keys",
    Role.SECURITY: "/console/alerts",
    Role.IT_ADMIN: "/console/fleet",
    Role.AUDITOR: "/console/inspection",
    Role.AREA_MANAGER: "/console/areas",
}

# Any signed-in console user (the start page, the language of one's own account).
SignedInDep = Annotated[Actor, require(Permission.CONSOLE_VIEW)]


def may(role: Role, permission: Permission) -> bool:
    """Tell whether a role holds a permission (the one role matrix decides)."""
    return allows(role, permission)


def home_of(actor: Actor) -> str:
    """Return the first screen of a signed-in user's role."""
    return ROLE_HOME.get(actor.role, "/console/login")
