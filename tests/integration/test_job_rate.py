"""A job's rate and ETA on the jobs page and GET /v1/jobs/{id}: the slope of the final counts the
process saw, without reading the job's finished items (a 1M-item job's poll took 0.4-0.9 s)."""

from __future__ import annotations

import time

from sqlalchemy import event, text

from imgq.db.jobs_page import job_summary
from tests.jobs import caption_task, record


def test_the_rate_is_the_slope_of_what_polls_saw_and_no_poll_reads_finished_items(store) -> None:
    job = store.create_job(tasks=[record(caption_task("m"))], refs=[f"/d/{i}.jpg" for i in range(10)], tenant="t")
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda c, cur, sql, *rest: statements.append(sql))
    first = job_summary(store.engine, "t", job)
    assert first is not None and first.rate is None and first.eta_s is None, "one look: no rate yet"
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = 'done' WHERE job_id = :j AND seq < 4"), {"j": job})
    time.sleep(1.0)
    second = job_summary(store.engine, "t", job)
    assert second is not None and second.done == 4 and second.rate is not None
    assert 4 / 5.0 < second.rate <= 4 / 1.0, second.rate  # 1 s apart, or a little more on a loaded host
    assert second.eta_s is not None and 6 / second.rate == second.eta_s
    assert not any("state IN ('done', 'dead')" in sql for sql in statements), "no read of finished items"


def test_cancelled_items_are_counted_by_the_statements_that_cancel_them(store) -> None:
    """A cancelled job's summary counted its cancelled items on every look (0.6 s for a million):
    the cancel, a release and a lost sweep now each add what they cancelled to the job's row."""
    from imgq.db.admin import Admin
    from imgq.db.jobs_view import cancel_job

    job = store.create_job(tasks=[record(caption_task("m"))], refs=[f"/d/{i}.jpg" for i in range(10)], tenant="t",
                           queue="q")
    store.claim(job, [0, 1, 2], "w1")
    assert cancel_job(store.engine, "t", job) == 7 and cancel_job(store.engine, "t", job) == 0
    store.release(job, [0])  # a running item of the cancelled job handed back
    with Admin(store.engine).feeding("q") as tx:  # another found lost (its worker never settled it)
        assert tx is not None
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE job_items SET updated_at = now() - interval '1 hour' WHERE job_id = :j "
                              "AND seq = 1"), {"j": job})
        assert tx.lost(queued_older_than_s=None, running_older_than_s=60) == 1
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda c, cur, sql, *rest: statements.append(sql))
    summary = job_summary(store.engine, "t", job)
    assert summary is not None and (summary.cancelled, summary.running, summary.done) == (9, 1, 0)
    assert not any("state = 'cancelled'" in sql for sql in statements), "counted from the job's row"
    with store.engine.connect() as conn:
        counted = conn.execute(text("SELECT count(*) FROM job_items WHERE job_id = :j AND state = 'cancelled'"),
                               {"j": job}).scalar_one()
    assert counted == 9
