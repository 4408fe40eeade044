"""The console's Jinja2 environment and page rendering: autoescape, the catalogue, JST filters, the layout."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Final

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from sekisho.controller.accounts.roles import Actor
from sekisho.controller.accounts.web import csrf_for
from sekisho.controller.console import formats, i18n, nav
from sekisho.controller.console.formats import Lang
from sekisho.protocol import timefmt

TEMPLATES_DIR: Final = i18n.PACKAGE_DIR / "templates"
STATIC_DIR: Final = i18n.PACKAGE_DIR / "static"
HTMX_FILE: Final = STATIC_DIR / "vendor" / "htmx.min.js"
LANG_COOKIE: Final = "sekisho_lang"
SITE_NAME: Final = "関所 sekisho"


@cache
def environment() -> Environment:
    """Return the console's template environment (built once; templates are read from the package)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=select_autoescape(("html",), default_for_string=True),
        extensions=["jinja2.ext.i18n"],
        # A misspelt variable is an error in tests, not an empty cell on a register.
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    gettext, ngettext = i18n.template_callables()
    env.install_gettext_callables(gettext, ngettext, newstyle=True)  # type: ignore[attr-defined]
    formats.install_filters(env)
    return env


def language_of(request: Request, viewer: Actor | None = None) -> Lang:
    """Return the display language: this browser's choice (cookie, set from the account at sign-in), else Japanese."""
    chosen = request.cookies.get(LANG_COOKIE)
    if formats.is_lang(chosen):
        return chosen
    return formats.as_lang(getattr(viewer, "language", None))


def static_dir(request: Request) -> Path:
    """Return the folder the app serves /console/static from (web.install chose it)."""
    chosen = getattr(request.app.state, "console_static", None)
    return chosen if isinstance(chosen, Path) else STATIC_DIR


def htmx_available(request: Request) -> bool:
    """Tell whether set-up fetched htmx (pages work without it; it only adds live refresh)."""
    return (static_dir(request) / HTMX_FILE.relative_to(STATIC_DIR)).is_file()


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    viewer: Actor | None = None,
    status_code: int = 200,
    now: datetime | None = None,
) -> HTMLResponse:
    """Render a console page in the request's language with the layout's common variables."""
    lang = language_of(request, viewer)
    values: dict[str, Any] = {
        "lang": lang,
        "other_lang": "en" if lang == "ja" else "ja",
        "site_name": SITE_NAME,
        "viewer": viewer,
        "nav": nav.visible_to(viewer.role if viewer is not None else None),
        "current_path": request.url.path,
        # Where the language switch returns to, query included (the login page's ?next= must survive it).
        "back_to": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        "htmx": htmx_available(request),
        "rendered_at": now or timefmt.now(),
        "verification": None,
        "csrf_token": None,
        # The header's sign-out form: the session's own CSRF token (accounts computes it from the cookie).
        "csrf_token_header": csrf_for(request) if viewer is not None and viewer.via == "session" else "",
        "print_title": None,
        "print_period": None,
    }
    values.update(context or {})
    body = environment().get_template(template).render(values)
    return HTMLResponse(body, status_code=status_code)
