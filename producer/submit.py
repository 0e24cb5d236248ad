"""Accept a job: validate, commit job + items in Postgres, then publish messages to Redis.

Acceptance is durable before anything is published: a producer that dies between the two
leaves ``queued`` items that the reconciler re-publishes; it never loses them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from imgq.config import Settings
from imgq.contract import TaskSpec
from imgq.db.store import EmptyJob, Store
from imgq.errors import RefRefused
from imgq.producer.expand import Expander
from imgq.publish import chunk_messages, publish


@dataclass(frozen=True, slots=True)
class Submitted:
    job: uuid.UUID
    items: int
    messages: int
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (ref, reason)
    publish_error: str | None = None  # the job is committed but its messages were not all sent


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
    for raw in raw_refs:
        try:
            yield from expand_one(raw)
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
) -> Submitted:
    """Accept ``refs`` (or ``(ref, text)`` pairs; validated while they are copied into Postgres),
    then publish them with every task."""
    accepted: list[Any] = []

    def keep(stream: Iterable[Any]) -> Iterator[Any]:
        for ref in stream:
            accepted.append(ref)
            yield ref

    records = [{"kind": t.kind, "model": t.model, "params": t.params.canonical(), "params_hash": t.params.digest()}
               for t in tasks]
    try:
        job = store.create_job(tasks=records, refs=keep(refs))
    except EmptyJob:
        raise RefRefused("no image references to enqueue") from None
    items = [(seq, *ref) if isinstance(ref, tuple) else (seq, ref) for seq, ref in enumerate(accepted)]
    messages = chunk_messages(job=str(job), tasks=tasks, items=items,
                              per_message=refs_per_message or settings.refs_per_message)
    try:
        sent = publish(app, messages, queue=settings.queue)
    except Exception as exc:
        # The job is accepted (committed); only its transport failed. Nothing is lost: the
        # reconciler publishes queued items once they are old enough (or `imgq reconcile`).
        return Submitted(job=job, items=len(accepted), messages=0, rejected=rejected or [],
                         publish_error=f"{type(exc).__name__}: {exc}")
    return Submitted(job=job, items=len(accepted), messages=sent, rejected=rejected or [])
