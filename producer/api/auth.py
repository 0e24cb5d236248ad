"""Authentication: every /v1 route takes ``Authorization: Bearer imgq_<id>_<secret>``.

No key, a malformed, unknown or revoked key, or a key of IMGQ_TENANT (the operators' tenant: one
made before ``imgq apikey create`` refused it): 401 ``unauthorized`` with ``WWW-Authenticate:
Bearer``. A valid key is then counted against its per-minute budget (429 ``rate_limited``).

A verified key is remembered for KEY_TTL_S (1 s) by this process (by the SHA-256 of the whole
key, so an unknown key is looked up every time): a revoked key stops within a second, and a
burst of requests with one key costs one lookup. An address that keeps failing is refused
before the lookup (429, producer/api/auth_throttle.py).
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from imgq.db.tenancy import Principal, verify_key
from imgq.producer.api.problems import ApiProblem

bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="An API key from `imgq apikey create`: imgq_<id>_<secret>.")


def _unauthorized(detail: str, error: str | None = None) -> ApiProblem:
    challenge = 'Bearer realm="imgq"' + (f', error="{error}"' if error else "")
    return ApiProblem(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})


async def principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The caller, from its bearer key; counts the request against the key's rate limit. On the
    event loop: only a key not seen within KEY_TTL_S goes to the database (in the threadpool)."""
    if credentials is None or not credentials.credentials.strip():
        raise _unauthorized("an API key is required: Authorization: Bearer imgq_...")
    context = request.app.state.imgq
    key = credentials.credentials.strip()
    digest = hashlib.sha256(key.encode()).digest()
    found = context.principals.peek(digest)
    if found is None:
        address = request.client.host if request.client is not None else ""
        retry = context.auth_throttle.retry_after(address, digest)
        if retry is not None:
            raise ApiProblem(429, "rate_limited", f"too many failed authentications from this address; retry in "
                             f"{retry} s", headers={"Retry-After": str(retry)})
        reserved = context.settings.tenant
        found = await run_in_threadpool(context.principals.get, digest,
                                        lambda: verify_key(context.engine, key, reserved=reserved))
        if found is None:
            context.auth_throttle.failed(address)
        else:
            context.auth_throttle.verified(digest)
    if found is None:
        raise _unauthorized("the API key is invalid or revoked", "invalid_token")
    await context.limiter.hit(found)
    request.state.principal = found
    return found


Caller = Annotated[Principal, Depends(principal)]
