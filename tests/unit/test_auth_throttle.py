"""The failed-authentication throttle, on a hand-driven clock."""

from __future__ import annotations

from imgq.producer.api.auth_throttle import GOOD_FOR_S, MAX_ADDRESSES, WINDOW_S, AuthThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_past_its_failures_is_refused_until_the_oldest_leaves_the_window():
    clock = Clock()
    throttle = AuthThrottle(3, clock)
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1", b"guess") is None
        throttle.failed("10.0.0.1")
        clock.now += 10
    assert throttle.retry_after("10.0.0.1", b"guess") == WINDOW_S - 30  # the first failure leaves in 30 s
    assert throttle.retry_after("10.0.0.2", b"guess") is None, "another address has its own budget"
    clock.now += WINDOW_S - 30
    assert throttle.retry_after("10.0.0.1", b"guess") is None
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1", b"guess") == 10


def test_a_key_verified_recently_passes_an_address_that_is_refused():
    clock = Clock()
    throttle = AuthThrottle(1, clock)
    throttle.verified(b"good")
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1", b"other") is not None
    assert throttle.retry_after("10.0.0.1", b"good") is None
    clock.now += GOOD_FOR_S
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1", b"good") is not None, "verified too long ago"


def test_the_addresses_remembered_are_bounded_and_the_oldest_forgotten():
    clock = Clock()
    throttle = AuthThrottle(1, clock)
    for i in range(MAX_ADDRESSES + 1):
        throttle.failed(f"a{i}")
    assert throttle.retry_after("a0", b"k") is None
    assert throttle.retry_after(f"a{MAX_ADDRESSES}", b"k") == WINDOW_S
