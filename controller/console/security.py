"""Console answers: security headers on every /console response, and error pages instead of JSON there."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import quote

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sekisho.controller.console import templating
from sekisho.controller.console.formats import Lang
from sekisho.controller.console.i18n import N_, gettext

log = logging.getLogger(__name__)

PREFIX: Final = "/console"
STATIC_PREFIX: Final = "/console/static/"
# Self only and no inline script or style at all: an injected <script> or style attribute does nothing.
# htmx is served from /console/static and told not to add inline styles (base.html's htmx-config).
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
_ALWAYS: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
# Pages carry names, movements and loans: no browser or proxy may keep a copy (a shared counter tablet).
_PAGES: Final[tuple[tuple[bytes, bytes], ...]] = ((b"cache-control", b"no-store"), (b"pragma", b"no-cache"))


def is_console(path: str) -> bool:
    """Tell whether a request path belongs to the console."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def header_pairs(path: str) -> list[tuple[bytes, bytes]]:
    """Return the security headers a console response at this path carries."""
    pairs = list(_ALWAYS)
    if not path.startswith(STATIC_PREFIX):
        pairs.extend(_PAGES)
    return pairs


class ConsoleHeaders:
    """ASGI middleware: adds the console's security headers to every response under /console (any router)."""

    def __init__(self, app: ASGIApp) -> None:
        """Wrap the application."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, adding the headers to the response start of console paths."""
        if scope["type"] != "http" or not is_console(scope["path"]):
            await self.app(scope, receive, send)
            return
        extra = header_pairs(scope["path"])
        names = {name for name, _ in extra}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: (N_("Request refused"), N_("The form or address was not understood. Go back and try again.")),
    401: (N_("Sign in required"), N_("Sign in to open this page.")),
    403: (
        N_("Not allowed"),
        N_("Your role may not open this page or do this. Ask an IT administrator if you need it."),
    ),
    404: (N_("Page not found"), N_("There is no page at this address.")),
    405: (N_("Request refused"), N_("This page does not accept that kind of request.")),
    429: (N_("Too many attempts"), N_("Too many attempts from this address. Wait a while, then try again.")),
    500: (
        N_("Something went wrong"),
        N_("The server could not show this page. The error was logged; try again or tell an IT administrator."),
    ),
}


def error_page(request: Request, status_code: int, headers: dict[str, str] | None = None) -> Response:
    """Render the console's error page for a status in the request's language."""
    lang: Lang = templating.language_of(request)
    heading, explanation = _ERRORS.get(status_code, _ERRORS[500 if status_code >= 500 else 400])
    response = templating.render(
        request,
        "error.html",
        {
            "status_code": status_code,
            "heading": gettext(lang, heading),
            "explanation": gettext(lang, explanation),
        },
        status_code=status_code,
    )
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


Handler = Callable[[Request, Any], Response | Awaitable[Response]]


async def _delegate(handler: Handler | None, request: Request, exc: Exception) -> Response:
    if handler is None:
        raise exc
    answer = handler(request, exc)
    return await answer if inspect.isawaitable(answer) else answer


def install_error_pages(app: FastAPI) -> None:
    """Answer console paths with HTML error pages; every other path keeps the handlers it had (JSON)."""
    http_before: Handler | None = app.exception_handlers.get(StarletteHTTPException)
    validation_before: Handler | None = app.exception_handlers.get(RequestValidationError)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        path = request.url.path
        if is_console(path) and not path.startswith(STATIC_PREFIX):
            if exc.status_code == 401 and request.method in ("GET", "HEAD"):
                # A bookmark or an expired session: to the login page, then back here.
                return RedirectResponse(f"/console/login?next={quote(path, safe='/')}", status_code=303)
            # Only the status and its fixed text are shown: a detail may quote what the request sent.
            return error_page(
                request,
                exc.status_code,
                {"Retry-After": exc.headers["Retry-After"]} if exc.headers and "Retry-After" in exc.headers else None,
            )
        return await _delegate(http_before, request, exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        if is_console(request.url.path):
            return error_page(request, 400)
        return await _delegate(validation_before, request, exc)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette logs the traceback and re-raises after this answer; this only decides what the browser sees.
        path = request.url.path
        if is_console(path):
            try:
                response = error_page(request, 500)
            except Exception:  # the page itself failed to render: plain text, still with the headers
                log.exception("console error page failed to render")
                response = PlainTextResponse("500 サーバーエラー / Internal Server Error", status_code=500)
            for name, value in header_pairs(path):
                response.headers[name.decode()] = value.decode()
            return response
        return PlainTextResponse("Internal Server Error", status_code=500)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
