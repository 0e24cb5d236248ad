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
from imgq.contract import CaptionParams
from imgq.worker.engine import Engine
from imgq.worker.fakes import EchoModel, MemoryResults

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


def prepare(data: bytes, params: CaptionParams) -> tuple[np.ndarray, int, int]:
    value = float(data.decode().split("-")[-1])  # refs look like "img-0.25"
    return np.full((3, 4, 4), value, dtype=np.float32), 4, 4


def make_engine(model: EchoModel, results: MemoryResults, max_batch: int = 4) -> Engine:
    return Engine(store=results, model=model, fetch=fetch, prepare=prepare, worker_name="w",  # type: ignore[arg-type]
                  max_batch=max_batch, max_wait_s=0.01, decode_threads=2, db_retry_s=2.0).start()


def run(engine: Engine, refs: list[str], params: CaptionParams | None = None) -> dict[int, tuple[str, str | None]]:
    work = engine.submit(JOB, params or CaptionParams(), list(enumerate(refs)))
    outcomes = {item.seq: item.future.result(10) for item in work}
    return {seq: (o.state, o.code) for seq, o in outcomes.items()}


@pytest.fixture
def results() -> MemoryResults:
    return MemoryResults()


def test_every_item_captioned_in_bounded_batches(results):
    model = EchoModel()
    engine = make_engine(model, results, max_batch=4)
    outcomes = run(engine, [f"img-{i / 100}" for i in range(10)])
    engine.stop()
    assert set(outcomes.values()) == {("done", None)}
    assert sum(model.batches) == 10 and max(model.batches) <= 4
    assert sorted(r.seq for r in results.captions) == list(range(10))
    assert {r.seq: r.text for r in results.captions}[7] == "mean 0.070"


def test_one_bad_item_does_not_fail_its_batchmates(results):
    model = EchoModel(poison=0.5)
    engine = make_engine(model, results, max_batch=8)
    outcomes = run(engine, ["img-0.1", "img-0.2", "img-0.5", "img-0.3"])
    engine.stop()
    assert outcomes[2] == ("dead", "model_error")
    assert [outcomes[i] for i in (0, 1, 3)] == [("done", None)] * 3
    assert [d.seq for d in results.dead] == [2]


def test_out_of_memory_splits_the_batch(results):
    model = EchoModel(oom_above=2)
    engine = make_engine(model, results, max_batch=8)
    outcomes = run(engine, [f"img-0.{i}" for i in range(1, 9)])
    engine.stop()
    assert set(outcomes.values()) == {("done", None)}
    assert max(b for b in model.batches if b <= 2) == 2


def test_out_of_memory_alone_asks_for_a_retry(results):
    engine = make_engine(EchoModel(oom_above=0), results)
    assert run(engine, ["img-0.1"]) == {0: ("retry", "transient")}
    engine.stop()
    assert results.dead == [] and results.captions == []


def test_fetch_errors_are_classified(results):
    engine = make_engine(EchoModel(), results)
    outcomes = run(engine, ["missing-1", "flaky-1", "img-0.1"])
    engine.stop()
    assert outcomes == {0: ("dead", "not_found"), 1: ("retry", "transient"), 2: ("done", None)}


def test_write_outage_is_ridden_out(results):
    results.fail_next = 2
    engine = make_engine(EchoModel(), results)
    outcomes = run(engine, ["img-0.1", "img-0.2"])
    engine.stop()
    assert set(outcomes.values()) == {("done", None)}
    assert len(results.captions) == 2


def test_write_outage_past_the_limit_asks_for_retry(results):
    results.fail_next = 1000
    engine = make_engine(EchoModel(), results)
    assert set(run(engine, ["img-0.1"]).values()) == {("retry", "db_unavailable")}
    engine.stop()


@dataclass
class GatedModel(EchoModel):
    """Holds every batch until ``gate`` is set, so an item stays in flight as long as a test needs."""

    gate: threading.Event = dataclass_field(default_factory=threading.Event)

    def caption(self, pixel_values: np.ndarray, params: CaptionParams) -> list[str]:
        assert self.gate.wait(10), "test never opened the gate"
        return super().caption(pixel_values, params)


def test_duplicate_submission_joins_the_item_in_flight(results):
    model = GatedModel()
    engine = make_engine(model, results)
    first = engine.submit(JOB, CaptionParams(), [(0, "img-0.1")])
    assert engine.in_flight(JOB, [0, 1]) == {0: first[0]}
    second = engine.submit(JOB, CaptionParams(), [(0, "img-0.1")])
    assert second[0] is first[0]
    model.gate.set()
    first[0].future.result(10)
    engine.stop()
    assert sum(model.batches) == 1 and len(results.captions) == 1


def test_beam_search_caps_the_batch(results):
    model = EchoModel()
    engine = make_engine(model, results, max_batch=8)
    run(engine, [f"img-0.{i}" for i in range(1, 9)], CaptionParams(num_beams=4))
    engine.stop()
    assert max(model.batches) <= 2


def test_decoded_images_waiting_for_the_model_are_bounded(results):
    """Backpressure: decode threads stop once 4 x max_batch images wait, however many are submitted."""
    model = GatedModel()
    engine = make_engine(model, results, max_batch=2)
    work = engine.submit(JOB, CaptionParams(), [(i, f"img-0.{i}") for i in range(40)])
    time.sleep(0.5)
    waiting = sum(item.pixels is not None for item in work)
    model.gate.set()
    for item in work:
        assert item.future.result(10).state == "done"
    engine.stop()
    assert waiting <= 8  # 4 x max_batch
    assert len(results.captions) == 40
