"""The SQL of job-finished callbacks (``worker/notifier.py`` sends them; docs/callbacks.md).

A callback is due when ``jobs.callback_state = 'pending'``, ``callback_next_at <= now()`` and no item
of the job is queued or running. :meth:`CallbackStore.claim` takes due jobs with ``FOR UPDATE SKIP
LOCKED``, pushes ``callback_next_at`` forward by a lease, reads what it needs and commits at once:
no row lock is held across the HTTP request, and a notifier that dies mid-send leaves the callback
to another once the lease passes (so a receiver may see a delivery twice: ``Imgq-Job`` dedupes).
:meth:`CallbackStore.record` then adds the ``callback_attempts`` row and sets the outcome, only
if the callback is still pending.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, text

_CLAIM = text("""
SELECT j.id, j.callback_url, j.tenant, t.callback_secret,
       (SELECT count(*) FROM callback_attempts a WHERE a.job_id = j.id) AS attempts
FROM jobs j LEFT JOIN tenants t ON t.name = j.tenant
WHERE j.callback_state = 'pending' AND j.callback_next_at <= now()
  -- Nothing pending: nothing waiting in Postgres, nothing in flight (both probes are job-keyed
  -- partial indexes; a running item is always published).
  AND NOT EXISTS (SELECT 1 FROM job_items i WHERE i.job_id = j.id AND i.state = 'queued' AND i.published_at IS NULL)
  AND NOT EXISTS (SELECT 1 FROM job_items i WHERE i.job_id = j.id AND i.state IN ('queued', 'running')
                  AND i.published_at IS NOT NULL)
ORDER BY j.callback_next_at
LIMIT :limit
FOR UPDATE OF j SKIP LOCKED
""")

_LEASE = text("""
UPDATE jobs SET callback_next_at = now() + make_interval(secs => CAST(:lease_s AS float8))
WHERE id = ANY(CAST(:ids AS uuid[]))
""")

_JOB = text("""
SELECT id, tenant, tasks, total, purged, created_at, cancelled_at FROM jobs WHERE id = :job
""")

_STATES = text("""
SELECT state, count(*), max(updated_at) FROM job_items WHERE job_id = :job GROUP BY state
""")

_DEAD_CODES = text("SELECT code, count(*) FROM dead_letters WHERE job_id = :job GROUP BY code ORDER BY code")

_ATTEMPT = text("""
INSERT INTO callback_attempts (job_id, attempt, status, error, ms) VALUES (:job, :attempt, :status, :error, :ms)
""")

_OUTCOME = text("""
UPDATE jobs SET callback_state = CAST(:state AS text),
                callback_next_at = CASE WHEN CAST(:state AS text) = 'pending'
                                        THEN now() + make_interval(secs => CAST(:delay_s AS float8)) END
WHERE id = :job AND callback_state = 'pending'
""")

_ATTEMPTS = text("""
SELECT attempt, at, status, error, ms FROM callback_attempts WHERE job_id = :job ORDER BY attempt, id
""")

STATES = ("queued", "running", "done", "dead", "cancelled")


@dataclass(frozen=True)
class DueCallback:
    job: uuid.UUID
    url: str
    tenant: str
    secret: str | None  # None: the tenant has no tenants row
    attempt: int  # the number of the attempt about to be made (1-based)
    summary: dict[str, Any]


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value is not None else None


def summary(conn: Any, job: uuid.UUID) -> dict[str, Any]:
    """The JSON body of a job's callback: what the job is and how each of its items ended."""
    row = conn.execute(_JOB, {"job": job}).one()
    counts = dict.fromkeys(STATES, 0)
    finished: dt.datetime | None = None
    for state, count, last in conn.execute(_STATES, {"job": job}):
        counts[state] = int(count)
        finished = last if finished is None or (last is not None and last > finished) else finished
    kinds = [str(t["kind"]) for t in (row.tasks or []) if isinstance(t, dict) and "kind" in t]
    return {
        "event": "job.finished",
        "job": str(row.id),
        "tenant": row.tenant,
        "kinds": kinds,
        "total": int(row.total),
        "counts": counts,
        "purged": int(row.purged or 0),
        "dead_letters": {code: int(n) for code, n in conn.execute(_DEAD_CODES, {"job": job})},
        "created_at": _iso(row.created_at),
        "finished_at": _iso(finished),
        "cancelled": row.cancelled_at is not None,
        "cancelled_at": _iso(row.cancelled_at),
    }


class CallbackStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def claim(self, *, limit: int, lease_s: float) -> list[DueCallback]:
        """Due callbacks, leased for ``lease_s`` seconds (committed before this returns)."""
        with self.engine.begin() as conn:
            rows = conn.execute(_CLAIM, {"limit": limit}).all()
            if not rows:
                return []
            conn.execute(_LEASE, {"ids": [r.id for r in rows], "lease_s": lease_s})
            return [DueCallback(job=r.id, url=r.callback_url, tenant=r.tenant, secret=r.callback_secret,
                                attempt=int(r.attempts) + 1, summary=summary(conn, r.id)) for r in rows]

    def record(
        self, job: uuid.UUID, attempt: int, *, state: str, delay_s: float = 0.0,
        status: int | None = None, error: str | None = None, ms: int | None = None,
    ) -> bool:
        """Add the attempt's row and set the callback's state (``pending`` again after ``delay_s``,
        ``delivered`` or ``failed``). False if the callback was no longer pending."""
        with self.engine.begin() as conn:
            conn.execute(_ATTEMPT, {"job": job, "attempt": attempt, "status": status,
                                    "error": error[:2000] if error else None, "ms": ms})
            return conn.execute(_OUTCOME, {"job": job, "state": state, "delay_s": delay_s}).rowcount == 1

    def attempts(self, job: uuid.UUID) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(_ATTEMPTS, {"job": job})]
