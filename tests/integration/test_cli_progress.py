"""`imgq status` and `imgq wait` read a job's progress as the API does (partial indexes, dead
letters, ``jobs.total``), never with a GROUP BY over every item, and `imgq wait` polls at most once a
second; what they print is what the per-item counts say."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from typer.testing import CliRunner

from imgq import cli_jobs
from imgq.cli import app
from imgq.db import jobs_view
from imgq.db.admin import Admin
from imgq.db.store import DeadRow, DoneItem, ObjectInfo, Store
from tests.jobs import caption_task, record

pytestmark = pytest.mark.integration


def _job(store: Store, n: int, tenant: str = "acme") -> uuid.UUID:
    return store.create_job(tasks=[record(caption_task("m"))], refs=[f"/d/{i}.jpg" for i in range(n)], tenant=tenant)


def _sql(store: Store, statement: str, **params: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(text(statement), params)


def _done(job: uuid.UUID, seq: int) -> DoneItem:
    task = caption_task("m")
    return DoneItem(job, seq, ObjectInfo("local", "", f"/d/{seq}.jpg", "v1", 10, 4, 4), "w1",
                    {"caption": (task.model, "rev1", task.params.digest(), task.params.canonical(), f"c{seq}")})


def _every_state(store: Store) -> uuid.UUID:
    """Of 8 items: 2 done, 1 dead, 1 purged, 1 running, 1 queued in the broker, 2 waiting in Postgres."""
    job = _job(store, 8)
    _sql(store, "UPDATE job_items SET published_at = now() WHERE job_id = :j AND seq < 6", j=job)
    store.claim(job, [0, 1, 2, 3, 4], "w1")
    store.write_done([_done(job, 0), _done(job, 1)])
    store.write_dead([DeadRow(job, 2, "not_an_image", "no", "w1"), DeadRow(job, 3, "not_an_image", "no", "w1")])
    _sql(store, "UPDATE dead_letters SET created_at = now() - interval '2 days' WHERE job_id = :j AND seq = 3", j=job)
    assert Admin(store.engine).purge(dt.timedelta(days=1)) == 1
    return job


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every SQL statement the command runs (in this process)."""
    seen: list[str] = []

    def record_statement(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(Engine, "before_cursor_execute", record_statement)
    yield seen
    event.remove(Engine, "before_cursor_execute", record_statement)


def _per_item_counts(seen: list[str]) -> list[str]:
    return [s for s in seen if "GROUP BY state" in s or "GROUP BY i.state" in s]


def test_status_prints_the_per_item_counts_without_counting_every_item(store: Store, database_url: str,
                                                                      statements: list[str]) -> None:
    job = _every_state(store)
    truth = {**store.counts(job), "purged": 1}
    statements.clear()
    env = {"IMGQ_DATABASE_URL": database_url}
    out = CliRunner().invoke(app, ["status", str(job)], env=env)
    assert out.exit_code == 0, out.output
    assert out.stdout == "queued=3 (waiting=2)  running=1  done=2  dead=1  purged=1\n"
    as_json = CliRunner().invoke(app, ["status", str(job), "--json"], env=env)
    assert json.loads(as_json.stdout) == {"job": str(job), **truth, "waiting": 2}
    assert list(json.loads(as_json.stdout)) == ["job", "queued", "running", "done", "dead", "purged", "waiting"]
    assert statements and _per_item_counts(statements) == [], "status must not GROUP BY every item of the job"


def test_wait_polls_at_most_once_a_second_and_prints_the_final_counts(store: Store, database_url: str,
                                                                     statements: list[str], monkeypatch) -> None:
    job = _every_state(store)
    slept: list[float] = []

    def finish_on_second_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 2:  # the first read found it pending: one more poll
            _sql(store, "UPDATE job_items SET state = 'done' WHERE job_id = :j AND state <> 'dead'", j=job)

    monkeypatch.setattr(cli_jobs.time, "sleep", finish_on_second_sleep)
    statements.clear()
    out = CliRunner().invoke(app, ["wait", str(job), "--timeout", "60"], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 0, out.output
    assert out.stdout == "queued=0  running=0  done=6  dead=1  purged=1\n"
    assert len(slept) == 2 and all(1.0 <= s <= 10.0 for s in slept), slept
    assert _per_item_counts(statements) == [], "each poll must not GROUP BY every item of the job"


def test_wait_counts_cancelled_items_as_finished_and_says_so(store: Store, database_url: str) -> None:
    job = _job(store, 5, tenant="default")
    store.claim(job, [0, 1], "w1")
    store.write_done([_done(job, 0), _done(job, 1)])
    assert jobs_view.cancel_job(store.engine, "default", job) == 3
    out = CliRunner().invoke(app, ["wait", str(job), "--timeout", "5"], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 0, out.output
    assert out.stdout == "queued=0  running=0  done=2  dead=0  cancelled=3  purged=0\n"
    as_json = CliRunner().invoke(app, ["wait", str(job), "--json"], env={"IMGQ_DATABASE_URL": database_url})
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == {"job": str(job), "queued": 0, "running": 0, "done": 2, "dead": 0,
                                          "cancelled": 3, "purged": 0}


def test_cancel_cancels_any_tenants_job_prints_its_counts_and_is_harmless_repeated(
        store: Store, database_url: str) -> None:
    job = _every_state(store)  # tenant acme: the CLI serves every tenant
    env = {"IMGQ_DATABASE_URL": database_url}
    out = CliRunner().invoke(app, ["cancel", str(job)], env=env)
    assert out.exit_code == 0, out.output
    # The item in the broker and the two waiting are cancelled; the running one finishes.
    assert out.stdout == "queued=0  running=1  done=2  dead=1  cancelled=3  purged=1\n"
    assert out.stderr.splitlines()[-1] == "3 queued items cancelled; 1 running item finishes"
    assert store.claim(job, [5], "w2") == {}, "nothing of it is claimed any more"
    again = CliRunner().invoke(app, ["cancel", str(job), "--json"], env=env)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == {"job": str(job), "cancelled_now": 0, "queued": 0, "running": 1, "done": 2,
                                        "dead": 1, "cancelled": 3, "purged": 1}
    assert again.stderr.splitlines()[-1] == "0 queued items cancelled; 1 running item finishes"


def test_cancel_of_a_finished_job_leaves_it_open_and_says_so(store: Store, database_url: str) -> None:
    job = _job(store, 2, tenant="default")
    store.claim(job, [0, 1], "w1")
    store.write_done([_done(job, 0), _done(job, 1)])
    out = CliRunner().invoke(app, ["cancel", str(job)], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 0, out.output
    assert out.stdout == "queued=0  running=0  done=2  dead=0  purged=0\n"
    assert out.stderr.splitlines()[-1] == (
        "nothing to cancel: the job has finished (its dead letters can still be retried)")


def test_status_of_a_cancelled_job_says_so_when_it_had_nothing_queued(store: Store, database_url: str) -> None:
    job = _job(store, 2, tenant="default")
    store.claim(job, [0, 1], "w1")  # both running: the cancel closes the job and cancels no item
    assert jobs_view.cancel_job(store.engine, "default", job) == 0
    out = CliRunner().invoke(app, ["status", str(job)], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 0, out.output
    assert out.stdout == "queued=0 (waiting=0)  running=2  done=0  dead=0  cancelled=0  purged=0\n"


def test_wait_times_out_naming_the_pending_items(store: Store, database_url: str) -> None:
    job = _every_state(store)
    out = CliRunner().invoke(app, ["wait", str(job), "--timeout", "0"], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 1
    assert out.stderr.strip().splitlines()[-1] == "error[timeout]: 4 items unfinished after 0s"


@pytest.mark.parametrize("command", [["status"], ["wait", "--timeout", "1"], ["cancel"]])
def test_an_unknown_job_is_not_found(database_url: str, command: list[str]) -> None:
    job = str(uuid.uuid4())
    out = CliRunner().invoke(app, [command[0], job, *command[1:]], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 1 and out.stderr == f"error[not_found]: no job {job}\n"
