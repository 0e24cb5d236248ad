"""The feeder against real Postgres and Redis: window, order, lock, lost messages, enqueue's window."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from sqlalchemy import create_engine, text

from imgq.celeryconf import make_celery
from imgq.config import Settings
from imgq.db.admin import Admin
from imgq.db.store import Store
from imgq.producer.submit import submit
from imgq.worker.feeder import Feeder
from tests.jobs import caption_task, record

pytestmark = pytest.mark.integration

QUEUE = "feed-test"


@pytest.fixture
def store(database_url: str):
    store = Store.from_url(database_url)
    yield store
    store.engine.dispose()


@pytest.fixture
def client(redis_server, broker_url: str):
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    yield client
    client.close()


def _feeder(store: Store, broker_url: str, window: int, per_message: int = 3, **kw) -> Feeder:
    app = make_celery(Settings(_env_file=None, broker_url=broker_url, queue=QUEUE))
    return Feeder(admin=Admin(store.engine), app=app, queue=QUEUE, window=window, per_message=per_message, **kw)


def _job(store: Store, n: int, **kw) -> uuid.UUID:
    return store.create_job(tasks=[record(caption_task("m"))], refs=[f"/d/{i}.jpg" for i in range(n)], queue=QUEUE,
                            **kw)


def _published(store: Store, job: uuid.UUID) -> list[int]:
    with store.engine.connect() as conn:
        return list(conn.execute(text("SELECT seq FROM job_items WHERE job_id = :j AND published_at IS NOT NULL "
                                      "ORDER BY seq"), {"j": job}).scalars())


def test_the_window_is_topped_up_never_beyond_and_in_seq_order(store, client, broker_url) -> None:
    job = _job(store, 50)
    feeder = _feeder(store, broker_url, window=4)
    report = feeder.feed()
    assert (report.depth, report.messages, report.items) == (0, 4, 12)
    assert client.llen(QUEUE) == 4
    assert _published(store, job) == list(range(12))
    assert feeder.feed().messages == 0, "a full window takes nothing more"
    client.rpop(QUEUE)  # a worker took one message
    assert (feeder.feed().messages, client.llen(QUEUE)) == (1, 4)
    assert _published(store, job) == list(range(15))
    feeder.stop()


def test_a_higher_priority_job_takes_every_slot_then_tenants_share(store, client, broker_url) -> None:
    low = _job(store, 30, tenant="a")
    high = _job(store, 6, priority=5, tenant="a")
    other = _job(store, 30, tenant="b")
    feeder = _feeder(store, broker_url, window=6)
    report = feeder.feed()
    # The high job (2 messages) first; the other 4 slots go to the equal-priority tenants, fairly:
    # tenant a already has the high job's 6 items in flight, so b catches up first (9 items each).
    assert report.messages == 6
    assert len(_published(store, high)) == 6
    assert (len(_published(store, low)), len(_published(store, other))) == (3, 9)
    feeder.stop()


def test_a_failed_publish_leaves_every_item_waiting_in_postgres(store, tmp_path) -> None:
    job = _job(store, 10)
    feeder = _feeder(store, f"redis+socket://{tmp_path}/nobody.sock", window=4)
    with pytest.raises(Exception):  # noqa: B017  (kombu's connection error, whatever its class)
        feeder.feed()
    assert _published(store, job) == []
    feeder.stop()


def test_one_feed_cycle_at_a_time(store, client, broker_url, database_url) -> None:
    _job(store, 10)
    feeder = _feeder(store, broker_url, window=4)
    holder = create_engine(database_url)
    with holder.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(74657303, hashtext(:q))"), {"q": QUEUE})
        assert feeder.feed() is None
        assert feeder.feed(wait_s=0.3) is None
        assert client.llen(QUEUE) == 0
    holder.dispose()
    assert feeder.feed().messages == 4, "the lock goes with the transaction"
    feeder.stop()


def test_lost_messages_are_fed_again_once_the_queue_is_empty(store, client, broker_url) -> None:
    job = _job(store, 12)
    feeder = _feeder(store, broker_url, window=2)
    feeder.feed()
    assert _published(store, job) == list(range(6))
    client.lpush(QUEUE, b"not a real message")  # the queue is not empty: nothing counts as lost
    assert feeder.feed(sweep=True, lost_after_s=0).lost == 0
    client.flushall()  # Redis restarted empty
    report = feeder.feed(sweep=True, lost_after_s=0)
    assert (report.lost, report.messages) == (6, 2)
    assert _published(store, job) == list(range(6)), "lost items go first: they are the oldest"
    young = feeder.feed(sweep=True, lost_after_s=3600)
    assert young.lost == 0, "items published recently are not lost"
    feeder.stop()


def test_one_leader_at_a_time_and_a_dead_leaders_lock_is_taken_over(store, broker_url, database_url) -> None:
    first = _feeder(store, broker_url, window=4)
    second = _feeder(store, broker_url, window=4)
    assert first._lead() is True
    assert second._lead() is False
    pid = first._leader.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    killer = create_engine(database_url)
    with killer.begin() as conn:  # the leader's process dies: its session ends
        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    killer.dispose()
    deadline = time.monotonic() + 10  # the backend ends (and drops its locks) just after the signal
    while not second._lead():
        assert time.monotonic() < deadline, "the dead leader's lock was never released"
        time.sleep(0.05)
    assert first._lead() is False, "a leader whose session broke resigns"
    second.stop()
    assert first._lead() is True, "a stopped feeder releases the lock"
    first.stop()


def test_enqueue_publishes_the_first_window_and_leaves_the_rest_in_postgres(store, client, broker_url) -> None:
    settings = Settings(_env_file=None, broker_url=broker_url, queue=QUEUE, broker_window=3, refs_per_message=4)
    app = make_celery(settings)
    tasks = [caption_task("m")]
    small = submit(settings=settings, store=store, app=app, refs=[f"/s/{i}" for i in range(10)], tasks=tasks)
    assert (small.items, small.messages, small.published) == (10, 3, 10), "a job that fits goes out at once"
    big = submit(settings=settings, store=store, app=app, refs=[f"/b/{i}" for i in range(100)], tasks=tasks,
                 priority=2, tenant="t")
    assert (big.messages, big.published) == (0, 0), "the window is full: the big job waits in Postgres"
    client.delete(QUEUE)
    bigger = submit(settings=settings, store=store, app=app, refs=[f"/c/{i}" for i in range(100)], tasks=tasks,
                    refs_per_message=10)
    assert (bigger.messages, bigger.published) == (3, 30)
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT priority, tenant, queue FROM jobs WHERE id = :j"), {"j": big.job}).one()
    assert tuple(row) == (2, "t", QUEUE)
    assert client.llen(QUEUE) == 3
