"""`create_job` over several COPY streams (`IMGQ_COPY_STREAMS`), against a real Postgres: every ref
lands at its seq exactly once, a failure anywhere before the job commits leaves nothing behind (no
job, no item, no acceptance record, no open transaction), a job whose own commit fails after its
side streams committed takes their items with it, items whose job never committed are never fed,
and what a producer that died between the commits left is deleted by the sweep, which never
touches an acceptance still committing or a job that exists."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from imgq.db import copy_stream
from imgq.db.admin import Admin
from imgq.db.store import ACCEPTANCE_LOCK_CLASS, Store, drop_acceptance
from tests.jobs import caption_task, record

pytestmark = pytest.mark.integration

TASKS = [record(caption_task("m"))]
CHUNK = 5_000  # create_job's COPY chunk: chunk n goes to stream n % copy_streams


def counts(store: Store) -> tuple[int, int]:
    with store.engine.connect() as conn:
        return (conn.execute(text("SELECT count(*) FROM jobs")).scalar_one(),
                conn.execute(text("SELECT count(*) FROM job_items")).scalar_one())


def acceptances(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM acceptances")).scalar_one()


def open_transactions(store: Store) -> int:
    """Sessions of the test's database busy in a transaction or a COPY (a side stream left open)."""
    with store.engine.connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state <> 'idle' AND pid <> pg_backend_pid()")).scalar_one()


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_every_ref_lands_at_its_seq_once_however_many_streams(store: Store, streams: int):
    n = 4 * CHUNK + 1_234  # five chunks: the last stream gets a short one
    refs = [f"s3://b/{i:06d}.jpg" for i in range(n)]
    job = store.create_job(tasks=TASKS, refs=iter(refs), copy_streams=streams)
    with store.engine.connect() as conn:
        total = conn.execute(text("SELECT total FROM jobs WHERE id = :j"), {"j": job}).scalar_one()
        rows = conn.execute(text("SELECT seq, ref FROM job_items WHERE job_id = :j ORDER BY seq"), {"j": job}).all()
    assert total == n
    assert [tuple(r) for r in rows] == list(enumerate(refs))
    assert acceptances(store) == 0, "a committed job leaves no acceptance record"


def test_a_ref_stream_failing_after_a_side_stream_started_leaves_nothing(store: Store):
    def refs() -> Iterator[str]:
        for i in range(3 * CHUNK + 10):  # chunks 0 and 2 in the job's COPY, chunk 1 in the side's
            yield f"s3://b/{i}.jpg"
        raise ValueError("a refused ref late in the stream")

    with pytest.raises(ValueError, match="late in the stream"):
        store.create_job(tasks=TASKS, refs=refs(), copy_streams=2)
    assert counts(store) == (0, 0)
    assert acceptances(store) == 0
    assert open_transactions(store) == 0


def test_a_side_stream_the_server_refuses_rolls_the_job_back(store: Store):
    # Postgres text cannot hold NUL: the side stream's COPY (chunk 1) fails on the server.
    refs = [f"s3://b/{i}.jpg" for i in range(2 * CHUNK)]
    refs[CHUNK + 7] = "s3://b/nul\x00.jpg"
    with pytest.raises(Exception, match="0x00"):
        store.create_job(tasks=TASKS, refs=refs, copy_streams=2)
    assert counts(store) == (0, 0)
    assert acceptances(store) == 0
    assert open_transactions(store) == 0


def test_a_job_whose_commit_fails_after_its_side_streams_committed_takes_their_items(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    pid: list[int] = []
    committed: list[int] = []  # side items visible to another session once the sides committed
    real_commit = copy_stream.CopyStreams.commit_sides

    def commit_then_lose_the_job(self: copy_stream.CopyStreams) -> None:
        real_commit(self)  # the side's items are committed now...
        with store.engine.connect() as conn:  # ...and the job's connection dies before its commit
            committed.append(conn.execute(text("SELECT count(*) FROM job_items")).scalar_one())
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid[0]})

    monkeypatch.setattr(copy_stream.CopyStreams, "commit_sides", commit_then_lose_the_job)
    # Ten chunks: whichever stream is free takes the next, so the side surely loads some of them.
    with pytest.raises(Exception, match=r"terminat|closed|connection"):
        store.create_job(tasks=TASKS, refs=[f"s3://b/{i}.jpg" for i in range(10 * CHUNK)], copy_streams=2,
                         in_transaction=lambda cur, job: pid.append(cur.connection.info.backend_pid))
    store.engine.dispose()  # the pool's killed connection
    assert committed and committed[0] > 0, "the side stream committed nothing: the case is not tested"
    assert counts(store) == (0, 0)
    assert acceptances(store) == 0


def test_items_whose_job_never_committed_are_never_fed(store: Store):
    # What a crash between the side's commit and the job's leaves: items without a job row.
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO job_items (job_id, seq, ref) SELECT :j, g, 's3://b/x.jpg' "
                          "FROM generate_series(0, 9) g"), {"j": uuid.uuid4()})
    real = store.create_job(tasks=TASKS, refs=["s3://b/real.jpg"])
    with Admin(store.engine).feeding("imgq") as feeding:
        assert feeding is not None
        waiting = feeding.waiting()
    assert [w.job for w in waiting] == [real]



def _commit_sides_then(action):
    """commit_sides, then ``action(streams)`` while the job's own transaction is still open."""
    real_commit = copy_stream.CopyStreams.commit_sides

    def patched(self: copy_stream.CopyStreams) -> None:
        real_commit(self)
        action(self)

    return patched


def test_what_a_producer_dying_between_the_commits_left_is_deleted_by_the_sweep(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    pid: list[int] = []

    def die(_streams) -> None:  # the job's connection goes, and nothing of the producer runs after
        with store.engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid[0]})
        monkeypatch.setattr(Store, "_drop_items", lambda self, job: None)

    monkeypatch.setattr(copy_stream.CopyStreams, "commit_sides", _commit_sides_then(die))
    with pytest.raises(Exception, match=r"terminat|closed|connection"):
        store.create_job(tasks=TASKS, refs=[f"s3://b/{i}.jpg" for i in range(10 * CHUNK)], copy_streams=2,
                         in_transaction=lambda cur, job: pid.append(cur.connection.info.backend_pid))
    store.engine.dispose()
    jobs, stranded = counts(store)
    assert jobs == 0 and stranded > 0, "the side stream committed nothing: the case is not tested"
    assert acceptances(store) == 1

    real = store.create_job(tasks=TASKS, refs=["s3://b/real.jpg"])  # a job of its own is never touched
    assert Admin(store.engine).drop_abandoned() == (1, stranded)
    assert counts(store) == (1, 1) and acceptances(store) == 0
    assert Admin(store.engine).drop_abandoned() == (0, 0)
    assert store.counts(real)["queued"] == 1


def test_the_sweep_leaves_an_acceptance_that_is_still_committing(store: Store, monkeypatch: pytest.MonkeyPatch):
    swept: list[tuple[int, int]] = []
    monkeypatch.setattr(copy_stream.CopyStreams, "commit_sides",
                        _commit_sides_then(lambda _s: swept.append(Admin(store.engine).drop_abandoned())))
    n = 10 * CHUNK
    job = store.create_job(tasks=TASKS, refs=[f"s3://b/{i}.jpg" for i in range(n)], copy_streams=2)
    assert swept == [(0, 0)], "the job's transaction holds its lock: the sweep must pass it by"
    assert counts(store) == (1, n) and acceptances(store) == 0
    assert store.counts(job)["queued"] == n


def test_a_drop_waits_for_the_job_and_keeps_the_items_of_one_that_committed(store: Store):
    """What the producer does after a commit it saw fail: the commit may have reached the server."""
    job = store.create_job(tasks=TASKS, refs=[f"s3://b/{i}.jpg" for i in range(3)])
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO acceptances (job_id) VALUES (:j)"), {"j": job})
    with store.engine.begin() as conn:
        assert drop_acceptance(conn, job, wait=True) == 0
    assert counts(store) == (1, 3) and acceptances(store) == 0

    with store.engine.begin() as holder:  # an acceptance still going holds its job's lock
        holder.execute(text(f"SELECT pg_advisory_xact_lock({ACCEPTANCE_LOCK_CLASS}, hashtext(:j))"),
                       {"j": str(job)})
        with store.engine.begin() as conn:
            assert drop_acceptance(conn, job, wait=False) is None
