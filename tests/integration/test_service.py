"""MessageService against the real Store: the job's record, not the message, decides what an item
is; messages that can never settle end (dead letters or one dropped line), never loop."""

from __future__ import annotations

import threading
import time
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


@pytest.mark.parametrize(("attempts_before", "worn"), [(2, False), (3, True), (7, True)])
def test_an_item_delivered_more_often_than_allowed_is_dead_lettered_unrun(store: Store, attempts_before, worn):
    """max_attempts=3: the 3rd delivery still runs, the 4th is too_many_attempts (a poison item that
    kills every worker it reaches must not loop), and its batchmate runs as usual."""
    task = caption_task("m")
    job = create_job(store, [task], ["/d/0.jpg", "/d/1.jpg"])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET attempts = :n WHERE job_id = :j AND seq = 0"),
                     {"n": attempts_before, "j": job})
    engine = RecordingEngine([task])
    summary = service(store, engine).handle(message(job, [task], ["/d/0.jpg", "/d/1.jpg"]).to_json())
    [(_, submitted)] = engine.submitted
    with store.engine.connect() as conn:
        letters = conn.execute(text("SELECT seq, code, message, attempts FROM dead_letters WHERE job_id = :j"),
                               {"j": job}).all()
        workers = conn.execute(text("SELECT worker FROM dead_letters WHERE job_id = :j "
                                    "UNION ALL SELECT worker FROM job_items WHERE job_id = :j"), {"j": job}).scalars()
        assert set(workers) == {"stub-worker"}, "claims and dead letters name the worker (the reaper relies on it)"
    if worn:
        assert submitted == [(1, "/d/1.jpg")], "a worn item is never handed to the model"
        assert (summary.done, summary.dead) == (1, 1)
        assert letters == [(0, "too_many_attempts", f"delivered {attempts_before + 1} times without settling "
                                                     "(it may crash workers)", attempts_before + 1)]
        assert store.counts(job)["dead"] == 1
    else:
        assert submitted == [(0, "/d/0.jpg"), (1, "/d/1.jpg")]
        assert (summary.done, summary.dead) == (2, 0) and letters == []


class ScriptedEngine(RecordingEngine):
    """Settles each item as the test scripted it (done, dead, or retry with a code); items not
    scripted never settle. ``joined`` items are reported as already in flight in this process."""

    def __init__(self, served: list[TaskSpec], script: dict[int, tuple[str, str | None]],
                 joined: dict[int, str] | None = None) -> None:
        super().__init__(served)
        self.script = script
        self.joined = joined or {}
        self.jobs: list[uuid.UUID] = []

    def in_flight(self, job, seqs) -> dict:
        found = {}
        for seq in seqs:
            if seq in self.joined:
                item = WorkItem(job, seq, self.joined[seq], ())
                item.future.set_result(Outcome(seq, "done"))
                found[seq] = item
        return found

    def submit(self, job, tasks, items):
        self.jobs.append(job)
        self.submitted.append((list(tasks), [tuple(i) for i in items]))
        work = []
        for seq, ref, *rest in items:
            item = WorkItem(job, seq, ref, tuple(tasks), rest[0] if rest else None)
            if seq in self.script:
                state, code = self.script[seq]
                item.future.set_result(Outcome(seq, state, code, f"{state} on purpose"))  # type: ignore[arg-type]
            work.append(item)
        return work


def attempts_of(store: Store, job: uuid.UUID, seq: int, n: int) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET attempts = :n WHERE job_id = :j AND seq = :s"),
                     {"n": n, "j": job, "s": seq})


def test_retries_are_published_with_backoff_released_and_given_up_at_the_limit(store: Store):
    task = caption_task("m")
    refs = [f"/d/{i}.jpg" for i in range(5)]
    job = create_job(store, [task], refs)
    attempts_of(store, job, 2, 2)  # its 3rd delivery now: with max_attempts=3, no retry is left
    attempts_of(store, job, 3, 2)
    published: list = []
    delays: list[float] = []
    engine = ScriptedEngine([task], {0: ("done", None), 1: ("retry", "transient"), 2: ("retry", None),
                                     3: ("retry", "out_of_memory"), 4: ("dead", "not_found")})
    svc = MessageService(store=store, engine=engine, policy=RetryPolicy(3, 0.4, 0.4),  # type: ignore[arg-type]
                         publish=lambda messages, delay: (published.extend(messages), delays.append(delay)))
    summary = svc.handle(message(job, [task], refs).to_json())
    assert engine.jobs == [job]
    assert (summary.done, summary.dead, summary.retried, summary.skipped) == (1, 3, 1, 0)
    [again] = published
    assert again.items == [(1, "/d/1.jpg")] and again.tasks == [task]
    assert 0.2 <= delays[0] <= 0.4, "the backoff of a first attempt, jittered down by at most half"
    with store.engine.connect() as conn:
        states = dict(conn.execute(text("SELECT seq, state FROM job_items WHERE job_id = :j"), {"j": job}).all())
        letters = conn.execute(text("SELECT seq, code, message, worker FROM dead_letters WHERE job_id = :j "
                                    "ORDER BY seq"), {"j": job}).all()
    assert states[1] == "queued", "a published retry is released, not left running"
    assert states[0] == "running" and states[4] == "running"  # the stub engine writes no results
    assert letters == [
        (2, "transient", "gave up after 3 attempts: retry on purpose", "stub-worker"),
        (3, "out_of_memory", "gave up after 3 attempts: retry on purpose", "stub-worker"),
    ]


def test_items_already_in_flight_here_are_awaited_not_claimed(store: Store):
    task = caption_task("m")
    job = create_job(store, [task], ["/d/0.jpg", "/d/1.jpg"])
    engine = ScriptedEngine([task], {0: ("done", None)}, joined={1: "/d/1.jpg"})
    payload = message(job, [task], ["/d/0.jpg", "/d/1.jpg"]).to_json()
    payload["items"].append([7, "/not/in/the/job"])
    summary = service(store, engine).handle(payload)
    assert engine.submitted[0][1] == [(0, "/d/0.jpg")]
    assert (summary.done, summary.skipped) == (1, 2), "the joined item and the unknown seq"
    with store.engine.connect() as conn:
        attempts = conn.execute(text("SELECT attempts FROM job_items WHERE job_id = :j ORDER BY seq"),
                                {"j": job}).scalars().all()
    assert attempts == [1, 0], "joining costs no attempt"


class TricklingEngine(RecordingEngine):
    """Settles one item every ``every_s``, in order: each wait is short, the whole is long."""

    def __init__(self, served: list[TaskSpec], every_s: float) -> None:
        super().__init__(served)
        self.every_s = every_s

    def submit(self, job, tasks, items):
        work = [WorkItem(job, seq, ref, tuple(tasks)) for seq, ref, *_ in items]

        def trickle() -> None:
            for item in work:
                time.sleep(self.every_s)
                item.future.set_result(Outcome(item.seq, "done"))

        threading.Thread(target=trickle, daemon=True).start()
        return work


def test_a_message_that_never_settles_times_out_at_its_limit(store: Store):
    """The limit bounds the whole message: fifty items settling 0.2 s apart each come within a
    0.3 s wait of the last, so a limit per item (or one restarted per item) would never fire."""
    task = caption_task("m")
    refs = [f"/d/{i}.jpg" for i in range(50)]
    job = create_job(store, [task], refs)
    svc = MessageService(store=store, engine=TricklingEngine([task], every_s=0.2),  # type: ignore[arg-type]
                         policy=RetryPolicy(3, 0.01, 0.01), publish=lambda messages, delay: None, time_limit_s=0.3)
    raised: list[BaseException] = []

    def handle() -> None:
        try:
            svc.handle(message(job, [task], refs).to_json())
        except BaseException as exc:
            raised.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=handle, daemon=True)
    thread.start()
    thread.join(10)
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), "waited past the time limit"
    assert len(raised) == 1 and isinstance(raised[0], TimeoutError), "unacknowledged: it must raise"
    # The items take 10 s in all; wide of both, so a loaded host cannot fail it.
    assert 0.25 <= elapsed < 5, f"the limit is for the whole message, not per item ({elapsed:.2f}s)"


def test_the_items_a_forged_message_gets_wrong_are_counted(store: Store, caplog):
    task = caption_task("m")
    refs = ["/d/0.jpg", "/d/1.jpg", "/d/2.jpg"]
    job = create_job(store, [task], refs)
    service(store, RecordingEngine([task])).handle(message(job, [task], refs).to_json())
    assert "unlike the record" not in caplog.text, "a faithful message is not flagged"
    job = create_job(store, [task], refs)
    forged = message(job, [task], ["/d/0.jpg", "/etc/passwd", "/d/2.jpg"])
    service(store, RecordingEngine([task])).handle(forged.to_json())
    assert "names 1 items unlike the record" in caplog.text
