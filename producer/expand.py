"""Turn user references into object references: S3 prefixes are listed, local folders walked."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgq.config import Settings
from imgq.errors import RefRefused
from imgq.refs import confine, parse_ref, split_s3
from imgq.s3 import make_s3_client


def _list_s3(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield f"s3://{bucket}/{obj['Key']}"


def _walk(root: Path, roots: list[Path]) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                yield str(confine(path, roots))  # a symlink leading outside is skipped, not followed
            except RefRefused:
                continue


class Expander:
    """Turns one user reference into object references; the S3 client is made once, on demand."""

    def __init__(self, settings: Settings, s3_client: Any = None) -> None:
        self._settings = settings
        self._s3 = s3_client

    def __call__(self, raw: str) -> list[str]:
        """Canonical single-object refs for ``raw``; raises :class:`RefRefused` if it is bad."""
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            return []
        settings = self._settings
        if raw.lower().startswith("s3://"):
            if raw.endswith("/"):
                bucket, prefix = split_s3(raw, settings.allowed_buckets)
                if self._s3 is None:
                    self._s3 = make_s3_client(settings)
                return list(_list_s3(self._s3, bucket, prefix))
            return [str(parse_ref(raw, allowed_buckets=settings.allowed_buckets, local_roots=[]))]
        ref = parse_ref(raw, allowed_buckets=settings.allowed_buckets, local_roots=settings.local_roots)
        path = Path(str(ref))
        return list(_walk(path, settings.local_roots)) if path.is_dir() else [str(ref)]

