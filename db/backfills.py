"""The SQL of ``imgq backfill``: its lock, its row in ``backfills``, the skip rule, and one page's commit.

Invariants:

- One run per backfill name at a time: a session advisory lock keyed on the name, held on a
  connection of its own for the whole run (a killed run's lock ends with its connection).
- A page is one transaction: its items are appended to the run's job (``jobs.total`` grows with
  them), its objects are recorded in ``backfill_objects``, and the cursor and counters advance.
  A run that stops between pages resumes after the last committed page and never enqueues an
  object twice.
- Skip rule, per object version (S3 VersionId, else ETag; the worker stores the same in
  ``images.version``): skipped if ``backfill_objects`` holds that version for the same tasks, or
  if every task already has a result for that version (same model, params hash and, when pinned,
  model revision).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, text

from imgq.db.results import writer
from imgq.errors import BackfillRunning

# Advisory lock class of backfills (the feeder and reaper use 74657302..74657304).
LOCK_CLASS = 74657305
_LOCK = text(f"SELECT pg_try_advisory_lock({LOCK_CLASS}, hashtext(:name))")
_UNLOCK = text(f"SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext(:name))")

_ROW = text("""
SELECT b.source, b.state, b.cursor, b.job_id, b.listed, b.skipped, b.enqueued, j.tasks AS job_tasks
FROM backfills b LEFT JOIN jobs j ON j.id = b.job_id WHERE b.name = :name FOR UPDATE OF b
""")

_START = text("""
INSERT INTO backfills (name, source, kinds, params, tenant, priority, since, state, run_started_at, updated_at)
VALUES (:name, :source, :kinds, CAST(:params AS jsonb), :tenant, :priority, :since, 'running', now(), now())
ON CONFLICT (name) DO UPDATE SET
  source = EXCLUDED.source, kinds = EXCLUDED.kinds, params = EXCLUDED.params, tenant = EXCLUDED.tenant,
  priority = EXCLUDED.priority, since = EXCLUDED.since, state = 'running', updated_at = now(),
  cursor = CASE WHEN :resume THEN backfills.cursor END,
  job_id = CASE WHEN :resume THEN backfills.job_id END,
  listed = CASE WHEN :resume THEN backfills.listed ELSE 0 END,
  skipped = CASE WHEN :resume THEN backfills.skipped ELSE 0 END,
  enqueued = CASE WHEN :resume THEN backfills.enqueued ELSE 0 END,
  run_started_at = CASE WHEN :resume THEN backfills.run_started_at ELSE now() END,
  run_finished_at = CASE WHEN :resume THEN backfills.run_finished_at END
""")

_RECORDED = text("""
SELECT key, version FROM backfill_objects
WHERE bucket = :bucket AND tasks_sha256 = :tasks AND key = ANY(CAST(:keys AS text[]))
""")


def _has_result_sql(table: str) -> Any:
    """Keys (of those given) whose object version already has this task's result."""
    return text(f"""
SELECT v.key FROM unnest(CAST(:keys AS text[]), CAST(:versions AS text[]), CAST(:etags AS text[]))
     AS v(key, version, etag)
WHERE EXISTS (
  SELECT 1 FROM images im JOIN {table} r ON r.image_id = im.id
  WHERE im.source = 's3' AND im.bucket = :bucket AND im.key = v.key AND im.version IN (v.version, v.etag)
    AND r.model = :model AND r.params_hash = :phash
    AND (CAST(:revision AS text) IS NULL OR r.model_revision = :revision))
""")


_NEW_JOB = text("""
INSERT INTO jobs (id, kind, model, params, params_hash, tasks, total, priority, tenant, queue, source)
VALUES (:id, :kind, :model, CAST(:params AS jsonb), :phash, CAST(:tasks AS jsonb), 0, :priority, :tenant, :queue,
        'backfill')
""")
_JOB_TOTAL = text("SELECT total FROM jobs WHERE id = :job FOR UPDATE")
_APPEND_ITEMS = text("""
INSERT INTO job_items (job_id, seq, ref)
SELECT :job, :base + n - 1, ref FROM unnest(CAST(:refs AS text[])) WITH ORDINALITY AS v(ref, n)
""")
_GROW_JOB = text("UPDATE jobs SET total = total + :n WHERE id = :job")
_RECORD = text("""
INSERT INTO backfill_objects (bucket, key, tasks_sha256, version, job_id, seen_at)
SELECT :bucket, key, :tasks, version, job_id, now()
FROM unnest(CAST(:keys AS text[]), CAST(:versions AS text[]), CAST(:jobs AS uuid[])) AS v(key, version, job_id)
ON CONFLICT (bucket, key, tasks_sha256) DO UPDATE
SET version = EXCLUDED.version, job_id = EXCLUDED.job_id, seen_at = EXCLUDED.seen_at
""")
_ADVANCE = text("""
UPDATE backfills SET cursor = :cursor, job_id = :job, listed = listed + :listed, skipped = skipped + :skipped,
  enqueued = enqueued + :enqueued, updated_at = now()
WHERE name = :name
""")
_FINISH = text("""
UPDATE backfills SET state = :state, run_finished_at = now(), updated_at = now(),
  cursor = CASE WHEN :state = 'done' THEN NULL ELSE cursor END
WHERE name = :name
""")
_GET = text("SELECT * FROM backfills WHERE name = :name")
_LIST = text("SELECT * FROM backfills ORDER BY name")


@dataclass(frozen=True, slots=True)
class Definition:
    """What a backfill enqueues, as stored in its ``backfills`` row."""

    name: str
    source: str
    kinds: str
    params: dict[str, Any]
    tenant: str
    priority: int
    since: Any  # datetime | None
    queue: str
    tasks: list[dict[str, Any]]  # {kind, model, params, params_hash}, as jobs.tasks
    tasks_sha256: str
    revisions: dict[str, str | None]  # kind -> pinned model revision (None: any)


@dataclass(slots=True)
class RunState:
    """Where a run starts: a fresh run, or the rest of an interrupted one."""

    resumed: bool
    cursor: str | None
    job: uuid.UUID | None
    listed: int = 0
    skipped: int = 0
    enqueued: int = 0


@dataclass(frozen=True, slots=True)
class Listed:
    """One listed object: its key, the version the skip rule compares (VersionId, else ETag), its ETag."""

    key: str
    version: str
    etag: str
    last_modified: Any = None


class Backfills:
    """Owns the ``backfills`` and ``backfill_objects`` tables and the run lock."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the backfill's advisory lock for the block; raises :class:`BackfillRunning` if
        another session holds it."""
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            if not conn.execute(_LOCK, {"name": name}).scalar_one():
                raise BackfillRunning(f"backfill {name!r} is already running (another session holds its lock)")
            try:
                yield
            finally:
                conn.execute(_UNLOCK, {"name": name})
        finally:
            conn.close()

    def start(self, d: Definition) -> RunState:
        """Mark the run started. An interrupted run (``running`` or ``failed`` with a cursor) of the
        same source and tasks is resumed: its cursor, job and counters carry on. Anything else
        starts over from the first key."""
        with self.engine.begin() as conn:
            row = conn.execute(_ROW, {"name": d.name}).mappings().first()
            resume = bool(
                row is not None and row["state"] in ("running", "failed") and row["cursor"] is not None
                and row["source"] == d.source and (row["job_id"] is None or row["job_tasks"] == d.tasks)
            )
            conn.execute(_START, {
                "name": d.name, "source": d.source, "kinds": d.kinds, "params": json.dumps(d.params),
                "tenant": d.tenant, "priority": d.priority, "since": d.since, "resume": resume,
            })
            if not resume or row is None:
                return RunState(resumed=False, cursor=None, job=None)
            return RunState(resumed=True, cursor=row["cursor"], job=row["job_id"], listed=row["listed"],
                            skipped=row["skipped"], enqueued=row["enqueued"])

    def decide(self, d: Definition, bucket: str, objects: Sequence[Listed]) -> tuple[list[Listed], list[Listed]]:
        """Split a page's objects into (to enqueue, already done). "Already done" ones were not
        recorded for these tasks yet: the caller records them so the next run skips them by the
        cheap rule. Objects recorded with the same version are left out of both lists."""
        if not objects:
            return [], []
        with self.engine.connect() as conn:
            recorded = dict(conn.execute(_RECORDED, {
                "bucket": bucket, "tasks": d.tasks_sha256, "keys": [o.key for o in objects]}).all())
            fresh = [o for o in objects if recorded.get(o.key) != o.version]
            done: set[str] | None = None
            for task in d.tasks:
                if not fresh or done == set():
                    break
                found = set(conn.execute(_has_result_sql(writer(task["kind"]).table), {
                    "keys": [o.key for o in fresh], "versions": [o.version for o in fresh],
                    "etags": [o.etag for o in fresh], "bucket": bucket, "model": task["model"],
                    "phash": task["params_hash"], "revision": d.revisions.get(task["kind"]),
                }).scalars())
                done = found if done is None else done & found
        done = done or set()
        return [o for o in fresh if o.key not in done], [o for o in fresh if o.key in done]

    def commit_page(
        self, d: Definition, run: RunState, bucket: str, *, enqueue: Sequence[Listed], done: Sequence[Listed],
        cursor: str, listed: int, skipped: int,
    ) -> None:
        """One transaction: append ``enqueue`` to the run's job (created at the first page that has
        any), record ``enqueue`` and ``done`` in ``backfill_objects``, advance the cursor and the
        counters. ``run`` is updated once it commits."""
        job = run.job
        with self.engine.begin() as conn:
            if enqueue:
                if job is None:
                    job = uuid.uuid4()
                    first = d.tasks[0]
                    conn.execute(_NEW_JOB, {
                        "id": job, "kind": ",".join(t["kind"] for t in d.tasks), "model": first["model"],
                        "params": json.dumps(first["params"]), "phash": first["params_hash"],
                        "tasks": json.dumps(d.tasks), "priority": d.priority, "tenant": d.tenant, "queue": d.queue,
                    })
                base = conn.execute(_JOB_TOTAL, {"job": job}).scalar_one()
                conn.execute(_APPEND_ITEMS, {"job": job, "base": base,
                                             "refs": [f"s3://{bucket}/{o.key}" for o in enqueue]})
                conn.execute(_GROW_JOB, {"job": job, "n": len(enqueue)})
            recorded = [*enqueue, *done]
            if recorded:
                conn.execute(_RECORD, {
                    "bucket": bucket, "tasks": d.tasks_sha256, "keys": [o.key for o in recorded],
                    "versions": [o.version for o in recorded],
                    "jobs": [job] * len(enqueue) + [None] * len(done),
                })
            conn.execute(_ADVANCE, {"name": d.name, "cursor": cursor, "job": job, "listed": listed,
                                    "skipped": skipped, "enqueued": len(enqueue)})
        run.job, run.cursor = job, cursor
        run.listed += listed
        run.skipped += skipped
        run.enqueued += len(enqueue)

    def finish(self, name: str, state: str) -> None:
        """``done`` clears the cursor (the next run lists from the start); ``failed`` keeps it."""
        with self.engine.begin() as conn:
            conn.execute(_FINISH, {"name": name, "state": state})

    def get(self, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(_GET, {"name": name}).mappings().first()
        return dict(row) if row is not None else None

    def all(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(_LIST).mappings()]
