"""Engine.serves decides whether a message is run here or dead-lettered as wrong_model: only the fakes'
version of it was exercised below e2e."""

from __future__ import annotations

from imgq.contract import CaptionParams, make_task
from imgq.params import EmbedParams
from imgq.worker.engine import Engine
from imgq.worker.fakes import EchoRunner, MemoryResults


def test_a_task_is_served_by_the_runner_of_its_kind_with_its_model() -> None:
    engine = Engine(store=MemoryResults(), runners={"caption": EchoRunner()},  # type: ignore[arg-type]
                    fetch=lambda ref: None, decode=lambda data: None, worker_name="w",  # type: ignore[arg-type]
                    max_batch=4, max_wait_s=0.01, decode_threads=1)
    assert engine.serves(make_task("caption", "echo", CaptionParams(num_beams=3)))
    assert not engine.serves(make_task("caption", "blip-large", CaptionParams()))
    assert not engine.serves(make_task("embed", "echo", EmbedParams()))
