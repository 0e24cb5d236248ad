"""Accept a job: validate, commit job + items in Postgres, then publish messages to Redis.

Acceptance is durable before anything is published: a producer that dies between the two
leaves ``queued`` items that the reconciler re-publishes; it never loses them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from imgq.config import Settings
from imgq.contract import CaptionParams
from imgq.db.store import Store
from imgq.errors import RefRefused
from imgq.producer.expand import expand
from imgq.publish import chunk_messages, publish


@dataclass(frozen=True, slots=True)
class Submitted:
    job: uuid.UUID
    items: int
    messages: int
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (ref, reason)


def collect_refs(
    raw_refs: Iterable[str], settings: Settings, *, skip_invalid: bool, s3_client: Any = None
) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand and validate refs. With ``skip_invalid`` bad refs are returned, else the first raises."""
    accepted: list[str] = []
    rejected: list[tuple[str, str]] = []
    for raw in raw_refs:
        try:
            accepted.extend(expand([raw], settings, s3_client))
        except RefRefused as exc:
            if not skip_invalid:
                raise
            rejected.append((raw, exc.message))
    return accepted, rejected


def submit(
    *,
    settings: Settings,
    store: Store,
    app: Celery,
    refs: Sequence[str],
    params: CaptionParams,
    refs_per_message: int | None = None,
    rejected: list[tuple[str, str]] | None = None,
) -> Submitted:
    if not refs:
        raise RefRefused("no image references to enqueue")
    job = store.create_job(kind="caption", model=settings.caption_model, params=params.canonical(),
                           params_hash=params.digest(), refs=refs)
    messages = chunk_messages(job=str(job), model=settings.caption_model, params=params,
                              items=list(enumerate(refs)), per_message=refs_per_message or settings.refs_per_message)
    sent = publish(app, messages, queue=settings.queue)
    return Submitted(job=job, items=len(refs), messages=sent, rejected=rejected or [])
