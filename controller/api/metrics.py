"""``GET /metrics``: the controller's Prometheus metrics (controller/fleet/metrics.py).

Needs the health.read permission: a token of a user whose role holds it (or a legacy read token) as a
bearer token — Prometheus sends one with ``authorization: {credentials_file: …}`` — or, in the dev profile
before any user exists, anyone on loopback.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sekisho.controller.accounts.roles import Permission, require

metrics = APIRouter(tags=["health"], dependencies=[require(Permission.HEALTH_READ)])


@metrics.get("/metrics", response_class=Response)
def prometheus_metrics(request: Request) -> Response:
    """Expose ingest, fleet, policy and dead-letter metrics in Prometheus' text format."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
