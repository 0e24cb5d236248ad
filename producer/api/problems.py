"""One error format for every API response: RFC 9457 ``application/problem+json``.

``{type, title, status, detail, code}``, plus ``errors`` (one entry per field) for a body that
fails validation. ``code`` is stable and documented (docs/api.md, "Error codes"); ``type`` is
``urn:imgq:problem:<code>``. imgq's own refusals (``InvalidRequest`` and its subclasses) keep
their CLI codes (``bad_ref``, ``bad_params``, ...).
"""

from __future__ import annotations

import http
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgq import errors

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"

# Codes for plain HTTP errors that no handler named (an unknown route, a wrong method, ...).
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 413: "body_too_large",
                 415: "unsupported_media_type", 429: "rate_limited"}


class ApiProblem(Exception):
    """An API refusal with its HTTP status and stable code (not an ImgqError: these codes belong to
    the API, not the CLI)."""

    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.errors = errors


def problem(status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
            errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": f"urn:imgq:problem:{code}", "title": http.HTTPStatus(status).phrase,
                            "status": status, "detail": detail, "code": code}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(jsonable_encoder(body), status_code=status, media_type=MEDIA_TYPE, headers=headers)


def not_found(what: str = "job") -> ApiProblem:
    """The one answer for a job that does not exist or belongs to another tenant."""
    return ApiProblem(404, f"{what}_not_found", f"no such {what}")


# -- handlers -------------------------------------------------------------------------------------

async def _api_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiProblem)
    return problem(exc.status, exc.code, exc.detail, headers=exc.headers, errors=exc.errors)


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    found = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
             for e in exc.errors()]
    where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in found[:5])
    return problem(422, "validation_error", f"the request is malformed: {where}", errors=found)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else http.HTTPStatus(exc.status_code).phrase
    return problem(exc.status_code, code, detail, headers=getattr(exc, "headers", None))


async def _imgq(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ImgqError)
    if isinstance(exc, errors.InvalidRequest | errors.Permanent):  # refused before anything was accepted
        return problem(422, exc.code, exc.message)
    if isinstance(exc, errors.Retryable):
        return problem(503, exc.code, exc.message, headers={"Retry-After": "5"})
    log.error("imgq error in %s %s: %s", request.method, request.url.path, exc,
              extra={"action": "api_error", "code": exc.code})
    return problem(500, exc.code, exc.message)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"OperationalError", "InterfaceError"} and type(exc).__module__.startswith(("sqlalchemy", "psycopg")):
        log.warning("database unavailable: %s", exc, extra={"action": "api_db_unavailable"})
        return problem(503, "db_unavailable", "the database is unavailable; nothing was accepted",
                       headers={"Retry-After": "5"})
    log.exception("unexpected error in %s %s", request.method, request.url.path, extra={"action": "api_error"})
    return problem(500, "internal_error", "an unexpected error; it was logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiProblem, _api_problem)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(errors.ImgqError, _imgq)
    from sqlalchemy.exc import InterfaceError, OperationalError

    for cls in (OperationalError, InterfaceError):  # answered here, not re-raised as a server error
        app.add_exception_handler(cls, _unexpected)
    app.add_exception_handler(Exception, _unexpected)
