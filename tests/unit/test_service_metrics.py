"""The worker's failure and retry counters, counted where an item settles (with in-memory fakes).

imgq_retries_total counts items sent again after a retryable failure, never a dead worker's items
sent again one per message (nothing of theirs failed); imgq_failures_total counts every failed
attempt, those dead-lettered before any model ran (refused messages, worn items) included, and
each only once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY

from imgq.contract import CaptionParams, TaskMessage, make_task
from imgq.ports import Claim
from imgq.retry import RetryPolicy
from imgq.worker.engine import Engine
from imgq.worker.fakes import EchoRunner, MemoryResults
from imgq.worker.service import MessageService
from tests.unit.test_engine import decode, fetch

TASKS = [make_task("caption", "echo", CaptionParams())]
REFS = ["img-0.1", "flaky-0.2", "img-0.3"]


class Jobs(MemoryResults):
    """Every job is a caption job of REFS; each claim is the ``attempts``-th delivery, and the
    items of a job in ``suspects`` were taken by a worker that never settled them."""

    def __init__(self, attempts: int = 1, record: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.attempts = attempts
        self.record = record
        self.suspects: set[uuid.UUID] = set()

    def job_tasks(self, job: uuid.UUID) -> list[dict[str, Any]]:
        if self.record is not None:
            return self.record
        return [{"kind": t.kind, "model": t.model, "params": t.params.model_dump(mode="json")} for t in TASKS]

    def unsettled(self, job: uuid.UUID, seqs: Sequence[int]) -> set[int]:
        return set(seqs) if job in self.suspects else set()

    def records(self, job: uuid.UUID, seqs: Sequence[int]) -> dict[int, tuple[Any, ...]]:
        return {seq: (seq, REFS[seq]) for seq in seqs}

    def claim(self, job: uuid.UUID, seqs: Sequence[int], worker: str, *, leave_peers: bool = False) -> dict[int, Claim]:
        return {seq: Claim(self.attempts, job in self.suspects, REFS[seq]) for seq in seqs}


@pytest.fixture
def service_of() -> Any:
    """``service_of(store, sent)``: a service and a started engine over ``store`` (stopped after
    the test); what it publishes goes to ``sent``."""
    engines: list[Engine] = []

    def build(store: Jobs, sent: list[TaskMessage] | None = None) -> MessageService:
        engine = Engine(store=store, runners={"caption": EchoRunner()}, fetch=fetch, decode=decode,
                        worker_name="w", max_batch=4, max_wait_s=0.01, decode_threads=2).start()
        engines.append(engine)
        out = sent if sent is not None else []
        return MessageService(store=store, engine=engine, policy=RetryPolicy(max_attempts=3, base_s=0.0),
                              publish=lambda messages, delay: out.extend(messages))

    yield build
    for engine in engines:
        engine.stop()


def payload(job: uuid.UUID, seqs: Sequence[int]) -> dict[str, Any]:
    return TaskMessage(job=str(job), tasks=TASKS, items=[[s, REFS[s]] for s in seqs]).model_dump(mode="json")


def counters() -> dict[str, float]:
    names = {"retries": ("imgq_retries_total", {})}
    for code in ("transient", "wrong_model", "bad_message", "too_many_attempts", "internal_error"):
        names[code] = ("imgq_failures_total", {"code": code})
    return {key: REGISTRY.get_sample_value(name, labels) or 0.0 for key, (name, labels) in names.items()}


def grew(before: dict[str, float]) -> dict[str, float]:
    return {key: value - before[key] for key, value in counters().items() if value != before[key]}


# -- retries ------------------------------------------------------------------------------------------
def test_an_item_sent_again_after_a_retryable_failure_is_one_retry_and_one_failure(service_of):
    sent: list[TaskMessage] = []
    service = service_of(Jobs(), sent)
    before = counters()
    summary = service.handle(payload(uuid.uuid4(), [0, 1, 2]))
    assert (summary.done, summary.retried) == (2, 1)
    assert [m.items for m in sent] == [[(1, "flaky-0.2")]]
    assert grew(before) == {"retries": 1, "transient": 1}


def test_a_dead_workers_items_split_one_per_message_are_no_retries(service_of):
    store, sent = Jobs(), []
    job = uuid.uuid4()
    store.suspects.add(job)
    service = service_of(store, sent)
    before = counters()
    assert service.handle(payload(job, [0, 1, 2])).retried == 3
    assert [m.items for m in sent] == [[(0, "img-0.1")], [(1, "flaky-0.2")], [(2, "img-0.3")]]
    assert grew(before) == {}


def test_the_last_attempt_failing_is_one_failure_not_two(service_of):
    service = service_of(Jobs(attempts=3))
    before = counters()
    summary = service.handle(payload(uuid.uuid4(), [1]))
    assert summary.dead == 1
    assert grew(before) == {"transient": 1}


# -- dead letters the engine never saw ------------------------------------------------------------------
def test_a_message_for_a_model_this_worker_does_not_serve_counts_a_failure_per_item(service_of):
    record = [{"kind": "caption", "model": "another", "params": CaptionParams().model_dump(mode="json")}]
    store = Jobs(record=record)
    service = service_of(store)
    before = counters()
    assert service.handle(payload(uuid.uuid4(), [0, 2])).dead == 2
    assert [row.code for row in store.dead] == ["wrong_model"] * 2
    assert grew(before) == {"wrong_model": 2}


def test_a_job_record_this_worker_cannot_read_counts_a_bad_message_failure(service_of):
    store = Jobs(record=[{"kind": "no-such-kind", "model": "m", "params": {}}])
    service = service_of(store)
    before = counters()
    assert service.handle(payload(uuid.uuid4(), [0])).dead == 1
    assert [row.code for row in store.dead] == ["bad_message"]
    assert grew(before) == {"bad_message": 1}


def test_worn_items_count_a_too_many_attempts_failure_each(service_of):
    store = Jobs(attempts=4)
    service = service_of(store)
    before = counters()
    assert service.handle(payload(uuid.uuid4(), [0, 2])).dead == 2
    assert [row.code for row in store.dead] == ["too_many_attempts"] * 2
    assert grew(before) == {"too_many_attempts": 2}


def test_items_given_up_after_an_internal_error_count_a_failure_each(service_of):
    store = Jobs()
    service = service_of(store)
    before = counters()
    assert service.give_up(payload(uuid.uuid4(), [0, 1]), KeyError("bug")).dead == 2
    assert grew(before) == {"internal_error": 2}


def test_a_dead_letter_write_that_fails_counts_nothing_yet(service_of):
    """The message is delivered again and its items refused again: counted once, then."""
    record = [{"kind": "caption", "model": "another", "params": CaptionParams().model_dump(mode="json")}]
    store = Jobs(record=record)
    store.fail_next = 1
    service = service_of(store)
    before = counters()
    with pytest.raises(ConnectionError):
        service.handle(payload(uuid.uuid4(), [0]))
    assert grew(before) == {}


# -- the worker's publisher ---------------------------------------------------------------------------
class _Started:
    """A thread-owning part of the worker, not started: this test is about the publisher only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def start(self) -> _Started:
        return self

    @classmethod
    def from_settings(cls, *args: Any, **kwargs: Any) -> _Started:
        return cls(**kwargs)


def test_the_workers_publisher_counts_nothing_itself(monkeypatch):
    """Suspects' isolation goes through the same publisher as retries: it must not count them."""
    from imgq.config import Settings
    from imgq.worker import app as worker_app

    services: list[_Started] = []
    published: list[list[TaskMessage]] = []
    for name in ("Engine", "Heartbeat", "Feeder", "Notifier", "Admin"):
        monkeypatch.setattr(worker_app, name, _Started)
    monkeypatch.setattr(worker_app, "MessageService", lambda **kw: services.append(_Started(**kw)) or services[-1])
    monkeypatch.setattr(worker_app, "publish", lambda app, messages, **kw: published.append(messages))
    monkeypatch.setattr(worker_app, "delivered_lane", lambda app: None)
    settings = Settings(_env_file=None, database_url="postgresql+psycopg://u@127.0.0.1:9/x", max_batch=4,
                        torch_threads=1)
    runtime = worker_app.WorkerRuntime(settings, runners={"caption": EchoRunner()})  # type: ignore[dict-item]
    runtime.start(object())  # type: ignore[arg-type]
    before = counters()
    services[0].kwargs["publish"]([TaskMessage(job=str(uuid.uuid4()), tasks=TASKS, items=[[0, "img-0.1"]])], 0.0)
    assert len(published) == 1
    assert grew(before) == {}
    runtime.store.engine.dispose()
