"""`imgq dlq list` says when its limit cut the list; `imgq dlq retry` with the broker down reports
what it committed (exit 0, warning[publish_failed]) rather than an error after acting."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from imgq.cli import app
from imgq.db.admin import Admin
from imgq.db.store import DeadRow, Store
from tests.jobs import caption_task, create_job

pytestmark = pytest.mark.integration


def _dead_job(store: Store, dead: int) -> uuid.UUID:
    """A job of ``dead`` items, every one dead-lettered."""
    job = create_job(store, [caption_task("m")], [f"/d/{i}.jpg" for i in range(dead)])
    store.claim(job, list(range(dead)), "w1")
    store.write_dead([DeadRow(job, seq, "not_an_image", "no", "w1") for seq in range(dead)])
    return job


def test_dlq_list_says_when_more_dead_letters_exist_than_it_shows(store: Store, database_url: str) -> None:
    job = _dead_job(store, 3)
    env = {"IMGQ_DATABASE_URL": database_url}
    cut = CliRunner().invoke(app, ["dlq", "list", "--limit", "2"], env=env)
    assert cut.exit_code == 0, cut.output
    assert len(cut.stdout.splitlines()) == 3 and cut.stdout.startswith("ITEM")  # the header and 2 rows
    assert cut.stderr == ("2 dead letters shown; more exist: --limit N shows more, --code or --job narrows "
                          "them\n")
    as_json = CliRunner().invoke(app, ["dlq", "list", "--limit", "1", "--json"], env=env)
    assert [json.loads(line)["job_id"] for line in as_json.stdout.splitlines()] == [str(job)]
    assert as_json.stderr.startswith("1 dead letter shown; more exist")
    whole = CliRunner().invoke(app, ["dlq", "list", "--limit", "3"], env=env)
    assert len(whole.stdout.splitlines()) == 4 and whole.stderr == ""


def test_dlq_retry_with_the_broker_down_reports_the_committed_retry(store: Store, database_url: str,
                                                                    tmp_path: Path) -> None:
    job = _dead_job(store, 2)
    env = {"IMGQ_DATABASE_URL": database_url, "IMGQ_BROKER_URL": f"redis+socket://{tmp_path}/nobody.sock"}
    out = CliRunner().invoke(app, ["dlq", "retry", "--job", str(job)], env=env)
    assert out.exit_code == 0, (out.output, out.exception)
    assert out.stdout == "re-queued 2 items\n"
    warning = out.stderr.strip()
    assert len(warning.splitlines()) == 1, out.stderr
    assert warning.startswith("warning[publish_failed]: the retry is committed (2 items re-queued) but the broker "
                              "refused its messages (")
    assert warning.endswith(f"The items wait in Postgres: a worker's feeder publishes them once the broker is back; "
                            f"`imgq reconcile --job {job}` does it now.")
    assert store.counts(job) == {"queued": 2, "running": 0, "done": 0, "dead": 0}
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one() == 0
        waiting = "SELECT count(*) FROM job_items WHERE job_id = :j AND published_at IS NULL"
        assert conn.execute(text(waiting), {"j": job}).scalar_one() == 2, "left to the feeder"


def test_dlq_retry_of_one_item_publishes_it(store: Store, database_url: str, broker_url: str) -> None:
    job = _dead_job(store, 2)
    env = {"IMGQ_DATABASE_URL": database_url, "IMGQ_BROKER_URL": broker_url}
    out = CliRunner().invoke(app, ["dlq", "retry", "--id", f"{job}:1"], env=env)
    assert out.exit_code == 0 and out.stderr == "", out.output
    assert out.stdout == "re-queued 1 items; 1 published now\n"
    assert store.counts(job) == {"queued": 1, "running": 0, "done": 0, "dead": 1}
    nothing = CliRunner().invoke(app, ["dlq", "retry", "--id", f"{job}:1"], env=env)
    assert nothing.exit_code == 0 and nothing.stdout == "re-queued 0 items\n"
    assert nothing.stderr == f"item {job}:1 is queued, not a dead letter: nothing to retry\n"


def test_dlq_retry_of_an_item_the_job_does_not_have_is_a_bad_filter(store: Store, database_url: str) -> None:
    job = _dead_job(store, 2)
    out = CliRunner().invoke(app, ["dlq", "retry", "--id", f"{job}:5"], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 2, out.output
    assert out.stdout == ""
    assert out.stderr == f"error[bad_filter]: --id {job}:5: job {job} has no item 5 (its items are 0 to 1)\n"
    assert store.counts(job) == {"queued": 0, "running": 0, "done": 0, "dead": 2}
    assert Admin(store.engine).purge(dt.timedelta(0)) == 2
    purged = CliRunner().invoke(app, ["dlq", "retry", "--id", f"{job}:1"], env={"IMGQ_DATABASE_URL": database_url})
    assert purged.exit_code == 2 and purged.stderr == (
        f"error[bad_filter]: --id {job}:1: item 1 of job {job} was a dead letter, purged since (`imgq dlq purge`)\n")


def test_results_of_a_job_with_purged_dead_letters_says_they_are_missing(store: Store, database_url: str) -> None:
    job = create_job(store, [caption_task("m")], ["/d/0.jpg", "/d/1.jpg", "/d/2.jpg"])
    store.claim(job, [0, 1], "w1")
    store.write_dead([DeadRow(job, 1, "not_an_image", "no", "w1")])
    env = {"IMGQ_DATABASE_URL": database_url}
    whole = CliRunner().invoke(app, ["results", str(job)], env=env)
    assert whole.exit_code == 0 and whole.stderr == "" and len(whole.stdout.splitlines()) == 3, whole.output
    assert Admin(store.engine).purge(dt.timedelta(0)) == 1
    short = CliRunner().invoke(app, ["results", str(job)], env=env)
    assert short.exit_code == 0, short.output
    assert [json.loads(line)["seq"] for line in short.stdout.splitlines()] == [0, 2]
    assert short.stderr == ("note: this export leaves out 1 dead-lettered item of this job, deleted by "
                            "`imgq dlq purge`\n")


def test_dlq_retry_of_an_item_that_is_no_dead_letter_says_why_nothing_was_requeued(
        store: Store, database_url: str, broker_url: str) -> None:
    job = create_job(store, [caption_task("m")], ["/d/0.jpg", "/d/1.jpg", "/d/2.jpg"])
    store.claim(job, [0, 1], "w1")
    store.write_dead([DeadRow(job, 1, "not_an_image", "no", "w1")])
    env = {"IMGQ_DATABASE_URL": database_url, "IMGQ_BROKER_URL": broker_url}
    for seq, why in [(0, "running"), (2, "queued")]:
        out = CliRunner().invoke(app, ["dlq", "retry", "--id", f"{job}:{seq}"], env=env)
        assert out.exit_code == 0, out.output
        assert out.stdout == "re-queued 0 items\n"
        assert out.stderr == f"item {job}:{seq} is {why}, not a dead letter: nothing to retry\n"
    other = CliRunner().invoke(app, ["dlq", "retry", "--id", f"{job}:1", "--code", "truncated"], env=env)
    assert other.exit_code == 0 and other.stdout == "re-queued 0 items\n", other.output
    assert other.stderr == f"item {job}:1 is a dead letter of code not_an_image, not truncated: nothing to retry\n"
    assert store.counts(job) == {"queued": 1, "running": 1, "done": 0, "dead": 1}
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET cancelled_at = now() WHERE id = :j"), {"j": job})
    cancelled = CliRunner().invoke(app, ["dlq", "retry", "--id", f"{job}:1"], env=env)
    assert cancelled.exit_code == 0 and cancelled.stdout == "re-queued 0 items\n", cancelled.output
    assert cancelled.stderr == f"item {job}:1 is a dead letter of a cancelled job: nothing to retry\n"
    whole = CliRunner().invoke(app, ["dlq", "retry", "--job", str(job)], env=env)  # said only "re-queued 0"
    assert whole.exit_code == 0 and whole.stdout == "re-queued 0 items\n", whole.output
    assert whole.stderr == f"job {job} was cancelled: its 1 dead letter stays as it is\n"
    coded = CliRunner().invoke(app, ["dlq", "retry", "--job", str(job), "--code", "truncated"], env=env)
    assert coded.exit_code == 0 and coded.stderr == "", coded.output  # it has none of that code
