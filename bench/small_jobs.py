"""The feeder on a backlog of many small jobs (a CMS submitting one job per upload), side by side:
one statement per job's take, against the small takes of a pass in one statement
(``Feeding.take_many``). A big job's items sit in the same table, as in production, so a plan that
reads the table shows.

    .venv/bin/python -m bench.small_jobs [--jobs 5000] [--items 1 4] [--big 200000] [--repeats 3]
    .venv/bin/python -m bench.small_jobs --memory   # the Redis memory check off and on instead

Each repeat builds the backlog afresh and alternates the two variants; only the feed cycles are
timed (the window is unbounded, the messages are dropped from Redis, nothing consumes them).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.common import WORK, Services, bench_task, median, task_record


def _backlog(store: Any, jobs: int, items: int, big: int) -> None:
    from sqlalchemy import text

    with store.engine.begin() as conn:
        conn.execute(text("TRUNCATE dead_letters, job_items, jobs CASCADE"))
    tasks = [task_record(bench_task("caption", "m"))]
    if big:  # a big job already fully published: rows in the table, none waiting
        job = store.create_job(tasks=tasks, refs=[f"s3://archive/{i:09d}.jpg" for i in range(big)])
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE job_items SET published_at = now() WHERE job_id = :j"), {"j": job})
    for j in range(jobs):
        store.create_job(tasks=tasks, refs=[f"s3://cms/{j:06d}/{i}.jpg" for i in range(items)])
    with store.engine.begin() as conn:
        conn.execute(text("ANALYZE job_items"))


def feed_all(svc: Services, store: Any, small_take: int, memory_fraction: float = 0.0) -> tuple[float, int]:
    """Seconds to publish the whole backlog, and items published."""
    from imgq.celeryconf import make_celery
    from imgq.db.admin import Admin
    from imgq.worker.feeder import Feeder

    settings = svc.settings()
    rc = svc.redis_client()
    rc.flushall()
    feeder = Feeder(admin=Admin(store.engine), app=make_celery(settings), queue=settings.queue, window=10**9,
                    per_message=settings.refs_per_message, small_take=small_take, memory_fraction=memory_fraction)
    timed, items = 0.0, 0
    while True:
        t = time.perf_counter()
        report = feeder.feed()
        timed += time.perf_counter() - t
        rc.flushall()
        if report is None or report.items == 0:
            break
        items += report.items
    return timed, items


def main() -> int:
    from imgq.db.store import Store
    from imgq.worker.feeder import SMALL_TAKE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=5_000)
    ap.add_argument("--items", type=int, nargs="+", default=[1, 4], help="Items per small job (one run each).")
    ap.add_argument("--big", type=int, default=200_000, help="Items of a published big job in the table.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="Compare the feeder without and with its Redis memory "
                    "check (IMGQ_BROKER_MEMORY_FRACTION 0.8 under a 4 GB maxmemory it never reaches) instead.")
    args = ap.parse_args()
    variants = ([("memory check off", SMALL_TAKE, 0.0), ("memory check on", SMALL_TAKE, 0.8)] if args.memory else
                [("a take per job", 0, 0.0), ("one statement per pass", SMALL_TAKE, 0.0)])
    svc = Services.start(fresh=True, home=WORK / "small_jobs")
    try:
        store = Store.from_url(svc.database_url)
        print(f"{args.jobs} jobs per backlog, a published job of {args.big} items beside them; "
              f"medians of {args.repeats}")
        if args.memory:
            svc.redis_client().config_set("maxmemory", 4 * 2**30)
        for items in args.items:
            rates: dict[str, list[float]] = {label: [] for label, _, _ in variants}
            for r in range(args.repeats):
                for label, small_take, fraction in variants if r % 2 == 0 else variants[::-1]:
                    _backlog(store, args.jobs, items, args.big)
                    seconds, published = feed_all(svc, store, small_take, fraction)
                    assert published == args.jobs * items, (published, args.jobs * items)
                    rates[label].append(published / seconds)
            (a, old), (b, new) = ((label, median(rates[label])) for label, _, _ in variants)
            print(f"jobs of {items} item(s): {a} {old:,.0f} items/s, {b} {new:,.0f} items/s: x{new / old:.2f}")
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
