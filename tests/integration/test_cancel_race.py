"""A cancel that lands while a backfill page is appending items to the job: the page holds the job
row until it commits, and the cancel must then see (and cancel) what the page appended."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from imgq.db import jobs_view
from imgq.db.store import Store
from tests.jobs import caption_task, create_job
from tests.waits import SETTLE_S, lock_waited

pytestmark = pytest.mark.integration


def test_a_cancel_waiting_on_a_page_cancels_the_items_the_page_appended(store: Store):
    job = create_job(store, [caption_task("m")], ["/d/0.jpg"])
    with store.engine.begin() as conn:
        tenant = conn.execute(text("SELECT tenant FROM jobs WHERE id = :j"), {"j": job}).scalar_one()
    result: list[int | None] = []
    with store.engine.connect() as page:
        tx = page.begin()
        # What a backfill page does: lock the job to append, append, grow the total.
        page.execute(text("SELECT total FROM jobs WHERE id = :j FOR UPDATE"), {"j": job})
        page.execute(text("INSERT INTO job_items (job_id, seq, ref, state) VALUES (:j, 1, '/d/1.jpg', 'queued')"),
                     {"j": job})
        page.execute(text("UPDATE jobs SET total = total + 1 WHERE id = :j"), {"j": job})
        cancelling = threading.Thread(target=lambda: result.append(jobs_view.cancel_job(store.engine, tenant, job)))
        cancelling.start()
        assert lock_waited(store.engine), "the cancel never waited for the page"
        tx.commit()
    cancelling.join(SETTLE_S)
    assert result == [2]
    with store.engine.connect() as conn:
        states = conn.execute(text("SELECT seq, state FROM job_items WHERE job_id = :j ORDER BY seq"),
                              {"j": job}).all()
    assert [tuple(r) for r in states] == [(0, "cancelled"), (1, "cancelled")]
