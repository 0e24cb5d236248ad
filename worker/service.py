"""What one broker message does, independent of Celery: claim, process, settle every item.

An item leaves here in exactly one of three ways: a committed result, a committed dead letter,
or a re-published retry message (its state set back to ``queued``). Only then may the message
be acknowledged.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from imgq import errors
from imgq.contract import TaskMessage
from imgq.ports import DeadRow, ItemStore, Publisher
from imgq.retry import RetryPolicy, decide
from imgq.worker.engine import Engine, Outcome
from imgq.worker.quarantine import Quarantine

log = logging.getLogger(__name__)


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
    """Settles every item of one message: claim, process (or refuse), retry or dead-letter."""

    def __init__(
        self, *, store: ItemStore, engine: Engine, policy: RetryPolicy, publish: Publisher,
        time_limit_s: float = 600,
    ) -> None:
        self._store = store
        self._engine = engine
        self._policy = policy
        self._publish = publish
        self._time_limit_s = time_limit_s
        self._quarantine = Quarantine()

    def handle(self, payload: Any) -> Summary:
        try:
            msg = TaskMessage.model_validate(payload)
        except ValidationError as exc:
            return self._bad_message(payload, exc)
        job = uuid.UUID(msg.job)
        unserved = [t for t in msg.tasks if not self._engine.serves(t)]
        if unserved:
            return self._wrong_model(msg, job, unserved)
        # Items this process is already working on (a duplicate or requeued message) are awaited,
        # not claimed again: a duplicate costs neither an attempt nor a second inference.
        joined = self._engine.in_flight(job, [item[0] for item in msg.items])
        claims = self._store.claim(job, [item[0] for item in msg.items if item[0] not in joined],
                                  self._engine.worker_name)
        todo = [item for item in msg.items if item[0] in claims]
        # An item delivered more often than allowed has been killing workers (or its messages
        # keep getting lost): stop here instead of looping forever.
        worn = [item for item in todo if claims[item[0]].attempts > self._policy.max_attempts]
        fresh = [item for item in todo if claims[item[0]].attempts <= self._policy.max_attempts]
        skipped = len(msg.items) - len(todo) - len(joined)
        if worn:
            self._store.write_dead([
                DeadRow(job, seq, "too_many_attempts",
                        f"delivered {claims[seq].attempts} times without settling (it may crash workers)",
                        self._engine.worker_name)
                for seq, *_ in worn
            ])
        suspects = [pair for pair in fresh if claims[pair[0]].unsettled]
        if suspects and len(fresh) > 1:
            # The last worker died holding these items; one of them may be why. Each goes out
            # again on its own, so a poison item cannot take its batchmates down with it.
            self._store.unclaim(job, [item[0] for item in fresh])
            self._publish([msg.model_copy(update={"items": [pair]}) for pair in fresh], 0.0)
            return Summary(dead=len(worn), retried=len(fresh), skipped=skipped)
        with self._quarantine.exclusive() if suspects else self._quarantine.shared():
            work = self._engine.submit(job, msg.tasks, fresh) + list(joined.values())
            deadline = time.monotonic() + self._time_limit_s
            # Past the limit this raises TimeoutError: the message goes back unacknowledged.
            outcomes = [item.future.result(max(0.0, deadline - time.monotonic())) for item in work]
        own = outcomes[: len(fresh)]
        retried, gave_up = self._settle_retries(msg, job, own, {s: c.attempts for s, c in claims.items()})
        return Summary(
            done=sum(o.state == "done" for o in own),
            dead=sum(o.state == "dead" for o in own) + len(worn) + gave_up,
            retried=retried,
            skipped=skipped + len(joined),
        )

    def _settle_retries(
        self, msg: TaskMessage, job: uuid.UUID, outcomes: list[Outcome], attempts: dict[int, int]
    ) -> tuple[int, int]:
        by_seq = {item[0]: item for item in msg.items}
        again: list[Any] = []
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
                again.append(by_seq[outcome.seq])
                delay = max(delay, decision.delay_s)
        if again:
            self._publish([msg.model_copy(update={"items": again})], delay)
            self._store.release(job, [item[0] for item in again])
        self._store.write_dead(dead)
        return len(again), len(dead)

    def _wrong_model(self, msg: TaskMessage, job: uuid.UUID, unserved: list[Any]) -> Summary:
        # Dead-lettered, not requeued: on a shared queue a requeue could circle for ever when no
        # worker serves the model. `imgq dlq retry --code wrong_model` sends them again once one does.
        served = ", ".join(f"{kind} ({runner.name})" for kind, runner in self._engine.runners.items())
        asked = ", ".join(f"{t.kind} ({t.model})" for t in unserved)
        message = (f"this worker serves {served or 'nothing'}; the job asks for {asked}. Start a worker with "
                   "that IMGQ_KINDS and model (or on its own IMGQ_QUEUE), then `imgq dlq retry --code wrong_model`")
        log.error("refusing message of job %s: %s", job, message, extra={"action": "wrong_model", "job_id": str(job)})
        seqs = [item[0] for item in msg.items]
        claims = self._store.claim(job, seqs, self._engine.worker_name)
        self._store.write_dead([DeadRow(job, seq, errors.WrongModel.code, message, self._engine.worker_name)
                                for seq in seqs if seq in claims])
        return Summary(dead=len(claims), skipped=len(seqs) - len(claims))

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
