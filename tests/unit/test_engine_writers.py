"""The engine's result writers: with two, a second write is prepared and committed while the first
waits on the store, and stop() commits every write queued before it and ends every writer."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from imgq.ports import DoneItem
from imgq.worker.fakes import EchoRunner, MemoryResults
from tests.unit.test_engine_accounting import CAPTION, build, engine_of, settle
from tests.waits import SETTLE_S


@dataclass
class SlowResults(MemoryResults):
    """A store whose writes wait at ``gate`` until it opens; records how many were under way at once."""

    gate: threading.Event = field(default_factory=threading.Event)
    busy: int = 0
    most: int = 0
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def write_done(self, items: Sequence[DoneItem]) -> None:
        with self._lock:
            self.busy += 1
            self.most = max(self.most, self.busy)
        self.entered.release()
        try:
            # Not SETTLE_S (short under mutation testing): a write that gave up here would be a refused
            # row, retried alone, not the slow write this store stands for. The test opens the gate.
            assert self.gate.wait(60)
            super().write_done(items)
        finally:
            with self._lock:
                self.busy -= 1


def submit_one_at_a_time(engine, results: SlowResults, n: int) -> list:  # type: ignore[no-untyped-def]
    """``n`` single-item submissions, each one's write started before the next is submitted (so the
    writers cannot coalesce them), or as many as the writers can start."""
    import uuid

    work = []
    for i in range(n):
        work += engine.submit(uuid.uuid4(), [CAPTION], [(0, f"img-0.{i + 1}")])
        results.entered.acquire(timeout=0.5 if i else SETTLE_S)
    return work


@pytest.mark.parametrize("writers", [1, 2, 3])
def test_writes_run_at_once_on_as_many_connections_as_writers(writers: int):
    results = SlowResults()
    engine = engine_of(results, EchoRunner(), max_batch=1, writers=writers)
    try:
        work = submit_one_at_a_time(engine, results, 4)
        assert results.most == writers  # the rest queue behind them: never more writes than writers
        results.gate.set()
        assert {item.future.result(SETTLE_S).state for item in work} == {"done"}
    finally:
        results.gate.set()
        engine.stop()
    assert len(results.done) == 4


def test_stop_commits_every_queued_write_and_ends_every_writer():
    results = SlowResults()
    engine = engine_of(results, EchoRunner(), max_batch=1, writers=2)
    work = submit_one_at_a_time(engine, results, 6)
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    results.gate.set()
    stopper.join(SETTLE_S)
    assert not stopper.is_alive()
    assert {item.future.result(0).state for item in work} == {"done"}
    assert sorted(d.seq for d in results.done) == [0] * 6 and len({d.job for d in results.done}) == 6
    assert not [t for t in threading.enumerate() if t.name.startswith("imgq-write")]


def test_at_least_one_writer():
    engine = build(MemoryResults(), EchoRunner(), writers=0).start()
    try:
        assert settle(engine, [CAPTION], ["img-0.1"]) == [("done", None)]
    finally:
        engine.stop()
