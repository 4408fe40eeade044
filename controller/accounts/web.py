"""Sign-in, sign-out and password change for the console: plain FastAPI routes, template-agnostic.

Routes (``accounts_router``):

- ``GET /console/login`` — the sign-in form; sets the pre-session CSRF cookie (double submit: the form's
  ``csrf_token`` must equal the ``sekisho_login_csrf`` cookie, so another site cannot sign a browser in
  to an account of its choosing).
- ``POST /console/login`` — form ``login``, ``password``, ``totp`` (admin roles), ``csrf_token``, ``next``:
  303 to ``next`` (a /console path) with the ``sekisho_session`` cookie, or the form again with 401
  (429 with Retry-After while locked). ``Accept: application/json`` gets JSON instead.
- ``GET /console/logout`` — a confirmation form; ``POST /console/logout`` signs out (CSRF checked).
- ``POST /console/password`` — ``current_password``, ``new_password``, ``new_password_again``: every other
  session of the user ends.
- ``GET /console/session`` — who is signed in and the session's CSRF token (for pages and htmx).

Pages come from a ``render(request, template, context, status_code) -> Response`` callable: the one given
to ``accounts_router``, else ``app.state.console_render`` (the console shell sets it), else the minimal
built-in HTML below. Templates: ``accounts/login.html``, ``accounts/logout.html``, ``accounts/password.html``;
context keys ``csrf_token``, ``error``, ``message``, ``login``, ``next``, ``actor``.
"""

from __future__ import annotations

import hmac
import html
import logging
import secrets
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, Response, status
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from sekisho.common.i18n import DEFAULT_LANG, N_, Lang, gettext, localize
from sekisho.controller.accounts.authn import SESSION_COOKIE, csrf_token
from sekisho.controller.accounts.passwords import PasswordRejected
from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.accounts.service import AccountError, LoginRefused

log = logging.getLogger(__name__)

LOGIN_CSRF_COOKIE = "sekisho_login_csrf"
HOME = "/console/"
Render = Callable[[Request, str, dict[str, Any], int], Response]

SelfActor = Annotated[Actor, require(Permission.ACCOUNT_SELF)]
Viewer = Annotated[Actor, require(Permission.CONSOLE_VIEW)]


def _secure(request: Request) -> bool:
    # Secure cookies everywhere but the dev profile (plain http on loopback).
    return bool(request.app.state.sekisho.config.profile != "dev")


def safe_next(target: str | None) -> str:
    """Return target if it is a console path on this site, else the console's home (no open redirect)."""
    if not target or not target.startswith("/console") or "//" in target or "\\" in target:
        return HOME
    return target


def set_session_cookie(request: Request, response: Response, session_id: str) -> None:
    """Put the session id in an HttpOnly, SameSite=Lax cookie (Secure outside dev) for the whole site."""
    response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="lax", secure=_secure(request), path="/")


def _remember_language(request: Request, response: Response, language: str) -> None:
    # The console shell keeps the display language in its own cookie; a sign-in restores the user's choice.
    try:
        from sekisho.controller.console.web import remember_language
    except ImportError:  # an install or a test app without the console pages
        return
    remember_language(request, response, language)  # type: ignore[arg-type]


def _lang(request: Request) -> Lang:
    # The console's display language (its cookie, set from the account at sign-in), else Japanese.
    try:
        from sekisho.controller.console.templating import language_of
    except ImportError:  # an install or a test app without the console pages
        return DEFAULT_LANG
    return language_of(request)


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _render(request: Request, render: Render | None, template: str, context: dict[str, Any], code: int) -> Response:
    chosen = render or getattr(request.app.state, "console_render", None)
    if chosen is not None:
        return chosen(request, template, context, code)
    return HTMLResponse(_minimal(template, context, _lang(request)), status_code=code)


def _minimal(template: str, context: dict[str, Any], lang: Lang = DEFAULT_LANG) -> str:
    """Return bare accessible HTML for a page until the console's templates exist."""
    e = {k: html.escape(str(v)) for k, v in context.items() if v is not None}
    t = {
        key: html.escape(gettext(lang, text))
        for key, text in {
            "sign_in": N_("Sign in"),
            "login": N_("Login"),
            "password": N_("Password"),
            "totp": N_("Verification code (admin roles)"),
            "sign_out": N_("Sign out"),
            "change_password": N_("Change password"),
            "current": N_("Current password"),
            "new": N_("New password (12+ characters)"),
            "again": N_("Again"),
            "change": N_("Change"),
        }.items()
    }
    error = f'<p role="alert">{e["error"]}</p>' if "error" in e else ""
    message = f'<p role="status">{e["message"]}</p>' if "message" in e else ""
    csrf = f'<input type="hidden" name="csrf_token" value="{e.get("csrf_token", "")}">'
    if template == "accounts/login.html":
        body = f"""<h1>{t["sign_in"]}</h1>{error}{message}
<form method="post" action="/console/login">{csrf}
<input type="hidden" name="next" value="{e.get("next", HOME)}">
<p><label for="login">{t["login"]}</label> <input id="login" name="login" autocomplete="username" required
 value="{e.get("login", "")}"></p>
<p><label for="password">{t["password"]}</label> <input id="password" name="password" type="password"
 autocomplete="current-password" required></p>
<p><label for="totp">{t["totp"]}</label> <input id="totp" name="totp"
 inputmode="numeric" autocomplete="one-time-code" pattern="[0-9 ]*"></p>
<p><button type="submit">{t["sign_in"]}</button></p></form>"""
    elif template == "accounts/logout.html":
        body = f"""<h1>{t["sign_out"]}</h1><form method="post" action="/console/logout">{csrf}
<p><button type="submit">{t["sign_out"]}</button></p></form>"""
    else:
        body = f"""<h1>{t["change_password"]}</h1>{error}{message}
<form method="post" action="/console/password">{csrf}
<p><label for="current">{t["current"]}</label> <input id="current" name="current_password"
 type="password" autocomplete="current-password" required></p>
<p><label for="new">{t["new"]}</label> <input id="new"
 name="new_password" type="password" autocomplete="new-password" minlength="12" required></p>
<p><label for="again">{t["again"]}</label> <input id="again" name="new_password_again" type="password"
 autocomplete="new-password" minlength="12" required></p>
<p><button type="submit">{t["change"]}</button></p></form>"""
    head = '<head><meta charset="utf-8"><title>sekisho</title></head>'
    return f'<!doctype html><html lang="{lang}">{head}<body>{body}</body></html>'


def accounts_router(render: Render | None = None) -> APIRouter:
    """Return the sign-in, sign-out and password routes (render: the console's template renderer, if any)."""
    router = APIRouter(prefix="/console", tags=["console accounts"])

    def login_page(request: Request, *, login: str = "", next_: str = HOME, error: str | None = None,
                   code: int = 200, retry_after: int | None = None) -> Response:  # fmt: skip
        token = secrets.token_urlsafe(32)
        context = {"csrf_token": token, "error": error, "login": login, "next": safe_next(next_)}
        if _wants_json(request) and code != 200:
            response: Response = JSONResponse({"detail": error}, status_code=code)
        else:
            response = _render(request, render, "accounts/login.html", context, code)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        response.set_cookie(
            LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=_secure(request), path="/console/login"
        )
        return response

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = HOME) -> Response:
        """Show the sign-in form."""
        return login_page(request, next_=next)

    @router.post("/login")
    async def login(
        request: Request,
        login: Annotated[str, Form(max_length=256)] = "",
        password: Annotated[str, Form(max_length=1024)] = "",
        totp: Annotated[str, Form(max_length=16)] = "",
        csrf_token: Annotated[str, Form(max_length=128)] = "",
        next: Annotated[str, Form(max_length=512)] = HOME,
    ) -> Response:
        """Sign in: check the pre-session CSRF token, the password (and TOTP), open a session."""
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie or not csrf_token or not hmac.compare_digest(cookie.encode(), csrf_token.encode()):
            return login_page(
                request,
                login=login,
                next_=next,
                error=gettext(_lang(request), "the form expired; please try again"),
                code=status.HTTP_403_FORBIDDEN,
            )
        state = request.app.state.sekisho
        host = request.client.host if request.client else None
        try:
            signed = await run_in_threadpool(state.accounts.login, login, password, totp or None, host)
        except LoginRefused as err:
            code = status.HTTP_429_TOO_MANY_REQUESTS if err.reason == "locked" else status.HTTP_401_UNAUTHORIZED
            return login_page(request, login=login, next_=next, error=localize(err.message, _lang(request)),
                              code=code, retry_after=err.retry_after)  # fmt: skip
        target = safe_next(next)
        token = csrf_token_for(signed.session_id)
        if _wants_json(request):
            response: Response = JSONResponse(
                {"login": signed.user.login, "role": signed.user.role, "csrf_token": token, "next": target}
            )
        else:
            response = RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)
        set_session_cookie(request, response, signed.session_id)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/console/login")
        _remember_language(request, response, signed.user.language)
        return response

    @router.get("/logout", response_class=HTMLResponse)
    def logout_form(request: Request, actor: SelfActor) -> Response:
        """Ask to confirm signing out (a GET never changes anything)."""
        context = {"csrf_token": csrf_for(request), "actor": actor}
        return _render(request, render, "accounts/logout.html", context, 200)

    @router.post("/logout")
    async def logout(request: Request, actor: SelfActor) -> Response:
        """Sign out: end this session and clear its cookie."""
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id and actor.via == "session":
            await run_in_threadpool(request.app.state.sekisho.accounts.end_session, session_id)
        response: Response = (
            JSONResponse({"signed_out": True})
            if _wants_json(request)
            else RedirectResponse("/console/login", status_code=status.HTTP_303_SEE_OTHER)
        )
        response.delete_cookie(SESSION_COOKIE, path="/", secure=_secure(request), httponly=True, samesite="lax")
        return response

    @router.get("/password", response_class=HTMLResponse)
    def password_form(request: Request, actor: SelfActor) -> Response:
        """Show the password change form."""
        return _render(
            request, render, "accounts/password.html", {"csrf_token": csrf_for(request), "actor": actor}, 200
        )

    @router.post("/password")
    async def change_password(
        request: Request,
        actor: SelfActor,
        current_password: Annotated[str, Form(max_length=1024)] = "",
        new_password: Annotated[str, Form(max_length=1024)] = "",
        new_password_again: Annotated[str, Form(max_length=1024)] = "",
    ) -> Response:
        """Change one's own password; every other session of the user ends."""
        error: str | None = None
        if new_password != new_password_again:
            error = gettext(_lang(request), "the new passwords differ")
        else:
            try:
                await run_in_threadpool(
                    request.app.state.sekisho.accounts.change_password, actor, current_password, new_password
                )
            except (AccountError, PasswordRejected) as err:
                error = localize(err, _lang(request))
        code = status.HTTP_200_OK if error is None else status.HTTP_422_UNPROCESSABLE_CONTENT
        message = gettext(_lang(request), "password changed") if error is None else None
        if _wants_json(request):
            return JSONResponse({"detail": error} if error else {"changed": True}, status_code=code)
        context = {"csrf_token": csrf_for(request), "actor": actor, "error": error, "message": message}
        return _render(request, render, "accounts/password.html", context, code)

    @router.get("/session")
    def session_info(request: Request, actor: Viewer) -> dict[str, Any]:
        """Return who is signed in and the CSRF token state-changing requests of this session must carry."""
        return {
            "login": actor.login,
            "display_name": actor.display_name,
            "role": actor.role.value,
            "areas": sorted(actor.areas) if actor.areas is not None else None,
            "via": actor.via,
            "csrf_token": csrf_for(request) if actor.via == "session" else None,
        }

    return router


def csrf_token_for(session_id: str) -> str:
    """Return the CSRF token of a session id (same as authn.csrf_token)."""
    return csrf_token(session_id)


def csrf_for(request: Request) -> str:
    """Return the CSRF token of the request's session for a page's forms ("" without a session)."""
    session_id = request.cookies.get(SESSION_COOKIE)
    return csrf_token(session_id) if session_id else ""
