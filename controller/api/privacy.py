"""Error answers that never repeat a My Number, in the request's language.

FastAPI's 422 lists each invalid field with its ``input``; an ``HTTPException`` detail may quote an id the
caller sent. Both handlers below answer exactly as FastAPI's own would, with every My-Number-like value
in the body replaced by ``[REDACTED:my_number]`` (see ``protocol/mynumber.py``). A detail (or a validator's
message) that is a catalogue Message (``M_`` in sekisho.common.i18n) is given in the request's language
(`request_lang`); the shape of the answer does not change.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sekisho.common.i18n import DEFAULT_LANG, Lang, Message, is_lang, localize
from sekisho.controller.console.templating import LANG_COOKIE
from sekisho.protocol import mynumber


def request_lang(request: Request) -> Lang:
    """Return a request's language: the console's language cookie, else Accept-Language (ja or en), else ja."""
    chosen = request.cookies.get(LANG_COOKIE)
    if is_lang(chosen):
        return chosen
    # Browsers and HTTP libraries list the preferred language first; q-values are not weighed.
    for part in request.headers.get("accept-language", "").split(","):
        tag = part.split(";", 1)[0].strip().lower()
        if tag.startswith("en"):
            return "en"
        if tag.startswith("ja"):
            return "ja"
    return DEFAULT_LANG


def _localized(error: dict[str, Any], lang: Lang) -> dict[str, Any]:
    # A validator that raised ValueError(M_(...)): its message in the request's language, same keys.
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ValueError) and len(cause.args) == 1 and isinstance(cause.args[0], Message):
        return {**error, "msg": f"Value error, {localize(cause, lang)}"}
    return error


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    lang = request_lang(request)
    detail = mynumber.redact(jsonable_encoder([_localized(dict(error), lang) for error in exc.errors()]))
    return JSONResponse(status_code=422, content={"detail": detail})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = localize(exc.detail, request_lang(request)) if isinstance(exc.detail, Message) else exc.detail
    redacted = StarletteHTTPException(exc.status_code, detail=mynumber.redact(detail), headers=exc.headers)
    return await http_exception_handler(request, redacted)


def install(app: FastAPI) -> None:
    """Make the app's validation and HTTP error answers redact My-Number-like values."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
