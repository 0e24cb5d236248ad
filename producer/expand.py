"""Turn user references into object references: S3 prefixes are listed, local folders walked."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imgq.config import Settings
from imgq.errors import RefRefused
from imgq.refs import confine, parse_ref, s3_object_ref, split_s3
from imgq.s3 import make_s3_client

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


OnBad = Callable[[tuple[str, str]], None]  # takes (ref, reason): a listed key refused, the listing goes on


def _list_s3(client: Any, bucket: str, prefix: str, on_bad: OnBad | None = None) -> Iterator[str]:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]  # exactly as S3 returns it: a trailing space is part of the key
            if key.endswith("/"):
                continue
            if _CONTROL.search(key):
                reason = f"s3://{bucket}/{key!r} has control characters in its key"
                if on_bad is None:
                    raise RefRefused(reason)
                on_bad((f"s3://{bucket}/{key!r}", reason))
                continue
            yield f"s3://{bucket}/{key}"


def _walk(root: Path, roots: list[Path]) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Hidden folders (.ssh, .git, ...) are not walked, like hidden files.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                resolved = confine(path, roots)  # a symlink leading outside is skipped, not followed
            except RefRefused:
                continue
            if regular_file(resolved):  # FIFOs, sockets and devices are skipped
                yield str(resolved)


def regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class Expander:
    """Turns one user reference into object references; the S3 client is made once, on demand."""

    def __init__(self, settings: Settings, s3_client: Any = None) -> None:
        self._settings = settings
        self._s3 = s3_client
        self._buckets = frozenset(settings.allowed_buckets)

    def list_prefix(self, raw: str, on_bad: OnBad | None = None) -> Iterator[str]:
        """Every object whose key starts with the prefix of ``s3://bucket/prefix``, slash or not. A
        key that cannot be a ref raises :class:`RefRefused`, or with ``on_bad`` is reported there
        and the listing goes on (``--skip-invalid``: one bad key must not hide the keys after it)."""
        bucket, prefix = split_s3(raw.strip(), self._settings.allowed_buckets)
        if self._s3 is None:
            self._s3 = make_s3_client(self._settings)
        return _list_s3(self._s3, bucket, prefix, on_bad)

    def object_ref(self, raw: str) -> str | None:
        """The canonical ref of ``raw`` when it names one S3 object, the common case of a backfill
        (no list made); None when it is anything else (ask :meth:`__call__`)."""
        raw = raw.strip()
        if not (raw.startswith("s3://") or raw[:5].lower() == "s3://") or raw.endswith("/"):
            return None
        return s3_object_ref(raw, self._buckets)

    def __call__(self, raw: str, on_bad: OnBad | None = None) -> list[str]:
        """Canonical single-object refs for ``raw``; raises :class:`RefRefused` if it is bad (and,
        without ``on_bad``, if a key listed under it is). Comment and blank lines of a refs file are
        the file reader's to drop: an empty ref here is refused, never silently nothing."""
        return list(self.lazily(raw, on_bad))

    def lazily(self, raw: str, on_bad: OnBad | None = None) -> Iterator[str]:
        """As calling the expander, but a prefix or folder is listed only as far as the caller reads
        (the API stops one past its refs limit, however big the bucket); errors come with the
        first ref asked for."""
        raw = raw.strip()
        if not raw:
            raise RefRefused("empty reference")
        settings = self._settings
        if raw.lower().startswith("s3://"):
            if raw.endswith("/"):
                yield from self.list_prefix(raw, on_bad)
                return
            yield s3_object_ref(raw, settings.allowed_buckets)
            return
        ref = parse_ref(raw, allowed_buckets=settings.allowed_buckets, local_roots=settings.local_roots)
        path = Path(str(ref))
        if path.is_dir():
            yield from _walk(path, settings.local_roots)
            return
        if path.exists() and not regular_file(path):
            raise RefRefused(f"{raw!r} is not a regular file (a FIFO, socket or device)")
        yield str(ref)

