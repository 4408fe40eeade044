"""The console's navigation as data: each page family adds its item, the header shows what a role may see."""

from __future__ import annotations

from dataclasses import dataclass

from sekisho.controller.accounts.roles import Permission, Role
from sekisho.controller.console.access import may
from sekisho.controller.console.i18n import N_


@dataclass(frozen=True)
class NavItem:
    """One entry of the header's navigation: where it goes, its label (a catalogue msgid), who sees it."""

    path: str
    label: str
    permission: Permission
    # False until the page family is built: the path then answers with a plain "not built yet" page.
    built: bool = False


# In the order they appear; the permission is the one the page itself requires (controller/accounts/roles.py).
NAV_ITEMS: list[NavItem] = [
    NavItem("/console/keys", N_("Keys out"), Permission.REGISTERS_READ),
    NavItem("/console/muster", N_("Who is inside"), Permission.AREAS_READ),
    NavItem("/console/alerts", N_("Alerts"), Permission.ALERTS_READ),
    NavItem("/console/incidents", N_("Incidents"), Permission.ALERTS_READ),
    NavItem("/console/fleet", N_("Fleet health"), Permission.FLEET_READ),
    NavItem("/console/inspection", N_("Inspection"), Permission.AUDIT_READ),
    NavItem("/console/areas", N_("My areas"), Permission.AREAS_READ),
]


def register(item: NavItem) -> None:
    """Add or replace (same path) a navigation item; a page family calls this when its router is added."""
    for index, existing in enumerate(NAV_ITEMS):
        if existing.path == item.path:
            NAV_ITEMS[index] = item
            return
    NAV_ITEMS.append(item)


def visible_to(role: Role | None) -> list[NavItem]:
    """Return the items a role may open (none before signing in)."""
    if role is None:
        return []
    return [item for item in NAV_ITEMS if may(role, item.permission)]


def unbuilt() -> list[NavItem]:
    """Return the items whose page family does not exist yet."""
    return [item for item in NAV_ITEMS if not item.built]
