"""Caption result writes: imgq's ``Store.write_done`` vs the write paths it replaced, side by side
in one run on the embedded Postgres (same tables, same rows, variants alternated in every repeat).

    .venv/bin/python -m bench.writes [--rows 8192] [--repeats 5]

Variants, each one transaction per call:

* ``write_done`` (imgq now): ``Store.write_done`` (``db/store.py``): the same three statements as
  the next, with the items' state guard written so the planner cannot match it to a partial index
  on state (``PENDING``; written against ``job_items_pending``, which migration 0009 dropped), and
  its array parameters sent in binary (``db/arrays.py``). One writer.
* ``write_done, 2 writers`` (the worker's default, ``IMGQ_RESULT_WRITERS=2``): the same write from
  two threads on their own connections, each taking the next batch from one queue as the
  engine's writers do.
* ``write_done, text arrays``: ``Store.write_done`` on an engine without ``db.arrays.register``,
  so psycopg sends every array parameter as a text literal, as before binary arrays. One writer.
* ``write_done before the guard``: the write_done of job kinds, kept here verbatim: the images
  upsert, one caption statement per (model, revision, params) group (captions upsert), and the
  finishing UPDATE of the items with ``state IN ('queued', 'running')``, parameters as arrays:
  three statements. The ratio's baseline.
* ``one CTE (before kinds)``: the previous ``Store.write_captions``, one data-modifying CTE per
  group (images -> captions -> items), kept here verbatim as the baseline the refactor replaced.
* ``three statements (older)``: the ``write_captions`` before that one (images, captions, items
  as separate statements), the baseline of the earlier W figures.
* ``write_done, unprepared``: ``Store.write_done`` itself on a connection with psycopg's automatic
  prepared statements off (``prepare_threshold=None``), so Postgres plans every call for its own
  parameters instead of reusing a generic plan after the fifth. Diagnostic, not a deployment:
  the worker's store uses psycopg's default (prepare from the fifth execution).
* ``write_done, links with keys (before 0010)``: ``Store.write_done`` itself, on ``job_items`` with
  the foreign keys of its result links put back (:data:`SETUP`), as before migration 0010: the
  finishing UPDATE then checks each link it sets.
``--variants`` picks some of them (default: all); ``--baseline`` the one the ratios divide by.
``--stale-stats N`` times each variant's first writes into a new job of N items when ``job_items``
was analysed while the queue was drained (autovacuum is paused on ``job_items`` for that part, then
reset). Until migration 0009 the statistics then said the partial index ``job_items_pending`` was
nearly empty, and the job-kinds ``write_done``'s caption statement and its finishing UPDATE (the
``before`` variant's guard) were planned over that index, reading every pending item of the table
on each call; the opaque guard found its items by primary key. Migration 0009 dropped that index
and this option does not recreate it, so on today's schema it no longer sets up that state:
docs/performance.md's stale-statistics tables (W2, W3) are historical.

Every run starts with a new database cluster (``--reuse-db`` keeps the last one: a cluster that
earlier runs filled made 32-row commits 4-7x slower here), and every variant's run starts from
emptied tables (TRUNCATE), ``--history N`` finished items of an earlier job, then one job of
``--rows`` queued items (with ``--history``, job_items is then analysed).
Client CPU (every thread of the bench) as a share of wall time is printed too: the rest is round trips and the server.
"""

from __future__ import annotations

import argparse
import json
import queue
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.common import ITEM_LINKS, WORK, Services, bench_task, caption_done, create_job, median
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

# Store.write_done before the opaque state guard (db/store.py _UPSERT_IMAGES, db/results/caption.py _WRITE
# and finish_sql(("caption_id",)) of 2026-11-27), verbatim but for line breaks.
_BEFORE_IMAGES = text("""
INSERT INTO images (source, bucket, key, version, bytes, width, height)
SELECT DISTINCT ON (source, bucket, key, version) source, bucket, key, version, bytes, width, height
FROM unnest(CAST(:source AS text[]), CAST(:bucket AS text[]), CAST(:key AS text[]), CAST(:version AS text[]),
            CAST(:bytes AS bigint[]), CAST(:width AS int[]), CAST(:height AS int[]))
     AS v(source, bucket, key, version, bytes, width, height)
ORDER BY source, bucket, key, version
ON CONFLICT ON CONSTRAINT images_object_version DO UPDATE SET bytes = EXCLUDED.bytes
RETURNING id, source, bucket, key, version
""")
_BEFORE_CAPTIONS = text("""
INSERT INTO captions (image_id, model, model_revision, params_hash, params, text)
SELECT DISTINCT ON (image_id) image_id, :model, :rev, :phash, CAST(:params AS jsonb), txt
FROM unnest(CAST(:image_id AS bigint[]), CAST(:txt AS text[])) WITH ORDINALITY AS v(image_id, txt, n)
ORDER BY image_id, n
ON CONFLICT ON CONSTRAINT captions_identity DO UPDATE SET text = captions.text
RETURNING image_id, id
""")
_BEFORE_FINISH = text("""
UPDATE job_items AS j SET state = 'done', image_id = v.image_id, worker = v.worker, updated_at = now(),
  caption_id = v.caption_id
FROM unnest(CAST(:job AS uuid[]), CAST(:seq AS int[]), CAST(:image_id AS bigint[]), CAST(:worker AS text[]),
  CAST(:caption_id AS bigint[]))
     AS v(job_id, seq, image_id, worker, caption_id)
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


def write_done_before_guard(store: Store, items: Sequence[DoneItem]) -> None:
    """``Store.write_done`` for caption items before the opaque guard (its loop over kinds, for one kind)."""
    with store.engine.begin() as conn:
        objs = [item.obj for item in items]
        ids = {
            (src, bucket, key, version): image_id
            for image_id, src, bucket, key, version in conn.execute(_BEFORE_IMAGES, {
                "source": [o.source for o in objs], "bucket": [o.bucket for o in objs],
                "key": [o.key for o in objs], "version": [o.version for o in objs],
                "bytes": [o.bytes for o in objs], "width": [o.width for o in objs],
                "height": [o.height for o in objs],
            })
        }
        image_of = [ids[(o.source, o.bucket, o.key, o.version)] for o in objs]
        groups: dict[tuple[str, str, str], list[tuple[DoneItem, int]]] = {}
        for item, image_id in zip(items, image_of, strict=True):
            model, rev, phash, _, _ = _caption(item)
            groups.setdefault((model, rev, phash), []).append((item, image_id))
        caption_of: dict[tuple[uuid.UUID, int], int] = {}
        for (model, rev, phash), group in groups.items():
            by_image = dict(conn.execute(_BEFORE_CAPTIONS, {
                "image_id": [image_id for _, image_id in group], "txt": [str(_caption(r)[4]) for r, _ in group],
                "model": model, "rev": rev, "phash": phash, "params": json.dumps(_caption(group[0][0])[3]),
            }).all())
            caption_of.update({(r.job, r.seq): by_image[image_id] for r, image_id in group})
        conn.execute(_BEFORE_FINISH, {
            "job": [i.job for i in items], "seq": [i.seq for i in items], "image_id": image_of,
            "worker": [i.worker for i in items], "caption_id": [caption_of.get((i.job, i.seq)) for i in items],
        })


# Stores on other engines of the bench's database, one per (purpose, url), made on first use.
_SIDE: dict[tuple[str, str], Store] = {}


def _side_store(store: Store, purpose: str, make: Callable[[str], Store]) -> Store:
    url = store.engine.url.render_as_string(hide_password=False)
    if (purpose, url) not in _SIDE:
        _SIDE[(purpose, url)] = make(url)
    return _SIDE[(purpose, url)]


def write_done_text_arrays(store: Store, items: Sequence[DoneItem]) -> None:
    # create_engine, not make_engine: no binary dumper for db.arrays.Binary, so it goes as a list.
    _side_store(store, "text", lambda url: Store(create_engine(url, pool_pre_ping=True))).write_done(items)


def write_done_unprepared(store: Store, items: Sequence[DoneItem]) -> None:
    _side_store(store, "unprepared",
                lambda url: Store.from_url(url, connect_args={"prepare_threshold": None})).write_done(items)


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


def in_parallel(store: Store, batches: list[Sequence[DoneItem]], writers: int) -> None:
    """``batches`` written by ``writers`` threads that each take the next one from a shared queue."""
    todo: queue.SimpleQueue[Sequence[DoneItem]] = queue.SimpleQueue()
    for batch in batches:
        todo.put(batch)
    errors: list[BaseException] = []

    def drain() -> None:
        try:
            while True:
                try:
                    batch = todo.get_nowait()
                except queue.Empty:
                    return
                store.write_done(batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drain) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


VARIANTS: dict[str, Callable[[Store, Sequence[DoneItem]], None]] = {
    "write_done (imgq now)": write_done,
    "write_done, 2 writers": write_done,
    "write_done, text arrays": write_done_text_arrays,
    "write_done before the guard": write_done_before_guard,
    "one CTE (before kinds)": one_cte,
    "three statements (older)": three_statements,
    "write_done, unprepared": write_done_unprepared,
    "write_done, links with keys (before 0010)": write_done,
}


def _link_keys(add: bool) -> Any:
    def apply(store: Store) -> None:
        with store.engine.begin() as conn:
            for column, table in ITEM_LINKS.items():
                conn.execute(text(
                    f"ALTER TABLE job_items ADD CONSTRAINT job_items_{column}_fkey FOREIGN KEY ({column}) "
                    f"REFERENCES {table} (id)" if add else
                    f"ALTER TABLE job_items DROP CONSTRAINT job_items_{column}_fkey"))
    return apply


# What a variant's schema differs in: set up before its timed writes, undone after them.
SETUP = {"write_done, links with keys (before 0010)": (_link_keys(True), _link_keys(False))}
# Variants whose batches are written by several threads at once (the rest: one call after another).
WRITERS = {"write_done, 2 writers": 2}
# Names for --variants and --baseline.
SHORT = dict(zip(["now", "two", "text", "before", "cte", "three", "unprepared", "keys"], VARIANTS, strict=True))


def items_for(store: Store, n: int, tag: str) -> list[DoneItem]:
    """A fresh job of ``n`` queued items and a caption result for each, on objects never seen."""
    task = bench_task("caption", "m")
    refs = [f"s3://b/{tag}/{i}.jpg" for i in range(n)]
    job = create_job(store, [task], refs)
    return [caption_done(job, i, ObjectInfo("s3", "b", f"{tag}/{i}.jpg", "v1", 1000, 640, 480), task,
                         f"a caption number {i}", worker="w") for i in range(n)]


def add_history(store: Store, n: int) -> None:
    """``n`` items of an earlier, finished job: a deployed job_items holds every job so far, so the
    planner weighs a batch against a big table (the caller analyses it, as autovacuum would have)."""
    if n <= 0:
        return
    job = uuid.uuid4()
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, kind, model, params, params_hash, total) "
                          "VALUES (:job, 'caption', 'm', '{}', 'h', :n)"), {"job": job, "n": n})
        conn.execute(text("INSERT INTO job_items (job_id, seq, ref, state, worker) "
                          "SELECT :job, g, 's3://b/old/' || g, 'done', 'history' FROM generate_series(0, :n - 1) g"),
                     {"job": job, "n": n})


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
    ap.add_argument("--variants", nargs="+", choices=list(SHORT), default=list(SHORT),
                    help="which variants to run (the baseline always runs)")
    ap.add_argument("--baseline", choices=list(SHORT), default="before",
                    help="the variant the ratios divide by")
    ap.add_argument("--home", type=Path, default=WORK / "writes",
                    help="where the servers keep their files (one per concurrent bench)")
    ap.add_argument("--history", type=int, default=0, metavar="N",
                    help="N finished items of an earlier job in job_items under every variant's run "
                    "(0 = only the job being written)")
    ap.add_argument("--reuse-db", action="store_true",
                    help="keep the database cluster of earlier runs (default: a new one for every run)")
    args = ap.parse_args()
    print(f"# python -m bench.writes {shlex.join(sys.argv[1:])}")
    baseline = SHORT[args.baseline]
    chosen = {SHORT[k] for k in args.variants} | {baseline}
    for name in list(VARIANTS):
        if name not in chosen:
            del VARIANTS[name]
    svc = Services.start(fresh=not args.reuse_db, home=args.home)
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
                    add_history(store, args.history)
                    items = items_for(store, args.rows, f"{batch}-{rep}-{uuid.uuid4().hex[:6]}")
                    if args.history:
                        with store.engine.begin() as conn:
                            conn.execute(text("ANALYZE job_items"))
                    setup, undo = SETUP.get(name, (None, None))
                    if setup is not None:
                        setup(store)
                    c = time.process_time()
                    t = time.perf_counter()
                    batches = [items[start : start + batch] for start in range(0, len(items), batch)]
                    if name in WRITERS:
                        in_parallel(store, batches, WRITERS[name])
                    else:
                        for part in batches:
                            VARIANTS[name](store, part)
                    dt = time.perf_counter() - t
                    if undo is not None:
                        undo(store)
                    res[name].append(len(items) / dt)
                    client[name].append((time.process_time() - c) / dt)
            base = median(res[baseline])
            for name, values in res.items():
                paired = median([v / b for v, b in zip(values, res[baseline], strict=True)])
                print(f"batch {batch:>4}  {name:30s} {median(values):>9,.0f} rows/s  x{median(values) / base:.2f} "
                      f"of {baseline} (paired x{paired:.2f}); client CPU {100 * median(client[name]):.0f}% "
                      f"of wall; raw {[round(v) for v in values]}")
        if args.stale_stats:
            stale_stats(store, args.stale_stats, args.batches)
        with store.engine.connect() as conn:
            # The --history rows are done without a caption by construction: left out.
            states = dict(conn.execute(text("SELECT state, count(*) FROM job_items WHERE state <> 'queued' "
                                            "AND worker IS DISTINCT FROM 'history' GROUP BY state")).all())
            linked = conn.execute(text("SELECT count(*) FROM job_items WHERE state = 'done' AND caption_id IS NULL "
                                       "AND worker IS DISTINCT FROM 'history'")).scalar_one()
        print(f"job_items written by the run, by state (every one must be done): {states}; "
              f"items without a caption: {linked}")
        svc.truncate(store)
        store.engine.dispose()
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
