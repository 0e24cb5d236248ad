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
    assert 4 / 2.0 < second.rate <= 4 / 1.0, second.rate
    assert second.eta_s is not None and 6 / second.rate == second.eta_s
    assert not any("state IN ('done', 'dead')" in sql for sql in statements), "no read of finished items"
