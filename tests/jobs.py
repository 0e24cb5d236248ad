"""Jobs built the way the producer builds them, for tests that publish or create jobs by hand."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from imgq.contract import CaptionParams, TaskMessage, TaskSpec, make_task


def caption_task(model: str, params: CaptionParams | None = None) -> TaskSpec:
    return make_task("caption", model, params or CaptionParams())


def record(task: TaskSpec) -> dict[str, Any]:
    """The ``jobs.tasks`` entry of a task, as ``producer.submit`` stores it."""
    return {"kind": task.kind, "model": task.model, "params": task.params.canonical(),
            "params_hash": task.params.digest()}


def create_job(store: Any, tasks: Sequence[TaskSpec], refs: Iterable[Any], *, published: bool = False) -> uuid.UUID:
    """``published``: the test publishes the job's messages itself, so a worker's feeder must not
    take its items as a backlog waiting in Postgres (it would publish them once more)."""
    job = store.create_job(tasks=[record(t) for t in tasks], refs=refs)
    if published:
        from sqlalchemy import text

        with store.engine.begin() as conn:
            conn.execute(text("UPDATE job_items SET published_at = now() WHERE job_id = :j"), {"j": job})
    return job


def message(job: uuid.UUID | str, tasks: Sequence[TaskSpec], refs: Sequence[Any]) -> TaskMessage:
    items = [(seq, *ref) if isinstance(ref, tuple) else (seq, ref) for seq, ref in enumerate(refs)]
    return TaskMessage(job=str(job), tasks=list(tasks), items=items)
