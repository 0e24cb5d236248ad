"""Image inputs generated in memory, good and bad: shared by the decoder unit tests and the e2e tests.

No binary fixtures: every case is built here from a few lines of Pillow, numpy or raw bytes, so a
reader can see exactly what each one is.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# -- building blocks ----------------------------------------------------------------------------
def save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int = 64, h: int = 48) -> Image.Image:
    """A smooth RGB picture: compresses like a photo, so truncation lands inside entropy data."""
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def jpeg(w: int = 64, h: int = 48) -> bytes:
    return save(photo(w, h), "JPEG", quality=90)


def scene(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A small 'ordinary' picture: a background and a few rectangles, different per seed."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        draw.rectangle((x0, y0, x0 + width // 3, y0 + height // 3), fill=tuple(rng.randrange(256) for _ in range(3)))
    return save(img, fmt)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# -- bad inputs ---------------------------------------------------------------------------------
def png_header_only(w: int, h: int) -> bytes:
    """A valid-looking PNG that claims w x h but carries a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def png_bomb(w: int = 40_000, h: int = 40_000) -> bytes:
    """A complete, valid 1-bit PNG of w x h white pixels: every row is really there, deflated.

    40000 x 40000 is 1.6 Gpx in ~200 kB: decoding it would take 1.6 GB in Pillow's mode "1" (one
    byte a pixel) and 4.8 GB as RGB, so a worker's peak memory shows whether it was refused unread.
    """
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    row = b"\x00" + b"\xff" * ((w + 7) // 8)  # filter byte "none", then the packed pixels
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(h)) + deflate.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_claiming(w: int, h: int) -> bytes:
    """A real JPEG whose SOF0 marker is rewritten to claim w x h."""
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def gif_first_frame_claiming(w: int, h: int) -> bytes:
    """A 10x10 GIF whose first frame descriptor claims w x h: Pillow grows the image to it."""
    data = bytearray(save(Image.new("P", (10, 10)), "GIF"))
    desc = data.index(b",", 13)
    data[desc + 5 : desc + 9] = struct.pack("<HH", w, h)
    return bytes(data)


def webp_canvas_claiming(w: int, h: int) -> bytes:
    """An animated WebP whose VP8X chunk claims a w x h canvas."""
    data = bytearray(animated("WEBP"))
    vp8x = data.index(b"VP8X")
    data[vp8x + 12 : vp8x + 18] = (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = jpeg(256, 256)
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    data = save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), np.uint8)), "PNG")
    return data[: len(data) // 2]


def random_bytes(n: int = 4096, seed: int = 1234) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def html_page() -> bytes:
    return b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n"


def pdf_document() -> bytes:
    return b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n"


def svg_document() -> bytes:
    return b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'


def tga() -> bytes:
    return save(photo(), "TGA")


def ico() -> bytes:
    return save(photo(32, 32), "ICO")


def ppm() -> bytes:
    return save(photo(), "PPM")


def oversized_jpeg(size: int) -> bytes:
    """A real JPEG padded with trailing bytes to exactly ``size`` bytes: only its size is wrong."""
    data = jpeg()
    assert size > len(data)
    return data + b"\x00" * (size - len(data))


# -- good but unusual inputs --------------------------------------------------------------------
def cmyk_jpeg() -> bytes:
    return save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # full M+Y: red


def grayscale_jpeg() -> bytes:
    return save(Image.new("L", (8, 8), 77), "JPEG")


def gradient16_png() -> bytes:
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    return save(Image.fromarray(np.tile(ramp, (8, 1))), "PNG")


def palette_png_transparent() -> bytes:
    im = Image.new("P", (8, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(0, (0, 0, 4, 4))  # left half: index 0, declared transparent below
    return save(im, "PNG", transparency=0)


def rgba_png() -> bytes:
    a = np.zeros((4, 12, 4), np.uint8)
    a[:, 0:4] = (0, 0, 0, 0)  # fully transparent black: must come out white
    a[:, 4:8] = (255, 0, 0, 255)
    a[:, 8:12] = (0, 0, 255, 128)  # half-transparent blue over white
    return save(Image.fromarray(a, "RGBA"), "PNG")


def la_png() -> bytes:
    a = np.zeros((4, 8, 2), np.uint8)
    a[:, 4:] = (0, 255)  # opaque black on the right, transparent black on the left
    return save(Image.fromarray(a, "LA"), "PNG")


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    """200x100 stored, EXIF orientation 6: displayed (and captioned) as 100x200."""
    im = Image.new("RGB", (200, 100), RED)
    im.paste(BLUE, (100, 0, 200, 100))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": red ends on top
    return save(im, "JPEG", exif=exif, quality=95)


def exif_rotated_png_exif_last() -> bytes:
    """Orientation 6 in an eXIf chunk placed after the pixel data, which PNG allows."""
    im = Image.new("RGB", (200, 100), RED)
    im.paste(BLUE, (100, 0, 200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = save(im, "PNG", exif=exif)
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append(data[pos : pos + 12 + length])
        pos += 12 + length
    exif_chunk = next(c for c in chunks if c[4:8] == b"eXIf")
    others = [c for c in chunks if c is not exif_chunk]
    return data[:8] + b"".join(others[:-1]) + exif_chunk + others[-1]


def one_bit_bmp() -> bytes:
    im = Image.new("1", (16, 8), 0)
    im.paste(1, (8, 0, 16, 8))
    return save(im, "BMP")


def rgb_tiff() -> bytes:
    return save(Image.new("RGB", (8, 8), BLUE), "TIFF")


def float_tiff() -> bytes:
    return save(Image.fromarray(np.tile(np.linspace(-5.0, 5.0, 64, dtype=np.float32), (4, 1))), "TIFF")


def lossless_webp() -> bytes:
    return save(Image.new("RGB", (8, 8), GREEN), "WEBP", lossless=True)


# -- the end-to-end corpus ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Case:
    """One object of the e2e corpus: stored under ``name``; ``code`` is the expected dead-letter
    code, or None when the item must end captioned. ``data`` None: the object is never stored."""

    name: str
    data: Callable[[], bytes] | None
    code: str | None = None
    size: tuple[int, int] | None = None  # expected (width, height) of a captioned item


def e2e_cases(*, max_pixels: int, max_object_bytes: int) -> list[Case]:
    """Bad inputs and good-but-unusual inputs, for a worker run with these two limits.

    ``max_pixels`` must be below 2048*2048 (one real PNG exceeds only the configured limit) and
    ``max_object_bytes`` above the decompression bomb's ~50 kB.
    """
    assert 256 * 256 < max_pixels < 2048 * 2048, max_pixels
    assert max_object_bytes > 200_000, max_object_bytes
    return [
        # permanent failures, one code each
        Case("truncated.jpg", truncated_jpeg, "truncated"),
        Case("truncated.png", truncated_png, "truncated"),
        Case("jpeg-cut-in-header.jpg", lambda: jpeg()[:40], "truncated"),
        Case("zero-bytes.jpg", lambda: b"", "empty"),
        Case("html-page.jpg", html_page, "not_an_image"),
        Case("document.pdf.jpg", pdf_document, "not_an_image"),
        Case("drawing-svg.jpg", svg_document, "not_an_image"),
        Case("random-bytes.jpg", random_bytes, "not_an_image"),
        Case("over-configured-pixel-limit.png",
             lambda: save(Image.new("RGB", (2048, 2048), GREEN), "PNG"), "too_many_pixels"),
        Case("header-claims-20000x20000.png", lambda: png_header_only(20_000, 20_000), "too_many_pixels"),
        Case("bomb-40000x40000-1bit.png", png_bomb, "too_many_pixels"),
        Case("sof-claims-30000x30000.jpg", lambda: jpeg_claiming(30_000, 30_000), "too_many_pixels"),
        Case("gif-frame-12000x12000.gif", lambda: gif_first_frame_claiming(12_000, 12_000), "too_many_pixels"),
        Case("webp-canvas-16384x16384.webp", lambda: webp_canvas_claiming(16_384, 16_384), "too_many_pixels"),
        Case("icon.ico", ico, "unsupported_format"),
        Case("targa.tga", tga, "unsupported_format"),
        Case("too-large.jpg", lambda: oversized_jpeg(max_object_bytes + 1), "too_large"),
        Case("missing.jpg", None, "not_found"),
        # good but unusual: each must end with a caption
        Case("cmyk.jpg", cmyk_jpeg, size=(16, 16)),
        Case("grey16.png", gradient16_png, size=(256, 8)),
        Case("palette-transparent.png", palette_png_transparent, size=(8, 4)),
        Case("animated.gif", lambda: animated("GIF"), size=(16, 16)),
        Case("animated.webp", lambda: animated("WEBP"), size=(16, 16)),
        Case("exif-rotated.jpg", exif_rotated_jpeg, size=(100, 200)),
        Case("exif-last-rotated.png", exif_rotated_png_exif_last, size=(100, 200)),
        Case("grayscale.jpg", grayscale_jpeg, size=(8, 8)),
        Case("rgba.png", rgba_png, size=(12, 4)),
        Case("la.png", la_png, size=(8, 4)),
        Case("lossless.webp", lossless_webp, size=(8, 8)),
        Case("rgb.tiff", rgb_tiff, size=(8, 8)),
        Case("float.tiff", float_tiff, size=(64, 4)),
        Case("one-bit.bmp", one_bit_bmp, size=(16, 8)),
        Case("square-256.png", lambda: save(Image.new("RGB", (256, 256), BLUE), "PNG"), size=(256, 256)),
    ]


def ordinary_cases(n: int) -> list[Case]:
    """``n`` plain small JPEG and PNG pictures."""
    sizes = [(64, 48), (48, 64), (97, 131), (128, 96), (40, 40)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        fmt = "PNG" if i % 4 == 3 else "JPEG"
        out.append(Case(f"ordinary-{i:02d}.{fmt.lower()}",
                        lambda w=w, h=h, i=i, fmt=fmt: scene(w, h, i, fmt), size=(w, h)))
    return out
