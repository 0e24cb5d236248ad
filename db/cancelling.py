"""Cancelling a job: its mark first, then its queued items in short transactions.

One statement over a million queued items held every row it had cancelled until its end (4.6-5.7 s
here): a worker claiming one of them (a message already in the broker window) waited that long
with its whole batch. Marked first (``jobs.cancelled_at``, committed), the job is closed: the
feeder publishes none of its items, a claim takes none of its items (``imgq.db.store``: neither a
queued one nor a running one delivered again), the reaper ends a dead worker's items of it
cancelled (``imgq.db.admin``), a backfill page appends none (``imgq.db.backfills``), and a dead
letter is not retried. A statement already under way when the mark commits may still act on it (a
claim then runs its item, as a running item; the rest are cancelled below). Its queued items then
turn ``cancelled`` by ranges of ``seq`` (``CHUNK`` each, committed one by one, so no lock outlives
a range) and ``jobs.cancelled_items`` grows with each.

A chunk holds a transaction-level advisory lock on the job (``locks.CANCEL``), so the feeder never
sweeps beside it; a session lock would, behind a transaction-mode pooler (PgBouncer), stay on
whichever server session took it. A canceller that dies midway (the API process killed) leaves the job closed; a
minute after the mark (``CUT_SHORT_AFTER_S``, long enough for a sweep of ten million items to end
first) the feeder cancels what is left waiting, a chunk per feed cycle (:func:`cancel_waiting`),
and the lost sweep the items that were already published.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from imgq.db import locks
from imgq.db.store import COUNT_CANCELLED

# Items per transaction: about 50 ms of row locks here (bench/cancel.py: 4.8 s a million).
CHUNK = 10_000
# How long after the mark the feeder takes over a sweep (about 5 s a million items here).
CUT_SHORT_AFTER_S = 60.0

# The mark, and the job's size: no item is added after it (a backfill page checks the mark under
# the job's row lock, so this waits for a page appending and then sees its items in ``total``).
# A finished job is not marked: nothing of it is left to stop, and a mark would refuse the retry of
# its dead letters for good (a cancel that arrives just after the last item ended). Finished:
# nothing pending (the two partial indexes that hold only pending items). A backfill's job is
# marked all the same: its mark has a meaning beyond stopping it (the next run decides its objects
# again and enqueues those it did not finish, docs/backfill.md), and a run that may resume into it
# must not. A dead letter retried later makes a job pending again, as after any cancel that came
# first. The job's row lock is taken first and the mark is a second statement (a new
# snapshot under READ COMMITTED), so a retry that held the job and committed meanwhile is seen.
_OWN = text("SELECT total FROM jobs WHERE id = :job AND tenant = :tenant FOR NO KEY UPDATE")
_MARK = text("""
UPDATE jobs j SET cancelled_at = coalesce(j.cancelled_at, now())
WHERE j.id = :job AND (
  EXISTS (SELECT 1 FROM job_items i WHERE i.job_id = j.id AND i.state = 'queued' AND i.published_at IS NULL)
  OR EXISTS (SELECT 1 FROM job_items i WHERE i.job_id = j.id AND i.state IN ('queued', 'running')
             AND i.published_at IS NOT NULL)
  OR j.source = 'backfill')
RETURNING j.id
""")

_LOCK = text(f"SELECT pg_advisory_xact_lock({locks.CANCEL}, hashtext(CAST(:job AS text)))")
# The feeder's: only for a sweep cut short (marked long enough ago), and never waiting.
_TAKE_OVER = text(f"""
SELECT coalesce((SELECT cancelled_at < statement_timestamp() - make_interval(secs => :after)
                 FROM jobs WHERE id = :job), false)
       AND pg_try_advisory_xact_lock({locks.CANCEL}, hashtext(CAST(:job AS text)))
""")

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
    """Cancel one of ``tenant``'s jobs: mark it (unless it has finished), then turn its queued items
    ``cancelled``, ``chunk`` at a time. Returns how many items this call cancelled (0 when repeated,
    or when it had finished), or None if the job is not ``tenant``'s. ``progress(cancelled,
    seqs_swept, total)`` after each chunk."""
    with engine.begin() as conn:
        total = conn.execute(_OWN, {"job": job, "tenant": tenant}).scalar_one_or_none()
        marked = total is not None and conn.execute(_MARK, {"job": job}).first() is not None
    if total is None:
        return None
    if not marked:
        return 0
    cancelled = 0
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        with engine.begin() as conn:
            conn.execute(_LOCK, {"job": job})
            cancelled += conn.execute(_RANGE, {"job": job, "lo": lo, "hi": hi}).scalar_one()
        if progress is not None:
            progress(cancelled, hi, total)
    return cancelled


def cancel_waiting(conn: Any, job: uuid.UUID, limit: int = CHUNK, *,
                   after_s: float = CUT_SHORT_AFTER_S) -> int:
    """In the feeder's transaction: cancel up to ``limit`` of a cancelled job's items still waiting
    to be published, once ``after_s`` have passed since its mark and unless a chunk of its cancel
    runs now. Returns how many."""
    if not conn.execute(_TAKE_OVER, {"job": job, "after": after_s}).scalar_one():
        return 0
    return int(conn.execute(_WAITING, {"job": job, "n": limit}).scalar_one())
