"""MessageService's refusals against the real Store, where mutation testing found nothing checking them:
the wrong_model dead letter (the operator's only hint of which worker to start), what give_up records
after a bug, which worker a refusal is charged to, and the summary's counts."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import text

from imgq.contract import CaptionParams, TaskSpec, make_task
from imgq.db.store import PENDING, Store
from imgq.params import EmbedParams, ValidateParams
from imgq.retry import RetryPolicy
from imgq.worker.engine import Outcome, WorkItem
from imgq.worker.service import MessageService, Summary
from tests.integration.test_service import RecordingEngine
from tests.jobs import caption_task, create_job, message

pytestmark = pytest.mark.integration


class ServingEngine(RecordingEngine):
    """RecordingEngine with runners named after their models and a worker name like a real one's."""

    worker_name = "host-a:4242"

    def __init__(self, served: list[TaskSpec]) -> None:
        super().__init__(served)
        self.runners = {t.kind: SimpleNamespace(name=t.model) for t in served}


def service(store: Store, engine: ServingEngine) -> MessageService:
    return MessageService(store=store, engine=engine, policy=RetryPolicy(3, 0.01, 0.01),  # type: ignore[arg-type]
                          publish=lambda messages, delay: None)


def dead_letters(store: Store) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT seq, ref, code, message, attempts, worker FROM dead_letters ORDER BY seq"))]


def items(store: Store, job: uuid.UUID | None = None) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT seq, state, attempts, worker FROM job_items WHERE CAST(:j AS uuid) IS NULL OR job_id = :j "
            "ORDER BY seq"), {"j": job})]


def finish(store: Store, job: uuid.UUID, seq: int) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = 'done' WHERE job_id = :j AND seq = :s"), {"j": job, "s": seq})


def test_a_job_no_runner_here_serves_is_dead_lettered_with_what_is_served_and_what_to_start(store: Store):
    asked = [caption_task("blip-large"), make_task("embed", "itm-large", EmbedParams())]
    job = create_job(store, asked, ["/data/a.jpg", "/data/b.jpg", "/data/c.jpg"])
    finish(store, job, 2)  # already final: skipped, not dead-lettered
    engine = ServingEngine([caption_task("blip-base", CaptionParams()), make_task("embed", "itm-base", EmbedParams())])
    svc = service(store, engine)

    summary = svc.handle(message(job, asked, ["/data/a.jpg", "/data/b.jpg", "/data/c.jpg"]).to_json())

    assert summary == Summary(dead=2, skipped=1)
    expected = ("this worker serves caption (blip-base), embed (itm-base); the job asks for caption (blip-large), "
                "embed (itm-large). Start a worker with that IMGQ_KINDS and model (or on its own IMGQ_QUEUE), "
                "then `imgq dlq retry --code wrong_model`")
    assert dead_letters(store) == [(0, "/data/a.jpg", "wrong_model", expected, 1, "host-a:4242"),
                                   (1, "/data/b.jpg", "wrong_model", expected, 1, "host-a:4242")]
    assert [(seq, worker) for seq, _, _, worker in items(store)] == [(0, "host-a:4242"), (1, "host-a:4242"),
                                                                      (2, None)]


def test_a_worker_that_serves_nothing_says_so(store: Store):
    asked = [caption_task("blip-large")]
    job = create_job(store, asked, ["/data/a.jpg"])
    svc = service(store, ServingEngine([]))
    assert svc.handle(message(job, asked, ["/data/a.jpg"]).to_json()) == Summary(dead=1)
    [(_, _, code, text_, _, _)] = dead_letters(store)
    assert code == "wrong_model"
    assert text_.startswith("this worker serves nothing; the job asks for caption (blip-large). Start a worker")


def running(store: Store, job: uuid.UUID, seq: int, worker: str, *, registered: bool) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = 'running', attempts = 1, worker = :w "
                          "WHERE job_id = :j AND seq = :s"), {"j": job, "s": seq, "w": worker})
        if registered:
            conn.execute(text("INSERT INTO workers (name, host, pid) VALUES (:w, 'host-b', 1)"), {"w": worker})


def test_a_refusal_leaves_the_items_a_live_peer_is_running(store: Store):
    """A mixed fleet on one queue: a duplicate delivery (a visibility timeout, a message the feeder
    took for lost) reaching a worker that does not serve the job dead-lettered, as wrong_model, the
    items a serving peer was running; the peer's result then found them dead and was thrown away.
    A registered worker's items are its own until the reaper takes them (worker NULL)."""
    asked = [caption_task("blip-large")]
    job = create_job(store, asked, ["/data/a.jpg", "/data/b.jpg", "/data/c.jpg", "/data/d.jpg"])
    running(store, job, 0, "host-b:1", registered=True)  # a live peer's
    running(store, job, 1, "host-c:2", registered=False)  # its worker is gone from the registry
    running(store, job, 2, None, registered=False)  # reaped: republished, nobody's
    svc = service(store, ServingEngine([caption_task("blip-base")]))

    summary = svc.handle(message(job, asked, ["/data/a.jpg", "/data/b.jpg", "/data/c.jpg", "/data/d.jpg"]).to_json())

    assert summary == Summary(dead=3, skipped=1)
    assert [seq for seq, *_ in dead_letters(store)] == [1, 2, 3]
    assert items(store)[0] == (0, "running", 1, "host-b:1")
    with store.engine.begin() as conn:  # the peer's result still lands
        assert conn.execute(text(f"UPDATE job_items j SET state = 'done' WHERE job_id = :j AND seq = 0 AND {PENDING}"),
                            {"j": job}).rowcount == 1


def test_give_up_dead_letters_the_items_with_the_error_cut_to_300_characters(store: Store):
    task = caption_task("m")
    job = create_job(store, [task], ["/data/a.jpg", "/data/b.jpg"])
    finish(store, job, 1)
    svc = service(store, ServingEngine([task]))
    long = "x" * 400

    summary = svc.give_up(message(job, [task], ["/data/a.jpg", "/data/b.jpg"]).to_json(), ValueError(long))

    assert summary == Summary(dead=1, skipped=1)
    assert dead_letters(store) == [
        (0, "/data/a.jpg", "internal_error", f"internal error while processing: ValueError: {'x' * 300}", 1,
         "host-a:4242")]


def test_a_record_this_worker_cannot_read_is_dead_lettered_as_a_bad_message(store: Store):
    task = caption_task("m")
    job = create_job(store, [task], ["/data/a.jpg"])
    with store.engine.begin() as conn:
        conn.execute(text("""UPDATE jobs SET tasks = '[{"kind": "no-such-kind", "model": "m", "params": {}}]'
                             WHERE id = :j"""), {"j": job})
    svc = service(store, ServingEngine([task]))
    assert svc.handle({"job": str(job), "items": [[0, "/data/a.jpg"]]}) == Summary(dead=1)
    [(seq, _, code, text_, _, worker)] = dead_letters(store)
    assert (seq, code, worker) == (0, "bad_message", "host-a:4242")
    assert text_.startswith("job record unreadable by this worker: ")


def test_give_up_on_a_message_that_names_no_job_drops_it_and_counts_every_drop(store: Store):
    svc = service(store, ServingEngine([]))
    assert svc.give_up({"job": str(uuid.uuid4()), "items": [[0, "/x"]]}, KeyError("boom")) == Summary(dropped=1)
    assert svc.give_up(["not", "a", "message"], KeyError("boom")) == Summary(dropped=1)
    assert svc.handle({"job": "nope"}) == Summary(dropped=1)
    assert svc.dropped == 3
    assert dead_letters(store) == []


def test_the_summary_as_a_dict_names_every_count():
    assert Summary(done=1, dead=2, retried=3, skipped=4, dropped=5).as_dict() == {
        "done": 1, "dead": 2, "retried": 3, "skipped": 4, "dropped": 5}


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], float]] = []

    def __call__(self, messages: Any, delay: float) -> None:
        self.calls.append((list(messages), delay))


def mark(store: Store, job: uuid.UUID, seqs: list[int], state: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = :s, attempts = 1 WHERE job_id = :j AND seq = ANY(:q)"),
                     {"s": state, "j": job, "q": seqs})


def test_items_a_dead_worker_held_go_out_again_one_per_message_at_once(store: Store):
    task = make_task("validate", "itm", ValidateParams())
    job = create_job(store, [task], [("/data/a.jpg", "a dog"), ("/data/b.jpg", "a cat"), ("/data/c.jpg", "a cow")])
    mark(store, job, [0], "running")  # a suspect: its worker died holding it
    mark(store, job, [2], "done")
    sink = Sink()
    svc = MessageService(store=store, engine=ServingEngine([task]), policy=RetryPolicy(3, 0.01, 0.01),  # type: ignore[arg-type]
                         publish=sink)

    summary = svc.handle(message(job, [task], [("/data/a.jpg", "a dog"), ("/data/b.jpg", "a cat"),
                                               ("/data/c.jpg", "a cow")]).to_json())

    assert summary == Summary(retried=2, skipped=1)
    [(messages, delay)] = sink.calls
    assert delay == 0.0
    assert [m.items for m in messages] == [[(0, "/data/a.jpg", "a dog")], [(1, "/data/b.jpg", "a cat")]]
    assert [(seq, state, attempts) for seq, state, attempts, _ in items(store)] == [
        (0, "running", 1), (1, "queued", 0), (2, "done", 1)], "nothing claimed, no attempt charged"


def test_a_lone_suspect_is_run_and_a_pair_is_split(store: Store):
    task = caption_task("m")
    job = create_job(store, [task], ["/data/a.jpg", "/data/b.jpg"])
    mark(store, job, [0], "running")
    sink = Sink()
    svc = MessageService(store=store, engine=ServingEngine([task]), policy=RetryPolicy(3, 0.01, 0.01),  # type: ignore[arg-type]
                         publish=sink)
    assert svc.handle(message(job, [task], ["/data/a.jpg", "/data/b.jpg"]).to_json()) == Summary(retried=2)
    assert [len(m) for m, _ in sink.calls] == [2]
    assert svc.handle({"job": str(job), "items": [[0, "/data/a.jpg"]]}) == Summary(done=1)


class FlyingEngine(ServingEngine):
    """Already working on some items of some jobs: a duplicate delivery joins them."""

    def __init__(self, served: list[TaskSpec], flying: dict[tuple[uuid.UUID, int], WorkItem]) -> None:
        super().__init__(served)
        self.flying = flying

    def in_flight(self, job: uuid.UUID, seqs: list[int]) -> dict[int, Any]:
        return {s: self.flying[(job, s)] for s in seqs if (job, s) in self.flying}


def test_an_item_in_flight_here_for_this_job_is_joined_and_one_of_another_job_is_not(store: Store):
    task = caption_task("m")
    job = create_job(store, [task], ["/data/a.jpg", "/data/b.jpg"])
    other = create_job(store, [task], ["/data/x.jpg"])
    joined = WorkItem(job, 0, "/data/a.jpg", (task,), None)
    joined.future.set_result(Outcome(0, "done"))
    elsewhere = WorkItem(other, 1, "/data/x.jpg", (task,), None)
    engine = FlyingEngine([task], {(job, 0): joined, (other, 1): elsewhere})

    summary = service(store, engine).handle(message(job, [task], ["/data/a.jpg", "/data/b.jpg"]).to_json())

    assert summary == Summary(done=1, skipped=1)
    assert [(seq, attempts) for seq, _, attempts, _ in items(store, job)] == [(0, 0), (1, 1)]


def test_a_dropped_message_is_logged_with_why_and_the_start_of_the_payload(store: Store, caplog):
    svc = service(store, ServingEngine([]))
    missing = uuid.uuid4()
    long = {"job": "x", "pad": "y" * 300}
    with caplog.at_level("ERROR", logger="imgq.worker.service"):
        svc.handle({"nope": 1})
        svc.handle({"job": str(missing), "items": [[0, "/a"]]})
        svc.give_up({"job": str(missing), "items": [[0, "/a"]]}, KeyError("boom"))
        svc.handle(long)
    shown = f"{{'job': '{missing}', 'items': [[0, '/a']]}}"
    assert [r.getMessage() for r in caplog.records] == [
        "dropping message that names no job and item: {'nope': 1}",
        f"dropping message that names job {missing}, which does not exist: {shown}",
        f"dropping message that failed with KeyError: 'boom': {shown}",
        f"dropping message that names no job and item: {repr(long)[:200]}",
    ]
