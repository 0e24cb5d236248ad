"""The feeder: keeps Redis holding a bounded window of the backlog that Postgres holds.

Each cycle, under the queue's feed lock (a Postgres transaction lock), it reads the depth of each
of the queue's lanes, marks the next items published in the order of ``imgq.feeding`` (priority,
then cost-weighted fair shares between tenants and jobs), publishes them into their job's lane,
and commits. A publish that fails rolls the marks back.

Every worker runs one, so nothing extra is deployed; a session advisory lock elects which worker
runs the loop (a killed worker's session, and so its lock, ends with its connection; another
worker takes over within a second). ``imgq enqueue``, ``imgq reconcile`` and ``imgq dlq retry``
run single cycles under the same feed lock.

It also finds lost messages (what the reconciler did): items published and still ``queued`` for
longer than ``IMGQ_RECONCILE_AFTER_S`` whose lane has let every message pushed before theirs go
(``imgq.feeding.PushLog``) were lost (Redis restarted empty, a producer died mid-publish), and
``running`` items older than visibility timeout + time limit were never settled. They go back to
the backlog and are fed again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from imgq.contract import TaskMessage
from imgq.cost import item_cost
from imgq.db.admin import LEADER_LOCK, LEADER_UNLOCK, Admin, LiveHolders
from imgq.feeding import LANES, TOP_LANE, Backlog, PushLog, lane, lane_slots, memory_slots, message_bytes, plan
from imgq.publish import chunk_messages, publish, tasks_from_record
from imgq.transport import counted_memory

if TYPE_CHECKING:
    from imgq.config import Settings

log = logging.getLogger(__name__)

# A worker that is not the feeder tries to become it this often.
LEADER_RETRY_S = 1.0
# Most messages planned and published in one pass of a cycle.
PASS_MESSAGES = 2_000
# What a producer (enqueue, a backfill, a dead-letter retry) publishes itself, so that its job starts
# at once; the workers' feeder tops up the rest of the window every IMGQ_FEED_INTERVAL_S. A whole
# 10,000-message window took 6.8 s of a 1M-ref enqueue (marks and publishing, docs/performance.md).
PRODUCER_MESSAGES = 500
# Takes of at most this many items go in one statement per pass (Feeding.take_many).
SMALL_TAKE = 256
# The memory mark's warning is said at most this often (Feeder._log_held).
HELD_LOG_S = 60.0
# How long a count of the items in flight serves the fair shares (published items are added to it).
FLIGHT_TTL_S = 2.0


@dataclass(slots=True)
class FeedReport:
    depth: int = 0  # messages in the queue (every lane) when the cycle began
    messages: int = 0
    items: int = 0
    lost: int = 0  # items put back in the backlog (lost messages)
    abandoned: int = 0  # items of abandoned acceptances deleted (no job ever had them)
    cancelled: int = 0  # waiting items of cancelled jobs cancelled (a cancel's unfinished sweep)
    # Stopped short of the window because Redis was at IMGQ_BROKER_MEMORY_FRACTION of its maxmemory;
    # None when no pass read its memory (nothing to publish, or no maxmemory).
    held: bool | None = None


class Feeder:
    """Tops the broker window up from the Postgres backlog; see the module docstring."""

    def __init__(
        self, *, admin: Admin, app: Celery, queue: str, window: int, per_message: int,
        interval_s: float = 0.25, lost_after_s: float | None = None, running_lost_after_s: float | None = None,
        sweep_interval_s: float = 60.0, name: str = "", live: LiveHolders | None = None,
        on_cycle: Callable[[FeedReport, bool], None] | None = None, small_take: int = SMALL_TAKE,
        memory_fraction: float = 0.8,
    ) -> None:
        self._admin = admin
        self._app = app
        self._queue = queue
        self.window = window
        self._per_message = per_message
        self._interval_s = interval_s
        self._lost_after_s = lost_after_s
        self._running_lost_after_s = running_lost_after_s
        self._live = live
        self._small_take = small_take  # 0: a statement per take (bench.small_jobs compares)
        self._memory_fraction = memory_fraction  # 0: only the window bounds what Redis holds
        self._sweep_interval_s = sweep_interval_s
        self._name = name
        self._on_cycle = on_cycle  # (report, swept): the worker's metrics
        self._leader: Any = None  # the connection holding the leader lock
        # Per job, the seq below which every item was published by this feeder: takes start there.
        self._next_seq: dict[uuid.UUID, int] = {}
        # Items in flight per job as last counted, plus what was published since (see _flight).
        self._flight: dict[uuid.UUID, tuple[str, int]] = {}
        self._flight_at = float("-inf")
        # Cost per item of the jobs seen waiting: weighs their load in flight (imgq.cost).
        self._costs: dict[uuid.UUID, float] = {}
        # What this feeder pushed into each lane: tells lost messages from waiting ones (PushLog).
        self._pushes = PushLog()
        self._broker: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imgq-feeder", daemon=True)
        self.published = 0
        # Whether the memory mark's hold was last said to start (and when), for _log_held.
        self._held_said, self._held_said_at = False, float("-inf")

    @classmethod
    def from_settings(cls, settings: Settings, *, admin: Admin, app: Celery, **kwargs: Any) -> Feeder:
        """A feeder of ``settings``' queue, window, message size and memory mark (the one place they
        are read); ``kwargs`` add to them or override them."""
        base = {"queue": settings.queue, "window": settings.broker_window, "per_message": settings.refs_per_message,
                "memory_fraction": settings.broker_memory_fraction}
        return cls(admin=admin, app=app, **(base | kwargs))

    # -- one cycle ------------------------------------------------------------------------------
    def depth(self) -> int:
        """Messages waiting in the queue, every lane (not those workers hold)."""
        return sum(self.depths().values())

    def depths(self) -> dict[int, int]:
        """Messages waiting in each lane of the queue (``imgq.feeding.LANES``). A missing list
        (an empty lane, or Redis restarted empty) is empty."""
        fresh = self._broker is None
        try:
            return self._depths()
        except Exception:
            self._close_broker()
            if fresh:
                raise
            return self._depths()  # the held connection was stale (Redis restarted): one fresh try

    def _depths(self) -> dict[int, int]:
        if self._broker is None:
            conn = self._app.connection_for_read()
            conn.ensure_connection(max_retries=1)  # kombu's default retries for 6 s; the loop retries anyway
            self._broker = conn
        channel = self._broker.default_channel
        with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            for key in self._lane_keys(channel):
                pipe.llen(key)
            return {n: int(size) for n, size in zip(LANES, pipe.execute(), strict=True)}

    def _lane_keys(self, channel: Any) -> list[str]:
        """kombu names lane p of queue q "q" (p = 0) or "q<sep>p"; the client adds any key prefix."""
        return [f"{self._queue}{channel.sep}{n}" if n else self._queue for n in LANES]

    def _memory_room(self, refs_per_message: int) -> int | None:
        """Messages of ``refs_per_message`` refs that fit in Redis below the memory fraction of its
        ``maxmemory`` now (imgq.feeding.memory_slots); None when nothing bounds it but the window.
        On the broker connection the cycle's ``depths()`` opened."""
        if self._memory_fraction <= 0:
            return None
        channel = self._broker.default_channel
        keys = self._lane_keys(channel)
        with channel.conn_or_acquire() as client:
            try:
                memory = client.info("memory")
            except redis.exceptions.ResponseError as exc:  # INFO renamed or refused (a managed Redis)
                log.warning("cannot read Redis' memory (%s): IMGQ_BROKER_MEMORY_FRACTION is not applied", exc)
                self._memory_fraction = 0.0
                return None
            maxmemory = int(memory.get("maxmemory") or 0)
            if maxmemory <= 0:
                return None
            measured = None
            with contextlib.suppress(redis.exceptions.ResponseError), client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                    pipe.memory_usage(key, samples=5)
                answers = pipe.execute()
                messages = sum(int(n or 0) for n in answers[::2])
                if messages:
                    measured = sum(int(b or 0) for b in answers[1::2]) / messages
        return memory_slots(counted_memory(memory), maxmemory, self._memory_fraction,
                            message_bytes(refs_per_message, measured))

    def feed(self, *, job: uuid.UUID | None = None, sweep: bool = False, lost_after_s: float | None = None,
             drained_only: bool = True, wait_s: float = 0.0, max_messages: int | None = None) -> FeedReport | None:
        """One cycle; None if another feeder holds the lock. ``job`` feeds that job alone (enqueue's
        first messages); ``sweep`` first puts lost items back in the backlog (queued ones only once
        the queue is empty, unless not ``drained_only``: `imgq reconcile`); ``max_messages`` stops
        the cycle after that many messages even if the window has more room. A sweep also deletes
        the items of acceptances abandoned between their commits (``Admin.drop_abandoned``)."""
        try:
            report = self._feed(job=job, sweep=sweep, lost_after_s=lost_after_s, drained_only=drained_only,
                                wait_s=wait_s, max_messages=max_messages)
        except BaseException:
            # The cycle's marks rolled back: what this feeder remembers of them is wrong now.
            self._next_seq.clear()
            self._flight_at = float("-inf")
            self._pushes.forget()
            raise
        if report is not None and sweep:
            report.abandoned = self._admin.drop_abandoned()[1]
        return report

    def _feed(self, *, job: uuid.UUID | None, sweep: bool, lost_after_s: float | None, drained_only: bool,
              wait_s: float, max_messages: int | None) -> FeedReport | None:
        with self._admin.feeding(self._queue, wait_s=wait_s) as tx:
            if tx is None:
                return None
            depths = self.depths()
            report = FeedReport(depth=sum(depths.values()))
            if sweep:
                # A queued item may simply be waiting behind the window: it counts as lost only
                # once every message pushed into its lane up to its own has left the lane (each
                # lane is FIFO: PushLog). Waiting for the whole queue to drain left an urgent
                # job's lost items queued for as long as a backfill kept its lane topped up.
                queued_age = lost_after_s if lost_after_s is not None else self._lost_after_s
                bounds = {n: self._pushes.left_before(n, depths.get(n, 0)) for n in LANES} if drained_only else None
                report.lost = tx.lost(queued_older_than_s=queued_age, running_older_than_s=self._running_lost_after_s,
                                      job=job, left_before=bounds, live=self._live)
                if report.lost:
                    self._next_seq.clear()  # lost items lie below the hints
            pushed_at: Any = None
            cancels_swept = False
            while True:
                if lane_slots(depths, TOP_LANE, self.window) <= 0:
                    # No lane has room (the top lane's is the most any has): reading the backlog
                    # walks every waiting job, 1.2-1.4 s a cycle with 20,000 of them (found by review).
                    break
                waiting = {w.job: w for w in tx.waiting(job)}
                cancelled = [w.job for w in waiting.values() if w.cancelled]
                if cancelled:
                    # A cancel whose sweep did not finish (its process died, imgq.db.cancelling):
                    # a chunk of each such job a cycle, never published.
                    if not cancels_swept:
                        report.cancelled = sum(tx.cancel_waiting(j) for j in cancelled)
                        cancels_swept = True
                    waiting = {j: w for j, w in waiting.items() if not w.cancelled}
                if job is None:  # forget jobs with nothing left waiting
                    self._next_seq = {j: n for j, n in self._next_seq.items() if j in waiting}
                if not waiting:
                    break
                top = max(w.priority for w in waiting.values())
                # The top priority's lane has room up to the window, counting the lanes above it;
                # a lower priority's lane never has more (imgq.feeding.lane_slots).
                to_lane = lane(top)
                slots = lane_slots(depths, to_lane, self.window)
                if slots <= 0:
                    break
                # Planned in passes: a job with fewer items waiting than planned leaves its slots
                # to the next pass, and an unbounded window is never planned slot by slot at once.
                budget = min(slots, PASS_MESSAGES)
                if max_messages is not None:
                    budget = min(budget, max_messages - report.messages)
                    if budget <= 0:
                        break
                # Redis near its maxmemory (other clients' keys count too): the rest waits in
                # Postgres. Read again each pass, so a pass overshoots by at most its estimate's error.
                room = self._memory_room(max(w.refs_per_message or self._per_message
                                            for w in waiting.values() if w.priority == top))
                capped = room is not None and room < budget
                if room is not None:
                    budget = min(budget, room)
                    if budget <= 0:
                        report.held = True  # items wait, and Redis has no room for one message
                        break
                # Shares matter only between contenders; a lone backfill skips counting what is in
                # flight (up to a window's worth of index entries per cycle).
                contended = sum(1 for w in waiting.values() if w.priority == top) > 1
                if not contended:
                    self._flight, self._flight_at = {}, float("-inf")
                flight = self._in_flight(tx) if contended else {}
                costs = self._job_costs(waiting.values(), flight)
                busy: dict[str, float] = {}
                for other, (tenant, n) in flight.items():
                    if other not in waiting:  # jobs fully published still occupy their tenant's share
                        busy[tenant] = busy.get(tenant, 0.0) + n * costs.get(other, 1.0)
                backlogs = [Backlog(w.job, w.tenant, w.priority, flight.get(w.job, ("", 0))[1], rank,
                                    w.refs_per_message or self._per_message, costs[w.job])
                            for rank, w in enumerate(waiting.values())]
                messages: list[TaskMessage] = []
                chosen = [(waiting[job], n * (waiting[job].refs_per_message or self._per_message))  # type: ignore[index]
                          for job, n in plan(backlogs, budget, self._per_message, busy=busy)]
                # Takes start past what this feeder published of the job; items below that (a dead
                # letter retried meanwhile) go out once the rest runs short. Small ones in one
                # statement: with many single-image jobs a take each cost as much as their messages.
                small = tx.take_many([(w.job, n, self._next_seq.get(w.job, 0))
                                      for w, n in chosen if n <= self._small_take])
                for w, n in chosen:
                    size = w.refs_per_message or self._per_message
                    items = small.pop(w.job) if w.job in small else tx.take(w.job, n, self._next_seq.get(w.job, 0))
                    if items:
                        self._next_seq[w.job] = max(self._next_seq.get(w.job, 0), items[-1][0] + 1)
                        tenant, count = self._flight.get(w.job, (w.tenant, 0))
                        self._flight[w.job] = (tenant, count + len(items))
                    messages += chunk_messages(job=str(w.job), tasks=tasks_from_record(w.tasks), items=items,
                                               per_message=size)
                    report.items += len(items)
                if room is not None:
                    # Held only if the room, not the backlog, ended the pass: a backlog smaller
                    # than the room was all published.
                    report.held = bool(report.held) or (capped and len(messages) >= budget)
                if messages:
                    publish(self._app, messages, queue=self._queue, lane=to_lane)
                    pushed_at = tx.now() if pushed_at is None else pushed_at
                    self._pushes.pushed(to_lane, pushed_at, len(messages))
                report.messages += len(messages)
                depths[to_lane] = depths.get(to_lane, 0) + len(messages)
                if not messages:
                    break
        self.published += report.messages
        return report

    def _job_costs(self, waiting: Any, flight: dict[uuid.UUID, tuple[str, int]]) -> dict[uuid.UUID, float]:
        """Cost per item of every job waiting (its tasks never change: computed once) and of the
        jobs in flight that this feeder saw waiting; the others count as 1."""
        for w in waiting:
            if w.job not in self._costs:
                self._costs[w.job] = item_cost(w.tasks)
        if len(self._costs) > 4 * (len(flight) + 64):  # forget finished jobs now and then
            keep = {w.job for w in waiting} | set(flight)
            self._costs = {j: c for j, c in self._costs.items() if j in keep}
        return self._costs

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

    def _log_held(self, held: bool) -> None:
        """Say when the memory mark starts and stops holding the backlog back: at most once a
        HELD_LOG_S, since near the mark Redis' used memory moves by a few messages' worth between
        cycles and the state could flip four times a second."""
        now = time.monotonic()
        if held and not self._held_said and now - self._held_said_at >= HELD_LOG_S:
            self._held_said, self._held_said_at = True, now
            log.warning("Redis is at %d%% of its maxmemory (IMGQ_BROKER_MEMORY_FRACTION): the backlog waits in "
                        "Postgres until it has room", round(self._memory_fraction * 100),
                        extra={"action": "feed", "queue": self._queue})
        elif not held and self._held_said:
            self._held_said = False
            log.info("Redis has room again: feeding the window", extra={"action": "feed"})

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
                if report is not None and report.abandoned:
                    log.warning("deleted %d items of acceptances abandoned mid-commit (their jobs never existed)",
                                report.abandoned, extra={"action": "reconcile", "items": report.abandoned})
                if report is not None and report.lost:
                    log.warning("%d items were lost from the broker; re-published them through the window",
                                report.lost, extra={"action": "reconcile", "items": report.lost})
                if report is not None and report.held is not None:
                    self._log_held(report.held)
                if report is not None and report.messages:
                    log.debug("fed %d messages (%d items); the queue held %d", report.messages, report.items,
                              report.depth, extra={"action": "feed", "items": report.items})
            except Exception as exc:  # an outage: resign, so a healthy worker can feed meanwhile
                log.warning("feed cycle failed: %s", exc)
                self._resign()
                self._close_broker()
                wait = max(self._interval_s, LEADER_RETRY_S)
