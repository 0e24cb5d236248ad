"""A handler past its time limit gives its message back (TimeoutError -> Reject(requeue)); the
redelivery reaches the same worker and joins the items still in the engine. If one of them then
fails transiently, the joiner settles it as the handler that gave up would have: one retry message,
one release. An item whose own handler still waits is left to that handler (no second retry).

With in-memory fakes and the real Engine; the fetch holds every item at a gate, then fails it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from imgq import errors
from imgq.contract import CaptionParams, TaskMessage, make_task
from imgq.ports import Blob, Claim
from imgq.retry import RetryPolicy
from imgq.worker.engine import Engine
from imgq.worker.fakes import EchoRunner, MemoryResults
from imgq.worker.service import MessageService, Summary
from tests.unit.test_engine import decode
from tests.waits import SETTLE_S

TASKS = [make_task("caption", "echo", CaptionParams())]


class Items(MemoryResults):
    """One job's items as Postgres keeps them: queued or running, with attempts, released by a retry."""

    def __init__(self) -> None:
        super().__init__()
        self.state: dict[int, str] = {}
        self.attempts: dict[int, int] = {}
        self.released: list[int] = []

    def job_tasks(self, job: uuid.UUID) -> list[dict[str, object]]:
        return [{"kind": t.kind, "model": t.model, "params": t.params.model_dump(mode="json")} for t in TASKS]

    def claim(self, job: uuid.UUID, seqs: Sequence[int], worker: str, *, leave_peers: bool = False) -> dict[int, Claim]:
        claims = {}
        for seq in seqs:
            unsettled = self.state.get(seq) == "running"
            self.state[seq] = "running"
            self.attempts[seq] = self.attempts.get(seq, 0) + 1
            claims[seq] = Claim(self.attempts[seq], unsettled, f"img-{seq}")
        return claims

    def unsettled(self, job: uuid.UUID, seqs: Sequence[int]) -> set[int]:
        return {s for s in seqs if self.state.get(s) == "running"}

    def records(self, job: uuid.UUID, seqs: Sequence[int]) -> dict[int, tuple[Any, ...]]:
        return {s: (s, f"img-{s}") for s in seqs if self.state.get(s, "queued") in ("queued", "running")}

    def release(self, job: uuid.UUID, seqs: Sequence[int]) -> None:
        for seq in seqs:
            if self.state.get(seq) == "running":
                self.state[seq] = "queued"
                self.released.append(seq)


def wait_for(condition: Callable[[], object]) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


class Setup:
    def __init__(self, time_limit_s: float, held: set[int]) -> None:
        """Items in ``held`` wait at the gate, then fail transiently; any other fails at once."""
        self.gate = threading.Event()
        self.store = Items()
        self.published: list[TaskMessage] = []
        self.job = uuid.uuid4()

        def fetch(ref: str) -> Blob:
            if int(ref.split("-")[1]) in held:
                self.gate.wait(SETTLE_S)
            raise errors.Retryable("S3 error SlowDown (injected)")

        self.engine = Engine(store=self.store, runners={"caption": EchoRunner()}, fetch=fetch,  # type: ignore[arg-type]
                             decode=decode, worker_name="w", max_batch=4, max_wait_s=0.01, decode_threads=4).start()
        found, self.joins = self.engine.in_flight, 0

        def in_flight(job: uuid.UUID, seqs: Sequence[int]) -> dict[int, Any]:
            joined = found(job, seqs)
            self.joins += bool(joined) and threading.current_thread().name == "handler"
            return joined

        self.engine.in_flight = in_flight  # type: ignore[method-assign]
        self.service = MessageService(store=self.store, engine=self.engine, policy=RetryPolicy(5, 0.01, 0.01),
                                      publish=lambda msgs, delay: self.published.extend(msgs),
                                      time_limit_s=time_limit_s)

    def payload(self, *seqs: int) -> dict[str, Any]:
        return TaskMessage(job=str(self.job), tasks=TASKS, items=[[s, f"img-{s}"] for s in seqs]).to_json()

    def handle_in_thread(self, payload: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["summary"] = self.service.handle(payload)
            except TimeoutError as exc:
                result["error"] = exc

        result["thread"] = threading.Thread(target=run, name="handler", daemon=True)
        result["thread"].start()
        return result

    def timed_out(self, payload: dict[str, Any]) -> None:
        """Handle ``payload`` until its time limit, then give later handlers time to settle."""
        first = self.handle_in_thread(payload)
        first["thread"].join(SETTLE_S)
        assert isinstance(first.get("error"), TimeoutError), "the handler gave up: its message is requeued"
        self.service._time_limit_s = SETTLE_S

    def submitted(self, seq: int) -> None:
        """Wait until the engine has the item."""
        wait_for(lambda: Engine.in_flight(self.engine, self.job, [seq]))

    def joining(self) -> None:
        """Wait until a handler thread has found an item to join (before the gate lets it settle)."""
        wait_for(lambda: self.joins)

    def finish(self, *results: dict[str, Any]) -> None:
        self.gate.set()
        for result in results:
            result["thread"].join(SETTLE_S)
        self.engine.stop()

    def published_items(self) -> list[list[Any]]:
        return sorted(list(item) for msg in self.published for item in msg.items)


def test_a_redelivery_that_joins_a_timed_out_item_publishes_its_retry_once():
    s = Setup(time_limit_s=0.3, held={0})
    s.timed_out(s.payload(0))
    again = s.handle_in_thread(s.payload(0))  # the redelivery, on the same worker: it joins the item
    s.joining()
    s.finish(again)
    assert again["summary"] == Summary(retried=1), "the joiner settled the item its message names"
    assert s.published_items() == [[0, "img-0"]], "one retry message, published once"
    assert s.store.released == [0] and s.store.state[0] == "queued", "released, not left running"
    assert s.store.attempts[0] == 1, "joining costs no attempt"
    assert not s.service._orphans and not s.service._joins


def test_a_joined_item_whose_handler_still_waits_is_left_to_it():
    s = Setup(time_limit_s=SETTLE_S, held={0})
    owner = s.handle_in_thread(s.payload(0))
    s.submitted(0)
    duplicate = s.handle_in_thread(s.payload(0))
    s.joining()
    s.finish(owner, duplicate)
    assert owner["summary"] == Summary(retried=1)
    assert duplicate["summary"] == Summary(skipped=1), "the duplicate left the item to its handler"
    assert s.published_items() == [[0, "img-0"]] and s.store.released == [0], "one retry, not two"
    assert not s.service._orphans and not s.service._joins


def test_an_orphan_nobody_joins_is_forgotten_once_it_settles():
    s = Setup(time_limit_s=0.3, held={0})
    s.timed_out(s.payload(0))
    assert len(s.service._orphans) == 1
    s.finish()  # the redelivery went to another worker: nobody here settles the item
    assert not s.service._orphans, "kept only while a handler can still join it"
    assert s.published_items() == [] and s.store.state[0] == "running", "left to the redelivery"


def test_a_redelivery_split_up_for_its_crash_suspects_sends_its_orphans_on_too():
    # Items 0 and 1 failed before the limit (their handler never settled them: both look like crash
    # suspects now); item 2 is still in the engine. The redelivery sends each out alone, item 2 too,
    # and the delivery of item 2 joins it and settles it.
    s = Setup(time_limit_s=0.3, held={2})
    s.timed_out(s.payload(0, 1, 2))
    split = s.service.handle(s.payload(0, 1, 2))
    assert split == Summary(retried=3)
    assert s.published_items() == [[0, "img-0"], [1, "img-1"], [2, "img-2"]]
    alone = s.handle_in_thread(s.published[2].to_json())
    s.joining()
    s.finish(alone)
    assert alone["summary"] == Summary(retried=1)
    assert s.published_items() == [[0, "img-0"], [1, "img-1"], [2, "img-2"], [2, "img-2"]]
    assert s.store.released == [2] and s.store.attempts[2] == 1
    assert not s.service._orphans and not s.service._joins
