"""FastAPI dependency giving a route the operator of the request, for its admin audit rows."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from sekisho.common.i18n import M_
from sekisho.controller.audit.operators import api_operator
from sekisho.controller.store.audit import Operator

log = logging.getLogger(__name__)


def request_operator(request: Request) -> Operator:
    """Return who makes this request and from where, as the route's permission check authenticated it.

    The accounts layer's ``require(...)`` (a route or router dependency, run before this one) leaves the
    authenticated actor on the request. A route that changes something without it is refused: an admin
    change nobody can be named for is not made.
    """
    actor = getattr(request.state, "actor", None)
    if actor is None:
        log.error("admin change on %s %s without an authenticated actor: refused", request.method, request.url.path)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, M_("authentication required"))
    return api_operator(actor, request.client.host if request.client else None)


OperatorDep = Annotated[Operator, Depends(request_operator)]
