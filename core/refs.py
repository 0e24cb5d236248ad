"""Image references: parsing and allow-list confinement. Checked at enqueue and again at the worker."""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from imgq.errors import RefRefused
from imgq.storable import unstorable

_S3 = "s3://"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REFUSED_SCHEMES = ("http://", "https://", "file://", "ftp://", "gs://", "data:")


@dataclass(frozen=True, slots=True)
class S3Ref:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{_S3}{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class LocalRef:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


Ref = S3Ref | LocalRef


def _check_text(raw: str) -> str:
    if not raw or not raw.strip():
        raise RefRefused("empty reference")
    if _CONTROL.search(raw):
        raise RefRefused(f"reference contains control characters: {raw!r}")
    if (reason := unstorable(raw)) is not None:
        raise RefRefused(f"reference contains {reason}: {raw!r}")
    if len(raw) > 2048:
        raise RefRefused("reference longer than 2048 characters")
    # Not stripped: an S3 key may end in a space, and a stored ref must name the object it named
    # at enqueue. The producer strips what a user typed before it gets here.
    return raw


def split_s3(raw: str, allowed_buckets: list[str]) -> tuple[str, str]:
    """``s3://bucket/key-or-prefix`` -> (bucket, rest), refusing buckets off the allow-list."""
    bucket, _, rest = raw[len(_S3) :].partition("/")
    if not bucket:
        raise RefRefused(f"no bucket in {raw!r}")
    if bucket not in allowed_buckets:
        raise RefRefused(f"bucket {bucket!r} is not in IMGQ_ALLOWED_BUCKETS")
    return bucket, rest


def confine(path: Path, roots: list[Path]) -> Path:
    """Resolve ``path`` (following symlinks) and require it to lie inside one of ``roots``."""
    if not roots:
        raise RefRefused("local refs are disabled: IMGQ_LOCAL_ROOTS is empty")
    resolved = Path(os.path.realpath(path))
    if os.path.realpath(resolved) != str(resolved):
        # realpath gives up at a symlink loop and keeps the rest as written: root/loop/../out
        # comes back as root/out, a symlink that still leads outside.
        raise RefRefused(f"{str(path)!r} cannot be resolved (a symlink loop)")
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    raise RefRefused(f"{str(path)!r} is outside IMGQ_LOCAL_ROOTS")


def s3_object_ref(raw: str, allowed_buckets: Collection[str]) -> str:
    """The canonical ref of ``s3://bucket/key`` (the scheme in any case) naming one object: the
    checks of :func:`parse_ref`, in its order and with its messages, at a fifth of its cost (the
    producer validates every ref of a backfill with it)."""
    if len(raw) > 2048 or not (raw.isascii() and raw.isprintable()):
        _check_text(raw)  # ASCII and printable is exactly "no control character" for ASCII text
    bucket, _, key = raw[5:].partition("/")
    if not bucket or bucket not in allowed_buckets:
        split_s3(raw, list(allowed_buckets))  # raises with its message
    if not key or key.endswith("/"):
        raise RefRefused(f"{raw!r} names no object key")
    return raw if raw.startswith(_S3) else f"{_S3}{bucket}/{key}"


def parse_ref(raw: str, *, allowed_buckets: list[str], local_roots: list[Path]) -> Ref:
    """Parse one user reference to a single object. Prefixes are expanded by the producer."""
    raw = _check_text(raw)
    lowered = raw.lower()
    if lowered.startswith(_S3):
        bucket, key = split_s3(raw, allowed_buckets)
        if not key or key.endswith("/"):
            raise RefRefused(f"{raw!r} names no object key")
        return S3Ref(bucket, key)
    if lowered.startswith(_REFUSED_SCHEMES) or "://" in raw:
        raise RefRefused(f"URLs are not accepted: {raw!r}; use s3://bucket/key or a local path")
    return LocalRef(confine(Path(raw).expanduser().absolute(), local_roots))
