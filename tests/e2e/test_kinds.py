"""Job kinds end to end: `imgq enqueue caption,embed | embed | validate` -> `imgq worker` -> Postgres,
`imgq search`, `imgq check` for every kind, and a model the worker does not serve."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from imgq.db.store import Store
from tests.e2e.helpers import check_job, jpeg_bytes, run_cli, wait_finished, workers
from tests.fixtures.faulty_s3 import FaultyS3

pytestmark = pytest.mark.e2e


def _near_duplicate(data: bytes) -> bytes:
    """The same picture re-encoded at another JPEG quality and 2 % brighter."""
    image = Image.open(io.BytesIO(data)).convert("RGB").point(lambda v: min(255, int(v * 1.02)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=70)
    return out.getvalue()


def test_caption_and_embed_fetch_each_image_once_then_search_finds_the_near_duplicate(
    make_settings, bucket, s3_client, s3_server, image_root: Path, tiny_model_dir: Path, tmp_path: Path
):
    with FaultyS3(s3_server.url) as proxy:  # no rules: it only counts the HTTP requests per key
        settings = make_settings(allowed_buckets=[bucket], s3_endpoint_url=proxy.url, kinds=["caption", "embed"])
        originals = {i: jpeg_bytes(640, 480, 500 + i) for i in range(12)}
        for i, data in originals.items():
            s3_client.put_object(Bucket=bucket, Key=f"p/{i:02d}.jpg", Body=data)
        twin = image_root / "twin_of_03.jpg"
        twin.write_bytes(_near_duplicate(originals[3]))
        refs = [f"s3://{bucket}/p/{i:02d}.jpg" for i in originals] + [str(twin)]
        out = run_cli(settings, "enqueue", "caption,embed", *refs, "--max-new-tokens", "6")
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip()
        store = Store.from_url(settings.database_url)
        with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
            totals = wait_finished(store, [uuid.UUID(job)], timeout=120, procs=procs, log_dir=tmp_path)
        assert totals == {"queued": 0, "running": 0, "done": 13, "dead": 0}
        gets = {key: n for key, n in proxy.hits.items() if key.startswith(f"{bucket}/p/")}
        assert gets == {f"{bucket}/p/{i:02d}.jpg": 1 for i in originals}, "one GET per image for both kinds"

    check_job(settings, job)
    rows = [json.loads(line) for line in run_cli(settings, "results", job).stdout.splitlines()]
    assert all(r["caption"] and r["embedding_dim"] == 256 for r in rows)
    with store.engine.connect() as conn:
        norms = conn.execute(text("SELECT vector_norm(embedding) FROM embeddings")).scalars().all()
        links = conn.execute(text("SELECT count(*) FROM job_items WHERE caption_id IS NOT NULL "
                                  "AND embedding_id IS NOT NULL")).scalar_one()
    store.engine.dispose()
    assert len(norms) == 13 and np.allclose(norms, 1.0, atol=1e-5)
    assert links == 13

    # The planted near-duplicate is the top hit for its original, from the stored embedding.
    out = run_cli(settings, "search", "--image", f"s3://{bucket}/p/03.jpg", "--limit", "5", "--json")
    assert out.returncode == 0, out.stderr
    hits = [json.loads(line) for line in out.stdout.splitlines()]
    assert hits[0]["ref"] == str(twin) and len(hits) == 5
    assert hits[0]["caption"], "hits carry the image's caption"
    # Filters: a prefix that only the S3 objects match still fills the limit.
    out = run_cli(settings, "search", "--image", str(twin), "--limit", "4", "--bucket", bucket, "--prefix", "p/",
                  "--json")
    hits = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 0 and len(hits) == 4
    assert hits[0]["ref"] == f"s3://{bucket}/p/03.jpg" and all(h["ref"].startswith(f"s3://{bucket}/p/") for h in hits)
    # A text query is encoded by the same model and returns ranked rows.
    out = run_cli(settings, "search", "a dog on a beach", "--limit", "3", "--json")
    assert out.returncode == 0, out.stderr
    sims = [json.loads(line)["similarity"] for line in out.stdout.splitlines()]
    assert len(sims) == 3 and sims == sorted(sims, reverse=True)
    # Filters that leave nothing say so (exit 0, nothing on stdout), instead of printing nothing at all.
    out = run_cli(settings, "search", "a dog", "--bucket", bucket, "--prefix", "nowhere/")
    assert out.returncode == 0 and out.stdout == "", out.stderr
    assert out.stderr.strip().startswith("no hits: no image embedded by ")
    assert f"in bucket {bucket!r} and under prefix 'nowhere/' was found (" in out.stderr, out.stderr
    # Clear errors, exit 2.
    out = run_cli(settings, "search", "   ")
    assert out.returncode == 2 and "error[empty_query]" in out.stderr
    out = run_cli(settings, "search", "a dog", "--model", str(tiny_model_dir))  # a model with no embeddings
    assert out.returncode != 0 and "error[" in out.stderr


def test_validate_scores_pairs_and_refuses_bad_rows(make_settings, image_root: Path, tiny_model_dir: Path,
                                                   tmp_path: Path):
    settings = make_settings(kinds=["validate"])
    paths = []
    for i in range(4):
        path = image_root / f"v{i}.jpg"
        path.write_bytes(jpeg_bytes(320, 240, 900 + i))
        paths.append(path)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"ref,text\n{paths[0]},a dog\n{paths[1]},\n")
    out = run_cli(settings, "enqueue", "validate", "--pairs", str(bad))
    assert out.returncode == 2 and "error[bad_pairs]: row 3: empty text" in out.stderr
    bad.write_text(f"path,alt\n{paths[0]},a dog\n")
    out = run_cli(settings, "enqueue", "validate", "--pairs", str(bad))
    assert out.returncode == 2 and "row 1" in out.stderr and "ref and text" in out.stderr

    pairs = tmp_path / "pairs.csv"
    too_long = " ".join(["zyxwvut"] * 120)  # few words, but each is several word pieces: > 512 tokens
    pairs.write_text("ref,text\n" + "".join(f'{p},"a photo, number {i}"\n' for i, p in enumerate(paths))
                     + f"{paths[0]},{too_long}\n")
    out = run_cli(settings, "enqueue", "validate", "--pairs", str(pairs))
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    store = Store.from_url(settings.database_url)
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
        totals = wait_finished(store, [uuid.UUID(job)], timeout=120, procs=procs, log_dir=tmp_path)
    store.engine.dispose()
    assert totals == {"queued": 0, "running": 0, "done": 4, "dead": 1}
    check_job(settings, job)
    rows = [json.loads(line) for line in run_cli(settings, "results", job).stdout.splitlines()]
    done = [r for r in rows if r["state"] == "done"]
    assert [r["text"] for r in done] == [f"a photo, number {i}" for i in range(4)]
    assert all(0.0 <= r["itm_score"] <= 1.0 and -1.0 <= r["cosine"] <= 1.0 for r in done)
    [dead] = [r for r in rows if r["state"] == "dead"]
    assert dead["error_code"] == "bad_text" and "512" in dead["error"]


def test_a_model_the_worker_does_not_serve_is_dead_lettered_then_retried(
    make_settings, image_root: Path, tiny_model_dir: Path, tmp_path: Path
):
    settings = make_settings()  # the worker serves caption only
    refs = []
    for i in range(3):
        path = image_root / f"w{i}.jpg"
        path.write_bytes(jpeg_bytes(200, 150, 40 + i))
        refs.append(str(path))
    out = run_cli(settings, "enqueue", "embed", *refs)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    store = Store.from_url(settings.database_url)
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
        totals = wait_finished(store, [uuid.UUID(job)], timeout=60, procs=procs, log_dir=tmp_path)
    assert totals["dead"] == 3
    check_job(settings, job)  # dead letters account for every item
    listed = run_cli(settings, "dlq", "list", "--job", job).stdout
    assert [line.split()[1] for line in listed.splitlines()[1:]] == ["wrong_model"] * 3 and "IMGQ_KINDS" in listed
    assert "refusing message" in (tmp_path / "worker-w0.log").read_text()

    serving = make_settings(kinds=["embed"])
    with workers(serving, tiny_model_dir, tmp_path, 1) as procs:
        out = run_cli(serving, "dlq", "retry", "--code", "wrong_model")
        assert out.returncode == 0 and "re-queued 3" in out.stdout
        totals = wait_finished(store, [uuid.UUID(job)], timeout=60, procs=procs, log_dir=tmp_path)
    store.engine.dispose()
    assert totals == {"queued": 0, "running": 0, "done": 3, "dead": 0}
    check_job(settings, job)
