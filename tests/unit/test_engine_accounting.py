"""What the engine tells ops (its counters, its Prometheus series by kind, its threads' names) and
its bookkeeping on paths the other engine tests pass through without pinning: the stages of an
item another kind failed, captions of several adapters with the first row plain, and the model's
strikes (mutation testing found each unguarded)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import REGISTRY

from imgq.contract import CaptionParams, make_task
from imgq.params import EmbedParams, TranslateParams
from imgq.worker.engine import Engine
from imgq.worker.fakes import EchoRunner, EchoTranslator, MemoryResults
from tests.unit.test_engine import decode, fetch
from tests.unit.test_engine_stages import stored_key
from tests.waits import SETTLE_S


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def eventually(check, seconds: float = SETTLE_S) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def gated(gate: threading.Event):  # type: ignore[no-untyped-def]
    """A decode that waits for ``gate``: items submitted before it opens meet in one batch."""

    def held_decode(data: bytes):  # type: ignore[no-untyped-def]
        assert gate.wait(SETTLE_S)
        return decode(data)

    return held_decode


def build(results: MemoryResults, *runners: Any, max_batch: int = 4, max_wait_s: float = 0.01,
          decode_threads: int = 2, decoder: Any = decode, **kw: Any) -> Engine:
    """An engine not started yet (``engine_of`` starts it)."""
    return Engine(store=results, runners={r.kind: r for r in runners}, fetch=fetch, decode=decoder,
                  worker_name="w", max_batch=max_batch, max_wait_s=max_wait_s, decode_threads=decode_threads, **kw)


def engine_of(results: MemoryResults, *runners: Any, **kw: Any) -> Engine:
    return build(results, *runners, **kw).start()


def settle(engine: Engine, tasks: list, refs: list[str], job: uuid.UUID | None = None) -> list[tuple[str, str | None]]:
    work = engine.submit(job or uuid.uuid4(), tasks, list(enumerate(refs)))
    return [(o.state, o.code) for o in (w.future.result(SETTLE_S) for w in work)]


CAPTION = make_task("caption", "echo", CaptionParams())


def test_the_counters_add_up_over_a_batch_split_around_a_poison_item(caplog):
    results, runner = MemoryResults(), EchoRunner(poison=0.5)
    engine = engine_of(results, runner, max_batch=4, max_wait_s=5.0)
    outcomes = settle(engine, [CAPTION], ["img-0.1", "img-0.2", "img-0.5", "img-0.3"])
    engine.stop()
    assert outcomes == [("done", None), ("done", None), ("dead", "model_error"), ("done", None)]
    splits = sum("retrying halves" in r.getMessage() for r in caplog.records)
    # How the items met in batches depends on the decode threads' timing; the counts must agree
    # with what the model saw: every failed run of several items split once, one run failed alone.
    assert splits >= 1
    assert engine.stats == {"batches": len(runner.batches) - splits - 1, "items": 3, "split": splits,
                            "decodes": 4, "reused": 0}


def test_prometheus_series_are_labelled_with_the_kind():
    names = ("imgq_batch_size_count", "imgq_batch_size_sum", "imgq_model_seconds_count",
             "imgq_batch_wait_seconds_count")
    before = {name: sample(name, kind="caption") for name in names}
    runner = EchoRunner()
    engine = engine_of(MemoryResults(), runner, max_batch=3, max_wait_s=5.0)
    settle(engine, [CAPTION], ["img-0.1", "img-0.2", "img-0.3"])
    engine.stop()
    grew = {name: sample(name, kind="caption") - before[name] for name in names}
    runs = len(runner.batches)
    assert grew == {"imgq_batch_size_count": runs, "imgq_batch_size_sum": 3, "imgq_model_seconds_count": runs,
                    "imgq_batch_wait_seconds_count": runs}


def test_reused_captions_are_counted_each_and_by_kind():
    results = MemoryResults()
    for ref in ("img-0.5", "img-0.6"):
        results.stored[stored_key(ref, CaptionParams())] = ("an old caption", 64, 48)
    before = sample("imgq_reused_results_total", kind="caption")
    engine = engine_of(results, EchoRunner(), EchoTranslator())
    tasks = [CAPTION, make_task("translate", "echo-mt", TranslateParams(langs=["de"]))]
    assert settle(engine, tasks, ["img-0.5", "img-0.6", "img-0.7"]) == [("done", None)] * 3
    engine.stop()
    assert engine.stats["reused"] == 2
    assert sample("imgq_reused_results_total", kind="caption") - before == 2


def test_the_engines_threads_are_named_for_ops_and_never_keep_the_process_alive():
    engine = engine_of(MemoryResults(), EchoRunner())
    settle(engine, [CAPTION], ["img-0.1"])
    threads = {t.name: t for t in threading.enumerate()}
    try:
        assert threads["imgq-infer"].daemon and threads["imgq-write-0"].daemon and threads["imgq-write-1"].daemon
        assert any(name.startswith("imgq-decode_") for name in threads)
    finally:
        engine.stop()


@dataclass
class PoisonedEmbed(EchoRunner):
    kind: str = "embed"


def test_the_stages_of_an_item_another_kind_failed_are_counted_off_and_its_slot_freed():
    """embed runs first (max_batch 1: one batch per entry, in the item's task order) and fails the
    item; its caption then succeeds, and the translations that would follow it are counted as run
    without running, so nothing stays counting."""
    results, translator = MemoryResults(), EchoTranslator()
    engine = engine_of(results, PoisonedEmbed(poison=0.5), EchoRunner(), translator, max_batch=1, max_wait_s=0.0)
    tasks = [make_task("embed", "echo", EmbedParams()), CAPTION,
             make_task("translate", "echo-mt", TranslateParams(langs=["de", "fr"]))]
    outcomes = settle(engine, tasks, ["img-0.5"])
    engine.stop()
    assert outcomes[0][0] in ("dead", "retry")
    assert translator.batches == []
    assert not engine._remaining
    assert engine._decoded._value == engine._decoded._initial_value  # type: ignore[attr-defined]


def test_captions_with_an_adapter_anywhere_in_the_batch_go_through_the_adapter_path():
    """The first row plain, the second tuned: one generate with the adapters named per row. The
    decodes wait until all three are submitted, so that the three meet in one batch."""
    gate = threading.Event()
    held_decode = gated(gate)

    runner = EchoRunner()
    engine = Engine(store=MemoryResults(), runners={"caption": runner}, fetch=fetch, decode=held_decode,  # type: ignore[arg-type,dict-item]
                    worker_name="w", max_batch=3, max_wait_s=5.0, decode_threads=3).start()
    job = uuid.uuid4()
    plain = make_task("caption", "echo", CaptionParams())
    tuned = make_task("caption", "echo", CaptionParams(adapter="de-news"))
    work = [*engine.submit(job, [plain], [(0, "img-0.1")]), *engine.submit(job, [tuned], [(1, "img-0.2")]),
            *engine.submit(job, [plain], [(2, "img-0.3")])]
    gate.set()
    for item in work:
        item.future.result(SETTLE_S)
    engine.stop()
    assert len(runner.adapter_batches) == 1
    assert sorted(map(str, runner.adapter_batches[0])) == ["None", "None", "de-news"]


def test_strikes_reset_when_a_batch_succeeds_and_the_model_turns_unhealthy_only_in_a_row():
    """Batches of two that fail entirely strike the model (a lone item failing while the model
    works is the item's fault); a batch that succeeds clears the strikes."""
    gate = threading.Event()
    held_decode = gated(gate)

    class Flaky(EchoRunner):
        def run(self, pixels: np.ndarray, texts: object, params: object) -> list[object]:
            if float(pixels.mean()) > 0.4:
                raise RuntimeError("device lost")
            return super().run(pixels, texts, params)  # type: ignore[arg-type]

    unhealthy: list[str] = []
    engine = Engine(store=MemoryResults(), runners={"caption": Flaky()}, fetch=fetch, decode=held_decode,  # type: ignore[arg-type]
                    worker_name="w", max_batch=2, max_wait_s=5.0, decode_threads=2, max_strikes=2,
                    on_unhealthy=unhealthy.append).start()

    def pair(a: str, b: str) -> list[tuple[str, str | None, str | None]]:
        gate.clear()
        work = engine.submit(uuid.uuid4(), [CAPTION], [(0, a), (1, b)])
        gate.set()
        return [(o.state, o.code, o.message) for o in (w.future.result(SETTLE_S) for w in work)]

    struck = pair("img-0.5", "img-0.6")
    assert [s[:2] for s in struck] == [("retry", "model_unhealthy")] * 2
    assert struck[0][2] == "every item of the batch failed: RuntimeError: device lost"
    assert [s[:2] for s in pair("img-0.1", "img-0.2")] == [("done", None)] * 2
    pair("img-0.5", "img-0.6")
    # The futures settle before the batch's bookkeeping ends: wait for the strike to be counted.
    assert eventually(lambda: engine._strikes == 1), engine._strikes  # one since the last success
    assert engine.unhealthy is None and unhealthy == []
    pair("img-0.7", "img-0.8")
    assert eventually(lambda: unhealthy == [engine.unhealthy])
    assert engine.unhealthy == "2 batches in a row failed entirely; last: RuntimeError: device lost"
    refused = pair("img-0.1", "img-0.2")
    engine.stop()
    assert refused[0] == ("retry", "transient", f"worker unhealthy: {engine.unhealthy}")
