"""Backlogs bigger than the broker: Postgres holds them, Redis a window of 4 messages of 2 refs.

Real Redis, Postgres and `imgq worker` subprocesses. Every test ends with `imgq check`.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from imgq.db.store import Store
from tests.e2e.helpers import check_job, enqueue_listing, jpeg_bytes, run_cli, start_worker, stop, wait_finished

pytestmark = pytest.mark.e2e

WINDOW, PER_MESSAGE = 4, 2
SMALL = {
    "broker_window": WINDOW, "refs_per_message": PER_MESSAGE, "feed_interval_s": 0.1,
    # Shortened like tests/e2e/test_faults.py, so lost messages and dead workers show up in seconds.
    "task_time_limit_s": 20, "visibility_timeout_s": 25, "retry_base_s": 0.2, "retry_max_s": 1.0,
    "reconcile_after_s": 4, "reconcile_interval_s": 1, "heartbeat_s": 0.5, "worker_dead_after_s": 2,
}
# A worker holds at most this many items besides the window: its prefetched messages.
CONCURRENCY = 2
HELD = CONCURRENCY * PER_MESSAGE


def images(root: Path, n: int, prefix: str = "img") -> list[str]:
    refs = []
    for i in range(n):
        path = root / f"{prefix}_{i:04d}.jpg"
        path.write_bytes(jpeg_bytes(96, 72, seed=i))
        refs.append(str(path))
    return refs


def done_order(store: Store) -> list[tuple[uuid.UUID, int]]:
    """Finished items in the order their results committed."""
    with store.engine.connect() as conn:
        return [(j, s) for j, s in conn.execute(text(
            "SELECT job_id, seq FROM job_items WHERE state = 'done' ORDER BY updated_at, job_id, seq"))]


def created_at(store: Store, job: uuid.UUID) -> Any:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT created_at FROM jobs WHERE id = :j"), {"j": job}).scalar_one()


def unpublished(store: Store, job: uuid.UUID) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM job_items WHERE job_id = :j AND state = 'queued' "
                                     "AND published_at IS NULL"), {"j": job}).scalar_one())


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_backlog_far_bigger_than_the_window_never_overflows_it(make_settings, redis_server, image_root, tmp_path):
    settings = make_settings(**SMALL)
    n = 160  # 80 messages: 20 windows
    job = enqueue_listing(settings, tmp_path, images(image_root, n))
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    assert client.llen(settings.queue) == WINDOW, "enqueue publishes the first window, and no more"
    assert unpublished(Store.from_url(settings.database_url), job) == n - WINDOW * PER_MESSAGE
    depths: list[int] = []
    held: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            depths.append(client.llen(settings.queue))
            held.append(client.hlen("unacked"))  # messages workers have reserved
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    store = Store.from_url(settings.database_url)
    worker = start_worker(settings, Path(settings.caption_model), tmp_path, "w0", "--concurrency", str(CONCURRENCY))
    try:
        totals = wait_finished(store, [job], timeout=90, procs=[worker], log_dir=tmp_path)
    finally:
        done.set()
        sampler.join()
        stop(worker)
    client.close()
    print(f"{len(depths)} samples: queue depth max {max(depths)}, reserved by the worker max {max(held)}")
    assert totals == {"queued": 0, "running": 0, "done": n, "dead": 0}
    assert max(depths) <= WINDOW
    assert max(d + h for d, h in zip(depths, held, strict=True)) <= WINDOW + CONCURRENCY
    check_job(settings, str(job))


def test_killing_the_feeders_worker_hands_the_lock_to_another(make_settings, image_root, slow_tiny_model_dir,
                                                                tmp_path):
    settings = make_settings(caption_model=str(slow_tiny_model_dir), **SMALL)
    n = 240  # seconds of backlog left in Postgres when the poll sees 8 done, even on a loaded host
    store = Store.from_url(settings.database_url)
    procs = {name: start_worker(settings, slow_tiny_model_dir, tmp_path, name, "--concurrency", str(CONCURRENCY))
             for name in ("a", "b")}

    def feeder() -> str | None:
        found = [name for name in procs if "is the feeder of queue" in (tmp_path / f"worker-{name}.log").read_text()]
        return found[0] if found else None

    try:
        wait_for(lambda: feeder() is not None, 90, "no worker became the feeder")
        job = enqueue_listing(settings, tmp_path, images(image_root, n))
        wait_for(lambda: store.counts(job)["done"] >= 8, 60, "no progress")
        victim = feeder()
        assert victim is not None
        assert unpublished(store, job) > 0, "the backlog must still wait in Postgres when the feeder dies"
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        heir = "b" if victim == "a" else "a"
        wait_for(lambda: "is the feeder of queue" in (tmp_path / f"worker-{heir}.log").read_text(), 30,
                 "the surviving worker never took the feeder lock")
        totals = wait_finished(store, [job], timeout=120, procs=[procs[heir]], log_dir=tmp_path)
    finally:
        for proc in procs.values():
            stop(proc)
    assert totals == {"queued": 0, "running": 0, "done": n, "dead": 0}
    check_job(settings, str(job))


def test_wiping_redis_mid_job_costs_at_most_the_window(make_settings, redis_server, image_root,
                                                       slow_tiny_model_dir, tmp_path):
    settings = make_settings(caption_model=str(slow_tiny_model_dir), **SMALL)
    n = 160  # seconds of backlog left in Postgres when the poll sees 8 done, even on a loaded host
    job = enqueue_listing(settings, tmp_path, images(image_root, n))
    store = Store.from_url(settings.database_url)
    worker = start_worker(settings, slow_tiny_model_dir, tmp_path, "w0", "--concurrency", str(CONCURRENCY))
    try:
        wait_for(lambda: store.counts(job)["done"] >= 8, 60, "no progress")
        assert unpublished(store, job) > 0
        # Freeze the worker (its feeder too) with messages in the queue, so that the wipe really
        # loses some: a worker that had just taken every queued message would lose none.
        client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
        deadline = time.monotonic() + 60
        while True:
            worker.send_signal(signal.SIGSTOP)
            if client.llen(settings.queue) > 0:
                break
            worker.send_signal(signal.SIGCONT)
            assert time.monotonic() < deadline, "the queue never held a message"
            time.sleep(0.02)
        client.close()
        redis_server.stop(kill=True)  # no persistence: the window is gone
        redis_server.start()
        worker.send_signal(signal.SIGCONT)
        totals = wait_finished(store, [job], timeout=120, procs=[worker], log_dir=tmp_path)
    finally:
        stop(worker)
    assert totals == {"queued": 0, "running": 0, "done": n, "dead": 0}
    log = (tmp_path / "worker-w0.log").read_text()
    assert "were lost from the broker; re-published" in log
    lost = int(log.split(" items were lost from the broker")[0].rsplit(" ", 1)[-1])
    assert 0 < lost <= (WINDOW + CONCURRENCY) * PER_MESSAGE, "at most the window (and what the worker held) is lost"
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM captions")).scalar_one() == n, "no duplicates"
    check_job(settings, str(job))


def test_a_high_priority_job_starts_within_one_window(make_settings, image_root, tmp_path):
    settings = make_settings(**SMALL)
    # Big enough that it still waits once the urgent enqueue (a CLI subprocess: seconds on a loaded
    # CI machine, ~90 items' worth once) returns; cancelled once the urgent job is done.
    big = enqueue_listing(settings, tmp_path, images(image_root, 500, "big"))
    urgent_refs = images(image_root, 40, "urgent")
    store = Store.from_url(settings.database_url)
    worker = start_worker(settings, Path(settings.caption_model), tmp_path, "w0", "--concurrency", str(CONCURRENCY))
    try:
        wait_for(lambda: store.counts(big)["done"] >= 10, 60, "no progress")
        urgent = enqueue_listing(settings, tmp_path, urgent_refs, "--priority", "10")
        assert store.counts(big)["queued"] > 100, "the big job must still be waiting when the urgent one comes"
        totals = wait_finished(store, [urgent], timeout=90, procs=[worker], log_dir=tmp_path)
        assert run_cli(settings, "cancel", str(big)).returncode == 0
        wait_finished(store, [big], timeout=60, procs=[worker], log_dir=tmp_path)
    finally:
        stop(worker)
    assert totals["done"] == 40
    order = done_order(store)
    with store.engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM job_items WHERE job_id = :j AND state = 'done' "
                                   "AND updated_at < :t"), {"j": big, "t": created_at(store, urgent)}).scalar_one()
    urgent_at = [i for i, (job, _) in enumerate(order) if job == urgent]
    big_between_start = urgent_at[0] - before
    big_between_end = urgent_at[-1] - before - (len(urgent_at) - 1)
    print(f"big items finished after the urgent job arrived: {big_between_start} before its first, "
          f"{big_between_end} before its last")
    # What was already in the window and in the worker's hands goes first, plus at most one refill
    # that raced with the urgent job's commit (created_at is taken when its transaction begins);
    # nothing more. A fair share at equal priority would give the big job about half the slots
    # while the 40 urgent items run, well over this bound before the urgent job's last item.
    bound = 2 * WINDOW * PER_MESSAGE + HELD
    assert big_between_start <= bound
    assert big_between_end <= bound
    check_job(settings, str(urgent))


def test_two_tenants_of_equal_priority_share_the_worker(make_settings, image_root, tmp_path):
    settings = make_settings(**SMALL)
    n = 100
    first = enqueue_listing(settings, tmp_path, images(image_root, n, "a"), "--tenant", "alpha")
    second = enqueue_listing(settings, tmp_path, images(image_root, n, "b"), "--tenant", "beta")
    store = Store.from_url(settings.database_url)
    worker = start_worker(settings, Path(settings.caption_model), tmp_path, "w0", "--concurrency", str(CONCURRENCY))
    try:
        # 200 items of 2 per message: ~30 s on a quiet machine, 90 s was not enough beside a mutation run.
        wait_finished(store, [first, second], timeout=240, procs=[worker], log_dir=tmp_path)
    finally:
        stop(worker)
    head = done_order(store)[:n]  # both tenants still have work waiting all along
    alpha = sum(1 for job, _ in head if job == first)
    print(f"first {n} items finished: alpha {alpha}, beta {n - alpha}")
    # Tolerance: alpha's head start (the first window, published by its enqueue) plus what the
    # worker holds; first come, first served would give alpha all 100.
    tolerance = (WINDOW + CONCURRENCY) * PER_MESSAGE
    assert abs(alpha - (n - alpha)) <= 2 * tolerance
    check_job(settings, str(first))
    check_job(settings, str(second))


def test_the_feeders_hold_the_backlog_while_redis_is_past_its_memory_mark(make_settings, redis_server, image_root,
                                                                         tmp_path):
    """Other clients' keys hold Redis past 80 % of maxmemory: enqueue and the worker's feeder
    publish nothing (the items wait in Postgres, the worker says why), and once the keys go the
    worker's feeder publishes and the job finishes."""
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 64 * 2**20)
    junk = 0
    while int(client.info("memory")["used_memory"]) < 0.85 * 64 * 2**20:
        client.set(f"junk:{junk}", b"x" * 2**20)
        junk += 1
    settings = make_settings(**SMALL)
    n = 24
    worker = None
    try:
        listing = tmp_path / "refs.txt"
        listing.write_text("\n".join(images(image_root, n)))
        out = run_cli(settings, "enqueue", "caption", "-f", str(listing), "--max-new-tokens", "4")
        assert out.returncode == 0, out.stderr
        assert "Redis is at IMGQ_BROKER_MEMORY_FRACTION of its maxmemory" in out.stderr
        job = out.stdout.strip()
        assert client.llen(settings.queue) == 0
        worker = start_worker(settings, Path(settings.caption_model), tmp_path, "w0", "--concurrency", "2")
        log = tmp_path / "worker-w0.log"
        deadline = time.monotonic() + 60
        while "Redis is at 80% of its maxmemory" not in log.read_text():
            assert time.monotonic() < deadline and worker.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        store = Store.from_url(settings.database_url)
        assert store.counts(job)["done"] == 0 and client.llen(settings.queue) == 0
        client.delete(*[f"junk:{i}" for i in range(junk)])
        totals = wait_finished(store, [job], timeout=60, procs=[worker], log_dir=tmp_path)
    finally:
        if worker is not None:
            stop(worker)
        client.config_set("maxmemory", 0)
        client.close()
    assert totals == {"queued": 0, "running": 0, "done": n, "dead": 0}
    assert "Redis has room again" in log.read_text()
    check_job(settings, job)


def test_a_worker_of_another_queue_feeds_and_retries_on_that_queue(make_settings, redis_server, image_root, tmp_path):
    """`imgq worker --queues other` consumed `other`, but its feeder fed IMGQ_QUEUE (and its retries
    and depth gauge were IMGQ_QUEUE's): past the producer's first window, a job of `other` was never
    fed. Now the worker serves the one queue it is given, all of it."""
    settings = make_settings(**SMALL)
    other = make_settings(**SMALL, queue="imgq-other")
    n = 24  # 12 messages: three windows
    job = enqueue_listing(other, tmp_path, images(image_root, n))
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    assert client.llen("imgq-other") == WINDOW and client.llen(settings.queue) == 0
    store = Store.from_url(settings.database_url)
    worker = start_worker(settings, Path(settings.caption_model), tmp_path, "w0", "--queue", "imgq-other")
    try:
        totals = wait_finished(store, [job], timeout=60, procs=[worker], log_dir=tmp_path)
    finally:
        stop(worker)
    client.close()
    assert totals == {"queued": 0, "running": 0, "done": n, "dead": 0}
    refused = run_cli(settings, "worker", "--queues", "imgq,imgq-other")
    assert refused.returncode == 2 and refused.stderr.startswith("error[usage]: --queue 'imgq,imgq-other': a worker "
                                                                 "serves one queue"), refused.stderr
