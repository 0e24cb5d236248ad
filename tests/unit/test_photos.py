"""The bench's realistic corpus (bench/photos.py): deterministic bytes, the stated sizes and
orientations, and rotated photos that display upright through the worker's own decode."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from bench import photos
from imgq.worker.decode import decode

MAX_PIXELS = 40_000_000


def small(it: photos.Item, width: int, height: int) -> photos.Item:
    """The same item (kind, seed, orientation) at a size a unit test can afford."""
    return dataclasses.replace(it, width=width, height=height)


@pytest.mark.parametrize(("corpus", "index"), [("photos12mp", 0), ("photos12mp", 1), ("photos12mp", 3),
                                               ("screenshots", 0), ("thumbs", 1)])
def test_the_same_item_renders_to_the_same_bytes_and_another_item_to_others(corpus, index):
    it = small(photos.item(corpus, index), 96, 72)
    first, second = photos.render(it), photos.render(dataclasses.replace(it))
    assert first == second
    assert photos.render(dataclasses.replace(it, seed=it.seed + 1)) != first


def test_the_photo_corpus_is_12_megapixel_jpegs_a_quarter_each_with_orientation_6_and_8():
    items = [photos.item("photos12mp", i) for i in range(8)]
    assert {(it.width, it.height) for it in items} == {(4032, 3024)}
    assert [it.orientation for it in items] == [1, 6, 1, 8, 1, 6, 1, 8]
    assert [it.upright for it in items[:2]] == [(4032, 3024), (3024, 4032)]
    assert all(it.name.endswith(".jpg") and it.kind == "photo" for it in items)


def test_screenshots_are_1080p_pngs_and_thumbnails_alternate_two_small_sizes():
    assert {(photos.item("screenshots", i).width, photos.item("screenshots", i).height) for i in range(4)} == {
        (1920, 1080)}
    assert [(photos.item("thumbs", i).width, photos.item("thumbs", i).height) for i in range(4)] == [
        (160, 120), (320, 240), (160, 120), (320, 240)]


def test_the_mix_interleaves_the_other_corpora_and_never_repeats_a_file():
    items = [photos.item("mix", i) for i in range(64)]
    assert [it.corpus for it in items[:4]] == ["photos12mp", "thumbs", "screenshots", "thumbs"]
    names = [(it.corpus, it.name) for it in items]
    assert len(set(names)) == len(names)
    # The mix's files are the other corpora's own files, from index 0 up, none skipped.
    for corpus in ("photos12mp", "thumbs", "screenshots"):
        mine = sorted(it.name for it in items if it.corpus == corpus)
        assert mine == sorted(photos.item(corpus, i).name for i in range(len(mine)))


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_rotated_photo_carries_its_tag_and_decodes_upright_to_the_scene_an_upright_one_shows(orientation):
    seed = 7
    stored = photos.photo_jpeg(seed, 96, 64, orientation=orientation)
    with Image.open(io.BytesIO(stored)) as raw:
        assert raw.size == (96, 64)
        assert raw.getexif().get(0x0112) == orientation
    shown = decode(stored, max_pixels=MAX_PIXELS)
    assert (shown.width, shown.height) == (64, 96)
    # The same seed composes the same upright scene; stored upright, it needs no tag.
    upright = decode(photos.photo_jpeg(seed, 64, 96), max_pixels=MAX_PIXELS)
    a = np.asarray(shown.image, dtype=np.int16)
    b = np.asarray(upright.image, dtype=np.int16)
    wrong_way = np.asarray(shown.image.transpose(Image.Transpose.ROTATE_180), dtype=np.int16)
    assert np.abs(a - b).mean() < 6  # JPEG blocks fall differently on the two, nothing more
    assert np.abs(a - b).mean() * 3 < np.abs(wrong_way - b).mean()


def test_a_screenshot_is_a_png_of_the_stated_size():
    data = photos.render(small(photos.item("screenshots", 2), 320, 180))
    decoded = decode(data, max_pixels=MAX_PIXELS)
    assert (decoded.format, decoded.width, decoded.height) == ("PNG", 320, 180)


def test_corpus_files_are_generated_once_and_reused(tmp_path):
    paths = photos.corpus_paths("thumbs", 3, root=tmp_path)
    assert [p.name for p in paths] == [photos.item("thumbs", i).name for i in range(3)]
    assert [Image.open(p).size for p in paths] == [(160, 120), (320, 240), (160, 120)]
    paths[0].write_bytes(b"kept")  # a cached file is not regenerated
    assert photos.corpus_paths("thumbs", 3, root=tmp_path)[0].read_bytes() == b"kept"
    assert not list(tmp_path.rglob("*.tmp"))
