"""``GET /healthz`` and ``GET /readyz``: the probes, no key.

``/healthz``: the process serves. ``/readyz``: it can do its work: Postgres answers (every route)
and so does Redis (the rate limit and publishing); what Kubernetes routes traffic by. Checked at
most every ``READY_TTL_S`` per process, each within ``PROBE_DEADLINE_S``: a stalled server makes
the probe say not ready, never hang (imgq.probes). The answer names what failed, never the
driver's message (hosts, sockets and roles; the log has it), as the worker's ``/readyz``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from imgq.probes import PROBE_DEADLINE_S, Deadline

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

READY_TTL_S = 2.0


class Health(BaseModel):
    status: str
    reasons: list[str] | None = None


class Readiness:
    """What keeps this process from serving, cached for ``READY_TTL_S``."""

    def __init__(self, engine: Any, redis: Any, ttl_s: float = READY_TTL_S) -> None:
        self._engine, self._redis, self._ttl_s = engine, redis, ttl_s
        self._select = Deadline(self._select_one)
        self._lock = asyncio.Lock()
        self._at, self._reasons = float("-inf"), ["not checked yet"]

    def _select_one(self) -> None:
        with self._engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    async def reasons(self) -> list[str]:
        async with self._lock:
            if time.monotonic() - self._at > self._ttl_s:
                found = await asyncio.gather(
                    _why_not("database", run_in_threadpool(self._select)),
                    _why_not("redis", asyncio.wait_for(self._redis.ping(), PROBE_DEADLINE_S)))
                self._reasons = [reason for reason in found if reason]
                self._at = time.monotonic()
            return self._reasons


async def _why_not(what: str, answer: Awaitable[Any]) -> str | None:
    """None once ``answer`` comes; else what failed, by name and exception type only."""
    try:
        await answer
    except TimeoutError:
        return f"{what}: no answer within {PROBE_DEADLINE_S:g} s"
    except Exception as exc:
        log.warning("readiness: %s unavailable: %s", what, exc, extra={"action": "readyz"})
        return f"{what} unavailable ({type(exc).__name__})"
    return None


@router.get("/healthz", response_model=Health, response_model_exclude_none=True)
def healthz() -> Health:
    """The process serves (no authentication, no data)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, response_model_exclude_none=True,
            responses={503: {"model": Health, "description": "Not ready"}})
async def readyz(request: Request) -> Any:
    """Postgres and Redis answer (no authentication; what failed, never its message)."""
    reasons = await request.app.state.imgq.readiness.reasons()
    if reasons:
        return JSONResponse({"status": "not ready", "reasons": reasons}, status_code=503)
    return Health(status="ready")
