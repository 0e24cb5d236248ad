"""Guarantees of the engine that mutation testing found unpinned (the survivors of worker/engine.py).

Each test is fast and deterministic: where batch composition matters, every item is prepared before
the inference thread starts (``queued``), so batches form by size limit, never by timing; where time
matters, the engine gets a fake clock (or the writer a fake ``time``).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from imgq import errors
from imgq.contract import CaptionParams, TaskSpec, make_task
from imgq.params import EmbedParams, TranslateParams, ValidateParams
from imgq.worker import engine as engine_module
from imgq.worker.engine import Engine, Outcome, WorkItem, _Write
from imgq.worker.fakes import EchoRunner, EchoTranslator, MemoryResults, OutOfMemoryError
from tests.unit.test_engine import GatedModel, decode
from tests.unit.test_engine_accounting import CAPTION, build, engine_of, eventually, gated, settle
from tests.waits import SETTLE_S

JOB = uuid.uuid4()


def queued(engine: Engine, tasks: list[TaskSpec], refs: list[str], job: uuid.UUID = JOB) -> list[WorkItem]:
    """Submit to an engine not started, wait until its decode pool is done, then start it: every
    entry is queued before the first batch forms. (The pool takes no more work after this.)"""
    work = engine.submit(job, tasks, list(enumerate(refs)))
    engine._pool.shutdown(wait=True)
    engine.start()
    return work


def outcomes(work: list[WorkItem]) -> list[Outcome]:
    return [w.future.result(SETTLE_S) for w in work]


class HeldDecode:
    """Decodes ``held-<value>`` refs only once ``release(ref)``; ``entered`` names each as it starts."""

    def __init__(self) -> None:
        self.entered: queue.Queue[str] = queue.Queue()
        self.gates: defaultdict[str, threading.Event] = defaultdict(threading.Event)

    def __call__(self, data: bytes) -> Any:
        ref = data.decode()
        if ref.startswith("held"):
            self.entered.put(ref)
            assert self.gates[ref].wait(SETTLE_S), "test never released the decode"
        return decode(ref.replace("held", "img").encode())

    def release(self, ref: str) -> None:
        self.gates[ref].set()

    def release_all(self) -> None:
        for ref in ("held-0.1", "held-0.2", "held-0.3", "held-0.4"):
            self.release(ref)


@dataclass
class Recording(EchoRunner):
    """Records what the engine hands the model: the params of prepare/run/run_adapters, and texts."""

    seen: list[tuple[Any, ...]] = field(default_factory=list)

    def prepare(self, image: Any, params: Any, original: tuple[int, int] | None = None) -> np.ndarray:
        self.seen.append(("prepare", params))
        return super().prepare(image, params, original)

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: Any) -> list[Any]:
        self.seen.append(("run", texts, params))
        return super().run(pixels, texts, params)

    def run_adapters(self, pixels: np.ndarray, params: Any, adapters: list[str | None]) -> list[Any]:
        self.seen.append(("run_adapters", params, adapters))
        return super().run_adapters(pixels, params, adapters)


# -- batching ---------------------------------------------------------------------------------------
def test_a_lone_item_runs_at_once_when_nothing_else_is_being_prepared():
    """The idle flush: with no decode under way and nothing queued, a batch does not wait out
    max_wait (a minute here). Pins the count of items being prepared (it must return to zero) and the
    flush condition; the stored row names this worker."""
    results = MemoryResults()
    engine = build(results, EchoRunner(), max_wait_s=60.0)
    work = queued(engine, [CAPTION], ["img-0.1"])
    assert outcomes(work) == [Outcome(0, "done")]
    engine.stop()
    [row] = results.done
    assert (row.job, row.seq, row.worker, row.results["caption"][4]) == (JOB, 0, "w", "mean 0.100")


def test_an_engine_that_idled_past_its_poll_still_takes_work():
    """The inference thread outlives empty polls (0.2 s each with nothing batched): a worker that
    sat idle between messages must still run the next one."""
    results = MemoryResults()
    engine = engine_of(results, EchoRunner())
    time.sleep(0.45)  # two empty polls
    assert settle(engine, [CAPTION], ["img-0.1"]) == [("done", None)]
    engine.stop()


def test_a_batch_due_by_max_wait_runs_while_another_item_is_still_decoding():
    """The inference thread waits for the next entry only until the oldest batch is due: an item
    must not wait for an unrelated decode to end."""
    held = HeldDecode()
    engine = build(MemoryResults(), EchoRunner(), decoder=held).start()
    try:
        work = engine.submit(JOB, [CAPTION], [(0, "img-0.1"), (1, "held-0.2")])
        assert work[0].future.result(SETTLE_S) == Outcome(0, "done")
        assert not work[1].future.done()
    finally:
        held.release_all()
    assert work[1].future.result(SETTLE_S) == Outcome(1, "done")
    engine.stop()


def test_beam_search_cost_rounds_the_batch_limit_down():
    """max_batch 8 at 3 beams an image: batches of 8 // 3 = 2 images (6 sequences), never 3 (9)."""
    runner = EchoRunner()
    engine = build(MemoryResults(), runner, max_batch=8, max_wait_s=60.0)
    work = queued(
        engine, [make_task("caption", "echo", CaptionParams(num_beams=3))], [f"img-0.{i}" for i in range(1, 7)]
    )
    assert {o.state for o in outcomes(work)} == {"done"}
    engine.stop()
    assert runner.batches == [2, 2, 2]


def test_translation_batches_fill_up_to_max_batch():
    """A stage's batches (keyed per language) cost one unit per text: four captions make one
    translation batch of four at max_batch 4."""
    translator = EchoTranslator()
    engine = build(MemoryResults(), EchoRunner(), translator, max_batch=4, max_wait_s=60.0)
    tasks = [CAPTION, make_task("translate", "echo-mt", TranslateParams(langs=["de"]))]
    work = queued(engine, tasks, [f"img-0.{i}" for i in range(1, 5)])
    assert {o.state for o in outcomes(work)} == {"done"}
    engine.stop()
    assert translator.batches == [("de", 4)]


def test_decoded_items_waiting_for_the_model_may_reach_four_batches():
    """The backpressure bound is 4 x max_batch (12 at max_batch 3, more than the floor of 8): that
    many items get decoded and prepared while the model is busy."""
    model = GatedModel()
    engine = engine_of(MemoryResults(), model, max_batch=3, max_wait_s=0.01)
    work = engine.submit(JOB, [CAPTION], [(i, f"img-0.{i}") for i in range(14)])
    try:
        assert eventually(lambda: model.prepared == 12), model.prepared
    finally:
        model.gate.set()
    assert {o.state for o in outcomes(work)} == {"done"}
    engine.stop()


def test_the_decode_pool_has_decode_threads_threads():
    """At most decode_threads decodes run at once: three held decodes start two pool threads."""
    held = HeldDecode()
    engine = build(MemoryResults(), EchoRunner(), decoder=held, decode_threads=2).start()
    before = set(threading.enumerate())
    try:
        work = engine.submit(JOB, [CAPTION], [(0, "held-0.1"), (1, "held-0.2"), (2, "held-0.3")])
        started = [t for t in set(threading.enumerate()) - before if t.name.startswith("imgq-decode")]
        assert len(started) == 2
    finally:
        held.release_all()
    assert {o.state for o in outcomes(work)} == {"done"}
    engine.stop()


def test_a_second_delivery_joins_its_item_and_the_rest_of_its_message_still_runs():
    """An item already in flight, delivered again in a message with new items, is joined; the
    message's other items are submitted too."""
    runner = EchoRunner()
    results = MemoryResults()
    engine = build(results, runner)  # not started: the first item stays in flight
    [first] = engine.submit(JOB, [CAPTION], [(0, "img-0.1")])
    second = engine.submit(JOB, [CAPTION], [(0, "img-0.1"), (1, "img-0.2")])
    assert [w.seq for w in second] == [0, 1] and second[0] is first
    engine.start()
    assert outcomes(second) == [Outcome(0, "done"), Outcome(1, "done")]
    engine.stop()
    assert sum(runner.batches) == 2
    assert sorted(d.seq for d in results.done) == [0, 1]


def test_a_settled_item_is_no_longer_in_flight():
    """Once an item settles, a new delivery of it is new work, not a join of the old outcome."""
    engine = engine_of(MemoryResults(), EchoRunner())
    [item] = engine.submit(JOB, [CAPTION], [(0, "img-0.1")])
    assert item.future.result(SETTLE_S) == Outcome(0, "done")
    assert eventually(lambda: engine.in_flight(JOB, [0]) == {})  # its callbacks run just after the result
    [again] = engine.submit(JOB, [CAPTION], [(0, "img-0.1")])
    assert again is not item and again.future.result(SETTLE_S) == Outcome(0, "done")
    engine.stop()


# -- what the model receives ------------------------------------------------------------------------
def test_the_runner_gets_each_tasks_params_and_no_texts_for_image_only_kinds():
    """prepare and run see the task's own parameters; an image-only kind gets texts=None."""
    runner = Recording()
    params = CaptionParams(max_new_tokens=12)
    engine = engine_of(MemoryResults(), runner)
    assert settle(engine, [make_task("caption", "echo", params)], ["img-0.1"]) == [("done", None)]
    engine.stop()
    assert runner.seen == [("prepare", params), ("run", None, params)]


def test_captions_with_an_adapter_get_the_batchs_params():
    """The adapter path is handed the batch's generation parameters, not None."""
    runner = Recording()
    params = CaptionParams(max_new_tokens=12, adapter="de-news")
    engine = engine_of(MemoryResults(), runner)
    assert settle(engine, [make_task("caption", "echo", params)], ["img-0.1"]) == [("done", None)]
    engine.stop()
    assert runner.seen[1] == ("run_adapters", params, ["de-news"])


def test_an_empty_pair_text_reaches_the_model_empty():
    """A pair item whose text is empty is run with "" (the validate fake scores len(text) / 100)."""
    results = MemoryResults()
    engine = engine_of(results, EchoRunner(kind="validate", name="echo-itm"))
    work = engine.submit(JOB, [make_task("validate", "echo-itm", ValidateParams())], [(0, "img-0.5", "")])
    assert outcomes(work) == [Outcome(0, "done")]
    engine.stop()
    assert results.values("validate") == {0: (0.5, 0.0)}


# -- failures -------------------------------------------------------------------------------------
def test_poison_items_in_both_halves_of_a_split_batch_are_the_items_fault():
    """A batch of four with a poison item in each half: two succeed, so the two poison items are
    model_error (dead), not a model failure (retry)."""
    engine = build(MemoryResults(), EchoRunner(poison=0.5), max_batch=4, max_wait_s=60.0, decode_threads=1)
    work = queued(engine, [CAPTION], ["img-0.1", "img-0.5", "img-0.2", "img-0.5"])
    got = [(o.state, o.code) for o in outcomes(work)]
    engine.stop()
    assert got == [("done", None), ("dead", "model_error"), ("done", None), ("dead", "model_error")]


@dataclass
class OomOn(EchoRunner):
    """Runs out of memory on an image of mean ``oom`` (other images work)."""

    oom: float = 0.9

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: Any) -> list[Any]:
        if np.any(np.isclose(pixels.reshape(len(pixels), -1).mean(axis=1), self.oom)):
            raise OutOfMemoryError("no room for this one")
        return super().run(pixels, texts, params)


def test_out_of_memory_alone_while_the_model_works_asks_for_a_retry():
    """An item out of memory alone is not its fault: the device is busy; the item comes back."""
    results = MemoryResults()
    engine = engine_of(results, OomOn())
    assert settle(engine, [CAPTION], ["img-0.1"]) == [("done", None)]  # the model works
    [item] = engine.submit(JOB, [CAPTION], [(7, "img-0.9")])
    outcome = item.future.result(SETTLE_S)
    engine.stop()
    assert outcome == Outcome(7, "retry", "out_of_memory", "OutOfMemoryError: no room for this one")
    assert results.dead == []


@dataclass
class FailsOnHalf(EchoRunner):
    """Fails a batch holding an image of mean 0.5 or more, naming the first such image."""

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: Any) -> list[Any]:
        means = pixels.reshape(len(pixels), -1).mean(axis=1)
        if bad := [m for m in means if m >= 0.5]:
            raise ValueError(f"no caption for mean {bad[0]:.1f}")
        return super().run(pixels, texts, params)


def test_three_failed_batches_in_a_row_by_default_make_the_model_unhealthy():
    """Strikes: by default three failed batches in a row make the model unhealthy, naming the first
    item's error of the last; a batch that succeeds clears them. Each pair is one batch (max_batch 2,
    its decodes held until both are submitted, one decode thread: in submission order), and the
    inference thread ends a batch's bookkeeping before the next, so each pair sees the strikes of
    those before it."""
    gate = threading.Event()
    unhealthy: list[str] = []
    engine = build(
        MemoryResults(),
        FailsOnHalf(),
        max_batch=2,
        max_wait_s=60.0,
        decode_threads=1,
        decoder=gated(gate),
        on_unhealthy=unhealthy.append,
    ).start()

    def pair(a: str, b: str) -> list[tuple[str, str | None, str | None]]:
        gate.clear()
        work = engine.submit(uuid.uuid4(), [CAPTION], [(0, f"img-0.{a}"), (1, f"img-0.{b}")])
        gate.set()
        return [(o.state, o.code, o.message) for o in outcomes(work)]

    def failed(*means: str) -> list[tuple[str, str | None, str | None]]:
        return [
            ("retry", "model_unhealthy", f"every item of the batch failed: ValueError: no caption for mean 0.{m}")
            for m in means
        ]

    done = [("done", None, None)] * 2
    assert pair("5", "6") == failed("5", "6")
    assert pair("1", "2") == done
    assert pair("5", "6") == failed("5", "6") and pair("6", "5") == failed("6", "5")  # two since the success
    assert pair("1", "2") == done
    assert pair("5", "6") == failed("5", "6") and pair("5", "6") == failed("5", "6")
    assert pair("7", "5") == failed("7", "5")
    reason = "3 batches in a row failed entirely; last: ValueError: no caption for mean 0.7"
    assert pair("1", "2") == [("retry", "transient", f"worker unhealthy: {reason}")] * 2
    engine.stop()
    assert unhealthy == [reason]


class WithdrawnAdapter(EchoRunner):
    """Like a caption runner whose adapter files are refused: a batch holding an image of mean 0.5 or
    more raises AdapterUnavailable, the permanent error imgq's own adapter loading raises."""

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: Any) -> list[Any]:
        means = pixels.reshape(len(pixels), -1).mean(axis=1)
        if bad := [m for m in means if m >= 0.5]:
            raise errors.AdapterUnavailable(f"adapter for mean {bad[0]:.1f} is outside IMGQ_LOCAL_ROOTS")
        return super().run(pixels, texts, params)


def test_a_permanent_error_of_imgq_is_the_items_and_never_strikes_the_model():
    """An adapter refused in every batch dead-letters its items under their own code on the first
    delivery, in a batch alone or with batchmates that caption; however many batches fail that way,
    the model is not made unhealthy (it was: model_unhealthy, retried until the worker stopped)."""
    gate = threading.Event()
    unhealthy: list[str] = []
    engine = build(MemoryResults(), WithdrawnAdapter(), max_batch=2, max_wait_s=60.0, decode_threads=1,
                   decoder=gated(gate), on_unhealthy=unhealthy.append).start()

    def pair(a: str, b: str) -> list[tuple[str, str | None, str | None]]:
        gate.clear()
        work = engine.submit(uuid.uuid4(), [CAPTION], [(0, f"img-0.{a}"), (1, f"img-0.{b}")])
        gate.set()
        return [(o.state, o.code, o.message) for o in outcomes(work)]

    def refused(m: str) -> tuple[str, str | None, str | None]:
        return ("dead", "adapter_unavailable", f"adapter for mean 0.{m} is outside IMGQ_LOCAL_ROOTS")

    for _ in range(4):  # past the default three strikes
        assert pair("5", "6") == [refused("5"), refused("6")]
    assert pair("1", "7") == [("done", None, None), refused("7")]
    assert pair("1", "2") == [("done", None, None)] * 2
    engine.stop()
    assert engine.unhealthy is None and unhealthy == []


class NanFor(EchoRunner):
    """An embed runner whose vector is NaN for images of mean 0.5 or more."""

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: Any) -> list[Any]:
        means = pixels.reshape(len(pixels), -1).mean(axis=1)
        return [np.array([np.nan, 1.0], dtype=np.float32) if m >= 0.5 else np.array([m, 1.0], dtype=np.float32)
                for m in means]


EMBED = make_task("embed", "echo", EmbedParams())


def test_an_output_that_cannot_be_stored_is_its_items_model_error_and_a_batch_of_them_a_strike():
    """A NaN vector is caught before the write (where pgvector would refuse the whole coalesced
    transaction): among vectors that are fine it is that item's model_error; a batch of nothing
    but NaNs is the model's fault (a strike, retried), as any batch that fails entirely."""
    results = MemoryResults()
    engine = build(results, NanFor(kind="embed"), max_batch=4, max_wait_s=60.0, decode_threads=1)
    work = queued(engine, [EMBED], ["img-0.1", "img-0.5", "img-0.2", "img-0.3"])
    assert [(o.state, o.code, o.message) for o in outcomes(work)] == [
        ("done", None, None), ("dead", "model_error", "embed model returned a vector with NaN or infinite values"),
        ("done", None, None), ("done", None, None)]
    assert sorted(d.seq for d in results.done) == [0, 2, 3]
    engine.stop()
    engine = build(MemoryResults(), NanFor(kind="embed"), max_batch=2, max_wait_s=60.0, decode_threads=1)
    work = queued(engine, [EMBED], ["img-0.6", "img-0.7"])
    assert {(o.state, o.code) for o in outcomes(work)} == {("retry", "model_unhealthy")}
    engine.stop()


@dataclass
class RefusesSeq(MemoryResults):
    """Refuses (not an outage: a ValueError, as a driver's data error) any write holding seq 2."""

    def write_done(self, items: Any) -> None:
        if any(i.seq == 2 for i in items):
            raise ValueError("row 2 cannot be written")
        super().write_done(items)


def test_a_row_the_database_refuses_fails_alone_and_its_batchmates_commit():
    results = RefusesSeq()
    engine = build(results, EchoRunner(), max_batch=4, max_wait_s=60.0, decode_threads=1, db_retry_s=30.0)
    started = time.monotonic()
    work = queued(engine, [CAPTION], ["img-0.1", "img-0.2", "img-0.3", "img-0.4"])
    assert [(o.state, o.code) for o in outcomes(work)] == [("done", None), ("done", None),
                                                           ("retry", "transient"), ("done", None)]
    assert outcomes(work)[2].message == "result write failed: row 2 cannot be written"
    assert time.monotonic() - started < 10, "not retried as an outage until db_retry_s"
    assert sorted(d.seq for d in results.done) == [0, 1, 3]
    engine.stop()


@pytest.mark.parametrize(("value", "reason"), [
    (np.ones(3, dtype=np.float32), None),
    (np.ones(1, dtype=np.float32), None),  # a 1-d vector of one value is a vector
    (np.ones((2, 2), dtype=np.float32), "an output of shape (2, 2), not a vector"),
    (np.ones(0, dtype=np.float32), "an output of shape (0,), not a vector"),
    (np.array([1.0, np.inf], dtype=np.float32), "a vector with NaN or infinite values"),
    ((0.4, 0.9), None),
    ((0.4, float("nan")), "a score of nan"),
    ((float("-inf"), float("nan")), "a score of -inf"),
    (float("nan"), "a score of nan"),
    (np.float32(0.5), None),
    ("a cat", None),
])
def test_what_cannot_be_a_result_is_named(value: Any, reason: str | None):
    assert engine_module.unstorable(value) == reason


@dataclass
class RefusesDead(MemoryResults):
    """Refuses (a data error, not an outage) any dead-letter write holding seq 1."""

    def write_dead(self, rows: Any) -> None:
        if any(r.seq == 1 for r in rows):
            raise ValueError("dead row 1 cannot be written")
        super().write_dead(rows)


def test_a_refused_dead_letter_is_retried_alone_and_the_others_are_written():
    results = RefusesDead()
    engine = build(results, FailsOnHalf(), max_batch=4, max_wait_s=60.0, decode_threads=1)
    work = queued(engine, [CAPTION], ["img-0.1", "img-0.5", "img-0.2", "img-0.6"])
    got = outcomes(work)
    assert [(o.seq, o.state, o.code) for o in got] == [(0, "done", None), (1, "retry", "transient"),
                                                       (2, "done", None), (3, "dead", "model_error")]
    assert got[1].message == "result write failed: dead row 1 cannot be written"
    # The halves write their done rows again (the write's results committed before its dead letters
    # failed): the store's state guard makes that a no-op, and this fake records each call.
    assert [d.seq for d in results.dead] == [3] and sorted({d.seq for d in results.done}) == [0, 2]
    engine.stop()


def test_failed_items_give_back_their_decode_slot():
    """Items failing before inference free their backpressure slot (8 at max_batch 2): a worker
    seeing that many bad refs in a row does not stall its decode threads for good."""
    engine = engine_of(MemoryResults(), EchoRunner(), max_batch=2)
    try:
        work = engine.submit(JOB, [CAPTION], [(i, f"missing-{i}") for i in range(8)])
        assert [(o.state, o.code) for o in outcomes(work)] == [("dead", "not_found")] * 8
        # Checked on the semaphore: a leak would otherwise show as a decode thread blocked for ever.
        assert eventually(lambda: engine._decoded._value == engine._decoded._initial_value)  # type: ignore[attr-defined]
    finally:
        engine.stop()


# -- decode time bound ----------------------------------------------------------------------------
def test_a_decode_past_the_default_bound_is_dead_lettered_with_the_bound_named():
    """The default bound is 30 s; a decode of exactly 30 s is not late, one of 30.5 s is: its item
    (and only it) is dead-lettered with code decode_timeout and a message naming the setting."""
    now = [0.0]
    held = HeldDecode()
    results = MemoryResults()
    engine = build(results, EchoRunner(), decoder=held, clock=lambda: now[0]).start()
    try:
        [first] = engine.submit(JOB, [CAPTION], [(0, "held-0.1")])
        assert held.entered.get(timeout=SETTLE_S) == "held-0.1"
        now[0] = 30.0
        engine._expire_decodes()
        held.release("held-0.1")
        assert first.future.result(SETTLE_S) == Outcome(0, "done")

        [late] = engine.submit(JOB, [CAPTION], [(1, "held-0.2")])
        assert held.entered.get(timeout=SETTLE_S) == "held-0.2"
        now[0] = 60.5
        engine._expire_decodes()
        message = "decoding took longer than IMGQ_DECODE_TIMEOUT_S=30s"
        assert late.future.result(SETTLE_S) == Outcome(1, "dead", "decode_timeout", message)
    finally:
        held.release_all()
    engine.stop()
    [dead] = results.dead
    assert (dead.job, dead.seq, dead.code, dead.message, dead.worker) == (JOB, 1, "decode_timeout", message, "w")
    assert [d.seq for d in results.done] == [0]


def test_a_decode_that_ended_is_never_expired_later():
    """Once its decode ends an item no longer counts as decoding: time passing after that does not
    dead-letter it."""
    now = [0.0]
    engine = build(MemoryResults(), EchoRunner(), clock=lambda: now[0], max_wait_s=60.0)
    work = engine.submit(JOB, [CAPTION], [(0, "img-0.1")])
    engine._pool.shutdown(wait=True)  # decoded
    now[0] = 100.0
    engine._expire_decodes()
    engine.start()
    assert outcomes(work) == [Outcome(0, "done")]
    engine.stop()


# -- shutdown ---------------------------------------------------------------------------------------
def test_stop_waits_for_the_decodes_under_way():
    """stop() lets a decode under way finish and its item settle before the threads end."""
    held = HeldDecode()
    engine = build(MemoryResults(), EchoRunner(), decoder=held).start()
    [item] = engine.submit(JOB, [CAPTION], [(0, "held-0.1")])
    assert held.entered.get(timeout=SETTLE_S) == "held-0.1"
    opener = threading.Timer(0.05, held.release_all)
    opener.start()
    engine.stop()
    opener.join()
    assert item.future.done() and item.future.result() == Outcome(0, "done")


# -- metrics --------------------------------------------------------------------------------------
def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"kind": "caption"}) or 0.0


def test_batch_wait_and_model_time_record_the_time_spent():
    """A batch opened and run at the same clock reading waited 0 s; model seconds are within the
    wall time of the whole run."""
    names = ("imgq_batch_wait_seconds_sum", "imgq_batch_wait_seconds_count", "imgq_model_seconds_sum")
    before = {name: sample(name) for name in names}
    engine = engine_of(MemoryResults(), EchoRunner(), clock=lambda: 1000.0)
    started = time.perf_counter()
    assert settle(engine, [CAPTION], ["img-0.1"]) == [("done", None)]
    wall = time.perf_counter() - started
    engine.stop()
    grew = {name: sample(name) - before[name] for name in names}
    assert grew["imgq_batch_wait_seconds_count"] == 1 and grew["imgq_batch_wait_seconds_sum"] == 0.0
    assert 0.0 < grew["imgq_model_seconds_sum"] <= wall


@dataclass
class SlowEcho(EchoRunner):
    """Each model call takes ``seconds`` of the fake clock ``now``."""

    now: list[float] = field(default_factory=lambda: [1000.0])
    seconds: float = 5.0

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: Any) -> list[Any]:
        self.now[0] += self.seconds
        return super().run(pixels, texts, params)


def test_batch_wait_ends_when_the_batch_leaves_the_batcher_not_after_the_batches_run_before_it():
    """Two batches (two params) leave the batcher together; the second's wait must not include the
    first one's model time (it waited for batchmates 0 s: the clock moves only in the model)."""
    runner = SlowEcho()
    names = ("imgq_batch_wait_seconds_sum", "imgq_batch_wait_seconds_count")
    before = {name: sample(name) for name in names}
    engine = build(MemoryResults(), runner, clock=lambda: runner.now[0], max_wait_s=60.0)
    beams = make_task("caption", "echo", CaptionParams(num_beams=2))
    work = engine.submit(JOB, [CAPTION], [(0, "img-0.1")]) + engine.submit(uuid.uuid4(), [beams], [(0, "img-0.2")])
    engine._pool.shutdown(wait=True)
    engine.start()
    assert [o.state for o in outcomes(work)] == ["done", "done"]
    engine.stop()
    assert runner.batches == [1, 1] and runner.now[0] == 1010.0
    grew = {name: sample(name) - before[name] for name in names}
    assert grew == {"imgq_batch_wait_seconds_count": 2, "imgq_batch_wait_seconds_sum": 0.0}


# -- the writer ---------------------------------------------------------------------------------------
class CountingResults(MemoryResults):
    def __init__(self) -> None:
        super().__init__()
        self.dead_writes: list[int] = []

    def write_dead(self, rows) -> None:  # type: ignore[no-untyped-def]
        if rows:
            self.dead_writes.append(len(rows))
        super().write_dead(rows)


def dead_write(seq: int) -> tuple[WorkItem, _Write]:
    item = WorkItem(JOB, seq, f"missing-{seq}", (CAPTION,))
    return item, _Write(dead=[(item, errors.NotFound("gone"))])


def test_the_writer_coalesces_at_most_64_queued_writes_per_transaction():
    """Under load queued writes are merged, 64 at most to a transaction; every item settles."""
    results = CountingResults()
    engine = build(results, EchoRunner())
    items = []
    for seq in range(65):
        item, write = dead_write(seq)
        items.append(item)
        engine._writes.put(write)
    engine._writes.put(None)
    engine._write_loop()  # returns at the end marker
    assert results.dead_writes == [64, 1]
    assert [i.future.result(0) for i in items] == [Outcome(s, "dead", "not_found", "gone") for s in range(65)]


@pytest.fixture
def fake_time(monkeypatch):  # type: ignore[no-untyped-def]
    """The writer's clock and sleep, fake: sleeping advances the clock; ``slept`` lists the delays."""
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(
        engine_module, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=sleep, perf_counter=time.perf_counter)
    )
    return slept


def test_a_failing_write_is_retried_with_doubling_delays_capped_at_five_seconds(fake_time):
    """Backoff 0.2, 0.4, ... s, at most 5 s, until db_retry_s (20 s) would be passed; then retry."""
    results = MemoryResults(fail_next=100)
    engine = build(results, EchoRunner(), db_retry_s=20.0)
    item, write = dead_write(3)
    engine._commit(write)
    assert fake_time == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert item.future.result(0) == Outcome(3, "retry", "db_unavailable", "database unavailable (injected)")


def test_a_write_retry_that_would_end_exactly_at_the_deadline_is_still_made(fake_time):
    """db_retry_s 0.2: the first retry, 0.2 s later, ends at the deadline, not past it."""
    results = MemoryResults(fail_next=100)
    engine = build(results, EchoRunner(), db_retry_s=0.2)
    item, write = dead_write(4)
    engine._commit(write)
    assert fake_time == [0.2]
    assert item.future.result(0).code == "db_unavailable"


def test_a_model_call_past_wedged_after_s_makes_the_engine_unhealthy_once():
    """A call that never returns raises nothing: only the watchdog can see it (e2e:
    tests/e2e/test_hardening.py, with a real worker)."""
    reasons: list[str] = []
    model = GatedModel()
    engine = engine_of(MemoryResults(), model, wedged_after_s=0.3, on_unhealthy=reasons.append)
    assert engine.wedged() is None
    work = engine.submit(uuid.uuid4(), [CAPTION], [(0, "img-0.1")])
    assert eventually(lambda: reasons, 5), "the watchdog never fired"
    time.sleep(0.2)
    assert len(reasons) == 1 and "inference is wedged" in reasons[0] and engine.unhealthy == reasons[0]
    assert "inference is wedged" in (engine.wedged() or "")
    model.gate.set()
    assert work[0].future.result(SETTLE_S).state == "done"  # the late call's result still counts
    assert engine.wedged() is None
    engine.stop()


def test_without_wedged_after_s_a_slow_call_is_never_judged():
    reasons: list[str] = []
    model = GatedModel()
    engine = engine_of(MemoryResults(), model, on_unhealthy=reasons.append)
    work = engine.submit(uuid.uuid4(), [CAPTION], [(0, "img-0.1")])
    time.sleep(0.5)
    assert engine.wedged() is None and not reasons
    model.gate.set()
    assert work[0].future.result(SETTLE_S).state == "done"
    engine.stop()
