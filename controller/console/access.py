"""Who is looking at a console page, and what their role may see: the seam to controller/accounts.

controller/accounts/roles.py holds the role matrix and the `require(permission)` dependency. The console
asks it two things only, both here, so wiring it is one line each (`signed_in` and `may`); until then no
one is signed in and no role may anything (fail closed).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Protocol

from fastapi import Depends, HTTPException, status


class Viewer(Protocol):
    """What a page needs of the signed-in user (accounts' Actor has these)."""

    login: str
    display_name: str
    role: str


# The first screen of each role (docs/console.md): where /console/ sends someone after signing in.
ROLE_HOME: Final[dict[str, str]] = {
    "facility_manager": "/console/keys",
    "security": "/console/alerts",
    "it_admin": "/console/fleet",
    "auditor": "/console/inspection",
    "area_manager": "/console/areas",
}


def _nobody_signed_in() -> Viewer:
    # Replaced by accounts' session dependency; answering 401 sends the browser to the login page.
    raise HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail="not signed in")


def signed_in() -> Any:
    """Return the dependency for 'any signed-in console user' (wire: accounts' authenticated dependency)."""
    return Depends(_nobody_signed_in)


SignedInDep = Annotated[Viewer, signed_in()]


def may(role: str, permission: str) -> bool:
    """Tell whether a role holds a permission (wire: `role in MATRIX[Permission(permission)]`)."""
    return False


def home_of(viewer: Viewer) -> str:
    """Return the first screen of a signed-in user's role."""
    return ROLE_HOME.get(viewer.role, "/console/login")
