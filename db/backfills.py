"""The SQL of ``imgq backfill``: its lock, its row in ``backfills``, the skip rule, and one page's commit.

Invariants:

- One run per backfill name at a time: a session advisory lock keyed on the name, held on a
  connection of its own for the whole run (a killed run's lock ends with its connection). Every
  write of the run (start, each page, finish) is a transaction on that same connection that first
  locks the name's ``backfills`` row and then checks that its session still holds the lock: a run
  whose lock session ended (network drop, idle_session_timeout, pg_terminate_backend) stops with
  :class:`BackfillLockLost` before writing anything more, and a second run that took the lock
  meanwhile waits for the row and resumes after the page committed last.
- A page is one transaction: its items are appended to the run's job (``jobs.total`` grows with
  them), its objects are recorded in ``backfill_objects``, and the cursor and counters advance.
  A run that stops between pages resumes after the last committed page and never enqueues an
  object twice. A run is resumed only by a run of the same definition (``Definition.digest``,
  stored in ``backfills.definition_sha256``) and never into a cancelled job.
- A page first locks the run's job and checks ``jobs.cancelled_at``: a cancelled job (DELETE
  /v1/jobs/{id}, ``jobs_view.cancel_job``) stops the run with :class:`BackfillCancelled`.
- Skip rule, per object version (S3 VersionId, else ETag; the worker stores the same in
  ``images.version``): skipped if ``backfill_objects`` holds that version for the same tasks and
  the job it was enqueued in was not cancelled, or if every task already has a result for that
  version (same model, params hash and, when pinned, model revision).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from imgq.db import locks
from imgq.db.results import writer
from imgq.errors import BackfillCancelled, BackfillLockLost, BackfillRunning
from imgq.kinds import KINDS

LOCK_CLASS = locks.BACKFILL
_LOCK = text(f"SELECT pg_try_advisory_lock({LOCK_CLASS}, hashtext(:name))")
_UNLOCK = text(f"SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext(:name))")
# Whether this session (the run's lock connection) still holds the name's lock. A two-key advisory
# lock shows in pg_locks as classid = key 1, objid = key 2 (as oid), objsubid = 2.
_HELD = text(f"""
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
  AND classid = CAST({LOCK_CLASS} AS oid) AND objid = CAST(hashtext(:name) AS oid) AND objsubid = 2)
""")
# Taken first in each of the run's transactions: a second run's start() waits for it.
_ROW_LOCK = text("SELECT 1 FROM backfills WHERE name = :name FOR UPDATE")

_ROW = text("""
SELECT b.source, b.state, b.cursor, b.job_id, b.listed, b.skipped, b.enqueued, b.definition_sha256,
       j.cancelled_at AS job_cancelled_at
FROM backfills b LEFT JOIN jobs j ON j.id = b.job_id WHERE b.name = :name FOR UPDATE OF b
""")

_START = text("""
INSERT INTO backfills (name, source, kinds, params, tenant, priority, since, definition_sha256, state,
                       run_started_at, updated_at)
VALUES (:name, :source, :kinds, CAST(:params AS jsonb), :tenant, :priority, :since, :digest, 'running', now(),
        now())
ON CONFLICT (name) DO UPDATE SET
  source = EXCLUDED.source, kinds = EXCLUDED.kinds, params = EXCLUDED.params, tenant = EXCLUDED.tenant,
  priority = EXCLUDED.priority, since = EXCLUDED.since, definition_sha256 = EXCLUDED.definition_sha256,
  state = 'running', updated_at = now(),
  cursor = CASE WHEN :resume THEN backfills.cursor END,
  job_id = CASE WHEN :resume THEN backfills.job_id END,
  listed = CASE WHEN :resume THEN backfills.listed ELSE 0 END,
  skipped = CASE WHEN :resume THEN backfills.skipped ELSE 0 END,
  enqueued = CASE WHEN :resume THEN backfills.enqueued ELSE 0 END,
  run_started_at = CASE WHEN :resume THEN backfills.run_started_at ELSE now() END,
  run_finished_at = CASE WHEN :resume THEN backfills.run_finished_at END
""")

# Rule 1: recorded with this version for these tasks, found done (job NULL) or enqueued in a job
# that was not cancelled (a cancelled job's objects are decided again: rule 2 skips those it did).
_RECORDED = text("""
SELECT o.key, o.version FROM backfill_objects o LEFT JOIN jobs j ON j.id = o.job_id
WHERE o.bucket = :bucket AND o.tasks_sha256 = :tasks AND o.key = ANY(CAST(:keys AS text[]))
  AND j.cancelled_at IS NULL
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


# A translation is a captions row of its English caption (same image, BLIP model and params), by
# the translation model (via), one per language: the object is done when every language the task
# asks for is there. Judged like _has_result_sql, its rows name the BLIP model, not the task's.
_HAS_TRANSLATIONS = text("""
SELECT v.key FROM unnest(CAST(:keys AS text[]), CAST(:versions AS text[]), CAST(:etags AS text[]))
     AS v(key, version, etag)
WHERE EXISTS (
  SELECT 1 FROM images im JOIN captions s ON s.image_id = im.id
  WHERE im.source = 's3' AND im.bucket = :bucket AND im.key = v.key AND im.version IN (v.version, v.etag)
    AND s.method = 'native' AND s.model = :source_model AND s.params_hash = :source_phash
    AND (CAST(:source_revision AS text) IS NULL OR s.model_revision = :source_revision)
    AND (SELECT count(DISTINCT t.lang) FROM captions t
         WHERE t.source_id = s.id AND t.method = 'translated' AND t.via = :model
           AND t.lang = ANY(CAST(:langs AS text[]))
           AND (CAST(:revision AS text) IS NULL OR t.via_revision = :revision)) = cardinality(CAST(:langs AS text[])))
""")


_NEW_JOB = text("""
INSERT INTO jobs (id, kind, model, params, params_hash, tasks, total, priority, tenant, queue, source)
VALUES (:id, :kind, :model, CAST(:params AS jsonb), :phash, CAST(:tasks AS jsonb), 0, :priority, :tenant, :queue,
        'backfill')
""")
# The run's job, locked for the page: FOR UPDATE when the page appends (total grows), FOR SHARE
# otherwise; either way a concurrent cancel waits for the page, or the page sees it.
_JOB_FOR_APPEND = text("SELECT total, cancelled_at FROM jobs WHERE id = :job FOR UPDATE")
_JOB_FOR_CHECK = text("SELECT total, cancelled_at FROM jobs WHERE id = :job FOR SHARE")
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

    @property
    def digest(self) -> str:
        """What "the same run" means to resumption: the source, the tasks (``tasks_sha256``: each
        kind's model, params hash and pinned revision), ``since``, and the job's tenant, priority
        and queue. Stored in ``backfills.definition_sha256``; a run of another digest starts over."""
        since = self.since.astimezone(dt.UTC).isoformat() if self.since is not None else None
        raw = [self.source, self.tasks_sha256, since, self.tenant, self.priority, self.queue]
        return hashlib.sha256(json.dumps(raw, separators=(",", ":")).encode()).hexdigest()


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


def _has_result(d: Definition, task: dict[str, Any], objects: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The statement and parameters that find which ``objects`` already have ``task``'s result."""
    revision = d.revisions.get(task["kind"])
    if task["kind"] != "translate":
        return _has_result_sql(writer(task["kind"]).table), {
            **objects, "model": task["model"], "phash": task["params_hash"], "revision": revision}
    source = next(t for t in d.tasks if t["kind"] == KINDS["translate"].after)
    return _HAS_TRANSLATIONS, {
        **objects, "model": task["model"], "revision": revision, "langs": list(task["params"]["langs"]),
        "source_model": source["model"], "source_phash": source["params_hash"],
        "source_revision": d.revisions.get(source["kind"])}


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {first[0]}" if first else type(orig).__name__


class Backfills:
    """Owns the ``backfills`` and ``backfill_objects`` tables and the run lock."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def lock(self, name: str) -> Iterator[Connection]:
        """Hold the backfill's advisory lock for the block; raises :class:`BackfillRunning` if
        another session holds it. Yields the lock's connection: pass it as ``held`` to
        :meth:`start`, :meth:`commit_page` and :meth:`finish`, which write in transactions on it
        only while its session still holds the lock."""
        conn = self.engine.connect()
        try:
            got = conn.execute(_LOCK, {"name": name}).scalar_one()
            conn.commit()  # a session lock outlives the transaction; the connection waits idle
            if not got:
                raise BackfillRunning(f"backfill {name!r} is already running (another session holds its lock)")
            try:
                yield conn
            finally:
                if not conn.invalidated:
                    try:
                        conn.rollback()
                        conn.execute(_UNLOCK, {"name": name})
                        conn.commit()
                    except DBAPIError:
                        pass  # the session is gone, and its lock with it
        finally:
            conn.close()

    @contextmanager
    def _owned(self, name: str, held: Connection | None, job: uuid.UUID | None) -> Iterator[Connection]:
        """A transaction of the run: on the lock's connection ``held``, after locking the name's
        row and checking that this session still holds the lock (else :class:`BackfillLockLost`).
        Without ``held`` (a caller that holds no lock, as tests), a plain transaction."""
        if held is None:
            with self.engine.begin() as conn:
                yield conn
            return

        def lost(why: str) -> BackfillLockLost:
            kept = f"Its job {job} keeps the pages committed before (they are processed); the run" if job else "The run"
            return BackfillLockLost(f"backfill {name!r} lost its lock ({why}): it stopped before committing anything "
                                    f"more, since another run of it may have started. {kept} holding the lock now, "
                                    "or the next one, resumes after the last committed page")

        if held.in_transaction():  # nothing of the run's is pending between its transactions
            held.rollback()
        try:
            with held.begin():
                held.execute(_ROW_LOCK, {"name": name})
                if not held.execute(_HELD, {"name": name}).scalar_one():
                    raise lost("its database session no longer holds it")
                yield held
        except DBAPIError as exc:
            if exc.connection_invalidated or held.invalidated:
                raise lost(f"the database session holding it ended: {_short(exc)}") from exc
            raise

    def start(self, d: Definition, held: Connection | None = None) -> RunState:
        """Mark the run started. An interrupted run (``running`` or ``failed`` with a cursor) of the
        same definition (:attr:`Definition.digest`) whose job was not cancelled is resumed: its
        cursor, job and counters carry on. Anything else starts over from the first key (with a
        new job)."""
        with self._owned(d.name, held, None) as conn:
            row = conn.execute(_ROW, {"name": d.name}).mappings().first()
            resume = bool(
                row is not None and row["state"] in ("running", "failed") and row["cursor"] is not None
                and row["definition_sha256"] == d.digest and row["job_cancelled_at"] is None
            )
            conn.execute(_START, {
                "name": d.name, "source": d.source, "kinds": d.kinds, "params": json.dumps(d.params),
                "tenant": d.tenant, "priority": d.priority, "since": d.since, "digest": d.digest, "resume": resume,
            })
            if not resume or row is None:
                return RunState(resumed=False, cursor=None, job=None)
            return RunState(resumed=True, cursor=row["cursor"], job=row["job_id"], listed=row["listed"],
                            skipped=row["skipped"], enqueued=row["enqueued"])

    def decide(self, d: Definition, bucket: str, objects: Sequence[Listed]) -> tuple[list[Listed], list[Listed]]:
        """Split a page's objects into (to enqueue, already done). "Already done" ones were not
        recorded for these tasks yet: the caller records them so the next run skips them by the
        cheap rule. Objects recorded with the same version (and not in a cancelled job) are left
        out of both lists."""
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
                listed = {"keys": [o.key for o in fresh], "versions": [o.version for o in fresh],
                          "etags": [o.etag for o in fresh], "bucket": bucket}
                found = set(conn.execute(*_has_result(d, task, listed)).scalars())
                done = found if done is None else done & found
        done = done or set()
        return [o for o in fresh if o.key not in done], [o for o in fresh if o.key in done]

    def commit_page(
        self, d: Definition, run: RunState, bucket: str, *, enqueue: Sequence[Listed], done: Sequence[Listed],
        cursor: str, listed: int, skipped: int, held: Connection | None = None,
    ) -> None:
        """One transaction: append ``enqueue`` to the run's job (created at the first page that has
        any), record ``enqueue`` and ``done`` in ``backfill_objects``, advance the cursor and the
        counters. ``run`` is updated once it commits. Raises :class:`BackfillCancelled` (nothing
        written) if the run's job was cancelled, and :class:`BackfillLockLost` if ``held``'s
        session no longer holds the run's lock."""
        job = run.job
        with self._owned(d.name, held, job) as conn:
            base = 0
            if job is not None:
                found = conn.execute(_JOB_FOR_APPEND if enqueue else _JOB_FOR_CHECK, {"job": job}).first()
                if found is None or found.cancelled_at is not None:
                    what = ("was deleted" if found is None
                            else f"was cancelled at {found.cancelled_at:%Y-%m-%d %H:%M:%S %Z}")
                    raise BackfillCancelled(
                        f"the job {job} of backfill {d.name!r} {what}: the run stopped ({run.listed} listed, "
                        f"{run.enqueued} enqueued before); the next run starts over with a new job and enqueues "
                        "again the objects the cancelled job did not finish")
                base = found.total
            if enqueue:
                if job is None:
                    job = uuid.uuid4()
                    first = d.tasks[0]
                    conn.execute(_NEW_JOB, {
                        "id": job, "kind": ",".join(t["kind"] for t in d.tasks), "model": first["model"],
                        "params": json.dumps(first["params"]), "phash": first["params_hash"],
                        "tasks": json.dumps(d.tasks), "priority": d.priority, "tenant": d.tenant, "queue": d.queue,
                    })
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

    def finish(self, name: str, state: str, held: Connection | None = None) -> None:
        """``done`` clears the cursor (the next run lists from the start); ``failed`` keeps it.
        With ``held``, only while its session still holds the lock (else :class:`BackfillLockLost`,
        nothing written: the row is another run's now)."""
        with self._owned(name, held, None) as conn:
            conn.execute(_FINISH, {"name": name, "state": state})

    def get(self, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(_GET, {"name": name}).mappings().first()
        return dict(row) if row is not None else None

    def all(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(_LIST).mappings()]
