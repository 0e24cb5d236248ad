"""MessageService against the real Store: the job's record, not the message, decides what an item
is; messages that can never settle end (dead letters or one dropped line), never loop."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import text

from imgq.contract import CaptionParams, TaskSpec, make_task
from imgq.db.store import Store
from imgq.params import ValidateParams
from imgq.retry import RetryPolicy
from imgq.worker.engine import Outcome, WorkItem
from imgq.worker.service import MessageService
from tests.jobs import caption_task, create_job, message

pytestmark = pytest.mark.integration


class RecordingEngine:
    """Stands in for the Engine: settles every item as done (no result rows) and records what it
    was asked to compute."""

    worker_name = "stub-worker"

    def __init__(self, served: list[TaskSpec]) -> None:
        self.served = served
        self.runners: dict[str, Any] = {}
        self.submitted: list[tuple[list[TaskSpec], list[Any]]] = []

    def serves(self, task: TaskSpec) -> bool:
        return task in self.served

    def in_flight(self, job, seqs) -> dict:
        return {}

    def submit(self, job, tasks, items):
        self.submitted.append((list(tasks), [tuple(i) for i in items]))
        work = []
        for seq, ref, *rest in items:
            item = WorkItem(job, seq, ref, tuple(tasks), rest[0] if rest else None)
            item.future.set_result(Outcome(seq, "done"))
            work.append(item)
        return work


@pytest.fixture
def store(database_url: str) -> Store:
    s = Store.from_url(database_url)
    yield s
    s.engine.dispose()


def service(store: Store, engine: RecordingEngine, published: list | None = None) -> MessageService:
    sink = published if published is not None else []
    return MessageService(store=store, engine=engine, policy=RetryPolicy(3, 0.01, 0.01),  # type: ignore[arg-type]
                          publish=lambda messages, delay: sink.extend(messages))


def test_a_message_that_disagrees_with_the_record_is_processed_as_recorded(store: Store, caplog):
    recorded = caption_task("m", CaptionParams(num_beams=2))
    job = create_job(store, [recorded], ["/data/a.jpg", "/data/b.jpg"])
    engine = RecordingEngine([recorded, caption_task("m", CaptionParams(num_beams=9))])
    forged = message(job, [caption_task("m", CaptionParams(num_beams=9))], ["/etc/other.jpg", "/data/b.jpg"])
    summary = service(store, engine).handle(forged.to_json())
    assert summary.done == 2
    [(tasks, items)] = engine.submitted
    assert tasks == [recorded], "the job's params, not the message's"
    assert items == [(0, "/data/a.jpg"), (1, "/data/b.jpg")], "the recorded refs, not the message's"
    assert "disagrees with the job's tasks" in caplog.text and "unlike the record" in caplog.text


def test_an_unknown_message_version_naming_another_jobs_items_does_not_kill_them(store: Store):
    task = caption_task("m")
    job = create_job(store, [task], ["/data/a.jpg"])
    engine = RecordingEngine([task])
    payload = {"v": 99, "job": str(job), "items": [[0, "/anything"]], "whatever": True}
    summary = service(store, engine).handle(payload)
    assert summary.done == 1 and summary.dead == 0
    assert engine.submitted[0][1] == [(0, "/data/a.jpg")]


@pytest.mark.parametrize("payload", [
    {"v": 2, "job": "not-a-uuid", "tasks": [], "items": [[0, "/x"]]},
    {"v": 2, "job": str(uuid.uuid4()), "tasks": [], "items": [[0, "/x"]]},  # no such job
    {"job": "00000000-0000-0000-0000-000000000000"},
    {"v": 2, "job": str(uuid.uuid4()), "items": [[2**40, "/x"], ["0", "/y"], [-1, "/z"]]},
    ["not", "a", "dict"],
])
def test_messages_that_name_nothing_identifiable_are_dropped_not_raised(store: Store, payload):
    svc = service(store, RecordingEngine([]))
    assert svc.handle(payload).dropped == 1
    assert svc.dropped == 1


def test_out_of_range_seqs_are_ignored_and_the_rest_processed(store: Store):
    task = caption_task("m")
    job = create_job(store, [task], ["/data/a.jpg", "/data/b.jpg"])
    engine = RecordingEngine([task])
    payload = message(job, [task], ["/data/a.jpg", "/data/b.jpg"]).to_json()
    payload["items"] = [[1, "/data/b.jpg"], [2**40, "/x"], [7, "/not/in/the/job"]]
    summary = service(store, engine).handle(payload)
    assert engine.submitted[0][1] == [(1, "/data/b.jpg")]
    assert summary.done == 1 and summary.skipped == 1  # seq 7 is not an item of the job


def test_pair_items_come_from_the_record_too(store: Store):
    task = make_task("validate", "r", ValidateParams())
    job = create_job(store, [task], [("/data/a.jpg", "a dog")])
    engine = RecordingEngine([task])
    forged = message(job, [task], [("/data/a.jpg", "an altered text")])
    service(store, engine).handle(forged.to_json())
    assert engine.submitted[0][1] == [(0, "/data/a.jpg", "a dog")]


def test_internal_errors_dead_letter_what_the_message_names(store: Store):
    task = caption_task("m")
    job = create_job(store, [task], ["/data/a.jpg", "/data/b.jpg"])
    svc = service(store, RecordingEngine([task]))
    summary = svc.give_up(message(job, [task], ["/data/a.jpg", "/data/b.jpg"]).to_json(), KeyError("boom"))
    assert summary.dead == 2
    with store.engine.connect() as conn:
        codes = conn.execute(text("SELECT code FROM dead_letters ORDER BY seq")).scalars().all()
    assert codes == ["internal_error", "internal_error"]


def test_check_flags_a_result_of_another_model_or_params(store: Store):
    from imgq.db.admin import Admin
    from imgq.ports import DoneItem, ObjectInfo

    task = caption_task("m", CaptionParams(num_beams=2))
    job = create_job(store, [task], ["/data/a.jpg", "/data/b.jpg"])
    obj = ObjectInfo("local", "", "/data/a.jpg", "v1", 10, 4, 4)
    store.write_done([
        DoneItem(job, 0, obj, "w", {"caption": ("m", "r", task.params.digest(), task.params.canonical(), "ok")}),
        DoneItem(job, 1, ObjectInfo("local", "", "/data/b.jpg", "v1", 10, 4, 4), "w",
                 {"caption": ("other-model", "r", "forged", {}, "bad")}),
    ])
    report = Admin(store.engine).check(job)
    assert report is not None and not report.ok
    assert (report.missing, report.duplicates, report.mismatched) == (0, 0, 1)
    assert "seq 1 /data/b.jpg" in report.offenders[0] and "other-model" in report.offenders[0]


def test_crash_suspects_are_split_off_without_charging_anyone_an_attempt(store: Store):
    task = caption_task("m")
    job = create_job(store, [task], ["/d/0.jpg", "/d/1.jpg", "/d/2.jpg"])
    store.claim(job, [0], "dead:1")  # an earlier delivery died holding item 0
    published: list = []
    svc = service(store, RecordingEngine([task]), published)
    summary = svc.handle(message(job, [task], ["/d/0.jpg", "/d/1.jpg", "/d/2.jpg"]).to_json())
    assert summary.retried == 3 and [m.items for m in published] == [[(0, "/d/0.jpg")], [(1, "/d/1.jpg")],
                                                                         [(2, "/d/2.jpg")]]

    def attempts() -> list[int]:
        with store.engine.connect() as conn:
            return conn.execute(text("SELECT attempts FROM job_items WHERE job_id = :j ORDER BY seq"),
                                {"j": job}).scalars().all()

    assert attempts() == [1, 0, 0], "splitting charges no attempt"
    for msg in published:  # each alone now; the suspect runs in the exclusive quarantine
        assert svc.handle(msg.to_json()).done == 1
    assert attempts() == [2, 1, 1]
