"""The pure math of caption explanations (imgq.explain): roles, word grouping, reductions, the
inverse resize geometry and compact storage. No torch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgq.explain import (
    Geometry,
    assemble,
    group_words,
    pack,
    reduce_layers,
    render,
    split_cls,
    token_roles,
    top_patch,
    unpack,
    word_text,
)
from imgq.worker.preprocess import Preprocessor

EOS = 3


def test_roles_mark_bos_prompt_eos_and_the_padding_after_it():
    ids = [30, 11, 12, 40, 41, EOS, 0, 0]
    assert token_roles(ids, prompt_len=3, eos_id=EOS) == [
        "bos", "prompt", "prompt", "generated", "generated", "eos", "pad", "pad"]
    # Without a prompt only position 0 is the bos token; an id equal to eos later is padding.
    assert token_roles([30, 40, EOS, EOS], prompt_len=1, eos_id=EOS) == ["bos", "generated", "eos", "pad"]
    with pytest.raises(ValueError):
        token_roles([30], prompt_len=0, eos_id=EOS)


def test_wordpiece_pieces_merge_into_words_and_prompt_pieces_never_join_them():
    tokens = ["[DEC]", "a", "##b", "dog", "##s", "##y", "run", "[SEP]", "[PAD]"]
    roles = token_roles(list(range(9)), prompt_len=2, eos_id=7)  # "a" is the prompt
    groups = group_words(tokens, roles)
    assert groups == [[2], [3, 4, 5], [6]]  # "##b" follows a prompt token: it starts a word
    assert [word_text(tokens, g) for g in groups] == ["b", "dogsy", "run"]
    # An id the tokenizer cannot name ("") joins no word, and the piece after it starts one.
    unnamed = ["[DEC]", "dog", "", "##s", "run"]
    assert group_words(unnamed, token_roles(range(5), 1, None)) == [[1], [3], [4]]


def test_layer_reduction_is_the_mean_or_one_layer():
    maps = np.arange(2 * 3 * 5, dtype=np.float64).reshape(2, 3, 5)
    np.testing.assert_allclose(reduce_layers(maps), maps.mean(axis=1))
    np.testing.assert_array_equal(reduce_layers(maps, 1), maps[:, 1])
    np.testing.assert_array_equal(reduce_layers(maps, -1), maps[:, 2])
    with pytest.raises(ValueError, match="3 cross-attention layers"):
        reduce_layers(maps, 3)


def test_cls_is_split_off_and_patches_are_row_major():
    keys = np.arange(1 + 2 * 3, dtype=np.float64)[None]
    cls, grid = split_cls(keys, (2, 3))
    assert cls.tolist() == [0.0]
    assert grid[0].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert top_patch(grid[0]) == (1, 2)
    with pytest.raises(ValueError, match="3x3"):
        split_cls(keys, (3, 3))


def test_assemble_gives_maps_to_generated_and_eos_tokens_only():
    grid = (2, 2)
    ids = [30, 11, 40, 41, EOS, 0]
    tokens = ["[DEC]", "a", "dog", "##s", "[SEP]", "[PAD]"]
    maps = np.random.default_rng(0).random((4, 3, 5))  # generated positions 2..5, 3 layers
    ex = assemble("dogs", ids, tokens, prompt_len=2, eos_id=EOS, maps=maps, grid=grid)
    assert [t.role for t in ex.tokens] == ["bos", "prompt", "generated", "generated", "eos", "pad"]
    assert [t.grid is not None for t in ex.tokens] == [False, False, True, True, True, False]
    assert [t.word for t in ex.tokens] == [None, None, 0, 0, None, None]
    np.testing.assert_allclose(ex.tokens[3].grid, maps[1].mean(axis=0)[1:].reshape(2, 2))
    assert ex.tokens[3].cls == pytest.approx(maps[1].mean(axis=0)[0])
    assert [w.text for w in ex.words] == ["dogs"]
    np.testing.assert_allclose(ex.words[0].grid, (ex.tokens[2].grid + ex.tokens[3].grid) / 2)
    one = assemble("dogs", ids, tokens, 2, EOS, maps, grid, layer=2, keep_layers=True)
    np.testing.assert_allclose(one.tokens[2].grid, maps[0, 2, 1:].reshape(2, 2))
    assert one.tokens[2].layers is not None and one.tokens[2].layers.shape == (3, 2, 2)


# -- geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stretch", "center_crop", "letterbox"])
@pytest.mark.parametrize("size", [(800, 200), (200, 800), (333, 333), (641, 479)])
def test_geometry_matches_what_the_preprocessor_does(mode, size):
    """A white dot drawn at a known original point lands, after the real preprocessing, where
    Geometry.to_input says (within the resampling blur), and maps back to that point."""
    w, h = size
    x, y = w / 2 + 0.3 * min(w, h), h / 2 - 0.15 * min(w, h)  # off centre, inside a centre crop too
    image = Image.new("RGB", size, (0, 0, 0))
    r = max(2, round(max(w, h) / 60))
    image.paste((255, 255, 255), (round(x) - r, round(y) - r, round(x) + r, round(y) + r))
    pixels = Preprocessor().pixels(image, mode).astype(np.float64)
    if mode == "letterbox":
        pixels = pixels - pixels.min()
    lum = pixels.sum(axis=0)
    vs, us = np.nonzero(lum > lum.max() / 2)  # the dot; its centroid is where it landed
    u, v = us.mean() + 0.5, vs.mean() + 0.5
    geo = Geometry.of(mode, w, h, 384)
    eu, ev = geo.to_input(x, y)
    assert abs(eu - u) <= 1.5 and abs(ev - v) <= 1.5
    assert geo.to_original(eu, ev) == pytest.approx((x, y))


def test_letterbox_view_excludes_the_padding():
    geo = Geometry.of("letterbox", 800, 200, 384)
    assert geo.view == (0.0, 144.0, 384.0, 240.0)
    assert geo.cell_box(0, 0, (24, 24)) is None  # the top rows are all padding
    assert geo.cell_box(10, 23, (24, 24)) == (766, 33, 800, 67)  # rows 160..176 of 144..240


def test_a_letterboxed_wide_images_map_lands_on_the_right_side_of_the_original():
    w, h, grid = 800, 200, (24, 24)
    geo = Geometry.of("letterbox", w, h, 384)
    heat = np.zeros(grid)
    heat[12, 22] = 1.0  # right, mid-height in the input: inside the content rows 9..14
    heat[2, 2] = 5.0  # stronger, but on the padding above the picture: has no place in the original
    out = render(heat, geo, (w // 4, h // 4))
    assert not np.isnan(out).any()  # letterbox shows the whole original
    row, col = np.unravel_index(np.nanargmax(out), out.shape)
    x, y = (col + 0.5) * 4, (row + 0.5) * 4
    assert x > 0.85 * w, "the map must land on the right of the original"
    assert 0.3 * h < y < 0.9 * h
    # In input coordinates the same point is only 2/3 of the way down the letterbox (not in the
    # original's frame): mapping back must move it.
    _, v = geo.to_input(x, y)
    assert 144 <= v <= 240
    box = geo.cell_box(12, 22, grid)
    assert box is not None and box[0] > 0.9 * w


def test_a_centre_crop_leaves_the_cut_sides_without_a_map():
    geo = Geometry.of("center_crop", 800, 200, 384)
    heat = np.ones((24, 24))
    out = render(heat, geo, (800, 200))
    assert np.isnan(out[:, :290]).all() and np.isnan(out[:, 510:]).all()
    assert not np.isnan(out[:, 310:490]).any()
    assert geo.cell_box(0, 0, (24, 24)) == (300, 0, 309, 9)


def test_render_is_exact_at_patch_centres():
    grid = np.random.default_rng(1).random((4, 4))
    geo = Geometry.of("stretch", 384, 384, 384)
    out = render(grid, geo, (384, 384))
    # Patch (r, c) has its centre at pixel 96 * c + 48 (between pixels 47 and 48).
    centre = (out[47, 47] + out[48, 48] + out[47, 48] + out[48, 47]) / 4
    assert centre == pytest.approx(grid[0, 0], abs=0.02)
    assert out[96 * 2 + 48, 96 * 3 + 48] == pytest.approx(grid[2, 3], abs=0.02)


def test_pack_round_trips_within_the_quantisation_step():
    grids = np.random.default_rng(2).random((5, 3, 4)) * 0.01
    grids[3] = 0.0  # an all-zero map survives
    blob, scales = pack(grids)
    assert len(blob) == 5 * 12
    back = unpack(blob, scales, (3, 4))
    assert np.abs(back - grids).max() <= max(scales) / 510 + 1e-12
    assert back[3].max() == 0
    with pytest.raises(ValueError):
        unpack(blob[:-1], scales, (3, 4))
