"""The feeder's policy: lanes and their windows, and the priority-then-fair-share order, as tables."""

from __future__ import annotations

import pytest

from imgq.feeding import (
    BACKFILL_LANE,
    TOP_LANE,
    Backlog,
    free_slots,
    lane,
    lane_slots,
    memory_slots,
    message_bytes,
    plan,
)


@pytest.mark.parametrize(("depth", "window", "slots"), [
    (0, 10, 10), (4, 10, 6), (10, 10, 0), (12, 10, 0), (-1, 10, 10),
])
def test_free_slots_tops_the_window_up_and_never_beyond(depth: int, window: int, slots: int) -> None:
    assert free_slots(depth, window) == slots


def _plan(backlogs: list[Backlog], messages: int, per_message: int = 2, **kw: object) -> dict[object, int]:
    return dict(plan(backlogs, messages, per_message, **kw))  # type: ignore[arg-type]


def test_only_the_highest_priority_is_served_while_it_has_items_waiting() -> None:
    big = Backlog("big", "t", priority=0, in_flight=0)
    urgent = Backlog("urgent", "t", priority=5, in_flight=100)
    assert _plan([big, urgent], 8) == {"urgent": 8}
    # Once the urgent job has nothing waiting (the caller drops it), the big one gets the slots.
    assert _plan([big], 8) == {"big": 8}


def test_two_idle_tenants_of_equal_priority_split_the_window_evenly() -> None:
    a = Backlog("a", "tenant-a", 0, 0)
    b = Backlog("b", "tenant-b", 0, 0)
    assert _plan([a, b], 10) == {"a": 5, "b": 5}


def test_the_tenant_with_fewer_items_in_flight_catches_up_first() -> None:
    a = Backlog("a", "tenant-a", 0, in_flight=20)  # already holds 10 messages of 2
    b = Backlog("b", "tenant-b", 0, in_flight=0)
    assert _plan([a, b], 6) == {"b": 6}
    assert _plan([a, b], 14) == {"b": 12, "a": 2}


def test_fairness_is_between_tenants_first_then_between_their_jobs() -> None:
    # Tenant x has three jobs, tenant y one: y gets half the slots, not a quarter.
    jobs = [Backlog(f"x{i}", "x", 0, 0, age_rank=i) for i in range(3)] + [Backlog("y0", "y", 0, 0, age_rank=3)]
    got = _plan(jobs, 12)
    assert got["y0"] == 6
    assert sorted(got[f"x{i}"] for i in range(3)) == [2, 2, 2]


def test_jobs_already_published_still_count_in_their_tenants_share() -> None:
    a = Backlog("a2", "tenant-a", 0, 0)
    b = Backlog("b", "tenant-b", 0, 0)
    assert _plan([a, b], 4, busy={"tenant-a": 8}) == {"b": 4}


def test_equal_loads_go_to_the_oldest_job_first() -> None:
    old = Backlog("old", "t", 0, 0, age_rank=0)
    new = Backlog("new", "t", 0, 0, age_rank=1)
    assert plan([new, old], 1, 2) == [("old", 1)]


def test_a_job_of_larger_messages_takes_a_share_in_items_not_in_messages() -> None:
    small = Backlog("small", "a", 0, 0, per_message=2)
    large = Backlog("large", "b", 0, 0, per_message=8)
    got = _plan([small, large], 10)
    assert got == {"small": 8, "large": 2}  # 16 items each


@pytest.mark.parametrize("messages", [0, -3])
def test_no_slots_no_plan(messages: int) -> None:
    assert plan([Backlog("a", "t", 0, 0)], messages, 2) == []
    assert plan([], 5, 2) == []


@pytest.mark.parametrize(("priority", "expected"), [
    (10, TOP_LANE), (1, TOP_LANE), (0, TOP_LANE), (-1, BACKFILL_LANE), (-10, BACKFILL_LANE),
])
def test_backfills_get_a_lane_of_their_own_below_every_other_job(priority: int, expected: int) -> None:
    assert lane(priority) == expected
    assert TOP_LANE < BACKFILL_LANE, "kombu's Redis transport drains the lowest number first"


@pytest.mark.parametrize(("depths", "to_lane", "slots"), [
    # A full backfill lane leaves the top lane its whole window: interactive work never waits for it.
    ({TOP_LANE: 0, BACKFILL_LANE: 10}, TOP_LANE, 10),
    ({TOP_LANE: 3, BACKFILL_LANE: 10}, TOP_LANE, 7),
    # A lower lane fills only up to the window less what the lanes above it hold.
    ({TOP_LANE: 3, BACKFILL_LANE: 2}, BACKFILL_LANE, 5),
    ({TOP_LANE: 10, BACKFILL_LANE: 0}, BACKFILL_LANE, 0),
    ({TOP_LANE: 4, BACKFILL_LANE: 10}, BACKFILL_LANE, 0),
    ({}, BACKFILL_LANE, 10),
])
def test_each_lane_is_topped_up_to_the_window_counting_the_lanes_above_it(
    depths: dict[int, int], to_lane: int, slots: int
) -> None:
    assert lane_slots(depths, to_lane, window=10) == slots


@pytest.mark.parametrize(("cost", "cheap", "dear"), [(1.0, 30, 30), (2.0, 40, 20), (4.0, 48, 12), (5.0, 50, 10)])
def test_an_expensive_job_gets_messages_in_inverse_proportion_to_its_cost(cost: float, cheap: int, dear: int) -> None:
    a = Backlog("cheap", "tenant-a", 0, 0, cost=1.0)
    b = Backlog("dear", "tenant-b", 0, 0, cost=cost)
    assert _plan([a, b], 60) == {"cheap": cheap, "dear": dear}  # equal worker time: cheap * 1 == dear * cost


def test_load_in_flight_is_weighted_by_cost_too() -> None:
    # 16 items of cost 4 in flight weigh what 64 items of cost 1 do: the cheap tenant catches up.
    cheap = Backlog("cheap", "tenant-a", 0, in_flight=0, cost=1.0)
    dear = Backlog("dear", "tenant-b", 0, in_flight=16, cost=4.0)
    assert _plan([cheap, dear], 32) == {"cheap": 32}
    assert _plan([cheap, dear], 72) == {"cheap": 64, "dear": 8}  # then 4 to 1
    # ... and so is what a tenant's finished-publishing jobs hold (busy is load, not items).
    assert _plan([Backlog("x", "tenant-a", 0, 0), Backlog("y", "tenant-b", 0, 0)], 4,
                 busy={"tenant-a": 8.0}) == {"y": 4}


def test_cost_never_overrides_priority() -> None:
    urgent_and_dear = Backlog("urgent", "t", priority=5, in_flight=1000, cost=287.0)
    cheap = Backlog("cheap", "u", priority=0, in_flight=0, cost=0.3)
    assert _plan([urgent_and_dear, cheap], 8) == {"urgent": 8}


def test_an_expensive_job_shares_its_own_tenant_fairly_with_that_tenants_cheap_jobs() -> None:
    cheap = Backlog("cheap", "t", 0, 0, age_rank=1, cost=1.0)
    dear = Backlog("dear", "t", 0, 0, age_rank=0, cost=3.0)
    assert _plan([cheap, dear], 8) == {"dear": 2, "cheap": 6}


def test_a_tenant_missing_from_busy_holds_nothing_in_flight() -> None:
    # b has nothing busy and a only half an item's load: b is the lighter and is served first.
    a = Backlog("a", "tenant-a", 0, in_flight=0)
    b = Backlog("b", "tenant-b", 0, in_flight=0, age_rank=1)
    assert plan([a, b], 1, 2, busy={"tenant-a": 0.5}) == [("b", 1)]


def test_a_push_log_tells_when_the_oldest_message_still_in_a_lane_was_pushed():
    from imgq.feeding import UNKNOWN, PushLog

    log = PushLog(keep=3)
    assert log.left_before(0, 0) is None, "an empty lane holds nothing: every push has left it"
    assert log.left_before(0, 1) == UNKNOWN, "messages pushed before the log began"
    for at, n in ((1, 4), (2, 2), (3, 3)):
        log.pushed(0, at, n)
    log.pushed(6, 9, 5)
    assert [log.left_before(0, depth) for depth in (1, 3, 4, 5, 6, 9, 10)] == [3, 3, 2, 2, 1, 1, UNKNOWN]
    assert log.left_before(6, 5) == 9 and log.left_before(6, 6) == UNKNOWN, "each lane its own"
    for at in range(10, 20):
        log.pushed(0, at, 1)
    assert log.left_before(0, 3) == 17 and log.left_before(0, 50) == UNKNOWN, "bounded, the oldest dropped"
    log.forget()
    assert log.left_before(0, 1) == UNKNOWN


@pytest.mark.parametrize(("used", "maxmemory", "fraction", "per_message", "slots"), [
    (0, 0, 0.8, 4096, None),  # no maxmemory: only the window bounds Redis
    (0, 100_000_000, 0.0, 4096, None),  # the check is off
    (0, 100_000_000, 0.8, 4096, 19_531),  # 80 MB of room
    (79_000_000, 100_000_000, 0.8, 4096, 244),
    (80_000_000, 100_000_000, 0.8, 4096, 0),  # at the mark: nothing more
    (95_000_000, 100_000_000, 0.8, 4096, 0),  # past it (other clients' keys): never negative
    (79_999_000, 100_000_000, 0.8, 4096, 0),  # room for less than one message
    (0, 1, 0.8, 4096, 0),  # a maxmemory of one byte is a limit too (tests make Redis full so)
    (0, 1_000, 0.8, 1, 800),  # one-byte messages: no rounding up of the size
    (0, 1_000, 0.8, 0, 800),  # nor a division by zero
])
def test_memory_slots(used: int, maxmemory: int, fraction: float, per_message: float, slots: int | None) -> None:
    assert memory_slots(used, maxmemory, fraction, per_message) == slots


def test_message_bytes_errs_high_then_follows_what_redis_measured() -> None:
    # Measured with MEMORY USAGE (docs/scaling.md): 2.75 kB for 16 short refs, 82 kB for 1,000.
    assert message_bytes(16) >= 2_750 and message_bytes(1_000) >= 82_000
    assert message_bytes(16) < 3 * 2_750  # high, not absurd: a first cycle still fills most of its room
    assert message_bytes(1_000, measured=327_720.0) == 327_720.0  # 200-character refs: measured wins
    assert message_bytes(16, measured=2_700.0) == message_bytes(16)
