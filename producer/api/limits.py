"""The API's limits: body size (an ASGI middleware), refs per request, and requests per key per minute.

The rate limit is a fixed one-minute window per key in Redis (``INCR`` + ``EXPIRE`` in one
round trip), so every API replica counts against the same budget. A key may exceed its budget by
at most one window's worth across a window boundary: the price of one round trip per request.
If Redis cannot be reached the request is let through (and logged): the broker being down must
not take the read side of the API with it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgq.config import Settings
from imgq.db.tenancy import Principal
from imgq.producer.api.problems import ApiProblem, problem

log = logging.getLogger(__name__)

WINDOW_S = 60


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with 413 ``body_too_large``: at once when its
    Content-Length says so, else as soon as the streamed body passes the limit. The body is read
    here (it is small by construction) and handed on to the app unchanged."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await problem(400, "bad_request", "Content-Length is not a number")(scope, receive, send)
                return
            if declared > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await problem(413, "body_too_large", f"the request body is over {self.max_bytes} bytes "
                      "(IMGQ_API_MAX_BODY_BYTES)", headers={"Connection": "close"})(scope, receive, send)


def max_refs(principal: Principal, settings: Settings) -> int:
    """Refs one request may name (or a prefix expand to): the tenant's ``max_refs``, else IMGQ_API_MAX_REFS."""
    return int(principal.limits.get("max_refs") or settings.api_max_refs)


def too_many_refs(limit: int) -> ApiProblem:
    return ApiProblem(413, "too_many_refs", f"a job may name at most {limit} images per request (split it, "
                      "or ask for a higher max_refs); nothing was accepted")


def redis_client(url: str) -> Any:
    """An asyncio redis-py client for the broker URL (``redis://``, ``rediss://`` or kombu's
    ``redis+socket://``); it connects on first use, on the server's event loop."""
    import redis.asyncio as redis

    if url.startswith("redis+socket://"):
        url = "unix://" + url[len("redis+socket://"):]
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30)


class RateLimiter:
    """Requests per key per minute, counted in Redis (from the event loop: asyncio client)."""

    def __init__(self, client: Any, default_per_minute: int, clock: Any = time.time) -> None:
        self._client = client
        self._default = default_per_minute
        self._clock = clock

    def limit_for(self, principal: Principal) -> int:
        return int(principal.limits.get("requests_per_minute") or self._default)

    async def hit(self, principal: Principal) -> None:
        """Count one request of this key; raise 429 ``rate_limited`` past its budget."""
        now = self._clock()
        window = int(now // WINDOW_S)
        key = f"imgq:api:rate:{principal.key_id}:{window}"
        try:
            pipe = self._client.pipeline(transaction=False)  # one round trip; EXPIRE follows INCR
            pipe.incr(key)
            pipe.expire(key, 2 * WINDOW_S)
            count = int((await pipe.execute())[0])
        except Exception as exc:  # Redis down: let the request through rather than fail it
            log.warning("rate limit not counted (Redis: %s)", exc, extra={"action": "api_rate_unavailable"})
            return
        limit = self.limit_for(principal)
        if count > limit:
            retry = max(1, math.ceil((window + 1) * WINDOW_S - now))
            raise ApiProblem(429, "rate_limited", f"over {limit} requests per minute for this key; retry in "
                             f"{retry} s", headers={"Retry-After": str(retry)})
