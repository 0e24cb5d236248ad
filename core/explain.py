"""Caption explanations, the pure part: captured cross-attention -> one heatmap per token and per
word, on the ViT patch grid and mapped back onto the original image. Imports numpy only (no torch,
no Pillow), so the CLI can read stored explanations on the light install.

Conventions (README, "Explaining a caption"):

* A token's map is the cross-attention of the decoder *query that produced it*: the forward step
  whose logits chose the token. Heads are reduced first (``mean`` or ``max``), then layers are
  averaged (all of them by default, or one layer).
* The image keys are ``1 + rows * cols`` vision tokens: the [CLS] token first, then the patches in
  row-major order. A map keeps the attention mass on the patches (not renormalised); the mass on
  [CLS] is reported beside it, so ``cls + grid.sum() == 1`` for one layer and head-mean.
* Roles: ``bos`` (BLIP's [DEC]), ``prompt`` (conditional captioning), ``generated``, ``eos`` (the
  stop token) and ``pad`` (after a sequence ended in a batch). Only ``generated`` and ``eos`` have
  maps; only ``generated`` tokens form words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Role = Literal["bos", "prompt", "generated", "eos", "pad"]
HeadReduce = Literal["mean", "max"]
MAPPED_ROLES: frozenset[str] = frozenset({"generated", "eos"})


def token_roles(ids: Sequence[int], prompt_len: int, eos_id: int | None) -> list[Role]:
    """The role of every position of a generated sequence. ``prompt_len`` counts the positions
    given to ``generate`` (the bos token and the prompt's tokens)."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len must count the bos token, got {prompt_len}")
    roles: list[Role] = []
    ended = False
    for i, tok in enumerate(ids):
        if i == 0:
            roles.append("bos")
        elif i < prompt_len:
            roles.append("prompt")
        elif ended:
            roles.append("pad")  # batch padding after this sequence's end, whatever its id
        elif eos_id is not None and int(tok) == eos_id:
            roles.append("eos")
            ended = True
        else:
            roles.append("generated")
    return roles


def reduce_layers(maps: np.ndarray, layer: int | None = None) -> np.ndarray:
    """(tokens, layers, keys) head-reduced maps -> (tokens, keys): the mean over layers, or one layer
    (0-based; negative counts from the last)."""
    if maps.ndim != 3:
        raise ValueError(f"expected (tokens, layers, keys), got shape {maps.shape}")
    if layer is None:
        return maps.mean(axis=1)
    layers = maps.shape[1]
    if not -layers <= layer < layers:
        raise ValueError(f"layer {layer} out of range: the decoder has {layers} cross-attention layers")
    return maps[:, layer, :]


def split_cls(maps: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, 1 + rows*cols) -> ([CLS] mass (tokens,), patch maps (tokens, rows, cols))."""
    rows, cols = grid
    if maps.shape[-1] != 1 + rows * cols:
        raise ValueError(f"{maps.shape[-1]} image keys do not fit a [CLS] token plus a {rows}x{cols} patch grid")
    return maps[..., 0], maps[..., 1:].reshape(*maps.shape[:-1], rows, cols)


def group_words(tokens: Sequence[str], roles: Sequence[str]) -> list[list[int]]:
    """WordPiece pieces merged into words: indices of the ``generated`` tokens, a ``##`` piece
    joining the word before it (a ``##`` piece with no word before it starts one). An empty token
    (an id outside the tokenizer's vocabulary) keeps its map but joins no word."""
    words: list[list[int]] = []
    previous = -2
    for i, (tok, role) in enumerate(zip(tokens, roles, strict=True)):
        if role != "generated" or not tok:  # "": an id the tokenizer cannot name (decoding drops it)
            continue
        if tok.startswith("##") and words and previous == i - 1:
            words[-1].append(i)
        else:
            words.append([i])
        previous = i
    return words


def word_text(tokens: Sequence[str], indices: Sequence[int]) -> str:
    return "".join(tokens[i].removeprefix("##") for i in indices)


def word_grid(grids: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """A word's map: the mean of its pieces' maps (each piece's map is a share of one unit of
    attention, so the word's is too)."""
    return grids[list(indices)].mean(axis=0)


def top_patch(grid: np.ndarray) -> tuple[int, int]:
    """(row, col) of the patch with the most attention; the first one on ties."""
    flat = int(np.argmax(grid))
    return divmod(flat, grid.shape[1])


# -- geometry: the model's square input <-> the original image ---------------------------------


@dataclass(frozen=True, slots=True)
class Geometry:
    """How ``worker/preprocess.py`` fitted an original ``width`` x ``height`` image into the model's
    ``size`` x ``size`` input, as an axis-aligned affine map: ``x = x0 + u * sx``, ``y = y0 + v * sy``
    for input coordinates (u, v) and original coordinates (x, y), both in pixels, origin top left.
    ``view`` is the part of the input that shows the image (letterbox padding is outside it)."""

    mode: str
    width: int
    height: int
    size: int
    x0: float
    y0: float
    sx: float
    sy: float
    view: tuple[float, float, float, float]  # (u0, v0, u1, v1) in input pixels

    @classmethod
    def of(cls, mode: str, width: int, height: int, size: int) -> Geometry:
        """The same arithmetic as :class:`imgq.worker.preprocess.Preprocessor` for each mode."""
        if width < 1 or height < 1 or size < 1:
            raise ValueError(f"bad sizes: image {width}x{height}, input {size}")
        n = size
        if mode == "stretch":
            return cls(mode, width, height, n, 0.0, 0.0, width / n, height / n, (0.0, 0.0, n, n))
        if mode == "center_crop":
            side = min(width, height)
            left, top = (width - side) / 2, (height - side) / 2
            return cls(mode, width, height, n, left, top, side / n, side / n, (0.0, 0.0, n, n))
        if mode == "letterbox":
            scale = n / max(width, height)
            nw, nh = max(1, min(n, round(width * scale))), max(1, min(n, round(height * scale)))
            u0, v0 = (n - nw) // 2, (n - nh) // 2
            return cls(mode, width, height, n, -u0 * width / nw, -v0 * height / nh, width / nw, height / nh,
                       (float(u0), float(v0), float(u0 + nw), float(v0 + nh)))
        raise ValueError(f"unknown resize mode {mode!r}; expected stretch, center_crop or letterbox")

    def to_original(self, u: float, v: float) -> tuple[float, float]:
        return self.x0 + u * self.sx, self.y0 + v * self.sy

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.x0) / self.sx, (y - self.y0) / self.sy

    def cell_box(self, row: int, col: int, grid: tuple[int, int]) -> tuple[int, int, int, int] | None:
        """A patch's box (x0, y0, x1, y1) in original pixels, clipped to the image and to what the
        model saw; None for a patch that shows only letterbox padding."""
        rows, cols = grid
        ph, pw = self.size / rows, self.size / cols
        u0, v0, u1, v1 = col * pw, row * ph, (col + 1) * pw, (row + 1) * ph
        vu0, vv0, vu1, vv1 = self.view
        u0, v0, u1, v1 = max(u0, vu0), max(v0, vv0), min(u1, vu1), min(v1, vv1)
        if u0 >= u1 or v0 >= v1:
            return None
        x0, y0 = self.to_original(u0, v0)
        x1, y1 = self.to_original(u1, v1)
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(self.width), x1), min(float(self.height), y1)
        return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def render(grid: np.ndarray, geometry: Geometry, out_size: tuple[int, int]) -> np.ndarray:
    """The patch map resampled onto the original image, at ``out_size`` = (width, height) pixels
    (the original's aspect, usually scaled down). Bilinear between patch centres, so a patch's
    value is exact at its centre; NaN where the model saw nothing of the image (outside a centre
    crop) and never a value from letterbox padding: padding patches only shape the edge of the
    interpolation, clamped to the view."""
    rows, cols = grid.shape
    ow, oh = out_size
    if ow < 1 or oh < 1:
        raise ValueError(f"bad output size {out_size}")
    xs = (np.arange(ow) + 0.5) * geometry.width / ow
    ys = (np.arange(oh) + 0.5) * geometry.height / oh
    us = (xs - geometry.x0) / geometry.sx
    vs = (ys - geometry.y0) / geometry.sy
    vu0, vv0, vu1, vv1 = geometry.view
    inside_u = (us >= vu0) & (us <= vu1)
    inside_v = (vs >= vv0) & (vs <= vv1)
    # Continuous cell coordinates, 0 at the first patch's centre.
    cu = np.clip(us * cols / geometry.size - 0.5, 0, cols - 1)
    cv = np.clip(vs * rows / geometry.size - 0.5, 0, rows - 1)
    c0 = np.floor(cu).astype(int)
    r0 = np.floor(cv).astype(int)
    c1 = np.minimum(c0 + 1, cols - 1)
    r1 = np.minimum(r0 + 1, rows - 1)
    fc = (cu - c0)[None, :]
    fr = (cv - r0)[:, None]
    g = grid.astype(np.float64)
    top = g[np.ix_(r0, c0)] * (1 - fc) + g[np.ix_(r0, c1)] * fc
    bottom = g[np.ix_(r1, c0)] * (1 - fc) + g[np.ix_(r1, c1)] * fc
    out = top * (1 - fr) + bottom * fr
    out[~(inside_v[:, None] & inside_u[None, :])] = np.nan
    return out


def fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down to fit ``max_side``, keeping the aspect; never enlarged."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


# -- compact storage ------------------------------------------------------------------------------


def pack(grids: np.ndarray) -> tuple[bytes, list[float]]:
    """(tokens, rows, cols) maps -> uint8 bytes (each map scaled to its own maximum, rounded) and
    the per-map scale: ``unpack`` restores each value within ``scale / 510``."""
    grids = np.asarray(grids, dtype=np.float64)
    peak = grids.reshape(len(grids), -1).max(axis=1) if len(grids) else np.zeros(0)
    scales = [float(p) if p > 0 else 0.0 for p in peak]
    safe = np.where(peak > 0, peak, 1.0)[:, None, None]
    quantised = np.clip(np.rint(grids / safe * 255), 0, 255).astype(np.uint8)
    return quantised.tobytes(), scales


def unpack(blob: bytes, scales: Sequence[float], grid: tuple[int, int]) -> np.ndarray:
    rows, cols = grid
    raw = np.frombuffer(blob, dtype=np.uint8)
    if raw.size != len(scales) * rows * cols:
        raise ValueError(f"{raw.size} bytes do not hold {len(scales)} maps of {rows}x{cols}")
    return raw.reshape(len(scales), rows, cols).astype(np.float64) / 255 * np.asarray(scales)[:, None, None]


# -- one image's explanation ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenMap:
    index: int  # position in the generated sequence (0 is the bos token)
    id: int
    token: str  # the tokenizer's piece, e.g. "##ing"
    role: Role
    word: int | None  # index into Explanation.words; None for all but generated tokens
    grid: np.ndarray | None  # (rows, cols) attention mass per patch; None without a map
    cls: float | None  # attention mass on the [CLS] image token
    layers: np.ndarray | None = None  # (layers, rows, cols), when every layer was asked for


@dataclass(frozen=True, slots=True)
class WordMap:
    index: int
    text: str
    tokens: tuple[int, ...]  # indices into Explanation.tokens
    grid: np.ndarray  # the mean of its pieces' maps
    layers: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class Explanation:
    caption: str
    grid: tuple[int, int]
    heads: HeadReduce
    layer: int | None  # None: the mean over every cross-attention layer
    layer_count: int
    tokens: tuple[TokenMap, ...]
    words: tuple[WordMap, ...]


def assemble(
    caption: str,
    ids: Sequence[int],
    tokens: Sequence[str],
    prompt_len: int,
    eos_id: int | None,
    maps: np.ndarray,
    grid: tuple[int, int],
    *,
    heads: HeadReduce = "mean",
    layer: int | None = None,
    keep_layers: bool = False,
) -> Explanation:
    """One image's explanation from its sequence and the (generated, layers, keys) head-reduced
    maps of :meth:`imgq.worker.model.CaptionModel.explain`."""
    if len(ids) != len(tokens):
        raise ValueError(f"{len(ids)} ids but {len(tokens)} tokens")
    if maps.shape[0] != len(ids) - prompt_len:
        raise ValueError(f"{maps.shape[0]} maps for {len(ids) - prompt_len} generated positions")
    roles = token_roles(ids, prompt_len, eos_id)
    cls_mass, grids = split_cls(reduce_layers(maps, layer), grid)
    per_layer = split_cls(maps, grid)[1] if keep_layers else None  # (generated, layers, rows, cols)
    groups = group_words(tokens, roles)
    word_of = {i: w for w, group in enumerate(groups) for i in group}
    token_maps = []
    for i, (tok_id, tok, role) in enumerate(zip(ids, tokens, roles, strict=True)):
        g = i - prompt_len
        mapped = role in MAPPED_ROLES
        token_maps.append(TokenMap(
            i, int(tok_id), tok, role, word_of.get(i),
            grids[g] if mapped else None, float(cls_mass[g]) if mapped else None,
            per_layer[g] if mapped and per_layer is not None else None,
        ))
    words = []
    for w, group in enumerate(groups):
        offsets = [i - prompt_len for i in group]
        words.append(WordMap(w, word_text(tokens, group), tuple(group), word_grid(grids, offsets),
                             per_layer[offsets].mean(axis=0) if per_layer is not None else None))
    return Explanation(caption, grid, heads, layer, maps.shape[1], tuple(token_maps), tuple(words))


# -- what a job stores ----------------------------------------------------------------------------


class ExplainedCaption(str):
    """A caption (the text, exactly as a plain caption) that carries its explanation's compact
    summary for the result writer; everything else treats it as the text."""

    summary: dict[str, object]

    def __new__(cls, text: str, summary: dict[str, object]) -> ExplainedCaption:
        obj = super().__new__(cls, text)
        obj.summary = summary
        return obj


def summary(ex: Explanation, input_size: int, overlays: str | None) -> dict[str, object]:
    """The row of ``caption_explanations``: per token its role, word and (when it has a map) the
    map's index in ``maps``, its scale, [CLS] mass and top patch; per word its tokens and top patch;
    the maps as uint8 bytes (:func:`pack`); where the overlays are."""
    mapped = [t for t in ex.tokens if t.grid is not None]
    blob, scales = pack(np.stack([t.grid for t in mapped])) if mapped else (b"", [])
    tokens: list[dict[str, object]] = []
    k = 0
    for t in ex.tokens:
        entry: dict[str, object] = {"token": t.token, "role": t.role, "word": t.word}
        if t.grid is not None:
            entry.update(map=k, scale=scales[k], cls=round(float(t.cls or 0.0), 6), top=list(top_patch(t.grid)))
            k += 1
        tokens.append(entry)
    words = [{"text": w.text, "tokens": list(w.tokens), "top": list(top_patch(w.grid))} for w in ex.words]
    return {"grid_rows": ex.grid[0], "grid_cols": ex.grid[1], "input_size": input_size, "heads": ex.heads,
            "layers": "mean" if ex.layer is None else str(ex.layer), "tokens": tokens, "words": words,
            "maps": blob, "overlays": overlays}
