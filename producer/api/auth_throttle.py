"""Failed authentications per client address: refused before they cost a database lookup.

A well-formed but unknown key is looked up every time (only verified keys are cached), so a
client sending random keys spends one Postgres query per request. Past
``IMGQ_API_AUTH_FAILURES_PER_MINUTE`` failures from one address in a sliding minute, that address's
keys are refused with 429 ``rate_limited`` unless this process verified the same key recently:
behind a proxy or a NAT every client shares the address, and a guesser must not lock out the
keys that work. Counted per API process, in memory (what it protects is this process's pool).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable

WINDOW_S = 60.0
GOOD_FOR_S = 600.0  # a verified key bypasses the throttle this long after its last verification
MAX_ADDRESSES = 10_000  # the least recently failing addresses are forgotten first


class AuthThrottle:
    def __init__(self, failures_per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = failures_per_minute
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._good: OrderedDict[Hashable, float] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str, key: Hashable) -> int | None:
        """Seconds until ``address`` may try an unknown key again, or None if this one may go on
        (the address is under its budget, or ``key`` was verified here recently)."""
        now = self._clock()
        with self._lock:
            good = self._good.get(key)
            if good is not None and now - good < GOOD_FOR_S:
                return None
            failures = self._recent(address, now)
            if failures is None or len(failures) < self.limit:
                return None
            return max(1, math.ceil(failures[0] + WINDOW_S - now))

    def failed(self, address: str) -> None:
        now = self._clock()
        with self._lock:
            failures = self._recent(address, now)
            if failures is None:
                failures = self._failures[address] = deque()
            failures.append(now)
            self._failures.move_to_end(address)
            while len(self._failures) > MAX_ADDRESSES:
                self._failures.popitem(last=False)

    def verified(self, key: Hashable) -> None:
        with self._lock:
            self._good[key] = self._clock()
            self._good.move_to_end(key)
            while len(self._good) > MAX_ADDRESSES:
                self._good.popitem(last=False)

    def _recent(self, address: str, now: float) -> deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and failures[0] <= now - WINDOW_S:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        return failures
