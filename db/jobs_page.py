"""The jobs page's queries (/ui): a tenant's recent jobs with their counts, rate and dead letters.

The page refreshes every few seconds, so no query here walks every item of every listed job:

- pending items are counted from the two partial indexes that cover them (``job_items_unpublished``
  and ``job_items_in_flight``), dead ones from ``dead_letters`` (one row per dead item), cancelled
  ones are ``jobs.cancelled_items`` (kept by the statements that cancel); done is what remains of
  ``total - purged``;
- the rate (items turned final per second over the last minute) is the slope of the counts this
  process saw (``imgq.rates``), not a count of recently finished rows: only for jobs that still
  have pending items, the only ones with an ETA, and unknown at the first look.

Every query takes the tenant, so a job of another tenant is simply not found.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text

from imgq.rates import FinalRates

# This process's samples of each job's final items: the rate is their slope (imgq.rates).
RATES = FinalRates()

_SUMMARIES = """
SELECT j.id, j.kind, j.tasks, j.source, j.priority, j.total, j.purged, j.created_at, j.cancelled_at,
       j.callback_state, now() AS now, w.waiting, f.queued, f.running,
       (SELECT count(*) FROM dead_letters d WHERE d.job_id = j.id) AS dead, j.cancelled_items AS cancelled
FROM jobs j
CROSS JOIN LATERAL (
  SELECT count(*) AS waiting FROM job_items i
  WHERE i.job_id = j.id AND i.state = 'queued' AND i.published_at IS NULL) w
CROSS JOIN LATERAL (
  SELECT count(*) FILTER (WHERE i.state = 'queued') AS queued, count(*) FILTER (WHERE i.state = 'running') AS running
  FROM job_items i WHERE i.job_id = j.id AND i.state IN ('queued', 'running') AND i.published_at IS NOT NULL) f
WHERE j.tenant = :tenant {where}
ORDER BY j.created_at DESC, j.id
LIMIT :limit
"""

_RECENT = text(_SUMMARIES.format(where=""))
_ONE = text(_SUMMARIES.format(where="AND j.id = :job"))

_DEAD_BY_CODE = text("""
SELECT job_id, code, count(*) FROM dead_letters WHERE job_id = ANY(CAST(:ids AS uuid[]))
GROUP BY job_id, code ORDER BY job_id, count(*) DESC, code
""")

_DEAD_LETTERS = text("""
SELECT d.seq, d.ref, d.code, d.message, d.attempts, d.created_at
FROM dead_letters d JOIN jobs j ON j.id = d.job_id
WHERE d.job_id = :job AND j.tenant = :tenant
ORDER BY d.seq LIMIT :limit
""")


@dataclass
class JobSummary:
    id: uuid.UUID
    kind: str
    source: str
    priority: int
    total: int
    purged: int
    created_at: dt.datetime
    cancelled_at: dt.datetime | None
    queued: int  # waiting in Postgres + published, not yet claimed
    running: int
    dead: int
    cancelled: int
    done: int
    waiting: int = 0  # of queued: still in Postgres, not yet published to the broker
    kinds: list[str] = field(default_factory=list)
    callback_state: str | None = None
    rate: float | None = None  # final items per second over the last minute; None for a finished job
    dead_by_code: dict[str, int] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        return self.queued + self.running

    @property
    def eta_s(self) -> float | None:
        """Seconds until the pending items are final at the current rate; None when unknown."""
        if not self.pending:
            return 0.0
        return self.pending / self.rate if self.rate else None


def _summary(row: Any) -> tuple[JobSummary, dt.datetime]:
    queued = int(row.waiting) + int(row.queued)
    done = int(row.total) - int(row.purged) - queued - int(row.running) - int(row.dead) - int(row.cancelled)
    summary = JobSummary(row.id, row.kind, row.source, int(row.priority), int(row.total), int(row.purged),
                         row.created_at, row.cancelled_at, queued, int(row.running), int(row.dead),
                         int(row.cancelled), max(done, 0), int(row.waiting), [t["kind"] for t in row.tasks],
                         row.callback_state)
    return summary, row.now


def _decorate(conn: Any, summaries: list[tuple[JobSummary, dt.datetime]]) -> list[JobSummary]:
    jobs = {s.id: s for s, _ in summaries}
    if jobs:
        for job_id, code, n in conn.execute(_DEAD_BY_CODE, {"ids": list(jobs)}):
            jobs[job_id].dead_by_code[code] = int(n)
    for s, now in summaries:
        if s.pending:
            s.rate = RATES.observe(s.id, now.timestamp(), s.done + s.dead)
    return [s for s, _ in summaries]


def recent_jobs(engine: Engine, tenant: str, limit: int = 50) -> list[JobSummary]:
    """The tenant's newest jobs, newest first."""
    with engine.connect() as conn:
        rows = conn.execute(_RECENT, {"tenant": tenant, "limit": limit}).all()
        return _decorate(conn, [_summary(r) for r in rows])


def job_summary(engine: Engine, tenant: str, job: uuid.UUID) -> JobSummary | None:
    """One job of the tenant, or None (unknown, or another tenant's)."""
    with engine.connect() as conn:
        row = conn.execute(_ONE, {"tenant": tenant, "job": job, "limit": 1}).first()
        return None if row is None else _decorate(conn, [_summary(row)])[0]


def dead_letters(engine: Engine, tenant: str, job: uuid.UUID, limit: int = 200) -> list[dict[str, Any]]:
    """The job's dead letters in seq order, at most ``limit``."""
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(_DEAD_LETTERS, {"job": job, "tenant": tenant, "limit": limit}
                                              ).mappings()]
