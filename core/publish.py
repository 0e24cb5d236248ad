"""Chunk accepted items into broker messages and publish them.

Who publishes: the feeder (worker/feeder.py) publishes the backlog into the bounded window, and
`imgq enqueue` its first window, through :func:`publish`; the heartbeat reaper re-publishes a dead
worker's running items and the worker its retries directly (bounded by what was in flight).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from celery import Celery

from imgq import errors
from imgq.contract import TASK_NAME, TaskMessage, TaskSpec, make_task, tasks_conflict
from imgq.feeding import TOP_LANE, lane
from imgq.kinds import spec


def chunk_messages(
    *, job: str, tasks: Sequence[TaskSpec], items: Sequence[Any], per_message: int
) -> Iterator[TaskMessage]:
    """Messages of at most ``per_message`` items each, the last one partial; every item once."""
    for start in range(0, len(items), per_message):
        yield TaskMessage(job=job, tasks=list(tasks), items=list(items[start : start + per_message]))


def tasks_from_record(records: Sequence[dict[str, Any]]) -> list[TaskSpec]:
    """A job's stored ``tasks`` column back into message tasks (params validated again; a job
    recorded before a combination was refused is refused here: its items become ``bad_message``)."""
    tasks = [make_task(r["kind"], r["model"], spec(r["kind"]).parse(r["params"])) for r in records]
    conflict = tasks_conflict(tasks)
    if conflict is not None:
        raise errors.BadParams(conflict)
    return tasks


# Redis commands per pipelined round trip (kombu's Producer.batch; one LPUSH per message).
PIPELINE = 1000


def publish(
    app: Celery, messages: Iterable[TaskMessage], *, queue: str, countdown: float | None = None,
    lane: int | Mapping[str, int] = TOP_LANE,
) -> int:
    """Publish over one pooled connection, pipelined; returns the number of messages handed over.

    ``lane`` is the broker lane (``imgq.feeding.lane`` of the job's priority; a kombu priority)
    of every message, or of each message's job, by job id: a retry or a re-published item goes
    back to its job's lane.

    kombu's ``Producer.batch`` sends up to ``PIPELINE`` LPUSHes per round trip, and without it the
    Redis transport builds a client per message: x2.47 the publish rate at 16 refs per message
    (docs/performance.md). A failed flush raises; some messages of the batch may have been
    delivered. That is safe: Postgres holds the job, duplicates are idempotent, and the feeder
    rolls back its marks (its cycle is one transaction) or finds the lost items later.
    """
    sent = 0
    with app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE):
        for message in messages:
            body = message.to_json()
            app.send_task(
                TASK_NAME, kwargs={"msg": body}, queue=queue, countdown=countdown, producer=producer,
                priority=lane if isinstance(lane, int) else lane.get(message.job, TOP_LANE),
                # What Flower and the logs show: the job, its kinds and the item count. Celery would
                # otherwise build a saferepr of every body: about 40% of publish time at 16 refs.
                argsrepr="()", kwargsrepr=f"{{'msg': <job {message.job}, "
                f"{','.join(t.kind for t in message.tasks)}, {len(message.items)} items>}}",
            )
            sent += 1
    return sent


def delivered_lane(app: Celery) -> int:
    """The lane of the message the calling thread is handling (its delivery priority), where a
    worker's retries of its items go back; the top lane outside a task."""
    task = app.current_task
    info = (getattr(task.request, "delivery_info", None) or {}) if task is not None else {}
    return int(info.get("priority") or TOP_LANE)


def republish(app: Celery, batches: Iterable[Any], *, queue: str, per_message: int) -> int:
    """Publish items again (a dead worker's running items) with every task of their job, each to
    its job's queue (``queue`` for a batch that names none); ``batches`` are ``db.admin.Republish``.
    A reaper takes the orphans of every queue: a fleet's queue is where workers that serve its
    kinds listen, and another fleet's workers would dead-letter them as wrong_model."""
    by_queue: dict[str, tuple[list[TaskMessage], dict[str, int]]] = {}
    for batch in batches:
        messages, lanes = by_queue.setdefault(getattr(batch, "queue", None) or queue, ([], {}))
        messages += chunk_messages(job=str(batch.job), tasks=tasks_from_record(batch.tasks), items=batch.items,
                                   per_message=per_message)
        lanes[str(batch.job)] = lane(getattr(batch, "priority", 0))
    return sum(publish(app, messages, queue=name, lane=lanes) for name, (messages, lanes) in by_queue.items())
