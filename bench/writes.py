"""Result writes: imgq's one-statement batch write vs the earlier three-statement version, side
by side in one run on the embedded Postgres.

    .venv/bin/python -m bench.writes [--rows 8192] [--repeats 5]

The baseline is the previous ``Store.write_captions`` (images upsert, captions upsert, items
update: three statements and five round trips per batch), kept here only as a reference point.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from sqlalchemy import text

from bench.common import Services, median
from imgq.db.store import CaptionRow, ObjectInfo, Store

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


def three_statements(store: Store, rows: list[CaptionRow]) -> None:
    with store.engine.begin() as conn:
        ids = {(s, b, k, v): i for i, s, b, k, v in conn.execute(_IMAGES, {
            "source": [r.obj.source for r in rows], "bucket": [r.obj.bucket for r in rows],
            "key": [r.obj.key for r in rows], "version": [r.obj.version for r in rows],
            "bytes": [r.obj.bytes for r in rows], "width": [r.obj.width for r in rows],
            "height": [r.obj.height for r in rows]})}
        image = [ids[(r.obj.source, r.obj.bucket, r.obj.key, r.obj.version)] for r in rows]
        caps = dict((img, cid) for cid, img in conn.execute(_CAPTIONS, {
            "image_id": image, "model": [r.model for r in rows], "rev": [r.model_revision for r in rows],
            "phash": [r.params_hash for r in rows], "params": [json.dumps(r.params) for r in rows],
            "txt": [r.text for r in rows]}))
        conn.execute(_ITEMS, {"job": [r.job for r in rows], "seq": [r.seq for r in rows], "image_id": image,
                              "caption_id": [caps[i] for i in image], "worker": [r.worker for r in rows]})


def rows_for(store: Store, n: int, tag: str) -> list[CaptionRow]:
    refs = [f"s3://b/{tag}/{i}.jpg" for i in range(n)]
    job = store.create_job(kind="caption", model="m", params={}, params_hash="h", refs=refs)
    return [CaptionRow(job, i, ObjectInfo("s3", "b", f"{tag}/{i}.jpg", "v1", 1000, 640, 480), "m", "r", "h", {},
                       f"a caption number {i}", "w") for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    svc = Services.start()
    try:
        store = Store.from_url(svc.database_url)
        variants: dict[str, Any] = {"one statement (imgq)": Store.write_captions,
                                    "three statements (before)": three_statements}
        for batch in (32, 512):
            res: dict[str, list[float]] = {name: [] for name in variants}
            for rep in range(args.repeats):
                for name, write in variants.items():
                    rows = rows_for(store, args.rows, f"{batch}-{rep}-{uuid.uuid4().hex[:6]}")
                    t = time.perf_counter()
                    for start in range(0, len(rows), batch):
                        write(store, rows[start : start + batch])
                    res[name].append(len(rows) / (time.perf_counter() - t))
            base = median(res["three statements (before)"])
            for name, values in res.items():
                print(f"batch {batch:>4}  {name:28s} {median(values):>9,.0f} rows/s  "
                      f"x{median(values) / base:.2f}  raw {[round(v) for v in values]}")
        with store.engine.connect() as conn:
            states = dict(conn.execute(text("SELECT state, count(*) FROM job_items GROUP BY state")).all())
        print(f"job_items by state after the run (every row must be done): {states}")
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
