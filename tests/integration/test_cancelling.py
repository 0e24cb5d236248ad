"""Cancelling a job in chunks (imgq.db.cancelling): the mark closes the job at once, each chunk
commits on its own, and a sweep cut short is finished by the feeder and the lost sweep."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis
from sqlalchemy import text

from imgq.celeryconf import make_celery
from imgq.config import Settings
from imgq.db.admin import Admin
from imgq.db.cancelling import cancel_job
from imgq.db.store import Store
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

    # Closed: a delivery of its queued items claims none; a redelivery of its running ones does.
    assert store.claim(job, [4, 5], "w2") == {}
    assert set(store.claim(job, [0], "w1")) == {0}
    # Workers took its two messages (and claimed nothing of them). The feeder publishes none of
    # it and cancels what waits in Postgres: the dead canceller's lock went with its connection.
    client.delete(QUEUE)
    report = feeder.feed()
    assert (report.cancelled, report.items, client.llen(QUEUE)) == (24, 0, 0)
    # Its last queued items were in the broker: the lost sweep ends them cancelled.
    assert feeder.feed(sweep=True, lost_after_s=0, drained_only=False).lost == 2
    assert _states(store, job) == {"running": [0, 1], "cancelled": list(range(2, 30))}
    check = Admin(store.engine).check(job)
    assert check is not None and check.ok and (check.cancelled, check.pending) == (28, 2)
    assert _cancelled_items(store, job) == 28
    feeder.stop()


def test_a_repeated_cancel_waits_for_the_first_sweep_and_finds_nothing_left(store, database_url) -> None:
    job = _job(store, 30)
    second: list[int | None] = []
    waiter = threading.Thread(target=lambda: second.append(cancel_job(store.engine, "t", job, chunk=10)))

    def start_the_second(cancelled: int, swept: int, total: int) -> None:
        if swept == 10:
            waiter.start()
            # It waits on the sweep lock, not on rows.
            assert lock_waited(store.engine, event="advisory"), "the second cancel never waited for the first"

    assert cancel_job(store.engine, "t", job, chunk=10, progress=start_the_second) == 30
    waiter.join(SETTLE_S)
    assert second == [0]
    assert _cancelled_items(store, job) == 30


def test_the_feeder_leaves_a_job_that_is_being_swept_and_publishes_none_of_it(store, client, broker_url) -> None:
    job = _job(store, 30)
    feeder = _feeder(store, broker_url, window=4)
    reports = []
    cancel_job(store.engine, "t", job, chunk=10,
               progress=lambda n, swept, total: reports.append(feeder.feed()) if swept == 10 else None)
    assert [(r.cancelled, r.items) for r in reports] == [(0, 0)]
    assert client.llen(QUEUE) == 0
    assert _states(store, job) == {"cancelled": list(range(30))}
    feeder.stop()
