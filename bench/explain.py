"""Explained vs plain captioning, side by side, in one process (model only, no services).

Each repeat runs the same batches plain (``CaptionModel.caption``) and explained
(``imgq.worker.explainer.explain_batch``: cross-attention captured inside the same batched
generate, assembled per word), alternating which goes first; the figures are medians. With
``--overlays`` a third pass also draws each image's overlays, contact sheet and explain.json (CPU
work the worker does for jobs with IMGQ_EXPLAIN_OUTPUT set). Every explained caption is checked
equal to its plain caption.

    python -m bench.explain --arch tiny
    python -m bench.explain --arch base --images 16 --batch 8
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

from bench.common import CAPTION_TOKENS, checkpoint, make_images, median


def _passes(model: Any, arrays: Any, params: Any, batch: int, images: list[Any], mode: str
            ) -> tuple[float, float, list]:
    """(images/s of wall time, CPU ms of this process per image, captions). CPU time is what
    other tenants of a shared machine cannot inflate, so it is the steadier of the two."""
    from imgq.explain import Geometry
    from imgq.worker.explainer import explain_batch
    from imgq.worker.overlay import render_files

    captions: list[str] = []
    t = time.perf_counter()
    cpu = time.process_time()
    for start in range(0, len(arrays), batch):
        chunk = arrays[start : start + batch]
        if mode == "plain":
            captions += model.caption(chunk, params)
            continue
        explained = explain_batch(model, chunk, params)
        captions += [ex.caption for ex in explained]
        if mode == "overlays":
            for ex, image in zip(explained, images[start : start + batch], strict=True):
                render_files(image, ex, Geometry.of("stretch", image.width, image.height, chunk.shape[-1]))
    return len(arrays) / (time.perf_counter() - t), (time.process_time() - cpu) * 1000 / len(arrays), captions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--images", type=int, default=None, help="default 256 (tiny) / 16 (base)")
    ap.add_argument("--batch", type=int, default=None, help="default 32 (tiny) / 8 (base)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--overlays", action="store_true", help="also time explain + overlays + explain.json")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)

    import numpy as np
    from PIL import Image

    from imgq.contract import CaptionParams
    from imgq.worker.decode import decode
    from imgq.worker.model import CaptionModel
    from imgq.worker.preprocess import Preprocessor

    tiny = args.arch == "tiny"
    n = args.images or (256 if tiny else 16)
    batch = args.batch or (32 if tiny else 8)
    model = CaptionModel(str(checkpoint(args.arch)), device=args.device)
    model.load()
    pre = Preprocessor.from_image_processor(model.image_processor)
    images = [decode(p.read_bytes(), max_pixels=40_000_000).image for p in make_images(n)]
    arrays = np.stack([pre.pixels(im, "stretch") for im in images])
    small = [im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR) for im in images]
    params = CaptionParams(max_new_tokens=CAPTION_TOKENS, min_new_tokens=CAPTION_TOKENS, num_beams=args.num_beams)

    modes = ["plain", "explain"] + (["overlays"] if args.overlays else [])
    _passes(model, arrays[:batch], params, batch, small, "explain")  # warm-up: first-call costs
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu_ms: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):
        order = modes if r % 2 == 0 else modes[::-1]
        got: dict[str, list[str]] = {}
        for mode in order:
            rate, cpu, got[mode] = _passes(model, arrays, params, batch, small, mode)
            rates[mode].append(rate)
            cpu_ms[mode].append(cpu)
        if any(got[m] != got["plain"] for m in modes):
            print("explained captions differ from plain captions", file=sys.stderr)
            return 1
    dec = model.decoder_shape
    result = {
        "command": "python -m bench.explain " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "arch": args.arch, "device": model.device, "dtype": str(model.dtype), "images": n, "batch": batch,
        "tokens": CAPTION_TOKENS, "num_beams": args.num_beams, "repeats": args.repeats,
        "decoder": dec, "grid": list(model.patch_grid),
        "img_s": {m: median(v) for m, v in rates.items()}, "runs": rates,
        "cpu_ms_per_img": {m: median(v) for m, v in cpu_ms.items()}, "cpu_runs": cpu_ms,
    }
    result["explain_cost"] = result["img_s"]["plain"] / result["img_s"]["explain"]
    result["explain_cpu_cost"] = result["cpu_ms_per_img"]["explain"] / result["cpu_ms_per_img"]["plain"]
    if args.overlays:
        result["overlays_cost"] = result["img_s"]["plain"] / result["img_s"]["overlays"]
        result["overlays_cpu_cost"] = result["cpu_ms_per_img"]["overlays"] / result["cpu_ms_per_img"]["plain"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['command']}\n{args.arch}: {dec['layers']} decoder layers ({dec['cross_attention_layers']} with "
          f"cross-attention), {dec['heads']} heads, grid {model.patch_grid}; {n} images, batch {batch}, "
          f"{CAPTION_TOKENS} tokens, beams {args.num_beams}, device {model.device}, medians of {args.repeats}")
    for mode in modes:
        runs = ", ".join(f"{v:.2f}" for v in rates[mode])
        print(f"  {mode:9s} {result['img_s'][mode]:9.2f} img/s  {result['cpu_ms_per_img'][mode]:9.1f} CPU ms/img"
              f"   (wall runs: {runs})")
    print(f"  explain costs {result['explain_cost']:.2f}x plain in wall time, {result['explain_cpu_cost']:.2f}x in "
          "CPU time" + (f"; with overlays {result['overlays_cost']:.2f}x / {result['overlays_cpu_cost']:.2f}x"
                        if args.overlays else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
