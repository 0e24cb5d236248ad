"""Turn untrusted bytes into an RGB Pillow image, or raise one permanent imgq error.

Thread-safe: nothing here changes Pillow's global state after import. ``Image.MAX_IMAGE_PIXELS``
stays untouched; instead the plugin's header parser is called directly (as ``Image.open`` does,
minus its bomb check), so our own ``max_pixels`` check runs before Pillow could emit a
``DecompressionBombWarning`` (``warnings.catch_warnings`` is process-global, not per-thread).
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from imgq import errors
from imgq.classify import classify_decode

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_PREFIX_BYTES = 16  # what Image.open hands to each plugin's accept()

# Register every plugin once, at import, so no worker thread races on the registry later.
Image.init()


@dataclass(frozen=True, slots=True)
class DecodedImage:
    image: Image.Image  # mode "RGB", EXIF orientation applied
    width: int  # of the original (after EXIF transpose), not of a draft-reduced decode
    height: int
    format: str  # "JPEG", "PNG", ...


# Large decodes (after JPEG draft reduction) at once per process. A decode peaks at a few times
# its RGB size (up to ~1.3 GB at the 40 MP limit): with one decode thread per core on a many-core
# host, unbounded, that alone could reach tens of GB. Small images, the common case, never wait.
LARGE_PIXELS = 12_000_000
_LARGE = threading.BoundedSemaphore(2)


def draft_target(input_sizes: Iterable[int], draft: bool) -> int | None:
    """The ``target`` a worker decodes with: its largest model input (a draft decode must cover every
    model it serves), or None, a full-size decode, when draft decoding is off (IMGQ_DRAFT_DECODE)."""
    return max(input_sizes) if draft else None


def decode(data: bytes, *, max_pixels: int, target: int | None = None) -> DecodedImage:
    """Decode ``data`` to RGB. ``target`` lets JPEG decode at 1/2, 1/4 or 1/8 scale, never below it."""
    if not data:
        raise errors.Empty()
    im = _identify(data, max_pixels)
    try:
        width, height = im.size
        _check_pixels(im.format, width, height, max_pixels)
        if target is not None and im.format in ("JPEG", "MPO"):
            im.draft("RGB", (target, target))  # pragma: no mutate (_to_rgb converts whatever mode comes)
        large = im.size[0] * im.size[1] > LARGE_PIXELS
        with _LARGE if large else contextlib.nullcontext():
            return _load(im, width, height)
    except MemoryError:
        im.close()
        raise  # the process is short of memory, not the item at fault: let the caller retry
    except Exception as exc:
        im.close()
        raise classify_decode(exc) from exc


def _load(im: ImageFile.ImageFile, width: int, height: int) -> DecodedImage:
    try:
        im.load()
        # Read after load(): a PNG may keep its eXIf chunk after the pixel data.
        orientation = _orientation(im)
        if orientation in _SWAPS_AXES:
            width, height = height, width
        # exif_transpose leaves other values as they are: the range only saves its copy.
        upright = ImageOps.exif_transpose(im) if orientation in range(2, 9) else im  # pragma: no mutate
        rgb = _to_rgb(upright)
    except MemoryError:
        im.close()
        raise  # the process is short of memory, not the item at fault: let the caller retry
    except Exception as exc:
        im.close()
        raise classify_decode(exc) from exc
    if rgb is not im:
        im.close()
    # else: the common case, an upright RGB JPEG, is returned as loaded. Its pixels are in memory
    # and its file is a BytesIO, so there is nothing to close, and a copy would be waste.
    # MPO is how Pillow names a JPEG carrying extra pictures (most phone cameras): still a JPEG.
    fmt = "JPEG" if im.format == "MPO" else str(im.format)
    return DecodedImage(image=rgb, width=width, height=height, format=fmt)


def _identify(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """Parse the header with the allowed plugins only, like ``Image.open(fp, formats=...)``."""
    prefix = data[:_PREFIX_BYTES]
    broken: Exception | None = None
    for fmt in ALLOWED_FORMATS:
        if fmt not in Image.OPEN:  # a Pillow build without this plugin
            continue  # pragma: no mutate (all are built in here)
        factory, accept = Image.OPEN[fmt]
        verdict = accept(prefix) if accept else True  # pragma: no mutate (all allowed plugins have one)
        if isinstance(verdict, str):  # the plugin recognises it but cannot read it (e.g. no codec)
            raise errors.UnsupportedFormat(f"{fmt}: {verdict}")
        if not verdict:
            continue
        if fmt == "GIF":
            _check_gif_extent(data, max_pixels)
        try:
            return factory(io.BytesIO(data), "")  # pragma: no mutate (plugins ignore the name)
        except MemoryError:
            raise
        except Image.DecompressionBombError as exc:  # WebP checks its canvas inside the parser
            raise errors.TooManyPixels(str(exc)) from exc
        except Exception as exc:
            # The magic number matched, so a failing header parse means corrupt or short data.
            broken = exc
    if broken is not None:
        raise errors.Truncated(f"corrupt image header ({type(broken).__name__}: {broken})") from broken
    other = _other_format(data, prefix)
    if other is not None:
        raise errors.UnsupportedFormat(f"{other} is not one of {', '.join(ALLOWED_FORMATS)}")
    raise errors.NotAnImage()


def _check_gif_extent(data: bytes, max_pixels: int) -> None:
    """Pillow grows a GIF to its first frame's extent, bomb-checking (and warning) as it parses.

    So read that extent first. Anything unparsable is left for Pillow to reject.
    """
    if len(data) < 13:
        return
    width, height = struct.unpack_from("<HH", data, 6)
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < len(data):
        block = data[pos]
        if block == 0x21:  # extension: label, then data sub-blocks up to a zero length
            pos += 2
            while pos < len(data) and data[pos]:
                pos += data[pos] + 1
            pos += 1
        elif block == 0x2C and pos + 9 <= len(data):  # the first image descriptor
            x, y, w, h = struct.unpack_from("<HHHH", data, pos + 1)
            width, height = max(width, x + w), max(height, y + h)
            break
        else:
            break
    _check_pixels("GIF", width, height, max_pixels)


def _check_pixels(fmt: str | None, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise errors.TooManyPixels(
            f"{fmt} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def _other_format(data: bytes, prefix: bytes) -> str | None:
    """Name the non-allowed format these bytes are, if Pillow knows one; nothing is decoded.

    The magic-number test alone decides where a plugin has one: some plugins (DCX, GBR, MIC)
    bomb-check, and so may warn, while parsing a header we are going to refuse anyway. Only the
    plugins without one (TGA, SPIDER, IM, ...) must parse the header to say yes.
    """
    for fmt, (factory, accept) in Image.OPEN.items():
        if fmt in ALLOWED_FORMATS:
            continue
        try:
            if accept is not None:
                if accept(prefix):
                    return fmt
                continue
            with factory(io.BytesIO(data), ""):  # pragma: no mutate (plugins ignore the name)
                return fmt
        except MemoryError:
            raise
        except Exception:
            continue  # not this format: keep looking
    return None


def _orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION)
    except Exception:
        return None  # a mangled EXIF block should not sink an otherwise good picture
    return value if isinstance(value, int) else None


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_depth_to_rgb(im)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        # Transparent areas are usually meant as background: white, not whatever colour hides
        # there. Pasting through the alpha channel onto white needs one RGB canvas and one mask,
        # not the three full RGBA copies of an alpha_composite.
        rgba = im if mode == "RGBA" else im.convert("RGBA")  # pragma: no mutate (a copy: same pixels)
        out = Image.new("RGB", rgba.size, (255, 255, 255))  # pragma: no mutate (Pillow saturates 256 to 255)
        out.paste(rgba, mask=rgba.getchannel("A"))  # the colour bands of RGBA onto RGB: no RGB copy
        return out
    return im.convert("RGB")  # L, 1, P, CMYK (Adobe inversion is undone by the JPEG plugin), YCbCr...


# Rows converted at a time: the float32 work buffer stays a few MB whatever the image size.
_BAND_ROWS = 256


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    # Pillow's own convert("L") clips I/I;16 at 255, which turns most 16-bit images white. The
    # scaling runs in bands of rows, in float32, into one uint8 plane: a 6300x6300 16-bit PNG
    # took 1.3 GB above the decoded image as one float64 copy; now a few MB.
    lo, hi = (float(v) for v in im.getextrema())
    full_scale = _nominal_range(im.mode, lo, hi)
    if full_scale is not None:
        offset, gain = 0.0, 255.0 / full_scale
    elif hi > lo:
        offset, gain = lo, 255.0 / (hi - lo)
    else:
        offset, gain = lo, 0.0
    width, height = im.size
    grey = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, _BAND_ROWS):
        band = np.array(im.crop((0, top, width, min(height, top + _BAND_ROWS))), dtype=np.float32)
        band -= offset
        band *= gain
        np.rint(band, out=band)
        np.clip(band, 0, 255, out=band)
        grey[top : top + band.shape[0]] = band
    return Image.fromarray(grey).convert("RGB")


def _nominal_range(mode: str, lo: float, hi: float) -> float | None:
    """The full-scale value the samples are encoded against, or None to stretch min..max."""
    if mode.startswith("I;16"):
        return 65535.0
    candidates = (1.0, 255.0, 65535.0) if mode == "F" else (255.0, 65535.0)
    if lo < 0:
        return None
    return next((c for c in candidates if hi <= c), None)
