"""Caption result writes: imgq's ``Store.write_done`` vs the write paths it replaced, side by side
in one run on the embedded Postgres (same tables, same rows, variants alternated in every repeat).

    .venv/bin/python -m bench.writes [--rows 8192] [--repeats 5]

Variants, each one transaction per call:

* ``write_done`` (imgq now, since job kinds): the images upsert, one caption statement per
  (model, revision, params) group (``db/results/caption.py``: captions upsert + link), and the
  finishing UPDATE of the items: three statements.
* ``one CTE (before kinds)``: the previous ``Store.write_captions``, one data-modifying CTE per
  group (images -> captions -> items), kept here verbatim as the baseline the refactor replaced.
* ``three statements (older)``: the ``write_captions`` before that one (images, captions, items
  as separate statements), the baseline of the earlier W figures.
* ``write_done, unprepared``: ``Store.write_done`` itself on a connection with psycopg's automatic
  prepared statements off (``prepare_threshold=None``), so Postgres plans every call for its own
  parameters instead of reusing a generic plan after the fifth. Diagnostic, not a deployment:
  the worker's store uses psycopg's default (prepare from the fifth execution).
``--stale-stats N`` times each variant's first writes into a new job of N items when ``job_items``
was analysed while the queue was drained, so the statistics say the partial index
``job_items_pending`` is nearly empty (autovacuum is paused on ``job_items`` for that part, then
reset). ``write_done``'s caption statement and its finishing UPDATE are then planned over that
index, and read every pending item of the table on each call.

Every run starts with a new database cluster (``--reuse-db`` keeps the last one: a cluster that
earlier runs filled made 32-row commits 4-7x slower here), and every variant's run starts from
emptied tables (TRUNCATE), then one job of ``--rows`` queued items.
Client thread CPU as a share of wall time is printed too: the rest is round trips and the server.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import text

from bench.common import Services, bench_task, caption_done, create_job, median
from imgq.db.store import Store
from imgq.ports import DoneItem, ObjectInfo

# Store.write_captions before job kinds (db/store.py at commit 53a74d6), verbatim.
_ONE_CTE = text("""
WITH v AS (
  SELECT * FROM unnest(CAST(:job AS uuid[]), CAST(:seq AS int[]), CAST(:source AS text[]),
                       CAST(:bucket AS text[]), CAST(:key AS text[]), CAST(:version AS text[]),
                       CAST(:bytes AS bigint[]), CAST(:width AS int[]), CAST(:height AS int[]),
                       CAST(:txt AS text[]))
         AS v(job_id, seq, source, bucket, key, version, bytes, width, height, txt)
), img AS (
  INSERT INTO images (source, bucket, key, version, bytes, width, height)
  SELECT DISTINCT ON (source, bucket, key, version) source, bucket, key, version, bytes, width, height
  FROM v ORDER BY source, bucket, key, version
  ON CONFLICT ON CONSTRAINT images_object_version DO UPDATE SET bytes = EXCLUDED.bytes
  RETURNING id, source, bucket, key, version
), cap AS (
  INSERT INTO captions (image_id, model, model_revision, params_hash, params, text)
  SELECT DISTINCT ON (img.id) img.id, :model, :rev, :phash, CAST(:params AS jsonb), v.txt
  FROM v JOIN img USING (source, bucket, key, version)
  ORDER BY img.id, v.seq
  ON CONFLICT ON CONSTRAINT captions_identity DO UPDATE SET text = captions.text
  RETURNING id, image_id
)
UPDATE job_items AS j
SET state = 'done', image_id = img.id, caption_id = cap.id, worker = :worker, updated_at = now()
FROM v JOIN img USING (source, bucket, key, version) JOIN cap ON cap.image_id = img.id
WHERE j.job_id = v.job_id AND j.seq = v.seq AND j.state IN ('queued', 'running')
""")

# The three-statement write_captions before the CTE.
_IMAGES = text("""
INSERT INTO images (source, bucket, key, version, bytes, width, height)
SELECT * FROM unnest(CAST(:source AS text[]), CAST(:bucket AS text[]), CAST(:key AS text[]),
                     CAST(:version AS text[]), CAST(:bytes AS bigint[]), CAST(:width AS int[]),
                     CAST(:height AS int[]))
ON CONFLICT ON CONSTRAINT images_object_version DO UPDATE SET bytes = EXCLUDED.bytes
RETURNING id, source, bucket, key, version""")
_CAPTIONS = text("""
INSERT INTO captions (image_id, model, model_revision, params_hash, params, text)
SELECT image_id, model, rev, phash, CAST(params AS jsonb), txt
FROM unnest(CAST(:image_id AS bigint[]), CAST(:model AS text[]), CAST(:rev AS text[]),
            CAST(:phash AS text[]), CAST(:params AS text[]), CAST(:txt AS text[]))
     AS v(image_id, model, rev, phash, params, txt)
ON CONFLICT ON CONSTRAINT captions_identity DO UPDATE SET text = captions.text
RETURNING id, image_id""")
_ITEMS = text("""
UPDATE job_items AS j
SET state = 'done', image_id = v.image_id, caption_id = v.caption_id, worker = v.worker, updated_at = now()
FROM unnest(CAST(:job AS uuid[]), CAST(:seq AS int[]), CAST(:image_id AS bigint[]),
            CAST(:caption_id AS bigint[]), CAST(:worker AS text[]))
     AS v(job_id, seq, image_id, caption_id, worker)
WHERE j.job_id = v.job_id AND j.seq = v.seq AND j.state IN ('queued', 'running')""")


def _caption(item: DoneItem) -> tuple[str, str, str, dict[str, Any], str]:
    return item.results["caption"]  # (model, revision, params_hash, params, text)


def write_done(store: Store, items: Sequence[DoneItem]) -> None:
    store.write_done(items)


_UNPREPARED: dict[str, Store] = {}


def write_done_unprepared(store: Store, items: Sequence[DoneItem]) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    if url not in _UNPREPARED:
        _UNPREPARED[url] = Store.from_url(url, connect_args={"prepare_threshold": None})
    _UNPREPARED[url].write_done(items)


def one_cte(store: Store, items: Sequence[DoneItem]) -> None:
    """The old ``write_captions``: one statement per (model, revision, params, worker) group."""
    groups: dict[tuple[str, str, str, str], list[DoneItem]] = {}
    for it in items:
        model, rev, phash, _, _ = _caption(it)
        groups.setdefault((model, rev, phash, it.worker), []).append(it)
    with store.engine.begin() as conn:
        for (model, rev, phash, worker), group in groups.items():
            conn.execute(_ONE_CTE, {
                "job": [r.job for r in group], "seq": [r.seq for r in group],
                "source": [r.obj.source for r in group], "bucket": [r.obj.bucket for r in group],
                "key": [r.obj.key for r in group], "version": [r.obj.version for r in group],
                "bytes": [r.obj.bytes for r in group], "width": [r.obj.width for r in group],
                "height": [r.obj.height for r in group], "txt": [_caption(r)[4] for r in group],
                "model": model, "rev": rev, "phash": phash, "params": json.dumps(_caption(group[0])[3]),
                "worker": worker,
            })


def three_statements(store: Store, items: Sequence[DoneItem]) -> None:
    with store.engine.begin() as conn:
        ids = {(s, b, k, v): i for i, s, b, k, v in conn.execute(_IMAGES, {
            "source": [r.obj.source for r in items], "bucket": [r.obj.bucket for r in items],
            "key": [r.obj.key for r in items], "version": [r.obj.version for r in items],
            "bytes": [r.obj.bytes for r in items], "width": [r.obj.width for r in items],
            "height": [r.obj.height for r in items]})}
        image = [ids[(r.obj.source, r.obj.bucket, r.obj.key, r.obj.version)] for r in items]
        caps = {img: cid for cid, img in conn.execute(_CAPTIONS, {
            "image_id": image, "model": [_caption(r)[0] for r in items], "rev": [_caption(r)[1] for r in items],
            "phash": [_caption(r)[2] for r in items], "params": [json.dumps(_caption(r)[3]) for r in items],
            "txt": [_caption(r)[4] for r in items]})}
        conn.execute(_ITEMS, {"job": [r.job for r in items], "seq": [r.seq for r in items], "image_id": image,
                              "caption_id": [caps[i] for i in image], "worker": [r.worker for r in items]})


VARIANTS: dict[str, Callable[[Store, Sequence[DoneItem]], None]] = {
    "write_done (imgq now)": write_done,
    "one CTE (before kinds)": one_cte,
    "three statements (older)": three_statements,
    "write_done, unprepared": write_done_unprepared,
}
BASELINE = "one CTE (before kinds)"


def items_for(store: Store, n: int, tag: str) -> list[DoneItem]:
    """A fresh job of ``n`` queued items and a caption result for each, on objects never seen."""
    task = bench_task("caption", "m")
    refs = [f"s3://b/{tag}/{i}.jpg" for i in range(n)]
    job = create_job(store, [task], refs)
    return [caption_done(job, i, ObjectInfo("s3", "b", f"{tag}/{i}.jpg", "v1", 1000, 640, 480), task,
                         f"a caption number {i}", worker="w") for i in range(n)]


def stale_stats(store: Store, n: int, batches: list[int], calls: int = 4) -> None:
    """Each variant's first ``calls`` writes per batch size into a fresh job of ``n`` queued items,
    with ``job_items`` analysed beforehand, when every item was settled (run after the main bench)."""
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE job_items SET (autovacuum_enabled = false)"))
    try:
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE job_items"))
        jobs = {name: items_for(store, n, f"stale-{i}-{uuid.uuid4().hex[:6]}") for i, name in enumerate(VARIANTS)}
        for batch in batches:
            for name, write in VARIANTS.items():
                items = jobs[name]
                start = batches.index(batch) * calls * max(batches)
                t = time.perf_counter()
                for k in range(calls):
                    write(store, items[start + k * batch : start + (k + 1) * batch])
                dt = time.perf_counter() - t
                print(f"stale statistics, new job of {n:,} items, batch {batch:>4}  {name:30s} "
                      f"{calls * batch / dt:>9,.0f} rows/s  ({1000 * dt / calls:,.1f} ms per call)")
    finally:
        with store.engine.begin() as conn:
            conn.execute(text("ALTER TABLE job_items RESET (autovacuum_enabled)"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--stale-stats", type=int, default=0, metavar="N",
                    help="also time each variant's first writes into a new job of N items that the "
                    "statistics have not seen (0 = skip)")
    ap.add_argument("--reuse-db", action="store_true",
                    help="keep the database cluster of earlier runs (default: a new one for every run)")
    args = ap.parse_args()
    print(f"# python -m bench.writes {shlex.join(sys.argv[1:])}")
    svc = Services.start(fresh=not args.reuse_db)
    try:
        store = Store.from_url(svc.database_url)
        svc.truncate(store)
        for batch in args.batches:
            res: dict[str, list[float]] = {name: [] for name in VARIANTS}
            client: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for rep in range(args.repeats):
                # Rotate the order too, so no variant always runs first in a repeat.
                names = list(VARIANTS)
                names = names[rep % len(names):] + names[: rep % len(names)]
                for name in names:
                    # The same starting state for every variant: plans over job_items depend on its
                    # statistics and dead tuples, which the earlier variants' writes would change.
                    svc.truncate(store)
                    items = items_for(store, args.rows, f"{batch}-{rep}-{uuid.uuid4().hex[:6]}")
                    c = time.thread_time()
                    t = time.perf_counter()
                    for start in range(0, len(items), batch):
                        VARIANTS[name](store, items[start : start + batch])
                    dt = time.perf_counter() - t
                    res[name].append(len(items) / dt)
                    client[name].append((time.thread_time() - c) / dt)
            base = median(res[BASELINE])
            for name, values in res.items():
                paired = median([v / b for v, b in zip(values, res[BASELINE], strict=True)])
                print(f"batch {batch:>4}  {name:30s} {median(values):>9,.0f} rows/s  x{median(values) / base:.2f} "
                      f"of {BASELINE} (paired x{paired:.2f}); client CPU {100 * median(client[name]):.0f}% "
                      f"of wall; raw {[round(v) for v in values]}")
        if args.stale_stats:
            stale_stats(store, args.stale_stats, args.batches)
        with store.engine.connect() as conn:
            states = dict(conn.execute(text("SELECT state, count(*) FROM job_items WHERE state <> 'queued' "
                                            "GROUP BY state")).all())
            linked = conn.execute(text("SELECT count(*) FROM job_items WHERE state = 'done' AND caption_id IS NULL")
                                  ).scalar_one()
        print(f"job_items written by the run, by state (every one must be done): {states}; "
              f"items without a caption: {linked}")
        svc.truncate(store)
        store.engine.dispose()
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
