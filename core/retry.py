"""Retry decisions. Pure: exponential backoff with jitter, bounded attempts."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    base_s: float = 1.0
    cap_s: float = 300.0


@dataclass(frozen=True, slots=True)
class RetryDecision:
    action: Literal["retry", "dead"]
    delay_s: float = 0.0


def compute_backoff(attempt: int, base_s: float, cap_s: float, jitter: float) -> float:
    """Delay before attempt ``attempt + 1``: base * 2^(attempt-1), capped, then scaled into
    [50%, 100%] by ``jitter`` in [0, 1] so a burst of failures does not retry in lockstep."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    raw = min(cap_s, base_s * 2 ** min(attempt - 1, 62))
    return raw * (0.5 + 0.5 * jitter)


def decide(
    policy: RetryPolicy, *, retryable: bool, attempts: int, jitter: float | None = None
) -> RetryDecision:
    """What to do with an item that failed on its ``attempts``-th delivery."""
    if not retryable or attempts >= policy.max_attempts:
        return RetryDecision("dead")
    j = random.random() if jitter is None else jitter
    return RetryDecision("retry", compute_backoff(attempts, policy.base_s, policy.cap_s, j))


@dataclass
class Backoff:
    """Pauses before requeueing a message during an outage: 2 s, doubling while failures follow
    one another, capped; any success resets it. Shared by a worker's task threads."""

    base_s: float = 2.0
    cap_s: float = 30.0
    _streak: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def failed(self) -> float:
        with self._lock:
            self._streak += 1
            return min(self.cap_s, self.base_s * 2 ** min(self._streak - 1, 16))

    def succeeded(self) -> None:
        with self._lock:
            self._streak = 0
