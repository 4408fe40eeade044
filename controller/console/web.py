"""The console's shell pages: login form, start page by role, language switch, placeholders; and install()."""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Final

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from sekisho.controller.console import nav, templating
from sekisho.controller.console.access import SignedInDep, home_of
from sekisho.controller.console.formats import Lang
from sekisho.controller.console.i18n import N_, gettext
from sekisho.controller.console.security import ConsoleHeaders, install_error_pages

shell = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)

LANG_COOKIE_MAX_AGE: Final = 365 * 24 * 3600
# Why a login failed, as the accounts' POST /console/login reports it by redirect (?error=<code>): one
# message for a wrong name or password, so the page never tells which logins exist.
LOGIN_ERRORS: Final[dict[str, str]] = {
    "invalid": N_("Login name, password or one-time code is wrong."),
    "locked": N_("Too many failed attempts: this login is locked for a while. Ask an IT administrator."),
    "csrf": N_("The form expired. Please sign in again."),
    "expired": N_("Your session ended. Please sign in again."),
}


def safe_next(target: str | None) -> str:
    """Return a console path to go back to, or the start page: never another site (no open redirect)."""
    if (
        not target
        or not target.startswith("/console")
        or target.startswith("//")
        or "\\" in target
        or any(ord(c) < 0x20 for c in target)
    ):
        return "/console/"
    return target


def render_login(
    request: Request,
    *,
    error: str | None = None,
    login_value: str = "",
    next_path: str | None = None,
    csrf_token: str | None = None,
    status_code: int = 200,
) -> Response:
    """Render the login page (accounts' POST handler calls this to show a failure with its status)."""
    lang = templating.language_of(request)
    message = gettext(lang, LOGIN_ERRORS[error]) if error in LOGIN_ERRORS else None
    return templating.render(
        request,
        "login.html",
        {
            "error": message,
            "login_value": login_value,
            "next_path": safe_next(next_path) if next_path else None,
            "csrf_token": csrf_token,
        },
        status_code=status_code,
    )


@shell.get("/login")
def login_page(
    request: Request,
    error: Annotated[str | None, Query(max_length=16)] = None,
    next: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    """Show the sign-in form (posted to accounts' POST /console/login)."""
    # Wire: csrf_token=<accounts' pre-session login token> once controller/accounts provides it.
    return render_login(request, error=error, next_path=next)


@shell.get("/")
def home(viewer: SignedInDep) -> Response:
    """Send a signed-in user to the first screen of their role."""
    return RedirectResponse(home_of(viewer), status_code=303)


@shell.get("/lang/{lang}")
def switch_language(
    request: Request,
    lang: Annotated[Lang, Path()],
    next: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    """Remember the display language in this browser and go back to the page it was chosen on."""
    response = RedirectResponse(safe_next(next), status_code=303)
    state = getattr(request.app.state, "sekisho", None)
    dev = state is not None and state.config.profile == "dev"
    response.set_cookie(
        templating.LANG_COOKIE,
        lang,
        max_age=LANG_COOKIE_MAX_AGE,
        path="/console",
        httponly=True,
        samesite="lax",
        secure=not dev,
    )
    return response


def _placeholder_route(item: nav.NavItem) -> None:
    # Wire: depend on accounts' require(item.permission) instead of any signed-in user.
    def placeholder(request: Request, viewer: SignedInDep) -> Response:
        return templating.render(request, "placeholder.html", {"item": item}, viewer=viewer)

    placeholder.__doc__ = f"Say plainly that {item.path} is not built yet."
    shell.add_api_route(item.path.removeprefix("/console"), placeholder, methods=["GET"], name=f"todo:{item.path}")


for _item in nav.unbuilt():
    _placeholder_route(_item)


def install(app: FastAPI, static_dir: FilePath = templating.STATIC_DIR) -> None:
    """Add the console to the app: its pages, static files, security headers and HTML error pages."""
    app.state.console_static = static_dir
    app.mount("/console/static", StaticFiles(directory=static_dir), name="console-static")
    app.include_router(shell)
    app.add_middleware(ConsoleHeaders)
    install_error_pages(app)

