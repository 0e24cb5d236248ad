"""Properties of the pure modules, checked on generated inputs (hypothesis): the batcher never loses
or repeats an item, no generated path escapes a root, retry delays are monotone and capped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from imgq import errors
from imgq.batching import Batcher
from imgq.publish import chunk_messages
from imgq.refs import LocalRef, parse_ref
from imgq.retry import Backoff, RetryPolicy, compute_backoff, decide
from imgq.worker.beneath import open_beneath
from tests.jobs import caption_task

# -- the batcher ----------------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c"])
EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), KEYS),
        st.tuples(st.just("tick"), st.floats(0, 0.2, allow_nan=False)),
        st.tuples(st.just("due"), st.none()),
        st.tuples(st.just("drain"), st.none()),
    ),
    max_size=80,
)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@given(events=EVENTS, max_batch=st.integers(1, 6), max_wait=st.sampled_from([0.0, 0.05, 0.1]),
       b_limit=st.integers(0, 8))
def test_the_batcher_loses_and_repeats_nothing(events, max_batch, max_wait, b_limit):
    clock = Clock()
    limits = {"b": b_limit}  # like beam search: a key may be capped lower (0 still means 1)
    batcher: Batcher[str, int] = Batcher(max_batch, max_wait, clock, limit=lambda k: limits.get(k, max_batch))
    added: dict[int, str] = {}
    out: list[int] = []
    opened: dict[str, float] = {}  # pending key -> clock time its group's first item arrived
    for op, arg in events:
        batches = []
        if op == "add":
            item = len(added)
            added[item] = arg
            opened.setdefault(arg, clock.now)
            batches = batcher.add(arg, item)
        elif op == "tick":
            clock.now += arg
        elif op == "due":
            batches = batcher.due()
            # Nothing left behind that has waited its time.
            deadline = batcher.next_deadline()
            assert deadline is None or deadline > clock.now
        else:
            batches = batcher.drain()
            assert len(batcher) == 0 and batcher.next_deadline() is None
        assert [b.opened for b in batches] == sorted(b.opened for b in batches), "oldest first"
        for batch in batches:
            assert batch.opened == opened.pop(batch.key), "a batch says when its first item arrived"
            assert batch.items, "no empty batch"
            assert all(added[i] == batch.key for i in batch.items), "keys never mix"
            assert len(batch.items) <= max(1, min(max_batch, limits.get(batch.key, max_batch)))
            out += batch.items
        assert len(out) + len(batcher) == len(added)
    out += [i for b in batcher.drain() for i in b.items]
    assert sorted(out) == list(added), "every item exactly once"


@given(n=st.integers(1, 30), max_batch=st.integers(1, 5))
def test_the_batcher_keeps_the_order_of_one_key(n, max_batch):
    batcher: Batcher[str, int] = Batcher(max_batch, 1.0, Clock())
    out = [i for k in range(n) for b in batcher.add("a", k) for i in b.items]
    out += [i for b in batcher.drain() for i in b.items]
    assert out == list(range(n))


# -- messages -----------------------------------------------------------------------------------


@given(n=st.integers(0, 200), per=st.integers(1, 40))
def test_chunking_sends_every_item_once_in_full_chunks_then_one_partial(n, per):
    items = [(seq, f"/d/{seq}.jpg") for seq in range(n)]
    messages = list(chunk_messages(job="j", tasks=[caption_task("m")], items=items, per_message=per))
    assert [tuple(i) for m in messages for i in m.items] == items
    assert all(len(m.items) == per for m in messages[:-1])
    assert len(messages) == -(-n // per)


# -- confinement ----------------------------------------------------------------------------------

# Components that matter: the parent, the root's own name and a sibling that shares its prefix,
# symlinks that lead out (or stay in), files on both sides.
PARTS = st.sampled_from(["..", ".", "root", "root-evil", "sub", "x.jpg", "secret.jpg", "out", "up", "in",
                         "loop", ""])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, frozenset[tuple[int, int]]]:
    base = tmp_path_factory.mktemp("world").resolve()
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (base / "root-evil").mkdir()
    (base / "outside").mkdir()
    (root / "x.jpg").write_bytes(b"in")
    (root / "sub" / "x.jpg").write_bytes(b"in")
    (base / "root-evil" / "x.jpg").write_bytes(b"SECRET")
    (base / "secret.jpg").write_bytes(b"SECRET")
    (base / "x.jpg").write_bytes(b"SECRET")  # the same names as inside, one level up
    (base / "sub").mkdir()
    (base / "sub" / "x.jpg").write_bytes(b"SECRET")
    (base / "outside" / "x.jpg").write_bytes(b"SECRET")
    (root / "out").symlink_to(base / "outside")
    (root / "up").symlink_to(base)
    (root / "in").symlink_to(root / "sub")
    (root / "loop").symlink_to(root / "loop")
    inside = frozenset((st_.st_dev, st_.st_ino) for p in root.rglob("*") if not p.is_symlink()
                       for st_ in [p.lstat()] if p.is_file())
    return root, inside


def _inside(fd: int, inside: frozenset[tuple[int, int]]) -> bool:
    st_ = os.fstat(fd)
    return (st_.st_dev, st_.st_ino) in inside


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(PARTS, min_size=1, max_size=6), relative_to=st.sampled_from(["root", "base"]))
@example(parts=["root-evil", "x.jpg"], relative_to="base")
@example(parts=["out", "x.jpg"], relative_to="root")
@example(parts=["loop", "..", "out"], relative_to="root")  # found by this test: realpath stops at a loop
def test_no_parsed_local_ref_escapes_its_root(world, parts, relative_to):
    root, _ = world
    start = root if relative_to == "root" else root.parent
    raw = str(start.joinpath(*parts))
    try:
        ref = parse_ref(raw, allowed_buckets=[], local_roots=[root])
    except errors.RefRefused:
        return
    assert isinstance(ref, LocalRef)
    assert ref.path == root or ref.path.is_relative_to(root)
    assert os.path.realpath(ref.path) == str(ref.path), "confined paths are resolved"


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(PARTS, min_size=1, max_size=6), relative_to=st.sampled_from(["root", "base"]))
@example(parts=["..", "x.jpg"], relative_to="root")  # found by this test: is_relative_to is lexical
@example(parts=["root-evil", "x.jpg"], relative_to="base")
def test_no_path_opened_beneath_a_root_is_outside_it(world, parts, relative_to):
    """open_beneath is handed what confine() resolved, but it must hold on its own: whatever path
    it is given, what it opens is a file inside the root."""
    root, inside = world
    start = root if relative_to == "root" else root.parent
    assume(all(parts))  # Path() drops empty parts; a root-relative "" is the root itself
    try:
        fd = open_beneath(start.joinpath(*parts), [root])
    except (errors.BadRef, errors.NotAFile, FileNotFoundError):
        return
    try:
        assert _inside(fd, inside)
    finally:
        os.close(fd)


# -- retry decisions ------------------------------------------------------------------------------

POLICY = st.builds(RetryPolicy, max_attempts=st.integers(1, 10), base_s=st.floats(0.01, 10),
                   cap_s=st.floats(0.01, 1000))


@given(attempt=st.integers(1, 200), base=st.floats(0.001, 100), cap=st.floats(0.001, 10_000),
       jitter=st.floats(0, 1))
def test_backoff_is_monotone_in_attempts_and_capped(attempt, base, cap, jitter):
    now = compute_backoff(attempt, base, cap, jitter)
    nxt = compute_backoff(attempt + 1, base, cap, jitter)
    assert 0 < now <= nxt <= cap
    assert now >= 0.5 * min(cap, base), "jitter takes off at most half"
    assert compute_backoff(attempt, base, cap, 0.0) <= now <= compute_backoff(attempt, base, cap, 1.0)


@given(policy=POLICY, attempts=st.integers(1, 50), retryable=st.booleans(), jitter=st.floats(0, 1))
def test_retry_only_while_attempts_remain(policy, attempts, retryable, jitter):
    decision = decide(policy, retryable=retryable, attempts=attempts, jitter=jitter)
    if retryable and attempts < policy.max_attempts:
        assert decision.action == "retry"
        assert 0 < decision.delay_s <= policy.cap_s
    else:
        assert (decision.action, decision.delay_s) == ("dead", 0.0)


@given(failures=st.integers(1, 40), base=st.floats(0.01, 10), cap=st.floats(0.01, 100))
def test_outage_pauses_are_monotone_capped_and_reset(failures, base, cap):
    backoff = Backoff(base_s=base, cap_s=cap)
    pauses = [backoff.failed() for _ in range(failures)]
    assert pauses == sorted(pauses) and max(pauses) <= cap
    assert pauses[0] == min(base, cap)
    backoff.succeeded()
    assert backoff.failed() == pauses[0]
