"""The controller's HTTP API: health, readiness, OpenAPI, and read-only records."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Response, status
from sqlalchemy import text

from sekisho.common.i18n import _
from sekisho.controller.accounts.roles import Permission, require
from sekisho.controller.accounts.web import accounts_router
from sekisho.controller.api import privacy
from sekisho.controller.api.alerts import alerts
from sekisho.controller.api.deps import AppState, OptionalActorDep, StateDep
from sekisho.controller.api.doors import routers as door_routers
from sekisho.controller.api.enrol import enrol
from sekisho.controller.api.incidents import incidents_api
from sekisho.controller.api.media import media
from sekisho.controller.api.metrics import metrics
from sekisho.controller.api.revocations import revocations
from sekisho.controller.api.schemas import DeadLetterPublic, EventPage, EventPublic, FindingPublic, Health
from sekisho.controller.console import web as console
from sekisho.controller.fleet.health import AgentHealth, Thresholds, fleet_health
from sekisho.controller.fleet.metrics import controller_registry
from sekisho.protocol import signing

log = logging.getLogger(__name__)

health = APIRouter(tags=["health"])
records = APIRouter(prefix="/api/v1", tags=["records"])

# Ingest counts as stalled if it is disconnected; readiness must say so, load balancers act on it.


@health.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Answer that the process is alive."""
    return Health(status="ok")


@health.get("/readyz", response_model=Health, response_model_exclude_unset=True)
def readyz(state: StateDep, response: Response, actor: OptionalActorDep) -> Health:
    """Answer whether the database and (when running) the broker link are usable.

    Open to load balancers, which get only the status (and 200/503); the checks (ingest counters,
    failed API authentications) need the health.read permission (a token or a session of such a role),
    except in the dev profile before any user exists (loopback).
    """
    checks: dict[str, object] = {}
    ok = True
    try:
        with state.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as err:  # any driver error means not ready; say which
        checks["database"] = f"error: {type(err).__name__}"
        ok = False
    if state.ingest is not None:
        checks["broker"] = "connected" if state.ingest.connected else "disconnected"
        checks["ingest_stored"] = state.ingest.stored
        checks["ingest_dead_lettered"] = state.ingest.dead_lettered
        if state.ingest.last_batch_at:
            checks["last_batch_age_s"] = round(time.time() - state.ingest.last_batch_at, 1)
        checks["ingest_waiting"] = state.ingest.waiting
        stalled = state.ingest.stalled()
        full = state.ingest.storage_full
        if full is not None:
            # Not ready at once: every batch is refused until space is freed, whether messages wait or not.
            checks["ingest"] = f"storage full: {full}; nothing is stored or acknowledged"
        elif stalled:
            # Connected but not advancing (e.g. the database refuses every batch): not ready, whatever else.
            checks["ingest"] = f"stalled: nothing finished for over {state.ingest.stall_s:.0f} s"
        ok = ok and state.ingest.connected and not stalled and full is None
    if not ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    if actor is None or not actor.may(Permission.HEALTH_READ):
        return Health(status="ok" if ok else "unavailable")
    checks["api_auth"] = state.auth.limiter.counts()
    if state.process is not None:
        # Several controllers behind one balancer: which process answered, and what it leads.
        checks["process"] = state.process.as_dict()
    return Health(status="ok" if ok else "unavailable", checks=checks)


@records.get("/events", response_model=EventPage, dependencies=[require(Permission.RECORDS_READ)])
def list_events(
    state: StateDep,
    agent_id: Annotated[str | None, Query(max_length=64)] = None,
    type: Annotated[str | None, Query(max_length=64)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_id: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventPage:
    """List stored events, oldest first, with keyset pagination (pass next_after_id back as after_id)."""
    rows = state.store.list_events(
        agent_id=agent_id, type=type, since=since, until=until, after_id=after_id, limit=limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    items = [EventPublic.model_validate(r, from_attributes=True) for r in rows]
    return EventPage(items=items, next_after_id=items[-1].id if more and items else None)


@records.get("/dead-letters", response_model=list[DeadLetterPublic], dependencies=[require(Permission.RECORDS_READ)])
def list_dead_letters(
    state: StateDep,
    after_id: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DeadLetterPublic]:
    """List refused messages with their reasons."""
    rows = state.store.list_dead_letters(limit=limit, after_id=after_id)
    return [DeadLetterPublic.model_validate(r, from_attributes=True) for r in rows]


@records.get("/findings", response_model=list[FindingPublic], dependencies=[require(Permission.ALERTS_READ)])
def list_findings(state: StateDep, open_only: bool = False) -> list[FindingPublic]:
    """List findings such as sequence gaps."""
    return [
        FindingPublic.model_validate(r, from_attributes=True) for r in state.store.list_findings(open_only=open_only)
    ]


@records.get("/agents", response_model=list[AgentHealth], dependencies=[require(Permission.FLEET_READ)])
def list_agents(
    state: StateDep,
    agent_state: Annotated[str | None, Query(alias="state", pattern="^(online|stale|offline|revoked)$")] = None,
) -> list[AgentHealth]:
    """List registered agents: online/stale/offline/revoked and what their last heartbeat reported."""
    agents = fleet_health(state.store, Thresholds.from_config(state.config), state.clock())
    return [a for a in agents if agent_state is None or a.state == agent_state]


def create_app(state: AppState) -> FastAPI:
    """Build the FastAPI application around an already-opened store."""
    app = FastAPI(
        title="sekisho controller",
        version="1",
        description="関所 — records of card taps, logins, USB media and doors; media loans.",
    )
    if state.signing_key is None:
        try:
            state.signing_key = signing.load_private_key(state.config.signing_key)
        except (OSError, ValueError) as err:
            # Reads still work; media writes answer 503 until the key is readable and the app restarted.
            log.warning("signing key %s unreadable (%s): media loan changes disabled", state.config.signing_key, err)
    app.state.sekisho = state
    if state.config.api_tokens or state.config.api_read_tokens:
        # The operator reads this in the journal: in the controller process's language.
        log.warning(
            _(
                "api_tokens and api_read_tokens are deprecated: they still work (api_tokens as role it_admin, "
                "api_read_tokens as auditor); move to per-user tokens (`sekisho users token create`, docs/console.md)"
            )
        )
    app.state.metrics_registry = controller_registry(
        state.store,
        Thresholds.from_config(state.config),
        ingest=state.ingest,
        publications=state.publications,
        clock=state.clock,
    )
    privacy.install(app)
    app.include_router(health)
    app.include_router(metrics)
    app.include_router(records)
    app.include_router(enrol)
    app.include_router(revocations)
    app.include_router(accounts_router())
    app.include_router(media)
    app.include_router(alerts)
    app.include_router(incidents_api)
    for router in door_routers:
        app.include_router(router)
    # Last: its HTML error pages wrap the JSON handlers privacy.install set, for /console paths only.
    console.install(app)
    return app
