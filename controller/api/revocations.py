"""`GET /api/v1/fleet/revocations`: the controller-signed revocation list, for brokers on other hosts.

`sekisho fleet revocations sync` on the broker host fetches it (a token with fleet.read, e.g. an auditor's,
is enough), checks the controller's signature and writes the file the broker's plugin enforces
(controller/fleet/revocations.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status

from sekisho.controller.accounts.roles import Permission, require
from sekisho.controller.api.deps import StateDep
from sekisho.protocol.revocations import sign_list

revocations = APIRouter(prefix="/api/v1/fleet", tags=["fleet"], dependencies=[require(Permission.FLEET_READ)])


@revocations.get("/revocations")
def signed_revocations(state: StateDep) -> dict[str, Any]:
    """Return the revoked agents and certificate serials, signed with the controller's key."""
    if state.signing_key is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the controller's signing key is unreadable")
    return sign_list(state.signing_key, state.store.revocation_list())
