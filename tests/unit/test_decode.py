"""A bad-input corpus built in memory: every case is generated here, no binary fixtures."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from imgq import errors
from imgq.worker.decode import ALLOWED_FORMATS, DecodedImage, decode

LIMIT = 40_000_000  # the IMGQ_MAX_PIXELS default

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w: int = 64, h: int = 48) -> Image.Image:
    """A smooth RGB picture: compresses like a photo, so truncation lands inside entropy data."""
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def _jpeg(w: int = 64, h: int = 48) -> bytes:
    return _save(_photo(w, h), "JPEG", quality=90)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(w: int, h: int) -> bytes:
    """A valid-looking PNG that claims w x h but carries a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_claiming(w: int, h: int) -> bytes:
    """A real JPEG whose SOF0 marker is rewritten to claim w x h."""
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _gif_first_frame_claiming(w: int, h: int) -> bytes:
    """A 10x10 GIF whose first frame descriptor claims w x h: Pillow grows the image to it."""
    data = bytearray(_save(Image.new("P", (10, 10)), "GIF"))
    desc = data.index(b",", 13)
    data[desc + 5 : desc + 9] = struct.pack("<HH", w, h)
    return bytes(data)


def _webp_canvas_claiming(w: int, h: int) -> bytes:
    """An animated WebP whose VP8X chunk claims a w x h canvas."""
    data = bytearray(_animated("WEBP"))
    vp8x = data.index(b"VP8X")
    data[vp8x + 12 : vp8x + 18] = (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return bytes(data)


def _truncated_jpeg() -> bytes:
    data = _jpeg(256, 256)
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    data = _save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), np.uint8)), "PNG")
    return data[: len(data) // 2]


def _random_bytes() -> bytes:
    return np.random.default_rng(1234).bytes(4096)


def _tga() -> bytes:
    return _save(_photo(), "TGA")


def _ico() -> bytes:
    return _save(_photo(32, 32), "ICO")


def _ppm() -> bytes:
    return _save(_photo(), "PPM")


# (name, bytes factory, max_pixels, expected error class)
BAD_INPUTS: list[tuple[str, Callable[[], bytes], int, type[errors.Permanent]]] = [
    ("zero bytes", lambda: b"", LIMIT, errors.Empty),
    ("html named .jpg", lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", LIMIT,
     errors.NotAnImage),
    ("pdf", lambda: b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n", LIMIT,
     errors.NotAnImage),
    ("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', LIMIT,
     errors.NotAnImage),
    ("random bytes", _random_bytes, LIMIT, errors.NotAnImage),
    ("truncated jpeg", _truncated_jpeg, LIMIT, errors.Truncated),
    ("jpeg cut inside header", lambda: _jpeg()[:40], LIMIT, errors.Truncated),
    ("truncated png", _truncated_png, LIMIT, errors.Truncated),
    ("png signature only", lambda: b"\x89PNG\r\n\x1a\n", LIMIT, errors.Truncated),
    ("png header 20000x20000", lambda: _png_header_only(20_000, 20_000), LIMIT, errors.TooManyPixels),
    # 144 Mpx: above Pillow's warning threshold (89 Mpx), below its error threshold (179 Mpx).
    ("png header 12000x12000", lambda: _png_header_only(12_000, 12_000), LIMIT, errors.TooManyPixels),
    ("jpeg sof 30000x30000", lambda: _jpeg_claiming(30_000, 30_000), LIMIT, errors.TooManyPixels),
    ("gif frame 12000x12000 in 10x10 screen", lambda: _gif_first_frame_claiming(12_000, 12_000), LIMIT,
     errors.TooManyPixels),
    ("webp canvas 12000x12000", lambda: _webp_canvas_claiming(12_000, 12_000), LIMIT, errors.TooManyPixels),
    # Beyond 2 x Image.MAX_IMAGE_PIXELS: the WebP parser itself raises DecompressionBombError.
    ("webp canvas 16384x16384", lambda: _webp_canvas_claiming(16_384, 16_384), LIMIT, errors.TooManyPixels),
    ("small png over tiny limit", lambda: _save(_photo(64, 48), "PNG"), 64 * 48 - 1, errors.TooManyPixels),
    ("ico", _ico, LIMIT, errors.UnsupportedFormat),
    ("tga", _tga, LIMIT, errors.UnsupportedFormat),
    ("ppm", _ppm, LIMIT, errors.UnsupportedFormat),
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
    data = _save(_photo(64, 48), "PNG")
    assert decode(data, max_pixels=64 * 48).width == 64


def _pixel(d: DecodedImage, x: int, y: int) -> tuple[int, ...]:
    return tuple(d.image.getpixel((x, y)))  # type: ignore[arg-type]


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 8) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def _cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # full M+Y: red


def _gradient16_png() -> bytes:
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    return _save(Image.fromarray(np.tile(ramp, (8, 1))), "PNG")


def _palette_png_transparent() -> bytes:
    im = Image.new("P", (8, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(0, (0, 0, 4, 4))  # left half: index 0, declared transparent below
    return _save(im, "PNG", transparency=0)


def _rgba_png() -> bytes:
    a = np.zeros((4, 12, 4), np.uint8)
    a[:, 0:4] = (0, 0, 0, 0)  # fully transparent black: must come out white
    a[:, 4:8] = (255, 0, 0, 255)
    a[:, 8:12] = (0, 0, 255, 128)  # half-transparent blue over white
    return _save(Image.fromarray(a, "RGBA"), "PNG")


def _la_png() -> bytes:
    a = np.zeros((4, 8, 2), np.uint8)
    a[:, 4:] = (0, 255)  # opaque black on the right, transparent black on the left
    return _save(Image.fromarray(a, "LA"), "PNG")


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated_jpeg() -> bytes:
    im = Image.new("RGB", (200, 100), RED)
    im.paste(BLUE, (100, 0, 200, 100))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": red ends on top
    return _save(im, "JPEG", exif=exif, quality=95)


def _exif_rotated_png_exif_last() -> bytes:
    """Orientation 6 in an eXIf chunk placed after the pixel data, which PNG allows."""
    im = Image.new("RGB", (200, 100), RED)
    im.paste(BLUE, (100, 0, 200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(im, "PNG", exif=exif)
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append(data[pos : pos + 12 + length])
        pos += 12 + length
    exif_chunk = next(c for c in chunks if c[4:8] == b"eXIf")
    others = [c for c in chunks if c is not exif_chunk]
    return data[:8] + b"".join(others[:-1]) + exif_chunk + others[-1]


def _one_bit_bmp() -> bytes:
    im = Image.new("1", (16, 8), 0)
    im.paste(1, (8, 0, 16, 8))
    return _save(im, "BMP")


def _float_tiff() -> bytes:
    return _save(Image.fromarray(np.tile(np.linspace(-5.0, 5.0, 64, dtype=np.float32), (4, 1))), "TIFF")


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
    ("rgb jpeg", _jpeg, "JPEG", (64, 48), lambda d: _close(_pixel(d, 0, 0), (0, 0, 255), 12)),
    ("grayscale jpeg", lambda: _save(Image.new("L", (8, 8), 77), "JPEG"), "JPEG", (8, 8),
     lambda d: _close(_pixel(d, 3, 3), (77, 77, 77), 2)),
    ("cmyk jpeg", _cmyk_jpeg, "JPEG", (16, 16), lambda d: _close(_pixel(d, 8, 8), RED, 12)),
    ("16-bit grey png", _gradient16_png, "PNG", (256, 8), _check_gradient),
    ("palette png with transparency", _palette_png_transparent, "PNG", (8, 4),
     lambda d: _pixel(d, 0, 0) == WHITE and _pixel(d, 7, 0) == RED),
    ("palette png opaque", lambda: _save(Image.new("RGB", (8, 8), GREEN).convert("P"), "PNG"), "PNG", (8, 8),
     lambda d: _pixel(d, 4, 4) == GREEN),
    ("rgba png", _rgba_png, "PNG", (12, 4),
     lambda d: _pixel(d, 1, 1) == WHITE and _pixel(d, 5, 1) == RED
     and _close(_pixel(d, 9, 1), (127, 127, 255), 1)),
    ("la png", _la_png, "PNG", (8, 4), lambda d: _pixel(d, 0, 0) == WHITE and _pixel(d, 7, 0) == (0, 0, 0)),
    ("animated gif", lambda: _animated("GIF"), "GIF", (16, 16), lambda d: _pixel(d, 8, 8) == RED),
    ("animated webp", lambda: _animated("WEBP"), "WEBP", (16, 16),
     lambda d: _close(_pixel(d, 8, 8), RED, 16)),
    ("exif orientation 6 jpeg", _exif_rotated_jpeg, "JPEG", (100, 200), _check_exif),
    ("exif orientation 6 png, eXIf after IDAT", _exif_rotated_png_exif_last, "PNG", (100, 200), _check_exif),
    ("1-bit bmp", _one_bit_bmp, "BMP", (16, 8),
     lambda d: _pixel(d, 0, 0) == (0, 0, 0) and _pixel(d, 15, 0) == WHITE),
    ("rgb tiff", lambda: _save(Image.new("RGB", (8, 8), BLUE), "TIFF"), "TIFF", (8, 8),
     lambda d: _pixel(d, 4, 4) == BLUE),
    ("float tiff", _float_tiff, "TIFF", (64, 4),
     lambda d: _pixel(d, 0, 0) == (0, 0, 0) and _pixel(d, 63, 0) == WHITE),
    ("lossless webp", lambda: _save(Image.new("RGB", (8, 8), GREEN), "WEBP", lossless=True), "WEBP", (8, 8),
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
    data = _jpeg(2000, 1000)
    d = decode(data, max_pixels=LIMIT, target=384)
    # 1000 // 384 = 2: the largest power-of-two reduction keeping both sides >= 384.
    assert d.image.size == (1000, 500)
    assert (d.width, d.height) == (2000, 1000)
    assert decode(data, max_pixels=LIMIT).image.size == (2000, 1000)


def test_target_is_ignored_for_formats_without_draft() -> None:
    d = decode(_save(_photo(800, 800), "PNG"), max_pixels=LIMIT, target=100)
    assert d.image.size == (800, 800)


def test_decoded_image_outlives_the_source_bytes() -> None:
    d = decode(_jpeg(), max_pixels=LIMIT)
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
