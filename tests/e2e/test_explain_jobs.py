"""`imgq enqueue caption --explain` end to end: a real `imgq worker`, overlays in
IMGQ_EXPLAIN_OUTPUT, the summary in Postgres, `imgq results --explain`, `imgq check`."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import text

from imgq.db.store import Store
from tests.e2e.helpers import check_job, jpeg_bytes, run_cli, wait_finished, workers

pytestmark = pytest.mark.e2e


def test_an_explained_job_matches_the_plain_captions_and_lists_its_overlays(
    make_settings, image_root: Path, tiny_model_dir: Path, tmp_path: Path
):
    out_dir = tmp_path / "explained"
    settings = make_settings(explain_output=str(out_dir))
    folder = image_root / "explain"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(640, 360, 900 + i))
    args = ("--max-new-tokens", "5", "--resize", "letterbox")
    explained = run_cli(settings, "enqueue", "caption", str(folder), *args, "--explain")
    plain = run_cli(settings, "enqueue", "caption", str(folder), *args)
    assert explained.returncode == 0 and plain.returncode == 0, explained.stderr + plain.stderr
    jobs = [explained.stdout.strip(), plain.stdout.strip()]
    store = Store.from_url(settings.database_url)
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
        totals = wait_finished(store, [uuid.UUID(j) for j in jobs], timeout=120, procs=procs, log_dir=tmp_path)
    assert totals == {"queued": 0, "running": 0, "done": 10, "dead": 0}
    for job in jobs:
        check_job(settings, job)

    rows = {j: [json.loads(line) for line in run_cli(settings, "results", j).stdout.splitlines()] for j in jobs}
    assert [r["caption"] for r in rows[jobs[0]]] == [r["caption"] for r in rows[jobs[1]]]
    with store.engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM caption_explanations")).scalar_one()
        distinct = conn.execute(text("SELECT count(DISTINCT params_hash) FROM captions")).scalar_one()
    store.engine.dispose()
    assert n == 5 and distinct == 2  # explained captions are their own rows; plain ones have no summary

    listed = [json.loads(line) for line in run_cli(settings, "results", jobs[0], "--explain").stdout.splitlines()]
    assert len(listed) == 5
    for item in listed:
        overlays = Path(item["overlays"])
        assert overlays.is_relative_to(out_dir)
        doc = json.loads((overlays / "explain.json").read_text())
        assert doc["caption"] == item["caption"] and doc["input"]["resize"] == "letterbox"
        assert [w["text"] for w in doc["words"]] == [w["text"] for w in item["words"]]
        with Image.open(overlays / "contact_sheet.png") as sheet:
            sheet.load()
    none = [json.loads(line) for line in run_cli(settings, "results", jobs[1], "--explain").stdout.splitlines()]
    assert all(r["overlays"] is None and r["words"] is None for r in none)
