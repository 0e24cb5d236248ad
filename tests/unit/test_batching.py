import pytest

from imgq.batching import Batcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(max_batch=4, max_wait=0.05, limit=None):
    clock = FakeClock()
    return Batcher(max_batch, max_wait, clock, limit=limit), clock


# (events, expected flushed batches as (key, items)); events: ("add", t, key, item) or ("due", t)
CASES = [
    ("full batch flushes at once",
     [("add", 0, "a", 1), ("add", 0, "a", 2), ("add", 0, "a", 3), ("add", 0, "a", 4)],
     [("a", [1, 2, 3, 4])]),
    ("not due before max wait",
     [("add", 0, "a", 1), ("due", 0.049)],
     []),
    ("due exactly at max wait",
     [("add", 0, "a", 1), ("due", 0.05)],
     [("a", [1])]),
    ("keys never mix",
     [("add", 0, "a", 1), ("add", 0, "b", 2), ("add", 0, "a", 3), ("due", 1)],
     [("a", [1, 3]), ("b", [2])]),
    ("oldest group first",
     [("add", 0.0, "b", 1), ("add", 0.01, "a", 2), ("add", 0.02, "b", 3), ("due", 1)],
     [("b", [1, 3]), ("a", [2])]),
    ("wait counts from the oldest item",
     [("add", 0, "a", 1), ("add", 0.04, "a", 2), ("due", 0.05)],
     [("a", [1, 2])]),
    ("a new group starts after a flush",
     [("add", 0, "a", 1), ("add", 0, "a", 2), ("add", 0, "a", 3), ("add", 0, "a", 4),
      ("add", 0.1, "a", 5), ("due", 0.12), ("due", 0.16)],
     [("a", [1, 2, 3, 4]), ("a", [5])]),
]


@pytest.mark.parametrize(("name", "events", "expected"), CASES, ids=[c[0] for c in CASES])
def test_policy_table(name, events, expected):
    batcher, clock = make()
    flushed = []
    for event in events:
        clock.now = event[1]
        if event[0] == "add":
            flushed += batcher.add(event[2], event[3])
        else:
            flushed += batcher.due()
    assert [(b.key, b.items) for b in flushed] == expected


def test_next_deadline_and_drain():
    batcher, clock = make(max_wait=0.5)
    assert batcher.next_deadline() is None
    clock.now = 1.0
    batcher.add("a", 1)
    clock.now = 1.2
    batcher.add("b", 2)
    assert batcher.next_deadline() == pytest.approx(1.5)
    assert len(batcher) == 2
    assert [(b.key, b.items) for b in batcher.drain()] == [("a", [1]), ("b", [2])]
    assert len(batcher) == 0 and batcher.next_deadline() is None


def test_per_key_limit_caps_beam_batches():
    batcher, _ = make(max_batch=8, limit=lambda key: 8 // key)
    assert batcher.add(4, "x") == []
    assert [b.items for b in batcher.add(4, "y")] == [["x", "y"]]
    # A limit below one still makes progress one item at a time.
    assert [b.items for b in batcher.add(16, "z")] == [["z"]]


@pytest.mark.parametrize(("max_batch", "max_wait", "message"),
                         [(0, 0.1, "max_batch must be >= 1"), (4, -1, "max_wait must be >= 0")])
def test_rejects_bad_config(max_batch, max_wait, message):
    with pytest.raises(ValueError) as info:
        Batcher(max_batch, max_wait, FakeClock())
    assert str(info.value) == message


def test_drain_and_due_hand_out_the_oldest_group_first_whatever_its_key():
    batcher, clock = make(max_wait=0.5)
    for t, key in [(0.0, "c"), (0.1, "a"), (0.2, "b")]:
        clock.now = t
        batcher.add(key, t)
    assert [(b.key, b.opened) for b in batcher.drain()] == [("c", 0.0), ("a", 0.1), ("b", 0.2)]
    for t, key in [(0.0, "c"), (0.1, "a"), (0.2, "b")]:
        clock.now = t
        batcher.add(key, t)
    clock.now = 5
    assert [b.key for b in batcher.due()] == ["c", "a", "b"]


def test_a_group_is_due_at_the_very_time_next_deadline_names() -> None:
    """Found by Hypothesis (test_properties): 0.1875 + 0.1 is the deadline, but at that clock time
    0.2875 - 0.1875 < 0.1, so due() released nothing and the deadline was already past."""
    clock = [0.1875]
    batcher: Batcher[str, int] = Batcher(2, 0.1, lambda: clock[0])
    batcher.add("a", 1)
    clock[0] += 0.1
    assert batcher.next_deadline() == clock[0]
    assert [b.items for b in batcher.due()] == [[1]]
