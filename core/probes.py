"""Calls that must answer within a deadline: readiness probes and scrape-time samples.

A stalled Redis or Postgres (a paused process, a silent network) answers nothing and fires no
library timeout. A probe waits for it at most ``PROBE_DEADLINE_S``; the stalled call finishes
(or not) in its own thread, and no second one starts while it is out, so a probe every few
seconds cannot pile up threads behind one stall.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")

PROBE_DEADLINE_S = 2.0


class Deadline(Generic[T]):
    """A blocking call, waited for at most ``timeout_s`` (TimeoutError past it). The call runs in
    its own daemon thread; while one is still out, callers wait on it rather than start another."""

    def __init__(self, call: Callable[[], T], timeout_s: float = PROBE_DEADLINE_S) -> None:
        self._call, self._timeout_s = call, timeout_s
        self._lock = threading.Lock()
        self._out: Future[T] | None = None

    def __call__(self) -> T:
        with self._lock:
            if self._out is None or self._out.done():
                self._out = Future()
                threading.Thread(target=self._run, args=(self._out,), name="imgq-probe", daemon=True).start()
            out = self._out
        return out.result(self._timeout_s)

    def _run(self, out: Future[T]) -> None:
        try:
            out.set_result(self._call())
        except BaseException as exc:
            out.set_exception(exc)
