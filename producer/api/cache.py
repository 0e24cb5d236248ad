"""A small in-process cache with a time to live and one computation per key at a time.

Job progress is polled: a hundred clients asking for one job within a second should cost one
count of its pending items, not a hundred. Entries live ``ttl_s`` (progress is at most that
stale); while one thread computes a missing entry, the others asking for the same key wait for
it instead of running the same query.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class TtlCache:
    def __init__(self, ttl_s: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._computing: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value of ``key``, or ``compute()``'s (cached unless it is None)."""
        found = self._fresh(key)
        if found is not None:
            return found[1]
        with self._lock:
            gate = self._computing.setdefault(key, threading.Lock())
        with gate:
            found = self._fresh(key)
            if found is not None:
                return found[1]
            try:
                value = compute()
            finally:
                with self._lock:
                    self._computing.pop(key, None)
            with self._lock:
                if value is not None:
                    self._entries[key] = (self._clock() + self.ttl_s, value)
                    self._entries.move_to_end(key)
                    while len(self._entries) > self.max_entries:
                        self._entries.popitem(last=False)
            return value

    def peek(self, key: Hashable) -> Any:
        """The cached value of ``key`` if it is fresh, else None (never computes: safe on an event loop)."""
        found = self._fresh(key)
        return None if found is None else found[1]

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def _fresh(self, key: Hashable) -> tuple[float, Any] | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] <= self._clock():
                return None
            return found
