"""Where the producer and result-write time goes, and candidate changes measured without editing imgq.

    .venv/bin/python -m bench.optimizations [--refs 100000] [--rows 8192] [--repeats 3]

1. publish: cProfile split of ``publish`` (Celery ``send_task`` per message) and refs/s at 16 vs 64
   refs per message (a setting, IMGQ_REFS_PER_MESSAGE);
2. ``Store.write_done`` of caption results: client-side (Python/SQLAlchemy) vs server time, and
   rows/s when ``job_items`` holds 1M other rows (the deep-queue case): EXPLAIN of the done-UPDATE
   shows the plan.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Any

from bench.common import Services, bench_task, caption_done, create_job, median


def publish_unpipelined(app: Any, messages: Any, *, queue: str) -> int:
    """``imgq.publish.publish`` as it was before 2026-11-27: no ``producer.batch``."""
    from imgq.contract import TASK_NAME

    sent = 0
    with app.producer_or_acquire() as producer:
        for message in messages:
            app.send_task(TASK_NAME, kwargs={"msg": message.to_json()}, queue=queue, producer=producer,
                          argsrepr="()", kwargsrepr=f"{{'msg': <job {message.job}, {len(message.items)} items>}}")
            sent += 1
    return sent


def top(prof: cProfile.Profile, n: int = 14) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(n)
    return "\n".join(line for line in buf.getvalue().splitlines() if line.strip())[-3000:]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", type=int, default=100_000)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--big", type=int, default=1_000_000, help="other job_items rows for the deep-queue write test")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from sqlalchemy import text

    from imgq.celeryconf import make_celery
    from imgq.db.store import Store
    from imgq.ports import ObjectInfo
    from imgq.publish import chunk_messages, publish

    svc = Services.start()
    try:
        settings = svc.settings(queue="bench-opt")
        store = Store.from_url(settings.sync_database_url, pool_size=2)
        app = make_celery(settings)
        rc = svc.redis_client()
        tasks = [bench_task("caption", "m")]
        task = bench_task("caption", "bench")
        refs = [f"/x/ref_{i:07d}.jpg" for i in range(args.refs)]
        items = list(enumerate(refs))
        job = "00000000-0000-0000-0000-000000000001"

        print("== publish: imgq.publish (pipelined, kombu Producer.batch) vs one round trip per message ==")
        for per in (16, 64, 256):
            speeds: dict[str, list[float]] = {"pipelined": [], "per message": []}
            for _ in range(args.repeats):  # alternate, so noise hits both alike
                for variant, fn in (("pipelined", publish), ("per message", publish_unpipelined)):
                    t = time.perf_counter()
                    fn(app, chunk_messages(job=job, tasks=tasks, items=items, per_message=per),
                       queue="bench-opt")
                    speeds[variant].append(args.refs / (time.perf_counter() - t))
                    assert rc.llen("bench-opt") == -(-args.refs // per), "every message must arrive"
                    rc.delete("bench-opt")
            a, b = median(speeds["pipelined"]), median(speeds["per message"])
            print(f"publish refs/s at {per:3d} refs/message: pipelined {a:>10,.0f} ({a / per:,.0f} msg/s), "
                  f"per message {b:>10,.0f} ({b / per:,.0f} msg/s): x{a / b:.2f}")
        prof = cProfile.Profile()
        prof.enable()
        publish(app, chunk_messages(job=job, tasks=tasks, items=items[:32000], per_message=16),
                queue="bench-opt")
        prof.disable()
        rc.delete("bench-opt")
        print(top(prof))

        print("\n== write_done (caption results) ==")

        def rows_for(job_id: Any, n: int, tag: str) -> list[Any]:
            return [caption_done(job_id, i, ObjectInfo("local", "", f"/w/{tag}_{i:07d}.jpg", f"{tag}{i:030x}", 98765,
                                                       640, 480), task,
                                 "a man riding a horse on a beach next to the ocean")
                    for i in range(n)]

        for big in (0, args.big):
            svc.truncate(store)
            if big:
                create_job(store, [task], [f"/big/{i}" for i in range(big)])
                with store.engine.begin() as conn:
                    conn.execute(text("ANALYZE job_items"))
            for batch in (32, 512):
                speeds, client = [], []
                for rep in range(args.repeats):
                    job_id = create_job(store, [task], [f"/w/{i}" for i in range(args.rows)])
                    rows = rows_for(job_id, args.rows, f"b{batch}r{rep}x{big}")
                    c = time.thread_time()
                    t = time.perf_counter()
                    for s in range(0, args.rows, batch):
                        store.write_done(rows[s : s + batch])
                    dt = time.perf_counter() - t
                    speeds.append(args.rows / dt)
                    client.append((time.thread_time() - c) / dt)
                print(f"job_items +{big:>9,} other rows, batch {batch:3d}: {median(speeds):>8,.0f} rows/s; "
                      f"client thread CPU {100 * median(client):.0f}% of wall")
            if big:
                with store.engine.connect() as conn:
                    plan = conn.execute(text(
                        "EXPLAIN UPDATE job_items AS j SET state = 'done' FROM unnest(CAST(:job AS uuid[]), "
                        "CAST(:seq AS int[])) AS v(job_id, seq) WHERE j.job_id = v.job_id AND j.seq = v.seq "
                        "AND j.state IN ('queued', 'running')"),
                        {"job": [job_id] * 32, "seq": list(range(32))}).all()
                print("plan of the done-UPDATE with 32 rows:\n  " + "\n  ".join(r[0] for r in plan))
        prof = cProfile.Profile()
        job_id = create_job(store, [task], [f"/w/{i}" for i in range(2048)])
        rows = rows_for(job_id, 2048, "prof")
        prof.enable()
        for s in range(0, 2048, 32):
            store.write_done(rows[s : s + 32])
        prof.disable()
        print(top(prof))
        store.engine.dispose()
        rc.close()
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
