"""The feeder against real Postgres and Redis: window, order, lock, lost messages, enqueue's window."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from sqlalchemy import create_engine, text

from imgq.celeryconf import make_celery
from imgq.config import Settings
from imgq.contract import CaptionParams
from imgq.cost import item_cost
from imgq.db.admin import Admin, LiveHolders
from imgq.db.store import Store
from imgq.feeding import BACKFILL_LANE, TOP_LANE
from imgq.producer.submit import submit
from imgq.worker.feeder import Feeder
from tests.jobs import caption_task, record

pytestmark = pytest.mark.integration

QUEUE = "feed-test"


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


def test_a_sweep_deletes_the_items_of_an_abandoned_acceptance_and_only_those(store, client, broker_url) -> None:
    job = _job(store, 4)
    abandoned = uuid.uuid4()  # a producer died between its side streams' commit and its job's
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO job_items (job_id, seq, ref) SELECT :j, g, '/d/x.jpg' "
                          "FROM generate_series(0, 9) g"), {"j": abandoned})
        conn.execute(text("INSERT INTO acceptances (job_id) VALUES (:j)"), {"j": abandoned})
    feeder = _feeder(store, broker_url, window=10)
    assert feeder.feed().abandoned == 0, "only a sweep looks"
    assert feeder.feed(sweep=True).abandoned == 10
    with store.engine.connect() as conn:
        left = conn.execute(text("SELECT job_id, count(*) FROM job_items GROUP BY job_id")).all()
    assert [tuple(r) for r in left] == [(job, 4)]
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


def test_a_cycle_stops_at_max_messages_however_much_room_the_window_has(store, client, broker_url) -> None:
    job = _job(store, 40)
    feeder = _feeder(store, broker_url, window=100, per_message=3)
    report = feeder.feed(max_messages=5)
    assert (report.messages, report.items, client.llen(QUEUE)) == (5, 15, 5)
    assert _published(store, job) == list(range(15))
    assert feeder.feed(max_messages=0).messages == 0
    assert feeder.feed().messages == 9, "a plain cycle publishes the rest (40 items, 3 per message)"
    feeder.stop()


def test_enqueue_publishes_at_most_producer_messages_and_the_workers_feeder_the_rest(
    store, client, broker_url, monkeypatch
) -> None:
    import imgq.producer.submit as submit_module

    monkeypatch.setattr(submit_module, "PRODUCER_MESSAGES", 4)
    settings = Settings(_env_file=None, broker_url=broker_url, queue=QUEUE, broker_window=50, refs_per_message=2)
    app = make_celery(settings)
    out = submit(settings=settings, store=store, app=app, refs=[f"/p/{i}" for i in range(30)],
                 tasks=[caption_task("m")])
    assert (out.items, out.messages, out.published) == (30, 4, 8)
    assert client.llen(QUEUE) == 4 and _published(store, out.job) == list(range(8))
    assert store.waiting(out.job) == 22
    feeder = _feeder(store, broker_url, window=50, per_message=2)
    assert feeder.feed().items == 22 and store.waiting(out.job) == 0
    feeder.stop()


def test_deleting_a_job_deletes_its_items_without_a_foreign_key(store) -> None:
    job, other = _job(store, 5), _job(store, 3)
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id = :j"), {"j": job})
    with store.engine.connect() as conn:
        left = dict(conn.execute(text("SELECT job_id, count(*) FROM job_items GROUP BY job_id")).all())
    assert left == {other: 3}


# -- lanes: priority overtakes what is already in Redis ---------------------------------------------------------
BACKFILL = f"{QUEUE}\x06\x16{BACKFILL_LANE}"  # kombu's name of the queue's lane 6


def _consume(app, n: int) -> list[str]:
    """Job ids of the next ``n`` messages as a Celery worker receives them (one BRPOP naming every
    lane, through kombu's event loop), acknowledged."""
    from kombu import Consumer, Queue

    got: list[str] = []

    def take(body, message) -> None:
        got.append(body[1]["msg"]["job"])
        message.ack()

    with app.connection_for_read() as conn, Consumer(conn, [Queue(QUEUE)], callbacks=[take],
                                                     accept=["json"], prefetch_count=1):
        while len(got) < n:
            conn.drain_events(timeout=5)
    return got


def test_a_backfill_fills_its_own_lane_and_a_later_urgent_job_overtakes_it(store, client, broker_url) -> None:
    backfill = _job(store, 300, priority=-10, tenant="archive")
    feeder = _feeder(store, broker_url, window=4)
    assert feeder.feed().messages == 4
    assert (client.llen(BACKFILL), client.llen(QUEUE)) == (4, 0), "a backfill waits in its own lane"
    assert feeder.feed().messages == 0, "its lane is full"
    urgent = _job(store, 6, priority=10, tenant="web")
    report = feeder.feed()
    # The top lane has the whole window even though the backfill lane is full: no wait for it.
    assert (report.depth, report.messages, report.items) == (4, 2, 6)
    assert (client.llen(QUEUE), client.llen(BACKFILL)) == (2, 4)
    assert feeder.depths() == {TOP_LANE: 2, BACKFILL_LANE: 4}
    app = make_celery(Settings(_env_file=None, broker_url=broker_url, queue=QUEUE))
    with app.connection_for_read() as conn:  # what the workers' imgq_queue_depth gauge reads: every lane
        assert conn.default_channel.queue_declare(QUEUE, passive=True).message_count == 6
    assert _consume(app, 3) == [str(urgent), str(urgent), str(backfill)], "the top lane is drained first"
    # Priority 0 shares the top lane; the backfill's lane is refilled only up to the window less
    # what the lanes above it hold (nothing while the top lane is full).
    default = _job(store, 30)
    assert feeder.feed().messages == 4
    assert (client.llen(QUEUE), client.llen(BACKFILL)) == (4, 3)
    assert _consume(app, 4) == [str(default)] * 4
    assert (feeder.feed().messages, client.llen(QUEUE), client.llen(BACKFILL)) == (4, 4, 3)
    default_items = len(_published(store, default))
    client.delete(QUEUE)  # the default job's messages were taken
    with store.engine.begin() as conn:  # ... and it has nothing more waiting
        conn.execute(text("UPDATE job_items SET published_at = now() WHERE job_id = :j"), {"j": default})
    assert (feeder.feed().messages, client.llen(BACKFILL)) == (1, 4), "the backfill lane tops up to the window"
    assert default_items == 24
    feeder.stop()


def test_requeued_and_republished_messages_keep_their_lane(store, client, broker_url) -> None:
    from kombu import Consumer, Queue

    from imgq.db.admin import Republish
    from imgq.publish import republish

    app = make_celery(Settings(_env_file=None, broker_url=broker_url, queue=QUEUE))
    backfill = _job(store, 3, priority=-5)
    sent = republish(app, [Republish(backfill, [record(caption_task("m"))], [(0, "/d/0.jpg")], priority=-5),
                           Republish(uuid.uuid4(), [record(caption_task("m"))], [(0, "/d/0.jpg")], priority=3)],
                     queue=QUEUE, per_message=3)
    assert sent == 2 and (client.llen(BACKFILL), client.llen(QUEUE)) == (1, 1)
    client.delete(QUEUE)
    # A worker that hands a message back (an outage: Reject(requeue=True)) puts it in its own lane.
    rejected: list[str] = []

    def reject(body, message) -> None:
        rejected.append(body[1]["msg"]["job"])
        message.reject(requeue=True)

    with app.connection_for_read() as conn, Consumer(conn, [Queue(QUEUE)], callbacks=[reject], accept=["json"],
                                                     prefetch_count=1):
        conn.drain_events(timeout=5)
    assert rejected == [str(backfill)]
    assert (client.llen(BACKFILL), client.llen(QUEUE)) == (1, 0)


def test_a_lost_message_is_found_while_its_lane_stays_topped_up(store, client, broker_url) -> None:
    """Lost queued items were looked for only once every lane had drained: a large job keeping the
    lane full left an urgent job's lost items queued for as long as it ran (found by review, 395 s
    and counting). Each lane is FIFO, so what left it is known from what was pushed since."""
    feeder = _feeder(store, broker_url, window=4, lost_after_s=0.0)
    urgent = _job(store, 6, priority=10)
    assert feeder.feed().messages == 2
    bulk = _job(store, 300)
    assert feeder.feed().messages == 2 and client.llen(QUEUE) == 4, "the bulk job tops the lane up"
    assert feeder.feed(sweep=True).lost == 0, "every message is still in the lane"
    for raw in client.lrange(QUEUE, 0, -1):  # the urgent messages vanish (a Redis failover, say)
        if str(urgent).encode() in raw:
            client.lrem(QUEUE, 0, raw)
    assert client.llen(QUEUE) == 2
    report = feeder.feed(sweep=True)
    assert report.lost == 6, "pushed before every message now in the lane, and still queued"
    assert report.messages == 2 and client.llen(QUEUE) == 4, "published again at once, ahead of the bulk job"
    assert feeder.feed(sweep=True).lost == 0
    assert len(_published(store, bulk)) == 6
    feeder.stop()


def test_a_retry_message_still_in_a_deep_lane_is_not_taken_for_lost(store, client, broker_url) -> None:
    """A retried item kept the time of its first publish: once the lane had let go of everything
    pushed by then, the sweep took it for lost while its retry message still waited in the lane.
    Its release now records when the retry went out."""
    from imgq.publish import chunk_messages, publish, tasks_from_record

    feeder = _feeder(store, broker_url, window=10, lost_after_s=600.0)
    retried = _job(store, 3)
    assert feeder.feed().messages == 1
    client.rpop(QUEUE)  # a worker takes it and claims the items
    store.claim(retried, [0, 1, 2], "w1")
    bulk = _job(store, 300)
    assert feeder.feed().messages == 10
    app = make_celery(Settings(_env_file=None, broker_url=broker_url, queue=QUEUE))
    retry = chunk_messages(job=str(retried), tasks=tasks_from_record(store.job_tasks(retried)),
                           items=[(i, f"/d/{i}.jpg") for i in range(3)], per_message=3)
    publish(app, retry, queue=QUEUE, lane=TOP_LANE)
    store.release(retried, [0, 1, 2])  # the retry went out: queued again
    for _ in range(10):  # the bulk messages pushed before the retry are taken
        client.rpop(QUEUE)
    assert client.llen(QUEUE) == 1
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET updated_at = now() - interval '1 hour' WHERE job_id = :j"),
                     {"j": retried})
    assert feeder.feed(sweep=True).lost == 0, "its retry message is the one still in the lane"
    client.delete(QUEUE)  # now it is gone too
    assert feeder.feed(sweep=True).lost == 3
    assert len(_published(store, bulk)) > 10
    feeder.stop()


def test_a_reaper_sends_each_orphan_back_to_its_jobs_queue(store, client, broker_url) -> None:
    """A reaper takes the orphans of every queue; it published them all to its own, where a fleet
    serving other kinds dead-lettered them as wrong_model (found by review: 249 of 249)."""
    from imgq.db.admin import Admin
    from imgq.publish import republish

    other = "feed-test-other"
    mine = _job(store, 2)
    theirs = store.create_job(tasks=[record(caption_task("m"))], refs=["/d/a.jpg", "/d/b.jpg"], queue=other)
    for job in (mine, theirs):
        store.claim(job, [0, 1], "gone:1")
    with store.engine.begin() as conn:  # the dead worker's record, as its heartbeat left it
        conn.execute(text("INSERT INTO workers (name, host, pid) VALUES ('gone:1', 'gone', 1)"))
    app = make_celery(Settings(_env_file=None, broker_url=broker_url, queue=QUEUE))
    taken = Admin(store.engine).take_orphans(
        dead_after_s=None, gone=["gone:1"],
        publish=lambda batches: republish(app, batches, queue=QUEUE, per_message=1))
    assert taken is not None and sum(len(b.items) for b in taken) == 4
    assert (client.llen(QUEUE), client.llen(other)) == (2, 2)
    client.delete(QUEUE, other)


def test_fair_shares_weigh_each_jobs_cost(store, client, broker_url) -> None:
    cheap = _job(store, 300, tenant="a")  # greedy, 30 tokens: 1.35
    dear = store.create_job(tasks=[record(caption_task("m", CaptionParams(num_beams=4, max_new_tokens=30)))],
                            refs=[f"/e/{i}.jpg" for i in range(300)], queue=QUEUE, tenant="b")  # 4.5
    feeder = _feeder(store, broker_url, window=40)
    feeder.feed()
    # Equal load: cheap items x 1.35 = dear items x 4.5, within a message.
    cheap_n, dear_n = len(_published(store, cheap)), len(_published(store, dear))
    assert cheap_n + dear_n == 120
    assert abs(cheap_n * item_cost([record(caption_task("m"))]) - dear_n * 4.5) <= 3 * 4.5
    assert dear_n < cheap_n / 3
    feeder.stop()


def test_a_workers_retries_go_back_to_the_lane_it_took_the_message_from(store, client, broker_url) -> None:
    """What worker/app.py's retry publisher relies on: inside a task of the thread pool,
    ``delivered_lane`` is the lane the message came from."""
    from celery.contrib.testing.worker import start_worker

    from imgq.publish import delivered_lane, publish
    from tests.jobs import message

    app = make_celery(Settings(_env_file=None, broker_url=broker_url, queue=QUEUE, messages_in_flight=2))
    seen: list[tuple[str, int]] = []

    @app.task(name="imgq.process", bind=True)
    def process(self, msg: dict) -> None:
        seen.append((msg["job"], delivered_lane(app)))

    assert delivered_lane(app) == TOP_LANE, "outside a task"
    jobs = [str(uuid.uuid4()) for _ in range(3)]
    for job, lane in zip(jobs, (BACKFILL_LANE, TOP_LANE, BACKFILL_LANE), strict=True):
        publish(app, [message(job, [caption_task("m")], ["/d/0.jpg"])], queue=QUEUE, lane=lane)
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING",
                      queues=[QUEUE]):
        deadline = time.monotonic() + 20
        while len(seen) < 3:
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
    assert sorted(seen) == sorted(zip(jobs, (BACKFILL_LANE, TOP_LANE, BACKFILL_LANE), strict=True))


def test_a_cycle_with_every_lane_full_does_not_read_the_backlog(store, client, broker_url) -> None:
    """Reading the backlog walks every waiting job: 1.2-1.4 s a cycle, four cycles a second, with
    20,000 jobs waiting and the window full (found by review)."""
    from sqlalchemy import event

    for _ in range(3):
        _job(store, 30)
    feeder = _feeder(store, broker_url, window=4)
    assert feeder.feed().messages == 4
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda c, cur, sql, *rest: statements.append(sql))
    assert feeder.feed().messages == 0
    assert statements and not any("WITH RECURSIVE waiting" in sql for sql in statements), statements
    client.delete(QUEUE)
    assert feeder.feed().messages == 4
    assert any("WITH RECURSIVE waiting" in sql for sql in statements)
    feeder.stop()


def test_a_sweep_with_no_age_leaves_a_live_workers_running_items_until_its_own_bound(store) -> None:
    """`imgq reconcile --older-than 0` sent the running items of live workers again: an attempt
    each, and, claimed while running, each a crash suspect run alone. They stay the worker's while
    it beats, until its own bound (visibility timeout plus time limit)."""
    job = _job(store, 5)
    holders = [("live:1", 0, 5), ("live:1", 0, 500), ("stale:2", 60, 5), (None, 0, 5), ("unknown:3", 0, 5)]
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO workers (name, host, pid, heartbeat_at) VALUES "
                          "('live:1', 'live', 1, now()), ('stale:2', 'stale', 2, now() - interval '60 seconds')"))
        for seq, (worker, _, running_for) in enumerate(holders):
            conn.execute(text("UPDATE job_items SET state = 'running', worker = :w, published_at = now(), "
                              "updated_at = now() - make_interval(secs => :age) WHERE job_id = :j AND seq = :s"),
                         {"w": worker, "age": running_for, "j": job, "s": seq})
    admin = Admin(store.engine)
    with admin.feeding(QUEUE, wait_s=1) as tx:
        taken = tx.lost(queued_older_than_s=0, running_older_than_s=0, live=LiveHolders(beat_within_s=12, after_s=300))
    assert taken == 4
    with store.engine.connect() as conn:
        states = conn.execute(text("SELECT seq, state FROM job_items WHERE job_id = :j ORDER BY seq"), {"j": job}).all()
    assert states == [(0, "running"), (1, "queued"), (2, "queued"), (3, "queued"), (4, "queued")]


def _rows_read(plan: dict) -> int:
    own = plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1) if plan.get("Relation Name") == "job_items" else 0
    return own + sum(_rows_read(child) for child in plan.get("Plans", []))


def test_many_small_takes_go_in_one_statement_that_reads_only_their_items(store) -> None:
    """Many single-image jobs cost the feeder a take each, as much as publishing their messages
    (1,190 jobs/s; docs/scaling.md). One statement takes them all, without reading the table:
    joined back on (job_id, seq) the planner hashed all of job_items."""
    big = _job(store, 30_000)
    small = [_job(store, 1) for _ in range(300)]
    retried = _job(store, 10)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET published_at = now() WHERE job_id = :j AND seq < 5 AND seq <> 2"),
                     {"j": retried})  # 2 was published, failed and released: below the hint
        conn.execute(text("ANALYZE job_items"))
    wants = [(big, 256, 0), *((job, 1, 0) for job in small), (retried, 6, 5)]
    with Admin(store.engine).feeding(QUEUE, wait_s=1) as tx:
        taken = tx.take_many(wants)
    assert [seq for seq, _ in taken[big]] == list(range(256))
    assert all(taken[job] == [(0, "/d/0.jpg")] for job in small)
    assert [seq for seq, _ in taken[retried]] == [2, 5, 6, 7, 8, 9]
    assert _published(store, big) == list(range(256))

    from imgq.db.admin import _TAKE_MANY

    params = {"jobs": [j for j, _, _ in wants], "ns": [n for _, n, _ in wants], "froms": [0 for _ in wants]}
    with store.engine.connect() as conn, conn.begin() as tx:
        plan = conn.execute(text("EXPLAIN (ANALYZE, FORMAT JSON) " + _TAKE_MANY.text), params).scalar_one()
        tx.rollback()
    assert _rows_read(plan[0]["Plan"]) <= 4 * (256 + 300 + 6), "the take read more of job_items than it took"


def test_a_job_named_twice_in_one_take_is_refused(store) -> None:
    job = _job(store, 5)
    with Admin(store.engine).feeding(QUEUE, wait_s=1) as tx, pytest.raises(ValueError, match="twice"):
        tx.take_many([(job, 3, 0), (job, 2, 0)])
    assert _published(store, job) == []


def test_the_feeder_keeps_redis_below_its_memory_fraction_and_feeds_again_once_it_has_room(
        store, client, broker_url) -> None:
    """A window of 10,000 messages would not fit: the feeder stops at 80 % of maxmemory, measured
    again each pass, and the rest waits in Postgres until workers take messages."""
    from imgq.transport import counted_memory

    job = _job(store, 16 * 2_000)
    feeder = _feeder(store, broker_url, window=10_000, per_message=16, memory_fraction=0.8)
    client.config_set("maxmemory-policy", "noeviction")
    limit = counted_memory(client.info("memory")) + 2_000_000
    client.config_set("maxmemory", limit)
    try:
        first = feeder.feed()
        assert first.held and 0 < first.messages < 2_000
        # What Redis reports as used moves between cycles (client buffers, the allocator), so a
        # cycle or two more may find room for a few messages (19 once); none may pass the mark,
        # and the feeder must come to a stop.
        for _ in range(5):
            used = counted_memory(client.info("memory"))
            assert used <= 0.8 * limit, f"{used} bytes used, over 80 % of {limit}"
            again = feeder.feed()
            assert again.held
            if again.messages == 0:
                break
        else:
            raise AssertionError(f"still publishing after 5 cycles: {feeder.published} messages")
        assert feeder.published < 2_000
        assert used >= 0.8 * limit - 2_000_000 * 0.5, "it filled most of its room"
        client.delete(QUEUE)  # workers took every message
        assert feeder.feed().messages > 0
        assert counted_memory(client.info("memory")) <= 0.8 * limit
    finally:
        client.config_set("maxmemory", 0)
    assert len(_published(store, job)) == 16 * feeder.published
    # Without maxmemory only the window bounds Redis.
    unbounded = _feeder(store, broker_url, window=10_000, per_message=16, memory_fraction=0.8).feed()
    assert (unbounded.held, unbounded.messages) == (None, 2_000 - feeder.published)


def test_a_backlog_smaller_than_the_memory_room_is_published_and_not_called_held(store, client, broker_url) -> None:
    """Held means the room, not the backlog, ended the cycle: a 3-message job under a mark with
    room for hundreds must not log the warning or count imgq_feed_memory_held_total (review)."""
    from imgq.transport import counted_memory

    _job(store, 16 * 3)
    feeder = _feeder(store, broker_url, window=10_000, per_message=16, memory_fraction=0.8)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int((counted_memory(client.info("memory")) + 2_000_000) / 0.8))
    try:
        report = feeder.feed()
    finally:
        client.config_set("maxmemory", 0)
    assert (report.held, report.messages) == (False, 3)
