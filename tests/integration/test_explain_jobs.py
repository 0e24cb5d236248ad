"""Jobs enqueued with --explain: the caption runner on a tiny checkpoint, the overlays in
IMGQ_EXPLAIN_OUTPUT, the per-token summary in a real Postgres, and `imgq results --explain`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import jsonschema
from PIL import Image
from sqlalchemy import text
from typer.testing import CliRunner

from imgq.cli import app
from imgq.config import Settings
from imgq.db.store import DoneItem, ObjectInfo, Store
from imgq.explain import Geometry, unpack
from imgq.params import CaptionParams
from imgq.worker.explainer import explain_batch
from imgq.worker.runners import CaptionRunner

pytestmark = pytest.mark.integration

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "explain.schema.json").read_text())
SIZES = [(600, 150), (200, 300), (320, 320)]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.fixture(scope="module")
def caption_model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return CaptionRunner.make_model(Settings(caption_model=str(tiny_model_dir), device="cpu"))


def test_an_explained_job_stores_its_summary_and_overlays(caption_model, tmp_path, database_url):
    out = tmp_path / "overlays"
    settings = Settings(caption_model=caption_model.name, device="cpu", explain_output=str(out),
                        database_url=database_url)
    runner = CaptionRunner(caption_model)
    runner.configure(settings)
    params = CaptionParams(max_new_tokens=6, resize="letterbox", explain=True)
    plain = CaptionParams(max_new_tokens=6, resize="letterbox")
    assert params.digest() != plain.digest() and "explain" not in plain.canonical()
    images = _images()
    pixels = np.stack([runner.prepare(im, params) for im in images])
    values = runner.run(pixels, None, params)
    # Explained captions are the plain captions, and behave as plain strings.
    assert [str(v) for v in values] == runner.run(pixels, None, plain)

    folders = sorted(p for p in out.glob("*/*") if p.is_dir())
    assert len(folders) == 3
    for v in values:
        folder = Path(v.summary["overlays"])
        doc = json.loads((folder / "explain.json").read_text())
        jsonschema.validate(doc, SCHEMA)
        assert doc["caption"] == str(v)
        for png in folder.glob("*.png"):
            Image.open(io.BytesIO(png.read_bytes())).load()

    store = Store.from_url(database_url)
    task = {"kind": "caption", "model": runner.name, "params": params.canonical(), "params_hash": params.digest()}
    job = store.create_job(tasks=[task], refs=[f"/photos/{i}.png" for i in range(3)])
    done = [DoneItem(job, i, ObjectInfo("local", "", f"/photos/{i}.png", "v1", 100, w, h), "w1",
                     {"caption": (runner.name, runner.revision, params.digest(), params.canonical(), values[i])})
            for i, (w, h) in enumerate(SIZES)]
    store.write_done(done)
    store.write_done(done)  # a redelivery: the first stored explanation stays, no second row
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT c.text, x.* FROM caption_explanations x "
                                 "JOIN captions c ON c.id = x.caption_id ORDER BY c.id")).mappings().all()
    assert len(rows) == 3
    expected = explain_batch(caption_model, pixels, params)
    for row, ex in zip(rows, expected, strict=True):
        assert row["text"] == ex.caption
        assert (row["grid_rows"], row["grid_cols"], row["input_size"]) == (6, 6, 384)
        mapped = [t for t in row["tokens"] if "map" in t]
        assert row["tokens"][0]["role"] == "bos" and "map" not in row["tokens"][0]
        grids = unpack(row["maps"], [t["scale"] for t in mapped], (6, 6))
        want = np.stack([t.grid for t in ex.tokens if t.grid is not None])
        assert np.abs(grids - want).max() <= want.max() / 500
        assert [w["text"] for w in row["words"]] == [w.text for w in ex.words]
        assert row["overlays"] is not None

    result = CliRunner().invoke(app, ["results", str(job), "--explain"], env={"IMGQ_DATABASE_URL": database_url})
    assert result.exit_code == 0, result.output
    listed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seq"] for r in listed] == [0, 1, 2]
    assert [r["overlays"] for r in listed] == [row["overlays"] for row in rows]
    wide = listed[0]
    geometry = Geometry.of("letterbox", 600, 150, 384)
    for word in wide["words"]:
        box = geometry.cell_box(*word["top_patch"], (6, 6))
        assert word["box"] == (list(box) if box is not None else None)
    csv_out = CliRunner().invoke(app, ["results", str(job), "--explain", "--format", "csv"],
                                 env={"IMGQ_DATABASE_URL": database_url})
    assert csv_out.exit_code == 0 and csv_out.stdout.splitlines()[0] == "seq,ref,caption,overlays,words"
    store.engine.dispose()


def test_overlays_never_go_to_a_source_bucket_or_root(tmp_path):
    with pytest.raises(ValueError, match="source bucket"):
        Settings(allowed_buckets="photos,other", explain_output="s3://photos/explained")
    with pytest.raises(ValueError, match="source root"):
        Settings(local_roots=str(tmp_path), explain_output=str(tmp_path / "explained"))
    assert Settings(allowed_buckets="photos", explain_output="s3://results/explained").explain_output


def test_explain_json_of_a_draft_decoded_picture_is_in_the_pictures_own_pixels(caption_model, tmp_path):
    """A worker decodes a large JPEG reduced (IMGQ_DRAFT_DECODE): explain.json's size and boxes are
    still those of the picture, as in Postgres and `imgq explain`."""
    settings = Settings(caption_model=caption_model.name, device="cpu", explain_output=str(tmp_path / "o"))
    runner = CaptionRunner(caption_model)
    runner.configure(settings)
    params = CaptionParams(max_new_tokens=4, resize="letterbox", explain=True)
    reduced = _images()[0]  # 600 x 150: a 1/4 draft decode of a 2400 x 600 picture
    [value] = runner.run(runner.prepare(reduced, params, original=(2400, 600))[None], None, params)
    doc = json.loads((Path(value.summary["overlays"]) / "explain.json").read_text())
    assert (doc["image"]["width"], doc["image"]["height"]) == (2400, 600)
    boxes = [t["top_patch"]["box"] for t in doc["tokens"] if t["top_patch"] and t["top_patch"]["box"]]
    assert boxes and all(b[2] <= 2400 and b[3] <= 600 for b in boxes)
    # Each box spans a whole patch of the 2400-wide picture (the input is 384 wide, 16 patch columns
    # here), not one of the 600-wide draft.
    assert max(b[2] - b[0] for b in boxes) > 600 // 8, "boxes are in the draft's pixels"


def test_results_explain_of_a_job_without_explanations_says_so(database_url):
    """It printed rows of nulls (a caption job enqueued without --explain), or nothing (a validate
    job), and exited 0."""
    from imgq.db.store import Store
    from tests.jobs import caption_task, create_job

    store = Store.from_url(database_url)
    env = {"IMGQ_DATABASE_URL": database_url}
    try:
        plain = create_job(store, [caption_task("m")], ["/d/0.jpg"])
        out = CliRunner().invoke(app, ["results", str(plain), "--explain"], env=env)
        assert out.exit_code == 2 and out.stderr.startswith(
            f"error[bad_request]: job {plain} was not enqueued with --explain, so it has no explanations"), out.output
        explained = create_job(store, [caption_task("m", CaptionParams(explain=True))], ["/d/0.jpg"])
        assert CliRunner().invoke(app, ["results", str(explained), "--explain"], env=env).exit_code == 0
        from imgq.contract import make_task
        from imgq.params import EmbedParams

        embedded = create_job(store, [make_task("embed", "m", EmbedParams())], ["/d/0.jpg"])
        out = CliRunner().invoke(app, ["results", str(embedded), "--explain"], env=env)
        assert out.exit_code == 2 and "has no captions to explain (its kinds: embed)" in out.stderr, out.output
    finally:
        store.engine.dispose()
