"""The fast preprocessor against transformers' own BLIP image processor, and the other resize modes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from imgq.worker.preprocess import Preprocessor

# Measured: at most 2.4e-7 (one float32 ulp near 1.0). The pixels after resizing are identical;
# only the affine step differs, float64 look-up table here vs float32 arithmetic there.
TOLERANCE = 1e-5

SIZES = [(640, 480), (300, 500), (1, 1), (3, 7), (384, 384), (1000, 13), (17, 2049)]


@pytest.fixture(scope="module")
def processor() -> Any:
    transformers = pytest.importorskip("transformers")
    # BlipImageProcessor needs torchvision; the PIL backend is what it falls back to without it.
    return transformers.BlipImageProcessorPil(size={"height": 384, "width": 384})


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(("w", "h"), SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_stretch_matches_blip_image_processor(processor: Any, w: int, h: int) -> None:
    image = _noise(w, h, seed=w * 7919 + h)
    expected = processor(image, return_tensors="np")["pixel_values"][0]
    actual = Preprocessor.from_image_processor(processor)(image)
    assert actual.shape == expected.shape == (3, 384, 384)
    assert actual.dtype == np.float32 and actual.flags.c_contiguous
    assert float(np.abs(actual - expected).max()) < TOLERANCE


def test_from_image_processor_reads_its_settings() -> None:
    transformers = pytest.importorskip("transformers")
    custom = transformers.BlipImageProcessorPil(
        size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.25] * 3,
        resample=Image.BILINEAR, rescale_factor=1 / 127.5,
    )
    pre = Preprocessor.from_image_processor(custom)
    assert (pre.size, pre.mean, pre.std, pre.resample) == (224, (0.5,) * 3, (0.25,) * 3, Image.BILINEAR)
    image = _noise(50, 80)
    expected = custom(image, return_tensors="np")["pixel_values"][0]
    assert float(np.abs(pre(image) - expected).max()) < TOLERANCE


def test_from_image_processor_refuses_non_square() -> None:
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="square"):
        Preprocessor.from_image_processor(
            transformers.BlipImageProcessorPil(size={"height": 384, "width": 256})
        )


def _top_bottom(w: int, h: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    im = Image.new("RGB", (w, h), top)
    im.paste(bottom, (0, h // 2, w, h))
    return im


def _value(pre: Preprocessor, rgb: tuple[int, int, int]) -> np.ndarray:
    """What a solid pixel of colour ``rgb`` normalizes to, per channel."""
    return ((np.array(rgb) / 255 - np.array(pre.mean)) / np.array(pre.std)).astype(np.float32)


def test_letterbox_of_a_wide_image_pads_top_and_bottom_with_zeros() -> None:
    pre = Preprocessor(size=64)
    out = pre(Image.new("RGB", (200, 100), (255, 0, 0)), mode="letterbox")
    assert out.shape == (3, 64, 64) and out.flags.c_contiguous
    # 200x100 -> 64x32, centred: rows 0..15 and 48..63 are padding.
    assert np.all(out[:, :16] == 0.0) and np.all(out[:, 48:] == 0.0)
    assert np.allclose(out[:, 16:48], _value(pre, (255, 0, 0))[:, None, None], atol=1e-5)


def test_letterbox_of_a_tall_image_pads_left_and_right() -> None:
    pre = Preprocessor(size=64)
    out = pre(Image.new("RGB", (50, 200), (0, 0, 255)), mode="letterbox")
    # 50x200 -> 16x64 (50 * 64 / 200 = 16), centred: columns 24..39 are the picture.
    assert np.all(out[:, :, :24] == 0.0) and np.all(out[:, :, 40:] == 0.0)
    assert np.allclose(out[:, :, 24:40], _value(pre, (0, 0, 255))[:, None, None], atol=1e-5)


def test_letterbox_of_a_square_image_is_stretch() -> None:
    pre = Preprocessor(size=32)
    image = _noise(96, 96)
    assert np.array_equal(pre(image, "letterbox"), pre(image, "stretch"))


def test_center_crop_of_a_2_to_1_image_keeps_the_middle() -> None:
    pre = Preprocessor(size=64)
    # Quarters across: red | green | green | red. The middle half is all green.
    im = Image.new("RGB", (400, 200), (255, 0, 0))
    im.paste((0, 255, 0), (100, 0, 300, 200))
    out = pre(im, mode="center_crop")
    assert out.shape == (3, 64, 64)
    # Bicubic support reaches one output pixel past the crop (as resize-then-crop does too),
    # so the outermost columns carry a trace of red; everything inside is pure green.
    assert np.allclose(out[:, :, 1:-1], _value(pre, (0, 255, 0))[:, None, None], atol=1e-5)
    assert np.all(out[1] > 1.5), "a column of the red quarters survived the crop"
    # The same picture stretched keeps red at its edges, so the crop really removed them.
    assert np.allclose(pre(im, "stretch")[:, :, 0], _value(pre, (255, 0, 0))[:, None], atol=1e-5)


def test_center_crop_of_a_tall_image_keeps_the_vertical_middle() -> None:
    pre = Preprocessor(size=32)
    im = _top_bottom(100, 300, (0, 0, 0), (255, 255, 255))
    out = pre(im, mode="center_crop")
    # The crop spans rows 100..200 of 300: its top half is black, its bottom half white.
    assert np.allclose(out[:, 2], _value(pre, (0, 0, 0))[:, None], atol=1e-5)
    assert np.allclose(out[:, -3], _value(pre, (255, 255, 255))[:, None], atol=1e-5)


def test_center_crop_matches_resize_shortest_side_then_crop() -> None:
    pre = Preprocessor(size=64)
    image = _noise(256, 128)
    resized = image.resize((128, 64), Image.BICUBIC).crop((32, 0, 96, 64))
    assert np.array_equal(pre(image, "center_crop"), pre(resized, "stretch"))


@pytest.mark.parametrize("mode", ["stretch", "center_crop", "letterbox"])
def test_every_mode_gives_a_contiguous_float32_square(mode: str) -> None:
    out = Preprocessor(size=48)(_noise(37, 91), mode=mode)  # type: ignore[arg-type]
    assert out.shape == (3, 48, 48) and out.dtype == np.float32 and out.flags.c_contiguous


def test_unknown_mode_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown resize mode"):
        Preprocessor(size=8)(_noise(8, 8), mode="squash")  # type: ignore[arg-type]


def test_non_rgb_input_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="RGB"):
        Preprocessor(size=8)(Image.new("RGBA", (8, 8)))
