"""FastAPI dependencies: the store, the ingest status, the accounts, and who is calling (optional)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, Request

from sekisho.controller.accounts.authn import identify
from sekisho.controller.accounts.roles import Actor
from sekisho.controller.accounts.service import AccountService, AccountSettings
from sekisho.controller.alerts.bell import Bell
from sekisho.controller.api.auth import ApiAuth
from sekisho.controller.config import ControllerConfig
from sekisho.controller.fleet.metrics import PublicationStats
from sekisho.controller.ingest.worker import IngestStats
from sekisho.controller.processes import ProcessReport
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
    # Rung by this process's alert engine when it changed alerts: live streams look at once (controller/alerts/bell.py).
    alert_bell: Bell = field(default_factory=Bell)
    # Who this process is and which background jobs it leads (/readyz's "process" check); None in tests' apps.
    process: ProcessReport | None = None
    # Legacy shared tokens and the failed-authentication limiter of this process, built from config.
    auth: ApiAuth = field(init=False)
    # Console users, sessions and per-user API tokens (in the store; times from clock).
    accounts: AccountService = field(init=False)

    def __post_init__(self) -> None:
        self.auth = ApiAuth.from_config(self.config)
        self.accounts = AccountService(self.store, AccountSettings.from_config(self.config), clock=lambda: self.clock())


def get_state(request: Request) -> AppState:
    """Return the application state."""
    state: AppState = request.app.state.sekisho
    return state


StateDep = Annotated[AppState, Depends(get_state)]

# Who may call which route is the role matrix's business (controller/accounts/roles.py: every route depends
# on require(Permission.…) or is listed in PUBLIC_ROUTES); this is for public routes that show more to
# whoever proves who they are (/readyz).
OptionalActorDep = Annotated[Actor | None, Depends(identify)]
