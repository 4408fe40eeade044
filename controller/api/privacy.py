"""Error answers that never repeat a My Number: what a request sent comes back redacted.

FastAPI's 422 lists each invalid field with its ``input``; an ``HTTPException`` detail may quote an id the
caller sent. Both handlers below answer exactly as FastAPI's own would, with every My-Number-like value
in the body replaced by ``[REDACTED:my_number]`` (see ``protocol/mynumber.py``).
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sekisho.protocol import mynumber


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = mynumber.redact(jsonable_encoder(exc.errors()))
    return JSONResponse(status_code=422, content={"detail": detail})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    redacted = StarletteHTTPException(exc.status_code, detail=mynumber.redact(exc.detail), headers=exc.headers)
    return await http_exception_handler(request, redacted)


def install(app: FastAPI) -> None:
    """Make the app's validation and HTTP error answers redact My-Number-like values."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
