"""What one broker message does, independent of Celery: claim, process, settle every item.

An item leaves here in exactly one of three ways: a committed result, a committed dead letter,
or a re-published retry message (its state set back to ``queued``). Only then may the message
be acknowledged.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from imgq import errors
from imgq.contract import TaskMessage
from imgq.db.store import DeadRow, Store
from imgq.retry import RetryPolicy, decide
from imgq.worker.engine import Engine, Outcome

log = logging.getLogger(__name__)

Publish = Callable[[Iterable[TaskMessage], float], Any]


@dataclass(frozen=True, slots=True)
class Summary:
    done: int = 0
    dead: int = 0
    retried: int = 0
    skipped: int = 0  # already final: a duplicate delivery

    def as_dict(self) -> dict[str, int]:
        return {"done": self.done, "dead": self.dead, "retried": self.retried, "skipped": self.skipped}


def _salvage(payload: Any) -> tuple[uuid.UUID, list[int]] | None:
    """Job and item numbers of a malformed message, so its items can be dead-lettered."""
    try:
        job = uuid.UUID(str(payload["job"]))
        return job, [int(pair[0]) for pair in payload["items"]]
    except Exception:
        return None


class MessageService:
    def __init__(
        self, *, store: Store, engine: Engine, policy: RetryPolicy, publish: Publish, time_limit_s: float = 600
    ) -> None:
        self._store = store
        self._engine = engine
        self._policy = policy
        self._publish = publish
        self._time_limit_s = time_limit_s

    def handle(self, payload: Any) -> Summary:
        try:
            msg = TaskMessage.model_validate(payload)
        except ValidationError as exc:
            return self._bad_message(payload, exc)
        job = uuid.UUID(msg.job)
        seqs = [seq for seq, _ in msg.items]
        attempts = self._store.claim(job, seqs, self._engine.worker_name)
        todo = [(seq, ref) for seq, ref in msg.items if seq in attempts]
        # An item seen more often than allowed has been killing workers (or its messages
        # keep getting lost): stop here instead of looping forever.
        worn = [(seq, ref) for seq, ref in todo if attempts[seq] > self._policy.max_attempts]
        fresh = [(seq, ref) for seq, ref in todo if attempts[seq] <= self._policy.max_attempts]
        if worn:
            self._store.write_dead([
                DeadRow(job, seq, "too_many_attempts",
                        f"delivered {attempts[seq]} times without finishing (worker crashes?)",
                        self._engine.worker_name)
                for seq, _ in worn
            ])
        if len(fresh) > 1 and any(attempts[seq] > 1 for seq, _ in fresh):
            # A redelivery: the last worker may have died on one of these items. Alone, a poison
            # item can only take itself down, and its batchmates finish on their own.
            self._publish([msg.model_copy(update={"items": [pair]}) for pair in fresh], 0.0)
            self._store.release(job, [seq for seq, _ in fresh])
            return Summary(dead=len(worn), retried=len(fresh), skipped=len(msg.items) - len(todo))
        work = self._engine.submit(job, msg.params, fresh)
        deadline = time.monotonic() + self._time_limit_s
        # Raises TimeoutError past the limit: the task then hands the message back unacknowledged.
        outcomes: list[Outcome] = [item.future.result(max(0.0, deadline - time.monotonic())) for item in work]
        retried, gave_up = self._settle_retries(msg, job, outcomes, attempts)
        return Summary(
            done=sum(o.state == "done" for o in outcomes),
            dead=sum(o.state == "dead" for o in outcomes) + len(worn) + gave_up,
            retried=retried,
            skipped=len(msg.items) - len(todo),
        )

    def _settle_retries(
        self, msg: TaskMessage, job: uuid.UUID, outcomes: list[Outcome], attempts: dict[int, int]
    ) -> tuple[int, int]:
        refs = dict(msg.items)
        again: list[tuple[int, str]] = []
        dead: list[DeadRow] = []
        delay = 0.0
        for outcome in outcomes:
            if outcome.state != "retry":
                continue
            decision = decide(self._policy, retryable=True, attempts=attempts[outcome.seq])
            if decision.action == "dead":
                dead.append(DeadRow(job, outcome.seq, outcome.code or "transient",
                                    f"gave up after {attempts[outcome.seq]} attempts: {outcome.message}",
                                    self._engine.worker_name))
            else:
                again.append((outcome.seq, refs[outcome.seq]))
                delay = max(delay, decision.delay_s)
        if again:
            self._publish([msg.model_copy(update={"items": again})], delay)
            self._store.release(job, [seq for seq, _ in again])
        self._store.write_dead(dead)
        return len(again), len(dead)

    def _bad_message(self, payload: Any, exc: ValidationError) -> Summary:
        salvaged = _salvage(payload)
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        if salvaged is None:
            log.error("dropping unidentifiable message (no job/items): %s", detail)
            return Summary()
        job, seqs = salvaged
        self._store.claim(job, seqs, self._engine.worker_name)
        error = errors.Permanent(f"malformed message: {detail}")
        self._store.write_dead([DeadRow(job, seq, "bad_message", error.message, self._engine.worker_name)
                                for seq in seqs])
        return Summary(dead=len(seqs))
