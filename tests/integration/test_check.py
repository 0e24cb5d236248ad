"""`imgq check` catches what it exists to catch. Each inconsistency is built directly in a real
Postgres, on a job whose items were finished by the real store; then `imgq check` must exit 1 and
name the offender. Every job kind, and a job of two kinds, is checked the same way."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from imgq.cli import app
from imgq.contract import CaptionParams, TaskSpec, make_task
from imgq.db.admin import Admin
from imgq.db.results import writer
from imgq.db.store import DeadRow, DoneItem, ObjectInfo, Store
from imgq.params import EmbedParams, ValidateParams
from tests.jobs import create_job

pytestmark = pytest.mark.integration

N = 4
VALUES: dict[str, Callable[[int], Any]] = {
    "caption": lambda seq: f"caption {seq}",
    "embed": lambda seq: np.eye(256, dtype=np.float32)[seq],
    "validate": lambda seq: (0.5 + seq / 10, 0.25),
}
TASKS: dict[str, TaskSpec] = {
    "caption": make_task("caption", "cap-model", CaptionParams(num_beams=2)),
    "embed": make_task("embed", "itm-model", EmbedParams()),
    "validate": make_task("validate", "itm-model", ValidateParams()),
}
# Jobs by their kinds: each kind alone, and a combined job (an item is done only with both rows).
JOBS = ["caption", "embed", "validate", "caption,embed"]


def make_job(store: Store, kinds: str, n: int = N, folder: str = "d") -> tuple[uuid.UUID, list[TaskSpec]]:
    """A healthy job: items 0..n-2 done with every kind's result, item n-1 dead with its letter."""
    tasks = [TASKS[k] for k in kinds.split(",")]
    pairs = any(t.kind == "validate" for t in tasks)
    refs = [(f"/{folder}/{i}.jpg", f"text {i}") if pairs else f"/{folder}/{i}.jpg" for i in range(n)]
    job = create_job(store, tasks, refs)
    store.claim(job, list(range(n)), "w1")
    store.write_done([
        DoneItem(job, seq, ObjectInfo("local", "", f"/{folder}/{seq}.jpg", "v1", 10, 4, 4), "w1",
                 {t.kind: (t.model, "rev1", t.params.digest(), t.params.canonical(), VALUES[t.kind](seq))
                  for t in tasks},
                 f"text {seq}" if pairs else None)
        for seq in range(n - 1)
    ])
    store.write_dead([DeadRow(job, n - 1, "not_an_image", "not an image", "w1")])
    return job, tasks


def sql(store: Store, statement: str, **params: Any) -> Any:
    with store.engine.begin() as conn:
        return conn.execute(text(statement), params)


def imgq_check(database_url: str, job: uuid.UUID) -> tuple[int, str, str]:
    """`imgq check JOB` in this process (so a mutation test run sees the code under test)."""
    result = CliRunner().invoke(app, ["check", str(job)], env={"IMGQ_DATABASE_URL": database_url})
    return result.exit_code, result.stdout, result.stderr


def links(kinds: str) -> list[str]:
    return [writer(k).link_column for k in kinds.split(",")]


@pytest.mark.parametrize("kinds", JOBS)
def test_a_healthy_job_passes(store, database_url, kinds):
    job, _ = make_job(store, kinds)
    rc, out, err = imgq_check(database_url, job)
    assert rc == 0, err
    assert out == f"job {job}: total={N} done={N - 1} dead=1 pending=0 purged=0 missing=0 duplicates=0 mismatched=0\n"
    assert err == ""


# -- each inconsistency, built by hand ----------------------------------------------------------------


def done_without_result(store: Store, job: uuid.UUID, kinds: str) -> None:
    # One kind's row is enough to be missing: a caption,embed item needs both.
    sql(store, f"UPDATE job_items SET {links(kinds)[-1]} = NULL WHERE job_id = :j AND seq = 1", j=job)


def done_with_a_dangling_link(store: Store, job: uuid.UUID, kinds: str) -> None:
    # The links have no foreign keys (migration 0010): a result row deleted by hand leaves the
    # item pointing at nothing, which the check must see as no result at all.
    table = writer(kinds.split(",")[-1]).table
    row = f"(SELECT {links(kinds)[-1]} FROM job_items WHERE job_id = :j AND seq = 1)"
    sql(store, f"DELETE FROM {table} WHERE id = {row}", j=job)


def dead_without_dead_letter(store: Store, job: uuid.UUID, kinds: str) -> None:
    sql(store, f"DELETE FROM dead_letters WHERE job_id = :j AND seq = {N - 1}", j=job)


def dead_letter_for_a_done_item(store: Store, job: uuid.UUID, kinds: str) -> None:
    sql(store, "INSERT INTO dead_letters (job_id, seq, ref, code, message, attempts, worker) "
               "VALUES (:j, 1, '/d/1.jpg', 'transient', 'late', 1, 'w2')", j=job)


def result_for_a_dead_item(store: Store, job: uuid.UUID, kinds: str) -> None:
    # The dead item points at a result too (item 0's row): two outcomes, seen from the other side.
    for link in links(kinds):
        sql(store, f"UPDATE job_items SET {link} = (SELECT {link} FROM job_items WHERE job_id = :j AND seq = 0) "
                   f"WHERE job_id = :j AND seq = {N - 1}", j=job)


def pending_item_with_a_dead_letter(store: Store, job: uuid.UUID, kinds: str) -> None:
    sql(store, "UPDATE job_items SET state = 'running' WHERE job_id = :j AND seq = :s", j=job, s=N - 1)


def pending_item_with_a_result(store: Store, job: uuid.UUID, kinds: str) -> None:
    sql(store, "UPDATE job_items SET state = 'queued' WHERE job_id = :j AND seq = 1", j=job)


def two_results_for_one_item(store: Store, job: uuid.UUID, kinds: str) -> None:
    """Only possible if the unique constraint is gone (a bad migration, a restore): the check must
    not lean on the constraint it exists to verify."""
    table = writer(kinds.split(",")[-1]).table
    sql(store, f"ALTER TABLE {table} DROP CONSTRAINT {table}_identity")
    with store.engine.begin() as conn:
        conn.execute(text(f"CREATE TEMP TABLE copy_of ON COMMIT DROP AS SELECT * FROM {table} "
                          f"WHERE id = (SELECT {links(kinds)[-1]} FROM job_items WHERE job_id = :j AND seq = 1)"),
                     {"j": job})
        conn.execute(text(f"UPDATE copy_of SET id = nextval(pg_get_serial_sequence('{table}', 'id'))"))
        conn.execute(text(f"INSERT INTO {table} SELECT * FROM copy_of"))


def result_of_another_model(store: Store, job: uuid.UUID, kinds: str) -> None:
    table = writer(kinds.split(",")[-1]).table
    sql(store, f"UPDATE {table} SET model = 'someone-elses-model' "
               f"WHERE id = (SELECT {links(kinds)[-1]} FROM job_items WHERE job_id = :j AND seq = 1)", j=job)


def result_of_other_params(store: Store, job: uuid.UUID, kinds: str) -> None:
    table = writer(kinds.split(",")[-1]).table
    sql(store, f"UPDATE {table} SET params_hash = 'forged-params' "
               f"WHERE id = (SELECT {links(kinds)[-1]} FROM job_items WHERE job_id = :j AND seq = 1)", j=job)


def item_row_lost(store: Store, job: uuid.UUID, kinds: str) -> None:
    sql(store, "DELETE FROM job_items WHERE job_id = :j AND seq = 2", j=job)


def purged_counted_twice(store: Store, job: uuid.UUID, kinds: str) -> None:
    sql(store, "UPDATE jobs SET purged = purged + 1 WHERE id = :j", j=job)


def total_understated(store: Store, job: uuid.UUID, kinds: str) -> None:
    sql(store, "UPDATE jobs SET total = total - 1 WHERE id = :j", j=job)


def linked_to_another_images_result(store: Store, job: uuid.UUID, kinds: str) -> None:
    # A well-formed row of the right model and params, only it is item 0's: seq 1 shows item 0's result.
    link = links(kinds)[-1]
    sql(store, f"UPDATE job_items SET {link} = (SELECT {link} FROM job_items WHERE job_id = :j AND seq = 0) "
               "WHERE job_id = :j AND seq = 1", j=job)


def image_id_of_another_item(store: Store, job: uuid.UUID, kinds: str) -> None:
    sql(store, "UPDATE job_items SET image_id = (SELECT image_id FROM job_items WHERE job_id = :j AND seq = 0) "
               "WHERE job_id = :j AND seq = 1", j=job)


def cancelled_in_a_live_job(store: Store, job: uuid.UUID, kinds: str) -> None:
    """A cancelled item has no record, so this one looks final and clean; but its job was never
    cancelled (jobs.cancelled_at is NULL), and only a cancel makes items cancelled."""
    cleared = ", ".join(f"{link} = NULL" for link in links(kinds))
    sql(store, f"UPDATE job_items SET state = 'cancelled', {cleared} WHERE job_id = :j AND seq = 1", j=job)
    sql(store, "UPDATE jobs SET cancelled_items = cancelled_items + 1 WHERE id = :j", j=job)  # counted, as a cancel


def cancelled_count_off(store: Store, job: uuid.UUID, kinds: str) -> None:
    """jobs.cancelled_items, which the pages show, disagrees with the items (migration 0015)."""
    sql(store, "UPDATE jobs SET cancelled_items = cancelled_items + 1 WHERE id = :j", j=job)


# (fault, what the summary line must count, what the offender line must say)
FAULTS: list[tuple[Callable[..., None], str, str]] = [
    (done_without_result, "missing=1 duplicates=0 mismatched=0", "seq 1 /d/1.jpg: state done without its record"),
    (done_with_a_dangling_link, "missing=1 duplicates=0 mismatched=0",
     "seq 1 /d/1.jpg: state done without its record"),
    (dead_without_dead_letter, "missing=1 duplicates=0 mismatched=0",
     f"seq {N - 1} /d/{N - 1}.jpg: state dead without its record"),
    (dead_letter_for_a_done_item, "missing=1 duplicates=0 mismatched=0",
     "seq 1 /d/1.jpg: two outcomes (result and dead letter)"),
    (result_for_a_dead_item, "missing=1 duplicates=0",
     f"seq {N - 1} /d/{N - 1}.jpg: two outcomes (result and dead letter)"),
    (pending_item_with_a_dead_letter, "missing=1 duplicates=0 mismatched=0",
     f"seq {N - 1} /d/{N - 1}.jpg: pending item with a final record"),
    (pending_item_with_a_result, "missing=1 duplicates=0 mismatched=0",
     "seq 1 /d/1.jpg: pending item with a final record"),
    (two_results_for_one_item, "missing=0 duplicates=1 mismatched=0", "rows for one identity"),
    (result_of_another_model, "missing=0 duplicates=0 mismatched=1", "seq 1 /d/1.jpg: {kind} result of "
                                                                       "someone-elses-model"),
    (result_of_other_params, "missing=0 duplicates=0 mismatched=1", "params forged-params, the job names"),
    (item_row_lost, "missing=1 duplicates=0 mismatched=0", "1 accepted items have no job_items row"),
    (purged_counted_twice, "purged=1 missing=1 duplicates=0 mismatched=0",
     f"1 items beyond the job's total (total={N} purged=1, {N} job_items rows)"),
    (total_understated, "missing=1 duplicates=0 mismatched=0",
     f"1 items beyond the job's total (total={N - 1} purged=0, {N} job_items rows)"),
    (linked_to_another_images_result, "missing=0 duplicates=0 mismatched=1", "seq 1 /d/1.jpg: {kind} result of image"),
    (image_id_of_another_item, "missing=0 duplicates=0", "seq 1 /d/1.jpg: {kind} result of image"),
    (cancelled_in_a_live_job, "missing=1 duplicates=0 mismatched=0",
     "seq 1 /d/1.jpg: cancelled item in a job that was never cancelled"),
    (cancelled_count_off, "missing=1 duplicates=0 mismatched=0", "the job counts 1 cancelled items; 0 are"),
]


@pytest.mark.parametrize("kinds", JOBS)
@pytest.mark.parametrize(("fault", "counts", "offender"), FAULTS, ids=[f[0].__name__ for f in FAULTS])
def test_check_exits_1_and_names_the_offender(store, database_url, kinds, fault, counts, offender):
    job, _ = make_job(store, kinds)
    other, _ = make_job(store, kinds, folder="e")  # untouched, beside it: the check looks at one job
    fault(store, job, kinds)
    rc, out, err = imgq_check(database_url, job)
    assert rc == 1, out + err
    assert counts in out
    assert offender.format(kind=kinds.split(",")[-1]) in err
    assert imgq_check(database_url, other)[0] == 0


def test_two_results_name_the_image_and_count_every_extra_row(store, database_url):
    job, _ = make_job(store, "caption")
    two_results_for_one_item(store, job, "caption")
    image = sql(store, "SELECT image_id FROM job_items WHERE job_id = :j AND seq = 1", j=job).scalar_one()
    report = Admin(store.engine).check(job)
    assert report is not None and (report.missing, report.duplicates, report.mismatched) == (0, 1, 0)
    assert report.offenders == [f"image {image}: 2 caption rows for one identity"]


def test_a_purge_that_is_counted_balances(store, database_url):
    """The legitimate way an item disappears: deleted with its dead letter and counted in purged."""
    job, _ = make_job(store, "caption")
    sql(store, f"DELETE FROM dead_letters WHERE job_id = :j AND seq = {N - 1}", j=job)
    sql(store, f"DELETE FROM job_items WHERE job_id = :j AND seq = {N - 1}", j=job)
    sql(store, "UPDATE jobs SET purged = 1 WHERE id = :j", j=job)
    rc, out, err = imgq_check(database_url, job)
    assert rc == 0, err
    assert f"total={N} done={N - 1} dead=0 pending=0 purged=1 missing=0" in out


def test_every_offender_is_listed_and_counted(store, database_url):
    job, _ = make_job(store, "caption", n=6)
    done_without_result(store, job, "caption")
    sql(store, "UPDATE job_items SET state = 'dead' WHERE job_id = :j AND seq = 2", j=job)
    sql(store, "UPDATE captions SET model = 'x' WHERE id = (SELECT caption_id FROM job_items "
               "WHERE job_id = :j AND seq = 3)", j=job)
    rc, out, err = imgq_check(database_url, job)
    assert rc == 1
    assert "missing=2 duplicates=0 mismatched=1" in out
    lines = err.strip().splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["seq 1 /d/1.jpg", "seq 2 /d/2.jpg", "seq 3 /d/3.jpg"]


def test_an_unknown_job_is_not_found(store, database_url):
    rc, _, err = imgq_check(database_url, uuid.uuid4())
    assert rc == 1 and "not_found" in err


def test_every_mismatch_and_every_extra_row_is_counted(store, database_url):
    job, _ = make_job(store, "caption")
    sql(store, "UPDATE captions SET model = 'x' WHERE id IN (SELECT caption_id FROM job_items "
               "WHERE job_id = :j AND seq IN (0, 1))", j=job)
    sql(store, "ALTER TABLE captions DROP CONSTRAINT captions_identity")
    sql(store, "INSERT INTO captions (image_id, model, model_revision, params_hash, params, text) "
               "SELECT image_id, model, model_revision, params_hash, params, text FROM captions "
               "WHERE id IN (SELECT caption_id FROM job_items WHERE job_id = :j AND seq IN (1, 2))", j=job)
    rc, out, _ = imgq_check(database_url, job)
    assert rc == 1 and "missing=0 duplicates=2 mismatched=2" in out


def test_require_finished_names_the_pending_items_and_exits_3(store, database_url):
    job = create_job(store, [TASKS["caption"]], ["/x/0.jpg", "/x/1.jpg"])
    store.claim(job, [1], "w1")
    out = CliRunner().invoke(app, ["check", str(job), "--require-finished"], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 3 and "pending=2" in out.stdout
    assert out.stderr.strip() == (f"error[job_unfinished]: 2 items are still queued or running (`imgq wait {job}` "
                                  "blocks until they are final)")


def test_more_item_rows_than_the_total_are_a_surplus_not_a_negative_shortfall(store, database_url):
    job, _ = make_job(store, "caption")
    sql(store, "UPDATE jobs SET total = total - 2 WHERE id = :j", j=job)
    report = Admin(store.engine).check(job)
    assert report is not None and not report.ok and report.missing == 2
    assert report.offenders == [f"2 items beyond the job's total (total={N - 2} purged=0, {N} job_items rows)"]


def test_a_cancelled_item_passes_only_in_a_cancelled_job(store, database_url):
    job, _ = make_job(store, "caption,embed")
    cancelled_in_a_live_job(store, job, "caption,embed")
    sql(store, "UPDATE jobs SET cancelled_at = now() WHERE id = :j", j=job)
    rc, _, err = imgq_check(database_url, job)
    assert rc == 0, err
    dead_letter_for_a_done_item(store, job, "caption,embed")  # seq 1's: both faults at once, both named
    sql(store, "UPDATE jobs SET cancelled_at = NULL WHERE id = :j", j=job)
    report = Admin(store.engine).check(job)
    assert report is not None and report.missing == 1
    assert report.offenders == ["seq 1 /d/1.jpg: cancelled item with a result or dead letter, "
                                "in a job that was never cancelled"]


def test_a_result_of_another_image_names_both_images_and_any_other_difference(store, database_url):
    job, _ = make_job(store, "caption")
    image = dict(sql(store, "SELECT seq, image_id FROM job_items WHERE job_id = :j AND seq < 2", j=job).all())
    linked_to_another_images_result(store, job, "caption")
    sql(store, "UPDATE captions SET model = 'x' WHERE id = (SELECT caption_id FROM job_items "
               "WHERE job_id = :j AND seq = 0)", j=job)
    report = Admin(store.engine).check(job)
    assert report is not None and (report.missing, report.duplicates, report.mismatched) == (0, 0, 2)
    task = TASKS["caption"]
    model_differs = f"caption result of x params {task.params.digest()}, the job names cap-model params " \
                    f"{task.params.digest()}"
    assert report.offenders == [
        f"seq 0 /d/0.jpg: {model_differs}",
        f"seq 1 /d/1.jpg: {model_differs}; caption result of image {image[0]}, the item's image is {image[1]}",
    ]


def test_json_gives_the_counts_and_offenders_with_the_same_exit(store, database_url):
    import json

    job, _ = make_job(store, "caption", n=6)
    env = {"IMGQ_DATABASE_URL": database_url}
    healthy = CliRunner().invoke(app, ["check", str(job), "--json"], env=env)
    assert healthy.exit_code == 0, healthy.output
    assert json.loads(healthy.stdout) == {"job": str(job), "ok": True, "total": 6, "done": 5, "dead": 1,
                                          "pending": 0, "purged": 0, "cancelled": 0, "missing": 0, "duplicates": 0,
                                          "mismatched": 0, "translations": None, "offenders": []}
    done_without_result(store, job, "caption")
    broken = CliRunner().invoke(app, ["check", str(job), "--json"], env=env)
    assert broken.exit_code == 1 and broken.stderr == ""
    report = json.loads(broken.stdout)
    assert (report["ok"], report["missing"], len(report["offenders"])) == (False, 1, 1)
    assert report["offenders"][0].startswith("seq 1 /d/1.jpg")
