"""The token bucket behind `imgq backfill --max-rate`, on a fake clock."""

from __future__ import annotations

import pytest

from imgq.pacing import TokenBucket, commit_size_for


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("rate", "burst", "steps", "waits"),
    [
        # (advance the clock by dt, then reserve n) -> the wait reserve returns
        (10, None, [(0, 10), (0, 1)], [0.0, 0.1]),           # a full second's burst, then debt
        (10, None, [(0, 5), (0, 5), (0, 5)], [0.0, 0.0, 0.5]),
        (10, None, [(0, 10), (1.0, 10)], [0.0, 0.0]),        # a second later it is full again
        (10, None, [(5.0, 10), (0, 10)], [0.0, 1.0]),        # idling never stores more than the burst
        (2, None, [(0, 2), (0, 2), (0.5, 2)], [0.0, 1.0, 1.5]),  # debt accumulates
        (0.5, None, [(0, 1), (0, 1)], [0.0, 2.0]),           # slower than one a second: burst of one
        (100, 1, [(0, 1), (0, 1), (0.005, 1)], [0.0, 0.01, 0.015]),
        (10, None, [(0, 35)], [2.5]),                        # bigger than the bucket: waits it out
    ],
)
def test_reserve_returns_the_wait_that_keeps_the_rate(rate, burst, steps, waits):
    clock = Clock()
    bucket = TokenBucket(rate, burst, clock=clock)
    got = []
    for dt, n in steps:
        clock.now += dt
        got.append(bucket.reserve(n))
    assert got == pytest.approx(waits)


def test_waiting_what_reserve_says_holds_the_long_run_rate():
    clock = Clock()
    bucket = TokenBucket(50, clock=clock)
    taken = 0
    for n in [7, 30, 1, 120, 3, 64] * 20:
        clock.now += bucket.reserve(n)
        taken += n
    # The first burst (50) is free; everything after it is paid at 50/s.
    assert clock.now == pytest.approx((taken - 50) / 50)


def test_tokens_show_the_debt():
    clock = Clock()
    bucket = TokenBucket(4, clock=clock)
    bucket.reserve(6)
    assert bucket.tokens == pytest.approx(-2)
    clock.now += 0.5
    assert bucket.tokens == pytest.approx(0)


@pytest.mark.parametrize("bad", [{"rate": 0}, {"rate": -1}, {"rate": 1, "burst": 0}])
def test_nonsense_is_refused(bad):
    with pytest.raises(ValueError):
        TokenBucket(**bad)
    with pytest.raises(ValueError):
        TokenBucket(1).reserve(-1)


@pytest.mark.parametrize(("rate", "expected"), [(None, None), (50, 50), (0.2, 1), (5000, 5000), (2.7, 2)])
def test_a_commit_enqueues_about_one_second_of_the_rate(rate, expected):
    assert commit_size_for(rate) == expected
