"""The API application: ``create_app(settings)``, served by ``imgq api`` (uvicorn).

One process holds one pooled engine (routes that touch Postgres are plain ``def``: they run in
the threadpool and each takes a pooled connection), one asyncio Redis client for the rate limit,
one Celery app for publishing, and two 1-second caches that serve polling from the event loop:
verified keys, and job progress. ``app.state.imgq`` is the :class:`ApiContext`; ``app.state.engine`` and
``app.state.settings`` are the same objects, for routers that want only those (the jobs page).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from imgq.config import Settings
from imgq.producer.api import problems
from imgq.producer.api.auth_throttle import AuthThrottle
from imgq.producer.api.cache import TtlCache
from imgq.producer.api.health import Readiness
from imgq.producer.api.limits import BodyLimit, RateLimiter, redis_client

# Connections per API process: routes run in a threadpool of 40, and each holds one only for
# its queries; past the pool a request waits for a connection (pool_timeout). No overflow: an
# overflow connection is closed when returned, and opening one (a Postgres backend) costs more
# than waiting for a pooled one.
POOL_SIZE = 16
MAX_OVERFLOW = 0
# Job progress is polled; within this many seconds every poll of one job shares one count.
SUMMARY_TTL_S = 1.0
# A verified key is remembered this long: a revoked key stops within it (producer/api/auth.py).
KEY_TTL_S = 1.0

DESCRIPTION = """Caption, embed and search images with BLIP over HTTP.

Every `/v1` route takes `Authorization: Bearer imgq_<id>_<secret>` (a key from `imgq apikey create`);
a key sees only its tenant's jobs and sources. Errors are `application/problem+json` with a stable
`code`. See docs/api.md."""


class ApiContext:
    """What the routes share: settings, the pooled engine, the store, the rate limiter, and the
    Celery app (made on first use: reading needs no broker)."""

    def __init__(self, settings: Settings, engine: Any = None, redis: Any = None) -> None:
        from imgq.db.store import Store, make_engine

        self.settings = settings
        # No ping per checkout (a round trip per request): a connection that died with a Postgres
        # restart fails one request (503, db_unavailable) and is replaced; all are recycled hourly.
        self.engine = engine or make_engine(settings.sync_database_url, pool_size=POOL_SIZE,
                                            max_overflow=MAX_OVERFLOW, pool_timeout=10, pool_pre_ping=False,
                                            pool_recycle=3600)
        self.store = Store(self.engine)
        self.redis = redis or redis_client(settings.broker_url)
        self.limiter = RateLimiter(self.redis, settings.api_requests_per_minute)
        self.readiness = Readiness(self.engine, self.redis)
        self.auth_throttle = AuthThrottle(settings.api_auth_failures_per_minute)
        self.encoder: Any = None  # the text encoder of /v1/search, loaded on first use
        self.summaries = TtlCache(SUMMARY_TTL_S)  # GET /v1/jobs/{id}, per (tenant, job)
        self.principals = TtlCache(KEY_TTL_S)  # verified keys, by the SHA-256 of the whole key
        self._celery: Any = None
        self._lock = threading.Lock()

    @property
    def celery(self) -> Any:
        with self._lock:
            if self._celery is None:
                from imgq.celeryconf import make_celery

                self._celery = make_celery(self.settings)
            return self._celery

    async def close(self) -> None:
        self.engine.dispose()
        with contextlib.suppress(Exception):  # closing a broken connection
            await self.redis.aclose()


def create_app(settings: Settings, context: ApiContext | None = None) -> FastAPI:
    """The API: /v1 routes (auth always on), /healthz and /readyz, the jobs page (/ui), OpenAPI at /docs."""
    from imgq.producer.api import docs_page, health, images, jobs

    ctx = context or ApiContext(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await ctx.close()

    app = FastAPI(title="imgq", version="1", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, openapi_url="/openapi.json", redoc_url=None)
    app.state.imgq = ctx
    app.state.engine = ctx.engine
    app.state.settings = settings
    problems.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)

    docs_page.install(app)  # /docs, without a CDN
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(images.router)
    # The jobs page (/ui and POST /v1/ui-sessions), producer/api/ui.py.
    from imgq.producer.api import ui

    app.include_router(ui.router)
    return app


def from_env() -> FastAPI:
    """The app from the IMGQ_* environment: the factory each `imgq api --workers N` process calls."""
    return create_app(Settings())
