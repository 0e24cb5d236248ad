"""Single-thread CPU cost per image of each worker stage, side by side, plus candidate changes measured
by monkeypatch/subclass (nothing in imgq is edited).

    .venv/bin/python -m bench.stages [--images 256] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shlex
import sys
import time
from typing import Any

import numpy as np

from bench.common import CAPTION_TOKENS, checkpoint, make_images, median, tiny_checkpoint


def per_image_ms(fn: Any, items: list[Any], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t = time.process_time()
        for it in items:
            fn(it)
        runs.append((time.process_time() - t) * 1000 / len(items))
    return median(runs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from PIL import Image

    from imgq.contract import CaptionParams
    from imgq.worker.decode import decode
    from imgq.worker.model import CaptionModel
    from imgq.worker.preprocess import Preprocessor

    paths = make_images(args.images)
    blobs = [p.read_bytes() for p in paths]
    model = CaptionModel(str(checkpoint("tiny")), device="cpu")
    pre = Preprocessor.from_image_processor(model.image_processor)
    decoded = [decode(b, max_pixels=40_000_000, target=384).image for b in blobs]
    resized = [im.resize((384, 384), pre.resample) for im in decoded]
    r = args.repeats
    out: dict[str, float] = {}
    out["read file (open+read)"] = per_image_ms(lambda p: p.read_bytes(), paths, r)
    out["sha256 of bytes (fetch's version)"] = per_image_ms(lambda b: hashlib.sha256(b).hexdigest(), blobs, r)
    out["decode(): identify + JPEG decode + RGB"] = per_image_ms(
        lambda b: decode(b, max_pixels=40_000_000, target=384), blobs, r)
    out["  plain Image.open(...).load() (reference)"] = per_image_ms(
        lambda b: Image.open(io.BytesIO(b)).load(), blobs, r)
    out["  JPEG draft decode at 1/2 scale (320x240; not usable at 384)"] = per_image_ms(
        lambda b: _draft(b, (320, 240)), blobs, r)
    out["resize 640x480 -> 384x384 bicubic"] = per_image_ms(lambda im: im.resize((384, 384), pre.resample), decoded, r)
    out["  resize bilinear (changes output; reference)"] = per_image_ms(
        lambda im: im.resize((384, 384), Image.Resampling.BILINEAR), decoded, r)
    out["normalise (LUT np.take -> float32 CHW)"] = per_image_ms(pre._normalize, resized, r)
    out["  uint8 HWC -> CHW only (normalise on device instead)"] = per_image_ms(
        lambda im: np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)), resized, r)
    out["  the Image.copy() decode() no longer makes of an upright RGB JPEG"] = per_image_ms(
        lambda im: im.copy(), decoded, r)
    out["Preprocessor.__call__ total (resize + normalise)"] = per_image_ms(lambda im: pre(im, "stretch"), decoded, r)
    proc = model.image_processor
    out["  HF BlipImageProcessor (naive path), per image"] = per_image_ms(
        lambda im: proc(images=im, return_tensors="np"), decoded[:64], max(1, r // 2))

    import torch

    uint8 = np.stack([pre.pixels(im, "stretch") for im in decoded[:32]])
    batch = [uint8]
    model.model_input(uint8)
    mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in (pre.mean, pre.std))
    out["device normalise, batch 32: in place x*gain+offset (model_input)"] = per_image_ms(
        model.model_input, batch, r) / 32
    out["  textbook (x*scale - mean)/std, as before 2026-11-27"] = per_image_ms(
        lambda b: (torch.from_numpy(b).to(torch.float32) * pre.rescale_factor - mean) / std, batch, r) / 32

    params = CaptionParams(max_new_tokens=CAPTION_TOKENS, min_new_tokens=CAPTION_TOKENS)
    threads = torch.get_num_threads()
    old_tiny = CaptionModel(str(tiny_checkpoint(16)), device="cpu")
    for label, tiny in (("tiny (patch 64, 37 vision tokens)", model),
                        ("  old tiny (patch 16, 577 vision tokens)", old_tiny)):
        tiny.caption(uint8, params)
        runs = []
        for _ in range(max(2, r // 2)):
            t = time.process_time()
            tiny.caption(uint8, params)
            runs.append((time.process_time() - t) * 1000 / len(uint8))
        out[f"{label} caption, batch 32, 20 tokens (process CPU, {threads} torch threads)"] = median(runs)

    from imgq.worker.retrieval import RetrievalModel

    retrieval = RetrievalModel(str(checkpoint("tiny", "embed")), device="cpu")
    retrieval.embed_images(uint8)
    runs = []
    for _ in range(max(2, r // 2)):
        t = time.process_time()
        retrieval.embed_images(uint8)
        runs.append((time.process_time() - t) * 1000 / len(uint8))
    out[f"tiny retrieval embed_images, batch 32 (process CPU, {threads} torch threads)"] = median(runs)

    command = "python -m bench.stages " + shlex.join(sys.argv[1:])
    if args.json:
        print(json.dumps({"command": command, "cpu_ms_per_image": out}, indent=1))
    else:
        print(f"# {command}\n# single-thread process CPU ms per 640x480 JPEG (median of {r})")
        for k, v in out.items():
            print(f"{k:72s} {v:7.2f}")
    return 0


def _draft(data: bytes, size: tuple[int, int]) -> None:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.draft("RGB", size)
    im.load()


if __name__ == "__main__":
    raise SystemExit(main())
