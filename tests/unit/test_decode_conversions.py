"""The decoder's guards and conversions that mutation testing found unchecked: the GIF extent read
before Pillow parses (its bomb check), the exact 16-bit/32-bit/float to 8-bit conversion, the
full-scale rule it uses, and naming a refused format that only a header parse recognises (TGA)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from imgq import errors
from imgq.worker.decode import _check_gif_extent, _high_depth_to_rgb, _nominal_range, decode

LIMIT = 10_000


def gif(screen: tuple[int, int], *, flags: int = 0, table: bytes = b"", blocks: bytes = b"") -> bytes:
    """A GIF's header (logical screen ``screen``), global colour table and blocks, as bytes."""
    return b"GIF89a" + struct.pack("<HH", *screen) + bytes([flags, 0, 0]) + table + blocks


def frame(x: int, y: int, w: int, h: int, *, packed: bool = True) -> bytes:
    """An image descriptor: separator, left, top, width, height (and its packed-fields byte)."""
    return b"\x2c" + struct.pack("<HHHH", x, y, w, h) + (b"\x00" if packed else b"")


def refused(width: int, height: int) -> str:
    return f"GIF is {width}x{height} = {width * height} pixels; the limit is {LIMIT}"


def check(data: bytes) -> str | None:
    try:
        _check_gif_extent(data, LIMIT)
    except errors.TooManyPixels as exc:
        return str(exc)
    return None


# A global colour table of 2 ** (n + 1) entries, 3 bytes each, follows the header when flag 0x80 is set.
TABLE_4 = bytes(12)  # flags 0x81: 4 entries
GRAPHIC_CONTROL = b"\x21\xf9\x04\x05\x0a\x00\x01\x00"  # label, 4-byte sub-block, terminator
COMMENT = b"\x21\xfe\x03abc\x05hello\x00"  # two sub-blocks, then the terminator


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # The header alone (13 bytes): the logical screen is all there is to check.
        (gif((200, 100)), refused(200, 100)),
        (gif((40000, 1)), refused(40000, 1)),  # unsigned 16-bit sizes
        (gif((50, 50)), None),
        # The first frame grows the canvas past the screen (Pillow would grow it, then bomb-check).
        (gif((10, 10), blocks=frame(10, 20, 91, 80)), refused(101, 100)),
        (gif((10, 10), blocks=frame(10, 20, 90, 80)), None),  # exactly the limit
        (gif((10, 10), blocks=frame(0, 0, 40000, 1)), refused(40000, 10)),
        # The size bits without the table flag: no table to skip.
        (gif((10, 10), flags=0x07, blocks=frame(1, 2, 100, 100)), refused(101, 102)),
        (gif((10, 10), flags=0x01, blocks=frame(1, 2, 100, 100)), refused(101, 102)),
        # With a table: the descriptor comes after it.
        (gif((10, 10), flags=0x81, table=TABLE_4, blocks=frame(3, 4, 100, 100)), refused(103, 104)),
        # Extensions before the frame are skipped sub-block by sub-block.
        (gif((10, 10), flags=0x81, table=TABLE_4, blocks=GRAPHIC_CONTROL + COMMENT + frame(0, 0, 200, 60)),
         refused(200, 60)),
        # A descriptor cut short after its four sizes is still read; one cut shorter is not.
        (gif((10, 10), blocks=frame(0, 0, 200, 60, packed=False)), refused(200, 60)),
        (gif((10, 10), blocks=frame(0, 0, 200, 60, packed=False)[:6]), None),
        # Data that ends right after the table or inside an extension: the screen decides.
        (gif((200, 100), flags=0x81, table=TABLE_4), refused(200, 100)),
        (gif((200, 100), blocks=b"\x21\xfe\x03abc"), refused(200, 100)),
        # Anything else (the trailer) ends the walk: what follows is not a frame.
        (gif((10, 10), blocks=b"\x3b" + struct.pack("<HHHH", 0, 0, 500, 500)), None),
        (gif((200, 100), blocks=b"\x3b"), refused(200, 100)),
    ],
)
def test_a_gif_is_checked_against_its_first_frames_extent_before_pillow_parses_it(data: bytes, message):
    assert check(data) == message


def test_decode_refuses_a_gif_whose_first_frame_outgrows_its_screen():
    buf = io.BytesIO()
    Image.new("P", (50, 40)).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", 10, 10)  # the screen says 10x10; the frame is 50x40
    with pytest.raises(errors.TooManyPixels) as exc:
        decode(bytes(data), max_pixels=1000)
    assert str(exc.value) == "GIF is 50x40 = 2000 pixels; the limit is 1000"
    assert decode(bytes(data), max_pixels=2000).image.size == (50, 40)


@pytest.mark.parametrize(
    ("mode", "lo", "hi", "scale"),
    [
        ("I;16", 0, 70000, 65535.0),  # 16-bit samples are always against 65535
        ("I;16B", 0, 1, 65535.0),
        ("F", 0, 0.5, 1.0),
        ("F", 0, 1.0, 1.0),
        ("F", 0, 200, 255.0),
        ("F", 0, 255, 255.0),
        ("F", 0, 65535, 65535.0),
        ("F", 0, 70000, None),
        ("I", 0, 0.5, 255.0),  # 32-bit integers: 8-bit or 16-bit range, never 0..1
        ("I", 0, 255, 255.0),
        ("I", 0, 256, 65535.0),
        ("I", 0, 65535, 65535.0),
        ("I", 0, 65536, None),
        ("I", 0.5, 100, 255.0),
        ("I", -1, 100, None),  # negative samples: stretch min..max
        ("F", -0.5, 0.5, None),
    ],
)
def test_the_full_scale_is_the_smallest_nominal_range_that_holds_the_samples(mode, lo, hi, scale):
    assert _nominal_range(mode, lo, hi) == scale


def grey(im: Image.Image) -> list[list[int]]:
    rgb = np.asarray(_high_depth_to_rgb(im))
    assert rgb.dtype == np.uint8 and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0].tolist()


def test_16_bit_samples_scale_against_65535_and_round():
    im = Image.fromarray(np.array([[0, 128, 129, 1000, 60000, 65535]], dtype=np.uint16))
    assert im.mode == "I;16"
    assert grey(im) == [[0, 0, 1, 4, 233, 255]]


def test_a_dark_16_bit_image_stays_dark():
    assert grey(Image.fromarray(np.array([[0, 1000]], dtype=np.uint16))) == [[0, 4]]


def test_float_samples_in_0_1_scale_against_1():
    assert grey(Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))) == [[0, 64, 255]]


def test_32_bit_samples_with_negatives_stretch_min_to_max():
    im = Image.fromarray(np.array([[-100, 60, 100]], dtype=np.int32))
    assert im.mode == "I"
    assert grey(im) == [[0, 204, 255]]


def test_a_flat_image_of_negative_samples_is_black():
    assert grey(Image.fromarray(np.full((2, 3), -5, dtype=np.int32))) == [[0, 0, 0], [0, 0, 0]]


def test_a_tall_image_converts_band_by_band_like_at_once():
    values = (np.arange(300 * 3, dtype=np.uint32).reshape(300, 3) * 72).astype(np.uint16)
    expected = np.clip(np.rint(values.astype(np.float64) * 255 / 65535), 0, 255).astype(np.uint8)
    assert grey(Image.fromarray(values)) == expected.tolist()


def test_decode_converts_a_16_bit_png_exactly():
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 129, 60000, 65535]], dtype=np.uint16)).save(buf, "PNG")
    got = decode(buf.getvalue(), max_pixels=LIMIT)
    assert got.format == "PNG"
    assert np.asarray(got.image)[..., 0].tolist() == [[0, 1, 233, 255]]


def test_a_format_pillow_only_recognises_by_parsing_is_named_in_the_refusal():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, "TGA", id_section=b"imgq")  # not a CUR header
    with pytest.raises(errors.UnsupportedFormat) as exc:
        decode(buf.getvalue(), max_pixels=LIMIT)
    assert str(exc.value) == "TGA is not one of JPEG, PNG, WEBP, GIF, BMP, TIFF"
