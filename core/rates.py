"""How fast a job's items become final, from counts sampled over time: pure, no I/O.

The jobs page and ``GET /v1/jobs/{id}`` show a rate and an ETA. Counting the items that turned
final in the last minute walks every item of the job (no index covers ``updated_at`` of final
items, and one would slow every result write): 0.4-0.9 s per poll of a 1M-item job. Polls already
count the final items cheaply (``total`` less the pending ones, which partial indexes cover), so
each poll leaves a sample here and the rate is the slope over the last minute of samples. One
look gives no rate yet; the page refreshes every few seconds and an API client polls.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Hashable

WINDOW_S = 60.0
MAX_JOBS = 10_000  # the least recently sampled jobs are forgotten first


class FinalRates:
    """Samples of (time in seconds, final items) per job; thread-safe."""

    def __init__(self, window_s: float = WINDOW_S, max_jobs: int = MAX_JOBS) -> None:
        self._window_s, self._max_jobs = window_s, max_jobs
        self._samples: OrderedDict[Hashable, deque[tuple[float, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, job: Hashable, at_s: float, final: int) -> float | None:
        """Record a sample; the rate in items per second over the window, None from one sample."""
        with self._lock:
            samples = self._samples.setdefault(job, deque())
            self._samples.move_to_end(job)
            if not samples or at_s > samples[-1][0]:  # not the same look again, nor an older one
                samples.append((at_s, final))
            # Keep the newest sample at or before the window's start: the slope spans the window.
            while len(samples) > 1 and samples[1][0] <= samples[-1][0] - self._window_s:
                samples.popleft()
            while len(self._samples) > self._max_jobs:
                self._samples.popitem(last=False)
            first_at, first = samples[0]
            span = samples[-1][0] - first_at
            return max(0, samples[-1][1] - first) / span if span > 0 else None
