"""Turn user references into object references: S3 prefixes are listed, local folders walked."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
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


def expand(raw_refs: Iterable[str], settings: Settings, s3_client: Any = None) -> Iterator[str]:
    """Yield canonical single-object refs; raise :class:`RefRefused` on the first bad one."""
    for raw in raw_refs:
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        if raw.lower().startswith("s3://") and raw.endswith("/"):
            bucket, prefix = split_s3(raw, settings.allowed_buckets)
            if s3_client is None:
                s3_client = make_s3_client(settings)
            yield from _list_s3(s3_client, bucket, prefix)
            continue
        ref = parse_ref(raw, allowed_buckets=settings.allowed_buckets, local_roots=settings.local_roots)
        if not raw.lower().startswith("s3://") and Path(str(ref)).is_dir():
            yield from _walk(Path(str(ref)), settings.local_roots)
        else:
            yield str(ref)
