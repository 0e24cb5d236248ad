"""The HTTP API's job queries: one tenant's jobs, their progress, results pages, images, and cancel.

Every query takes the tenant, so another tenant's job is simply not found (the API answers 404,
never 403). Progress is read as the jobs page reads it (db/jobs_page.py), without walking the
items of a big job: pending items from the partial indexes that hold only them
(``job_items_unpublished``, ``job_items_in_flight``), dead ones from ``dead_letters``, cancelled
ones only for a cancelled job, and done as what remains of ``total - purged``. The rate (items
finished over the last minute) is measured only while a job has pending items.

Cancelling marks the job's queued items ``cancelled`` (final, with no result and no dead letter)
in one statement; running items finish normally. A worker claims only queued or running items
(``Store.claim``), so a cancelled item whose message is already in Redis is skipped, not run.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, text

from imgq.db import jobs_page
from imgq.db.cancelling import cancel_job as cancel_job  # the API's and CLI's reads and writes of a job, together

_LIST = text("""
SELECT j.id, j.kind, j.source, j.priority, j.total, j.created_at, j.cancelled_at, j.callback_state
FROM jobs j
WHERE j.tenant = :tenant
  AND (CAST(:before_at AS timestamptz) IS NULL OR (j.created_at, j.id) < (CAST(:before_at AS timestamptz), :before_id))
ORDER BY j.created_at DESC, j.id DESC
LIMIT :limit
""")

_OWNED = text("SELECT tasks, cancelled_at FROM jobs WHERE id = :job AND tenant = :tenant")

# A caption any tenant sharing the bucket may see: nothing in it is one tenant's choice. A prompt
# (which the caption continues, so its text shows it) and an adapter (a tenant's name and
# language) are; a translation keeps its English caption's params, so it is judged by them.
SHARED_CAPTION = "c.params->>'prompt' IS NULL AND c.params->>'adapter' IS NULL AND c.method <> 'adapter'"

# An object's versions, the current one first: the one a worker saw last (images.last_seen, NULL
# before migration 0018: read as first_seen). Every "current version" reader orders by this.
CURRENT_VERSION_FIRST = "coalesce(im.last_seen, im.first_seen) DESC, im.id DESC"

# The object's newest caption in one language that no tenant's choices shaped (SHARED_CAPTION):
# /v1/images is read by every tenant whose sources include the object. English is BLIP's own
# caption (adapters caption in their language, so never here); another language, a translation.
_LATEST_CAPTION = text(f"""
SELECT im.id AS image_id, im.version, im.width, im.height, c.text, c.model, c.model_revision, c.params,
       c.created_at, c.lang, c.method
FROM images im JOIN captions c ON c.image_id = im.id
WHERE im.source = :source AND im.bucket = :bucket AND im.key = :key AND c.lang = :lang
  AND c.method = CASE WHEN :lang = 'en' THEN 'native' ELSE 'translated' END AND {SHARED_CAPTION}
ORDER BY {CURRENT_VERSION_FIRST}, c.created_at DESC, c.id DESC LIMIT 1
""")

_LATEST_EMBEDDING = text(f"""
SELECT im.id AS image_id, im.version, im.width, im.height, e.model, e.model_revision, e.dim, e.created_at,
       CASE WHEN :vector THEN CAST(e.embedding AS text) END AS embedding
FROM images im JOIN embeddings e ON e.image_id = im.id
WHERE im.source = :source AND im.bucket = :bucket AND im.key = :key
ORDER BY {CURRENT_VERSION_FIRST}, e.created_at DESC, e.id DESC LIMIT 1
""")


def job_summary(engine: Engine, tenant: str, job: uuid.UUID) -> dict[str, Any] | None:
    """Progress of one of ``tenant``'s jobs, or None (no such job, or another tenant's): the jobs
    page's summary (db/jobs_page.py), so the page and the API always agree."""
    found = jobs_page.job_summary(engine, tenant, job)
    if found is None:
        return None
    final = found.done + found.dead + found.cancelled + found.purged
    return {
        "job": found.id,
        "kinds": found.kinds,
        "source": found.source,
        "priority": found.priority,
        "created_at": found.created_at,
        "cancelled_at": found.cancelled_at,
        "total": found.total,
        "counts": {"queued": found.queued, "running": found.running, "done": found.done, "dead": found.dead,
                   "cancelled": found.cancelled, "purged": found.purged},
        "waiting": found.waiting,
        "progress": round(final / found.total, 4) if found.total else 1.0,
        "finished": found.pending == 0,
        "dead_letters": found.dead_by_code,
        "rate_per_s": None if found.rate is None else round(found.rate, 3),
        "callback": None if found.callback_state is None else {"state": found.callback_state},
    }


def encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode("|".join(str(p) for p in parts).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, count: int) -> list[str] | None:
    """The parts of a cursor made by :func:`encode_cursor`, or None if it is not one."""
    try:
        parts = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("|")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return parts if len(parts) == count else None


def list_jobs(
    engine: Engine, tenant: str, *, limit: int = 50, before: tuple[dt.datetime, uuid.UUID] | None = None
) -> tuple[list[dict[str, Any]], tuple[dt.datetime, uuid.UUID] | None]:
    """``tenant``'s jobs, newest first (keyset on ``jobs_tenant_created``), and the key of the next
    page (None at the end)."""
    params = {"tenant": tenant, "limit": limit + 1, "before_at": before[0] if before else None,
              "before_id": before[1] if before else None}
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(_LIST, params).mappings()]
    more = len(rows) > limit
    rows = rows[:limit]
    for row in rows:
        row["job"] = row.pop("id")
        row["kinds"] = row.pop("kind").split(",")
    return rows, (rows[-1]["created_at"], rows[-1]["job"]) if more and rows else None


def owned_job(engine: Engine, tenant: str, job: uuid.UUID) -> dict[str, Any] | None:
    """``{tasks, cancelled_at}`` of one of ``tenant``'s jobs, or None."""
    with engine.connect() as conn:
        row = conn.execute(_OWNED, {"job": job, "tenant": tenant}).mappings().first()
    return dict(row) if row is not None else None


def results_page_sql(kinds: Sequence[str]) -> str:
    """``imgq results``' query (db/store.py ``results_sql``), as one keyset page by seq."""
    from imgq.db.store import results_sql

    whole = results_sql(kinds)
    anchor = "WHERE i.job_id = :job ORDER BY i.seq"
    if anchor not in whole:  # pragma: no cover - results_sql changed shape
        raise RuntimeError("results_sql no longer ends with its job filter; update results_page_sql")
    return whole.replace(anchor, "WHERE i.job_id = :job AND i.seq > :after ORDER BY i.seq LIMIT :limit")


def results_page(
    engine: Engine, tenant: str, job: uuid.UUID, *, after: int = -1, limit: int = 1000
) -> tuple[list[dict[str, Any]], int | None] | None:
    """Up to ``limit`` items of the job with seq > ``after``, with their results, and the seq to
    continue after (None on the last page); None if the job is not ``tenant``'s."""
    owned = owned_job(engine, tenant, job)
    if owned is None:
        return None
    query = text(results_page_sql([t["kind"] for t in owned["tasks"]]))
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query, {"job": job, "after": after, "limit": limit + 1}).mappings()]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, rows[-1]["seq"] if more and rows else None


def latest_image(
    engine: Engine, *, source: str, bucket: str, key: str, vector: bool = False, lang: str = "en",
) -> dict[str, Any] | None:
    """The newest shared caption in ``lang`` and the newest embedding stored for one object (its
    newest version that has each), or None if it has neither. The vector itself only when asked
    for (256 floats are ~3 kB)."""
    params = {"source": source, "bucket": bucket, "key": key, "vector": vector, "lang": lang}
    with engine.connect() as conn:
        caption = conn.execute(_LATEST_CAPTION, params).mappings().first()
        embedding = conn.execute(_LATEST_EMBEDDING, params).mappings().first()
    if caption is None and embedding is None:
        return None
    found: dict[str, Any] = {"caption": None, "embedding": None}
    if caption is not None:
        found["caption"] = {k: caption[k] for k in ("text", "lang", "method", "model", "model_revision", "params",
                                                    "created_at", "version", "width", "height")}
    if embedding is not None:
        found["embedding"] = {k: embedding[k] for k in ("model", "model_revision", "dim", "created_at", "version")}
        if vector:
            found["embedding"]["vector"] = [float(v) for v in embedding["embedding"].strip("[]").split(",")]
    return found


# -- API jobs: source, callback and idempotency key, in the job's own transaction ----------------

_API_JOB = """
UPDATE jobs SET source = 'api', callback_url = %s, callback_state = %s,
  callback_next_at = CASE WHEN %s THEN now() END
WHERE id = %s
"""
_IDEMPOTENCY_INSERT = "INSERT INTO idempotency_keys (tenant, key, request_sha256, job_id) VALUES (%s, %s, %s, %s)"

_IDEMPOTENT = text("""
SELECT k.request_sha256, k.job_id, j.total, k.rejected FROM idempotency_keys k JOIN jobs j ON j.id = k.job_id
WHERE k.tenant = :tenant AND k.key = :key
""")
_IDEMPOTENCY_REJECTED = "UPDATE idempotency_keys SET rejected = CAST(%s AS jsonb) WHERE tenant = %s AND key = %s"


def record_api_job(
    cursor: Any, job: uuid.UUID, *, tenant: str, idempotency_key: str | None, request_sha256: str,
    callback_url: str | None,
) -> None:
    """Run inside ``Store.create_job``'s transaction (its ``in_transaction`` hook, psycopg cursor):
    mark the job as the API's, arm its callback, and claim the idempotency key. A concurrent
    request with the same key waits here on the key's primary key, then fails with a unique
    violation once this transaction commits (and goes on if it rolls back)."""
    cursor.execute(_API_JOB, (callback_url, "pending" if callback_url else None, callback_url is not None, job))
    if idempotency_key is not None:
        cursor.execute(_IDEMPOTENCY_INSERT, (tenant, idempotency_key, request_sha256, job))


def record_rejected(cursor: Any, *, tenant: str, idempotency_key: str, rejected: list[tuple[str, str]]) -> None:
    """Run at the end of the job's transaction (``Store.create_job``'s ``before_commit``): keep the
    refs the request skipped with its key, so that a replay can answer with them."""
    document = json.dumps([{"ref": ref, "reason": reason} for ref, reason in rejected])
    cursor.execute(_IDEMPOTENCY_REJECTED, (document, tenant, idempotency_key))


def idempotent_job(engine: Engine, tenant: str, key: str) -> tuple[str, uuid.UUID, int, list[dict[str, str]]] | None:
    """(request_sha256, job, items, rejected) of the job an Idempotency-Key already made for
    ``tenant``; ``rejected`` is [] for a key recorded before migration 0012."""
    with engine.connect() as conn:
        row = conn.execute(_IDEMPOTENT, {"tenant": tenant, "key": key}).first()
    return (row[0], row[1], int(row[2]), list(row[3] or [])) if row is not None else None
