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
from imgq.worker.quarantine import Quarantine

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
        self._quarantine = Quarantine()

    def handle(self, payload: Any) -> Summary:
        try:
            msg = TaskMessage.model_validate(payload)
        except ValidationError as exc:
            return self._bad_message(payload, exc)
        job = uuid.UUID(msg.job)
        # Items this process is already working on (a duplicate or requeued message) are awaited,
        # not claimed again: a duplicate costs neither an attempt nor a second inference.
        joined = self._engine.in_flight(job, [seq for seq, _ in msg.items])
        claims = self._store.claim(job, [seq for seq, _ in msg.items if seq not in joined], self._engine.worker_name)
        todo = [(seq, ref) for seq, ref in msg.items if seq in claims]
        # An item delivered more often than allowed has been killing workers (or its messages
        # keep getting lost): stop here instead of looping forever.
        worn = [(seq, ref) for seq, ref in todo if claims[seq].attempts > self._policy.max_attempts]
        fresh = [(seq, ref) for seq, ref in todo if claims[seq].attempts <= self._policy.max_attempts]
        skipped = len(msg.items) - len(todo) - len(joined)
        if worn:
            self._store.write_dead([
                DeadRow(job, seq, "too_many_attempts",
                        f"delivered {claims[seq].attempts} times without settling (it may crash workers)",
                        self._engine.worker_name)
                for seq, _ in worn
            ])
        suspects = [pair for pair in fresh if claims[pair[0]].unsettled]
        if suspects and len(fresh) > 1:
            # The last worker died holding these items; one of them may be why. Each goes out
            # again on its own, so a poison item cannot take its batchmates down with it.
            self._store.unclaim(job, [seq for seq, _ in fresh])
            self._publish([msg.model_copy(update={"items": [pair]}) for pair in fresh], 0.0)
            return Summary(dead=len(worn), retried=len(fresh), skipped=skipped)
        with self._quarantine.exclusive() if suspects else self._quarantine.shared():
            work = self._engine.submit(job, msg.params, fresh) + list(joined.values())
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
