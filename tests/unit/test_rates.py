"""A job's rate from sampled counts of its final items."""

from __future__ import annotations

from imgq.rates import FinalRates


def test_one_look_gives_no_rate_and_the_slope_spans_the_last_minute():
    rates = FinalRates(window_s=60)
    assert rates.observe("j", 0.0, 0) is None
    assert rates.observe("j", 0.0, 0) is None, "the same look twice is still one"
    assert rates.observe("j", 10.0, 50) == 5.0
    assert rates.observe("j", 40.0, 110) == 110 / 40
    # Past a minute the oldest samples go, but one at or before the window's start stays.
    assert rates.observe("j", 70.0, 170) == (170 - 50) / 60
    assert rates.observe("j", 130.0, 170) == 0.0, "nothing finished for a minute"
    assert rates.observe("other", 130.0, 7) is None, "each job its own"


def test_an_older_look_than_the_newest_is_not_a_sample_and_counts_never_run_backwards():
    rates = FinalRates()
    rates.observe("j", 10.0, 100)
    assert rates.observe("j", 20.0, 200) == 10.0
    assert rates.observe("j", 15.0, 120) == 10.0, "a late answer from an older look changes nothing"
    assert rates.observe("j", 30.0, 150) == 2.5, "purged or retried items do not make it negative"


def test_the_jobs_remembered_are_bounded():
    rates = FinalRates(max_jobs=2)
    for job in ("a", "b", "c"):
        rates.observe(job, 0.0, 0)
    assert rates.observe("a", 1.0, 5) is None, "forgotten: this is its first sample again"
    assert rates.observe("c", 1.0, 5) == 5.0
