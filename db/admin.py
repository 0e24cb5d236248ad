"""Operator queries: accounting checks, the dead-letter store, the feeder's queries and the reaper."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from imgq.db import locks
from imgq.db.cancelling import cancel_waiting
from imgq.db.store import COUNT_CANCELLED, drop_acceptance
from imgq.feeding import BACKFILL_LANE, TOP_LANE

_JOB_KINDS = text("SELECT tasks FROM jobs WHERE id = :job")


def check_items_sql(kinds: Sequence[str]) -> str:
    """Items whose state disagrees with their records. A done item has one result per kind of
    its job (each kind's writer names its link column) and no dead letter; a dead item has a dead
    letter and no result; a pending item has neither, and so has a cancelled one (final, never run),
    which only a cancelled job has."""
    from imgq.db.results import writer

    # SQL case: "NULL"/"null", " AND "/" and ", " OR "/" or " are the same SQL.
    writers = [w for kind in kinds if (w := writer(kind)).link_column is not None]
    # A done item's links must reach their rows: they have no foreign keys (migration 0010).
    has_all = " AND ".join(  # pragma: no mutate (SQL case)
        f"EXISTS (SELECT 1 FROM {w.table} r WHERE r.id = i.{w.link_column})" for w in writers
    ) or "false"  # pragma: no mutate (SQL case)
    has_any = " OR ".join(  # pragma: no mutate (SQL case)
        f"i.{w.link_column} IS NOT NULL" for w in writers
    ) or "false"  # pragma: no mutate (SQL case)
    return f"""
SELECT i.seq, i.ref, i.state, ({has_all}) AS has_result, ({has_any}) AS has_link,
       (d.job_id IS NOT NULL) AS has_dead_letter, (j.cancelled_at IS NOT NULL) AS job_cancelled
FROM job_items i
JOIN jobs j ON j.id = i.job_id
LEFT JOIN dead_letters d ON d.job_id = i.job_id AND d.seq = i.seq
WHERE i.job_id = :job
  AND ((i.state = 'done' AND (NOT ({has_all}) OR d.job_id IS NOT NULL))
    OR (i.state = 'dead' AND (d.job_id IS NULL OR {has_any}))
    OR (i.state IN ('queued', 'running', 'cancelled') AND ({has_any} OR d.job_id IS NOT NULL))
    OR (i.state = 'cancelled' AND j.cancelled_at IS NULL))
ORDER BY i.seq LIMIT 1000
"""


def check_duplicates_sql(kind: str) -> str:
    """Two result rows for one identity cannot exist while the unique constraint holds; the check
    proves it for the images of this job."""
    from imgq.db.results import identity, writer

    return f"""
SELECT r.image_id, count(*) FROM {writer(kind).table} r
WHERE r.image_id IN (SELECT image_id FROM job_items WHERE job_id = :job AND image_id IS NOT NULL)
GROUP BY {", ".join("r." + c.strip() for c in identity(kind).split(","))} HAVING count(*) > 1
"""


def check_mismatch_sql(kind: str) -> str:
    """Items whose result row was computed with another model or parameters than their job names
    (what a forged message could once cause), or for another image than the item's (a link or an
    image_id changed by hand: the row is well-formed, it is just someone else's)."""
    from imgq.db.results import writer

    w = writer(kind)
    return f"""
SELECT i.seq, i.ref, r.model, r.params_hash, r.image_id AS result_image, i.image_id AS item_image
FROM job_items i JOIN {w.table} r ON r.id = i.{w.link_column}
WHERE i.job_id = :job
  AND (r.model <> :model OR r.params_hash <> :phash OR r.image_id IS DISTINCT FROM i.image_id)
ORDER BY i.seq LIMIT 1000
"""


def _row_count_problem(total: int, purged: int, rows: int) -> str:
    """A job's item rows against what it accepted (less what was purged); called when they differ."""
    unstored = total - purged - rows
    if unstored > 0:
        return f"{unstored} accepted items have no job_items row"
    # More rows than accepted: a total or purged count that is wrong, or rows added by hand.
    return f"{-unstored} items beyond the job's total (total={total} purged={purged}, {rows} job_items rows)"


def _item_problem(row: Mapping[str, Any]) -> str:
    """What is wrong with one row of ``check_items_sql``."""
    if row["has_result"] and row["has_dead_letter"]:
        return "two outcomes (result and dead letter)"
    if row["state"] in ("done", "dead"):
        return f"state {row['state']} without its record"
    if row["state"] == "cancelled":
        return _cancelled_problem(row)
    return "pending item with a final record"


def _cancelled_problem(row: Mapping[str, Any]) -> str:
    # Both can be wrong at once; each is named, so fixing one does not reveal the other later.
    wrongs = []
    if row["has_link"] or row["has_dead_letter"]:
        wrongs.append("with a result or dead letter")
    if not row["job_cancelled"]:
        wrongs.append("in a job that was never cancelled")
    return "cancelled item " + ", ".join(wrongs)


def _mismatch_problem(task: dict[str, Any], row: Mapping[str, Any]) -> str:
    """What is wrong with one row of ``check_mismatch_sql`` for ``task``."""
    wrongs = []
    if row["model"] != task["model"] or row["params_hash"] != task["params_hash"]:
        wrongs.append(f"{task['kind']} result of {row['model']} params {row['params_hash']}, "
                      f"the job names {task['model']} params {task['params_hash']}")
    if row["result_image"] != row["item_image"]:
        wrongs.append(f"{task['kind']} result of image {row['result_image']}, the item's image is "
                      f"{row['item_image']}")
    return "; ".join(wrongs)


# Translations (jobs with --lang): a done item has one linked row per language the job asked for,
# each a translation into that language, by the job's translation model, of the item's own caption;
# an item that is not done has none.
_CHECK_TRANSLATIONS_MISSING = text("""
SELECT i.seq, i.ref, l.lang FROM job_items i
CROSS JOIN unnest(CAST(:langs AS text[])) AS l(lang)
LEFT JOIN item_translations t ON t.job_id = i.job_id AND t.seq = i.seq AND t.lang = l.lang
WHERE i.job_id = :job AND i.state = 'done' AND t.caption_id IS NULL
ORDER BY i.seq, l.lang LIMIT 1000
""")

_CHECK_TRANSLATIONS_WRONG = text("""
SELECT i.seq, i.ref, i.state, t.lang, c.lang AS row_lang, c.method, c.via, (c.source_id = i.caption_id) AS own
FROM item_translations t
JOIN job_items i ON i.job_id = t.job_id AND i.seq = t.seq
JOIN captions c ON c.id = t.caption_id
WHERE t.job_id = :job
  AND (i.state <> 'done' OR c.lang <> t.lang OR c.method <> 'translated' OR c.via <> :model
       OR c.source_id IS DISTINCT FROM i.caption_id OR NOT (t.lang = ANY(CAST(:langs AS text[]))))
ORDER BY i.seq, t.lang LIMIT 1000
""")

_COUNT_TRANSLATIONS = text("SELECT count(*) FROM item_translations WHERE job_id = :job")

_CHECK_TOTALS = text("""
SELECT j.total, j.purged, j.cancelled_items, count(i.seq) AS items,
       count(*) FILTER (WHERE i.state = 'done') AS done,
       count(*) FILTER (WHERE i.state = 'dead') AS dead,
       count(*) FILTER (WHERE i.state IN ('queued', 'running')) AS pending,
       count(*) FILTER (WHERE i.state = 'cancelled') AS cancelled
FROM jobs j LEFT JOIN job_items i ON i.job_id = j.id
WHERE j.id = :job GROUP BY j.id
""")

_DLQ_LIST = text("""
SELECT d.job_id, d.seq, d.ref, d.code, d.message, d.attempts, d.worker, d.created_at
FROM dead_letters d
WHERE (CAST(:code AS text) IS NULL OR d.code = :code)
  AND (CAST(:job AS uuid) IS NULL OR d.job_id = :job)
ORDER BY d.created_at DESC, d.job_id, d.seq LIMIT :limit
""")

_DLQ_TAKE = text("""
WITH taken AS (
  DELETE FROM dead_letters d
  WHERE (CAST(:code AS text) IS NULL OR d.code = :code)
    AND (CAST(:job AS uuid) IS NULL OR d.job_id = :job)
    AND (CAST(:seq AS int) IS NULL OR d.seq = :seq)
    AND (CAST(:seqs AS int[]) IS NULL OR d.seq = ANY(CAST(:seqs AS int[])))
    -- A cancelled job's dead letters stay: requeued, its items would run after all.
    AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = d.job_id AND j.cancelled_at IS NOT NULL)
  RETURNING d.job_id, d.seq
)
UPDATE job_items i SET state = 'queued', attempts = 0, published_at = NULL, updated_at = now()
FROM taken WHERE i.job_id = taken.job_id AND i.seq = taken.seq AND i.state = 'dead'
RETURNING i.job_id, i.seq, i.ref, i.text
""")

# One item of a job, for `imgq dlq retry --id` to say why it retried nothing: no row when the job
# does not exist; state NULL when the job has no such item (any more: purged dead letters are deleted).
_ITEM_STATE = text("""
SELECT j.total, i.state, d.code, j.cancelled_at IS NOT NULL AS cancelled
FROM jobs j
LEFT JOIN job_items i ON i.job_id = j.id AND i.seq = :seq
LEFT JOIN dead_letters d ON d.job_id = j.id AND d.seq = :seq
WHERE j.id = :job
""")

# A job's dead letters (of one code, or all) and whether it was cancelled: why `imgq dlq retry
# --job` retried nothing. No row when the job does not exist.
_JOB_DEAD = text("""
SELECT j.cancelled_at IS NOT NULL AS cancelled,
       (SELECT count(*) FROM dead_letters d WHERE d.job_id = j.id
        AND (CAST(:code AS text) IS NULL OR d.code = :code)) AS dead
FROM jobs j WHERE j.id = :job
""")

_JOB_SHARE = text("SELECT 1 FROM jobs WHERE id = :job FOR SHARE")
# A retry of every job's dead letters (of a code, ...): their jobs, held as _JOB_SHARE holds one.
_JOBS_SHARE = text("""
SELECT j.id FROM jobs j
WHERE j.id IN (SELECT DISTINCT d.job_id FROM dead_letters d
               WHERE (CAST(:code AS text) IS NULL OR d.code = :code)
                 AND (CAST(:seq AS int) IS NULL OR d.seq = :seq))
ORDER BY j.id FOR SHARE
""")

_DLQ_REFS = text("""
SELECT seq, ref FROM dead_letters WHERE job_id = :job AND (CAST(:code AS text) IS NULL OR code = :code) ORDER BY seq
""")

_DLQ_PURGE = text("""
WITH gone AS (
  DELETE FROM dead_letters WHERE created_at < now() - make_interval(secs => :age) RETURNING job_id, seq
), items AS (
  DELETE FROM job_items i USING gone WHERE i.job_id = gone.job_id AND i.seq = gone.seq RETURNING i.job_id
), counted AS (
  SELECT job_id, count(*) AS n FROM items GROUP BY job_id
)
UPDATE jobs j SET purged = purged + counted.n FROM counted WHERE j.id = counted.job_id
RETURNING counted.n
""")

# Items whose message was lost: published and still queued for longer than :queued_age (the
# caller passes it only once the queue is empty), or running for longer than :running_age. They
# go back to the backlog (published_at NULL) and the feeder publishes them again in its order;
# those of a job cancelled meanwhile end cancelled. A NULL age leaves that state alone. (A running
# item is always published: its claim marks it.)
_LOST = text(f"""
WITH lost AS (
  SELECT i.job_id, i.seq FROM job_items i JOIN jobs j ON j.id = i.job_id
  WHERE i.state IN ('queued', 'running') AND i.published_at IS NOT NULL  -- job_items_in_flight
    AND ((i.state = 'queued' AND i.updated_at < now() - make_interval(secs => CAST(:queued_age AS float8))
          -- Its lane's messages pushed before this time have all left it (imgq.feeding.PushLog;
          -- lane: imgq.feeding.lane). NULL: no bound.
          AND i.published_at < COALESCE(CASE WHEN j.priority >= 0 THEN CAST(:top_before AS timestamptz)
                                             ELSE CAST(:backfill_before AS timestamptz) END, 'infinity'))
      OR (i.state = 'running' AND i.updated_at < now() - make_interval(secs => CAST(:running_age AS float8))
          -- A worker that beats is still running it, until its own bound (LiveHolders).
          -- statement_timestamp(): now() is the transaction's start, before up to 10 s of waiting
          -- for the feed lock, which would count a worker silent that much longer as beating.
          AND (CAST(:live_after AS float8) IS NULL
               OR i.updated_at < statement_timestamp() - make_interval(secs => CAST(:live_after AS float8))
               OR NOT EXISTS (SELECT 1 FROM workers w WHERE w.name = i.worker
                              AND w.heartbeat_at >= statement_timestamp()
                                                    - make_interval(secs => CAST(:beat_within AS float8))))))
    AND (CAST(:job AS uuid) IS NULL OR i.job_id = :job)
    AND (CAST(:queue AS text) IS NULL OR j.queue = :queue)
  ORDER BY i.updated_at LIMIT :limit FOR UPDATE OF i SKIP LOCKED
), moved AS (
  UPDATE job_items i SET state = CASE WHEN j.cancelled_at IS NULL THEN 'queued' ELSE 'cancelled' END,
         published_at = NULL, updated_at = now()
  FROM lost JOIN jobs j ON j.id = lost.job_id
  WHERE i.job_id = lost.job_id AND i.seq = lost.seq
  RETURNING i.job_id, i.state
), counted AS ({COUNT_CANCELLED.format(items="moved")}
)
SELECT job_id FROM moved
""")

# The jobs of a queue with items waiting in Postgres. A loose index scan (one probe of
# job_items_unpublished per such job) rather than a DISTINCT over the whole backlog.
_BACKLOG = text("""
WITH RECURSIVE waiting(job_id) AS (
  (SELECT job_id FROM job_items WHERE state = 'queued' AND published_at IS NULL ORDER BY job_id LIMIT 1)
  UNION ALL
  SELECT (SELECT i.job_id FROM job_items i
          WHERE i.state = 'queued' AND i.published_at IS NULL AND i.job_id > w.job_id
          ORDER BY i.job_id LIMIT 1)
  FROM waiting w WHERE w.job_id IS NOT NULL
)
SELECT j.id, j.tenant, j.priority, j.refs_per_message, j.tasks, j.cancelled_at IS NOT NULL
FROM waiting w JOIN jobs j ON j.id = w.job_id
WHERE j.queue = :queue
ORDER BY j.created_at, j.id
""")

_JOB_BACKLOG = text("""
SELECT j.id, j.tenant, j.priority, j.refs_per_message, j.tasks, j.cancelled_at IS NOT NULL FROM jobs j
WHERE j.id = :job AND j.queue = :queue AND EXISTS (
  SELECT 1 FROM job_items i WHERE i.job_id = j.id AND i.state = 'queued' AND i.published_at IS NULL)
""")

# Published and not final, per job (job_items_in_flight: bounded by the window plus what workers hold).
_IN_FLIGHT = text("""
SELECT f.job_id, j.tenant, f.n FROM (
  SELECT job_id, count(*) AS n FROM job_items
  WHERE state IN ('queued', 'running') AND published_at IS NOT NULL GROUP BY job_id
) f JOIN jobs j ON j.id = f.job_id WHERE j.queue = :queue
""")

# seq = ANY(ARRAY(...)) keeps both key columns in the UPDATE's index condition; joined on seq, the
# planner hashes the whole job (a sequential scan of 200k rows for a take of 32k: 2.6 s).
# :from_seq starts the scan past the job's published prefix, whose index entries stay until vacuum
# (a million of them cost 50 ms a take at 10M rows).
_TAKE = text("""
UPDATE job_items SET published_at = now(), updated_at = now()
WHERE job_id = :job AND seq = ANY(ARRAY(
  SELECT seq FROM job_items
  WHERE job_id = :job AND seq >= :from_seq AND state = 'queued' AND published_at IS NULL
  ORDER BY seq LIMIT :n FOR UPDATE SKIP LOCKED
))
RETURNING seq, ref, text
""")

# Small takes of many jobs in one statement (many single-image jobs: a _TAKE each cost as much as
# publishing their messages). The rows are found per job through job_items_unpublished and then
# updated by ctid (a TID scan): joined back on (job_id, seq), the planner hashed the whole table
# (a sequential scan of 1M rows for 2,000 one-item takes: 473 ms). A row updated by another
# transaction after this statement's snapshot (none of imgq's writers leaves such a row waiting) is
# locked in its new version, which the UPDATE cannot see: it stays waiting for the next take.
_TAKE_MANY = text("""
UPDATE job_items SET published_at = now(), updated_at = now()
WHERE ctid = ANY(ARRAY(
  SELECT p.ctid
  FROM unnest(CAST(:jobs AS uuid[]), CAST(:ns AS int[]), CAST(:froms AS int[])) AS w(job_id, n, from_seq)
  CROSS JOIN LATERAL (
    SELECT i.ctid FROM job_items i
    WHERE i.job_id = w.job_id AND i.seq >= w.from_seq AND i.state = 'queued' AND i.published_at IS NULL
    ORDER BY i.seq LIMIT w.n FOR UPDATE OF i SKIP LOCKED
  ) p
))
RETURNING job_id, seq, ref, text
""")

_JOBS = text("SELECT id, tasks, priority, queue FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))")

# One feed cycle at a time per queue, across workers and producers: a transaction lock, so a
# killed feeder's lock goes with its connection. The leader lock (session-level) only picks which
# worker runs the feed loop, so the others do not contend every cycle.
_FEED_LOCK = text(f"SELECT pg_try_advisory_xact_lock({locks.FEED}, hashtext(:queue))")
_FEED_LOCK_WAIT = text(f"SELECT pg_advisory_xact_lock({locks.FEED}, hashtext(:queue))")
LEADER_LOCK = text(f"SELECT pg_try_advisory_lock({locks.LEADER}, hashtext(:queue))")
LEADER_UNLOCK = text(f"SELECT pg_advisory_unlock({locks.LEADER}, hashtext(:queue))")
_REAPER_LOCK = text(f"SELECT pg_try_advisory_xact_lock({locks.REAPER})")
_REAPER_LOCK_WAIT = text(f"SELECT pg_advisory_xact_lock({locks.REAPER})")
_LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout
# Recorded acceptances whose job is missing: going on now, or abandoned (Store.create_job).
_ABANDONED = text("SELECT a.job_id FROM acceptances a "
                  "WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = a.job_id) ORDER BY a.started_at LIMIT 100")

_HEARTBEAT = text("""
INSERT INTO workers (name, host, pid) VALUES (:name, :host, :pid)
ON CONFLICT (name) DO UPDATE SET heartbeat_at = now()
""")

_RETIRE = text("DELETE FROM workers WHERE name = :name")

# Workers whose heartbeat stopped, plus those named as dead (same host, process gone). Their
# running items stay 'running' (so the next claim sees them as unsettled crash suspects and
# isolates them) but lose their worker, so they are re-published once.
# A cancelled job's orphans end cancelled instead: nothing of it starts again (imgq.db.cancelling).
_ORPHANS = text(f"""
WITH dead AS (
  SELECT name FROM workers
  WHERE heartbeat_at < now() - make_interval(secs => :age) OR name = ANY(CAST(:gone AS text[]))
), orphans AS (
  SELECT job_id, seq FROM job_items
  WHERE state = 'running' AND worker IN (SELECT name FROM dead)
  ORDER BY job_id, seq LIMIT :limit FOR UPDATE SKIP LOCKED
), taken AS (
  UPDATE job_items j SET worker = NULL, updated_at = now(),
         state = CASE WHEN c.cancelled_at IS NULL THEN j.state ELSE 'cancelled' END
  FROM orphans JOIN jobs c ON c.id = orphans.job_id
  WHERE j.job_id = orphans.job_id AND j.seq = orphans.seq
  RETURNING j.job_id, j.seq, j.ref, j.text, j.state
), counted AS ({COUNT_CANCELLED.format(items="taken")}
)
SELECT job_id, seq, ref, text FROM taken WHERE state = 'running'
""")

_FORGET_DEAD = text("""
DELETE FROM workers w
WHERE (w.heartbeat_at < now() - make_interval(secs => :age) OR w.name = ANY(CAST(:gone AS text[])))
  AND NOT EXISTS (SELECT 1 FROM job_items i WHERE i.state = 'running' AND i.worker = w.name)
""")

_HOST_WORKERS = text("SELECT name, pid FROM workers WHERE host = :host AND name <> :name")


@dataclass
class CheckReport:
    job: uuid.UUID
    total: int = 0
    done: int = 0
    dead: int = 0
    pending: int = 0
    purged: int = 0
    cancelled: int = 0  # final without a record: queued items of a cancelled job
    missing: int = 0
    duplicates: int = 0
    mismatched: int = 0  # results of another model or params than the job's
    translations: int | None = None  # linked translated captions, for a job with --lang
    offenders: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicates == 0 and self.mismatched == 0


@dataclass(frozen=True, slots=True)
class Republish:
    """Items to publish again, with their job's tasks (``{kind, model, params, params_hash}``)."""

    job: uuid.UUID
    tasks: list[dict[str, Any]]
    items: list[tuple[int, str] | tuple[int, str, str]]  # [seq, ref] or [seq, ref, text]
    priority: int = 0  # the job's: its items go back to its broker lane (imgq.feeding.lane)
    queue: str | None = None  # the job's broker queue (None: the publisher's own)


@dataclass(frozen=True, slots=True)
class ItemState:
    """One item of a job: ``state`` None if the job has no item ``seq`` (``seq < total``: it was a
    purged dead letter); ``code`` its dead letter's; whether its job is cancelled."""

    total: int
    state: str | None
    code: str | None
    cancelled: bool


@dataclass(frozen=True, slots=True)
class Waiting:
    """A job with items waiting in Postgres, as the feeder plans with it."""

    job: uuid.UUID
    tenant: str
    priority: int
    refs_per_message: int | None
    tasks: list[dict[str, Any]]
    # Cancelled while items waited: the feeder cancels them instead (imgq.db.cancelling).
    cancelled: bool = False


@dataclass(frozen=True)
class LiveHolders:
    """For a lost sweep with a short age (`imgq reconcile --older-than 0`): the running items of a
    worker that beat within ``beat_within_s`` are still its own until ``after_s`` (its visibility
    timeout plus time limit). Sent again sooner, each would be charged an attempt and, claimed while
    running, be taken for a crash suspect and run alone."""

    beat_within_s: float
    after_s: float


class Feeding:
    """The queries of one feed cycle, inside its locked transaction (see :meth:`Admin.feeding`)."""

    def __init__(self, conn: Any, queue: str) -> None:
        self.conn = conn
        self.queue = queue

    def lost(self, *, queued_older_than_s: float | None, running_older_than_s: float | None,
             job: uuid.UUID | None = None, limit: int = 100_000, left_before: dict[int, Any] | None = None,
             live: LiveHolders | None = None) -> int:
        """Put items whose message was probably lost back in the backlog; returns how many.
        ``left_before``: per lane, a time before which every message pushed into it has left it
        (None: no bound); queued items published later are not taken. ``live``: how long a live
        worker's running items stay its own."""
        if queued_older_than_s is None and running_older_than_s is None:
            return 0
        bounds = left_before or {}
        params = {"queued_age": queued_older_than_s, "running_age": running_older_than_s, "job": job,
                  "queue": self.queue, "limit": limit, "top_before": bounds.get(TOP_LANE),
                  "backfill_before": bounds.get(BACKFILL_LANE),
                  "live_after": live.after_s if live else None, "beat_within": live.beat_within_s if live else None}
        return len(self.conn.execute(_LOST, params).all())

    def now(self) -> Any:
        """The transaction's time: what ``take`` writes as ``published_at``."""
        return self.conn.execute(text("SELECT now()")).scalar_one()

    def waiting(self, job: uuid.UUID | None = None) -> list[Waiting]:
        """Jobs of this queue with items waiting, oldest first."""
        if job is None:
            rows = self.conn.execute(_BACKLOG, {"queue": self.queue}).all()
        else:
            rows = self.conn.execute(_JOB_BACKLOG, {"queue": self.queue, "job": job}).all()
        return [Waiting(*row) for row in rows]

    def cancel_waiting(self, job: uuid.UUID) -> int:
        """Cancel a chunk of a cancelled job's waiting items, unless its cancel is still sweeping."""
        return cancel_waiting(self.conn, job)

    def in_flight(self) -> dict[uuid.UUID, tuple[str, int]]:
        """Items published and not final, per job of this queue: ``{job: (tenant, items)}``."""
        return {job: (tenant, int(n)) for job, tenant, n in self.conn.execute(_IN_FLIGHT, {"queue": self.queue})}

    def take(self, job: uuid.UUID, n: int, from_seq: int = 0) -> list[tuple[int, str] | tuple[int, str, str]]:
        """Mark the next ``n`` waiting items of a job (in seq order) published; returns them.
        ``from_seq`` is a hint (every item below it was published); when it leaves the take short,
        the items below it (retried dead letters, lost ones) are looked for too."""
        rows = self.conn.execute(_TAKE, {"job": job, "n": n, "from_seq": from_seq}).all()
        if len(rows) < n and from_seq > 0:
            rows += self.conn.execute(_TAKE, {"job": job, "n": n - len(rows), "from_seq": 0}).all()
        return sorted((seq, ref) if pair_text is None else (seq, ref, pair_text) for seq, ref, pair_text in rows)

    def take_many(self, wants: Sequence[tuple[uuid.UUID, int, int]]) -> dict[uuid.UUID, list[Any]]:
        """:meth:`take` of several jobs at once, ``(job, n, from_seq)`` each (one job once): one
        statement, for small takes. A take left short by its hint is completed as ``take`` does."""
        if not wants:
            return {}
        if len({job for job, _, _ in wants}) != len(wants):
            raise ValueError("take_many: a job named twice would have its items handed out twice")
        params = {"jobs": [j for j, _, _ in wants], "ns": [n for _, n, _ in wants], "froms": [f for _, _, f in wants]}
        found: dict[uuid.UUID, list[Any]] = {job: [] for job, _, _ in wants}
        for job, seq, ref, pair_text in self.conn.execute(_TAKE_MANY, params):
            found[job].append((seq, ref) if pair_text is None else (seq, ref, pair_text))
        for job, n, from_seq in wants:
            if len(found[job]) < n and from_seq > 0:
                found[job] += self.take(job, n - len(found[job]), 0)
            found[job].sort()
        return found


class Admin:
    """Operator queries over the whole store: accounting, dead letters, feeding, heartbeats."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def check(self, job: uuid.UUID) -> CheckReport | None:
        from imgq.db.results import writer

        report = CheckReport(job)
        with self.engine.connect() as conn:
            totals = conn.execute(_CHECK_TOTALS, {"job": job}).mappings().first()
            if totals is None:
                return None
            report.total, report.purged = totals["total"], totals["purged"]
            report.done, report.dead, report.pending = totals["done"], totals["dead"], totals["pending"]
            report.cancelled = totals["cancelled"]
            never_stored = report.total - report.purged - totals["items"]
            if never_stored:
                report.missing += abs(never_stored)  # pragma: no mutate (the first count: = and += agree)
                report.offenders.append(_row_count_problem(report.total, report.purged, totals["items"]))
            if totals["cancelled_items"] != report.cancelled:  # what the pages show (migration 0015)
                report.missing += abs(totals["cancelled_items"] - report.cancelled)
                report.offenders.append(f"the job counts {totals['cancelled_items']} cancelled items; "
                                        f"{report.cancelled} are")
            tasks = conn.execute(_JOB_KINDS, {"job": job}).scalar_one()
            kinds = [t["kind"] for t in tasks]
            for row in conn.execute(text(check_items_sql(kinds)), {"job": job}).mappings():
                report.missing += 1
                report.offenders.append(f"seq {row['seq']} {row['ref']}: {_item_problem(row)}")
            for task in tasks:
                if writer(task["kind"]).link_column is None:
                    self._check_translations(conn, report, job, task)
                    continue
                params = {"job": job, "model": task["model"], "phash": task["params_hash"]}
                for row in conn.execute(text(check_mismatch_sql(task["kind"])), params).mappings():
                    report.mismatched += 1
                    report.offenders.append(f"seq {row['seq']} {row['ref']}: {_mismatch_problem(task, row)}")
            for kind in kinds:
                if writer(kind).link_column is None:  # rows of another kind's table, checked with it
                    continue
                for image_id, n in conn.execute(text(check_duplicates_sql(kind)), {"job": job}):
                    report.duplicates += n - 1
                    report.offenders.append(f"image {image_id}: {n} {kind} rows for one identity")
        return report

    @staticmethod
    def _check_translations(conn: Any, report: CheckReport, job: uuid.UUID, task: dict[str, Any]) -> None:
        params = {"job": job, "langs": list(task["params"]["langs"]), "model": task["model"]}
        report.translations = conn.execute(_COUNT_TRANSLATIONS, params).scalar_one()
        for seq, ref, lang in conn.execute(_CHECK_TRANSLATIONS_MISSING, params):
            report.missing += 1
            report.offenders.append(f"seq {seq} {ref}: done without its {lang} translation")
        for row in conn.execute(_CHECK_TRANSLATIONS_WRONG, params).mappings():
            report.mismatched += 1
            problem = (f"state {row['state']} with a {row['lang']} translation" if row["state"] != "done"
                       else f"{row['lang']} link to a {row['row_lang']} {row['method']} caption by {row['via']!r}"
                       + ("" if row["own"] else ", not a translation of its own caption"))
            report.offenders.append(f"seq {row['seq']} {row['ref']}: {problem}")

    def dead_letters(self, *, code: str | None, job: uuid.UUID | None, limit: int = 100) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(_DLQ_LIST, {"code": code, "job": job, "limit": limit}).mappings()
            return [dict(r) for r in rows]

    def dead_letter_refs(self, job: uuid.UUID, code: str | None) -> list[tuple[int, str]]:
        """(seq, ref) of one job's dead letters (of one code, or all)."""
        with self.engine.connect() as conn:
            return [(int(seq), str(ref)) for seq, ref in conn.execute(_DLQ_REFS, {"job": job, "code": code})]

    def take_dead_letters(
        self, *, code: str | None, job: uuid.UUID | None, seq: int | None, seqs: Sequence[int] | None = None,
    ) -> list[Republish]:
        """Remove matching dead letters (of one ``code``, ``job``, ``seq``, among ``seqs``; None
        matches all) and put their items back in the backlog (queued, attempts 0, unpublished):
        the feeder publishes them in its order, within the window."""
        with self.engine.begin() as conn:
            # Held until the commit: a cancel of these jobs waits, then cancels what this requeued
            # (or, committed first, is seen by the take's cancelled check: its statement starts later).
            if job is not None:
                conn.execute(_JOB_SHARE, {"job": job})
            else:
                conn.execute(_JOBS_SHARE, {"code": code, "seq": seq})
            rows = conn.execute(_DLQ_TAKE, {"code": code, "job": job, "seq": seq,
                                            "seqs": None if seqs is None else list(seqs)}).all()
            return self._with_jobs(conn, rows)

    def item_state(self, job: uuid.UUID, seq: int) -> ItemState | None:
        """Item ``seq`` of ``job`` (None: no such job)."""
        with self.engine.connect() as conn:
            row = conn.execute(_ITEM_STATE, {"job": job, "seq": seq}).first()
        return None if row is None else ItemState(row.total, row.state, row.code, row.cancelled)

    def job_dead(self, job: uuid.UUID, code: str | None = None) -> tuple[bool, int] | None:
        """``(cancelled, dead letters)`` of ``job``, of ``code`` only if given; None: no such job."""
        with self.engine.connect() as conn:
            row = conn.execute(_JOB_DEAD, {"job": job, "code": code}).first()
        return None if row is None else (bool(row.cancelled), int(row.dead))

    def purge(self, older_than: dt.timedelta) -> int:
        with self.engine.begin() as conn:
            return sum(n for (n,) in conn.execute(_DLQ_PURGE, {"age": older_than.total_seconds()}))

    @contextmanager
    def feeding(self, queue: str, *, wait_s: float = 0.0) -> Iterator[Feeding | None]:
        """One feed cycle's transaction under the queue's feed lock; None if another feeder holds it
        (for ``wait_s`` seconds). Whatever the cycle publishes is marked in this transaction, so a
        publish that fails rolls the marks back and the items stay in the backlog."""
        with self.engine.begin() as conn:
            if wait_s > 0:
                conn.execute(text(f"SET LOCAL lock_timeout = '{int(wait_s * 1000)}ms'"))
                try:
                    with conn.begin_nested():
                        conn.execute(_FEED_LOCK_WAIT, {"queue": queue})
                except OperationalError:  # lock_timeout: a feeder is at work and will do it
                    yield None
                    return
                conn.execute(text("SET LOCAL lock_timeout = 0"))
            elif not conn.execute(_FEED_LOCK, {"queue": queue}).scalar_one():
                yield None
                return
            yield Feeding(conn, queue)

    def drop_abandoned(self) -> tuple[int, int]:
        """Delete what acceptances whose producer died left: the items of a job that never
        committed (migration 0011). An acceptance still going holds its lock and is left alone.
        Returns (acceptances, items) dropped."""
        with self.engine.connect() as conn:
            jobs = conn.execute(_ABANDONED).scalars().all()
        dropped = [0, 0]
        for job in jobs:
            with self.engine.begin() as conn:
                # The advisory lock says the acceptance is over, so no row here is still locked
                # by it; a wait would mean that rule broke, and must not stall the feeder.
                conn.execute(text("SET LOCAL lock_timeout = '2s'"))  # pragma: no mutate
                items = drop_acceptance(conn, job, wait=False)
            if items is not None:
                dropped[0] += 1
                dropped[1] += items
        return dropped[0], dropped[1]

    # -- worker heartbeats ----------------------------------------------------------------------
    def heartbeat(self, name: str, host: str, pid: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(_HEARTBEAT, {"name": name, "host": host, "pid": pid})

    def retire(self, name: str) -> None:
        """A clean shutdown: nothing of this worker is running any more."""
        with self.engine.begin() as conn:
            conn.execute(_RETIRE, {"name": name})

    def host_workers(self, host: str, name: str) -> list[tuple[str, int]]:
        """Other workers registered on this host, as (name, pid)."""
        with self.engine.connect() as conn:
            return [(n, p) for n, p in conn.execute(_HOST_WORKERS, {"host": host, "name": name})]

    def take_orphans(
        # limit: a batch bound; 10,000 and 10,001 differ only past 10,000 orphans.
        self, *, dead_after_s: float | None, gone: list[str] | None = None, limit: int = 10_000,  # pragma: no mutate
        publish: Callable[[list[Republish]], object] | None = None, wait_s: float = 0.0,
    ) -> list[Republish] | None:
        """Running items of workers whose heartbeat is older than ``dead_after_s`` (None: judge
        none by age), or that are known to be ``gone``, to publish again. None if another reaper holds the lock (for
        ``wait_s`` seconds).

        ``publish`` runs before the commit, as a feed cycle's does: the take leaves the items
        without a worker, so once committed no later reap could find them, and a publish that
        fails must roll it back for the next beat to try again."""
        with self.engine.begin() as conn:
            if not self._reaper_lock(conn, wait_s):
                return None
            params = {"age": dead_after_s, "gone": list(gone or []), "limit": limit}
            rows = conn.execute(_ORPHANS, params).all()
            conn.execute(_FORGET_DEAD, params)
            batches = self._with_jobs(conn, rows)
            if batches and publish is not None:
                publish(batches)
            return batches

    @staticmethod
    def _reaper_lock(conn: Any, wait_s: float) -> bool:
        if wait_s <= 0:
            return bool(conn.execute(_REAPER_LOCK).scalar_one())
        conn.execute(text(f"SET LOCAL lock_timeout = '{max(1, int(wait_s * 1000))}ms'"))  # 0 would wait forever
        try:
            with conn.begin_nested():
                conn.execute(_REAPER_LOCK_WAIT)
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            return False
        conn.execute(text("SET LOCAL lock_timeout = 0"))
        return True

    @staticmethod
    def _with_jobs(conn: Any, rows: Sequence[Any]) -> list[Republish]:
        by_job: dict[uuid.UUID, list[Any]] = {}
        for job_id, seq, ref, pair_text in rows:
            by_job.setdefault(job_id, []).append((seq, ref) if pair_text is None else (seq, ref, pair_text))
        if not by_job:
            return []
        jobs = {job_id: (tasks, priority, queue)
                for job_id, tasks, priority, queue in conn.execute(_JOBS, {"ids": list(by_job)})}
        return [Republish(job_id, jobs[job_id][0], sorted(items), jobs[job_id][1], jobs[job_id][2])
                for job_id, items in by_job.items()]


def vector_index_name(dim: int) -> str:
    return f"embeddings_hnsw_{int(dim)}"


def drop_vector_index(engine: Engine, dim: int = 256) -> bool:
    """Drop the HNSW index of one dimension before a large backfill: inserts then run ~14,000
    rows/s instead of 400-1,150 (docs/performance.md). Searches of that dimension scan exactly
    until :func:`build_vector_index` runs. Returns whether an index was dropped."""
    name = vector_index_name(dim)
    # SQLAlchemy upper-cases an isolation level's name; SQL case.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:  # pragma: no mutate
        existed = conn.execute(
            text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}  # pragma: no mutate (SQL case)
        ).scalar_one()
        conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
    return bool(existed)


def build_vector_index(engine: Engine, dim: int = 256, maintenance_work_mem: str = "1GB") -> None:
    """(Re)build the HNSW cosine index of one dimension without blocking writes (CONCURRENTLY).

    A valid index is left as it is. A build that was interrupted (Ctrl-C, a lost connection, a
    statement timeout) leaves the index behind INVALID: never used by a query, yet still updated
    by every insert, and IF NOT EXISTS would keep it. Such an index is dropped (CONCURRENTLY) and
    built again. A build still running in another session is waited for by nobody: that is an
    error, as is an index that is not valid once the build returns."""
    import contextlib

    from imgq import errors

    name = vector_index_name(dim)
    if not str(maintenance_work_mem).replace("MB", "").replace("GB", "").isdigit():
        raise ValueError(f"maintenance_work_mem must look like 512MB or 1GB, not {maintenance_work_mem!r}")
    state = text(  # pragma: no mutate (SQL case)
        "SELECT x.indisvalid, (SELECT min(p.pid) FROM pg_stat_progress_create_index p "
        "WHERE p.index_relid = x.indexrelid AND p.pid <> pg_backend_pid()) "
        "FROM pg_index x WHERE x.indexrelid = to_regclass(:n)")
    # SQLAlchemy upper-cases an isolation level's name.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:  # pragma: no mutate
        found = conn.execute(state, {"n": name}).first()
        if found is not None and not found[0]:
            if found[1] is not None:
                raise errors.VectorIndexError(f"{name} is being built by another session (pid {found[1]}); "
                                       "wait for it to finish, then build again if it is still invalid")
            conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
        conn.execute(text(f"SET maintenance_work_mem = '{maintenance_work_mem}'"))
        try:
            conn.execute(text(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON embeddings "
                              f"USING hnsw ((embedding::vector({int(dim)})) vector_cosine_ops) WHERE dim = {int(dim)}"))
        finally:
            # The connection goes back to the pool; after a failure, only if it still works.
            with contextlib.suppress(Exception):
                conn.execute(text("RESET maintenance_work_mem"))
        found = conn.execute(state, {"n": name}).first()
    if found is None or not found[0]:
        raise errors.VectorIndexError(
            f"{name} is not valid after the build ({'missing' if found is None else 'INVALID'}); searches of "
            f"{int(dim)}-d embeddings scan exactly until `imgq db vector-index build --dim {int(dim)}` succeeds")
