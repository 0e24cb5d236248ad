"""`imgq backfill` when something happens to a run from outside: its job is cancelled, its lock's
session ends, it is restarted with another definition, Ctrl-C; and `--max-rate` on a bucket that is
mostly done. Real Postgres and S3 (moto), small pages."""

from __future__ import annotations

import time
from typing import Any

import pytest
from typer.testing import CliRunner

from imgq.cli import app
from imgq.config import Settings
from imgq.db.backfills import LOCK_CLASS
from imgq.db.jobs_view import cancel_job
from imgq.db.store import DoneItem, ObjectInfo
from imgq.errors import BackfillCancelled, BackfillLockLost
from imgq.producer import backfill as backfill_module
from imgq.producer.backfill import define, run_backfill
from tests.integration.test_backfill import keys, put, refs, sql

pytestmark = pytest.mark.integration


@pytest.fixture
def env(database_url: str, broker_url: str, s3_server: Any, bucket: str) -> dict[str, str]:
    return {"IMGQ_DATABASE_URL": database_url, "IMGQ_BROKER_URL": broker_url, "IMGQ_S3_ENDPOINT_URL": s3_server.url,
            "IMGQ_ALLOWED_BUCKETS": bucket, "IMGQ_CAPTION_MODEL": "cap-model", "IMGQ_EMBED_MODEL": "itm-model"}


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings(_env_file=None, **{k.removeprefix("IMGQ_").lower(): v for k, v in env.items()})


def run(settings: Settings, store: Any, s3_client: Any, d: Any, bucket: str, prefix: str, **kwargs: Any) -> Any:
    return run_backfill(engine=store.engine, s3_client=s3_client, settings=settings, definition=d, bucket=bucket,
                        prefix=prefix, **{"page_size": 4, **kwargs})


def all_refs(bucket: str, names: list[str]) -> list[str]:
    return [f"s3://{bucket}/{k}" for k in names]


def test_cancelling_a_running_backfills_job_stops_the_run_and_the_next_run_enqueues_what_was_cancelled(
        settings, bucket, s3_client, store):
    put(s3_client, bucket, keys(12))
    d, b, prefix = define(settings, name="c", source=f"s3://{bucket}/p/", kinds="caption", params={})
    cancelled = []

    def cancel_after_the_first_page(progress: Any) -> None:
        if progress.pages == 1:
            [(job,)] = sql(store, "SELECT job_id FROM backfills WHERE name = 'c'")
            assert cancel_job(store.engine, d.tenant, job) == 4  # as DELETE /v1/jobs/{id}
            cancelled.append(job)

    with pytest.raises(BackfillCancelled) as info:
        run(settings, store, s3_client, d, b, prefix, on_page=cancel_after_the_first_page)
    [job] = cancelled
    assert "cancelled" in str(info.value) and str(job) in str(info.value)
    assert sql(store, "SELECT total FROM jobs WHERE id = :j", j=job) == [(4,)]  # nothing appended after the cancel
    assert sql(store, "SELECT count(*) FROM job_items WHERE job_id = :j AND state <> 'cancelled'", j=job) == [(0,)]
    [(state,)] = sql(store, "SELECT state FROM backfills WHERE name = 'c'")
    assert state == "failed"

    # The next run never resumes into the cancelled job, and the cancelled objects are not "up to date".
    report = run(settings, store, s3_client, d, b, prefix)
    assert report.run is not None and not report.run.resumed
    assert report.job is not None and report.job != job
    assert refs(store, report.job) == all_refs(bucket, keys(12))


def test_a_scheduled_run_whose_job_is_cancelled_reports_it_stopped(settings, bucket, s3_client, store):
    """`imgq beat`'s task: a cancel is not a failure of the schedule (no failed task, no traceback)."""
    from imgq.producer.beat import run_configured

    put(s3_client, bucket, keys(8))
    configured = settings.model_copy(update={"backfills": Settings(
        _env_file=None, backfills=[{"name": "nightly", "source": f"s3://{bucket}/p/", "kinds": "caption",
                                    "schedule": "0 2 * * *"}]).backfills})

    def cancel(progress: Any) -> None:
        if progress.pages == 1:
            [(job, tenant)] = sql(store, "SELECT b.job_id, j.tenant FROM backfills b JOIN jobs j ON j.id = b.job_id "
                                         "WHERE b.name = 'nightly'")
            assert cancel_job(store.engine, tenant, job) == 4

    stopped = run_configured(configured, "nightly", s3_client=s3_client, page_size=4, on_page=cancel)
    assert (stopped["state"], stopped["code"]) == ("stopped", "backfill_cancelled")
    assert sql(store, "SELECT count(*) FROM job_items WHERE state = 'queued'") == [(0,)]


def test_the_objects_of_a_cancelled_finished_backfill_job_are_enqueued_again_unless_done(settings, bucket,
                                                                                            s3_client, store):
    put(s3_client, bucket, keys(6))
    d, b, prefix = define(settings, name="c2", source=f"s3://{bucket}/p/", kinds="caption", params={})
    first = run(settings, store, s3_client, d, b, prefix)
    assert first.progress.enqueued == 6
    # One item was done before the job was cancelled; the rest were still queued.
    [task] = d.tasks
    etag = s3_client.head_object(Bucket=bucket, Key="p/000.jpg")["ETag"].strip('"')
    store.claim(first.job, [0], "w1")
    store.write_done([DoneItem(first.job, 0, ObjectInfo("s3", bucket, "p/000.jpg", etag, 10, 4, 4), "w1",
                               {"caption": (task["model"], "rev1", task["params_hash"], task["params"], "a cat")})])
    assert cancel_job(store.engine, d.tenant, first.job) == 5

    again = run(settings, store, s3_client, d, b, prefix)
    assert again.job != first.job
    assert refs(store, again.job) == all_refs(bucket, keys(6)[1:])
    assert again.progress.up_to_date == 1
    assert sql(store, "SELECT job_id FROM backfill_objects WHERE key = 'p/000.jpg'") == [(None,)]
    assert run(settings, store, s3_client, d, b, prefix).progress.enqueued == 0


def _terminate_the_lock_session(store: Any) -> None:
    holders = "FROM pg_locks WHERE locktype = 'advisory' AND classid = :c AND granted"
    assert sql(store, f"SELECT count(pg_terminate_backend(pid)) {holders}", c=LOCK_CLASS) == [(1,)]
    deadline = time.monotonic() + 10
    while sql(store, f"SELECT count(*) {holders}", c=LOCK_CLASS) != [(0,)]:
        assert time.monotonic() < deadline, "the lock's session did not end"
        time.sleep(0.05)


def test_a_run_whose_lock_session_ended_stops_at_its_next_page_and_nothing_is_enqueued_twice(settings, bucket,
                                                                                            s3_client, store):
    put(s3_client, bucket, keys(12))
    d, b, prefix = define(settings, name="ll", source=f"s3://{bucket}/p/", kinds="caption", params={})
    second: list[Any] = []
    now = [0.0]

    def lose_the_lock_and_run_again(seconds: float) -> None:
        # Page 2 is decided and waits for the rate limit when the lock's session ends (a network
        # drop, idle_session_timeout, a DBA); the lock is free, so a second run starts and finishes.
        now[0] += seconds
        if not second:
            _terminate_the_lock_session(store)
            second.append(run(settings, store, s3_client, d, b, prefix))

    with pytest.raises(BackfillLockLost) as info:
        run(settings, store, s3_client, d, b, prefix, max_rate=4, sleep=lose_the_lock_and_run_again,
            clock=lambda: now[0])
    twice = sql(store, "SELECT ref, count(*) FROM job_items GROUP BY ref HAVING count(*) > 1")
    assert twice == []
    [other] = second
    assert sorted(r for (r,) in sql(store, "SELECT ref FROM job_items")) == all_refs(bucket, keys(12))
    assert "lock" in str(info.value) and str(other.job) in str(info.value)
    assert getattr(info.value, "code", None) == "backfill_lock_lost"
    # The stopped run left the second run's row alone.
    assert sql(store, "SELECT state, cursor, enqueued FROM backfills WHERE name = 'll'") == [("done", None, 12)]


def test_a_run_with_other_tasks_does_not_resume_a_run_that_had_enqueued_nothing(settings, bucket, s3_client,
                                                                               store):
    put(s3_client, bucket, keys(12))
    d, b, prefix = define(settings, name="rt", source=f"s3://{bucket}/p/", kinds="caption", params={})
    assert run(settings, store, s3_client, d, b, prefix).progress.enqueued == 12

    def stop_after_two_pages(progress: Any) -> None:
        if progress.pages == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # everything is up to date: this run made no job
        run(settings, store, s3_client, d, b, prefix, on_page=stop_after_two_pages)
    assert sql(store, "SELECT state, cursor, job_id FROM backfills") == [("failed", "p/007.jpg", None)]

    other, _, _ = define(settings, name="rt", source=f"s3://{bucket}/p/", kinds="caption", params={"num_beams": 2})
    report = run(settings, store, s3_client, other, b, prefix)
    assert report.run is not None and not report.run.resumed
    assert refs(store, report.job) == all_refs(bucket, keys(12))


def test_a_run_with_another_pinned_revision_or_an_unknown_definition_starts_over(settings, bucket, s3_client,
                                                                                store):
    put(s3_client, bucket, keys(12))
    d, b, prefix = define(settings, name="rev", source=f"s3://{bucket}/p/", kinds="caption", params={})

    def stop_after_one_page(progress: Any) -> None:
        if progress.pages == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(settings, store, s3_client, d, b, prefix, on_page=stop_after_one_page)
    [(job,)] = sql(store, "SELECT job_id FROM backfills")

    pinned = settings.model_copy(update={"model_revision": "rev2"})
    other, _, _ = define(pinned, name="rev", source=f"s3://{bucket}/p/", kinds="caption", params={})
    assert other.tasks == d.tasks  # the job's tasks look the same; the revision is not in them
    with pytest.raises(KeyboardInterrupt):
        run(pinned, store, s3_client, other, b, prefix, on_page=stop_after_one_page)
    [(state, job2, cursor)] = sql(store, "SELECT state, job_id, cursor FROM backfills")
    assert (state, cursor) == ("failed", "p/003.jpg") and job2 != job  # started over, with a new job

    # A row written before the definition was recorded (NULL) starts over too.
    sql(store, "UPDATE backfills SET definition_sha256 = NULL")
    report = run(pinned, store, s3_client, other, b, prefix)
    assert report.run is not None and not report.run.resumed and report.job not in (job, job2)


def test_max_rate_lists_whole_pages_and_paces_only_what_is_enqueued(settings, bucket, s3_client, store):
    put(s3_client, bucket, keys(12))
    d, b, prefix = define(settings, name="paced", source=f"s3://{bucket}/p/", kinds="caption", params={})
    assert run(settings, store, s3_client, d, b, prefix, page_size=1000).progress.enqueued == 12
    listings: list[str] = []
    s3_client.meta.events.register("before-call.s3.ListObjectsV2", lambda **_: listings.append("list"))
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    paced = {"max_rate": 2, "sleep": sleep, "clock": lambda: now[0], "page_size": 1000}
    up_to_date = run(settings, store, s3_client, d, b, prefix, **paced)
    assert (up_to_date.progress.enqueued, len(listings), waits) == (0, 1, [])  # was 6 listings of 2 objects

    # New objects among done ones: one listing, commits of one second's worth, the rate kept.
    put(s3_client, bucket, ["p/003a.jpg", "p/005a.jpg", "p/007a.jpg", "p/009a.jpg", "p/011a.jpg"])
    listings.clear()

    def stop_after_two_commits(progress: Any) -> None:
        if progress.pages == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(settings, store, s3_client, d, b, prefix, **paced, on_page=stop_after_two_commits)
    assert len(listings) == 1 and sum(waits) == pytest.approx(1.0)  # 4 enqueued at 2/s with a burst of 2
    [(cursor, job, enqueued)] = sql(store, "SELECT cursor, job_id, enqueued FROM backfills")
    assert (cursor, enqueued) == ("p/011.jpg", 4)  # a commit ends before the next second's first item
    resumed = run(settings, store, s3_client, d, b, prefix, **paced)
    assert resumed.run is not None and resumed.run.resumed and resumed.job == job
    assert refs(store, job) == all_refs(bucket, ["p/003a.jpg", "p/005a.jpg", "p/007a.jpg", "p/009a.jpg",
                                                  "p/011a.jpg"])


def test_ctrl_c_prints_the_runs_summary_and_its_job_and_exits_130(env, bucket, s3_client, store, monkeypatch):
    put(s3_client, bucket, keys(12))
    real = backfill_module.run_backfill

    def interrupted_after_two_pages(**kwargs: Any) -> Any:
        shown = kwargs["on_page"]

        def on_page(progress: Any) -> None:
            shown(progress)
            if progress.pages == 2:
                raise KeyboardInterrupt

        return real(**{**kwargs, "on_page": on_page})

    monkeypatch.setattr(backfill_module, "run_backfill", interrupted_after_two_pages)
    result = CliRunner().invoke(app, ["backfill", f"s3://{bucket}/p/", "--page-size", "4", "--name", "i"], env=env)
    assert result.exit_code == 130, result.output
    [(job,)] = sql(store, "SELECT job_id FROM backfills")
    assert result.stdout.strip() == str(job)
    assert "backfill i interrupted: listed=8 skipped=0 enqueued=8" in result.stderr
    assert "error[interrupted]" in result.stderr
