"""The feeder on a backlog of many small jobs (a CMS submitting one job per upload), side by side:
one statement per job's take, against the small takes of a pass in one statement
(``Feeding.take_many``). A big job's items sit in the same table, as in production, so a plan that
reads the table shows.

    .venv/bin/python -m bench.small_jobs [--jobs 5000] [--items 1 4] [--big 200000] [--repeats 3]

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


def feed_all(svc: Services, store: Any, small_take: int) -> tuple[float, int]:
    """Seconds to publish the whole backlog, and items published."""
    from imgq.celeryconf import make_celery
    from imgq.db.admin import Admin
    from imgq.worker.feeder import Feeder

    settings = svc.settings()
    rc = svc.redis_client()
    rc.flushall()
    feeder = Feeder(admin=Admin(store.engine), app=make_celery(settings), queue=settings.queue, window=10**9,
                    per_message=settings.refs_per_message, small_take=small_take)
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
    args = ap.parse_args()
    svc = Services.start(fresh=True, home=WORK / "small_jobs")
    try:
        store = Store.from_url(svc.database_url)
        print(f"{args.jobs} jobs per backlog, a published job of {args.big} items beside them; "
              f"medians of {args.repeats}")
        for items in args.items:
            rates: dict[str, list[float]] = {"a take per job": [], "one statement per pass": []}
            for r in range(args.repeats):
                order = [("a take per job", 0), ("one statement per pass", SMALL_TAKE)]
                for label, small_take in order if r % 2 == 0 else order[::-1]:
                    _backlog(store, args.jobs, items, args.big)
                    seconds, published = feed_all(svc, store, small_take)
                    assert published == args.jobs * items, (published, args.jobs * items)
                    rates[label].append(published / seconds)
            old, new = median(rates["a take per job"]), median(rates["one statement per pass"])
            print(f"jobs of {items} item(s): a take per job {old:,.0f} items/s, one statement per pass "
                  f"{new:,.0f} items/s: x{new / old:.2f}")
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
