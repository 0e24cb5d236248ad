"""Cancelling a job: its mark first, then its queued items in short transactions.

One statement over a million queued items ran 13.6 s, and held every row it had cancelled until the
end: a worker claiming one of them (a message already in the broker window) waited that long with
its whole batch. Marked first (``jobs.cancelled_at``, committed), the job is closed at once: the
feeder publishes none of its items, a claim takes none of its queued items (``imgq.db.store``), a
backfill page appends none (``imgq.db.backfills``), and a dead letter is not retried. Its queued
items then turn ``cancelled`` by ranges of ``seq`` (``CHUNK`` each, committed one by one, so no
lock outlives a chunk) and ``jobs.cancelled_items`` grows with each.

Whoever sweeps a job holds an advisory lock on it. A canceller that dies before the end (the API
process killed mid-request) lets it go with its connection; the feeder then cancels what is left,
a chunk per feed cycle (:func:`cancel_waiting`), and the lost sweep the items already published.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from imgq.db.store import COUNT_CANCELLED

# Items per transaction: about 0.15 s of row locks here (bench/cancel.py).
CHUNK = 10_000

# (classid, objid) of the per-job sweep lock; the other imgq advisory locks are 74657302-74657304.
_SWEEP_LOCK_CLASS = 74657305

# The mark, and the job's size: no item is added after it (a backfill page checks the mark under
# the job's row lock, so this waits for a page appending and then sees its items in ``total``).
_MARK = text("""
UPDATE jobs SET cancelled_at = coalesce(cancelled_at, now())
WHERE id = :job AND tenant = :tenant RETURNING total
""")

_LOCK = text(f"SELECT pg_advisory_lock({_SWEEP_LOCK_CLASS}, hashtext(CAST(:job AS text)))")
_UNLOCK = text(f"SELECT pg_advisory_unlock({_SWEEP_LOCK_CLASS}, hashtext(CAST(:job AS text)))")
_TRY_LOCK = text(f"SELECT pg_try_advisory_xact_lock({_SWEEP_LOCK_CLASS}, hashtext(CAST(:job AS text)))")

_RANGE = text(f"""
WITH items AS (
  UPDATE job_items SET state = 'cancelled', updated_at = now()
  WHERE job_id = :job AND seq >= :lo AND seq < :hi AND state = 'queued'
  RETURNING job_id, state
), counted AS ({COUNT_CANCELLED.format(items="items")}
)
SELECT count(*) FROM items
""")

# The feeder's chunk: the next items the feeder would have published (job_items_unpublished).
_WAITING = text(f"""
WITH items AS (
  UPDATE job_items SET state = 'cancelled', updated_at = now()
  WHERE job_id = :job AND state = 'queued' AND seq = ANY(ARRAY(
    SELECT seq FROM job_items WHERE job_id = :job AND state = 'queued' AND published_at IS NULL
    ORDER BY seq LIMIT :n FOR UPDATE SKIP LOCKED))
  RETURNING job_id, state
), counted AS ({COUNT_CANCELLED.format(items="items")}
)
SELECT count(*) FROM items
""")

Progress = Callable[[int, int, int], None]


def cancel_job(engine: Engine, tenant: str, job: uuid.UUID, *, chunk: int = CHUNK,
               progress: Progress | None = None) -> int | None:
    """Cancel one of ``tenant``'s jobs: mark it, then turn its queued items ``cancelled``, ``chunk``
    at a time. Returns how many items this call cancelled (0 when repeated), or None if the job is
    not ``tenant``'s. ``progress(cancelled, seqs_swept, total)`` after each chunk."""
    with engine.begin() as conn:
        total = conn.execute(_MARK, {"job": job, "tenant": tenant}).scalar_one_or_none()
    if total is None:
        return None
    cancelled = 0
    with engine.connect() as conn:
        # A repeated cancel waits for the first to finish, then finds nothing left: 0.
        conn.execute(_LOCK, {"job": job})
        conn.commit()
        try:
            for lo in range(0, total, chunk):
                hi = min(lo + chunk, total)
                cancelled += conn.execute(_RANGE, {"job": job, "lo": lo, "hi": hi}).scalar_one()
                conn.commit()
                if progress is not None:
                    progress(cancelled, hi, total)
        finally:
            try:
                conn.rollback()
                conn.execute(_UNLOCK, {"job": job})
                conn.commit()
            except Exception:
                conn.invalidate()  # closed, its session's lock goes with it
    return cancelled


def cancel_waiting(conn: Any, job: uuid.UUID, limit: int = CHUNK) -> int:
    """In the feeder's transaction: cancel up to ``limit`` of a cancelled job's items still waiting
    to be published, unless someone is sweeping the job now. Returns how many."""
    if not conn.execute(_TRY_LOCK, {"job": job}).scalar_one():
        return 0
    return int(conn.execute(_WAITING, {"job": job, "n": limit}).scalar_one())
