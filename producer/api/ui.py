"""The jobs page (/ui): a tenant's recent jobs with progress, rate, ETA and dead letters by code, and
each job's dead letters with a button to retry them. Server-rendered (ui_html.py), no build step.

Authentication uses the API's keys. A browser cannot send a bearer header, so:

- ``POST /v1/ui-sessions`` (bearer key) returns a one-time login link, valid 5 minutes;
- ``GET /ui/login?token=`` spends it for a session cookie (8 h) and redirects to ``next``;
- or the form at ``/ui/login`` takes the key itself.

The cookie is HttpOnly, SameSite=Strict, Path=/ui, and Secure when the page is served over https.
Each request resolves the session's key again, so a revoked key's sessions stop at once. Every POST
carries a CSRF token bound to the session (db/ui_sessions.csrf_token) and is refused when the
browser says it comes from another site. A tenant sees only its own jobs: another's is a 404.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from anyio import from_thread
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from imgq.db import jobs_page, ui_sessions
from imgq.db.tenancy import principal_for_key_id, verify_key
from imgq.producer.api import ui_html
from imgq.producer.api.auth import Caller
from imgq.producer.api.problems import BODY_TOO_LARGE, KEYED, ApiProblem
from imgq.producer.api.schemas import UiSession

log = logging.getLogger(__name__)

router = APIRouter()

COOKIE = "imgq_ui"
RECENT_JOBS = 50
DEAD_LETTERS_SHOWN = 200
_FORM_BYTES = 8192


def _engine(request: Request) -> Any:
    return request.app.state.engine


def _headers() -> dict[str, str]:
    return {"Content-Security-Policy": ui_html.CSP, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"}


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=_headers())


def _redirect(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303, headers=_headers())


def safe_next(value: str | None) -> str:
    """Where a login may send the browser: a path of this page only (never another host, nor a
    dot segment, even percent-encoded, that a browser would resolve to a path outside /ui)."""
    if not value or "\\" in value or any(ord(c) < 0x20 for c in value):
        return "/ui"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not (parts.path == "/ui" or parts.path.startswith("/ui/")):
        return "/ui"
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        return "/ui"
    return value


def _same_site(request: Request) -> bool:
    """Refuse a form posted from another site (defence in depth beside SameSite=Strict and the token).
    Browsers say where a request comes from (Sec-Fetch-Site); without that header, Origin must name
    the host the request reached."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc == request.headers.get("host", "")


def _https(request: Request) -> bool:
    """Served over https, here or at a proxy in front. A forged X-Forwarded-Proto can only add the
    Secure flag to a cookie, which never weakens it."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _set_cookie(request: Request, response: Response, token: str) -> None:
    response.set_cookie(COOKIE, token, max_age=int(ui_sessions.SESSION_TTL.total_seconds()), path="/ui",
                        httponly=True, samesite="strict", secure=_https(request))


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > _FORM_BYTES:
        return {}
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    except ValueError:  # more fields than any of these forms has: treated as an empty form
        return {}
    return {k: v[0] for k, v in fields.items()}


def _reserved(request: Request) -> str:
    return str(request.app.state.imgq.settings.tenant)


def _session(request: Request) -> tuple[str, Any] | None:
    """The cookie's session token and principal, or None (no cookie, expired, or key revoked)."""
    token = request.cookies.get(COOKIE)
    engine = _engine(request)
    key_id = ui_sessions.session_key_id(engine, token)
    if key_id is None:
        return None
    principal = principal_for_key_id(engine, key_id, reserved=_reserved(request))
    return None if principal is None else (token, principal)  # type: ignore[return-value]


def _job_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _not_found() -> HTMLResponse:
    return _html(ui_html.message_page("Not found", "No such job."), 404)


# -- logging in ---------------------------------------------------------------------------------


# response_model documents the body; the route still answers its own JSONResponse, so the JSON
# (expires_at as isoformat(), "+00:00") and the Cache-Control header stay what clients already read.
@router.post("/v1/ui-sessions", status_code=201, tags=["ui"], response_model=UiSession, responses={
    **KEYED,
    201: {"description": "The link (never cached)",
          "headers": {"Cache-Control": {"description": "no-store", "schema": {"type": "string"}}}},
    413: BODY_TOO_LARGE})
def create_ui_session(request: Request, caller: Caller) -> JSONResponse:
    """A one-time link that opens the jobs page (/ui) in a browser as this key: valid 5 minutes, once.
    Add ``&next=/ui/jobs/<id>`` to land on one job (docs/jobs-page.md)."""
    token = ui_sessions.create_login(_engine(request), caller.key_id)
    path = f"/ui/login?token={token}"
    expires = dt.datetime.now(dt.UTC) + ui_sessions.LOGIN_TTL
    log.info("ui login link", extra={"action": "ui_login_link", "tenant": caller.tenant, "key_id": caller.key_id})
    base = str(request.base_url).rstrip("/")
    if _https(request) and base.startswith("http://"):
        base = "https://" + base[len("http://"):]
    return JSONResponse({"login_url": base + path, "login_path": path,
                         "expires_at": expires.isoformat()}, status_code=201, headers={"Cache-Control": "no-store"})


@router.get("/ui/login", include_in_schema=False)
def login(request: Request, token: str | None = None, next: str | None = None) -> Response:
    target = safe_next(next)
    if token is None:
        return _html(ui_html.login_page(target))
    engine = _engine(request)
    if request.headers.get("sec-fetch-site") not in ("none", "same-origin"):
        # Not typed or pasted into the address bar (nor opened from this site): another site, a mail
        # or a chat, or a browser that does not say. Spent only by the confirm page's same-site
        # POST, so a link of another tenant cannot log this browser in unseen (login CSRF).
        key_id = ui_sessions.login_key_id(engine, token)
        principal = None if key_id is None else principal_for_key_id(engine, key_id, reserved=_reserved(request))
        if principal is None:
            return _html(ui_html.login_page(target, _SPENT), 401)
        return _html(ui_html.confirm_login_page(token, target, principal.tenant))
    return _exchange(request, token, target)


_SPENT = "This login link is unknown, used or expired: ask for a new one."


def _exchange(request: Request, token: str, target: str) -> Response:
    engine = _engine(request)
    key_id = ui_sessions.login_key_id(engine, token)
    # A link of a key the API refuses now (revoked since, or IMGQ_TENANT's, reserved for the CLI)
    # is not spent and makes no session.
    if key_id is None or principal_for_key_id(engine, key_id, reserved=_reserved(request)) is None:
        return _html(ui_html.login_page(target, _SPENT), 401)
    spent = ui_sessions.exchange_login(engine, token)
    if spent is None:
        return _html(ui_html.login_page(target, _SPENT), 401)
    session, key_id = spent
    log.info("ui login", extra={"action": "ui_login", "key_id": key_id, "via": "link"})
    response = _redirect(target)
    _set_cookie(request, response, session)
    return response


async def _login_form(request: Request) -> tuple[dict[str, str], str, Response | None]:
    """A posted login form, where it sends the browser, and the 403 if it came from another site."""
    form = await _form(request)
    target = safe_next(form.get("next"))
    if _same_site(request):
        return form, target, None
    return form, target, _html(ui_html.message_page("Refused", "This form was posted from another site."), 403)


@router.post("/ui/login/link", include_in_schema=False)
async def login_link(request: Request) -> Response:
    """The confirm page's button: spends the link, from this site only."""
    form, target, refused = await _login_form(request)
    if refused is not None:
        return refused
    return await run_in_threadpool(_exchange, request, form.get("token", ""), target)


@router.post("/ui/login", include_in_schema=False)
async def login_form(request: Request) -> Response:
    form, target, refused = await _login_form(request)
    if refused is not None:
        return refused
    engine = _engine(request)
    key, reserved = form.get("key", "").strip(), _reserved(request)
    principal = await run_in_threadpool(lambda: verify_key(engine, key, reserved=reserved))
    if principal is None:
        return _html(ui_html.login_page(target, "That API key is unknown or revoked."), 401)
    over = await _over_limit(request, principal)  # each login makes a session row
    if over is not None:
        return over
    session = await run_in_threadpool(ui_sessions.create_session, engine, principal.key_id)
    log.info("ui login", extra={"action": "ui_login", "key_id": principal.key_id, "via": "form"})
    response = _redirect(target)
    _set_cookie(request, response, session)
    return response


@router.post("/ui/logout", include_in_schema=False)
async def logout(request: Request) -> Response:
    form = await _form(request)
    token = request.cookies.get(COOKIE)
    if token and _same_site(request) and ui_sessions.csrf_ok(token, form.get("csrf")):
        await run_in_threadpool(ui_sessions.end_session, _engine(request), token)
    response = _redirect("/ui/login")
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict", secure=_https(request))
    return response


# -- pages --------------------------------------------------------------------------------------


def _page(request: Request, render: Callable[[str, Any], Response]) -> Response:
    found = _session(request)
    if found is None:
        return _redirect(ui_html.login_path(request.url.path))
    over = from_thread.run(_over_limit, request, found[1])
    return over if over is not None else render(*found)


async def _over_limit(request: Request, principal: Any) -> Response | None:
    """Count one request against the key's rate limit, as /v1 does; the 429 as a page."""
    try:
        await request.app.state.imgq.limiter.hit(principal)
    except ApiProblem as exc:
        if exc.status != 429:
            raise
        response = _html(ui_html.message_page("Too many requests", exc.detail), 429)
        response.headers.update(exc.headers)
        return response
    return None


@router.get("/ui", include_in_schema=False)
def jobs(request: Request) -> Response:
    def render(token: str, principal: Any) -> Response:
        recent = jobs_page.recent_jobs(_engine(request), principal.tenant, RECENT_JOBS)
        return _html(ui_html.jobs_page(recent, principal, ui_sessions.csrf_token(token)))

    return _page(request, render)


@router.get("/ui/jobs/{job_id}", include_in_schema=False)
def job(request: Request, job_id: str, retried: int | None = None, cancelled: int | None = None) -> Response:
    def render(token: str, principal: Any) -> Response:
        job = _job_id(job_id)
        engine = _engine(request)
        summary = None if job is None else jobs_page.job_summary(engine, principal.tenant, job)
        if summary is None:
            return _not_found()
        letters = jobs_page.dead_letters(engine, principal.tenant, summary.id, DEAD_LETTERS_SHOWN)
        return _html(ui_html.job_page(summary, letters, principal, ui_sessions.csrf_token(token),
                                      retried=retried, cancelled=cancelled, limit=DEAD_LETTERS_SHOWN))

    return _page(request, render)


@router.get("/ui/jobs/{job_id}/cancel", include_in_schema=False)
def confirm_cancel(request: Request, job_id: str) -> Response:
    def render(token: str, principal: Any) -> Response:
        job = _job_id(job_id)
        summary = None if job is None else jobs_page.job_summary(_engine(request), principal.tenant, job)
        if summary is None:
            return _not_found()
        return _html(ui_html.cancel_page(summary, principal, ui_sessions.csrf_token(token)))

    return _page(request, render)


@router.post("/ui/jobs/{job_id}/retry-dead", include_in_schema=False)
async def retry_dead(request: Request, job_id: str) -> Response:
    return await _act(request, job_id, "retried", _retry, "ui_retry_dead")


@router.post("/ui/jobs/{job_id}/cancel", include_in_schema=False)
async def cancel(request: Request, job_id: str) -> Response:
    return await _act(request, job_id, "cancelled", _cancel, "ui_cancel")


async def _act(request: Request, job_id: str, done: str, act: Callable[[Request, Any, str], int],
               action: str) -> Response:
    """A job page's form: the session, its CSRF token and the rate limit checked as for every
    form, then ``act`` (what the /v1 route does, as this session's principal); back to the page
    with ``?{done}=N``."""
    form = await _form(request)
    found = await run_in_threadpool(_session, request)
    if found is None:
        return _html(ui_html.message_page("Logged out", "Your session ended: log in again."), 401)
    token, principal = found
    if not _same_site(request) or not ui_sessions.csrf_ok(token, form.get("csrf")):
        return _html(ui_html.message_page("Refused", "This form's token is missing or stale: reload the page."), 403)
    over = await _over_limit(request, principal)
    if over is not None:
        return over
    try:
        count = await run_in_threadpool(act, request, principal, job_id)
    except ApiProblem as exc:
        if exc.status == 404:
            return _not_found()
        return _html(ui_html.message_page(f"Not {done}", exc.detail), exc.status)
    log.info(action.replace("_", " "), extra={"action": action, "job_id": job_id, "tenant": principal.tenant,
                                              done: count})
    return _redirect(f"/ui/jobs/{uuid.UUID(job_id)}?{done}={count}")


def _retry(request: Request, principal: Any, job_id: str) -> int:
    """What POST /v1/jobs/{id}/retry-dead does, as this session's principal (the same checks: the
    tenant's job, not cancelled; then the feeder publishes what it can at once)."""
    from imgq.producer.api.jobs import retry_dead as api_retry_dead

    return api_retry_dead(job_id, request, principal).requeued


def _cancel(request: Request, principal: Any, job_id: str) -> int:
    """What DELETE /v1/jobs/{id} does, as this session's principal."""
    from imgq.producer.api.jobs import cancel_job

    return cancel_job(job_id, request, principal).cancelled
