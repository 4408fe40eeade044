"""FastAPI dependencies: the store, the ingest status and bearer-token authentication."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sekisho.controller.config import ControllerConfig
from sekisho.controller.ingest.worker import IngestStats
from sekisho.controller.store.store import Store


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


def get_state(request: Request) -> AppState:
    """Return the application state."""
    state: AppState = request.app.state.sekisho
    return state


StateDep = Annotated[AppState, Depends(get_state)]
_bearer = HTTPBearer(auto_error=False)


def require_token(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Refuse the request unless it carries one of the configured API tokens (dev profile: optional)."""
    tokens = [t.get_secret_value() for t in state.config.api_tokens]
    if not tokens and state.config.profile == "dev":
        return
    offered = credentials.credentials if credentials else ""
    # Compare against every token in constant time so timing reveals nothing about which is close.
    if not any(hmac.compare_digest(offered.encode(), t.encode()) for t in tokens):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API token",
            headers={"WWW-Authenticate": "Bearer"},
        )


AuthDep = Depends(require_token)
