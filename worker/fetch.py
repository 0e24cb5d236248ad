"""Read an image's bytes from S3 or an allow-listed local folder, with size and confinement checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from imgq import errors
from imgq.classify import classify
from imgq.config import Settings
from imgq.ports import Blob
from imgq.refs import LocalRef, S3Ref, parse_ref
from imgq.s3 import make_s3_client
from imgq.worker.beneath import open_beneath


class Fetcher:
    """Thread-safe: boto3 clients may be shared between threads (sessions may not)."""

    def __init__(self, settings: Settings, s3_client: Any | None = None) -> None:
        self._settings = settings
        self._s3 = s3_client
        self._max = settings.max_object_bytes

    def _client(self) -> Any:
        if self._s3 is None:
            self._s3 = make_s3_client(self._settings, max_pool=self._settings.decode_threads * 2)
        return self._s3

    def fetch(self, raw_ref: str) -> Blob:
        # Checked again here: a message may have been forged or the config narrowed since enqueue.
        try:
            ref = parse_ref(raw_ref, allowed_buckets=self._settings.allowed_buckets,
                            local_roots=self._settings.local_roots)
        except errors.RefRefused as exc:
            raise errors.BadRef(exc.message) from None
        try:
            return self._fetch_s3(ref) if isinstance(ref, S3Ref) else self._fetch_local(ref)
        except errors.ImgqError:
            raise
        except Exception as exc:
            raise classify(exc, str(ref)) from exc

    def _fetch_s3(self, ref: S3Ref) -> Blob:
        # GET's Content-Length is checked before the body is read: the same guarantee as a HEAD
        # first, one round trip fewer, and no window for the object to change between the two.
        resp = self._client().get_object(Bucket=ref.bucket, Key=ref.key)
        body = resp["Body"]
        try:
            # A declared size refuses an oversized object before any byte is read; a response
            # without one (a chunked reply from an S3-compatible store) is judged by what it holds.
            if resp.get("ContentLength") is not None:
                self._check_size(int(resp["ContentLength"]))
            data = body.read(self._max + 1)
        finally:
            body.close()
        self._check_size(len(data))
        # "null" is the VersionId of every object written while versioning was off or suspended: one
        # name for all of them, so an overwrite would look like the version already captioned.
        version_id = resp.get("VersionId")
        version = (version_id if version_id not in (None, "", "null") else None) or str(resp.get("ETag", "")).strip('"')
        return Blob(data, "s3", ref.bucket, ref.key, version or hashlib.sha256(data).hexdigest()[:32])

    def _fetch_local(self, ref: LocalRef) -> Blob:
        path: Path = ref.path
        # No symlink in any component, no blocking on a FIFO, regular files only (worker/beneath.py).
        fd = open_beneath(path, self._settings.local_roots)
        with os.fdopen(fd, "rb") as fh:
            self._check_size(os.fstat(fh.fileno()).st_size)
            data = fh.read(self._max + 1)
        self._check_size(len(data))
        return Blob(data, "local", "", str(path), hashlib.sha256(data).hexdigest()[:32])

    def _check_size(self, size: int) -> None:
        if size == 0:
            raise errors.Empty("the object has zero bytes")
        if size > self._max:
            raise errors.TooLarge(f"{size} bytes exceeds IMGQ_MAX_OBJECT_BYTES={self._max}")
