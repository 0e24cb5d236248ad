"""CaptionModel against raw transformers calls on a tiny random BLIP checkpoint (needs torch)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from transformers import BlipForConditionalGeneration, BlipProcessor  # noqa: E402

from imgq.config import DEFAULT_CAPTION_MODEL  # noqa: E402
from imgq.contract import CaptionParams  # noqa: E402
from imgq.errors import ModelUnavailable  # noqa: E402
from imgq.worker.model import CaptionModel  # noqa: E402
from imgq.worker.tiny import write_tiny_checkpoint  # noqa: E402

# (width, height): the processor stretches every one of them to 384x384.
SIZES = [(640, 480), (200, 300), (500, 500), (900, 100), (384, 384), (1280, 720), (50, 50), (444, 333)]


def _image(i: int, size: tuple[int, int]) -> Image.Image:
    """A colour gradient plus a little noise: different per image, deterministic."""
    rng = np.random.default_rng(i)
    w, h = size
    base = rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(-128, 128, 3)
    pixels = base + ramp + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """The same checkpoint loaded by plain transformers, independently of the wrapper."""
    return BlipForConditionalGeneration.from_pretrained(tiny_model_dir).eval(), BlipProcessor.from_pretrained(
        tiny_model_dir
    )


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> CaptionModel:
    wrapper = CaptionModel(str(tiny_model_dir), device="cpu")
    wrapper.load()
    return wrapper


@pytest.fixture(scope="module")
def pixels(reference: tuple[BlipForConditionalGeneration, BlipProcessor]) -> np.ndarray:
    images = [_image(i, size) for i, size in enumerate(SIZES)]
    out = reference[1].image_processor(images, return_tensors="np")["pixel_values"]
    return np.asarray(out, dtype=np.float32)


def _one_at_a_time(reference, pixels: np.ndarray, **kwargs) -> list[str]:
    hf, processor = reference
    texts = []
    with torch.inference_mode():
        for row in pixels:
            ids = hf.generate(pixel_values=torch.from_numpy(row[None]), **kwargs)
            texts.append(processor.decode(ids[0], skip_special_tokens=True).strip())
    return texts


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_equals_one_at_a_time(model, reference, pixels, num_beams) -> None:
    params = CaptionParams(max_new_tokens=12, num_beams=num_beams)
    assert pixels.shape == (len(SIZES), 3, 384, 384)
    batched = model.caption(pixels, params)
    single = _one_at_a_time(reference, pixels, max_new_tokens=12, num_beams=num_beams, do_sample=False)
    assert batched == single
    assert len(set(batched)) >= 2, "the tiny model should tell these images apart"


def test_min_equals_max_forces_exact_length(model, pixels) -> None:
    ids = model.generate_ids(pixels[:3], CaptionParams(min_new_tokens=20, max_new_tokens=20))
    assert ids.shape == (3, 1 + 20)  # [DEC] then exactly 20 generated tokens
    generated = ids[:, 1:]
    pad, sep = model.tokenizer.pad_token_id, model.tokenizer.sep_token_id
    assert not ((generated == pad) | (generated == sep)).any()


def test_prompt_is_continued(model, reference, pixels) -> None:
    params = CaptionParams(prompt="A Picture of", max_new_tokens=8)
    captions = model.caption(pixels[:3], params)
    # An image may end its caption at once (the [SEP] comes first): then only the prompt remains.
    assert all(c.startswith("a picture of") for c in captions), captions
    # The wrapper must match what BlipProcessor + generate produce for one image with that text.
    hf, processor = reference
    with torch.inference_mode():
        for row, caption in zip(pixels[:3], captions, strict=True):
            inputs = processor(text="A Picture of", return_tensors="pt")
            ids = hf.generate(pixel_values=torch.from_numpy(row[None]), **inputs, max_new_tokens=8)
            assert processor.decode(ids[0], skip_special_tokens=True).strip() == caption


def test_seeded_sampling_is_reproducible(model, pixels) -> None:
    params = CaptionParams(do_sample=True, seed=7, top_k=0, max_new_tokens=10)
    first = model.caption(pixels[:4], params)
    torch.rand(100)  # unrelated use of the global RNG must not matter
    assert model.caption(pixels[:4], params) == first
    other = model.caption(pixels[:4], params.model_copy(update={"seed": 8}))
    assert other != first


def test_unseeded_sampling_differs_between_calls_and_leaves_the_global_rng_alone(model, pixels) -> None:
    params = CaptionParams(do_sample=True, top_k=0, temperature=2.0, max_new_tokens=15)
    before = torch.get_rng_state().clone()
    runs = [model.caption(pixels, params) for _ in range(4)]
    assert torch.equal(before, torch.get_rng_state()), "sampling must not move the process's RNG"
    assert len({tuple(r) for r in runs}) > 1, "unseeded sampling drew the same numbers on every call"


def test_a_prompt_is_measured_in_the_models_own_tokens(model) -> None:
    """Punctuation is a token a character: "!" * 120 is one word to the producer's bound and 120
    tokens to the decoder (128 positions in the tiny model), which generate would fail on."""
    from imgq import errors
    from imgq.worker.runners import CaptionRunner

    positions = model._model.config.text_config.max_position_embeddings
    fits = CaptionParams(prompt="a photo of", max_new_tokens=positions - 4)
    CaptionRunner(model).check_params(fits)
    with pytest.raises(errors.PromptTooLong, match=r"the prompt takes 121 text positions"):
        CaptionRunner(model).check_params(CaptionParams(prompt="!" * 120, max_new_tokens=30))
    with pytest.raises(errors.PromptTooLong):
        model.check_prompt(fits.model_copy(update={"max_new_tokens": positions - 2}))


def test_properties(model, tiny_model_dir) -> None:
    assert model.name == str(tiny_model_dir)
    assert model.device == "cpu"
    assert model.dtype == torch.float32
    assert model.revision.startswith("local-")
    assert model.revision == CaptionModel(str(tiny_model_dir)).revision  # stable across loads
    assert model.image_processor.size == {"height": 384, "width": 384}


def test_load_is_idempotent_across_threads(tiny_model_dir) -> None:
    """Eight threads ask at once; the checkpoint is read once. The slow load keeps every thread
    inside load() together, so without the lock (or its second look) each would load its own."""
    loads: list[str] = []

    class Counted(CaptionModel):
        def _load_locked(self) -> None:
            loads.append(threading.current_thread().name)
            time.sleep(0.2)
            super()._load_locked()

    wrapper = Counted(str(tiny_model_dir), device="cpu")
    start = threading.Barrier(8)

    def load() -> None:
        start.wait()
        wrapper.load()

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded = wrapper._model
    wrapper.load()
    assert len(loads) == 1, f"loaded {len(loads)} times"
    assert loaded is not None and wrapper._model is loaded


def test_tiny_checkpoint_is_deterministic_and_reused(tmp_path, tiny_model_dir) -> None:
    again = write_tiny_checkpoint(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_checkpoint(again) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_local_checkpoint_with_other_weights_of_the_same_shapes_is_another_revision(tmp_path, tiny_model_dir) -> None:
    """A re-export in place (same architecture, new weights) must not share the old results' identity."""
    from imgq.worker.loading import local_revision

    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").stat().st_size == (tiny_model_dir / "model.safetensors").stat().st_size
    assert (other / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert local_revision(other) != local_revision(tiny_model_dir)
    assert local_revision(tiny_model_dir) == local_revision(write_tiny_checkpoint(tmp_path / "same"))


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json", "vocab.txt",
                                  "processor_config.json"])
def test_editing_what_shapes_the_output_is_another_revision_and_a_readme_is_not(tmp_path, name) -> None:
    """Only config.json and the weights were hashed: a checkpoint whose generation defaults,
    tokenizer or preprocessing changed (its captions with them) kept its revision (found by review)."""
    import shutil

    from imgq.worker.loading import local_revision

    folder = write_tiny_checkpoint(tmp_path / "ckpt")
    before = local_revision(folder)
    (folder / "README.md").write_text("notes")
    assert local_revision(folder) == before
    assert (folder / name).is_file(), sorted(p.name for p in folder.iterdir())
    shutil.copy(folder / name, tmp_path / "saved")
    (folder / name).write_bytes((folder / name).read_bytes() + b"\n")
    assert local_revision(folder) != before
    shutil.copy(tmp_path / "saved", folder / name)
    assert local_revision(folder) == before


def test_a_weight_files_digest_is_kept_until_the_file_changes(tmp_path) -> None:
    """Hashing BLIP-base's 990 MB took 1.5 s on every load, every `imgq search` too: each file's
    digest is kept, keyed by its inode, size, mtime and ctime, so a rewrite is hashed again."""
    import json
    import shutil

    from imgq.worker.loading import local_revision

    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    cache = tmp_path / "cache" / "digests.json"
    first = local_revision(checkpoint, cache)
    [key] = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: "0" * 64}))
    forged = local_revision(checkpoint, cache)
    assert forged != first, "the kept digest was used, the file not read"
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    shutil.copyfile(other / "model.safetensors", checkpoint / "model.safetensors")  # re-exported in place
    assert local_revision(checkpoint, cache) == local_revision(other, tmp_path / "fresh.json") not in (first, forged)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert local_revision(checkpoint, blocked / "digests.json") == local_revision(other, cache), "uncached, still right"


@pytest.mark.parametrize("kind", ["missing", "not_a_checkpoint"])
def test_bad_local_dir_is_one_line_model_unavailable(tmp_path, kind) -> None:
    target = tmp_path / "nope" if kind == "missing" else tmp_path
    with pytest.raises(ModelUnavailable) as info:
        CaptionModel(str(target)).load()
    message = info.value.message
    assert "IMGQ_CAPTION_MODEL" in message and "\n" not in message
    assert ("does not exist" if kind == "missing" else "not a model checkpoint") in message


@pytest.mark.parametrize("pinned", [False, True])
def test_a_hub_checkpoint_from_the_cache_is_filed_under_its_commit(tmp_path, tiny_model_dir, pinned) -> None:
    """transformers after 5.17 no longer puts the commit on the config: every result of a hub model
    not pinned by IMGQ_MODEL_REVISION was filed under revision "unknown", one identity for every
    release of the model. A hub cache laid out as huggingface_hub writes it (refs/main -> snapshot)."""
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--imgq-test--tiny-blip"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    revision = f"revision={commit!r}" if pinned else "revision=None"
    script = ("from imgq.worker.model import CaptionModel; "
              f"print(CaptionModel('imgq-test/tiny-blip', device='cpu', {revision}).revision)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == commit


def test_hub_id_offline_fails_fast(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A revision no cache can hold, so a developer's cached copy cannot make this load.
    wrapper = CaptionModel(DEFAULT_CAPTION_MODEL, revision="0" * 40)
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        wrapper.load()
    assert time.monotonic() - start < 5
    message = info.value.message
    assert "offline" in message and "IMGQ_CAPTION_MODEL" in message and "\n" not in message


def test_uint8_pixels_normalised_on_the_device_match_the_processor(tiny_model_dir):
    """The worker carries uint8 pixels (4x smaller); the model normalises them like the processor."""
    from imgq.worker.preprocess import Preprocessor

    model = CaptionModel(str(tiny_model_dir), device="cpu")
    pre = Preprocessor.from_image_processor(model.image_processor)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((480, 640), (97, 131))]
    for mode in ("stretch", "center_crop"):
        raw = np.stack([pre.pixels(im, mode) for im in images])
        assert raw.dtype == np.uint8 and raw.shape == (2, 3, pre.size, pre.size)
        reference = np.stack([pre(im, mode) for im in images])
        got = model.model_input(raw).numpy()
        assert np.abs(got - reference).max() < 1e-5
    assert pre.pixels(images[0], "letterbox").dtype == np.float32
    params = CaptionParams(max_new_tokens=5)
    batch = np.stack([pre.pixels(im, "stretch") for im in images])
    assert model.caption(batch, params) == model.caption(np.stack([pre(im) for im in images]), params)


def test_threads_setting_caps_torch_cpu_threads(tiny_model_dir) -> None:
    before = torch.get_num_threads()
    try:
        CaptionModel(str(tiny_model_dir), device="cpu", threads=1).load()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_writing_and_loading_draw_no_bar_into_a_log(tmp_path, capfd) -> None:
    """A worker's stderr is a log file: transformers' "Loading weights" bar was a line of carriage
    returns in the middle of its JSON lines (and in `imgq demo`'s output)."""
    CaptionModel(str(write_tiny_checkpoint(tmp_path / "fresh", seed=3)), device="cpu").load()
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model" not in err and "\r" not in err, err[-500:]


def test_tiny_captions_are_never_empty(tiny_model_dir) -> None:
    """The tiny checkpoint never emits special tokens, so an empty caption always means a bug.
    (Without that, 1 of these 64 images got an empty caption: the e2e tests would flake.)"""
    model = CaptionModel(str(tiny_model_dir), device="cpu")
    rng = np.random.default_rng(0)
    images = []
    for i in range(64):
        base = rng.integers(0, 256, 3)[:, None, None]
        ramp = np.linspace(0, 1, 384)[None, None, :] * rng.integers(-128, 128, 3)[:, None, None]
        noise = rng.normal(0, 20 * (i % 4), (3, 384, 384))
        images.append(np.clip(base + ramp + noise, 0, 255).astype(np.uint8))
    captions = model.caption(np.stack(images), CaptionParams(max_new_tokens=8))
    assert [c for c in captions if not c.strip()] == []


def test_fused_attention_is_installed_and_equals_eager(model, tiny_model_dir, pixels) -> None:
    """IMGQ_ATTENTION=sdpa (the default) routes the vision encoder and the decoder's self- and
    cross-attention through the fused kernel; in fp32 the logits equal eager's within 1e-5 of
    their scale and every greedy, beam and prompted caption is the same."""
    eager = CaptionModel(str(tiny_model_dir), device="cpu", attention="eager")
    eager.load()

    def patched(m: CaptionModel) -> int:
        return sum("forward" in vars(module) for module in m._model.modules())

    config = model._model.config
    # Each decoder layer has a self-attention and a cross-attention module.
    assert patched(model) == config.vision_config.num_hidden_layers + 2 * config.text_config.num_hidden_layers
    assert patched(eager) == 0
    ids = torch.full((len(pixels), 6), model._model.config.text_config.bos_token_id)
    with torch.inference_mode():
        fused = model._model(pixel_values=model.model_input(pixels), input_ids=ids).logits
        plain = eager._model(pixel_values=eager.model_input(pixels), input_ids=ids).logits
    assert (fused - plain).abs().max() <= 1e-5 * plain.abs().max()
    for params in (CaptionParams(max_new_tokens=12), CaptionParams(max_new_tokens=10, num_beams=3),
                   CaptionParams(max_new_tokens=10, prompt="a picture of")):
        assert model.caption(pixels, params) == eager.caption(pixels, params)


def test_a_hooked_cross_attention_runs_eager_and_returns_its_probabilities(model, pixels) -> None:
    """Explained captions read the cross-attention probabilities with a forward hook: a fused
    module with a hook must take the eager path, which has them."""
    module = model._model.text_decoder.bert.encoder.layer[0].crossattention.self
    seen = []
    handle = module.register_forward_hook(lambda _m, _args, out: seen.append(out[1]))
    try:
        model.caption(pixels[:2], CaptionParams(max_new_tokens=3, min_new_tokens=3))
    finally:
        handle.remove()
    assert seen and all(probs is not None for probs in seen)
    probs = seen[0]
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5)
