"""The feeder's policy, pure: how much to publish, and whose items go first.

Postgres holds the backlog; Redis holds a bounded window of it. Each feed cycle tops the window up
to ``IMGQ_BROKER_WINDOW`` messages and hands the free slots out one message at a time:

1. **Priority first.** Only jobs of the highest priority that still has items waiting get slots;
   a lower priority gets what the higher ones cannot use (they ran out of waiting items).
2. **Then fair shares, tenants before jobs.** At equal priority the next message goes to the
   tenant with the fewest items in flight (published and not yet final: in Redis, prefetched or
   running), then, within that tenant, to its job with the fewest in flight, then the oldest
   job. This is max-min fairness on the pipeline: two busy tenants end up with equal shares of
   the window and therefore of the workers, whatever the size or age of their jobs.

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


def free_slots(depth: int, window: int) -> int:
    """Messages to publish now: the window less what the queue already holds."""
    return max(0, window - max(0, depth))


def plan(
    backlogs: Sequence[Backlog], messages: int, per_message: int, *, busy: Mapping[str, int] | None = None
) -> list[tuple[Hashable, int]]:
    """Hand out ``messages`` slots; returns ``(job, messages)`` in the order they were first served.

    Only the top priority present is served: a job that cannot fill its share (fewer items waiting
    than planned) comes back to the caller, which plans again without it. ``busy`` adds items in
    flight per tenant from jobs with nothing left waiting: they still occupy that tenant's share.
    """
    if messages <= 0 or not backlogs:
        return []
    top = max(b.priority for b in backlogs)
    level = [b for b in backlogs if b.priority == top]
    tenant_load: dict[str, int] = {b.tenant: (busy or {}).get(b.tenant, 0) for b in level}
    jobs_of: dict[str, list[tuple[int, int, int]]] = {}
    for index, b in enumerate(level):
        tenant_load[b.tenant] += b.in_flight
        jobs_of.setdefault(b.tenant, []).append((b.in_flight, b.age_rank, index))
    for heap in jobs_of.values():
        heapq.heapify(heap)
    tenants = [(load, name) for name, load in tenant_load.items()]
    heapq.heapify(tenants)
    given: dict[int, int] = {}
    for _ in range(messages):
        load, name = heapq.heappop(tenants)
        in_flight, age_rank, index = heapq.heappop(jobs_of[name])
        given[index] = given.get(index, 0) + 1
        size = level[index].per_message or per_message
        heapq.heappush(jobs_of[name], (in_flight + size, age_rank, index))
        heapq.heappush(tenants, (load + size, name))
    return [(level[index].job, n) for index, n in given.items()]
