"""The engine's data path with in-memory fakes: batching, isolation, retries, write outages."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np
import pytest

from imgq import errors
from imgq.contract import CaptionParams, TaskSpec, make_task
from imgq.params import EmbedParams, ValidateParams
from imgq.worker.engine import Engine, Outcome
from imgq.worker.fakes import EchoRunner, MemoryResults
from tests.waits import SETTLE_S

JOB = uuid.uuid4()


@dataclass
class Blob:
    data: bytes
    source: str = "local"
    bucket: str = ""
    key: str = "k"
    version: str = "v"


def fetch(ref: str) -> Blob:
    if ref.startswith("missing"):
        raise errors.NotFound("no such file")
    if ref.startswith("flaky"):
        raise errors.Retryable("S3 error SlowDown")
    return Blob(ref.encode(), key=ref)


@dataclass
class Decoded:
    image: np.ndarray
    width: int = 4
    height: int = 4


DECODES: list[str] = []


def decode(data: bytes) -> Decoded:
    DECODES.append(data.decode())
    value = float(data.decode().split("-")[-1])  # refs look like "img-0.25"
    return Decoded(np.full((3, 4, 4), value, dtype=np.float32))


def make_engine(model: EchoRunner, results: MemoryResults, max_batch: int = 4, *more: EchoRunner) -> Engine:
    runners = {r.kind: r for r in (model, *more)}
    return Engine(store=results, runners=runners, fetch=fetch, decode=decode, worker_name="w",  # type: ignore[arg-type]
                  max_batch=max_batch, max_wait_s=0.01, decode_threads=2, db_retry_s=2.0).start()


def caption(params: CaptionParams | None = None) -> TaskSpec:
    return make_task("caption", "echo", params or CaptionParams())


def run(engine: Engine, refs: list[str], params: CaptionParams | None = None,
        tasks: list[TaskSpec] | None = None) -> dict[int, tuple[str, str | None]]:
    work = engine.submit(JOB, tasks or [caption(params)], list(enumerate(refs)))
    outcomes = {item.seq: item.future.result(SETTLE_S) for item in work}
    return {seq: (o.state, o.code) for seq, o in outcomes.items()}


@pytest.fixture
def results() -> MemoryResults:
    return MemoryResults()


def test_every_item_captioned_in_bounded_batches(results):
    model = EchoRunner()
    engine = make_engine(model, results, max_batch=4)
    outcomes = run(engine, [f"img-{i / 100}" for i in range(10)])
    engine.stop()
    assert set(outcomes.values()) == {("done", None)}
    assert sum(model.batches) == 10 and max(model.batches) <= 4
    assert sorted(results.values("caption")) == list(range(10))
    assert results.values("caption")[7] == "mean 0.070"
    assert {d.results["caption"][:2] for d in results.done} == {("echo", "echo-1")}


def test_one_bad_item_does_not_fail_its_batchmates(results):
    model = EchoRunner(poison=0.5)
    engine = make_engine(model, results, max_batch=8)
    outcomes = run(engine, ["img-0.1", "img-0.2", "img-0.5", "img-0.3"])
    engine.stop()
    assert outcomes[2] == ("dead", "model_error")
    assert [outcomes[i] for i in (0, 1, 3)] == [("done", None)] * 3
    assert [d.seq for d in results.dead] == [2]


def test_out_of_memory_splits_the_batch(results):
    model = EchoRunner(oom_above=2)
    engine = make_engine(model, results, max_batch=8)
    outcomes = run(engine, [f"img-0.{i}" for i in range(1, 9)])
    engine.stop()
    assert set(outcomes.values()) == {("done", None)}
    assert max(b for b in model.batches if b <= 2) == 2


def test_out_of_memory_alone_asks_for_a_retry(results):
    engine = make_engine(EchoRunner(oom_above=0), results)
    assert run(engine, ["img-0.1"]) == {0: ("retry", "out_of_memory")}
    engine.stop()
    assert results.dead == [] and results.done == []


def test_fetch_errors_are_classified(results):
    engine = make_engine(EchoRunner(), results)
    outcomes = run(engine, ["missing-1", "flaky-1", "img-0.1"])
    engine.stop()
    assert outcomes == {0: ("dead", "not_found"), 1: ("retry", "transient"), 2: ("done", None)}


def test_write_outage_is_ridden_out(results):
    results.fail_next = 2
    engine = make_engine(EchoRunner(), results)
    outcomes = run(engine, ["img-0.1", "img-0.2"])
    engine.stop()
    assert set(outcomes.values()) == {("done", None)}
    assert len(results.done) == 2


def test_write_outage_past_the_limit_asks_for_retry(results):
    results.fail_next = 1000
    engine = make_engine(EchoRunner(), results)
    [item] = engine.submit(JOB, [caption()], [(3, "img-0.1")])
    outcome = item.future.result(SETTLE_S + 2.0)  # past db_retry_s
    engine.stop()
    assert outcome == Outcome(3, "retry", "db_unavailable", "database unavailable (injected)")


def test_every_outcome_names_its_item(results):
    engine = make_engine(EchoRunner(poison=0.5), results, 8)
    work = engine.submit(JOB, [caption()], [(10, "img-0.1"), (11, "img-0.5"), (12, "missing-c")])
    outcomes = [item.future.result(SETTLE_S) for item in work]
    engine.stop()
    assert outcomes[0] == Outcome(10, "done")
    assert outcomes[1].seq == 11 and outcomes[1].state == "dead" and outcomes[1].code == "model_error"
    assert outcomes[1].message is not None and "model failed on a poison input" in outcomes[1].message
    assert outcomes[2] == Outcome(12, "dead", "not_found", "no such file")


class GatedWrites(MemoryResults):
    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def write_done(self, items) -> None:  # type: ignore[no-untyped-def]
        self.entered.set()
        assert self.gate.wait(10), "test never opened the gate"
        super().write_done(items)


def test_writes_still_queued_at_shutdown_are_committed_before_the_writer_exits():
    """stop() queues the writer's end behind the last writes; the writer must commit what it
    had gathered when it meets the end, not drop it."""
    results = GatedWrites()
    engine = Engine(store=results, runners={"caption": EchoRunner()}, fetch=fetch, decode=decode,  # type: ignore[arg-type]
                    worker_name="w", max_batch=1, max_wait_s=0.0, decode_threads=1).start()
    work = engine.submit(JOB, [caption()], [(1, "img-0.1")])
    assert results.entered.wait(SETTLE_S)  # the writer holds the first write alone
    work += engine.submit(JOB, [caption()], [(i, f"img-0.{i}") for i in range(2, 7)])
    stopping = threading.Thread(target=engine.stop, daemon=True)
    stopping.start()
    time.sleep(0.5)  # the other five writes and the end marker are queued behind the held one
    results.gate.set()
    stopping.join(30)
    assert [item.future.done() for item in work] == [True] * 6
    assert sorted(d.seq for d in results.done) == list(range(1, 7))


@dataclass
class GatedModel(EchoRunner):
    """Holds every batch until ``gate`` is set, so an item stays in flight as long as a test needs."""

    gate: threading.Event = dataclass_field(default_factory=threading.Event)

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: object) -> list[object]:
        assert self.gate.wait(10), "test never opened the gate"
        return super().run(pixels, texts, params)


def test_duplicate_submission_joins_the_item_in_flight(results):
    model = GatedModel()
    engine = make_engine(model, results)
    first = engine.submit(JOB, [caption()], [(0, "img-0.1")])
    assert engine.in_flight(JOB, [0, 1]) == {0: first[0]}
    second = engine.submit(JOB, [caption()], [(0, "img-0.1")])
    assert second[0] is first[0]
    model.gate.set()
    first[0].future.result(SETTLE_S)
    engine.stop()
    assert sum(model.batches) == 1 and len(results.done) == 1


def test_beam_search_caps_the_batch(results):
    model = EchoRunner()
    engine = make_engine(model, results, max_batch=8)
    run(engine, [f"img-0.{i}" for i in range(1, 9)], CaptionParams(num_beams=4))
    engine.stop()
    assert max(model.batches) <= 2


def test_decoded_images_waiting_for_the_model_are_bounded(results):
    """Backpressure: decode threads stop once 4 x max_batch images wait, however many are submitted."""
    model = GatedModel()
    engine = make_engine(model, results, max_batch=2)
    work = engine.submit(JOB, [caption()], [(i, f"img-0.{i}") for i in range(40)])
    time.sleep(0.5)
    waiting = sum(bool(item.inputs) for item in work)
    model.gate.set()
    for item in work:
        assert item.future.result(SETTLE_S).state == "done"
    engine.stop()
    assert waiting <= 8  # 4 x max_batch
    assert len(results.done) == 40


def test_caption_and_embed_decode_each_image_once_and_write_both_together(results):
    cap, emb = EchoRunner(), EchoRunner(kind="embed", name="echo-embed")
    engine = make_engine(cap, results, 4, emb)
    DECODES.clear()
    refs = [f"img-0.{i}" for i in range(1, 7)]
    outcomes = run(engine, refs, tasks=[caption(), make_task("embed", "echo-embed", EmbedParams())])
    engine.stop()
    assert set(outcomes.values()) == {("done", None)}
    assert sorted(DECODES) == sorted(refs)  # one decode per image for both kinds
    # Equal preprocessing (same prep key) is done once per item and shared by both kinds...
    assert cap.prepared + emb.prepared == 6
    assert sum(cap.batches) == 6 and sum(emb.batches) == 6
    # ...and each item is written once, with both results in the same row set.
    assert sorted(d.seq for d in results.done) == list(range(6))
    assert all(set(d.results) == {"caption", "embed"} for d in results.done)
    vec = results.values("embed")[0]
    assert abs(float(np.linalg.norm(vec)) - 1) < 1e-6


def test_a_kind_failing_on_an_item_dead_letters_the_whole_item(results):
    cap, emb = EchoRunner(), EchoRunner(kind="embed", name="echo-embed", poison=0.5)
    engine = make_engine(cap, results, 4, emb)
    outcomes = run(engine, ["img-0.1", "img-0.5"], tasks=[caption(), make_task("embed", "echo-embed", EmbedParams())])
    engine.stop()
    assert outcomes == {0: ("done", None), 1: ("dead", "model_error")}
    assert [d.seq for d in results.done] == [0] and [d.seq for d in results.dead] == [1]


def test_pair_items_carry_their_text_to_the_runner_and_the_store(results):
    val = EchoRunner(kind="validate", name="echo-itm")
    engine = make_engine(val, results)
    work = engine.submit(JOB, [make_task("validate", "echo-itm", ValidateParams())],
                         [(0, "img-0.1", "a dog"), (1, "img-0.2", "two cats here")])
    assert [w.future.result(SETTLE_S).state for w in work] == ["done", "done"]
    engine.stop()
    assert results.values("validate") == {0: (np.float32(0.1).item(), 0.05), 1: (np.float32(0.2).item(), 0.13)}
    assert {d.seq: d.text for d in results.done} == {0: "a dog", 1: "two cats here"}


def test_a_text_the_runner_refuses_is_dead_lettered_before_inference(results):
    class Strict(EchoRunner):
        def check_text(self, text: str) -> None:
            if len(text) > 5:
                raise errors.BadText("too long")

    val = Strict(kind="validate", name="echo-itm")
    engine = make_engine(val, results)
    work = engine.submit(JOB, [make_task("validate", "echo-itm", ValidateParams())],
                         [(0, "img-0.1", "short"), (1, "img-0.2", "much too long")])
    states = [(w.future.result(SETTLE_S).state, w.future.result(SETTLE_S).code) for w in work]
    engine.stop()
    assert states == [("done", None), ("dead", "bad_text")]
    assert sum(val.batches) == 1


class BrokenRunner(EchoRunner):
    """A model or device that fails every batch (a CUDA error, a corrupted checkpoint)."""

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: object) -> list[object]:
        self.batches.append(len(pixels))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_broken_model_does_not_dead_letter_the_queue_and_reports_itself(results):
    reasons: list[str] = []
    engine = Engine(store=results, runners={"caption": BrokenRunner()}, fetch=fetch, decode=decode,  # type: ignore[arg-type]
                    worker_name="w", max_batch=4, max_wait_s=0.01, decode_threads=2, db_retry_s=2.0,
                    max_strikes=3, on_unhealthy=reasons.append).start()
    outcomes: dict[int, tuple[str, str | None]] = {}
    for round_ in range(4):  # one batch at a time, so each is a strike
        outcomes |= {seq + 10 * round_: o for seq, o in run(engine, ["img-0.1", "img-0.2"]).items()}
    engine.stop()
    assert results.dead == [] and results.done == []
    assert {o for o in outcomes.values()} == {("retry", "model_unhealthy"), ("retry", "transient")}
    assert engine.unhealthy is not None and len(reasons) == 1 and "CUDA error" in reasons[0]


def test_an_item_failing_alone_while_the_model_works_is_model_error(results):
    model = EchoRunner(poison=0.5)
    engine = make_engine(model, results, max_batch=4)
    assert run(engine, ["img-0.1"]) == {0: ("done", None)}  # the model works
    assert run(engine, ["img-0.5"]) == {0: ("dead", "model_error")}  # alone, yet the item's fault
    engine.stop()
    assert engine.unhealthy is None


def test_a_decode_past_its_time_bound_is_dead_lettered_and_its_batchmates_go_on(results):
    def slow_decode(data: bytes) -> Decoded:
        if data.startswith(b"slow"):
            time.sleep(3.0)
        return decode(data.replace(b"slow", b"img"))

    engine = Engine(store=results, runners={"caption": EchoRunner()}, fetch=fetch, decode=slow_decode,  # type: ignore[arg-type]
                    worker_name="w", max_batch=4, max_wait_s=0.01, decode_threads=2, db_retry_s=2.0,
                    decode_timeout_s=0.3).start()
    t0 = time.monotonic()
    work = engine.submit(JOB, [caption()], [(0, "slow-0.1"), (1, "img-0.2")])
    outcomes = {w.seq: (w.future.result(SETTLE_S).state, w.future.result(SETTLE_S).code) for w in work}
    settled_s = time.monotonic() - t0
    time.sleep(3.0)  # the late decode ends; its result must be dropped
    engine.stop()
    assert outcomes == {0: ("dead", "decode_timeout"), 1: ("done", None)}
    assert settled_s < 2.4, "the item settles at the 0.3 s bound, not when the 3 s decode ends"
    assert [d.seq for d in results.done] == [1] and [d.seq for d in results.dead] == [0]


def test_dead_letters_and_retries_carry_the_item_its_code_and_the_error(results):
    """What the writer stores for a dead item, and what a retry tells the service, are the
    error's own code and message, for the right item, under this worker's name."""
    engine = make_engine(EchoRunner(), results)
    work = engine.submit(JOB, [caption()], [(5, "missing-a"), (6, "flaky-b")])
    retry = work[1].future.result(SETTLE_S)
    work[0].future.result(SETTLE_S)
    engine.stop()
    [dead] = results.dead
    assert (dead.job, dead.seq, dead.code, dead.message, dead.worker) == (JOB, 5, "not_found", "no such file", "w")
    assert (retry.seq, retry.state, retry.code, retry.message) == (6, "retry", "transient", "S3 error SlowDown")


def test_an_error_without_a_message_says_what_its_class_means():
    assert errors.NotFound().message == "The object or file does not exist."
    assert errors.NotFound("gone").message == "gone"


def test_failures_before_inference_are_counted_for_ops_by_code(results):
    from imgq import metrics

    def failures(code: str) -> float:
        return metrics.FAILURES.labels(code)._value.get()

    before = {code: failures(code) for code in ("not_found", "transient")}
    engine = make_engine(EchoRunner(), results, 8)
    work = engine.submit(JOB, [caption()], [(1, "missing-a"), (2, "missing-b"), (3, "flaky-c")])
    assert [item.future.result(SETTLE_S).code for item in work] == ["not_found", "not_found", "transient"]
    engine.stop()
    assert failures("not_found") - before["not_found"] == 2
    assert failures("transient") - before["transient"] == 1
