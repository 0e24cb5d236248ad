"""When a worker may judge its peers by the age of their beats (pure)."""

from __future__ import annotations

from imgq.worker.heartbeat import Steadiness


def steady(now: float = 0.0) -> Steadiness:
    return Steadiness(interval_s=3, dead_after_s=12, now=now)


def test_a_started_worker_reaps_by_age_only_after_dead_after_of_beats_on_time():
    s = steady()
    assert [s.beat(t) for t in (3, 6, 9, 11.9)] == [False] * 4
    assert s.beat(12) and s.beat(15)


def test_a_failed_beat_holds_reaping_off_for_dead_after_from_the_next_one_that_lands():
    s = steady()
    for t in (3, 6, 9, 12):
        s.beat(t)
    s.failed()
    assert not s.beat(15)  # back on time, but just back
    assert [s.beat(t) for t in (18, 21, 24, 26.9)] == [False] * 4
    assert s.beat(27)


def test_a_beat_more_than_two_intervals_late_counts_as_cut_off():
    s = steady()
    for t in (3, 6, 9, 12):
        s.beat(t)
    assert s.beat(18)  # exactly two intervals: a slow beat, not a lost one
    assert not s.beat(24.01)  # a hung call: as good as a failed beat
    assert [s.beat(t) for t in (27, 30, 33, 36)] == [False] * 4
    assert s.beat(36.5)
