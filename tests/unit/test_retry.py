import pytest

from imgq.retry import RetryPolicy, compute_backoff, decide


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(1, 1.0, 1.0), (2, 1.0, 2.0), (3, 1.0, 4.0), (3, 0.0, 2.0), (10, 1.0, 60.0), (200, 0.5, 45.0)],
)
def test_backoff_table(attempt, jitter, expected):
    assert compute_backoff(attempt, base_s=1.0, cap_s=60.0, jitter=jitter) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("retryable", "attempts", "action", "delay"),
    [(True, 1, "retry", 1.0), (True, 4, "retry", 8.0), (True, 5, "dead", 0.0), (False, 1, "dead", 0.0)],
)
def test_decisions(retryable, attempts, action, delay):
    decision = decide(RetryPolicy(max_attempts=5, base_s=1.0, cap_s=300), retryable=retryable,
                      attempts=attempts, jitter=1.0)
    assert (decision.action, decision.delay_s) == (action, delay)


def test_attempt_counts_from_one():
    with pytest.raises(ValueError, match=r"^attempt counts from 1$"):
        compute_backoff(0, 1.0, 10.0, 0.5)


def test_outage_backoff_doubles_while_failures_follow_and_resets_on_success():
    from imgq.retry import Backoff

    b = Backoff(base_s=2.0, cap_s=30.0)
    assert [b.failed() for _ in range(6)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    b.succeeded()
    assert b.failed() == 2.0
