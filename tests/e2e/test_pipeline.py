"""The spine, end to end: CLI enqueue -> Redis -> `imgq worker` subprocesses -> Postgres."""

from __future__ import annotations

import csv
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import text

from imgq.db.store import Store
from tests.e2e.helpers import jpeg_bytes, run_cli, wait_finished, workers

pytestmark = pytest.mark.e2e


def test_every_image_captioned_exactly_once(make_settings, bucket, s3_client, image_root: Path,
                                            tiny_model_dir: Path, tmp_path: Path):
    settings = make_settings(allowed_buckets=[bucket])
    sizes = [(640, 480), (480, 640), (320, 200), (1024, 768), (97, 131), (256, 256)]
    s3_refs = [f"s3://{bucket}/photos/{i:04d}.jpg" for i in range(140)]

    def put(i: int) -> None:
        w, h = sizes[i % len(sizes)]
        s3_client.put_object(Bucket=bucket, Key=f"photos/{i:04d}.jpg", Body=jpeg_bytes(w, h, i))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(len(s3_refs))))
    local_refs = []
    for i in range(70):
        w, h = sizes[i % len(sizes)]
        path = image_root / f"local_{i:03d}.{'png' if i % 5 == 0 else 'jpg'}"
        path.write_bytes(jpeg_bytes(w, h, 1000 + i, "PNG" if i % 5 == 0 else "JPEG"))
        local_refs.append(str(path))

    # Three jobs whose messages carry 1, 7 and 16 refs; one is a whole S3 prefix.
    plans = [
        (1, local_refs[:30]),
        (7, local_refs[30:] + s3_refs[:40]),
        (16, [f"s3://{bucket}/photos/"]),
    ]
    jobs = []
    for per_message, refs in plans:
        listing = tmp_path / f"refs_{per_message}.txt"
        listing.write_text("\n".join(refs) + "\n")
        out = run_cli(settings, "enqueue", "caption", "--from-file", str(listing),
                      "--refs-per-message", str(per_message), "--max-new-tokens", "8")
        assert out.returncode == 0, out.stderr
        jobs.append(out.stdout.strip())
    expected_total = 30 + 80 + 140

    store = Store.from_url(settings.database_url)
    with workers(settings, tiny_model_dir, tmp_path, 2) as procs:
        totals = wait_finished(store, jobs, timeout=240, procs=procs, log_dir=tmp_path)
    assert totals == {"queued": 0, "running": 0, "done": expected_total, "dead": 0}
    for proc in procs:
        assert proc.returncode == 0, "SIGTERM must shut a worker down cleanly"

    with store.engine.connect() as conn:
        # Every item has exactly one caption, for the object its ref names.
        mismatched = conn.execute(text("""
            SELECT i.ref FROM job_items i JOIN images im ON im.id = i.image_id
            WHERE i.ref <> CASE im.source WHEN 's3' THEN 's3://' || im.bucket || '/' || im.key ELSE im.key END
        """)).all()
        assert mismatched == []
        assert conn.execute(text("SELECT count(*) FROM job_items WHERE caption_id IS NULL")).scalar_one() == 0
        # Objects submitted twice (job 2's S3 refs reappear under the prefix) share one caption.
        assert conn.execute(text("SELECT count(*) FROM images")).scalar_one() == 70 + 140
        assert conn.execute(text("SELECT count(*) FROM captions")).scalar_one() == 70 + 140
        widths = dict(conn.execute(text("SELECT key, width FROM images WHERE source = 'local'")).all())
        assert widths[local_refs[4]] == 97

    out = run_cli(settings, "results", jobs[1], "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 80 and all(r["state"] == "done" and r["caption"] for r in rows)
    status = run_cli(settings, "status", jobs[2], "--json")
    assert json.loads(status.stdout) == {"job": jobs[2], "queued": 0, "running": 0, "done": 140, "dead": 0,
                                          "purged": 0, "waiting": 0}
    store.engine.dispose()
