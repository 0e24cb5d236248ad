"""A deterministic, realistic image corpus for the decode benches: what users actually send.

Corpora (``corpus_paths(name, n)``), cached under ``.imgq/bench/photos/<corpus>/``:

* ``photos12mp``: 4032x3024 phone-camera JPEGs, quality 90 (about 3-5 MB each). As phones do, the
  sensor's landscape frame is what is stored; portrait shots carry EXIF Orientation 6 or 8 and are
  stored rotated, so they display as 3024x4032. Index % 4: 0 and 2 upright, 1 -> 6, 3 -> 8.
* ``screenshots``: 1920x1080 PNGs: flat UI panels, bars, buttons and rows of text-like strokes.
* ``thumbs``: small JPEGs, 160x120 (even index) and 320x240 (odd index), quality 85.
* ``mix``: photos, thumbnails and screenshots interleaved (1 : 2 : 1), the same files as theirs.

Every file is a pure function of (kind, index, size): seeded numpy and Pillow, no clock, no
randomness outside the seed, so two machines generate the same bytes for the same Pillow/zlib.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from bench.common import WORK

ROOT = WORK / "photos"
CORPORA = ("photos12mp", "screenshots", "thumbs", "mix")
PHOTO_SIZE = (4032, 3024)  # stored (sensor) width x height, as a 12 MP phone camera writes it
SCREEN_SIZE = (1920, 1080)
THUMB_SIZES = ((160, 120), (320, 240))
PHOTO_QUALITY = 90
THUMB_QUALITY = 85
_ORIENTATION_TAG = 0x0112
# Pillow's transpose that *stores* an upright picture so that an EXIF viewer shows it upright
# again: the inverse of what ``ImageOps.exif_transpose`` applies for that tag.
_STORE = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
# What the mix draws from, in turn: one photo, two thumbnails, one screenshot per four images.
_MIX = ("photos12mp", "thumbs", "screenshots", "thumbs")

Kind = Literal["photo", "screenshot"]


@dataclass(frozen=True, slots=True)
class Item:
    """One corpus file: what it is before any bytes exist."""

    name: str  # file name inside its corpus folder
    corpus: str  # the folder it lives in (never "mix": the mix reuses the others' files)
    kind: Kind
    width: int  # as stored in the file
    height: int
    orientation: int  # EXIF Orientation written (1 = no tag)
    seed: int

    @property
    def upright(self) -> tuple[int, int]:
        """(width, height) as displayed, after the EXIF rotation."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def item(corpus: str, index: int) -> Item:
    """The ``index``-th file of ``corpus`` (pure: no I/O)."""
    if corpus == "mix":
        return item(_MIX[index % len(_MIX)], _mix_index(index))
    if corpus == "photos12mp":
        orientation = {1: 6, 3: 8}.get(index % 4, 1)
        w, h = PHOTO_SIZE
        return Item(f"photo_{index:05d}.jpg", corpus, "photo", w, h, orientation, 1_000_000 + index)
    if corpus == "screenshots":
        w, h = SCREEN_SIZE
        return Item(f"screen_{index:05d}.png", corpus, "screenshot", w, h, 1, 2_000_000 + index)
    if corpus == "thumbs":
        w, h = THUMB_SIZES[index % len(THUMB_SIZES)]
        return Item(f"thumb_{index:05d}.jpg", corpus, "photo", w, h, 1, 3_000_000 + index)
    raise ValueError(f"unknown corpus {corpus!r}; expected one of {', '.join(CORPORA)}")


def _mix_index(index: int) -> int:
    """The index inside its own corpus of the mix's ``index``-th file (no file repeats)."""
    slot, turn = divmod(index, len(_MIX))
    kind = _MIX[turn]
    per_round = _MIX.count(kind)
    return slot * per_round + _MIX[:turn].count(kind)


def render(it: Item) -> bytes:
    """The file's bytes (deterministic)."""
    if it.kind == "screenshot":
        return screenshot_png(it.seed, it.width, it.height)
    quality = PHOTO_QUALITY if it.width * it.height >= 1_000_000 else THUMB_QUALITY
    return photo_jpeg(it.seed, it.width, it.height, orientation=it.orientation, quality=quality)


def corpus_paths(corpus: str, n: int, root: Path | None = None) -> list[Path]:
    """``n`` files of ``corpus``, generated once and reused (atomic writes: a crash leaves no half file)."""
    root = root or ROOT
    paths = []
    for i in range(n):
        it = item(corpus, i)
        path = root / it.corpus / it.name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(render(it))
            os.replace(tmp, path)
        paths.append(path)
    return paths


# -- generators --------------------------------------------------------------------------------------

def _smooth(rng: np.random.Generator, width: int, height: int, cell: int, channels: int) -> np.ndarray:
    """Noise with features of about ``cell`` pixels: a coarse random grid upsampled bicubically,
    float32 HxWxC in about [-1, 1]."""
    cw, ch = max(2, width // cell), max(2, height // cell)
    planes = []
    for _ in range(channels):
        coarse = Image.fromarray(rng.uniform(0, 255, (ch, cw)).astype(np.uint8), "L")
        planes.append(np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32))
    return np.stack(planes, axis=-1) / 127.5 - 1.0


def photo_jpeg(seed: int, width: int, height: int, *, orientation: int = 1, quality: int = PHOTO_QUALITY) -> bytes:
    """A photo-like JPEG stored as ``width`` x ``height``; with ``orientation`` 6 or 8 the scene is
    composed upright (``height`` x ``width``) and stored rotated, with the EXIF tag, as phones do.

    Sky-to-ground gradient, soft large blobs, sharp-edged objects, mid-frequency texture (foliage,
    fabric) that fades towards the sky, and fine sensor grain: JPEG spends its bits as on a photo."""
    rng = np.random.default_rng(seed)
    up_w, up_h = (height, width) if orientation in _STORE else (width, height)
    y = np.linspace(0.0, 1.0, up_h, dtype=np.float32)[:, None, None]
    horizon = np.float32(rng.uniform(0.3, 0.7))
    sky0, sky1, ground0, ground1 = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(4))
    t_sky = np.clip(y / horizon, 0, 1)
    t_ground = np.clip((y - horizon) / (1 - horizon), 0, 1)
    column = np.where(y < horizon, sky0 * (1 - t_sky) + sky1 * t_sky, ground0 * (1 - t_ground) + ground1 * t_ground)
    img = np.broadcast_to(column, (up_h, up_w, 3)).astype(np.float32)
    scale = max(up_w, up_h)
    img += 35 * _smooth(rng, up_w, up_h, max(2, scale // 8), 3)  # large soft shapes: clouds, hills, shade
    img += 12 * _smooth(rng, up_w, up_h, max(2, scale // 100), 3)  # mid-size patches: leaves, stones
    detail = _smooth(rng, up_w, up_h, 3, 1)  # texture of a few pixels: foliage, fabric, gravel
    img += 30 * detail * np.clip((y - horizon + 0.1) * 4, 0.4, 1.0)  # the ground is busier than the sky
    picture = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    del img, detail
    draw = ImageDraw.Draw(picture)
    r = rng.integers
    for _ in range(14):  # objects: sharp edges, like buildings, people, furniture
        x0, y0 = int(r(0, up_w)), int(r(int(up_h * horizon * 0.8), up_h))
        w, h = int(r(scale // 40 + 2, scale // 5 + 3)), int(r(scale // 40 + 2, scale // 4 + 3))
        fill = tuple(int(v) for v in r(0, 256, 3))
        shape = int(r(0, 3))
        if shape == 0:
            draw.rectangle((x0, y0 - h, x0 + w, y0), fill=fill)
        elif shape == 1:
            draw.ellipse((x0, y0 - h, x0 + w, y0), fill=fill)
        else:
            draw.polygon([(x0, y0), (x0 + w // 2, y0 - h), (x0 + w, y0)], fill=fill)
    for _ in range(5):  # wires, branches, edges
        pts = [(int(r(0, up_w)), int(r(0, up_h))) for _ in range(3)]
        draw.line(pts, fill=tuple(int(v) for v in r(0, 256, 3)), width=max(1, scale // 800))
    pixels = np.asarray(picture, dtype=np.int16).copy()
    del picture
    # Sensor grain: small, per pixel; int16 keeps a 12 MP frame to ~70 MB of temporaries.
    pixels += rng.integers(-8, 9, pixels.shape, dtype=np.int16)
    picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    del pixels
    if orientation in _STORE:
        picture = picture.transpose(_STORE[orientation])
    buf = io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[_ORIENTATION_TAG] = orientation
        picture.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    else:
        picture.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def screenshot_png(seed: int, width: int, height: int) -> bytes:
    """A screenshot-like PNG: flat panels, a title bar, a sidebar, buttons, and rows of text strokes
    (word-sized dark runs of 1-2 px strokes), which is what PNG screenshots compress like."""
    rng = np.random.default_rng(seed)
    r = rng.integers
    background = tuple(int(v) for v in r(225, 256, 3))
    picture = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(picture)
    unit = max(1, height // 54)  # ~20 px at 1080p
    bar = tuple(int(v) for v in r(30, 90, 3))
    draw.rectangle((0, 0, width, 2 * unit), fill=bar)
    side = int(width * rng.uniform(0.12, 0.22))
    draw.rectangle((0, 2 * unit, side, height), fill=tuple(int(v) for v in r(200, 240, 3)))
    for row in range(4 * unit, height - unit, int(1.6 * unit)):  # sidebar entries
        _text(draw, rng, unit, (unit, row), side - 2 * unit, (60, 60, 60))
    x = side + 2 * unit
    y = 4 * unit
    while y < height - 3 * unit:
        block = int(r(0, 5))
        if block == 0:  # a card: filled panel with a heading and lines of text
            h = int(r(4, 10)) * unit
            draw.rectangle((x, y, width - 2 * unit, y + h), fill=tuple(int(v) for v in r(235, 256, 3)),
                           outline=(200, 200, 200))
            for line in range(y + unit, y + h - unit, int(1.4 * unit)):
                _text(draw, rng, unit, (x + unit, line), width - x - 4 * unit, (40, 40, 40))
            y += h + unit
        elif block == 1:  # a row of buttons
            bx = x
            colour = tuple(int(v) for v in r(0, 200, 3))
            for _ in range(int(r(2, 6))):
                bw = int(r(5, 10)) * unit
                draw.rounded_rectangle((bx, y, bx + bw, y + 2 * unit), radius=unit // 3 + 1, fill=colour)
                _text(draw, rng, unit, (bx + unit // 2, y + unit // 2), bw - unit, (255, 255, 255))
                bx += bw + unit
            y += 3 * unit
        elif block == 2:  # an image placeholder: a gradient, the one non-flat region
            h = int(r(5, 12)) * unit
            w = min(width - x - 2 * unit, int(r(10, 30)) * unit)
            if w > 0:
                c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
                t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
                grad = np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3)).astype(np.uint8)
                picture.paste(Image.fromarray(grad, "RGB"), (x, y))
            y += h + unit
        else:  # a paragraph
            for _ in range(int(r(2, 7))):
                _text(draw, rng, unit, (x, y), width - x - 3 * unit, (30, 30, 30))
                y += int(1.4 * unit)
            y += unit
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    return buf.getvalue()


def _text(draw: ImageDraw.ImageDraw, rng: np.random.Generator, unit: int, at: tuple[int, int], width: int,
          colour: tuple[int, int, int]) -> None:
    """A line of 'words': runs of thin vertical and horizontal strokes, glyph-sized."""
    x, y = at
    end = x + int(width * rng.uniform(0.4, 1.0))
    glyph = max(2, unit // 2)
    stroke = max(1, unit // 12)
    while x < end:
        for _ in range(int(rng.integers(2, 9))):  # letters of one word
            if x + glyph > end:
                return
            kind = int(rng.integers(0, 3))
            if kind == 0:
                draw.line((x, y, x, y + unit * 2 // 3), fill=colour, width=stroke)
            elif kind == 1:
                draw.arc((x, y + unit // 4, x + glyph, y + unit * 2 // 3), 0, 360, fill=colour, width=stroke)
            else:
                draw.line((x, y + unit // 3, x + glyph, y + unit // 3), fill=colour, width=stroke)
                draw.line((x + glyph // 2, y, x + glyph // 2, y + unit * 2 // 3), fill=colour, width=stroke)
            x += glyph + stroke + 1
        x += glyph  # the space between words
