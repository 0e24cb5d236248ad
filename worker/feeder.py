"""The feeder: keeps Redis holding a bounded window of the backlog that Postgres holds.

Each cycle, under the queue's feed lock (a Postgres transaction lock), it reads the queue's depth,
marks the next items published in the order of ``imgq.feeding`` (priority, then fair shares
between tenants and jobs), publishes them, and commits. A publish that fails rolls the marks back.

Every worker runs one, so nothing extra is deployed; a session advisory lock elects which worker
runs the loop (a killed worker's session, and so its lock, ends with its connection; another
worker takes over within a second). ``imgq enqueue``, ``imgq reconcile`` and ``imgq dlq retry``
run single cycles under the same feed lock.

It also finds lost messages (what the reconciler did): once the queue is empty, items published
and still ``queued`` for longer than ``IMGQ_RECONCILE_AFTER_S`` were lost (Redis restarted empty,
a producer died mid-publish), and ``running`` items older than visibility timeout + time limit were
never settled. They go back to the backlog and are fed again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from imgq.contract import TaskMessage
from imgq.db.admin import LEADER_LOCK, LEADER_UNLOCK, Admin
from imgq.feeding import Backlog, free_slots, plan
from imgq.publish import chunk_messages, publish, tasks_from_record

log = logging.getLogger(__name__)

# A worker that is not the feeder tries to become it this often.
LEADER_RETRY_S = 1.0
# Most messages planned and published in one pass of a cycle.
PASS_MESSAGES = 2_000
# How long a count of the items in flight serves the fair shares (published items are added to it).
FLIGHT_TTL_S = 2.0


@dataclass(slots=True)
class FeedReport:
    depth: int = 0  # messages in the queue when the cycle began
    messages: int = 0
    items: int = 0
    lost: int = 0  # items put back in the backlog (lost messages)


class Feeder:
    """Tops the broker window up from the Postgres backlog; see the module docstring."""

    def __init__(
        self, *, admin: Admin, app: Celery, queue: str, window: int, per_message: int,
        interval_s: float = 0.25, lost_after_s: float | None = None, running_lost_after_s: float | None = None,
        sweep_interval_s: float = 60.0, name: str = "",
        on_cycle: Callable[[FeedReport, bool], None] | None = None,
    ) -> None:
        self._admin = admin
        self._app = app
        self._queue = queue
        self.window = window
        self._per_message = per_message
        self._interval_s = interval_s
        self._lost_after_s = lost_after_s
        self._running_lost_after_s = running_lost_after_s
        self._sweep_interval_s = sweep_interval_s
        self._name = name
        self._on_cycle = on_cycle  # (report, swept): the worker's metrics
        self._leader: Any = None  # the connection holding the leader lock
        # Per job, the seq below which every item was published by this feeder: takes start there.
        self._next_seq: dict[uuid.UUID, int] = {}
        # Items in flight per job as last counted, plus what was published since (see _flight).
        self._flight: dict[uuid.UUID, tuple[str, int]] = {}
        self._flight_at = float("-inf")
        self._broker: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imgq-feeder", daemon=True)
        self.published = 0

    # -- one cycle ------------------------------------------------------------------------------
    def depth(self) -> int:
        """Messages waiting in the queue (not those workers hold). A missing queue (Redis restarted
        empty) is empty."""
        fresh = self._broker is None
        try:
            return self._depth()
        except Exception:
            self._close_broker()
            if fresh:
                raise
            return self._depth()  # the held connection was stale (Redis restarted): one fresh try

    def _depth(self) -> int:
        if self._broker is None:
            conn = self._app.connection_for_read()
            conn.ensure_connection(max_retries=1)  # kombu's default retries for 6 s; the loop retries anyway
            self._broker = conn
        try:
            return int(self._broker.default_channel.queue_declare(self._queue, passive=True).message_count)
        except self._broker.channel_errors:
            return 0

    def feed(self, *, job: uuid.UUID | None = None, sweep: bool = False, lost_after_s: float | None = None,
             drained_only: bool = True, wait_s: float = 0.0) -> FeedReport | None:
        """One cycle; None if another feeder holds the lock. ``job`` feeds that job alone (enqueue's
        first window); ``sweep`` first puts lost items back in the backlog (queued ones only once
        the queue is empty, unless not ``drained_only``: `imgq reconcile`)."""
        try:
            return self._feed(job=job, sweep=sweep, lost_after_s=lost_after_s, drained_only=drained_only,
                              wait_s=wait_s)
        except BaseException:
            # The cycle's marks rolled back: what this feeder remembers of them is wrong now.
            self._next_seq.clear()
            self._flight_at = float("-inf")
            raise

    def _feed(self, *, job: uuid.UUID | None, sweep: bool, lost_after_s: float | None, drained_only: bool,
              wait_s: float) -> FeedReport | None:
        with self._admin.feeding(self._queue, wait_s=wait_s) as tx:
            if tx is None:
                return None
            report = FeedReport(depth=self.depth())
            if sweep:
                # A queued item may simply be waiting behind the window: it counts as lost only
                # once the queue has drained (the window is FIFO, so it would have gone first).
                queued_age = lost_after_s if lost_after_s is not None else self._lost_after_s
                report.lost = tx.lost(queued_older_than_s=queued_age if report.depth == 0 or not drained_only else None,
                                      running_older_than_s=self._running_lost_after_s, job=job)
                if report.lost:
                    self._next_seq.clear()  # lost items lie below the hints
            slots = free_slots(report.depth, self.window)
            while slots > 0:
                waiting = {w.job: w for w in tx.waiting(job)}
                if job is None:  # forget jobs with nothing left waiting
                    self._next_seq = {j: n for j, n in self._next_seq.items() if j in waiting}
                if not waiting:
                    break
                # Planned in passes: a job with fewer items waiting than planned leaves its slots
                # to the next pass, and an unbounded window is never planned slot by slot at once.
                budget = min(slots, PASS_MESSAGES)
                top = max(w.priority for w in waiting.values())
                # Shares matter only between contenders; a lone backfill skips counting what is in
                # flight (up to a window's worth of index entries per cycle).
                contended = sum(1 for w in waiting.values() if w.priority == top) > 1
                if not contended:
                    self._flight, self._flight_at = {}, float("-inf")
                flight = self._in_flight(tx) if contended else {}
                busy: dict[str, int] = {}
                for other, (tenant, n) in flight.items():
                    if other not in waiting:  # jobs fully published still occupy their tenant's share
                        busy[tenant] = busy.get(tenant, 0) + n
                backlogs = [Backlog(w.job, w.tenant, w.priority, flight.get(w.job, ("", 0))[1], rank,
                                    w.refs_per_message or self._per_message)
                            for rank, w in enumerate(waiting.values())]
                messages: list[TaskMessage] = []
                for chosen, n in plan(backlogs, budget, self._per_message, busy=busy):
                    w = waiting[chosen]  # type: ignore[index]
                    size = w.refs_per_message or self._per_message
                    # Takes start past what this feeder published of the job; items below that
                    # (a dead letter retried meanwhile) go out once the rest runs short.
                    items = tx.take(w.job, n * size, self._next_seq.get(w.job, 0))
                    if items:
                        self._next_seq[w.job] = max(self._next_seq.get(w.job, 0), items[-1][0] + 1)
                        tenant, count = self._flight.get(w.job, (w.tenant, 0))
                        self._flight[w.job] = (tenant, count + len(items))
                    messages += chunk_messages(job=str(w.job), tasks=tasks_from_record(w.tasks), items=items,
                                               per_message=size)
                    report.items += len(items)
                if messages:
                    publish(self._app, messages, queue=self._queue)
                report.messages += len(messages)
                slots -= len(messages)
                if not messages:
                    break
        self.published += report.messages
        return report

    def _in_flight(self, tx: Any) -> dict[uuid.UUID, tuple[str, int]]:
        """Items in flight per job, counted at most every FLIGHT_TTL_S (a count walks up to a
        window's worth of index entries) and kept up to date with what this feeder published."""
        now = time.monotonic()
        if now - self._flight_at >= FLIGHT_TTL_S:
            self._flight = tx.in_flight()
            self._flight_at = now
        return self._flight

    # -- the loop every worker runs -------------------------------------------------------------
    def start(self) -> Feeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._resign()
        self._close_broker()

    @property
    def leading(self) -> bool:
        return self._leader is not None

    def _lead(self) -> bool:
        """Hold the leader lock, or try to take it. A leader whose connection broke resigns."""
        if self._leader is not None:
            try:
                self._leader.exec_driver_sql("SELECT 1")
                return True
            except Exception as exc:
                log.warning("lost the feeder lock of queue %s: %s", self._queue, exc)
                self._resign()
                return False
        conn = self._admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            got = bool(conn.execute(LEADER_LOCK, {"queue": self._queue}).scalar_one())
        except Exception:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._leader = conn
        log.info("%s is the feeder of queue %s (window %d messages)", self._name or "this worker", self._queue,
                 self.window, extra={"action": "feeder", "queue": self._queue})
        return True

    def _resign(self) -> None:
        conn, self._leader = self._leader, None
        if conn is None:
            return
        with contextlib.suppress(Exception):  # a session that is gone took its lock with it
            conn.execute(LEADER_UNLOCK, {"queue": self._queue})
        # Never hand a session that may still hold the lock back to the pool.
        conn.invalidate()
        conn.close()

    def _close_broker(self) -> None:
        conn, self._broker = self._broker, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def _loop(self) -> None:
        next_sweep = time.monotonic() + self._sweep_interval_s
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self._interval_s
            try:
                if not self._lead():
                    wait = max(self._interval_s, LEADER_RETRY_S)
                    continue
                sweep = time.monotonic() >= next_sweep
                report = self.feed(sweep=sweep)
                if sweep:
                    next_sweep = time.monotonic() + self._sweep_interval_s
                if report is not None and self._on_cycle is not None:
                    self._on_cycle(report, sweep)
                if report is not None and report.lost:
                    log.warning("%d items were lost from the broker; re-published them through the window",
                                report.lost, extra={"action": "reconcile", "items": report.lost})
                if report is not None and report.messages:
                    log.debug("fed %d messages (%d items); the queue held %d", report.messages, report.items,
                              report.depth, extra={"action": "feed", "items": report.items})
            except Exception as exc:  # an outage: resign, so a healthy worker can feed meanwhile
                log.warning("feed cycle failed: %s", exc)
                self._resign()
                self._close_broker()
                wait = max(self._interval_s, LEADER_RETRY_S)
