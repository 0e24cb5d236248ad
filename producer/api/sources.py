"""What one tenant may name: its buckets and roots, within the global allow-lists, at this moment.

A ref outside them is refused with 422 ``source_not_allowed`` whichever tenant owns it, so the
answer never tells one tenant about another's sources. Refs are then expanded with allow-lists
cut down to the tenant's, so a folder walk or a symlink cannot lead outside them either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from imgq.classify import classify
from imgq.config import Settings
from imgq.db.tenancy import Principal, effective_sources
from imgq.errors import RefRefused, Retryable
from imgq.producer.api.problems import ApiProblem
from imgq.refs import Ref, confine, parse_ref

log = logging.getLogger(__name__)

_SCHEMES = ("http://", "https://", "file://", "ftp://", "gs://", "data:")


def tenant_settings(settings: Settings, principal: Principal) -> Settings:
    """``settings`` with the allow-lists cut down to the tenant's sources."""
    buckets, roots = effective_sources(principal, allowed_buckets=settings.allowed_buckets,
                                       local_roots=settings.local_roots)
    return settings.model_copy(update={"allowed_buckets": buckets, "local_roots": roots})


def not_allowed(raw: str, *, submitting: bool = True) -> ApiProblem:
    """``submitting``: a job's ref (the whole request is refused); else a read's (images, search)."""
    return ApiProblem(422, "source_not_allowed", f"{raw!r} is not within this key's sources (its tenant's "
                      "buckets and roots)" + ("; nothing was accepted" if submitting else ""))


def check_source(raw: str, scoped: Settings, *, submitting: bool = True) -> None:
    """Raise 422 ``source_not_allowed`` if ``raw`` names a bucket or path outside the tenant's
    sources, and 422 ``bad_ref`` for a relative path (the API process's working directory means
    nothing to a client: `photos/x.jpg` was resolved against it). Other malformed refs are left to
    the parser (``bad_ref``)."""
    text = raw.strip()
    if text.lower().startswith("s3://"):
        bucket = text[5:].split("/", 1)[0]
        if bucket and bucket not in scoped.allowed_buckets:
            raise not_allowed(raw, submitting=submitting)
        return
    if not text or "://" in text or text.lower().startswith(_SCHEMES) or any(ord(c) < 0x20 for c in text):
        return
    if not text.startswith("/"):
        raise ApiProblem(422, "bad_ref", f"{raw!r} is not an absolute path: over HTTP a local ref is a path "
                         "starting with /" + ("; nothing was accepted" if submitting else ""))
    try:
        confine(Path(text), scoped.local_roots)
    except (RefRefused, OSError, ValueError):
        raise not_allowed(raw, submitting=submitting) from None


def parse_scoped(raw: str, scoped: Settings) -> Ref:
    """One object ref within the tenant's sources (a read's: images, search, a retry's check)."""
    check_source(raw, scoped, submitting=False)
    return parse_ref(raw.strip(), allowed_buckets=scoped.allowed_buckets, local_roots=scoped.local_roots)


def within(raw: str, scoped: Settings) -> bool:
    """Whether an accepted ref is still within the tenant's sources (they may have narrowed since)."""
    try:
        parse_scoped(raw, scoped)
    except (ApiProblem, RefRefused, ValueError):
        return False
    return True


def expand_refs(
    raws: Iterable[str], scoped: Settings, *, limit: int, skip_invalid: bool, rejected: list[tuple[str, str]],
    prefix: bool = False, s3_client: Any = None,
) -> Iterator[str]:
    """Object refs for the given refs, within the tenant's sources, at most ``limit`` of them
    (413 ``too_many_refs`` past it). With ``prefix``, ``s3://bucket/p`` lists every key that
    starts with ``p``, trailing slash or not (a request's ``prefix`` field)."""
    from imgq.producer.api.limits import too_many_refs
    from imgq.producer.expand import Expander

    expand = Expander(scoped, s3_client)
    count = 0
    listed_bad = rejected.append if skip_invalid else None
    for raw in raws:
        try:
            check_source(raw, scoped)
            if prefix and raw.strip().lower().startswith("s3://"):
                found: Iterable[str] = expand.list_prefix(raw, listed_bad)
            else:
                found = expand.lazily(raw, listed_bad)
            for ref in found:
                count += 1
                if count > limit:
                    raise too_many_refs(limit)
                yield ref
        except (RefRefused, ApiProblem) as exc:
            if not skip_invalid or (isinstance(exc, ApiProblem) and exc.code == "too_many_refs"):
                raise
            reason = exc.message if isinstance(exc, RefRefused) else exc.detail
            rejected.append((raw, reason.removesuffix("; nothing was accepted")))  # the rest was
        except Exception as exc:
            if not type(exc).__module__.startswith(("botocore", "boto3")):
                raise
            known = classify(exc)
            if isinstance(known, Retryable):  # S3 away or throttling: the same request will do later
                # Not the message: it names the S3 endpoint's address (the log has it).
                log.warning("cannot list %r now: %s", raw, known.message, extra={"action": "s3_unavailable"})
                raise ApiProblem(503, "s3_unavailable", f"cannot list {raw!r} now (S3 unreachable or throttling); "
                                 "nothing was accepted, try again", headers={"Retry-After": "5"}) from None
            raise ApiProblem(422, "bad_ref", f"cannot list {raw!r}: {known.message}; nothing was accepted") from None

