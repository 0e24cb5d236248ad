"""Two deliveries of one message handled at once by one worker (a duplicate published by the
reconciler, say): the second waits for the first to hand the items to the engine and joins them.
Before, both claimed: an extra attempt, and the second, finding the item "running", treated it as a
crash suspect; both then settled the same failure (two retry messages, two releases).

With the in-memory store and the real Engine of test_service_joined_timeout."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

from imgq.ports import Claim
from imgq.worker.service import Summary
from tests.unit.test_service_joined_timeout import Setup
from tests.waits import SETTLE_S


def test_a_duplicate_handled_while_the_first_claims_joins_it_and_costs_nothing():
    s = Setup(time_limit_s=SETTLE_S, held={0})
    claiming, go = threading.Event(), threading.Event()
    claim, calls = s.store.claim, []

    def slow_first_claim(job: uuid.UUID, seqs: Sequence[int], worker: str) -> dict[int, Claim]:
        calls.append(list(seqs))
        if len(calls) == 1:  # the first handler, between its look at what is in flight and its claim
            claiming.set()
            go.wait(SETTLE_S)
        return claim(job, seqs, worker)

    s.store.claim = slow_first_claim  # type: ignore[method-assign]
    first = s.handle_in_thread(s.payload(0))
    assert claiming.wait(SETTLE_S)
    duplicate = s.handle_in_thread(s.payload(0))
    time.sleep(0.5)  # before the fix the duplicate claims and submits in this time
    go.set()
    s.joining()
    s.finish(first, duplicate)
    assert calls == [[0]], "claimed once"
    assert s.store.attempts[0] == 1, "the duplicate cost no attempt"
    assert sorted([first["summary"], duplicate["summary"]], key=lambda x: x.skipped) == [
        Summary(retried=1), Summary(skipped=1)]
    assert s.published_items() == [[0, "img-0"]] and s.store.released == [0], "one retry, not two"
    assert not s.service._claiming and not s.service._joins


def test_a_message_that_overlaps_another_in_part_claims_only_the_rest():
    s = Setup(time_limit_s=SETTLE_S, held={0, 1, 2})
    owner = s.handle_in_thread(s.payload(0, 1))
    s.submitted(0)
    overlap = s.handle_in_thread(s.payload(1, 2))
    s.joining()
    s.finish(owner, overlap)
    assert s.store.attempts == {0: 1, 1: 1, 2: 1}
    assert owner["summary"] == Summary(retried=2) and overlap["summary"] == Summary(retried=1, skipped=1)
    assert s.published_items() == [[0, "img-0"], [1, "img-1"], [2, "img-2"]]
    assert not s.service._claiming
