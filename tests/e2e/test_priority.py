"""Priority overtakes what is already in Redis: a small interactive job submitted while a large
backfill fills its window finishes in a fraction of the time that window takes to drain.

Real Redis, Postgres, `imgq enqueue` and an `imgq worker` subprocess. Ends with `imgq check` of both jobs.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from imgq.db.cancelling import cancel_job
from imgq.db.store import Store
from imgq.feeding import BACKFILL_LANE
from tests.e2e.helpers import IMGQ, check_job, enqueue_listing, jpeg_bytes, start_worker, stop, wait_finished
from tests.fixtures.services import settings_env

pytestmark = pytest.mark.e2e

# The backfill's window (240 items) is ten times the urgent job; the worker holds at most 16 items.
# The backfill is big enough that its window is still full when the urgent job comes on a loaded
# host (at 320 items it drained from about 80 done); it is cancelled once the urgent job is done.
WINDOW, PER_MESSAGE, CONCURRENCY = 60, 4, 4
BACKFILL, URGENT = 2000, 24


def refs(root: Path, n: int, prefix: str, distinct: int = 32) -> list[str]:
    """``n`` local refs, hard links to ``distinct`` small JPEGs (each ref is its own item)."""
    sources = []
    for i in range(distinct):
        source = root / f"{prefix}-src-{i:02d}.jpg"
        source.write_bytes(jpeg_bytes(64, 48, seed=i))
        sources.append(source)
    out = []
    for i in range(n):
        path = root / f"{prefix}_{i:05d}.jpg"
        os.link(sources[i % distinct], path)
        out.append(str(path))
    return out


def done(store: Store, job: uuid.UUID) -> int:
    return store.counts(job)["done"]


def test_a_small_urgent_job_overtakes_a_backfill_already_in_redis(make_settings, redis_server, image_root, tmp_path):
    settings = make_settings(broker_window=WINDOW, refs_per_message=PER_MESSAGE, feed_interval_s=0.1)
    store = Store.from_url(settings.database_url)
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    lane = f"{settings.queue}\x06\x16{BACKFILL_LANE}"
    backfill = enqueue_listing(settings, tmp_path, refs(image_root, BACKFILL, "bf"),
                               "--priority", "-10", "--tenant", "archive")
    urgent_refs = refs(image_root, URGENT, "ui")
    assert client.llen(lane) == WINDOW, "the backfill's first window waits in its own lane"
    worker = start_worker(settings, Path(settings.caption_model), tmp_path, "w0", "--concurrency", str(CONCURRENCY))
    # `imgq enqueue` spends seconds starting Python on a loaded machine, time in which the worker
    # could drain the backfill. Started now and waiting on stdin, it submits the moment it is fed.
    submit = subprocess.Popen([*IMGQ, "enqueue", "caption", "-f", "-", "--max-new-tokens", "4", "--priority", "10",
                               "--tenant", "web"], env=settings_env(settings), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while done(store, backfill) < 8:  # the worker is warm and busy with the backfill
            assert worker.poll() is None and time.monotonic() < deadline, "the backfill never got going"
            time.sleep(0.1)
        out, err = submit.communicate("\n".join(urgent_refs), timeout=60)
        assert submit.returncode == 0, err
        urgent = uuid.UUID(out.strip())
        wait_finished(store, [urgent], timeout=30, procs=[worker], log_dir=tmp_path)
        with store.engine.connect() as conn:
            published, finished = conn.execute(text(
                "SELECT min(published_at), max(updated_at) FROM job_items WHERE job_id = :j"), {"j": urgent}).one()
        assert cancel_job(store.engine, "archive", backfill), "the backfill had finished: this test proves nothing"
        totals = wait_finished(store, [backfill], timeout=120, procs=[worker], log_dir=tmp_path)
        with store.engine.connect() as conn:
            # Timed by the database: backfill items already published (in Redis or held by the
            # worker) when the urgent job was, which a single FIFO list would have run first
            # (those cancelled after t1 were ahead of it too: not finished at t0).
            ahead, overtaken = conn.execute(text(
                "SELECT count(*) FILTER (WHERE published_at <= :t0 AND updated_at > :t0), "
                "count(*) FILTER (WHERE updated_at > :t0 AND updated_at <= :t1) FROM job_items WHERE job_id = :j"),
                {"j": backfill, "t0": published, "t1": finished}).one()
        print(f"urgent job of {URGENT}: {(finished - published).total_seconds():.2f}s from published to finished; "
              f"{ahead} backfill items were published ahead of it, {overtaken} backfill items finished meanwhile")
        assert ahead >= WINDOW * PER_MESSAGE / 2, "the backfill's window had drained before the urgent job came"
        # In one FIFO list the urgent job would have waited for all `ahead` items; in its lane it
        # waits only for what the worker already held.
        assert overtaken < ahead / 2
    finally:
        submit.kill()
        submit.wait()
        stop(worker)
        client.close()
    assert (totals["queued"], totals["running"], totals["dead"]) == (0, 0, 0)
    assert totals["done"] + totals["cancelled"] == BACKFILL, totals
    check_job(settings, str(urgent))
    check_job(settings, str(backfill))
