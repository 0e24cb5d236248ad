"""MessageService runs crash suspects alone (worker/quarantine.py), with in-memory fakes.

Ordinary messages run side by side; a message whose single item is a crash suspect (an earlier
delivery took it and never settled) waits until nothing else runs, and nothing starts beside it.
What is observed is the order of claims: a message claims its items only once it holds the
quarantine, and the model holds every batch at a gate until the test opens it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

from imgq.contract import CaptionParams, TaskMessage, make_task
from imgq.ports import Claim
from imgq.retry import RetryPolicy
from imgq.worker.engine import Engine
from imgq.worker.fakes import MemoryResults
from imgq.worker.service import MessageService
from tests.unit.test_engine import GatedModel, decode, fetch
from tests.waits import SETTLE_S

TASKS = [make_task("caption", "echo", CaptionParams())]


class SuspectStore(MemoryResults):
    """Every job is a one-task caption job; the items of ``suspects`` jobs never settled before."""

    def __init__(self, suspects: set[uuid.UUID]) -> None:
        super().__init__()
        self.suspects = suspects
        self.claimed: list[uuid.UUID] = []

    def job_tasks(self, job: uuid.UUID) -> list[dict[str, object]]:
        return [{"kind": t.kind, "model": t.model, "params": t.params.model_dump(mode="json")} for t in TASKS]

    def unsettled(self, job: uuid.UUID, seqs: Sequence[int]) -> set[int]:
        return set(seqs) if job in self.suspects else set()

    def claim(self, job: uuid.UUID, seqs: Sequence[int], worker: str, *, leave_peers: bool = False) -> dict[int, Claim]:
        self.claimed.append(job)
        return {seq: Claim(2 if job in self.suspects else 1, job in self.suspects, f"img-0.{seq + 1}") for seq in seqs}


def setup(suspects: set[uuid.UUID]) -> tuple[SuspectStore, GatedModel, Engine, MessageService]:
    store, model = SuspectStore(suspects), GatedModel()
    engine = Engine(store=store, runners={"caption": model}, fetch=fetch, decode=decode,  # type: ignore[arg-type]
                    worker_name="w", max_batch=4, max_wait_s=0.01, decode_threads=2).start()
    service = MessageService(store=store, engine=engine, policy=RetryPolicy(), publish=lambda m, d: None)
    return store, model, engine, service


def handle(service: MessageService, job: uuid.UUID) -> threading.Thread:
    payload = TaskMessage(job=str(job), tasks=TASKS, items=[[0, "img-0.1"]]).model_dump(mode="json")
    thread = threading.Thread(target=service.handle, args=(payload,), daemon=True)
    thread.start()
    return thread


def claimed_within(store: SuspectStore, n: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while len(store.claimed) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(store.claimed) >= n


def finish(model: GatedModel, engine: Engine, threads: list[threading.Thread]) -> None:
    model.gate.set()
    for thread in threads:
        thread.join(SETTLE_S)
    engine.stop()


def test_ordinary_messages_run_side_by_side():
    first, second = uuid.uuid4(), uuid.uuid4()
    store, model, engine, service = setup(set())
    threads = [handle(service, first)]
    assert claimed_within(store, 1, SETTLE_S)
    threads.append(handle(service, second))
    # The first message's batch is held in the model; the second claims all the same.
    assert claimed_within(store, 2, SETTLE_S), "an ordinary message waited for another one"
    finish(model, engine, threads)
    assert sorted(d.job for d in store.done) == sorted([first, second])


def test_a_suspect_waits_until_the_running_messages_finish():
    ordinary, suspect = uuid.uuid4(), uuid.uuid4()
    store, model, engine, service = setup({suspect})
    threads = [handle(service, ordinary)]
    assert claimed_within(store, 1, SETTLE_S)
    threads.append(handle(service, suspect))
    assert not claimed_within(store, 2, 0.5), "a suspect started beside a running message"
    finish(model, engine, threads)
    assert store.claimed == [ordinary, suspect]
    assert {d.job for d in store.done} == {ordinary, suspect}


def test_nothing_starts_beside_a_running_suspect():
    suspect, ordinary = uuid.uuid4(), uuid.uuid4()
    store, model, engine, service = setup({suspect})
    threads = [handle(service, suspect)]
    assert claimed_within(store, 1, SETTLE_S)
    threads.append(handle(service, ordinary))
    assert not claimed_within(store, 2, 0.5), "a message started beside a running suspect"
    finish(model, engine, threads)
    assert store.claimed == [suspect, ordinary]
