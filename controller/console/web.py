"""The console's shell: start page by role, language switch, placeholders, the accounts' pages; install()."""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Any, Final

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from sekisho.controller.accounts.authn import identify
from sekisho.controller.accounts.roles import Actor, require
from sekisho.controller.console import nav, templating
from sekisho.controller.console.access import SignedInDep, home_of
from sekisho.controller.console.formats import Lang

# The built page families: importing them registers their navigation items before the placeholders below.
from sekisho.controller.console.pages import PAGE_ROUTERS
from sekisho.controller.console.security import ConsoleHeaders, install_error_pages

shell = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)

LANG_COOKIE_MAX_AGE: Final = 365 * 24 * 3600
# The pages controller/accounts/web.py serves (sign-in, sign-out, password) in the console's layout.
ACCOUNT_PAGES: Final = frozenset({"accounts/login.html", "accounts/logout.html", "accounts/password.html"})


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


def one_language(text: str | None, lang: Lang) -> str | None:
    """Return the half of a bilingual "日本語 / English" message (the accounts' and CLI's style) for a language."""
    if text is None or " / " not in text:
        return text
    japanese, english = text.split(" / ", 1)
    return japanese if lang == "ja" else english


def render_account_page(request: Request, template: str, context: dict[str, Any], status_code: int) -> Response:
    """Render one of the accounts' pages (app.state.console_render): their context, our layout and language."""
    if template not in ACCOUNT_PAGES:
        raise ValueError(f"not an accounts page: {template}")
    lang = templating.language_of(request)
    values = {
        **context,
        "error": one_language(context.get("error"), lang),
        "message": one_language(context.get("message"), lang),
        "login_value": context.get("login") or "",
        "next_path": safe_next(context.get("next")),
    }
    return templating.render(request, template, values, viewer=context.get("actor"), status_code=status_code)


@shell.get("/")
def home(viewer: SignedInDep) -> Response:
    """Send a signed-in user to the first screen of their role."""
    return RedirectResponse(home_of(viewer), status_code=303)


def remember_language(request: Request, response: Response, lang: Lang) -> None:
    """Set this browser's language cookie (accounts' login calls it with the user's stored language)."""
    state = getattr(request.app.state, "sekisho", None)
    dev = state is not None and state.config.profile == "dev"
    response.set_cookie(
        templating.LANG_COOKIE,
        lang,
        max_age=LANG_COOKIE_MAX_AGE,
        path="/console",
        httponly=True,
        samesite="lax",
        # As the session cookie: Secure outside the dev profile.
        secure=not dev,
    )


@shell.get("/lang/{lang}")
async def switch_language(
    request: Request,
    lang: Annotated[Lang, Path()],
    next: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    """Remember the display language in this browser, and for a signed-in user in their account; go back.

    Public, so the sign-in page can switch too. A GET, so a plain link works without JavaScript; the worst a
    forged link can do is change someone's display language.
    """
    response = RedirectResponse(safe_next(next), status_code=303)
    remember_language(request, response, lang)
    actor = await identify(request)
    if actor is not None and actor.via == "session" and actor.user_id is not None:
        state = request.app.state.sekisho
        await run_in_threadpool(state.accounts.set_language, actor.user_id, lang)
    return response


def _placeholder_route(item: nav.NavItem) -> None:
    # The placeholder already asks for the permission the real page will: the matrix test sees it, and a
    # role that may not open the page gets 403 now, not only once the page exists.
    def placeholder(request: Request) -> Response:
        actor: Actor = request.state.actor  # set by accounts' require() before the route runs
        return templating.render(request, "placeholder.html", {"item": item}, viewer=actor)

    placeholder.__doc__ = f"Say plainly that {item.path} is not built yet."
    shell.add_api_route(
        item.path.removeprefix("/console"),
        placeholder,
        methods=["GET"],
        name=f"todo:{item.path}",
        dependencies=[require(item.permission)],
    )


for _item in nav.unbuilt():
    _placeholder_route(_item)


def install(app: FastAPI, static_dir: FilePath = templating.STATIC_DIR) -> None:
    """Add the console to the app: its pages, static files, security headers and HTML error pages."""
    app.state.console_static = static_dir
    app.state.console_render = render_account_page
    app.mount("/console/static", StaticFiles(directory=static_dir), name="console-static")
    app.include_router(shell)
    for router in PAGE_ROUTERS:
        app.include_router(router)
    app.add_middleware(ConsoleHeaders)
    install_error_pages(app)
