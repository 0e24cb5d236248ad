"""S3 keys are kept exactly as S3 lists them, from enqueue to the worker's GET."""

from __future__ import annotations

import pytest

from imgq.errors import RefRefused
from imgq.producer.expand import Expander
from imgq.worker.fetch import Fetcher
from tests.corpus import scene

pytestmark = pytest.mark.integration


def test_a_key_with_trailing_space_is_fetched_as_listed(make_settings, bucket, s3_client):
    s3_client.put_object(Bucket=bucket, Key="p/a.jpg ", Body=scene(32, 32, 1))
    s3_client.put_object(Bucket=bucket, Key="p/a.jpg", Body=scene(32, 32, 2))
    settings = make_settings(allowed_buckets=[bucket])
    refs = Expander(settings, s3_client)(f"s3://{bucket}/p/")
    assert sorted(refs) == [f"s3://{bucket}/p/a.jpg", f"s3://{bucket}/p/a.jpg "]
    fetcher = Fetcher(settings, s3_client)
    assert fetcher.fetch(f"s3://{bucket}/p/a.jpg ").data == scene(32, 32, 1)
    assert fetcher.fetch(f"s3://{bucket}/p/a.jpg").data == scene(32, 32, 2)


def test_a_listed_key_with_control_characters_is_refused_at_enqueue(make_settings, bucket, s3_client):
    s3_client.put_object(Bucket=bucket, Key="q/bell\x07.jpg", Body=scene(32, 32, 1))
    settings = make_settings(allowed_buckets=[bucket])
    with pytest.raises(RefRefused, match="control characters"):
        Expander(settings, s3_client)(f"s3://{bucket}/q/")


def test_a_missing_key_or_file_is_named_whole_in_its_error(make_settings, bucket, s3_client, tmp_path):
    """`imgq search --image` and `imgq explain` print this message: it said `no such file:
    missing.jpg` (the folder lost: the open beneath a root names only the last component) and
    `S3 object not found (NoSuchKey)` without the key."""
    from imgq.errors import NotFound

    (tmp_path / "sub").mkdir()
    fetcher = Fetcher(make_settings(allowed_buckets=[bucket], local_roots=[tmp_path]), s3_client)
    with pytest.raises(NotFound) as local:
        fetcher.fetch(str(tmp_path / "sub" / "missing.jpg"))
    assert local.value.message == f"no such file: {tmp_path.resolve() / 'sub' / 'missing.jpg'}"
    with pytest.raises(NotFound) as remote:
        fetcher.fetch(f"s3://{bucket}/2024/missing.jpg")
    assert remote.value.message == f"S3 object not found (NoSuchKey): s3://{bucket}/2024/missing.jpg"
