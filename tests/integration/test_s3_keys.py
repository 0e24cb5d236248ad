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
