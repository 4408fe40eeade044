"""Server-Sent Events of alert changes: the loop behind `/api/v1/alerts/stream` and `/console/alerts/stream`.

One loop per connection reads the alerts table (controller/alerts/listing.py ``ChangeFeed``) in a worker thread
and sends what changed, rendered by the route (JSON for programs, table rows for the console). It reads when
this process's alert engine rings the bell (controller/alerts/bell.py: it changed alerts) and at the latest every
poll interval (``[alerts] stream_poll_s``), which finds changes made by other processes (the CLI, a second
controller) and by the console's own forms.
A comment line every HEARTBEAT_S keeps proxies from closing a quiet connection. A connection lives at most
its lifetime (10 minutes by default); the browser's EventSource then reconnects by itself, sending the last
event id it saw (the feed's watermark), and the new connection carries on from there. The loop ends as soon
as the client goes away.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Final

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from sekisho.controller.alerts.bell import Bell, wait_for
from sekisho.controller.alerts.listing import ChangeFeed
from sekisho.controller.api.deps import AppState
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt

HEARTBEAT_S: Final = 15.0
LIFETIME_S: Final = 600
# How long a browser waits before reconnecting after the stream ends.
RETRY_MS: Final = 2000
LAST_EVENT_ID: Final = "last-event-id"
# Set on the app's state when the server begins to shut down (and the bell rung): open streams end at once, so a
# stopping controller does not wait out their lifetime (uvicorn waits for every response in hand to finish).
CLOSING: Final = "sse_closing"

# Renders one changed alert as the text of its SSE events; the event id is passed in.
Render = Callable[[Any, str], str]


def event(name: str, data: str, event_id: str | None = None) -> str:
    """Return one SSE event: its name, id and data (each line of data on a data: line)."""
    lines = [f"event: {name}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines += [f"data: {line}" for line in data.split("\n")]
    return "\n".join(lines) + "\n\n"


def close_streams(app: Any) -> None:
    """Tell every open stream of this app to end (the HTTP server calls it as its shutdown begins)."""
    state = getattr(app, "state", None)
    if state is not None:
        setattr(state, CLOSING, True)
        bell = getattr(getattr(state, "sekisho", None), "alert_bell", None)
        if isinstance(bell, Bell):
            bell.ring()  # a stream waiting out its poll interval looks now, sees the flag and ends


def resume_point(request: Request, since: datetime | None) -> datetime | None:
    """Return where a stream starts: the Last-Event-ID a reconnecting browser sends, else ``since``."""
    offered = request.headers.get(LAST_EVENT_ID, "").strip()
    if offered:
        try:
            return timefmt.parse(offered, "Last-Event-ID")
        except Exception:  # a malformed header is ignored: the stream starts now
            return since
    return since


def _start(store: Store, since: datetime | None) -> ChangeFeed:
    if since is not None:
        return ChangeFeed.starting_at(since)
    with store.engine.connect() as conn:
        return ChangeFeed.starting_now(conn)


def _round(store: Store, feed: ChangeFeed, render: Render) -> str:
    with store.engine.connect() as conn:
        rows = feed.poll(conn)
    if not rows or feed.watermark is None:
        return ""
    stamp = timefmt.fmt(feed.watermark)
    return "".join(render(row, stamp) for row in rows)


def alert_stream(
    request: Request, render: Render, *, since: datetime | None, lifetime_s: float = LIFETIME_S
) -> StreamingResponse:
    """Answer with a text/event-stream of alert changes from ``since`` (None: from now) for ``lifetime_s``.

    The app's alert bell makes the stream look at once; otherwise it looks every ``[alerts] stream_poll_s``.
    """
    state: AppState = request.app.state.sekisho
    store, bell, poll_s = state.store, state.alert_bell, state.config.alerts.stream_poll_s
    start = resume_point(request, since)

    async def body() -> AsyncIterator[str]:
        # Placed before the first line goes out: whatever changes once a client has read it is sent.
        feed = await run_in_threadpool(_start, store, start)
        yield f"retry: {RETRY_MS}\n: connected\n\n"
        ends = time.monotonic() + lifetime_s
        beat = time.monotonic() + HEARTBEAT_S
        with bell.listening() as rung:
            while time.monotonic() < ends:
                if getattr(request.app.state, CLOSING, False) or await request.is_disconnected():
                    return
                text = await run_in_threadpool(_round, store, feed, render)
                now = time.monotonic()
                if text:
                    yield text
                    beat = now + HEARTBEAT_S
                elif now >= beat:
                    yield ": keep-alive\n\n"
                    beat = now + HEARTBEAT_S
                # The wait is bounded by what is left of the lifetime and by the heartbeat, so neither is late.
                await wait_for(rung, max(0.0, min(poll_s, ends - now, beat - now)))

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
