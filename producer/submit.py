"""Accept a job: validate, commit job + items in Postgres (one COPY), then publish its first messages.

Acceptance is durable before anything is published. Postgres holds the backlog; the workers'
feeder publishes it into a bounded broker window, in priority order (worker/feeder.py). The
producer publishes the first messages itself (at most the window's free room and
``PRODUCER_MESSAGES``), under the same feed lock, so a job starts at once even before a feeder
looks. A producer that dies after the commit loses nothing: its items wait in Postgres for the
feeder.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from imgq.config import Settings
from imgq.contract import TaskSpec
from imgq.db.admin import Admin
from imgq.db.store import EmptyJob, Store
from imgq.errors import RefRefused
from imgq.producer.expand import Expander
from imgq.worker.feeder import PRODUCER_MESSAGES, Feeder

# How long enqueue waits for a busy feeder before leaving the first window to it.
FEED_LOCK_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class Submitted:
    job: uuid.UUID
    items: int
    messages: int  # published now; the rest waits in Postgres for the feeder
    published: int = 0  # items in those messages
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (ref, reason)
    publish_error: str | None = None  # the job is committed but its messages were not all sent
    feeder_busy: bool = False  # another feeder held the queue's feed lock: it publishes the job
    memory_held: bool = False  # publishing stopped at IMGQ_BROKER_MEMORY_FRACTION of Redis' maxmemory


def accept_refs(
    raw_refs: Iterable[str],
    settings: Settings,
    *,
    skip_invalid: bool,
    rejected: list[tuple[str, str]],
    s3_client: Any = None,
) -> Iterator[str]:
    """Expand and validate refs lazily. With ``skip_invalid`` bad refs go to ``rejected``;
    otherwise the first one raises :class:`RefRefused`."""
    expand_one = Expander(settings, s3_client)
    object_ref = expand_one.object_ref
    for raw in raw_refs:
        try:
            ref = object_ref(raw)
            if ref is not None:
                yield ref
            else:
                yield from expand_one(raw, rejected.append if skip_invalid else None)
        except RefRefused as exc:
            if not skip_invalid:
                raise
            rejected.append((raw, exc.message))


def submit(
    *,
    settings: Settings,
    store: Store,
    app: Celery,
    refs: Iterable[str] | Iterable[tuple[str, str]],
    tasks: list[TaskSpec],
    refs_per_message: int | None = None,
    rejected: list[tuple[str, str]] | None = None,
    priority: int | None = None,
    tenant: str | None = None,
    in_transaction: Callable[[Any, uuid.UUID], None] | None = None,
    before_commit: Callable[[Any, uuid.UUID], None] | None = None,
) -> Submitted:
    """Accept ``refs`` (or ``(ref, text)`` pairs; validated while they are copied into Postgres),
    then publish its first messages (as many as the broker window has room for, at most
    ``PRODUCER_MESSAGES``). ``in_transaction`` and ``before_commit``: see
    :meth:`Store.create_job` (the API's idempotency key, source and callback; its skipped refs)."""
    accepted = 0

    def count(stream: Iterable[Any]) -> Iterator[Any]:
        nonlocal accepted
        for ref in stream:
            accepted += 1
            yield ref

    records = [{"kind": t.kind, "model": t.model, "params": t.params.canonical(), "params_hash": t.params.digest()}
               for t in tasks]
    per_message = refs_per_message or settings.refs_per_message
    try:
        job = store.create_job(
            tasks=records, refs=count(refs), queue=settings.queue,
            priority=settings.priority if priority is None else priority,
            tenant=tenant or settings.tenant, refs_per_message=refs_per_message, in_transaction=in_transaction,
            copy_streams=settings.copy_streams, before_commit=before_commit,
        )
    except EmptyJob:
        raise RefRefused("no image references to enqueue") from None
    feeder = Feeder.from_settings(settings, admin=Admin(store.engine), app=app, per_message=per_message)
    try:
        report = feeder.feed(job=job, wait_s=FEED_LOCK_WAIT_S, max_messages=PRODUCER_MESSAGES)
    except Exception as exc:
        # The job is accepted (committed); only its transport failed, and the marks rolled back:
        # every item is still waiting in Postgres for the feeder (or `imgq reconcile`).
        return Submitted(job=job, items=accepted, messages=0, rejected=rejected or [],
                         publish_error=f"{type(exc).__name__}: {exc}")
    finally:
        feeder.stop()
    return Submitted(job=job, items=accepted, messages=report.messages if report else 0,
                     published=report.items if report else 0, rejected=rejected or [], feeder_busy=report is None,
                     memory_held=bool(report and report.held))
