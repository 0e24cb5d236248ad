"""The static-cache greedy loop (imgq.worker.decode_loop) returns generate's ids, on the CPU where
it runs without CUDA graphs: every length rule (max, min, early [SEP] per row, the stop once every
row has finished), prompts, and the fallbacks to generate."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from imgq.contract import CaptionParams
from imgq.worker.decode_loop import StaticGreedy, _trim, supported
from imgq.worker.model import CaptionModel


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path) -> tuple[CaptionModel, CaptionModel]:
    plain = CaptionModel(str(tiny_model_dir), device="cpu", decode_loop="generate")
    static = CaptionModel(str(tiny_model_dir), device="cpu", decode_loop="static")
    plain.load()
    static.load()
    return plain, static


@pytest.fixture(scope="module")
def shaped(tiny_model_dir: Path) -> CaptionModel:
    """IMGQ_DECODE_LOOP=graphs' fixed-shape step (whole cache, masked tail, the position a tensor
    the step advances), stepped on the CPU without a capture: all of the graph path but the capture."""
    model = CaptionModel(str(tiny_model_dir), device="cpu", decode_loop="graphs")
    model.load()
    assert model._static is not None and not model._static.graphs  # off a GPU, graphs is static
    model._static = StaticGreedy(model._model, graphs=True)
    return model


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((6, 3, 384, 384)).astype(np.float32)


def sep_bias(models: tuple[CaptionModel, ...], shift: float) -> None:
    """Make [SEP] likelier by ``shift`` in both models: the tiny checkpoint never ends a caption
    early on its own (its special tokens carry a -1e4 bias)."""
    for m in models:
        sep = m._model.config.text_config.sep_token_id
        with torch.no_grad():
            m._model.text_decoder.cls.predictions.decoder.bias[sep] += shift


PARAMS = [
    CaptionParams(max_new_tokens=12),
    CaptionParams(max_new_tokens=10, min_new_tokens=10),
    CaptionParams(max_new_tokens=15, min_new_tokens=3),
    CaptionParams(max_new_tokens=12, prompt="a picture of"),
    CaptionParams(max_new_tokens=1),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"max{p.max_new_tokens}-min{p.min_new_tokens}-{p.prompt}")
def test_static_loop_returns_generates_ids(pair, shaped, pixels, params):
    plain, static = pair
    assert static._static is not None
    expected = plain.generate_ids(pixels, params)
    got = static.generate_ids(pixels, params)
    assert got.shape == expected.shape and torch.equal(got, expected)
    fixed = shaped.generate_ids(pixels, params)
    assert fixed.shape == expected.shape and torch.equal(fixed, expected)
    assert shaped._static.graphs_off is None


@pytest.mark.parametrize("shift", [1e4 + 5, 1e4 + 10, 1e4 + 40])
@pytest.mark.parametrize("min_new", [0, 4])
@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_rows_that_end_early_get_pad_and_the_output_stops_when_all_have_ended(pair, shaped, pixels, shift, min_new,
                                                                                prompt):
    """+5: some rows end, some run to the maximum; +10: all end within a few steps (the output is
    shorter than max_new_tokens); +40: every row ends at once, unless min_new_tokens holds it off
    (counted after the prompt)."""
    plain, static = pair
    params = CaptionParams(max_new_tokens=15, min_new_tokens=min_new, prompt=prompt)
    sep_bias((*pair, shaped), shift)
    try:
        expected = plain.generate_ids(pixels, params)
        got = static.generate_ids(pixels, params)
        fixed = shaped.generate_ids(pixels, params)
    finally:
        sep_bias((*pair, shaped), -shift)
    assert torch.equal(got, expected)
    assert torch.equal(fixed, expected)
    sep = plain._model.config.text_config.sep_token_id
    assert (expected == sep).any(), "the bias must make some caption end"
    if shift > 1e4 + 20:
        prompt_len = 1 if prompt is None else len(static.tokenizer(prompt).input_ids) - 1
        assert expected.shape[1] == prompt_len + min_new + 1


def test_batched_equals_one_at_a_time(pair, pixels):
    _, static = pair
    params = CaptionParams(max_new_tokens=12)
    sep_bias(pair, 1e4 + 5)
    try:
        whole = static.caption(pixels, params)
        alone = [static.caption(pixels[i : i + 1], params)[0] for i in range(len(pixels))]
    finally:
        sep_bias(pair, -(1e4 + 5))
    assert whole == alone


@pytest.mark.parametrize("params", [CaptionParams(max_new_tokens=8, num_beams=3),
                                    CaptionParams(max_new_tokens=8, do_sample=True, seed=7),
                                    CaptionParams(max_new_tokens=8, repetition_penalty=1.3)])
def test_what_the_loop_does_not_do_runs_through_generate(pair, pixels, params):
    plain, static = pair
    assert static.caption(pixels, params) == plain.caption(pixels, params)


def test_explained_captions_keep_generate_and_its_attention(pair, pixels):
    plain, static = pair
    params = CaptionParams(max_new_tokens=6)
    texts, maps = static.explain(pixels[:2], params)
    assert texts == plain.caption(pixels[:2], params)
    assert all(np.isfinite(m.maps).all() for m in maps)


def test_supported_names_what_it_leaves_to_generate():
    plain = SimpleNamespace()
    assert supported(plain, num_beams=1, do_sample=False, repetition_penalty=1.0) is None
    assert "beam" in supported(plain, num_beams=3, do_sample=False, repetition_penalty=1.0)
    assert "sampling" in supported(plain, num_beams=1, do_sample=True, repetition_penalty=1.0)
    assert "repetition" in supported(plain, num_beams=1, do_sample=False, repetition_penalty=1.2)
    ngram = SimpleNamespace(no_repeat_ngram_size=3)
    assert "no_repeat_ngram_size" in supported(ngram, num_beams=1, do_sample=False, repetition_penalty=1.0)
    neutral = SimpleNamespace(no_repeat_ngram_size=0, encoder_repetition_penalty=1.0, bad_words_ids=None)
    assert supported(neutral, num_beams=1, do_sample=False, repetition_penalty=1.0) is None


def test_a_checkpoint_config_with_an_extra_processor_keeps_generate(pair, pixels):
    plain, static = pair
    params = CaptionParams(max_new_tokens=10)
    for m in pair:
        m._model.generation_config.no_repeat_ngram_size = 2
    try:
        assert torch.equal(static.generate_ids(pixels, params), plain.generate_ids(pixels, params))
    finally:
        for m in pair:
            m._model.generation_config.no_repeat_ngram_size = 0


def test_trim_stops_after_the_step_at_which_every_row_has_ended():
    eos, pad = 9, 0
    out = torch.tensor([[1, 5, 9, 0, 0, 0],
                        [1, 5, 6, 9, 0, 0]])
    assert torch.equal(_trim(out, 1, eos, pad), out[:, :4])
    running = torch.tensor([[1, 5, 9, 0], [1, 5, 6, 7]])
    assert torch.equal(_trim(running, 1, eos, pad), running)


def test_the_fixed_shape_step_is_reused_per_shape(shaped, pixels):
    """One set of buffers per (batch, length, prompt), reused: the second call of a shape must not
    see the first one's tokens, cache or finished rows."""
    params = CaptionParams(max_new_tokens=9)
    first = shaped.generate_ids(pixels, params)
    other = shaped.generate_ids(pixels[::-1].copy(), params)
    again = shaped.generate_ids(pixels, params)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (len(pixels), 1 + 9, 1) in shaped._static._graphs


def test_a_decoder_with_adapters_is_never_graphed(tiny_model_dir):
    """A graph replays the kernels of its capture: the per-row adapter routing (Python hooks) would
    be skipped, and a graph captured before an adapter was injected would write base captions."""
    from peft import LoraConfig, inject_adapter_in_model

    from imgq.worker.lora import TARGET_MODULES

    model = CaptionModel(str(tiny_model_dir), device="cpu", decode_loop="graphs")
    model.load()
    model._static = StaticGreedy(model._model, graphs=True)
    pixels = np.random.default_rng(1).standard_normal((2, 3, 384, 384)).astype(np.float32)
    params = CaptionParams(max_new_tokens=5)
    model.generate_ids(pixels, params)
    assert model._static._graphs and not model._static.tuned()
    model._static._graphs.clear()
    inject_adapter_in_model(LoraConfig(target_modules=TARGET_MODULES, r=2), model._model)
    assert model._static.tuned()
    model.generate_ids(pixels, params)
    assert not model._static._graphs, "a decoder with LoRA layers was graphed"
