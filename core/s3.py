"""The boto3 S3 client, configured from settings. Credentials come from boto3's usual chain."""

from __future__ import annotations

from typing import Any

from imgq.config import Settings


def make_s3_client(settings: Settings, max_pool: int = 10) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=Config(max_pool_connections=max_pool, retries={"total_max_attempts": 3, "mode": "standard"},
                      connect_timeout=5, read_timeout=30),
    )
