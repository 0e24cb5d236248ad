"""What one broker message does, independent of Celery: claim, process, settle every item.

The job's record in Postgres decides what an item is (its ref, its text, the job's kinds, models
and parameters); a message only points at items by (job, seq). A message that disagrees with the
record is logged and its items are processed as recorded, so a forged or stale message can waste
work but never change a result or another job's items.

An item leaves here in exactly one of three ways: a committed result, a committed dead letter,
or a re-published retry message (its state set back to ``queued``). Only then may the message
be acknowledged. A message that names nothing identifiable is dropped with one error line.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from imgq import errors, metrics
from imgq.contract import TaskMessage, TaskSpec
from imgq.ports import DeadRow, ItemStore, Publisher
from imgq.publish import tasks_from_record
from imgq.retry import RetryPolicy, decide
from imgq.worker.engine import Engine, Outcome, WorkItem
from imgq.worker.quarantine import Quarantine

log = logging.getLogger(__name__)

_MAX_SEQ = 2**31 - 1  # job_items.seq is a Postgres integer


@dataclass(frozen=True, slots=True)
class Summary:
    done: int = 0
    dead: int = 0
    retried: int = 0
    skipped: int = 0  # already final, not in the job, or joined an in-flight duplicate
    dropped: int = 0  # messages that named no identifiable item

    def as_dict(self) -> dict[str, int]:
        return {"done": self.done, "dead": self.dead, "retried": self.retried, "skipped": self.skipped,
                "dropped": self.dropped}


def pointer(payload: Any) -> tuple[uuid.UUID, list[int]] | None:
    """The (job, seqs) a message points at, whatever else is wrong with it; None if it names none.
    Pure: seqs outside Postgres' integer range or not integers are left out."""
    try:
        job = uuid.UUID(str(payload["job"]))
        raw = payload["items"]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    seqs: list[int] = []
    for item in raw if isinstance(raw, list) else []:
        first = item[0] if isinstance(item, list | tuple) and item else None
        if isinstance(first, int) and not isinstance(first, bool) and 0 <= first <= _MAX_SEQ:
            seqs.append(first)
    return (job, list(dict.fromkeys(seqs))) if seqs else None


@dataclass(frozen=True, slots=True)
class _Orphan:
    """An item whose handler stopped waiting for it (its time limit): a handler that joins it settles it."""

    work: WorkItem
    item: tuple[Any, ...]  # as that handler claimed it: (seq, ref) or (seq, ref, text)
    attempts: int


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
        self._jobs: OrderedDict[uuid.UUID, list[TaskSpec] | errors.ImgqError] = OrderedDict()
        self.dropped = 0
        # A handler past its time limit gives its message back unsettled; the delivery that joins its
        # items (that message again, or a duplicate) settles them as it would have. An orphan is kept
        # (by id: a WorkItem is not hashable) while a handler waits for it or one can still join it.
        self._lock = threading.Lock()
        self._orphans: dict[int, _Orphan] = {}
        self._joins: Counter[int] = Counter()  # id(item) -> handlers that joined it and are not done
        # Items a handler has looked up and not yet handed to the engine (or let go of): a duplicate
        # delivery waits for that handler, then joins what it submitted, instead of claiming the item
        # a second time (an extra attempt, and "running" by then: a crash suspect, run alone).
        self._claiming: dict[tuple[uuid.UUID, int], threading.Event] = {}

    def handle(self, payload: Any) -> Summary:
        found = pointer(payload)
        if found is None:
            return self._drop("names no job and item", payload)
        job, seqs = found
        try:
            msg: TaskMessage | None = TaskMessage.model_validate(payload)
        except ValidationError as exc:
            msg = None
            # Text for the log line below only.
            detail = "; ".join(  # pragma: no mutate
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])  # pragma: no mutate
            log.warning("malformed message for job %s (%s); its items are processed as recorded", job, detail,
                        extra={"action": "malformed_message", "job_id": str(job)})
        tasks = self._tasks(job)
        if tasks is None:
            return self._drop(f"names job {job}, which does not exist", payload)
        if isinstance(tasks, errors.ImgqError):
            return self._refuse(job, seqs, errors.Permanent(tasks.message), "bad_message")
        if msg is not None and msg.tasks != tasks:
            log.warning("message for job %s disagrees with the job's tasks; using the record", job,
                        extra={"action": "message_disagrees", "job_id": str(job)})
        unserved = [t for t in tasks if not self._engine.serves(t)]
        if unserved:
            return self._refuse(job, seqs, None, "wrong_model", unserved)
        return self._process(job, seqs, tasks, msg)

    # -- the normal path ---------------------------------------------------------------------
    def _process(self, job: uuid.UUID, seqs: list[int], tasks: list[TaskSpec], msg: TaskMessage | None) -> Summary:
        # Items this process is already working on (a duplicate or requeued message) are awaited,
        # not claimed again: a duplicate costs neither an attempt nor a second inference.
        joined, mine = self._reserve(job, seqs)
        pending = [s for s in seqs if s not in joined]
        try:
            # Crash suspects are looked at before anything is claimed: an attempt is charged only to
            # an item that is about to run, not to one that waits for the quarantine or is split off.
            suspects = self._store.unsettled(job, pending) if pending else set()
            if suspects and len(pending) > 1:
                # The last worker died holding these items; one of them may be why. Each goes out
                # again on its own, so a poison item cannot take its batchmates down with it. So does
                # each orphan joined here (not awaited here): its next delivery joins and settles it.
                records = self._store.records(job, pending)
                with self._lock:
                    orphans = [o.item for w in joined.values() if (o := self._orphans.get(id(w))) is not None]
                items = [records[s] for s in pending if s in records] + orphans
                self._publish([TaskMessage(job=str(job), tasks=tasks, items=[item]) for item in items], 0.0)
                return Summary(retried=len(items), skipped=len(seqs) - len(items))
            with self._quarantine.exclusive() if suspects else self._quarantine.shared():
                return self._run(job, seqs, pending, joined, tasks, msg, lambda: self._let_go(job, pending, mine))
        finally:
            self._let_go(job, pending, mine)
            with self._lock:
                for work in joined.values():
                    self._joins[id(work)] -= 1
                    if not self._joins[id(work)]:
                        del self._joins[id(work)]
            for work in joined.values():
                self._prune(work)

    def _reserve(self, job: uuid.UUID, seqs: list[int]) -> tuple[dict[int, WorkItem], threading.Event]:
        """The items another handler already runs (joined), after waiting for any handler still
        between its lookup and its submit; the rest are reserved for this one until ``_let_go``."""
        while True:
            with self._lock:
                joined = self._engine.in_flight(job, seqs)
                busy = {e for s in seqs if s not in joined and (e := self._claiming.get((job, s))) is not None}
                if not busy:
                    mine = threading.Event()
                    self._claiming.update({(job, s): mine for s in seqs if s not in joined})
                    self._joins.update(id(work) for work in joined.values())
                    return joined, mine
            for event in busy:
                event.wait()

    def _let_go(self, job: uuid.UUID, seqs: list[int], mine: threading.Event) -> None:
        if mine.is_set():
            return
        with self._lock:
            for seq in seqs:
                if self._claiming.get((job, seq)) is mine:
                    del self._claiming[(job, seq)]
        mine.set()

    def _run(self, job: uuid.UUID, seqs: list[int], pending: list[int], joined: dict[int, Any],
             tasks: list[TaskSpec], msg: TaskMessage | None, submitted: Callable[[], None]) -> Summary:
        claims = self._store.claim(job, pending, self._engine.worker_name) if pending else {}
        todo = [claims[s].item(s) for s in seqs if s in claims]
        if msg is not None:
            given = {item[0]: tuple(item) for item in msg.items}
            differ = sum(given.get(item[0]) != tuple(item) for item in todo)
            if differ:
                log.warning("message for job %s names %d items unlike the record; processing the record", job,
                            differ, extra={"action": "message_disagrees", "job_id": str(job)})
        # An item delivered more often than allowed has been killing workers (or its messages
        # keep getting lost): stop here instead of looping forever.
        worn = [item for item in todo if claims[item[0]].attempts > self._policy.max_attempts]
        fresh = [item for item in todo if claims[item[0]].attempts <= self._policy.max_attempts]
        skipped = len(seqs) - len(todo) - len(joined)
        if worn:
            self._dead_letter([
                DeadRow(job, item[0], "too_many_attempts",
                        f"delivered {claims[item[0]].attempts} times without settling (it may crash workers)",
                        self._engine.worker_name)
                for item in worn
            ])
        work = self._engine.submit(job, tasks, fresh) + list(joined.values())
        submitted()  # a duplicate delivery now finds these in flight and joins them
        deadline = time.monotonic() + self._time_limit_s
        try:
            # Past the limit this raises TimeoutError: the message goes back unacknowledged.
            outcomes = [item.future.result(max(0.0, deadline - time.monotonic())) for item in work]
        except TimeoutError:
            # Its own items are settled by a delivery that joins them (what it joined stays with their owners).
            submitted = work[: len(fresh)]
            with self._lock:
                for item, mine in zip(fresh, submitted, strict=True):
                    self._orphans[id(mine)] = _Orphan(mine, tuple(item), claims[item[0]].attempts)
            for mine in submitted:
                mine.future.add_done_callback(lambda _f, w=mine: self._prune(w))
            raise
        # Joined items whose handler gave up are this message's to settle: it took that one's place.
        with self._lock:
            adopted = [o for w in joined.values() if (o := self._orphans.pop(id(w), None)) is not None]
        own = outcomes[: len(fresh)] + [o.work.future.result() for o in adopted]
        attempts = {s: c.attempts for s, c in claims.items()} | {o.item[0]: o.attempts for o in adopted}
        retried, gave_up = self._settle_retries(job, tasks, fresh + [o.item for o in adopted], own, attempts)
        return Summary(
            done=sum(o.state == "done" for o in own),
            dead=sum(o.state == "dead" for o in own) + len(worn) + gave_up,
            retried=retried,
            skipped=skipped + len(joined) - len(adopted),
        )

    def _prune(self, work: WorkItem) -> None:
        """Forget an orphan that no handler waits for and none can join any more (it left the engine)."""
        with self._lock:
            if (id(work) in self._orphans and id(work) not in self._joins
                    and self._engine.in_flight(work.job, [work.seq]).get(work.seq) is not work):
                del self._orphans[id(work)]

    def _settle_retries(
        self, job: uuid.UUID, tasks: list[TaskSpec], items: list[Any], outcomes: list[Outcome],
        attempts: dict[int, int],
    ) -> tuple[int, int]:
        by_seq = {item[0]: item for item in items}
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
            self._publish([TaskMessage(job=str(job), tasks=tasks, items=again)], delay)
            # Counted here, not by the publisher: a crash suspect sent again on its own failed nothing.
            metrics.RETRIES.inc(len(again))
            self._store.release(job, [item[0] for item in again])
        # Not _dead_letter: the engine counted each of these failures when the attempt failed.
        self._store.write_dead(dead)
        return len(again), len(dead)

    def _dead_letter(self, rows: list[DeadRow]) -> None:
        """Dead letters decided here, not by the engine (which counts its own failures): counted once
        written, since a write that raises leaves the message to be delivered and refused again."""
        self._store.write_dead(rows)
        metrics.count_failures(row.code for row in rows)

    # -- the job record -------------------------------------------------------------------------
    def _tasks(self, job: uuid.UUID) -> list[TaskSpec] | errors.ImgqError | None:
        """The job's tasks as recorded (cached: a job's tasks never change); None: no such job;
        an error: a record this worker cannot read (a kind it does not know, say)."""
        if job in self._jobs:
            self._jobs.move_to_end(job)
            return self._jobs[job]
        record = self._store.job_tasks(job)
        if record is None:
            return None
        try:
            tasks: list[TaskSpec] | errors.ImgqError = tasks_from_record(record)
        except (errors.ImgqError, KeyError, TypeError, ValidationError) as exc:
            tasks = errors.Permanent(f"job record unreadable by this worker: {exc}")
        self._jobs[job] = tasks
        # The cache's size and eviction order cost lookups, never results.
        if len(self._jobs) > 4096:  # pragma: no mutate
            self._jobs.popitem(last=False)  # pragma: no mutate
        return tasks

    # -- messages that cannot be processed -----------------------------------------------------------
    def _drop(self, why: str, payload: Any) -> Summary:
        self.dropped += 1
        shown = repr(payload)[:200]
        log.error("dropping message that %s: %s", why, shown, extra={"action": "drop_message"})
        return Summary(dropped=1)

    def _refuse(self, job: uuid.UUID, seqs: list[int], error: errors.ImgqError | None, code: str,
                unserved: list[TaskSpec] | None = None) -> Summary:
        if code == "wrong_model":
            # Dead-lettered, not requeued: on a shared queue a requeue could circle for ever when no
            # worker serves the model. `imgq dlq retry --code wrong_model` sends them again once one does.
            served = ", ".join(f"{kind} ({runner.name})" for kind, runner in self._engine.runners.items())
            asked = ", ".join(f"{t.kind} ({t.model})" for t in unserved or [])
            message = (f"this worker serves {served or 'nothing'}; the job asks for {asked}. Start a worker with "
                       "that IMGQ_KINDS and model (or on its own IMGQ_QUEUE), then "
                       "`imgq dlq retry --code wrong_model`")
        else:
            message = error.message if error is not None else code
        log.error("refusing message of job %s: %s", job, message, extra={"action": code, "job_id": str(job)})
        claims = self._store.claim(job, seqs, self._engine.worker_name, leave_peers=True)
        self._dead_letter([DeadRow(job, seq, code, message, self._engine.worker_name) for seq in claims])
        return Summary(dead=len(claims), skipped=len(seqs) - len(claims))

    def give_up(self, payload: Any, exc: BaseException) -> Summary:
        """After an unexpected error (a bug, not an outage): dead-letter what the message names
        (``internal_error``), so it can be retried once fixed, instead of requeueing it for ever."""
        found = pointer(payload)
        if found is None or self._store.job_tasks(found[0]) is None:
            return self._drop(f"failed with {type(exc).__name__}: {exc}", payload)
        job, seqs = found
        error = errors.Permanent(f"internal error while processing: {type(exc).__name__}: {str(exc)[:300]}")
        return self._refuse(job, seqs, error, "internal_error")
