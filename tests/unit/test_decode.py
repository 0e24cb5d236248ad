"""A bad-input corpus built in memory: every case is generated here, no binary fixtures."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from imgq import errors
from imgq.worker.decode import ALLOWED_FORMATS, DecodedImage, decode
from tests.corpus import (
    BLUE,
    GREEN,
    RED,
    WHITE,
    animated,
    cmyk_jpeg,
    exif_rotated_jpeg,
    exif_rotated_png_exif_last,
    float_tiff,
    gif_first_frame_claiming,
    gradient16_png,
    ico,
    jpeg,
    jpeg_claiming,
    la_png,
    one_bit_bmp,
    palette_png_transparent,
    photo,
    png_header_only,
    ppm,
    random_bytes,
    rgba_png,
    save,
    tga,
    truncated_jpeg,
    truncated_png,
    webp_canvas_claiming,
)

LIMIT = 40_000_000  # the IMGQ_MAX_PIXELS default

# (name, bytes factory, max_pixels, expected error class)
BAD_INPUTS: list[tuple[str, Callable[[], bytes], int, type[errors.Permanent]]] = [
    ("zero bytes", lambda: b"", LIMIT, errors.Empty),
    ("html named .jpg", lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", LIMIT,
     errors.NotAnImage),
    ("pdf", lambda: b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n", LIMIT,
     errors.NotAnImage),
    ("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', LIMIT,
     errors.NotAnImage),
    ("random bytes", random_bytes, LIMIT, errors.NotAnImage),
    ("truncated jpeg", truncated_jpeg, LIMIT, errors.Truncated),
    ("jpeg cut inside header", lambda: jpeg()[:40], LIMIT, errors.Truncated),
    ("truncated png", truncated_png, LIMIT, errors.Truncated),
    ("png signature only", lambda: b"\x89PNG\r\n\x1a\n", LIMIT, errors.Truncated),
    ("png header 20000x20000", lambda: png_header_only(20_000, 20_000), LIMIT, errors.TooManyPixels),
    # 144 Mpx: above Pillow's warning threshold (89 Mpx), below its error threshold (179 Mpx).
    ("png header 12000x12000", lambda: png_header_only(12_000, 12_000), LIMIT, errors.TooManyPixels),
    ("jpeg sof 30000x30000", lambda: jpeg_claiming(30_000, 30_000), LIMIT, errors.TooManyPixels),
    ("gif frame 12000x12000 in 10x10 screen", lambda: gif_first_frame_claiming(12_000, 12_000), LIMIT,
     errors.TooManyPixels),
    ("webp canvas 12000x12000", lambda: webp_canvas_claiming(12_000, 12_000), LIMIT, errors.TooManyPixels),
    # Beyond 2 x Image.MAX_IMAGE_PIXELS: the WebP parser itself raises DecompressionBombError.
    ("webp canvas 16384x16384", lambda: webp_canvas_claiming(16_384, 16_384), LIMIT, errors.TooManyPixels),
    ("small png over tiny limit", lambda: save(photo(64, 48), "PNG"), 64 * 48 - 1, errors.TooManyPixels),
    ("ico", ico, LIMIT, errors.UnsupportedFormat),
    ("tga", tga, LIMIT, errors.UnsupportedFormat),
    ("ppm", ppm, LIMIT, errors.UnsupportedFormat),
]


@pytest.mark.parametrize(
    ("factory", "max_pixels", "expected"),
    [pytest.param(f, m, e, id=name) for name, f, m, e in BAD_INPUTS],
)
def test_bad_input_raises_its_permanent_code(
    factory: Callable[[], bytes], max_pixels: int, expected: type[errors.Permanent]
) -> None:
    data = factory()
    # Recorded, not turned into errors: an escaping DecompressionBombWarning must fail the test,
    # not be rescued by the decoder's own exception mapping.
    with warnings.catch_warnings(record=True) as caught, pytest.raises(errors.Permanent) as info:
        warnings.simplefilter("always")
        decode(data, max_pixels=max_pixels)
    assert not caught, [str(w.message) for w in caught]
    assert type(info.value) is expected, info.value
    assert info.value.code == expected.code


def test_pixel_limit_is_inclusive() -> None:
    data = save(photo(64, 48), "PNG")
    assert decode(data, max_pixels=64 * 48).width == 64


def _pixel(d: DecodedImage, x: int, y: int) -> tuple[int, ...]:
    return tuple(d.image.getpixel((x, y)))  # type: ignore[arg-type]


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 8) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def _check_gradient(d: DecodedImage) -> None:
    row = np.asarray(d.image)[0, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253, "range lost: the ramp should span black to white"
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200, "gradient flattened"
    assert np.array_equal(np.asarray(d.image)[..., 0], np.asarray(d.image)[..., 2]), "grey should be grey"


def _check_exif(d: DecodedImage) -> None:
    assert (d.width, d.height) == (100, 200) == d.image.size
    assert _close(_pixel(d, 50, 20), RED) and _close(_pixel(d, 50, 180), BLUE)


# (name, bytes factory, format, (width, height), check of the decoded image)
GOOD_INPUTS: list[tuple[str, Callable[[], bytes], str, tuple[int, int], Callable[[DecodedImage], object]]] = [
    ("rgb jpeg", jpeg, "JPEG", (64, 48), lambda d: _close(_pixel(d, 0, 0), (0, 0, 255), 12)),
    ("grayscale jpeg", lambda: save(Image.new("L", (8, 8), 77), "JPEG"), "JPEG", (8, 8),
     lambda d: _close(_pixel(d, 3, 3), (77, 77, 77), 2)),
    ("cmyk jpeg", cmyk_jpeg, "JPEG", (16, 16), lambda d: _close(_pixel(d, 8, 8), RED, 12)),
    ("16-bit grey png", gradient16_png, "PNG", (256, 8), _check_gradient),
    ("palette png with transparency", palette_png_transparent, "PNG", (8, 4),
     lambda d: _pixel(d, 0, 0) == WHITE and _pixel(d, 7, 0) == RED),
    ("palette png opaque", lambda: save(Image.new("RGB", (8, 8), GREEN).convert("P"), "PNG"), "PNG", (8, 8),
     lambda d: _pixel(d, 4, 4) == GREEN),
    ("rgba png", rgba_png, "PNG", (12, 4),
     lambda d: _pixel(d, 1, 1) == WHITE and _pixel(d, 5, 1) == RED
     and _close(_pixel(d, 9, 1), (127, 127, 255), 1)),
    ("la png", la_png, "PNG", (8, 4), lambda d: _pixel(d, 0, 0) == WHITE and _pixel(d, 7, 0) == (0, 0, 0)),
    ("animated gif", lambda: animated("GIF"), "GIF", (16, 16), lambda d: _pixel(d, 8, 8) == RED),
    ("animated webp", lambda: animated("WEBP"), "WEBP", (16, 16),
     lambda d: _close(_pixel(d, 8, 8), RED, 16)),
    ("exif orientation 6 jpeg", exif_rotated_jpeg, "JPEG", (100, 200), _check_exif),
    ("exif orientation 6 png, eXIf after IDAT", exif_rotated_png_exif_last, "PNG", (100, 200), _check_exif),
    ("1-bit bmp", one_bit_bmp, "BMP", (16, 8),
     lambda d: _pixel(d, 0, 0) == (0, 0, 0) and _pixel(d, 15, 0) == WHITE),
    ("rgb tiff", lambda: save(Image.new("RGB", (8, 8), BLUE), "TIFF"), "TIFF", (8, 8),
     lambda d: _pixel(d, 4, 4) == BLUE),
    ("float tiff", float_tiff, "TIFF", (64, 4),
     lambda d: _pixel(d, 0, 0) == (0, 0, 0) and _pixel(d, 63, 0) == WHITE),
    ("lossless webp", lambda: save(Image.new("RGB", (8, 8), GREEN), "WEBP", lossless=True), "WEBP", (8, 8),
     lambda d: _pixel(d, 4, 4) == GREEN),
]


@pytest.mark.parametrize(
    ("factory", "fmt", "size", "check"),
    [pytest.param(f, fmt, s, c, id=name) for name, f, fmt, s, c in GOOD_INPUTS],
)
def test_good_input_decodes_to_rgb(
    factory: Callable[[], bytes], fmt: str, size: tuple[int, int], check: Callable[[DecodedImage], object]
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = decode(factory(), max_pixels=LIMIT)
    assert not caught, [str(w.message) for w in caught]
    assert d.format == fmt and fmt in ALLOWED_FORMATS
    assert (d.width, d.height) == size == d.image.size
    assert d.image.mode == "RGB"
    result = check(d)
    assert result is None or result is True, f"pixel check failed: {result!r}"


def test_jpeg_target_decodes_at_reduced_scale_but_reports_original_size() -> None:
    data = jpeg(2000, 1000)
    d = decode(data, max_pixels=LIMIT, target=384)
    # 1000 // 384 = 2: the largest power-of-two reduction keeping both sides >= 384.
    assert d.image.size == (1000, 500)
    assert (d.width, d.height) == (2000, 1000)
    assert decode(data, max_pixels=LIMIT).image.size == (2000, 1000)


def test_target_is_ignored_for_formats_without_draft() -> None:
    d = decode(save(photo(800, 800), "PNG"), max_pixels=LIMIT, target=100)
    assert d.image.size == (800, 800)


def test_decoded_image_outlives_the_source_bytes() -> None:
    d = decode(jpeg(), max_pixels=LIMIT)
    assert np.asarray(d.image).shape == (48, 64, 3)


def test_threads_agree_with_serial_decoding() -> None:
    cases = [(f, m) for _, f, m, _ in BAD_INPUTS] + [(f, LIMIT) for _, f, _, _, _ in GOOD_INPUTS]
    corpus = [(f(), m) for f, m in cases] * 4

    def outcome(item: tuple[bytes, int]) -> object:
        try:
            d = decode(item[0], max_pixels=item[1])
        except errors.Permanent as exc:
            return exc.code
        return d.format, d.image.size, np.asarray(d.image).tobytes()

    serial = [outcome(item) for item in corpus]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(outcome, corpus)) == serial
