"""All SQL that imgq runs against Postgres, behind one class.

Bulk paths use ``COPY`` (acceptance) and ``unnest``-array statements (one round trip per table
per batch, with constant SQL text), never one INSERT per row.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Engine, create_engine, text

from imgq.db import locks
from imgq.db.arrays import Binary, register
from imgq.db.copy_stream import CopyStreams
from imgq.ports import Claim, DeadRow, DoneItem, ObjectInfo, ResultRow

log = logging.getLogger(__name__)

__all__ = ["Claim", "DeadRow", "DoneItem", "EmptyJob", "ObjectInfo", "Store", "make_engine"]

# Objects first (their ids feed every kind's writer); DISTINCT ON keeps the upsert from touching
# one row twice, and the DO UPDATE returns the id of an existing row and marks it seen now (the
# object's current version is the one seen last: an object changed back meets its old row again).
_UPSERT_IMAGES = text("""
INSERT INTO images (source, bucket, key, version, bytes, width, height)
SELECT DISTINCT ON (source, bucket, key, version) source, bucket, key, version, bytes, width, height
FROM unnest(CAST(:source AS text[]), CAST(:bucket AS text[]), CAST(:key AS text[]), CAST(:version AS text[]),
            CAST(:bytes AS bigint[]), CAST(:width AS int[]), CAST(:height AS int[]))
     AS v(source, bucket, key, version, bytes, width, height)
ORDER BY source, bucket, key, version
ON CONFLICT ON CONSTRAINT images_object_version DO UPDATE SET bytes = EXCLUDED.bytes, last_seen = now()
RETURNING id, source, bucket, key, version
""")



# The state guard of the per-item writes, in a form the planner cannot match to a partial index on
# state (an InitPlan is never folded into a constant), so the items are found by their key,
# (job_id, seq). Written against job_items_pending (every queued or running item): with "state IN
# ('queued', 'running')" a planner whose statistics saw no pending item (a big job just landed) read
# every pending item of the table through that index on every write, 7.7 s per 32-row call with
# 200,000 pending. Migration 0009 dropped that index; job_items_in_flight also requires published_at,
# which the plain guard does not imply. The opaque form stays so that no partial index on state can
# bring that plan back. (The CAST makes ANY take an array, not the rows of a subquery.)
PENDING = "j.state = ANY(CAST((SELECT '{queued,running}'::text[]) AS text[]))"


@functools.cache
def finish_sql(links: tuple[str, ...]) -> Any:
    """Last in the transaction: one UPDATE per item finishes it and links every kind's row (one
    new tuple version and one round of foreign-key checks per item, however many kinds)."""
    sets = "".join(f", {col} = v.{col}" for col in links)
    arrays = "".join(f", CAST(:{col} AS bigint[])" for col in links)
    names = "".join(f", {col}" for col in links)
    return text(f"""
UPDATE job_items AS j SET state = 'done', image_id = v.image_id, worker = v.worker, updated_at = now(){sets}
FROM unnest(CAST(:job AS uuid[]), CAST(:seq AS int[]), CAST(:image_id AS bigint[]), CAST(:worker AS text[]){arrays})
     AS v(job_id, seq, image_id, worker{names})
WHERE j.job_id = v.job_id AND j.seq = v.seq AND {PENDING}
RETURNING j.job_id, j.seq
""")


_ITEMS_DEAD = text(f"""
WITH v AS (
  SELECT * FROM unnest(CAST(:job AS uuid[]), CAST(:seq AS int[]), CAST(:code AS text[]),
                       CAST(:message AS text[]), CAST(:worker AS text[]))
         AS v(job_id, seq, code, message, worker)
), u AS (
  UPDATE job_items AS j SET state = 'dead', worker = v.worker, updated_at = now()
  FROM v WHERE j.job_id = v.job_id AND j.seq = v.seq AND {PENDING}
  RETURNING j.job_id, j.seq, j.ref, j.attempts, v.code, v.message, v.worker
)
INSERT INTO dead_letters (job_id, seq, ref, code, message, attempts, worker)
SELECT job_id, seq, ref, code, message, attempts, worker FROM u
ON CONFLICT (job_id, seq) DO UPDATE
SET code = EXCLUDED.code, message = EXCLUDED.message, attempts = EXCLUDED.attempts,
    worker = EXCLUDED.worker, created_at = now()
RETURNING job_id, seq
""")

# prev.state = 'running' means an earlier delivery claimed the item and never settled it.
# A delivered item is published, whoever sent it (a duplicate of a message the feeder thought lost,
# a hand-made one): the feeder must not publish it again once it is released for a retry.
# The repeated seq = ANY(...) keeps both key columns in the index condition of the UPDATE's scan:
# joined on prev.seq alone, a planner that expects a handful of rows per job (a new job id that
# the statistics have not seen) walks every item of the job, 1.2 s per claim with 1M items.
# :leave_peers (a refusal): not the items another registered worker is running; they are its own
# until the reaper takes them (worker NULL), and its result would find them dead.
_CLAIM = text("""
WITH prev AS (
  SELECT seq, state FROM job_items i
  WHERE job_id = :job AND seq = ANY(CAST(:seqs AS int[])) AND state IN ('queued', 'running')
    AND NOT (CAST(:leave_peers AS boolean) AND state = 'running' AND worker <> :worker
             AND EXISTS (SELECT 1 FROM workers w WHERE w.name = i.worker))
    -- Nothing of a cancelled job starts again (imgq.db.cancelling): not its queued items, before
    -- its sweep reaches them, nor a running one delivered again (its worker died, or gave up at
    -- the time limit and still finishes it); the reaper and the lost sweep end a dead worker's.
    AND NOT EXISTS (SELECT 1 FROM jobs c WHERE c.id = :job AND c.cancelled_at IS NOT NULL)
  FOR UPDATE OF i
)
UPDATE job_items AS j SET attempts = attempts + 1, state = 'running', worker = :worker, updated_at = now(),
  published_at = coalesce(j.published_at, now())
FROM prev WHERE j.job_id = :job AND j.seq = ANY(CAST(:seqs AS int[])) AND j.seq = prev.seq
RETURNING j.seq, j.attempts, prev.state = 'running' AS unsettled, j.ref, j.text
""")

_EXISTING_CAPTION = text("""
SELECT c.text, im.width, im.height FROM images im
JOIN captions c ON c.image_id = im.id
WHERE im.source = :source AND im.bucket = :bucket AND im.key = :key AND im.version = :version
  AND c.model = :model AND c.model_revision = :rev AND c.params_hash = :phash
  AND c.lang = 'en' AND c.method = 'native' AND c.via = '' AND c.via_revision = ''
""")

_UNSETTLED = text("""
SELECT seq FROM job_items WHERE job_id = :job AND seq = ANY(CAST(:seqs AS int[])) AND state = 'running'
""")

_RECORDS = text("""
SELECT seq, ref, text FROM job_items
WHERE job_id = :job AND seq = ANY(CAST(:seqs AS int[])) AND state IN ('queued', 'running')
""")

# Add the items a statement cancelled (its CTE ``{items}``, with job_id and state) to their jobs'
# cancelled_items (migration 0015); a job row is touched only when some were.
COUNT_CANCELLED = """
UPDATE jobs SET cancelled_items = cancelled_items + c.n
FROM (SELECT job_id, count(*) AS n FROM {items} WHERE state = 'cancelled' GROUP BY job_id) c
WHERE jobs.id = c.job_id"""

# published_at: when its retry message went out (just before), which the lost-message sweep
# compares with what its lane has let go of (imgq.feeding.PushLog): a deep lane may still hold it.
_RELEASE = text("""
UPDATE job_items SET state = 'queued', updated_at = now(), published_at = now()
WHERE job_id = :job AND seq = ANY(CAST(:seqs AS int[])) AND state = 'running'
""")

# Then, in the same transaction, a released item of a cancelled job ends cancelled (its retry
# message finds nothing to run): a statement of its own, begun after the release, so it also sees a
# mark that committed while the release waited for its rows (imgq.db.cancelling).
_CANCEL_IF_MARKED = text(f"""
WITH items AS (
  UPDATE job_items i SET state = 'cancelled', updated_at = now()
  WHERE i.job_id = :job AND i.seq = ANY(CAST(:seqs AS int[])) AND i.state = 'queued'
    AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = :job AND j.cancelled_at IS NOT NULL)
  RETURNING i.job_id, i.state
){COUNT_CANCELLED.format(items="items")}
""")

# Undo a claim that did no work (a message split up for isolation): the delivery does not count,
# and the items stay 'running' so their next claim still sees them as unsettled.
_UNCLAIM = text("""
UPDATE job_items SET attempts = greatest(attempts - 1, 0), updated_at = now()
WHERE job_id = :job AND seq = ANY(CAST(:seqs AS int[])) AND state = 'running'
""")

# `imgq results --lang L`: the item's caption in L: its translation, or its own caption when that is
# in L already (an adapter's, or BLIP's English for en).
_RESULTS_IN = text("""
SELECT i.seq, i.ref, i.state, CAST(:lang AS text) AS lang, c.text AS caption, c.method, nullif(c.via, '') AS via,
       nullif(c.via_revision, '') AS via_revision, src.text AS source_caption, d.code AS error_code,
       d.message AS error
FROM job_items i
LEFT JOIN captions own ON own.id = i.caption_id
LEFT JOIN item_translations t ON t.job_id = i.job_id AND t.seq = i.seq AND t.lang = :lang
LEFT JOIN captions c ON c.id = coalesce(t.caption_id, CASE WHEN own.lang = :lang THEN own.id END)
LEFT JOIN captions src ON src.id = c.source_id
LEFT JOIN dead_letters d ON d.job_id = i.job_id AND d.seq = i.seq
WHERE i.job_id = :job ORDER BY i.seq
""")

# `imgq enqueue translate --job J`: J's caption task and the refs of its captioned items.
_CAPTIONED = text("SELECT ref FROM job_items WHERE job_id = :job AND caption_id IS NOT NULL ORDER BY seq")

_COUNTS = text("SELECT state, count(*) FROM job_items WHERE job_id = :job GROUP BY state")

_JOB_TASKS = text("SELECT tasks FROM jobs WHERE id = :job")

_ADAPTER_LANG = text("SELECT lang FROM adapters WHERE name = :name")

_PURGED = text("SELECT purged FROM jobs WHERE id = :job")

# Queued items not yet handed to the broker (the backlog the feeder publishes from).
_WAITING = text("SELECT count(*) FROM job_items WHERE job_id = :job AND state = 'queued' AND published_at IS NULL")


def results_sql(kinds: Sequence[str]) -> str:
    """`imgq results` for a job of these kinds: each kind's writer adds its columns and join."""
    from imgq.db.results import writer

    columns, joins = [], []
    for kind in kinds:
        w = writer(kind)
        columns.append(w.results_columns)
        if w.link_column is not None:
            joins.append(f"LEFT JOIN {w.table} r_{kind} ON r_{kind}.id = i.{w.link_column}")
    return f"""
SELECT i.seq, i.ref, i.state, i.attempts, {", ".join(columns) + "," if columns else ""}
       im.width, im.height, d.code AS error_code, d.message AS error
FROM job_items i
{chr(10).join(joins)}
LEFT JOIN images im ON im.id = i.image_id
LEFT JOIN dead_letters d ON d.job_id = i.job_id AND d.seq = i.seq
WHERE i.job_id = :job ORDER BY i.seq
"""


class EmptyJob(ValueError):
    """A job with no items is refused, not committed."""


# SQL case: keywords and unquoted names are case-insensitive.
_COPY_ITEMS = "COPY job_items (job_id, seq, ref, text) FROM STDIN"  # pragma: no mutate
# A job loaded by side streams holds this lock (class, hashtext of its id) from its transaction's
# first statement to its end, and is recorded in ``acceptances`` until it commits: a record whose
# job is missing and whose lock is free was left by a producer that died (Admin.drop_abandoned).
ACCEPTANCE_LOCK_CLASS = locks.ACCEPTANCE
_ACCEPTANCE_LOCK = f"SELECT pg_advisory_xact_lock({ACCEPTANCE_LOCK_CLASS}, hashtext(%s))"
_ACCEPTANCE_BEGUN = text("INSERT INTO acceptances (job_id) VALUES (:job)")
_ACCEPTANCE_DONE = "DELETE FROM acceptances WHERE job_id = %s"  # pragma: no mutate (SQL case)
_ACCEPTANCE_WAIT = text(f"SELECT pg_advisory_xact_lock({ACCEPTANCE_LOCK_CLASS}, hashtext(CAST(:job AS text)))")
_ACCEPTANCE_TRY = text(f"SELECT pg_try_advisory_xact_lock({ACCEPTANCE_LOCK_CLASS}, hashtext(CAST(:job AS text)))")
# Only items whose job is missing: a commit the client saw fail may have reached the server.
_DROP_ORPHAN_ITEMS = text("DELETE FROM job_items WHERE job_id = :job "
                          "AND NOT EXISTS (SELECT 1 FROM jobs WHERE id = :job)")
_DROP_ACCEPTANCE = text("DELETE FROM acceptances WHERE job_id = :job")


def drop_acceptance(conn: Any, job: uuid.UUID, *, wait: bool) -> int | None:
    """In ``conn``'s transaction: delete the items and the record of ``job``'s acceptance unless
    its job exists. Taking the job's acceptance lock first means its own transaction has ended
    (it holds the lock from its first statement), so what this sees of ``jobs`` is final. Returns
    the items deleted, or None if the lock is held (``wait=False``: the acceptance is still going)."""
    if wait:
        conn.execute(_ACCEPTANCE_WAIT, {"job": job})
    elif not conn.execute(_ACCEPTANCE_TRY, {"job": job}).scalar_one():
        return None
    dropped = conn.execute(_DROP_ORPHAN_ITEMS, {"job": job}).rowcount
    conn.execute(_DROP_ACCEPTANCE, {"job": job})
    return int(dropped)


def _chunks(values: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for value in values:
        chunk.append(value)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _copy_row(ref: str | tuple[str, str]) -> str:
    """``ref\ttext`` in COPY text format; ``\\N`` (NULL) when there is no text."""
    if isinstance(ref, tuple):
        return f"{_copy_text(ref[0])}\t{_copy_text(ref[1])}"
    return f"{_copy_text(ref)}\t\\N"


def _copy_text(value: str) -> str:
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        value = value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


# Seconds a new connection may take: a Postgres that accepts TCP connections but never answers (a
# hung server, a half-open firewall) fails with db_unavailable instead of hanging every command (psycopg's
# own default is 130 s per host). The URL's ?connect_timeout=, libpq's PGCONNECT_TIMEOUT or the caller's
# connect_args win; psycopg's minimum is 2 s.
CONNECT_TIMEOUT_S = 10


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    import os

    from sqlalchemy.engine import make_url

    kwargs.setdefault("pool_pre_ping", True)
    connect_args = dict(kwargs.pop("connect_args", None) or {})
    if "connect_timeout" not in make_url(database_url).query and "PGCONNECT_TIMEOUT" not in os.environ:
        connect_args.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    return register(create_engine(database_url, connect_args=connect_args, **kwargs))


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, database_url: str, **kwargs: Any) -> Store:
        return cls(make_engine(database_url, **kwargs))

    # -- acceptance ---------------------------------------------------------------------------
    def create_job(
        self, *, tasks: Sequence[dict[str, Any]], refs: Iterable[str] | Iterable[tuple[str, str]],
        priority: int = 0, tenant: str = "default", queue: str = "imgq", refs_per_message: int | None = None,
        in_transaction: Callable[[Any, uuid.UUID], None] | None = None, copy_streams: int = 1,
        before_commit: Callable[[Any, uuid.UUID], None] | None = None,
    ) -> uuid.UUID:
        """Commit the job and all its items (COPY) before anything is published.

        ``tasks`` are ``{kind, model, params, params_hash}`` dicts; ``refs`` are refs, or
        ``(ref, text)`` pairs for pair kinds. They are consumed once, in chunks, so validating the
        next chunk overlaps with the server loading the last one. An exception raised while
        iterating rolls everything back; a job with no refs is refused (ValueError) rather than
        committed empty. Items wait in Postgres (``published_at`` NULL) until the feeder, in
        ``priority`` order and fair between tenants, publishes them to ``queue``.

        ``in_transaction(cursor, job)`` runs in the job's transaction right after its ``jobs`` row is
        inserted, before any item is copied: the API records its idempotency key there, so concurrent
        duplicates wait on that key's primary key and then fail, before copying anything.
        ``before_commit(cursor, job)`` runs in the same transaction once every ref is consumed (the
        API stores the refs it skipped with the key there).

        Writer threads load the chunks while this thread validates and formats the next: the job's
        own COPY, and up to ``copy_streams`` - 1 side COPYs in their own transactions, which commit
        just before this one (:mod:`imgq.db.copy_stream`)."""
        job = uuid.uuid4()
        first = tasks[0]
        streams: CopyStreams | None = None
        raw = self.engine.raw_connection()
        try:
            with raw.cursor() as cur:
                if copy_streams > 1:  # before anything can record the acceptance (migration 0011)
                    cur.execute(_ACCEPTANCE_LOCK, (str(job),))
                cur.execute(
                    # SQL case: keywords and unquoted names are case-insensitive.
                    "INSERT INTO jobs (id, kind, model, params, params_hash, tasks, total, "  # pragma: no mutate
                    "priority, tenant, queue, refs_per_message) "  # pragma: no mutate
                    "VALUES (%s, %s, %s, %s, %s, %s, 0, %s, %s, %s, %s)",  # pragma: no mutate
                    (job, ",".join(t["kind"] for t in tasks), first["model"], json.dumps(first["params"]),
                     first["params_hash"], json.dumps(list(tasks)), priority, tenant, queue, refs_per_message),
                )
                if in_transaction is not None:
                    in_transaction(cur, job)
                total = 0
                with cur.copy(_COPY_ITEMS) as copy:
                    streams = CopyStreams(copy, self.engine, _COPY_ITEMS, copy_streams,
                                          on_first_side=functools.partial(self._begin_acceptance, job))
                    # COPY's text format built in one buffer per chunk: ~3x faster than write_row.
                    prefix = f"{job}\t"
                    try:
                        # The chunk size (None: one chunk) changes memory and overlap, not the rows.
                        for chunk in _chunks(refs, 5_000):  # pragma: no mutate
                            streams.write("".join(
                                f"{prefix}{seq}\t{_copy_row(ref)}\n" for seq, ref in enumerate(chunk, total)
                            ))
                            total += len(chunk)
                        streams.finish()
                    except BaseException:
                        streams.abort()  # no writer touches the COPY once it is failed
                        raise
                if total == 0:
                    raise EmptyJob("a job needs at least one item")
                cur.execute("UPDATE jobs SET total = %s WHERE id = %s", (total, job))  # pragma: no mutate (SQL case)
                if streams.sides:
                    cur.execute(_ACCEPTANCE_DONE, (job,))  # committed with the job, or not at all
                if before_commit is not None:
                    before_commit(cur, job)
            streams.commit_sides()
        except BaseException:
            if streams is not None:
                streams.abort()
            raw.rollback()
            raw.close()
            if streams is not None and streams.sides:  # a side's commit may have failed after another's
                self._drop_items(job)
            raise
        try:
            raw.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # ends the transaction, if the server still has it, and the lock
                raw.close()
            # The side streams committed: drop their items rather than leave them without a job.
            if streams.sides:
                self._drop_items(job)
            raise
        raw.close()
        return job

    def _begin_acceptance(self, job: uuid.UUID) -> None:
        with self.engine.begin() as conn:
            conn.execute(_ACCEPTANCE_BEGUN, {"job": job})

    def _drop_items(self, job: uuid.UUID) -> None:
        """After a failed acceptance: its committed side items and its record, if any."""
        try:
            with self.engine.begin() as conn:
                # A job connection the server has not yet seen die still holds the lock.
                conn.execute(text("SET LOCAL lock_timeout = '5s'"))  # pragma: no mutate
                drop_acceptance(conn, job, wait=True)
        except Exception:  # the server is gone: the feeder's sweep drops them later (Admin.drop_abandoned)
            log.warning("could not drop the side streams' items of job %s, whose commit failed", job)

    # -- worker ---------------------------------------------------------------------------------
    def claim(self, job: uuid.UUID, seqs: Sequence[int], worker: str, *, leave_peers: bool = False) -> dict[int, Claim]:
        """Count a delivery of each unfinished item. Finished items (a duplicate delivery) are
        left out, so they are never processed twice; with ``leave_peers``, so are the items
        another registered worker is running."""
        with self.engine.begin() as conn:
            params = {"job": job, "seqs": list(seqs), "worker": worker, "leave_peers": leave_peers}
            rows = conn.execute(_CLAIM, params)
            return {seq: Claim(attempts, unsettled, ref, text_) for seq, attempts, unsettled, ref, text_ in rows}

    def existing_caption(self, source: str, bucket: str, key: str, version: str, model: str, revision: str,
                         params_hash: str) -> tuple[str, int, int] | None:
        with self.engine.connect() as conn:
            row = conn.execute(_EXISTING_CAPTION, {"source": source, "bucket": bucket, "key": key, "version": version,
                                                   "model": model, "rev": revision, "phash": params_hash}).first()
        return None if row is None else (row[0], row[1], row[2])

    def unsettled(self, job: uuid.UUID, seqs: Sequence[int]) -> set[int]:
        with self.engine.connect() as conn:
            return set(conn.execute(_UNSETTLED, {"job": job, "seqs": list(seqs)}).scalars())

    def records(self, job: uuid.UUID, seqs: Sequence[int]) -> dict[int, tuple[Any, ...]]:
        with self.engine.connect() as conn:
            rows = conn.execute(_RECORDS, {"job": job, "seqs": list(seqs)}).all()
        return {seq: (seq, ref) if text_ is None else (seq, ref, text_) for seq, ref, text_ in rows}

    def job_tasks(self, job: uuid.UUID) -> list[dict[str, Any]] | None:
        with self.engine.connect() as conn:
            return conn.execute(_JOB_TASKS, {"job": job}).scalar_one_or_none()

    def release(self, job: uuid.UUID, seqs: Sequence[int]) -> None:
        """Mark items queued again after their retry message was published."""
        if seqs:
            with self.engine.begin() as conn:
                conn.execute(_RELEASE, {"job": job, "seqs": list(seqs)})
                conn.execute(_CANCEL_IF_MARKED, {"job": job, "seqs": list(seqs)})

    def unclaim(self, job: uuid.UUID, seqs: Sequence[int]) -> None:
        if seqs:
            with self.engine.begin() as conn:
                conn.execute(_UNCLAIM, {"job": job, "seqs": list(seqs)})

    def write_done(self, items: Sequence[DoneItem]) -> set[tuple[uuid.UUID, int]]:
        """Store every kind's result of a batch of items and finish them, in one transaction:
        objects, then one statement per kind and parameter group, then the items' state. Returns
        the (job, seq) this write finished: not those a duplicate delivery had finished already."""
        if not items:
            return set()
        from imgq.db.results import writer

        with self.engine.begin() as conn:
            objs = [item.obj for item in items]
            ids = {
                (src, bucket, key, version): image_id
                for image_id, src, bucket, key, version in conn.execute(_UPSERT_IMAGES, {
                    "source": Binary(o.source for o in objs), "bucket": Binary(o.bucket for o in objs),
                    "key": Binary(o.key for o in objs), "version": Binary(o.version for o in objs),
                    "bytes": Binary(o.bytes for o in objs), "width": Binary(o.width for o in objs),
                    "height": Binary(o.height for o in objs),
                })
            }
            image_of = [ids[(o.source, o.bucket, o.key, o.version)] for o in objs]
            by_kind: dict[str, list[ResultRow]] = {}
            for item, image_id in zip(items, image_of, strict=True):  # pragma: no mutate (equal lengths)
                for kind, (model, rev, phash, params, value) in item.results.items():
                    by_kind.setdefault(kind, []).append(
                        ResultRow(item.job, item.seq, image_id, model, rev, phash, params, value, item.text))
            links: dict[str, list[int | None]] = {}
            written: dict[str, dict[tuple[uuid.UUID, int], int]] = {}
            # A stage's writer (translate) runs after the kind it follows, whose result ids it links to.
            for kind, rows in sorted(by_kind.items(), key=lambda kv: getattr(writer(kv[0]), "after", None) is not None):
                w = writer(kind)
                after = getattr(w, "after", None)
                ids = written[kind] = w.write(conn, rows) if after is None else w.write(conn, rows, written[after])
                if w.link_column is not None:
                    links[w.link_column] = Binary(ids.get((i.job, i.seq)) for i in items)
            params: dict[str, Any] = {"job": Binary(i.job for i in items), "seq": Binary(i.seq for i in items),
                                      "image_id": Binary(image_of), "worker": Binary(i.worker for i in items)}
            return {(job, seq) for job, seq in conn.execute(finish_sql(tuple(sorted(links))), params | links)}

    def write_dead(self, rows: Sequence[DeadRow]) -> set[tuple[uuid.UUID, int]]:
        """Dead-letter the pending items of ``rows``; returns the (job, seq) it dead-lettered."""
        if not rows:
            return set()
        with self.engine.begin() as conn:
            found = conn.execute(
                _ITEMS_DEAD,
                {
                    "job": Binary(r.job for r in rows),
                    "seq": Binary(r.seq for r in rows),
                    "code": Binary(r.code for r in rows),
                    "message": Binary(r.message[:2000] for r in rows),
                    "worker": Binary(r.worker for r in rows),
                },
            )
            return {(job, seq) for job, seq in found}

    # -- reading --------------------------------------------------------------------------------
    def job_exists(self, job: uuid.UUID) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(
                text("SELECT 1 FROM jobs WHERE id = :job"), {"job": job}  # pragma: no mutate (SQL case)
            ).first() is not None

    def counts(self, job: uuid.UUID) -> dict[str, int]:
        with self.engine.connect() as conn:
            found = dict(conn.execute(_COUNTS, {"job": job}).all())
        counts = {state: int(found.get(state, 0)) for state in ("queued", "running", "done", "dead")}
        if found.get("cancelled"):  # only a cancelled job has any (DELETE /v1/jobs/{id})
            counts["cancelled"] = int(found["cancelled"])
        return counts

    def purged(self, job: uuid.UUID) -> int:
        """Dead-lettered items of the job that `imgq dlq purge` deleted (they no longer count)."""
        with self.engine.connect() as conn:
            return int(conn.execute(_PURGED, {"job": job}).scalar_one_or_none() or 0)

    def waiting(self, job: uuid.UUID) -> int:
        """Queued items of the job still in Postgres, not yet published to the broker window."""
        with self.engine.connect() as conn:
            return int(conn.execute(_WAITING, {"job": job}).scalar_one())

    def kinds(self, job: uuid.UUID) -> list[str]:
        with self.engine.connect() as conn:
            tasks = conn.execute(_JOB_TASKS, {"job": job}).scalar_one_or_none()
        return [t["kind"] for t in tasks or []]

    def languages(self, job: uuid.UUID) -> list[str]:
        """The languages whose captions ``job`` asked for: en for BLIP's own, its adapter's, and those
        it translates into (``imgq results --lang`` of another one would be a column of nulls)."""
        with self.engine.connect() as conn:
            tasks = conn.execute(_JOB_TASKS, {"job": job}).scalar_one_or_none() or []
            out: list[str] = []
            for task in tasks:
                params = task.get("params") or {}
                if task["kind"] == "caption" and params.get("adapter"):
                    lang = conn.execute(_ADAPTER_LANG, {"name": params["adapter"]}).scalar_one_or_none()
                    out += [lang] if lang else []
                elif task["kind"] == "caption":
                    out.append("en")
                elif task["kind"] == "translate":
                    out += list(params.get("langs") or [])
        return list(dict.fromkeys(out))

    def results_in(self, job: uuid.UUID, lang: str) -> Iterator[dict[str, Any]]:
        with self.engine.connect() as conn:
            # Streaming in batches bounds memory; the rows are the same.
            result = conn.execution_options(stream_results=True, yield_per=2000).execute(  # pragma: no mutate
                _RESULTS_IN, {"job": job, "lang": lang})
            for row in result.mappings():
                yield dict(row)

    def captioned(self, job: uuid.UUID) -> tuple[dict[str, Any] | None, list[str]] | None:
        """The job's caption task (None if it has none) and its captioned items' refs; None: no job."""
        with self.engine.connect() as conn:
            tasks = conn.execute(_JOB_TASKS, {"job": job}).scalar_one_or_none()
            if tasks is None:
                return None
            caption = next((t for t in tasks if t["kind"] == "caption"), None)
            refs = list(conn.execute(_CAPTIONED, {"job": job}).scalars()) if caption is not None else []
        return caption, refs

    def results(self, job: uuid.UUID) -> Iterator[dict[str, Any]]:
        query = text(results_sql(self.kinds(job)))
        with self.engine.connect() as conn:
            # Streaming in batches bounds memory; the rows are the same.
            result = conn.execution_options(stream_results=True, yield_per=2000).execute(  # pragma: no mutate
                query, {"job": job})
            for row in result.mappings():
                yield dict(row)
