"""`imgq backfill` against real Postgres, Redis and S3 (moto): the skip rule, resumption, the lock,
--since, --dry-run, and `imgq check` on the jobs it makes. Small objects, small pages: moto is slow."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from imgq.cli import app
from imgq.config import Settings
from imgq.db.backfills import Backfills
from imgq.db.store import DoneItem, ObjectInfo, Store
from imgq.producer.backfill import define, run_backfill

pytestmark = pytest.mark.integration

CAPTION_MODEL = "cap-model"
EMBED_MODEL = "itm-model"


@pytest.fixture
def env(database_url: str, broker_url: str, s3_server: Any, bucket: str) -> dict[str, str]:
    return {"IMGQ_DATABASE_URL": database_url, "IMGQ_BROKER_URL": broker_url, "IMGQ_S3_ENDPOINT_URL": s3_server.url,
            "IMGQ_ALLOWED_BUCKETS": bucket, "IMGQ_CAPTION_MODEL": CAPTION_MODEL, "IMGQ_EMBED_MODEL": EMBED_MODEL}


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings(_env_file=None, **{k.removeprefix("IMGQ_").lower(): v for k, v in env.items()})


def put(s3: Any, bucket: str, keys: list[str], body: bytes = b"x") -> None:
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=body + key.encode())


def keys(n: int, prefix: str = "p/") -> list[str]:
    return [f"{prefix}{i:03d}.jpg" for i in range(n)]


def backfill(env: dict[str, str], bucket: str, *args: str, prefix: str = "p/") -> Any:
    return CliRunner().invoke(app, ["backfill", f"s3://{bucket}/{prefix}", "--page-size", "4", *args], env=env)


def sql(store: Store, statement: str, **params: Any) -> Any:
    with store.engine.begin() as conn:
        result = conn.execute(text(statement), params)
        return result.all() if result.returns_rows else None


def refs(store: Store, job: uuid.UUID | str) -> list[str]:
    return [r for (r,) in sql(store, "SELECT ref FROM job_items WHERE job_id = :j ORDER BY seq", j=job)]


def check_passes(env: dict[str, str], job: str) -> None:
    result = CliRunner().invoke(app, ["check", job], env=env)
    assert result.exit_code == 0, result.output
    assert "missing=0 duplicates=0 mismatched=0" in result.stdout


def test_a_second_run_enqueues_nothing_and_a_changed_object_is_enqueued_again(env, bucket, s3_client, store):
    put(s3_client, bucket, [*keys(10), "p/folder/", "other/x.jpg"])
    first = backfill(env, bucket, "--name", "n1", "--kinds", "caption,embed")
    assert first.exit_code == 0, first.output
    job = first.stdout.strip()
    assert refs(store, job) == [f"s3://{bucket}/{k}" for k in keys(10)]
    [(total, source, priority, kind)] = sql(store, "SELECT total, source, priority, kind FROM jobs WHERE id = :j",
                                            j=job)
    assert (total, source, priority, kind) == (10, "backfill", -10, "caption,embed")
    assert "listed=11 skipped=1 enqueued=10" in first.stderr
    check_passes(env, job)

    again = backfill(env, bucket, "--name", "n1", "--kinds", "caption,embed")
    assert again.exit_code == 0, again.output
    assert "enqueued=0" in again.stderr and again.stdout.strip() == ""  # no job for nothing
    assert sql(store, "SELECT count(*) FROM jobs") == [(1,)]

    s3_client.put_object(Bucket=bucket, Key="p/003.jpg", Body=b"new bytes")  # a new ETag
    put(s3_client, bucket, ["p/100.jpg"])
    third = backfill(env, bucket, "--name", "n1", "--kinds", "caption,embed")
    assert third.exit_code == 0, third.output
    assert refs(store, third.stdout.strip()) == [f"s3://{bucket}/p/003.jpg", f"s3://{bucket}/p/100.jpg"]
    check_passes(env, third.stdout.strip())
    [(state, cursor, enqueued)] = sql(store, "SELECT state, cursor, enqueued FROM backfills WHERE name = 'n1'")
    assert (state, cursor, enqueued) == ("done", None, 2)


def test_an_interrupted_backfill_resumes_where_it_stopped_without_enqueueing_twice(settings, bucket, s3_client,
                                                                                    store):
    put(s3_client, bucket, keys(18))
    d, b, prefix = define(settings, name="resume", source=f"s3://{bucket}/p/", kinds="caption", params={})

    def stop_after_two_pages(progress: Any) -> None:
        if progress.pages == 2:
            raise KeyboardInterrupt  # as Ctrl-C, or a crash, between pages

    with pytest.raises(KeyboardInterrupt):
        run_backfill(engine=store.engine, s3_client=s3_client, settings=settings, definition=d, bucket=b,
                     prefix=prefix, page_size=4, on_page=stop_after_two_pages)
    [(state, cursor, job, enqueued)] = sql(store, "SELECT state, cursor, job_id, enqueued FROM backfills")
    assert (state, cursor, enqueued) == ("failed", "p/007.jpg", 8)
    assert len(refs(store, job)) == 8
    # A SIGKILLed run leaves its state 'running' (and its lock, with its connection, gone): the same.
    sql(store, "UPDATE backfills SET state = 'running'")

    report = run_backfill(engine=store.engine, s3_client=s3_client, settings=settings, definition=d, bucket=b,
                          prefix=prefix, page_size=4)
    assert report.run is not None and report.run.resumed
    assert report.job == job  # the same job, appended to
    assert (report.progress.listed, report.progress.enqueued) == (10, 10)
    assert (report.run.listed, report.run.enqueued) == (18, 18)
    got = refs(store, job)
    assert got == [f"s3://{bucket}/{k}" for k in keys(18)] and len(set(got)) == 18
    assert sql(store, "SELECT total FROM jobs WHERE id = :j", j=job) == [(18,)]
    assert sql(store, "SELECT seq FROM job_items WHERE job_id = :j ORDER BY seq", j=job) == [(i,) for i in range(18)]
    check_passes({"IMGQ_DATABASE_URL": settings.database_url}, str(job))


def test_a_dry_run_counts_and_writes_nothing(env, bucket, s3_client, store):
    put(s3_client, bucket, keys(6))
    dry = backfill(env, bucket, "--dry-run", "--name", "d")
    assert dry.exit_code == 0, dry.output
    assert "would_enqueue=6" in dry.stderr and dry.stdout == ""
    for table in ("jobs", "job_items", "backfills", "backfill_objects"):
        assert sql(store, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert backfill(env, bucket, "--name", "d").exit_code == 0
    assert "would_enqueue=0" in backfill(env, bucket, "--dry-run", "--name", "d").stderr


def test_a_second_concurrent_run_is_refused_by_the_lock(env, bucket, s3_client, store):
    put(s3_client, bucket, keys(3))
    with Backfills(store.engine).lock("busy"):
        refused = backfill(env, bucket, "--name", "busy")
        assert refused.exit_code == 1
        assert "error[backfill_running]" in refused.stderr
        assert sql(store, "SELECT count(*) FROM job_items") == [(0,)]
        assert backfill(env, bucket, "--name", "another").exit_code == 0  # other names are not held
    assert backfill(env, bucket, "--name", "busy").exit_code == 0  # free again


def test_since_takes_only_objects_modified_at_or_after_it(env, bucket, s3_client, store):
    put(s3_client, bucket, keys(3))
    old = max(o["LastModified"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    time.sleep(1.1)  # S3 timestamps have one-second (moto: millisecond) precision
    put(s3_client, bucket, ["p/new1.jpg", "p/new2.jpg"])
    since = (old + dt.timedelta(seconds=1)).isoformat()
    result = backfill(env, bucket, "--since", since, "--name", "s")
    assert result.exit_code == 0, result.output
    assert refs(store, result.stdout.strip()) == [f"s3://{bucket}/p/new1.jpg", f"s3://{bucket}/p/new2.jpg"]
    assert "3 older than --since" in result.stderr
    assert backfill(env, bucket, "--since", "yesterday").exit_code == 2


def test_an_object_with_a_result_already_is_skipped_unless_the_pinned_revision_differs(env, settings, bucket,
                                                                                        s3_client, store):
    put(s3_client, bucket, keys(3))
    etag = s3_client.head_object(Bucket=bucket, Key="p/001.jpg")["ETag"].strip('"')
    d, _, _ = define(settings, name="x", source=f"s3://{bucket}/p/", kinds="caption", params={})
    [task] = d.tasks
    job = store.create_job(tasks=d.tasks, refs=[f"s3://{bucket}/p/001.jpg"])
    store.claim(job, [0], "w1")
    store.write_done([DoneItem(job, 0, ObjectInfo("s3", bucket, "p/001.jpg", etag, 10, 4, 4), "w1",
                               {"caption": (task["model"], "rev1", task["params_hash"], task["params"], "a cat")})])

    pinned_other = backfill(env | {"IMGQ_MODEL_REVISION": "rev2"}, bucket, "--name", "pinned", "--dry-run")
    assert "would_enqueue=3" in pinned_other.stderr  # a result of another revision does not count
    result = backfill(env, bucket, "--name", "r")
    assert result.exit_code == 0, result.output
    assert refs(store, result.stdout.strip()) == [f"s3://{bucket}/p/000.jpg", f"s3://{bucket}/p/002.jpg"]
    assert "1 up to date" in result.stderr
    # Recorded, so the next run skips it by the cheap rule.
    assert sql(store, "SELECT job_id FROM backfill_objects WHERE key = 'p/001.jpg'") == [(None,)]
    other_params = backfill(env, bucket, "--name", "r2", "--params", '{"num_beams": 3}', "--dry-run")
    assert "would_enqueue=3" in other_params.stderr


def test_an_object_captioned_and_translated_already_is_up_to_date_for_a_translating_backfill(
        env, settings, bucket, s3_client, store):
    """A translation's row names the BLIP model, not the translation task's: the skip rule looked for
    the task's model and never matched, so a caption,translate backfill enqueued every object that
    earlier jobs had captioned and translated (found by review)."""
    put(s3_client, bucket, keys(3))
    d, _, _ = define(settings, name="x", source=f"s3://{bucket}/p/", kinds="caption,translate",
                     params={"langs": ["de", "fr"]})
    caption, translate = d.tasks
    job = store.create_job(tasks=d.tasks, refs=[f"s3://{bucket}/p/{i:03d}.jpg" for i in (1, 2)])
    store.claim(job, [0, 1], "w1")
    done = []
    for seq, (key, langs) in enumerate((("p/001.jpg", ["de", "fr"]), ("p/002.jpg", ["de"]))):
        etag = s3_client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        done.append(DoneItem(job, seq, ObjectInfo("s3", bucket, key, etag, 10, 4, 4), "w1", {
            "caption": (caption["model"], "rev1", caption["params_hash"], caption["params"], "a cat"),
            "translate": (translate["model"], "mt1", translate["params_hash"], translate["params"],
                          {lang: f"{lang}: a cat" for lang in langs})}))
    store.write_done(done)
    result = backfill(env, bucket, "--name", "t", "--kinds", "caption,translate", "--params", '{"langs": ["de", "fr"]}')
    assert result.exit_code == 0, result.output
    # 001 has both languages; 002 lacks French, 000 everything.
    assert refs(store, result.stdout.strip()) == [f"s3://{bucket}/p/000.jpg", f"s3://{bucket}/p/002.jpg"]
    assert "1 up to date" in result.stderr


def test_a_versioned_bucket_is_judged_by_version_id(env, bucket, s3_client, store):
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    put(s3_client, bucket, keys(5))
    first = backfill(env, bucket, "--name", "v")
    assert first.exit_code == 0, first.output
    assert len(refs(store, first.stdout.strip())) == 5
    version = s3_client.head_object(Bucket=bucket, Key="p/002.jpg")["VersionId"]
    assert sql(store, "SELECT version FROM backfill_objects WHERE key = 'p/002.jpg'") == [(version,)]
    s3_client.put_object(Bucket=bucket, Key="p/002.jpg", Body=b"same key, new version")
    s3_client.delete_object(Bucket=bucket, Key="p/004.jpg")  # a delete marker: nothing to enqueue
    again = backfill(env, bucket, "--name", "v")
    assert again.exit_code == 0, again.output
    assert refs(store, again.stdout.strip()) == [f"s3://{bucket}/p/002.jpg"]


def test_refused_requests_exit_2_before_anything_is_written(env, bucket, store):
    assert "error[bad_ref]" in backfill(env | {"IMGQ_ALLOWED_BUCKETS": "elsewhere"}, bucket).stderr
    assert "error[bad_ref]" in CliRunner().invoke(app, ["backfill", "/srv/photos"], env=env).stderr
    pairs = backfill(env, bucket, "--kinds", "validate")
    assert pairs.exit_code == 2 and "error[bad_params]" in pairs.stderr
    # An unknown adapter was enqueued, and every object dead-lettered as adapter_unavailable.
    adapter = backfill(env, bucket, "--params", '{"adapter": "nope"}')
    assert adapter.exit_code == 2 and "error[unknown_adapter]" in adapter.stderr
    assert sql(store, "SELECT count(*) FROM backfills") == [(0,)]
    assert sql(store, "SELECT count(*) FROM jobs") == [(0,)]


def test_a_source_that_cannot_be_listed_is_a_coded_failure(env):
    missing = backfill(env | {"IMGQ_ALLOWED_BUCKETS": "no-such-bucket-here"}, "no-such-bucket-here")
    assert missing.exit_code == 1 and "error[s3_error]" in missing.stderr and "NoSuchBucket" in missing.stderr


def test_max_rate_paces_the_enqueueing(settings, bucket, s3_client, store):
    put(s3_client, bucket, keys(9))
    d, b, prefix = define(settings, name="paced", source=f"s3://{bucket}/p/", kinds="caption", params={})
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    report = run_backfill(engine=store.engine, s3_client=s3_client, settings=settings, definition=d, bucket=b,
                          prefix=prefix, max_rate=3, sleep=sleep, clock=lambda: now[0])
    assert report.progress.enqueued == 9
    assert report.progress.pages == 3  # pages of one second's worth (3 objects)
    assert sum(waits) == pytest.approx(2.0)  # 9 objects at 3/s with a burst of 3


def test_the_scheduled_task_runs_the_configured_backfill_under_its_lock(settings, bucket, s3_client, store):
    from imgq.producer.beat import run_configured

    put(s3_client, bucket, keys(4))
    configured = settings.model_copy(update={"backfills": Settings(
        _env_file=None, backfills=[{"name": "nightly", "source": f"s3://{bucket}/p/", "kinds": "embed",
                                    "schedule": "0 2 * * *"}]).backfills})
    with Backfills(store.engine).lock("nightly"):
        assert run_configured(configured, "nightly", s3_client=s3_client) == {"name": "nightly", "state": "running"}
    assert sql(store, "SELECT count(*) FROM job_items") == [(0,)]
    done = run_configured(configured, "nightly", s3_client=s3_client)
    assert (done["state"], done["enqueued"], done["listed"]) == ("done", 4, 4)
    assert sql(store, "SELECT priority, kind FROM jobs") == [(-10, "embed")]
    assert run_configured(configured, "nightly", s3_client=s3_client)["enqueued"] == 0
    assert run_configured(configured, "unknown")["state"] == "unknown"
