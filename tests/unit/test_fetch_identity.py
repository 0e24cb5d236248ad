"""The Fetcher's blob identity and size guarantees, which mutation testing found unchecked below e2e:
which version of an object was read (VersionId, else the ETag, else the bytes' digest), a local
file's identity, the size limit at exactly IMGQ_MAX_OBJECT_BYTES, an object that is longer than it
said, and the client the Fetcher builds for itself."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest

from imgq import errors
from imgq.config import Settings
from imgq.ports import Blob
from imgq.worker import fetch as fetch_module
from imgq.worker.fetch import Fetcher

MAX = 64


class Body(io.BytesIO):
    """A streaming body that counts the bytes read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


class FakeS3:
    """get_object as boto3 returns it: a streaming Body and the response's headers."""

    def __init__(self, data: bytes, **headers: Any) -> None:
        self.data = data
        self.headers = headers
        self.bodies: list[Body] = []
        self.asked: list[tuple[str, str]] = []

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        self.asked.append((Bucket, Key))
        body = Body(self.data)
        self.bodies.append(body)
        return {"Body": body, **self.headers}


def s3_fetcher(client: FakeS3) -> Fetcher:
    return Fetcher(Settings(_env_file=None, allowed_buckets=["photos"], max_object_bytes=MAX), client)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@pytest.mark.parametrize(
    ("headers", "version"),
    [
        ({"VersionId": "v-7", "ETag": '"etag-1"'}, "v-7"),
        ({"ETag": '"etag-1"'}, "etag-1"),
        ({"ETag": '"X-etag-X"'}, "X-etag-X"),  # only the quotes are taken off
        ({"VersionId": None, "ETag": '"etag-1"'}, "etag-1"),
        # A bucket whose versioning is suspended names every object written since "null": the ETag
        # tells an overwrite apart, as the backfill's skip rule does (producer/backfill.py).
        ({"VersionId": "null", "ETag": '"etag-2"'}, "etag-2"),
        ({}, digest(b"\x89PNG-bytes")),
    ],
)
def test_an_s3_blob_names_the_version_it_read(headers: dict[str, Any], version: str) -> None:
    client = FakeS3(b"\x89PNG-bytes", ContentLength=10, **headers)
    blob = s3_fetcher(client).fetch("s3://photos/cats/1.png")
    assert blob == Blob(b"\x89PNG-bytes", "s3", "photos", "cats/1.png", version)
    assert client.asked == [("photos", "cats/1.png")]
    assert client.bodies[0].closed


def test_an_s3_object_of_exactly_the_limit_is_read_whole() -> None:
    data = bytes(range(MAX))
    assert s3_fetcher(FakeS3(data, ContentLength=MAX, ETag='"e"')).fetch("s3://photos/a").data == data


@pytest.mark.parametrize(("length", "body", "message", "read"), [
    # Refused by its declared size, before a byte is read; the message names that size.
    (MAX + 100, MAX + 100, f"{MAX + 100} bytes exceeds IMGQ_MAX_OBJECT_BYTES={MAX}", 0),
    (MAX + 1, MAX + 1, f"{MAX + 1} bytes exceeds IMGQ_MAX_OBJECT_BYTES={MAX}", 0),
    # The object is longer than its Content-Length said: only the limit plus one byte is read.
    (10, MAX + 50, f"{MAX + 1} bytes exceeds IMGQ_MAX_OBJECT_BYTES={MAX}", MAX + 1),
])
def test_an_s3_object_over_the_limit_is_refused_and_its_body_closed(length: int, body: int, message: str,
                                                                    read: int) -> None:
    client = FakeS3(b"x" * body, ContentLength=length)
    with pytest.raises(errors.TooLarge) as exc:
        s3_fetcher(client).fetch("s3://photos/a")
    assert str(exc.value) == message
    assert client.bodies[0].closed
    assert client.bodies[0].bytes_read == read


def test_an_empty_s3_object_is_refused() -> None:
    with pytest.raises(errors.Empty) as exc:
        s3_fetcher(FakeS3(b"", ContentLength=0)).fetch("s3://photos/a")
    assert str(exc.value) == "the object has zero bytes"


def test_an_s3_response_without_a_content_length_is_judged_by_its_bytes() -> None:
    blob = s3_fetcher(FakeS3(b"\x89PNG-bytes", ETag='"e"')).fetch("s3://photos/a")
    assert blob.data == b"\x89PNG-bytes"
    client = FakeS3(b"x" * (MAX + 5))
    with pytest.raises(errors.TooLarge):
        s3_fetcher(client).fetch("s3://photos/a")
    assert client.bodies[0].closed
    with pytest.raises(errors.Empty):
        s3_fetcher(FakeS3(b"")).fetch("s3://photos/a")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = (tmp_path / "images").resolve()
    folder.mkdir()
    return folder


def local_fetcher(root: Path) -> Fetcher:
    return Fetcher(Settings(_env_file=None, local_roots=[root], max_object_bytes=MAX))


def test_a_local_blob_is_named_by_its_path_and_the_digest_of_its_bytes(root: Path) -> None:
    data = bytes(range(MAX))  # exactly the limit
    (root / "a.png").write_bytes(data)
    assert local_fetcher(root).fetch(str(root / "a.png")) == Blob(data, "local", "", str(root / "a.png"), digest(data))


def test_a_local_file_that_grew_after_its_size_was_checked_is_read_only_to_the_limit(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "growing.png").write_bytes(b"y" * (MAX + 50))
    real_fstat = os.fstat

    def fstat_before_it_grew(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 10,
                               st.st_atime, st.st_mtime, st.st_ctime))

    monkeypatch.setattr(fetch_module.os, "fstat", fstat_before_it_grew)
    with pytest.raises(errors.TooLarge) as exc:
        local_fetcher(root).fetch(str(root / "growing.png"))
    assert str(exc.value) == f"{MAX + 1} bytes exceeds IMGQ_MAX_OBJECT_BYTES={MAX}"


def test_the_fetcher_builds_one_client_from_the_settings_with_a_connection_per_decode_thread_and_spare() -> None:
    settings = Settings(_env_file=None, s3_endpoint_url="http://127.0.0.1:9", s3_region="eu-west-3",
                        decode_threads=3)
    fetcher = Fetcher(settings)
    client = fetcher._client()
    assert client is fetcher._client()
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "eu-west-3"
    assert client.meta.config.max_pool_connections == 6


def test_a_ref_refused_at_fetch_keeps_the_parser_s_reason(root: Path) -> None:
    """A forged message, or a root removed since enqueue: the dead letter says why, as enqueue would."""
    from imgq.refs import parse_ref

    outside = str(root.parent / "elsewhere.png")
    with pytest.raises(errors.RefRefused) as parsed:
        parse_ref(outside, allowed_buckets=[], local_roots=[root])
    with pytest.raises(errors.BadRef) as refused:
        local_fetcher(root).fetch(outside)
    assert str(refused.value) == str(parsed.value) == f"{outside!r} is outside IMGQ_LOCAL_ROOTS"

