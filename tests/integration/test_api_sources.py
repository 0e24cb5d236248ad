"""How the API answers a prefix S3 will not list: now (503, try again) or never (422)."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.config import Config

from imgq.producer.api.problems import ApiProblem
from imgq.producer.api.sources import expand_refs

pytestmark = pytest.mark.integration


def _expand(settings: Any, client: Any, raw: str) -> list[str]:
    return list(expand_refs([raw], settings, limit=100, skip_invalid=False, rejected=[], prefix=True,
                            s3_client=client))


def test_s3_away_is_503_and_a_missing_bucket_is_422(make_settings: Any, s3_client: Any) -> None:
    settings = make_settings(allowed_buckets=["imgq-gone", "imgq-away"])
    with pytest.raises(ApiProblem) as missing:
        _expand(settings, s3_client, "s3://imgq-gone/p/")  # allowed, but moto has no such bucket
    assert (missing.value.status, missing.value.code) == (422, "bad_ref")
    assert "S3 object not found (NoSuchBucket)" in missing.value.detail
    away = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",  # nothing listens on 9
                        aws_access_key_id="x", aws_secret_access_key="x",
                        config=Config(retries={"total_max_attempts": 1}, connect_timeout=2))
    with pytest.raises(ApiProblem) as unavailable:
        _expand(settings, away, "s3://imgq-away/p/")
    assert (unavailable.value.status, unavailable.value.code) == (503, "s3_unavailable")
    assert unavailable.value.headers == {"Retry-After": "5"} and "try again" in unavailable.value.detail


def test_a_folder_or_prefix_in_refs_is_listed_only_one_past_the_limit(make_settings: Any, s3_client: Any,
                                                                      tmp_path: Any) -> None:
    """Given as a ref (trailing slash) rather than as `prefix`, a bucket of millions of keys or a
    huge folder was listed whole into memory before the 413."""
    settings = make_settings(allowed_buckets=["imgq-many"], local_roots=[str(tmp_path)])
    s3_client.create_bucket(Bucket="imgq-many")
    for i in range(1001):  # two listing pages
        s3_client.put_object(Bucket="imgq-many", Key=f"many/{i:05d}.jpg", Body=b"x")
    lists: list[Any] = []
    s3_client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: lists.append(1))
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        (folder / f"{i:04d}.jpg").write_bytes(b"x")
    for raw in ("s3://imgq-many/many/", str(folder) + "/"):
        read: list[str] = []
        refs = expand_refs([raw], settings, limit=5, skip_invalid=False, rejected=[], s3_client=s3_client)
        with pytest.raises(ApiProblem) as past:
            for ref in refs:
                read.append(ref)
        assert past.value.code == "too_many_refs" and len(read) == 5
    assert len(lists) == 1, "one listing page, not every page of the prefix"


def test_a_relative_path_is_bad_ref_not_a_path_under_the_apis_working_directory(
        make_settings: Any, tmp_path: Any, monkeypatch: Any) -> None:
    """`photos/x.jpg` was resolved against the API process's working directory and accepted."""
    from imgq.producer.api.sources import parse_scoped

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.jpg").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    settings = make_settings(local_roots=[tmp_path])
    assert _expand(settings, None, str(tmp_path / "photos" / "x.jpg")) == [str(tmp_path / "photos" / "x.jpg")]
    for raw in ("photos/x.jpg", "./photos/x.jpg", "~/photos/x.jpg"):
        with pytest.raises(ApiProblem) as relative:
            _expand(settings, None, raw)
        assert (relative.value.code, relative.value.detail) == (
            "bad_ref", f"{raw!r} is not an absolute path: over HTTP a local ref is a path starting with /; "
                       "nothing was accepted")
    skipped: list[tuple[str, str]] = []
    assert list(expand_refs(["photos/x.jpg"], settings, limit=10, skip_invalid=True, rejected=skipped)) == []
    assert skipped == [("photos/x.jpg", "'photos/x.jpg' is not an absolute path: over HTTP a local ref is a path "
                                        "starting with /")]
    with pytest.raises(ApiProblem) as read:  # a read (GET /v1/images, search) accepts nothing anyway
        parse_scoped("/etc/passwd", settings)
    assert read.value.code == "source_not_allowed" and "accepted" not in read.value.detail
