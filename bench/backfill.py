"""`imgq backfill` listing + enqueue over a large moto bucket, beside moto's own raw listing rate.

moto takes ~150 PUT/s over HTTP, so 50,000 objects would take minutes to upload. Instead a child
process runs moto's ThreadedMotoServer and fills its in-memory backend directly
(``S3Backend.put_object``, 0-byte-ish bodies), then serves it over HTTP on loopback; this process
lists it over HTTP as a client of real S3 would. Postgres is the embedded one (bench/common.py).

Measured, each as the median of ``--repeats`` runs, objects per second of wall time:

- raw listing: ``list_objects_v2`` pages of 1,000, nothing else (the ceiling moto allows);
- first run: list, apply the skip rule, commit every page (items appended to one job, objects
  recorded, cursor advanced) — the backfill tables and jobs are truncated before each repeat;
- second run: the same listing with every object skipped by ``backfill_objects``;
- dry run: list and decide on a fresh database, writing nothing;
- replayed first run: the first run with the listing pages replayed from memory (captured from
  moto once), so only imgq's own work is timed: the skip rule and the page commits.

    .venv/bin/python -m bench.backfill [--objects 50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from typing import Any

from bench.common import Services, median

BUCKET = "bench-backfill"
PREFIX = "photos/"


def _serve(port: int, n: int, ready: Any) -> None:
    """Child process: moto over HTTP, its backend filled directly."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    backend.create_bucket(BUCKET, "us-east-1")
    t = time.perf_counter()
    for i in range(n):
        backend.put_object(BUCKET, f"{PREFIX}{i // 1000:04d}/{i:08d}.jpg", b"%d" % i)
    ready.send(time.perf_counter() - t)
    ready.recv()  # until the parent is done
    server.stop()


def _raw_listing(client: Any) -> int:
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX,
                                                                  PaginationConfig={"PageSize": 1000}):
        count += len(page.get("Contents", []))
    return count


class Replay:
    """An S3 client whose ``list_objects_v2`` pages were captured from a real listing."""

    def __init__(self, pages: list[dict[str, Any]]) -> None:
        self.pages = pages

    def get_bucket_versioning(self, **_: Any) -> dict[str, Any]:
        return {}

    def get_paginator(self, _: str) -> Replay:
        return self

    def paginate(self, **kwargs: Any) -> Any:
        after = kwargs.get("StartAfter") or ""
        return ([{"Contents": [o for o in page["Contents"] if o["Key"] > after]} for page in self.pages
                 if page["Contents"][-1]["Key"] > after])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import os

    import boto3
    from sqlalchemy import text

    from imgq.embedded import free_port
    from imgq.producer.backfill import define, run_backfill

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(name, value)
    port = free_port()
    parent, child = multiprocessing.get_context("spawn").Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, args.objects, child), daemon=True)
    proc.start()
    svc = Services.start()
    try:
        fill_s = parent.recv()
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        settings = svc.settings(allowed_buckets=[BUCKET], s3_endpoint_url=f"http://127.0.0.1:{port}")
        from imgq.db.store import make_engine

        engine = make_engine(settings.sync_database_url)

        def truncate() -> None:
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE backfill_objects, backfills, job_items, jobs CASCADE"))

        definition, bucket, prefix = define(settings, name="bench", source=f"s3://{BUCKET}/{PREFIX}",
                                            kinds="caption,embed", params={})

        def backfill(dry_run: bool = False, s3: Any = None) -> tuple[float, int, int]:
            t = time.perf_counter()
            report = run_backfill(engine=engine, s3_client=s3 or client, settings=settings, definition=definition,
                                  bucket=bucket, prefix=prefix, dry_run=dry_run)
            return time.perf_counter() - t, report.progress.listed, report.progress.enqueued

        # Warm-up (moto's first listing of a bucket is slower), captured for the replayed runs.
        replay = Replay(list(client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=PREFIX, PaginationConfig={"PageSize": 1000})))
        rates: dict[str, list[float]] = {"raw listing": [], "first run": [], "second run": [], "dry run": [],
                                         "replayed first run": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            assert _raw_listing(client) == args.objects
            rates["raw listing"].append(args.objects / (time.perf_counter() - t))
            truncate()
            seconds, listed, _ = backfill(dry_run=True)
            assert listed == args.objects
            rates["dry run"].append(listed / seconds)
            seconds, listed, enqueued = backfill()
            assert listed == enqueued == args.objects, (listed, enqueued)
            rates["first run"].append(listed / seconds)
            seconds, listed, enqueued = backfill()
            assert (listed, enqueued) == (args.objects, 0)
            rates["second run"].append(listed / seconds)
            truncate()
            seconds, listed, enqueued = backfill(s3=replay)
            assert listed == enqueued == args.objects, (listed, enqueued)
            rates["replayed first run"].append(listed / seconds)
        truncate()
        engine.dispose()
        print(f"# {' '.join(sys.argv)}")
        print(f"filled moto's backend with {args.objects:,} objects in {fill_s:.1f}s "
              f"({args.objects / fill_s:,.0f} objects/s, in-process, no HTTP)")
        for label, values in rates.items():
            print(f"{label:<18} {args.objects:>7,} objects: {median(values):>8,.0f} objects/s  "
                  f"raw {[round(v) for v in values]}")
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
