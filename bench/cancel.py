"""Cancelling a big job, side by side: the one statement imgq used until 2026-11-29 against the
mark and chunks of ``imgq.db.cancelling``. While each runs, a prober claims the job's items as
workers holding its messages would, one every 20 ms, and times each claim.

    .venv/bin/python -m bench.cancel [--items 1000000] [--repeats 3] [--chunk 10000]

Real embedded Postgres; each repeat creates the job afresh and alternates the two variants.
Medians of the repeats: the cancel's wall time, and the longest and median claim.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid
from typing import Any

from bench.common import WORK, Services, bench_task, median, task_record

# What DELETE /v1/jobs/{id} ran before imgq.db.cancelling: every queued item in one statement.
ONE_STATEMENT = """
WITH items AS (
  UPDATE job_items i SET state = 'cancelled', updated_at = now()
  FROM jobs j WHERE j.id = :job AND j.tenant = :tenant AND i.job_id = j.id AND i.state = 'queued'
  RETURNING i.seq
), job AS (
  UPDATE jobs SET cancelled_at = coalesce(cancelled_at, now()),
                  cancelled_items = cancelled_items + (SELECT count(*) FROM items)
  WHERE id = :job AND tenant = :tenant RETURNING id
)
SELECT (SELECT count(*) FROM items)
"""


def _one_statement(engine: Any, tenant: str, job: uuid.UUID, chunk: int) -> int:
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("SELECT 1 FROM jobs WHERE id = :job AND tenant = :tenant FOR UPDATE"),
                     {"job": job, "tenant": tenant})
        return int(conn.execute(text(ONE_STATEMENT), {"job": job, "tenant": tenant}).scalar_one())


def _chunked(engine: Any, tenant: str, job: uuid.UUID, chunk: int) -> int:
    from imgq.db.cancelling import cancel_job

    return cancel_job(engine, tenant, job, chunk=chunk) or 0


def _probe(store: Any, job: uuid.UUID, total: int, stop: threading.Event, waits: list[float]) -> None:
    seqs = random.Random(7).sample(range(total), 2_000)
    for seq in seqs:
        if stop.is_set():
            return
        t = time.perf_counter()
        store.claim(job, [seq], "probe")
        waits.append(time.perf_counter() - t)
        time.sleep(0.02)


def run_once(store: Any, items: int, chunk: int, variant: Any) -> tuple[float, float, float, int]:
    """Seconds to cancel, the longest and the median claim, and items cancelled."""
    from sqlalchemy import text

    with store.engine.begin() as conn:
        conn.execute(text("TRUNCATE dead_letters, job_items, jobs CASCADE"))
    job = store.create_job(tasks=[task_record(bench_task("caption", "m"))],
                           refs=(f"s3://archive/{i:09d}.jpg" for i in range(items)), tenant="t")
    with store.engine.begin() as conn:
        conn.execute(text("ANALYZE job_items"))
    stop, waits = threading.Event(), []
    prober = threading.Thread(target=_probe, args=(store, job, items, stop, waits))
    prober.start()
    time.sleep(0.2)
    t = time.perf_counter()
    cancelled = variant(store.engine, "t", job, chunk)
    seconds = time.perf_counter() - t
    stop.set()
    prober.join()
    return seconds, max(waits), median(waits), cancelled


def main() -> int:
    from imgq.db.store import Store

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=10_000)
    args = ap.parse_args()
    svc = Services.start(fresh=True, home=WORK / "cancel")
    try:
        store = Store.from_url(svc.database_url)
        variants = {"one statement": _one_statement, "mark, then chunks": _chunked}
        found: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        for r in range(args.repeats):
            for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                seconds, longest, typical, cancelled = run_once(store, args.items, args.chunk, variants[name])
                assert args.items - 200 < cancelled <= args.items, cancelled  # the prober ran a few
                found[name].append((seconds, longest, typical))
                print(f"  {name}: {seconds:.2f} s, claims: longest {longest * 1e3:.0f} ms, "
                      f"median {typical * 1e3:.1f} ms", flush=True)
        print(f"a job of {args.items:,} queued items, chunks of {args.chunk:,}; medians of {args.repeats}")
        for name, rows in found.items():
            seconds, longest, typical = (median([r[i] for r in rows]) for i in range(3))
            print(f"{name}: cancel {seconds:.2f} s, a claim meanwhile waits at most {longest * 1e3:,.0f} ms "
                  f"(median claim {typical * 1e3:.1f} ms)")
        old, new = (median([r[1] for r in found[n]]) for n in variants)
        print(f"longest claim: x{old / new:.0f} shorter")
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
