"""Tenants and their API keys: who may call the HTTP API, on which sources, within which limits.

A key is ``imgq_<id>_<secret>``: the id is public (listings, revocation, jobs-page sessions), the
secret is 32 random bytes of which only the SHA-256 is stored. A secret nobody chose needs no
password stretching; the comparison is constant-time. A tenant's buckets and roots are a subset
of the global allow-lists (IMGQ_ALLOWED_BUCKETS, IMGQ_LOCAL_ROOTS), checked by :func:`check_sources`
when a key is created and intersected again at every request (:func:`effective_sources`), so
narrowing the global lists narrows every tenant at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from imgq.cost import LIMIT_SETTINGS
from imgq.feeding import PRIORITY_MAX, PRIORITY_MIN

log = logging.getLogger(__name__)

KEY_PREFIX = "imgq"
_KEY = re.compile(r"^imgq_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# last_used_at is written at most this often per key, so verifying a key is a read.
LAST_USED_EVERY = dt.timedelta(minutes=1)
_DUMMY_DIGEST = hashlib.sha256(b"no such key").digest()


@dataclass(frozen=True)
class Principal:
    """The caller of one request: its tenant, the key it used, and what that tenant may touch."""

    tenant: str
    key_id: str
    buckets: tuple[str, ...]
    roots: tuple[str, ...]
    limits: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


_UPSERT_TENANT = text("""
INSERT INTO tenants (name, buckets, roots, callback_secret)
VALUES (:name, CAST(:buckets AS text[]), CAST(:roots AS text[]), :secret)
ON CONFLICT (name) DO UPDATE SET
  buckets = ARRAY(SELECT DISTINCT b FROM unnest(tenants.buckets || EXCLUDED.buckets) AS b ORDER BY b),
  roots = ARRAY(SELECT DISTINCT r FROM unnest(tenants.roots || EXCLUDED.roots) AS r ORDER BY r)
RETURNING (xmax = 0) AS created, callback_secret
""")

_INSERT_KEY = text("""
INSERT INTO api_keys (id, tenant, secret_sha256, label) VALUES (:id, :tenant, :digest, :label)
""")

_KEY_ROW = text("""
SELECT k.id, k.tenant, k.secret_sha256, k.revoked_at, k.last_used_at, t.buckets, t.roots, t.limits,
       now() AS now
FROM api_keys k JOIN tenants t ON t.name = k.tenant WHERE k.id = :id
""")

_TOUCH = text("""
UPDATE api_keys SET last_used_at = now()
WHERE id = :id AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => :every))
""")

_REVOKE = text("UPDATE api_keys SET revoked_at = now() WHERE id = :id AND revoked_at IS NULL RETURNING id")

_LIST = text("""
SELECT k.id, k.tenant, k.label, k.created_at, k.last_used_at, k.revoked_at, t.buckets, t.roots
FROM api_keys k JOIN tenants t ON t.name = k.tenant
WHERE CAST(:tenant AS text) IS NULL OR k.tenant = :tenant
ORDER BY k.tenant, k.created_at, k.id
""")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_key(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    found = _KEY.match(key.strip())
    return (found.group(1), found.group(2)) if found else None


def check_sources(
    buckets: Sequence[str], roots: Sequence[str | Path], *, allowed_buckets: Sequence[str],
    local_roots: Sequence[Path],
) -> tuple[list[str], list[str], list[str]]:
    """(buckets, resolved roots, problems): each must lie within the global allow-lists."""
    problems = [f"bucket {b!r} is not in IMGQ_ALLOWED_BUCKETS" for b in buckets if b not in allowed_buckets]
    resolved = []
    for raw in roots:
        root = Path(os.path.realpath(Path(raw).expanduser()))
        if not any(root == g or root.is_relative_to(g) for g in local_roots):
            problems.append(f"root {str(raw)!r} is not inside IMGQ_LOCAL_ROOTS")
        resolved.append(str(root))
    return sorted(set(buckets)), sorted(set(resolved)), problems


def effective_sources(
    principal: Principal, *, allowed_buckets: Sequence[str], local_roots: Sequence[Path]
) -> tuple[list[str], list[Path]]:
    """The tenant's sources that the global allow-lists still allow, now: its buckets that are
    allowed, and the intersection of its roots with IMGQ_LOCAL_ROOTS (a tenant root that holds a
    global root, narrowed since the key was made, keeps that narrower folder; it lost every local
    path before)."""
    buckets = [b for b in principal.buckets if b in allowed_buckets]
    roots: list[Path] = []
    for tenant_root in map(Path, principal.roots):
        for root in local_roots:
            inner = tenant_root if tenant_root.is_relative_to(root) else root if root.is_relative_to(tenant_root) \
                else None
            if inner is not None and inner not in roots:
                roots.append(inner)
    return buckets, roots


def create_key(
    engine: Engine, tenant: str, *, buckets: Sequence[str] = (), roots: Sequence[str] = (), label: str = ""
) -> tuple[str, str | None]:
    """Create an API key for ``tenant``, creating the tenant (with a random callback secret) if it is
    new, or extending its buckets and roots. Returns the full key, shown once, and the tenant's
    callback secret if the tenant was created now (else None). Sources are stored as given: check
    them first with :func:`check_sources`."""
    if not TENANT_NAME.match(tenant):
        raise ValueError(f"tenant name {tenant!r}: use 1-63 letters, digits, dots, underscores or dashes, "
                         "starting with a letter or digit")
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    with engine.begin() as conn:
        created, callback_secret = conn.execute(_UPSERT_TENANT, {
            "name": tenant, "buckets": list(buckets), "roots": [str(r) for r in roots],
            "secret": secrets.token_urlsafe(32),
        }).one()
        conn.execute(_INSERT_KEY, {"id": key_id, "tenant": tenant, "digest": _digest(secret), "label": label})
    return f"{KEY_PREFIX}_{key_id}_{secret}", callback_secret if created else None


def _principal(row: Any) -> Principal:
    return Principal(tenant=row.tenant, key_id=row.id, buckets=tuple(row.buckets or ()),
                     roots=tuple(row.roots or ()), limits=dict(row.limits or {}))


def _usable(row: Any, reserved: str | None) -> bool:
    """Not revoked, and not of ``reserved`` (IMGQ_TENANT, every CLI job's tenant: ``imgq apikey
    create`` refuses it, but a key made before it did, or for a tenant renamed into it, would
    list, read and cancel the operators' jobs)."""
    if row.revoked_at is not None:
        return False
    if reserved is not None and row.tenant == reserved:
        log.warning("API key %s belongs to IMGQ_TENANT %r and is refused; revoke it: imgq apikey revoke %s",
                    row.id, reserved, row.id, extra={"action": "reserved_tenant_key", "key_id": row.id})
        return False
    return True


def verify_key(engine: Engine, key: str, *, reserved: str | None = None) -> Principal | None:
    """The principal of a valid, usable key (``_usable``), else None. The secret's SHA-256 is
    compared in constant time; last_used_at is written at most once a minute per key."""
    parsed = parse_key(key)
    if parsed is None:
        return None
    key_id, secret = parsed
    with engine.connect() as conn:
        row = conn.execute(_KEY_ROW, {"id": key_id}).first()
    stored = bytes(row.secret_sha256) if row is not None else _DUMMY_DIGEST
    if not hmac.compare_digest(_digest(secret), stored) or row is None or not _usable(row, reserved):
        return None
    if row.last_used_at is None or row.now - row.last_used_at >= LAST_USED_EVERY:
        with engine.begin() as conn:
            conn.execute(_TOUCH, {"id": key_id, "every": LAST_USED_EVERY.total_seconds()})
    return _principal(row)


def principal_for_key_id(engine: Engine, key_id: str, *, reserved: str | None = None) -> Principal | None:
    """The principal of a usable key by its id (for sessions opened with that key)."""
    with engine.connect() as conn:
        row = conn.execute(_KEY_ROW, {"id": key_id}).first()
    if row is None or not _usable(row, reserved):
        return None
    return _principal(row)


def revoke_key(engine: Engine, key_id: str) -> bool:
    """Revoke a key; False if there is no such unrevoked key."""
    with engine.begin() as conn:
        return conn.execute(_REVOKE, {"id": key_id}).first() is not None


def list_keys(engine: Engine, tenant: str | None = None) -> list[dict[str, Any]]:
    """Every key (of one tenant), with its tenant's sources; never a secret."""
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(_LIST, {"tenant": tenant}).mappings()]


# What a tenant's ``limits`` may hold, and the type of each (``imgq apikey limits``). Absent: the
# setting's default (IMGQ_API_REQUESTS_PER_MINUTE, IMGQ_API_MAX_REFS, IMGQ_API_PRIORITY,
# IMGQ_MAX_NUM_BEAMS, IMGQ_MAX_NEW_TOKENS, IMGQ_MAX_ITEM_COST).
LIMIT_TYPES: dict[str, type] = {
    "requests_per_minute": int, "max_refs": int, "max_priority": int,
    "num_beams": int, "max_new_tokens": int, "item_cost": float,
}

# The setting that gives each limit its default where the tenant sets none: the API's own limits,
# then the cost limits that every submission path applies (imgq.cost).
LIMIT_DEFAULTS: dict[str, str] = {
    "requests_per_minute": "api_requests_per_minute", "max_refs": "api_max_refs", "max_priority": "api_priority",
} | LIMIT_SETTINGS


def effective_limits(settings: Any, own: dict[str, Any]) -> list[tuple[str, Any, str | None]]:
    """Every limit as an API with these ``settings`` applies it: ``(name, value, setting)``, with
    ``setting`` the IMGQ_ variable the value comes from, or None where it is the tenant's own."""
    out: list[tuple[str, Any, str | None]] = []
    for name, setting in LIMIT_DEFAULTS.items():
        if own.get(name) is not None:
            out.append((name, own[name], None))
        else:
            out.append((name, getattr(settings, setting), f"IMGQ_{setting.upper()}"))
    return out


_SET_LIMITS = text("""
UPDATE tenants SET limits = (limits - CAST(:unset AS text[])) || CAST(:changes AS jsonb)
WHERE name = :tenant RETURNING limits
""")


def parse_limits(assignments: Sequence[str]) -> dict[str, int | float]:
    """``["num_beams=4", "item_cost=20.5"]`` -> typed values; ValueError names what is wrong."""
    out: dict[str, int | float] = {}
    for assignment in assignments:
        name, sep, raw = assignment.partition("=")
        name = name.strip()
        if not sep or name not in LIMIT_TYPES:
            raise ValueError(f"{assignment!r}: use NAME=VALUE with NAME one of {', '.join(LIMIT_TYPES)}")
        try:
            value = LIMIT_TYPES[name](raw.strip())
        except ValueError:
            kind = "an integer" if LIMIT_TYPES[name] is int else "a number"
            raise ValueError(f"{assignment!r}: {name} takes {kind}") from None
        if name == "max_priority" and not PRIORITY_MIN <= value <= PRIORITY_MAX:
            raise ValueError(f"{assignment!r}: max_priority must be within {PRIORITY_MIN:,} .. {PRIORITY_MAX:,}")
        if name != "max_priority" and value <= 0:  # a priority cap may be negative; the rest are sizes
            raise ValueError(f"{assignment!r}: {name} must be positive")
        out[name] = value
    return out


def set_limits(engine: Engine, tenant: str, changes: dict[str, int | float],
               unset: Sequence[str] = ()) -> dict[str, Any] | None:
    """Set and remove limits of ``tenant``; returns its limits now, or None for an unknown tenant.
    API processes see the change within a second (their key cache)."""
    unknown = [name for name in unset if name not in LIMIT_TYPES]
    if unknown:
        raise ValueError(f"--unset {', '.join(unknown)}: not a limit ({', '.join(LIMIT_TYPES)})")
    with engine.begin() as conn:
        row = conn.execute(_SET_LIMITS, {"tenant": tenant, "changes": json.dumps(changes),
                                         "unset": list(unset)}).first()
    return None if row is None else dict(row.limits)
