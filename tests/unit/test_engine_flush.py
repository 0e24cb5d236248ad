"""When the inference loop flushes a batch early. It may stop waiting for max_wait_s only when
nothing more is coming: no item of a submitted message is still being prepared. Two interleavings
used to break that, and thread timing decided whether a run met them; here a pool that prepares
each item to the end before ``submit`` goes on, and a queue whose ``put`` returns only once the
loop is back waiting, force each of them every time."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from imgq.worker.engine import Engine
from imgq.worker.fakes import EchoRunner, MemoryResults
from tests.unit.test_engine_accounting import CAPTION, build, gated
from tests.waits import SETTLE_S


class PreparedAtOnce:
    """A decode pool that runs each item's preparation to the end before ``submit`` returns: the
    fastest decode threads can be, the first item prepared before the next is handed over."""

    def submit(self, fn: Any, *args: Any) -> Future[None]:
        thread = threading.Thread(target=fn, args=args)
        thread.start()
        thread.join(SETTLE_S)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class HandOver(queue.Queue):  # type: ignore[type-arg]
    """``put`` returns once the consumer has taken the entry and called ``get`` again, so the loop
    has made its flush decision before the producer's next step (while ``held``)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = True
        self._back = threading.Condition()
        self._tickets = 0
        self._calls = 0
        self._taken: dict[int, int] = {}  # ticket -> the get call that took it

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        with self._back:
            self._tickets += 1
            ticket = self._tickets
        super().put((ticket, item), block, timeout)
        with self._back:
            self._back.wait_for(lambda: not self.held or self._calls > self._taken.get(ticket, self._calls), SETTLE_S)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        with self._back:
            self._calls += 1
            call = self._calls
            self._back.notify_all()
        ticket, item = super().get(block, timeout)
        with self._back:
            self._taken[ticket] = call
        return item

    def release(self) -> None:
        with self._back:
            self.held = False
            self._back.notify_all()


def forced(runner: EchoRunner, max_batch: int, max_wait_s: float) -> tuple[Engine, HandOver]:
    engine = build(MemoryResults(), runner, max_batch=max_batch, max_wait_s=max_wait_s, decode_threads=1)
    engine._pool.shutdown()
    engine._pool = PreparedAtOnce()  # type: ignore[assignment]
    engine._ready = hand_over = HandOver()
    return engine.start(), hand_over


def stop(engine: Engine, hand_over: HandOver) -> None:
    hand_over.release()
    engine.stop()


def test_a_message_whose_items_are_each_prepared_before_the_next_is_submitted_is_one_batch():
    # Counted one at a time, item 0 was prepared and the count back at zero before item 1 was
    # counted: the loop saw nothing coming and ran eight batches of one.
    runner = EchoRunner()
    engine, hand_over = forced(runner, max_batch=8, max_wait_s=SETTLE_S)
    try:
        work = engine.submit(uuid.uuid4(), [CAPTION], [(i, f"img-0.{i + 1}") for i in range(8)])
        assert [w.future.result(SETTLE_S).state for w in work] == ["done"] * 8
    finally:
        stop(engine, hand_over)
    assert runner.batches == [8]


def test_a_lone_item_does_not_wait_out_max_wait_when_its_entry_was_taken_while_it_was_preparing():
    # The loop took the entry while its item still counted as preparing, so it waited for more;
    # the item's preparation then ended and nothing woke the loop before max_wait_s (60 s here).
    runner = EchoRunner()
    engine, hand_over = forced(runner, max_batch=8, max_wait_s=60.0)
    try:
        started = time.monotonic()
        [item] = engine.submit(uuid.uuid4(), [CAPTION], [(0, "img-0.5")])
        assert item.future.result(SETTLE_S).state == "done"
        assert time.monotonic() - started < SETTLE_S
    finally:
        stop(engine, hand_over)
    assert runner.batches == [1]


def test_two_messages_submitted_back_to_back_share_a_batch_while_the_first_is_still_preparing():
    # The second message is counted before the first's last item is done preparing, so the loop
    # keeps its batch open across both (max_batch 8 leaves room for all six).
    runner = EchoRunner()
    gate = threading.Event()
    engine = build(MemoryResults(), runner, max_batch=8, max_wait_s=SETTLE_S, decode_threads=2,
                   decoder=gated(gate)).start()
    try:
        job = uuid.uuid4()
        first = engine.submit(job, [CAPTION], [(i, f"img-0.{i + 1}") for i in range(3)])
        second = engine.submit(job, [CAPTION], [(i, f"img-0.{i + 1}") for i in range(3, 6)])
        gate.set()
        assert [w.future.result(SETTLE_S).state for w in first + second] == ["done"] * 6
    finally:
        engine.stop()
    assert runner.batches == [6]

