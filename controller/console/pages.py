"""The console's built page families: each module registers its navigation item and exposes its router."""

from __future__ import annotations

from fastapi import APIRouter

from sekisho.controller.console import (
    alerts_web,
    counter,
    doors_web,
    incidents_web,
    media_register_web,
    muster_web,
    overview_web,
    registers_api,
    registers_web,
)

# web.install includes these after the shell; add a page family's router here.
PAGE_ROUTERS: tuple[APIRouter, ...] = (
    muster_web.router,
    overview_web.router,
    doors_web.router,
    registers_web.pages,
    registers_api.api,
    counter.counter,
    media_register_web.pages,
    media_register_web.api,
    alerts_web.router,
    incidents_web.router,
)
