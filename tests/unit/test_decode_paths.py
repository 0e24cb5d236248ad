"""Paths of worker/decode.py the corpus tests reached without pinning (mutation testing found them):
exact pixels of the white background (alpha and an RGB colour key), orientation 2 (a mirror),
32-bit integer images, MPO (a phone JPEG with extra pictures), and the exact error texts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgq import errors
from imgq.worker.decode import _to_rgb, decode
from tests.corpus import jpeg_claiming, png_header_only, save, webp_canvas_claiming

LIMIT = 40_000_000


def pixels(data: bytes, **kw: object) -> np.ndarray:
    return np.asarray(decode(data, max_pixels=LIMIT, **kw).image)  # type: ignore[arg-type]


def test_transparent_pixels_become_exactly_white_and_opaque_ones_keep_their_colour():
    a = np.zeros((2, 4, 4), np.uint8)
    a[:, :2] = (10, 20, 30, 0)  # transparent: white whatever colour hides there
    a[:, 2:] = (10, 20, 30, 255)
    for mode, image in (("RGBA", Image.fromarray(a, "RGBA")), ("LA", Image.fromarray(a, "RGBA").convert("LA"))):
        got = pixels(save(image, "PNG"))
        assert got[0, 0].tolist() == [255, 255, 255], mode
        assert got[0, 3].tolist() == ([10, 20, 30] if mode == "RGBA" else [18] * 3), mode


def test_an_rgb_png_with_a_colour_key_shows_white_where_the_key_colour_was():
    a = np.zeros((2, 4, 3), np.uint8)
    a[:, 2:] = (200, 100, 50)
    data = save(Image.fromarray(a, "RGB"), "PNG", transparency=(0, 0, 0))
    got = pixels(data)
    assert got[0, 0].tolist() == [255, 255, 255]
    assert got[0, 3].tolist() == [200, 100, 50]


def test_an_rgb_image_without_transparency_is_returned_as_it_is():
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    assert _to_rgb(image) is image


@pytest.mark.parametrize("mode", ["I", "I;16", "F"])
def test_high_depth_modes_are_scaled_not_clipped(mode):
    a = np.array([[0, 1000], [2000, 4000]], dtype=np.float32 if mode == "F" else np.int32)
    image = Image.fromarray(a.astype(np.uint16) if mode == "I;16" else a, mode if mode != "I;16" else None)
    if mode == "I;16":
        assert image.mode == "I;16"
    got = np.asarray(_to_rgb(image))
    assert got.shape == (2, 2, 3) and got[..., 0].max() > got[..., 0].min()
    # Not clipped at 255 as Pillow's convert("L") would: 1000, 2000 and 4000 stay apart.
    assert got[0, 0, 0] < got[0, 1, 0] < got[1, 0, 0] < got[1, 1, 0]


def test_orientation_2_is_mirrored():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 2  # "mirror horizontally to display"
    got = pixels(save(image, "PNG", exif=exif))
    assert got[10, 2].tolist() == [0, 0, 255] and got[10, 37].tolist() == [255, 0, 0]


def test_orientation_1_is_left_as_it_is():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 1
    got = pixels(save(image, "PNG", exif=exif))
    assert got[10, 2].tolist() == [255, 0, 0]


def mpo(w: int = 800, h: int = 600) -> bytes:
    first, second = Image.new("RGB", (w, h), (250, 10, 10)), Image.new("RGB", (w, h), (10, 10, 250))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    return buf.getvalue()


def test_an_mpo_is_a_jpeg_decoded_from_its_first_picture_with_the_draft_path():
    data = mpo()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    d = decode(data, max_pixels=LIMIT)
    assert d.format == "JPEG" and (d.width, d.height) == (800, 600)
    assert np.asarray(d.image)[0, 0, 0] > 200  # the first picture (red), not the second
    small = decode(data, max_pixels=LIMIT, target=200)
    assert small.image.size == (400, 300) and (small.width, small.height) == (800, 600)


@pytest.mark.parametrize(("factory", "kind", "message"), [
    (lambda: jpeg_claiming(30_000, 30_000), errors.TooManyPixels,
     "JPEG is 30000x30000 = 900000000 pixels; the limit is 40000000"),
    (lambda: png_header_only(20_000, 20_000), errors.TooManyPixels,
     "PNG is 20000x20000 = 400000000 pixels; the limit is 40000000"),
    # Pillow's own words follow (they vary between its versions).
    (lambda: b"\x89PNG\r\n\x1a\n", errors.Truncated, "corrupt image header (SyntaxError: "),
])
def test_refusals_name_the_format_and_the_sizes(factory, kind, message):
    with pytest.raises(kind) as info:
        decode(factory(), max_pixels=LIMIT)
    assert str(info.value).startswith(message)


def test_a_webp_canvas_over_pillows_own_limit_keeps_pillows_message():
    with pytest.raises(errors.TooManyPixels) as info:
        decode(webp_canvas_claiming(16_384, 16_384), max_pixels=LIMIT)
    assert str(info.value).startswith("Image size (268435456 pixels) exceeds limit")
