"""The API's in-process cache (producer/api/cache.py): time to live, and one computation per key
while many threads ask for it at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from imgq.producer.api.cache import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_entries_live_their_ttl_and_none_is_not_cached() -> None:
    clock, calls = Clock(), []
    cache = TtlCache(1.0, clock=clock)

    def compute() -> str:
        calls.append(clock.now)
        return f"v{len(calls)}"

    assert cache.get("k", compute) == "v1"
    clock.now = 0.99
    assert cache.get("k", compute) == "v1" and cache.peek("k") == "v1"
    clock.now = 1.0
    assert cache.peek("k") is None and cache.get("k", compute) == "v2"
    assert cache.get("missing", lambda: None) is None and cache.peek("missing") is None
    cache.forget("k")
    assert cache.peek("k") is None


def test_the_oldest_entries_go_first_past_max_entries() -> None:
    cache = TtlCache(60, max_entries=2)
    for key in "abc":
        cache.get(key, lambda key=key: key)
    assert (cache.peek("a"), cache.peek("b"), cache.peek("c")) == (None, "b", "c")


def test_concurrent_misses_of_one_key_compute_once() -> None:
    cache, calls = TtlCache(60), []
    barrier = threading.Barrier(16)

    def compute() -> int:
        calls.append(1)
        time.sleep(0.05)
        return 42

    def ask(_: int) -> int:
        barrier.wait()
        return cache.get("job", compute)

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(ask, range(16))) == {42}
    assert len(calls) == 1
