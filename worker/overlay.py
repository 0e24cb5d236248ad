"""Caption explanations as files: one PNG overlay per word on the original image, a contact sheet,
and ``explain.json`` (schema: ``docs/explain.schema.json``). Pillow and numpy only.

The overlays are drawn in the original image's coordinates (:func:`imgq.explain.render` undoes the
resize of ``worker/preprocess.py``), at most ``max_side`` pixels on the long side. Each map is
scaled to its own maximum, so an overlay shows *where* a word looked, not how much; the raw masses
are in ``explain.json``. Where the model saw nothing of the image (the sides a centre crop cut
away) the picture is darkened instead.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imgq.explain import Explanation, Geometry, TokenMap, WordMap, fit, render, top_patch

SCHEMA_ID = "imgq-explain/1"
CONTACT_SHEET = "contact_sheet.png"
EXPLAIN_JSON = "explain.json"

# A perceptually ordered dark-to-bright ramp (inferno's end points and quartiles).
_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
_LUT = np.stack([np.interp(np.linspace(0, 4, 256), np.arange(5), _STOPS[:, c]) for c in range(3)], axis=1)
_LUT = _LUT.astype(np.uint8)


def heat_overlay(image: Image.Image, grid: np.ndarray, geometry: Geometry) -> Image.Image:
    """``image`` (the original, any size with its aspect) with ``grid`` painted over it."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = base.shape[:2]
    heat = render(grid, geometry, (w, h)).astype(np.float32)
    seen = ~np.isnan(heat)
    peak = float(np.nanmax(heat)) if seen.any() else 0.0
    norm = np.where(seen, heat, 0.0) / peak if peak > 0 else np.zeros_like(heat)
    color = _LUT[np.clip(np.rint(norm * 255), 0, 255).astype(np.uint8)].astype(np.float32)
    alpha = (0.3 + 0.45 * norm)[..., None]  # hot regions dominate; cold ones keep the picture
    out = np.where(seen[..., None], base * (1 - alpha) + color * alpha, base * 0.35)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _label(image: Image.Image, text: str) -> Image.Image:
    font = ImageFont.load_default()
    band = 16
    out = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    out.paste(image, (0, band))
    ImageDraw.Draw(out).text((3, 2), text, fill=(0, 0, 0), font=font)
    return out


def contact_sheet(tiles: list[tuple[str, Image.Image]], columns: int, tile_side: int = 192) -> Image.Image:
    """Labelled thumbnails in a grid, row by row."""
    labelled = []
    for text, tile in tiles:
        thumb = tile.copy()
        thumb.thumbnail((tile_side, tile_side))
        labelled.append(_label(thumb, text))
    cell_w = max(t.width for t in labelled) + 4
    cell_h = max(t.height for t in labelled) + 4
    rows = -(-len(labelled) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    for i, tile in enumerate(labelled):
        sheet.paste(tile, ((i % columns) * cell_w + 2, (i // columns) * cell_h + 2))
    return sheet


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # zlib level 1: 3-4x faster than the default 6 on these pictures, for somewhat larger files.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:24] or "w"


def word_file(word: WordMap, layer: int | None = None) -> str:
    suffix = "" if layer is None else f"-layer{layer:02d}"
    return f"word-{word.index:02d}-{_slug(word.text)}{suffix}.png"


def render_files(
    image: Image.Image, explanation: Explanation, geometry: Geometry, *, max_side: int = 768
) -> dict[str, bytes]:
    """Every PNG of one explanation, by file name: each word's overlay (and each layer's, when the
    explanation kept them) and the contact sheet."""
    picture = image.convert("RGB").resize(fit(image.width, image.height, max_side), Image.Resampling.BILINEAR)
    files: dict[str, bytes] = {}
    tiles: list[tuple[str, Image.Image]] = [("image", picture)]
    per_layer = explanation.words and explanation.words[0].layers is not None
    for word in explanation.words:
        overlay = heat_overlay(picture, word.grid, geometry)
        files[word_file(word)] = png(overlay)
        tiles.append((word.text, overlay))
        if per_layer:
            assert word.layers is not None
            for layer, grid in enumerate(word.layers):
                layered = heat_overlay(picture, grid, geometry)
                files[word_file(word, layer)] = png(layered)
                tiles.append((f"{word.text} L{layer}", layered))
    columns = 1 + explanation.layer_count if per_layer else min(6, len(tiles))
    if per_layer:  # one row per word: the word's mean map, then each layer's
        tiles = [("image", picture), *[("", Image.new("RGB", picture.size, (255, 255, 255)))] * (columns - 1),
                 *tiles[1:]]
    files[CONTACT_SHEET] = png(contact_sheet(tiles, columns))
    return files


def _grid_json(grid: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in grid]


def _top(grid: np.ndarray, explanation: Explanation, geometry: Geometry) -> dict[str, Any]:
    row, col = top_patch(grid)
    box = geometry.cell_box(row, col, explanation.grid)
    return {"row": row, "col": col, "box": list(box) if box is not None else None}


def _token_json(tok: TokenMap, explanation: Explanation, geometry: Geometry) -> dict[str, Any]:
    out: dict[str, Any] = {"index": tok.index, "id": tok.id, "token": tok.token, "role": tok.role,
                           "word": tok.word, "cls": None if tok.cls is None else round(tok.cls, 6),
                           "top_patch": None, "grid": None}
    if tok.grid is not None:
        out["top_patch"] = _top(tok.grid, explanation, geometry)
        out["grid"] = _grid_json(tok.grid)
        if tok.layers is not None:
            out["layers"] = [_grid_json(g) for g in tok.layers]
    return out


def document(
    explanation: Explanation,
    geometry: Geometry,
    *,
    ref: str | None,
    model: Mapping[str, Any],
    params: Mapping[str, Any],
    files: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """``explain.json``: everything needed to redraw the overlays without the model."""
    words = []
    for word in explanation.words:
        entry: dict[str, Any] = {"index": word.index, "text": word.text, "tokens": list(word.tokens),
                                 "top_patch": _top(word.grid, explanation, geometry),
                                 "grid": _grid_json(word.grid)}
        if files is not None:
            entry["overlay"] = word_file(word)
            if word.layers is not None:
                entry["layer_overlays"] = [word_file(word, i) for i in range(len(word.layers))]
        words.append(entry)
    rows, cols = explanation.grid
    return {
        "schema": SCHEMA_ID,
        "ref": ref,
        "caption": explanation.caption,
        "model": dict(model),
        "params": dict(params),
        "image": {"width": geometry.width, "height": geometry.height},
        "input": {"size": geometry.size, "resize": geometry.mode, "grid": [rows, cols],
                  "view": [round(v, 3) for v in geometry.view]},
        "reduction": {"heads": explanation.heads,
                      "layers": "mean" if explanation.layer is None else explanation.layer,
                      "layer_count": explanation.layer_count},
        "tokens": [_token_json(t, explanation, geometry) for t in explanation.tokens],
        "words": words,
        "contact_sheet": CONTACT_SHEET if files is not None else None,
    }


def dumps(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()
