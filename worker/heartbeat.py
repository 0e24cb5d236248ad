"""Worker heartbeats in Postgres, and the reaper that re-publishes a dead worker's items in seconds.

Every worker beats every ``IMGQ_HEARTBEAT_S`` from its own thread, whatever its model is doing
(torch releases the GIL), so a slow but live worker keeps its items. At each beat one worker
(advisory lock) re-publishes the running items of workers whose last beat is older than
``IMGQ_WORKER_DEAD_AFTER_S``. The items stay ``running``, so their next claim sees them as crash
suspects and runs them alone. A late result from a worker that was only paused is harmless: the
first stored result wins and a finished item is never claimed again.

At start a worker also reaps, at once, its own earlier incarnation (same name) and the workers
registered on its host whose process is gone: a restarted worker picks up its own orphans. That
reap waits for the lock rather than leave it to another reaper: once the new process beats, its
earlier incarnation's items would look like a live worker's.

A reap publishes inside the transaction that takes the items (``Admin.take_orphans``): a publish
that fails leaves them with their dead worker, for the next beat's reap.

A worker judges its peers by the age of their beats only once it has itself beaten on time for
``IMGQ_WORKER_DEAD_AFTER_S`` (``Steadiness``): after a database outage every worker's last beat is
old for the same reason, and the first worker back must not take the items its live peers are
still working on. The same holds at start (it may start just as the database comes back); its
start-up reap takes only the names it knows are gone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# How long a starting worker waits for another worker's reap (a few queries and one publish).
START_REAP_WAIT_S = 60.0
# Orphans taken (and published) in one transaction.
TAKE_LIMIT = 10_000


class ReaperBusy(RuntimeError):
    """The start-up reap could not get the reaper lock in time."""


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Steadiness:
    """Whether this worker's view of its peers' beats can be trusted now (pure: times are monotonic
    seconds). A beat that failed, or one that came more than two intervals after the last, means
    this worker was cut off, and so, likely, were its peers; it trusts their ages again after
    ``dead_after_s`` of beating on time, by when every live peer has beaten since."""

    def __init__(self, *, interval_s: float, dead_after_s: float, now: float) -> None:
        self._late_after_s = 2 * interval_s
        self._dead_after_s = dead_after_s
        self._last: float | None = now
        self._since = now

    def failed(self) -> None:
        self._last = None

    def beat(self, now: float) -> bool:
        """A beat landed at ``now``: may this worker reap by age?"""
        if self._last is None or now - self._last > self._late_after_s:
            self._since = now
        self._last = now
        return now - self._since >= self._dead_after_s


class Heartbeat:
    """Registers the worker, beats, and reaps the orphans of dead workers."""

    def __init__(
        self, *, admin: Any, name: str, interval_s: float, dead_after_s: float,
        republish: Callable[[list[Any]], int], host: str | None = None, pid: int | None = None,
        start_wait_s: float = START_REAP_WAIT_S, take_limit: int = TAKE_LIMIT,
    ) -> None:
        self._admin = admin
        self.name = name
        self._host = host or socket.gethostname()
        self._pid = pid or os.getpid()
        self._interval_s = interval_s
        self._dead_after_s = dead_after_s
        self._republish = republish
        self._start_wait_s = start_wait_s
        self._take_limit = take_limit
        self._steadiness = Steadiness(interval_s=interval_s, dead_after_s=dead_after_s, now=time.monotonic())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imgq-heartbeat", daemon=True)
        self.reaped = 0

    def start(self) -> Heartbeat:
        gone = [self.name] + [n for n, pid in self._admin.host_workers(self._host, self.name)
                              if not process_alive(pid)]
        # Before the first beat: it refreshes this name, and the earlier incarnation's items
        # would then look like ours, so all of them, take after take. By name only: see Steadiness.
        while True:
            taken = self._reap(gone, wait_s=self._start_wait_s, by_age=False)
            if taken is None:
                raise ReaperBusy(f"worker {self.name} could not reap its earlier incarnation: another reaper "
                                 f"held the lock for {self._start_wait_s:g} s")
            if taken < self._take_limit:
                break
        self._admin.heartbeat(self.name, self._host, self._pid)
        self._steadiness = Steadiness(interval_s=self._interval_s, dead_after_s=self._dead_after_s,
                                      now=time.monotonic())
        self._thread.start()
        return self

    def stop(self, retire: bool = True) -> None:
        self._stop.set()
        self._thread.join(5)
        if retire:
            try:
                self._admin.retire(self.name)
            except Exception as exc:  # the database is down: others reap us by age instead
                log.warning("could not retire worker %s: %s", self.name, exc)

    def reap(self, gone: list[str] | None = None) -> int:
        """Re-publish the running items of dead workers; 0 when another reaper is at it."""
        return self._reap(gone) or 0

    def _reap(self, gone: list[str] | None, wait_s: float = 0.0, by_age: bool = True) -> int | None:
        batches = self._admin.take_orphans(dead_after_s=self._dead_after_s if by_age else None, gone=gone,
                                           publish=self._republish, wait_s=wait_s, limit=self._take_limit)
        if not batches:
            return None if batches is None else 0
        count = sum(len(b.items) for b in batches)
        self.reaped += count
        log.warning("re-published %d items of dead workers", count, extra={"action": "reap", "items": count})
        return count

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._admin.heartbeat(self.name, self._host, self._pid)
            except Exception as exc:  # an outage: beat again next interval
                self._steadiness.failed()
                log.warning("heartbeat failed: %s", exc)
                continue
            if not self._steadiness.beat(time.monotonic()):
                continue
            try:
                self.reap()
            except Exception as exc:  # Redis or Postgres away: the next beat reaps
                log.warning("reap failed: %s", exc)
