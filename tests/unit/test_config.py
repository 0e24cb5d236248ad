from pathlib import Path

import pytest

from imgq.config import DEFAULT_CAPTION_MODEL, Settings


def test_env_prefix_and_csv_lists(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("IMGQ_ALLOWED_BUCKETS", "a-bucket, b-bucket")
    monkeypatch.setenv("IMGQ_LOCAL_ROOTS", f"{tmp_path},{tmp_path}/x")
    monkeypatch.setenv("IMGQ_MAX_BATCH", "64")
    settings = Settings(_env_file=None)
    assert settings.allowed_buckets == ["a-bucket", "b-bucket"]
    assert settings.local_roots == [tmp_path.resolve(), (tmp_path / "x").resolve()]
    assert settings.max_batch == 64
    assert settings.caption_model == DEFAULT_CAPTION_MODEL


def test_inconsistent_visibility_timeout_is_refused():
    with pytest.raises(ValueError, match="IMGQ_VISIBILITY_TIMEOUT_S"):
        Settings(_env_file=None, visibility_timeout_s=60, task_time_limit_s=120)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_database_url_uses_psycopg3(url, expected):
    assert Settings(_env_file=None, database_url=url).sync_database_url == expected


def test_as_env_round_trips(monkeypatch, tmp_path: Path):
    original = Settings(_env_file=None, allowed_buckets=["a", "b"], local_roots=[tmp_path], max_batch=7)
    for key, value in original.as_env().items():
        monkeypatch.setenv(key, value)
    assert Settings(_env_file=None) == original


def test_decode_threads_default_to_the_usable_cores(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert Settings(_env_file=None).decode_threads == 3
    assert Settings(_env_file=None, decode_threads=5).decode_threads == 5


@pytest.mark.parametrize(("raw", "shown"), [
    ("postgresql://user:p@ss@db:5432/imgq", "postgresql://user:***@db:5432/imgq"),
    ("redis://:secret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("postgresql://user@db/imgq?password=hunter2&sslmode=require",
     "postgresql://user@db/imgq?password=***&sslmode=require"),
    ("redis+socket:///tmp/redis.sock", "redis+socket:///tmp/redis.sock"),
    ("redis://:@redis:6379/0", "redis://:@redis:6379/0"),  # an empty password: nothing to hide
    ("caption,embed", "caption,embed"),
])
def test_config_masks_every_password(raw, shown):
    from imgq.config import mask_secrets

    assert mask_secrets(raw) == shown


def test_retry_cap_must_stay_below_the_visibility_timeout():
    with pytest.raises(ValueError, match="IMGQ_RETRY_MAX_S"):
        Settings(_env_file=None, retry_max_s=4000, visibility_timeout_s=3600, reconcile_after_s=5000)
