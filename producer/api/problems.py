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
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from imgq import errors

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"

# Codes for plain HTTP errors that no handler named (an unknown route, a wrong method, ...).
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 413: "body_too_large",
                 415: "unsupported_media_type", 429: "rate_limited"}


# -- the body, as the OpenAPI document describes it -----------------------------------------------

class ProblemError(BaseModel):
    """One field of a body or parameter that failed validation."""

    loc: list[str | int] = Field(description="Where: body, query, header or path, then the field's path.")
    msg: str = Field(description="What is wrong with it.")
    type: str = Field(description="pydantic's error type (missing, string_too_long, ...).")


class Problem(BaseModel):
    """An RFC 9457 problem: every error of the API is one, as ``application/problem+json``."""

    # forbid: the tests validate real answers against it, so a field sent but not documented fails them.
    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="urn:imgq:problem:<code>.", examples=["urn:imgq:problem:source_not_allowed"])
    title: str = Field(description="The HTTP status's reason phrase, as RFC 9110 names it; informative only.",
                       examples=["Unprocessable Content"])
    status: int = Field(description="The HTTP status.", examples=[422])
    detail: str = Field(description="What went wrong, for a person; never parse it.")
    code: str = Field(description="Stable: branch on it (docs/api.md, \"Errors\").", examples=["source_not_allowed"])
    # Absent rather than null when there is nothing to list: optional, never nullable.
    errors: list[ProblemError] = Field(default_factory=list, description="Only for a body or parameter that "
                                       "failed validation (validation_error): one entry per field.")


SCHEMA_REF = {"$ref": "#/components/schemas/Problem"}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}}
_CHALLENGE = {"WWW-Authenticate": {"description": 'Bearer realm="imgq"', "schema": {"type": "string"}}}


def documented(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """One problem answer for a route's ``responses=``: its codes named in ``description``. Not
    ``{"model": Problem}``: FastAPI would list that schema under application/json, which no error is."""
    doc: dict[str, Any] = {"description": description, "content": {MEDIA_TYPE: {"schema": SCHEMA_REF}}}
    if headers:
        doc["headers"] = headers
    return doc


# What every /v1 route can answer, whatever it does: its key is looked up in Postgres (unless seen
# within a second) and counted against the rate limit before the route runs (producer/api/auth.py).
KEYED: dict[int | str, dict[str, Any]] = {
    401: documented("No key, or a malformed, unknown or revoked one (`unauthorized`)", _CHALLENGE),
    429: documented("Over this key's requests per minute, or too many failed keys from this address "
                    "(`rate_limited`)", RETRY_AFTER),
    500: documented("A bug (`internal_error`); it is logged"),
    503: documented("Postgres cannot be reached (`db_unavailable`); a POST or DELETE changed nothing", RETRY_AFTER),
}
# Any method but GET, HEAD and OPTIONS: the body is measured before the route runs (limits.BodyLimit).
BODY_TOO_LARGE = documented("The body is over IMGQ_API_MAX_BODY_BYTES (`body_too_large`)")


class ApiProblem(Exception):
    """An API refusal with its HTTP status and stable code (not an ImgqError: these codes belong to
    the API, not the CLI)."""

    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.errors = errors


# RFC 9110's names, whatever the Python: 3.11 and 3.12 still say "Unprocessable Entity" and
# "Request Entity Too Large", which 3.13 renamed.
_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


def title(status: int) -> str:
    return _TITLES.get(status) or http.HTTPStatus(status).phrase


def problem(status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
            errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": f"urn:imgq:problem:{code}", "title": title(status),
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


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path. Starlette answers 405 from the first
    route whose path matches, naming only its methods, and FastAPI makes one route per method: PUT
    /v1/jobs named POST, not GET. Each method is asked of the app's routes as the router would
    ask it (FastAPI 0.165 nests included routers in app.routes; older ones list their routes flat).
    A Mount matches every method whatever it serves: a path under one keeps its own answer."""
    found = []
    for method in http.HTTPMethod:
        scope = {**request.scope, "method": method.value}
        if any(not isinstance(route, Mount) and route.matches(scope)[0] is Match.FULL for route in request.app.routes):
            found.append(method.value)
    return found


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else http.HTTPStatus(exc.status_code).phrase
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405 and (methods := allowed_methods(request)):
        headers["Allow"] = ", ".join(methods)
    return problem(exc.status_code, code, detail, headers=headers or None)


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
        accepted = "" if request.method in ("GET", "HEAD") else "; nothing was accepted"  # a read accepts nothing
        return problem(503, "db_unavailable", f"the database is unavailable{accepted}", headers={"Retry-After": "5"})
    log.exception("unexpected error in %s %s", request.method, request.url.path, extra={"action": "api_error"})
    return problem(500, "internal_error", "an unexpected error; it was logged")


# -- the OpenAPI document -------------------------------------------------------------------------

def _truthful(doc: dict[str, Any]) -> None:
    """Add the Problem schema the routes' ``responses=`` refer to, and drop FastAPI's own 422 (an
    application/json HTTPValidationError): every validation error here is a Problem, and a route
    that can answer 422 declares it with its codes. FastAPI adds one to every route with a
    parameter that declares none, such as GET /v1/jobs/{job_id}, whose string id cannot fail."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    schemas.update(problem_schema.pop("$defs", {}))
    schemas["Problem"] = problem_schema
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {})
            if content.get("application/json", {}).get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
            operation["responses"] = dict(sorted(responses.items()))  # by status, whatever order routes gave
    if "HTTPValidationError" not in str(doc.get("paths")):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)


def _document(app: FastAPI) -> None:
    """``app.openapi`` made once, then corrected by :func:`_truthful` (FastAPI caches the result)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _truthful(build())  # build() stores the document in app.openapi_schema
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    _document(app)
    app.add_exception_handler(ApiProblem, _api_problem)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(errors.ImgqError, _imgq)
    from sqlalchemy.exc import InterfaceError, OperationalError

    for cls in (OperationalError, InterfaceError):  # answered here, not re-raised as a server error
        app.add_exception_handler(cls, _unexpected)
    app.add_exception_handler(Exception, _unexpected)
