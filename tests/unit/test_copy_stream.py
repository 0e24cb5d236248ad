"""CopyStreams without a server: how many streams open, where each chunk goes, when the acceptance
is recorded, and what commits, rolls back and closes on each path. The same paths against a real
Postgres are in tests/integration/test_copy_streams.py."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from imgq.db.copy_stream import CopyStreams, StreamFailed


class FakeCopy:
    def __init__(self, rows: list[str]) -> None:
        self.rows = rows

    def write(self, chunk: str) -> None:
        if chunk.startswith("bad"):
            raise ValueError(f"the server refused {chunk}")
        self.rows.append(chunk)


class FakeConnection:
    copy_class: type[FakeCopy] = FakeCopy

    def __init__(self, events: list[str], n: int) -> None:
        self.events, self.n = events, n
        self.rows: list[str] = []
        self.statement: str | None = None

    @contextlib.contextmanager
    def cursor(self) -> Iterator[FakeConnection]:
        yield self

    @contextlib.contextmanager
    def copy(self, statement: str) -> Iterator[FakeCopy]:
        self.statement = statement
        rows: list[str] = []
        try:
            yield self.copy_class(rows)
        except BaseException:
            self.events.append(f"copy failed {self.n}")
            raise
        self.rows = rows  # only a COPY that ends without an error loads its rows
        self.events.append(f"loaded {self.n}")

    def commit(self) -> None:
        self.events.append(f"commit {self.n}")

    def rollback(self) -> None:
        self.events.append(f"rollback {self.n}")

    def close(self) -> None:
        self.events.append(f"close {self.n}")


class FakeEngine:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.connections: list[FakeConnection] = []
        self._lock = threading.Lock()

    def raw_connection(self) -> FakeConnection:
        with self._lock:
            conn = FakeConnection(self.events, len(self.connections) + 1)
            self.connections.append(conn)
            self.events.append(f"open {conn.n}")
            return conn


def streams(n: int, engine: FakeEngine, own: list[str], recorded: list[str] | None = None) -> CopyStreams:
    def record() -> None:
        engine.events.append("recorded")
        if recorded is not None:
            recorded.append("once")

    return CopyStreams(FakeCopy(own), engine, "COPY t FROM STDIN", n, on_first_side=record)


def side_rows(engine: FakeEngine) -> list[str]:
    return [row for conn in engine.connections for row in conn.rows]


@pytest.mark.parametrize(("n", "chunks", "sides"), [(1, 7, 0), (2, 1, 0), (2, 7, 1), (3, 2, 1), (3, 7, 2)])
def test_every_chunk_is_written_once_and_sides_open_only_for_chunks_beyond_the_first(n, chunks, sides):
    engine, own, recorded = FakeEngine(), [], []
    s = streams(n, engine, own, recorded)
    sent = [f"chunk {i}" for i in range(chunks)]
    for chunk in sent:
        s.write(chunk)
    s.finish()
    s.commit_sides()
    assert sorted(own + side_rows(engine)) == sorted(sent)
    assert len(engine.connections) == sides, "one connection per side stream, never more than n - 1"
    assert recorded == (["once"] if sides else []), "the acceptance is recorded once, and only with a side"
    assert s.sides is bool(sides) and s.committed is bool(sides)
    assert all(conn.statement == "COPY t FROM STDIN" for conn in engine.connections)
    for conn in engine.connections:
        assert engine.events.index(f"commit {conn.n}") < engine.events.index(f"close {conn.n}")
    if sides:
        assert engine.events[0] == "recorded", "recorded before the first side connection opens"


def test_a_failed_side_copy_is_raised_with_its_cause_and_rolled_back_uncommitted():
    engine, own = FakeEngine(), []
    s = streams(2, engine, own)
    with pytest.raises(StreamFailed, match="a COPY stream failed: the server refused bad") as failed:
        for chunk in ["chunk 0", "bad 1", "chunk 2", "chunk 3", "chunk 4", "chunk 5"]:
            s.write(chunk)
        s.finish()
    assert isinstance(failed.value.__cause__, ValueError)
    s.abort()
    assert not s.committed
    assert "commit 1" not in engine.events and {"rollback 1", "close 1"} <= set(engine.events)


def test_an_abort_before_the_commit_rolls_every_side_back():
    engine, own = FakeEngine(), []
    s = streams(3, engine, own)
    for i in range(6):
        s.write(f"chunk {i}")
    s.finish()
    s.abort()
    assert not s.committed and s.sides
    assert [e for e in engine.events if e.startswith("commit")] == []
    assert sorted(e for e in engine.events if e.startswith(("rollback", "close"))) == [
        "close 1", "close 2", "rollback 1", "rollback 2"]


def test_an_abort_mid_stream_stops_the_writers_without_loading_their_rows():
    engine, own = FakeEngine(), []
    s = streams(2, engine, own)
    for i in range(3):
        s.write(f"chunk {i}")
    s.abort()
    assert "copy failed 1" in engine.events and "loaded 1" not in engine.events, "an aborted COPY must fail"
    assert side_rows(engine) == []
    assert not s.committed and "rollback 1" in engine.events


def test_a_failed_record_of_the_acceptance_opens_no_side():
    engine, own = FakeEngine(), []

    def refuse() -> None:
        raise PermissionError("permission denied for table acceptances")

    s = CopyStreams(FakeCopy(own), engine, "COPY t FROM STDIN", 2, on_first_side=refuse)
    s.write("chunk 0")
    with pytest.raises(PermissionError, match="acceptances"):
        s.write("chunk 1")
    s.abort()
    assert engine.connections == [] and not s.sides


def test_the_jobs_own_copy_failing_is_raised_and_nothing_commits():
    engine, own = FakeEngine(), []
    s = streams(1, engine, own)
    with pytest.raises(StreamFailed, match="the server refused bad 0"):
        s.write("bad 0")
        s.finish()
    s.abort()
    assert own == [] and engine.events == []


def test_writer_threads_are_named_for_their_stream():
    engine, own = FakeEngine(), []
    s = streams(3, engine, own)
    for i in range(3):
        s.write(f"chunk {i}")
    names = {t.name for t in threading.enumerate()}
    s.finish()
    s.commit_sides()
    assert {"imgq-copy-0", "imgq-copy-1", "imgq-copy-2"} <= names


class StallingCopy(FakeCopy):
    """Its first write takes 0.8 s, longer than a put waits (_WAIT_S, 0.5 s), then goes on or fails."""

    def write(self, chunk: str) -> None:
        if not self.rows and not getattr(self, "stalled", False):
            self.stalled = True
            time.sleep(0.8)
        super().write(chunk)


def test_a_chunk_waiting_longer_than_a_put_timeout_is_still_written():
    own: list[str] = []
    s = CopyStreams(StallingCopy(own), FakeEngine(), "COPY t FROM STDIN", 1)
    sent = [f"chunk {i}" for i in range(6)]  # the queue holds 2: chunk 3 waits for the stalled writer
    for chunk in sent:
        s.write(chunk)
    s.finish()
    assert own == sent


@pytest.mark.timeout(20)
def test_a_write_blocked_on_a_full_queue_raises_once_every_stream_has_failed():
    own: list[str] = []
    s = CopyStreams(StallingCopy(own), FakeEngine(), "COPY t FROM STDIN", 1)
    with pytest.raises(StreamFailed, match="refused bad 0"):
        for chunk in ["bad 0", "chunk 1", "chunk 2", "chunk 3", "chunk 4"]:  # chunk 3 blocks; the writer then fails
            s.write(chunk)
    s.abort()


class RefusingCopy(FakeCopy):
    def write(self, chunk: str) -> None:
        raise ValueError(f"the server refused {chunk}")


class BrokenEngine(FakeEngine):
    def __init__(self, fail: str) -> None:
        super().__init__()
        self.fail = fail

    def raw_connection(self) -> FakeConnection:
        if self.fail == "connect":
            raise ConnectionError("the server is gone")
        conn = super().raw_connection()
        if self.fail == "write":
            conn.copy_class = RefusingCopy
        if self.fail == "rollback":
            def rollback() -> None:
                raise ConnectionError("the connection is gone")

            conn.rollback = rollback  # type: ignore[method-assign]
        return conn


def test_a_side_that_cannot_connect_fails_the_stream_with_its_cause():
    own: list[str] = []
    s = CopyStreams(FakeCopy(own), BrokenEngine("connect"), "COPY t FROM STDIN", 2)
    with pytest.raises(StreamFailed, match="a COPY stream failed: the server is gone") as failed:
        for i in range(20):
            s.write(f"chunk {i}")
        s.finish()
    assert isinstance(failed.value.__cause__, ConnectionError)
    s.abort()


def test_a_side_whose_rollback_fails_still_closes_its_connection():
    engine, own = BrokenEngine("rollback"), []
    s = CopyStreams(FakeCopy(own), engine, "COPY t FROM STDIN", 2)
    for i in range(4):
        s.write(f"chunk {i}")
    s.finish()
    s.abort()
    assert engine.events[-1] == "close 1" and not s.committed


def test_a_side_copy_that_fails_mid_stream_is_never_ended_as_loaded():
    own: list[str] = []
    engine = BrokenEngine("write")
    s = CopyStreams(StallingCopy(own), engine, "COPY t FROM STDIN", 2)  # the job's stream stalls: the side takes chunks
    with pytest.raises(StreamFailed, match="a COPY stream failed: the server refused chunk"):
        for i in range(6):
            s.write(f"chunk {i}")
        s.finish()
    s.abort()
    assert "copy failed 1" in engine.events and "loaded 1" not in engine.events
    assert "commit 1" not in engine.events
