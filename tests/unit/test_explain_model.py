"""Caption explanations on a tiny random BLIP checkpoint: the captured maps against a manual
computation from transformers' own ``output_attentions``, batching, beam search, and the files
``imgq explain`` writes (needs torch)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jsonschema  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import BlipForConditionalGeneration  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from imgq.cli import app  # noqa: E402
from imgq.contract import CaptionParams  # noqa: E402
from imgq.worker.explainer import explain_batch, explain_image  # noqa: E402
from imgq.worker.model import CaptionModel  # noqa: E402
from imgq.worker.preprocess import Preprocessor  # noqa: E402

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "explain.schema.json").read_text())


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 384, 384), dtype=np.uint8)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> CaptionModel:
    wrapper = CaptionModel(str(tiny_model_dir), device="cpu")
    wrapper.load()
    return wrapper


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> BlipForConditionalGeneration:
    """The checkpoint loaded by plain transformers, independently of the wrapper."""
    return BlipForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


def _manual(reference: BlipForConditionalGeneration, model: CaptionModel, pixels: np.ndarray,
            ids: list[list[int]]) -> np.ndarray:
    """Teacher-forced cross-attention of the given sequences, from ``output_attentions``:
    (batch, layers, heads, positions - 1, keys); position p's query chose token p + 1."""
    with torch.inference_mode():
        embeds = reference.vision_model(pixel_values=model.model_input(pixels)).last_hidden_state
        out = reference.text_decoder(input_ids=torch.tensor(ids)[:, :-1], encoder_hidden_states=embeds,
                                     output_attentions=True, return_dict=True)
    return torch.stack(out.cross_attentions, dim=1).numpy()


def _grid(att: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    return att[..., 1:].reshape(*att.shape[:-1], *grid)


@pytest.mark.parametrize("params", [
    CaptionParams(max_new_tokens=8),
    CaptionParams(max_new_tokens=6, prompt="a photo of"),
], ids=["greedy", "prompt"])
def test_a_heatmap_equals_a_manual_computation_from_output_attentions(model, reference, params):
    pixels = _pixels(3)
    explained = explain_batch(model, pixels, params)
    ids = [[t.id for t in ex.tokens] for ex in explained]
    manual = _manual(reference, model, pixels, ids)
    grid = model.patch_grid
    assert grid == (6, 6)  # 384 px / 64 px patches, read from the checkpoint's config
    prompt_len = sum(t.role in ("bos", "prompt") for t in explained[0].tokens)
    assert prompt_len == (1 if params.prompt is None else 4)  # [DEC] a photo of
    for b, ex in enumerate(explained):
        for tok in ex.tokens[prompt_len:]:
            # Heads averaged, then layers averaged; the [CLS] key is split off.
            expected = manual[b, :, :, tok.index - 1, :].mean(axis=1).mean(axis=0)
            np.testing.assert_allclose(tok.grid, _grid(expected, grid), atol=1e-5)
            assert tok.cls == pytest.approx(expected[0], abs=1e-5)
        assert all(t.grid is None for t in ex.tokens[:prompt_len])

    one = explain_batch(model, pixels, params, heads="max", layer=1)
    for b, ex in enumerate(one):
        tok = ex.tokens[prompt_len + 2]
        np.testing.assert_allclose(tok.grid, _grid(manual[b, 1, :, tok.index - 1, :].max(axis=0), grid), atol=1e-5)


def test_batched_equals_unbatched(model):
    pixels = _pixels(4, seed=1)
    params = CaptionParams(max_new_tokens=7)
    batched = explain_batch(model, pixels, params)
    for i in range(4):
        alone = explain_batch(model, pixels[i : i + 1], params)[0]
        assert alone.caption == batched[i].caption
        for a, b in zip(alone.tokens, batched[i].tokens, strict=True):
            assert (a.id, a.role) == (b.id, b.role)
            if a.grid is not None:
                np.testing.assert_allclose(a.grid, b.grid, atol=1e-5)


def test_beam_search_maps_belong_to_the_returned_sequence(model, reference):
    pixels = _pixels(2, seed=2)
    params = CaptionParams(max_new_tokens=8, num_beams=3)
    explained = explain_batch(model, pixels, params)
    ids = [[t.id for t in ex.tokens] for ex in explained]
    manual = _manual(reference, model, pixels, ids).mean(axis=2).mean(axis=1)  # (B, T-1, K)
    for b, ex in enumerate(explained):
        for tok in ex.tokens[1:]:
            np.testing.assert_allclose(tok.grid, _grid(manual[b, tok.index - 1], model.patch_grid), atol=1e-5)


@pytest.mark.parametrize("params", [
    CaptionParams(max_new_tokens=10),
    CaptionParams(max_new_tokens=10, num_beams=3),
    CaptionParams(max_new_tokens=10, prompt="a picture of"),
    CaptionParams(max_new_tokens=10, do_sample=True, seed=7, top_p=0.9),
], ids=["greedy", "beam", "prompt", "sample"])
def test_explained_captions_are_identical_to_plain_captions(model, params):
    pixels = _pixels(3, seed=3)
    assert [ex.caption for ex in explain_batch(model, pixels, params)] == model.caption(pixels, params)


def test_a_letterboxed_explanation_writes_decodable_pngs_and_a_valid_explain_json(model):
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (150, 600, 3), dtype=np.uint8))
    params = CaptionParams(max_new_tokens=5, resize="letterbox")
    pixels = Preprocessor.from_image_processor(model.image_processor).pixels(image, "letterbox")
    doc, files = explain_image(model, image, pixels, params, ref="wide.png", keep_layers=True)
    jsonschema.validate(doc, SCHEMA)
    assert json.loads(files["explain.json"]) == doc
    assert doc["image"] == {"width": 600, "height": 150}
    assert doc["input"]["view"] == [0.0, 144.0, 384.0, 240.0]
    assert doc["model"]["decoder"]["cross_attention_layers"] == 2
    assert len(doc["words"]) >= 1 and all(len(t["layers"]) == 2 for t in doc["tokens"][1:])
    for name, data in files.items():
        if name.endswith(".png"):
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if name.startswith("word-"):
                    assert im.size == (600, 150)  # drawn on the original, not on the 384x384 input
    assert {w["overlay"] for w in doc["words"]} <= set(files)
    # The schema is not a rubber stamp.
    broken = json.loads(files["explain.json"])
    broken["tokens"][0]["grid"] = [[0.5]]  # the bos token has no map
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_imgq_explain_writes_overlays_a_contact_sheet_and_explain_json(tiny_model_dir, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(root / "a.png")
    env = {"IMGQ_LOCAL_ROOTS": str(root), "IMGQ_CAPTION_MODEL": str(tiny_model_dir), "IMGQ_DEVICE": "cpu"}
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", str(root / "a.png"), "--out", str(out), "--max-new-tokens", "4",
                                      "--resize", "center_crop"], env=env)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "explain.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["caption"] == result.stdout.strip().splitlines()[-1]
    assert (out / "contact_sheet.png").is_file() and all((out / w["overlay"]).is_file() for w in doc["words"])

    bad = CliRunner().invoke(app, ["explain", str(root / "a.png"), "--out", str(out), "--layer", "2"], env=env)
    assert bad.exit_code == 2 and "error[bad_params]" in bad.output and "2 cross-attention layers" in bad.output
    both = CliRunner().invoke(app, ["explain", str(root / "a.png"), "--out", str(out), "--layer", "0",
                                    "--all-layers"], env=env)
    assert both.exit_code == 2 and "error[bad_request]" in both.output
    outside = CliRunner().invoke(app, ["explain", str(tmp_path / "nope.png"), "--out", str(out)], env=env)
    assert outside.exit_code == 2 and "error[bad_ref]" in outside.output
