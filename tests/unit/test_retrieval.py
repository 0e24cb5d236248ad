"""RetrievalModel on a tiny random BLIP retrieval checkpoint, checked against transformers' own
``BlipForImageTextRetrieval.forward`` and against itself across batch shapes (needs torch)."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image, ImageEnhance  # noqa: E402
from transformers import BlipForImageTextRetrieval, BlipProcessor  # noqa: E402

from imgq.errors import ModelUnavailable  # noqa: E402
from imgq.worker.decode import decode  # noqa: E402
from imgq.worker.preprocess import Preprocessor  # noqa: E402
from imgq.worker.retrieval import RetrievalModel  # noqa: E402
from imgq.worker.tiny import write_tiny_checkpoint, write_tiny_retrieval_checkpoint  # noqa: E402
from tests.corpus import save, scene  # noqa: E402

TEXTS = [
    "a dog",
    "a red car parked on the street next to a tall building",
    "two cats sitting on a couch",
    "snow",
    "a man riding a horse along the beach while the sun sets behind the clouds",
]


@pytest.fixture(scope="module")
def model(tiny_retrieval_dir: Path) -> RetrievalModel:
    wrapper = RetrievalModel(str(tiny_retrieval_dir), device="cpu")
    wrapper.load()
    return wrapper


@pytest.fixture(scope="module")
def pre(model: RetrievalModel) -> Preprocessor:
    return Preprocessor.from_image_processor(model.image_processor)


def _pixels(pre: Preprocessor, data: list[bytes]) -> np.ndarray:
    """uint8 (B, 3, 384, 384) through the worker's own decode and preprocess."""
    return np.stack([pre.pixels(decode(d, max_pixels=10_000_000, target=pre.size).image) for d in data])


@pytest.fixture(scope="module")
def scenes() -> list[bytes]:
    return [scene(640, 480, seed) for seed in range(12)]


@pytest.fixture(scope="module")
def pixels(pre: Preprocessor, scenes: list[bytes]) -> np.ndarray:
    return _pixels(pre, scenes)


def test_properties(model: RetrievalModel, tiny_retrieval_dir: Path) -> None:
    assert model.name == str(tiny_retrieval_dir)
    assert model.device == "cpu"
    assert model.dim == 256
    assert model.max_text_tokens == 512
    assert model.revision.startswith("local-")
    assert model.image_processor.size == {"height": 384, "width": 384}
    assert model.tokenizer.convert_tokens_to_ids("[ENC]") == model._enc_id  # ITM uses [ENC], as BLIP trained


def test_vectors_have_unit_norm_and_the_index_width(model: RetrievalModel, pixels: np.ndarray) -> None:
    images = model.embed_images(pixels)
    texts = model.embed_texts(TEXTS)
    assert images.shape == (len(pixels), 256) and images.dtype == np.float32
    assert texts.shape == (len(TEXTS), 256) and texts.dtype == np.float32
    assert np.abs(np.linalg.norm(images, axis=1) - 1).max() < 1e-5
    assert np.abs(np.linalg.norm(texts, axis=1) - 1).max() < 1e-5


def test_batched_equals_one_at_a_time(model: RetrievalModel, pixels: np.ndarray) -> None:
    images = model.embed_images(pixels)
    single = np.concatenate([model.embed_images(pixels[i : i + 1]) for i in range(len(pixels))])
    assert np.abs(images - single).max() < 1e-5
    texts = model.embed_texts(TEXTS)  # lengths 3 to 17 tokens: the short ones are padded
    single = np.concatenate([model.embed_texts([t]) for t in TEXTS])
    assert np.abs(texts - single).max() < 1e-5
    # Not vacuous: different inputs give clearly different vectors.
    assert (images @ images.T)[~np.eye(len(images), dtype=bool)].max() < 0.98
    assert (texts @ texts.T)[~np.eye(len(texts), dtype=bool)].max() < 0.98


def test_features_equal_transformers_forward(model: RetrievalModel, tiny_retrieval_dir: Path, pixels: np.ndarray):
    """The image and text features are exactly what ``forward(use_itm_head=False)`` multiplies."""
    hf = BlipForImageTextRetrieval.from_pretrained(tiny_retrieval_dir).eval()
    processor = BlipProcessor.from_pretrained(tiny_retrieval_dir)
    images = model.embed_images(pixels[:3])
    texts = model.embed_texts(TEXTS[:2])
    with torch.inference_mode():
        for i in range(3):
            for j in range(2):
                ids = processor.tokenizer(TEXTS[j], return_tensors="pt").input_ids
                x = model.model_input(pixels[i : i + 1])
                sim = hf(input_ids=ids, pixel_values=x, use_itm_head=False).itm_score.item()
                assert abs(sim - float(images[i] @ texts[j])) < 1e-5
                # ITM: BLIP's [ENC] in place of [CLS], then transformers' own head.
                ids[:, 0] = processor.tokenizer.convert_tokens_to_ids("[ENC]")
                logits = hf(input_ids=ids, pixel_values=x, use_itm_head=True).itm_score
                prob, _ = model.match(pixels[i : i + 1], [TEXTS[j]])
                assert abs(logits.softmax(-1)[0, 1].item() - float(prob[0])) < 1e-5


def test_match_scores(model: RetrievalModel, pixels: np.ndarray) -> None:
    imgs = pixels[: len(TEXTS)]
    prob, cosine = model.match(imgs, TEXTS)
    assert prob.shape == cosine.shape == (len(TEXTS),)
    assert prob.dtype == cosine.dtype == np.float32
    assert ((prob >= 0) & (prob <= 1)).all()
    expected = (model.embed_images(imgs) * model.embed_texts(TEXTS)).sum(axis=1)
    assert np.abs(cosine - expected).max() < 1e-5
    single = [model.match(imgs[i : i + 1], [t]) for i, t in enumerate(TEXTS)]
    assert np.abs(prob - np.concatenate([p for p, _ in single])).max() < 1e-5
    assert np.abs(cosine - np.concatenate([c for _, c in single])).max() < 1e-5
    assert prob.max() - prob.min() > 0.01, "the ITM head should tell these pairs apart"
    with pytest.raises(ValueError, match="pairs"):
        model.match(imgs, TEXTS[:2])


def _variants(data: bytes) -> list[bytes]:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    return [save(im, "JPEG", quality=50), save(ImageEnhance.Brightness(im).enhance(1.02), "JPEG", quality=95)]


def test_near_duplicate_is_the_nearest_neighbour(model, pre, scenes, pixels) -> None:
    index = model.embed_images(pixels)
    queries = [(i, v) for i in (0, 5, 9) for v in _variants(scenes[i])]
    found = model.embed_images(_pixels(pre, [v for _, v in queries])) @ index.T
    for (i, _), sims in zip(queries, found, strict=True):
        others = np.delete(sims, i)
        assert sims.argmax() == i
        assert sims[i] > 0.95 and sims[i] - others.max() > 0.05, (i, sims[i], others.max())


def test_uint8_and_normalised_float_inputs_agree(model, pre, scenes) -> None:
    images = [decode(d, max_pixels=10_000_000).image for d in scenes[:3]]
    raw = np.stack([pre.pixels(im) for im in images])
    normalised = np.stack([pre(im) for im in images])
    assert np.abs(model.embed_images(raw) - model.embed_images(normalised)).max() < 1e-5


def test_count_tokens_and_text_limits(model: RetrievalModel) -> None:
    counts = model.count_tokens(TEXTS)
    assert counts == [len(model.tokenizer(t).input_ids) for t in TEXTS]
    assert counts[0] == 4  # [CLS] a dog [SEP]
    long = " ".join(["dog"] * 600)
    assert model.count_tokens([long]) == [602]  # counted untruncated, so it can be refused
    with pytest.raises(ValueError, match="at most 512"):
        model.embed_texts([long])
    with pytest.raises(ValueError):
        model.embed_texts([])
    with pytest.raises(ValueError):
        model.embed_texts(["a dog", "   "])
    assert model.count_tokens([]) == []


def test_a_search_text_too_long_for_the_encoder_is_a_search_error(model: RetrievalModel) -> None:
    """The API takes 2,000 characters; as punctuation that is 2,000 tokens, past the encoder's 512.
    It was a bare ValueError: a 500 over HTTP, an internal error (exit 70) from `imgq search`."""
    from imgq import errors

    assert model.embed_query("a dog").shape == (model.dim,)
    with pytest.raises(errors.SearchError, match=r"cannot be encoded: a text has \d+ tokens"):
        model.embed_query("!" * 2000)


def test_texts_from_many_threads(model: RetrievalModel) -> None:
    """A fast tokenizer's padding settings are shared state: unguarded, a thread that counts tokens
    (no padding) can make another's padded batch come out ragged. A race, so detection is by
    chance: without the lock this failed in 3 of 5 runs here."""
    expected = model.embed_texts(TEXTS)
    counts = model.count_tokens(TEXTS)
    failures: list[str] = []

    def work(i: int) -> None:
        try:
            for _ in range(100):
                if i % 2:
                    assert np.abs(model.embed_texts(TEXTS) - expected).max() < 1e-5
                else:
                    assert model.count_tokens(TEXTS) == counts
        except Exception as exc:  # collected: an exception in a thread would not fail the test
            failures.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize("kind", ["missing", "hub_offline", "caption_checkpoint"])
def test_unavailable_model_is_one_line_naming_the_setting(tmp_path, tiny_model_dir, kind) -> None:
    name = {
        "missing": str(tmp_path / "nope"),
        "hub_offline": "Salesforce/blip-itm-base-coco",
        "caption_checkpoint": str(tiny_model_dir),  # would load with random heads, silently
    }[kind]
    # A revision no cache can hold, so a developer's cached copy cannot make the hub id load.
    wrapper = RetrievalModel(name, revision="0" * 40 if kind == "hub_offline" else None, device="cpu")
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        wrapper.load()
    assert time.monotonic() - start < 5
    message = info.value.message
    assert "IMGQ_EMBED_MODEL" in message and "--kind retrieval" in message and "\n" not in message
    assert "retrieval model" in message
    expected = {"missing": "does not exist", "hub_offline": "offline", "caption_checkpoint": "vision_proj"}[kind]
    assert expected in message


def test_tiny_checkpoints_of_the_two_kinds_never_pass_for_each_other(tmp_path, tiny_retrieval_dir) -> None:
    again = write_tiny_retrieval_checkpoint(tmp_path / "ckpt")
    assert (again / "model.safetensors").read_bytes() == (tiny_retrieval_dir / "model.safetensors").read_bytes()
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_retrieval_checkpoint(again) == again  # reused as it is
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    write_tiny_checkpoint(again)  # a caption checkpoint asked for in the same place replaces it
    assert json.loads((again / "config.json").read_text())["architectures"] == ["BlipForConditionalGeneration"]
    write_tiny_retrieval_checkpoint(again)
    assert json.loads((again / "config.json").read_text())["architectures"] == ["BlipForImageTextRetrieval"]


def test_fused_vision_attention_equals_eager(model: RetrievalModel, tiny_retrieval_dir: Path, pixels: np.ndarray):
    """IMGQ_ATTENTION=sdpa (the default) routes the vision encoder through the fused kernel; in fp32
    it must give the eager embeddings within 1e-5, and the patch must really be installed."""
    eager = RetrievalModel(str(tiny_retrieval_dir), device="cpu", attention="eager")
    eager.load()
    model.load()

    def patched(m: RetrievalModel) -> int:
        return sum("forward" in vars(layer) for layer in m._model.vision_model.modules())

    assert model.attention == "sdpa" and patched(model) == model._model.config.vision_config.num_hidden_layers
    assert patched(eager) == 0
    diff = np.abs(model.embed_images(pixels) - eager.embed_images(pixels)).max()
    assert diff < 1e-5
