"""Cancelling a job in chunks (imgq.db.cancelling): the mark closes the job at once, each chunk
commits on its own, and a sweep cut short is finished by the feeder and the lost sweep."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import redis
from sqlalchemy import text

from imgq.celeryconf import make_celery
from imgq.config import Settings
from imgq.db import locks
from imgq.db.admin import Admin
from imgq.db.cancelling import CUT_SHORT_AFTER_S, cancel_job
from imgq.db.store import DeadRow, Store
from imgq.worker.feeder import Feeder
from tests.jobs import caption_task, record
from tests.waits import SETTLE_S, lock_waited

pytestmark = pytest.mark.integration

QUEUE = "cancel-test"


class Died(Exception):
    """The canceller's process, gone between two chunks."""


@pytest.fixture
def client(redis_server):
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    yield client
    client.close()


def _feeder(store: Store, broker_url: str, window: int) -> Feeder:
    app = make_celery(Settings(_env_file=None, broker_url=broker_url, queue=QUEUE))
    return Feeder(admin=Admin(store.engine), app=app, queue=QUEUE, window=window, per_message=3)


def _job(store: Store, n: int) -> uuid.UUID:
    return store.create_job(tasks=[record(caption_task("m"))], refs=[f"/d/{i}.jpg" for i in range(n)], queue=QUEUE,
                            tenant="t")


def _states(store: Store, job: uuid.UUID) -> dict[str, list[int]]:
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT state, seq FROM job_items WHERE job_id = :j ORDER BY seq"), {"j": job}).all()
    found: dict[str, list[int]] = {}
    for state, seq in rows:
        found.setdefault(state, []).append(seq)
    return found


def _mark_older(store: Store, job: uuid.UUID, seconds: float) -> None:
    """As if the job had been marked ``seconds`` ago."""
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET cancelled_at = cancelled_at - make_interval(secs => :s) WHERE id = :j"),
                     {"s": seconds, "j": job})


def _cancelled_items(store: Store, job: uuid.UUID) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT cancelled_items FROM jobs WHERE id = :j"), {"j": job}).scalar_one()


def test_chunks_commit_one_by_one_and_count_what_they_cancel(store) -> None:
    job = _job(store, 25)
    store.claim(job, [7], "w1")  # running: it finishes normally
    seen: list[tuple[int, int, int, int]] = []

    def progress(n: int, swept: int, total: int) -> None:
        seen.append((n, swept, total, _cancelled_items(store, job)))

    assert cancel_job(store.engine, "t", job, chunk=10, progress=progress) == 24
    # Each chunk's count is committed before the next begins (read here from another connection).
    assert seen == [(9, 10, 25, 9), (19, 20, 25, 19), (24, 25, 25, 24)]
    assert _states(store, job) == {"cancelled": [s for s in range(25) if s != 7], "running": [7]}
    assert cancel_job(store.engine, "t", job, chunk=10) == 0, "repeating it is harmless"
    assert cancel_job(store.engine, "other", job) is None, "another tenant's job is not found"


def test_a_cancel_cut_short_is_closed_at_once_and_finished_by_the_feeder_and_the_lost_sweep(
        store, client, broker_url) -> None:
    job = _job(store, 30)
    feeder = _feeder(store, broker_url, window=2)
    assert feeder.feed().items == 6  # seqs 0-5 in the broker
    assert set(store.claim(job, [0, 1], "w1")) == {0, 1}  # a worker runs two of them

    def die(cancelled: int, swept: int, total: int) -> None:
        raise Died

    with pytest.raises(Died):
        cancel_job(store.engine, "t", job, chunk=4, progress=die)
    assert _states(store, job) == {"running": [0, 1], "cancelled": [2, 3], "queued": list(range(4, 30))}

    # Closed: a delivery of its queued items claims none, nor a redelivery of its running ones.
    assert store.claim(job, [4, 5], "w2") == {}
    assert store.claim(job, [0], "w2") == {}
    # Workers took its two messages (and claimed nothing of them). The feeder publishes none of
    # it, and leaves the rest to the canceller for a minute after the mark...
    client.delete(QUEUE)
    report = feeder.feed()
    assert (report.cancelled, report.items, client.llen(QUEUE)) == (0, 0, 0)
    # ... then cancels what waits in Postgres: a chunk's lock lasts its transaction.
    _mark_older(store, job, CUT_SHORT_AFTER_S + 1)
    report = feeder.feed()
    assert (report.cancelled, report.items, client.llen(QUEUE)) == (24, 0, 0)
    # Its last queued items were in the broker: the lost sweep ends them cancelled.
    assert feeder.feed(sweep=True, lost_after_s=0, drained_only=False).lost == 2
    assert _states(store, job) == {"running": [0, 1], "cancelled": list(range(2, 30))}
    check = Admin(store.engine).check(job)
    assert check is not None and check.ok and (check.cancelled, check.pending) == (28, 2)
    assert _cancelled_items(store, job) == 28
    feeder.stop()


def test_two_cancels_at_once_cancel_each_item_once(store) -> None:
    job = _job(store, 30)
    second: list[int | None] = []
    other = threading.Thread(target=lambda: second.append(cancel_job(store.engine, "t", job, chunk=5)))

    def start_the_second(cancelled: int, swept: int, total: int) -> None:
        if swept == 10:
            other.start()

    first = cancel_job(store.engine, "t", job, chunk=5, progress=start_the_second)
    other.join(SETTLE_S)
    assert first is not None and second[0] is not None and first + second[0] == 30
    assert _cancelled_items(store, job) == 30 and _states(store, job) == {"cancelled": list(range(30))}


def test_a_chunk_holds_the_jobs_cancel_lock_for_its_transaction_only(store) -> None:
    job = _job(store, 30)
    held: list[int] = []

    def locks_held(cancelled: int, swept: int, total: int) -> None:
        with store.engine.connect() as conn:
            held.append(conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                          "AND classid = CAST(:c AS oid)"), {"c": locks.CANCEL}).scalar_one())

    cancel_job(store.engine, "t", job, chunk=10, progress=locks_held)
    assert held == [0, 0, 0], "no lock outlives its chunk (a pooler in transaction mode would keep it)"


def test_the_feeder_leaves_a_job_that_is_being_swept_and_publishes_none_of_it(store, client, broker_url) -> None:
    job = _job(store, 30)
    feeder = _feeder(store, broker_url, window=4)
    reports = []
    cancel_job(store.engine, "t", job, chunk=10,
               progress=lambda n, swept, total: reports.append(feeder.feed()) if swept == 10 else None)
    assert [(r.cancelled, r.items) for r in reports] == [(0, 0)], "a sweep under way is the canceller's"
    assert client.llen(QUEUE) == 0
    assert _states(store, job) == {"cancelled": list(range(30))}
    feeder.stop()


def _holding(store: Store, statement: str, **params: Any) -> tuple[Any, Any]:
    """A connection holding the row lock ``statement`` takes, and its transaction."""
    conn = store.engine.connect()
    tx = conn.begin()
    conn.execute(text(statement), params)
    return conn, tx


def test_a_release_that_read_the_job_before_its_mark_still_ends_its_item_cancelled(store) -> None:
    job = _job(store, 5)
    assert set(store.claim(job, [0], "w1")) == {0}
    # The release's statement starts, reads the job unmarked, and waits for the item's row.
    conn, tx = _holding(store, "SELECT 1 FROM job_items WHERE job_id = :j AND seq = 0 FOR UPDATE", j=job)
    releasing = threading.Thread(target=store.release, args=(job, [0]))
    releasing.start()
    assert lock_waited(store.engine), "the release never waited for the item"
    assert cancel_job(store.engine, "t", job) == 4  # its sweep passes the running item
    tx.commit()
    conn.close()
    releasing.join(SETTLE_S)
    assert _states(store, job) == {"cancelled": [0, 1, 2, 3, 4]}, "a released item of a cancelled job never waits"
    assert _cancelled_items(store, job) == 5


def test_a_global_dead_letter_retry_and_a_cancel_happen_one_after_the_other(store) -> None:
    job = _job(store, 3)
    store.claim(job, [0], "w1")
    store.write_dead([DeadRow(job, 0, "transient_exhausted", "gave up", "w1")])
    # The retry of every job's dead letters holds its jobs, then waits for the dead letter's row.
    conn, tx = _holding(store, "SELECT 1 FROM dead_letters WHERE job_id = :j FOR UPDATE", j=job)
    taken: list[Any] = []
    retrying = threading.Thread(target=lambda: taken.append(
        Admin(store.engine).take_dead_letters(code=None, job=None, seq=None)))
    retrying.start()
    assert lock_waited(store.engine), "the retry never waited for the dead letter"
    cancelled: list[int | None] = []
    cancelling = threading.Thread(target=lambda: cancelled.append(cancel_job(store.engine, "t", job)))
    cancelling.start()
    assert lock_waited(store.engine, sessions=2), "the cancel must wait for the retry that holds the job"
    assert not cancelled
    tx.commit()
    conn.close()
    retrying.join(SETTLE_S)
    cancelling.join(SETTLE_S)
    # The retry came first: its item went back to the queue, and the cancel then cancelled it.
    assert [len(r.items) for r in taken[0]] == [1] and cancelled == [3]
    assert _states(store, job) == {"cancelled": [0, 1, 2]} and _cancelled_items(store, job) == 3


def test_a_dead_workers_items_of_a_cancelled_job_end_cancelled_not_sent_again(store) -> None:
    admin = Admin(store.engine)
    admin.heartbeat("w1", "host", 1)
    job, other = _job(store, 4), _job(store, 2)
    store.claim(job, [0, 1], "w1")
    store.claim(other, [0], "w1")
    cancel_job(store.engine, "t", job)
    taken = admin.take_orphans(dead_after_s=None, gone=["w1"])
    assert taken is not None and [(r.job, [i[0] for i in r.items]) for r in taken] == [(other, [0])]
    assert _states(store, job) == {"cancelled": [0, 1, 2, 3]} and _cancelled_items(store, job) == 4
    assert Admin(store.engine).check(job).ok


def test_a_finished_job_is_not_closed_so_its_dead_letters_can_still_be_retried(store) -> None:
    """A cancel that lands just after the last item ended used to mark the job: from then on its
    dead letters could never be retried (`job_cancelled`)."""
    job = _job(store, 2)
    store.claim(job, [0, 1], "w1")
    store.write_dead([DeadRow(job, 0, "transient_exhausted", "gave up", "w1"),
                      DeadRow(job, 1, "transient_exhausted", "gave up", "w1")])
    assert cancel_job(store.engine, "t", job) == 0
    assert cancel_job(store.engine, "other", job) is None, "another tenant's job is still not found"
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT cancelled_at FROM jobs WHERE id = :j"), {"j": job}).scalar_one() is None
    taken = Admin(store.engine).take_dead_letters(code=None, job=job, seq=None)
    assert taken is not None and [len(r.items) for r in taken] == [2]
    assert _states(store, job) == {"queued": [0, 1]}
    assert cancel_job(store.engine, "t", job) == 2, "pending again, so a cancel closes it"
    assert _states(store, job) == {"cancelled": [0, 1]} and Admin(store.engine).check(job).ok


def test_a_finished_backfill_job_is_still_closed(store) -> None:
    """Nothing pending, but its mark means more: the next run enqueues again what it did not
    finish (docs/backfill.md), and a run that may resume into it must not."""
    job = _job(store, 1)
    store.claim(job, [0], "w1")
    store.write_dead([DeadRow(job, 0, "not_found", "gone", "w1")])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET source = 'backfill' WHERE id = :j"), {"j": job})
    assert cancel_job(store.engine, "t", job) == 0
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT cancelled_at IS NOT NULL FROM jobs WHERE id = :j"), {"j": job}).scalar_one()
