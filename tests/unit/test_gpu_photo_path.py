"""The GPU bench's nvJPEG path (bench/gpu_bench.py), run on the CPU with a Pillow stand-in decoder
that, like nvJPEG, ignores EXIF: the path itself must make photos upright, or its pixels are
compared with rotated ones (GPU run 4 did that: a mean of 33.7 levels of difference)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from bench import photos
from bench.gpu_bench import exif_orientation, gpu_decode_resize, orient
from imgq.worker.decode import decode
from imgq.worker.preprocess import Preprocessor


def tagged(blob: bytes, orientation: int) -> bytes:
    """``blob``'s picture re-saved with the EXIF Orientation tag ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    with Image.open(io.BytesIO(blob)) as im:
        im.save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def nvjpeg_like(chunk: list[torch.Tensor], device: str, mode: object) -> list[torch.Tensor]:
    """What ``torchvision.io.decode_jpeg(..., device="cuda")`` returns: (3, H, W) uint8 as stored."""
    out = []
    for t in chunk:
        with Image.open(io.BytesIO(t.numpy().tobytes())) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device))
    return out


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_is_what_pillow_exif_transpose_does(orientation):
    blob = tagged(photos.photo_jpeg(3, 48, 32), orientation)
    assert exif_orientation(blob) == orientation
    stored = nvjpeg_like([torch.frombuffer(bytearray(blob), dtype=torch.uint8)], "cpu", "RGB")[0]
    with Image.open(io.BytesIO(blob)) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = orient(stored, orientation).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_a_file_without_a_tag_or_an_unreadable_one_is_upright():
    assert exif_orientation(photos.photo_jpeg(3, 48, 32)) == 1
    assert exif_orientation(b"not an image") == 1


def test_rotated_photos_come_out_as_the_worker_decodes_them(tiny_model_dir):
    from transformers import BlipProcessor

    pre = Preprocessor.from_image_processor(BlipProcessor.from_pretrained(str(tiny_model_dir)).image_processor)
    blobs = [photos.photo_jpeg(seed, 640, 480, orientation=o) for seed, o in ((1, 6), (2, 1), (3, 8))]
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    got = gpu_decode_resize(tensors, [exif_orientation(b) for b in blobs], pre.size, "cpu", nvjpeg_like).numpy()
    worker = np.stack([pre.pixels(decode(b, max_pixels=40_000_000).image) for b in blobs])
    diff = np.abs(got.astype(int) - worker.astype(int))
    # torch's antialiased bicubic against Pillow's: a few levels at sharp edges, nothing more.
    assert diff.mean() < 1.0, diff.mean()
    # Left unrotated (what the path did before), the rotated two are nowhere near.
    unrotated = gpu_decode_resize(tensors, [1, 1, 1], pre.size, "cpu", nvjpeg_like).numpy()
    assert np.abs(unrotated[[0, 2]].astype(int) - worker[[0, 2]].astype(int)).mean() > 10 * max(diff.mean(), 0.5)
