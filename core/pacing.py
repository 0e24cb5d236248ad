"""A token bucket for ``imgq backfill --max-rate``. Pure: it takes a clock and never sleeps itself."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Allows ``rate`` units per second on average and ``burst`` at once (default: one second's worth,
    at least one unit).

    :meth:`reserve` never refuses: it takes the units now and returns how long the caller must wait
    before using them. Taking more than the bucket holds runs it into debt, which later callers wait
    out, so any request size keeps the long-run rate at ``rate``."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        if self.burst <= 0:
            raise ValueError(f"burst must be positive, not {burst}")
        self._clock = clock
        self._tokens = self.burst  # starts full
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    @property
    def tokens(self) -> float:
        """Units available now (negative: debt still to wait out)."""
        self._refill()
        return self._tokens

    def reserve(self, n: float) -> float:
        """Take ``n`` units; returns the seconds to wait before using them (0 if they were there)."""
        if n < 0:
            raise ValueError(f"cannot take {n} units")
        self._refill()
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def commit_size_for(rate: float | None) -> int | None:
    """Most objects one commit of a backfill enqueues under a rate limit: about one second's worth
    (at least one), so that each commit's wait stays short and progress is committed often. None
    without a limit. Listing pages keep their full size: the limit paces what is enqueued, not
    what is listed (an up-to-date prefix lists at full speed)."""
    if rate is None:
        return None
    return max(1, int(rate))
