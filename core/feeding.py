"""The feeder's policy, pure: how much to publish, into which broker lane, and whose items go first.

Postgres holds the backlog; Redis holds a bounded window of it, in **lanes**: one Redis list per
priority band (kombu's Redis priorities). Workers take from the first non-empty lane (one BRPOP
names them all, in order), so a message in a higher lane overtakes everything waiting in the
lower ones. Each lane is topped up to ``IMGQ_BROKER_WINDOW`` messages counting the lanes above it
(:func:`lane_slots`), so a full backfill lane never delays an interactive job's first message.
Each feed cycle hands the free slots out one message at a time:

1. **Priority first.** Only jobs of the highest priority that still has items waiting get slots;
   a lower priority gets what the higher ones cannot use (they ran out of waiting items).
2. **Then fair shares of cost, tenants before jobs.** At equal priority the next message goes to
   the tenant with the least *load* in flight (items published and not yet final, in Redis,
   prefetched or running, each weighted by its job's cost per item, ``imgq.cost``), then,
   within that tenant, to its job with the least load, then the oldest job. This is max-min
   fairness on worker time: two busy tenants end up with equal shares of the workers whatever the
   size, age or parameters of their jobs; a job whose items cost 4 gets a quarter of the messages.

Imports nothing from celery, redis or sqlalchemy; tested with tables in tests/unit/test_feeding.py.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backlog:
    """A job with items waiting in Postgres."""

    job: Hashable
    tenant: str
    priority: int
    in_flight: int  # items published and not final
    age_rank: int = 0  # smaller = older; breaks ties between jobs of one tenant
    per_message: int | None = None  # the job's message size; None = plan's per_message
    cost: float = 1.0  # relative cost of one of its items (imgq.cost.item_cost)


# kombu Redis priorities of the lanes, first consumed first: 0 is the queue's own list (every
# message without a priority lands there too), 6 is ``<queue>\x06\x166``. Workers are configured
# with these as ``priority_steps`` (imgq.celeryconf).
TOP_LANE = 0
BACKFILL_LANE = 6
LANES = (TOP_LANE, BACKFILL_LANE)

# Every priority a job, a setting or a tenant's cap may name: ample for ordering, and far inside
# the Postgres integer column (a value outside it was an internal error).
PRIORITY_MIN, PRIORITY_MAX = -1_000_000, 1_000_000


def lane(priority: int) -> int:
    """The broker lane of a job's messages: interactive and default jobs (priority >= 0) share
    the top lane; backfills (priority < 0) wait in theirs until the top lane is empty."""
    return TOP_LANE if priority >= 0 else BACKFILL_LANE


def free_slots(depth: int, window: int) -> int:
    """Messages to publish now: the window less what the queue already holds."""
    return max(0, window - max(0, depth))


def lane_slots(depths: Mapping[int, int], to_lane: int, window: int) -> int:
    """Messages to publish into ``to_lane`` now: the window less what that lane and every lane
    consumed before it hold. A lower lane never fills while a higher one is full, and Redis holds
    at most ``len(LANES) * window`` messages (the top lane fills while a lower one is full)."""
    return free_slots(sum(n for other, n in depths.items() if other <= to_lane), window)


# What one message is taken to cost Redis before publishing it: kombu's envelope, then each ref
# (JSON, base64'd body). Measured with MEMORY USAGE: 1.8 kB for one 40-character ref, 2.75 kB for
# 16, 82 kB for 1,000 of 40 characters and 328 kB for 1,000 of 200 (docs/scaling.md); this errs
# high for refs of up to about 150 characters, and what the lanes hold corrects it for longer ones.
MESSAGE_BASE_BYTES = 2_048
MESSAGE_REF_BYTES = 256


def message_bytes(refs_per_message: int, measured: float | None = None) -> float:
    """Bytes of Redis one message of ``refs_per_message`` refs is taken to need: the guess above,
    or what the messages waiting in the lanes cost on average (``measured``) if that is more."""
    return max(float(measured or 0.0), float(MESSAGE_BASE_BYTES + MESSAGE_REF_BYTES * refs_per_message))


def memory_slots(used: int, maxmemory: int, fraction: float, per_message: float) -> int | None:
    """Messages that fit in Redis below ``fraction`` of its ``maxmemory`` now; None when there is
    no such bound (no ``maxmemory``, or ``fraction`` 0: the check is off). ``used`` is what Redis
    counts against ``maxmemory`` (INFO memory), every client's keys included."""
    if maxmemory <= 0 or fraction <= 0:
        return None
    return max(0, int((fraction * maxmemory - used) // max(1.0, per_message)))


def plan(
    backlogs: Sequence[Backlog], messages: int, per_message: int, *, busy: Mapping[str, float] | None = None
) -> list[tuple[Hashable, int]]:
    """Hand out ``messages`` slots; returns ``(job, messages)`` in the order they were first served.

    Only the top priority present is served: a job that cannot fill its share (fewer items waiting
    than planned) comes back to the caller, which plans again without it. ``busy`` adds load in
    flight per tenant (items x cost) from jobs with nothing left waiting: they still occupy that
    tenant's share.
    """
    if messages <= 0 or not backlogs:
        return []
    top = max(b.priority for b in backlogs)
    level = [b for b in backlogs if b.priority == top]
    tenant_load: dict[str, float] = {b.tenant: float((busy or {}).get(b.tenant, 0)) for b in level}
    jobs_of: dict[str, list[tuple[float, int, int]]] = {}
    for index, b in enumerate(level):
        load = b.in_flight * b.cost
        tenant_load[b.tenant] += load
        jobs_of.setdefault(b.tenant, []).append((load, b.age_rank, index))
    for heap in jobs_of.values():
        heapq.heapify(heap)
    tenants = [(load, name) for name, load in tenant_load.items()]
    heapq.heapify(tenants)
    given: dict[int, int] = {}
    for _ in range(messages):
        load, name = heapq.heappop(tenants)
        job_load, age_rank, index = heapq.heappop(jobs_of[name])
        given[index] = given.get(index, 0) + 1
        b = level[index]
        weight = (b.per_message or per_message) * b.cost
        heapq.heappush(jobs_of[name], (job_load + weight, age_rank, index))
        heapq.heappush(tenants, (load + weight, name))
    return [(level[index].job, n) for index, n in given.items()]


class PushLog:
    """When a feeder pushed messages into each lane (database time), newest last.

    A lane is a FIFO list: a depth of D is the D messages pushed last. So counting logged pushes
    back from the newest until they reach D gives a time before which every message pushed has
    left the lane, taken by a worker or lost with Redis: an item published before it and still
    queued (past the age that covers prefetched messages) was lost, whatever the other lanes
    hold and however deep its own lane is. Pushes this log never saw (a producer's first
    messages, retries, another feeder's) only move the answer earlier: it never calls a message
    still in the list lost, it may just see a loss later.
    """

    def __init__(self, keep: int = 10_000) -> None:
        self._keep = keep
        self._pushes: dict[int, list[tuple[object, int]]] = {}

    def pushed(self, to_lane: int, at: object, messages: int) -> None:
        if messages <= 0:
            return
        pushes = self._pushes.setdefault(to_lane, [])
        pushes.append((at, messages))
        if len(pushes) > 2 * self._keep:  # trimmed in bulk: appends stay O(1)
            del pushes[: len(pushes) - self._keep]

    def left_before(self, lane_: int, depth: int) -> object | None:
        """A time before which every message pushed into the lane has left it; None when the lane
        is empty (every message has left). ``UNKNOWN`` when the log holds fewer pushes than the
        lane holds messages (it began after they were pushed)."""
        if depth <= 0:
            return None
        seen = 0
        for at, messages in reversed(self._pushes.get(lane_, [])):
            seen += messages
            if seen >= depth:
                return at
        return UNKNOWN

    def forget(self) -> None:
        """After a cycle rolled back: its pushes may not have happened."""
        self._pushes.clear()


UNKNOWN = "-infinity"  # Postgres' timestamp before every other: nothing was pushed before it
