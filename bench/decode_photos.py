"""Decode + preprocess on realistic inputs (bench/photos.py), with JPEG draft decoding and without:
CPU per image, how far the draft path's pixels are from a full decode, and whether captions change.

    .venv/bin/python -m bench.decode_photos [--corpora [synthetic] photos12mp screenshots thumbs mix] [--images 32]
        [--repeats 5] [--base-images 0] [--json]

Per corpus:
* **CPU ms per image**, single thread, process CPU time / images: the worker's own
  ``decode(data, max_pixels, target=draft_target(...))`` then ``CaptionRunner.prepare`` (the
  Preprocessor's resize to the model input, uint8 CHW). Draft on and off alternate within each
  repeat; medians, and off / on as a ratio. Decode alone is timed the same way.
* **Pixel difference** in normalised units (what the model sees: ``model_input``, the model's own
  rescale + normalisation with the processor's mean and std) of the draft path against
  (1) a full decode through the same worker preprocess, and (2) a full decode through the
  checkpoint's own ``BlipImageProcessor`` (float32 end to end, no uint8 step). (3) is (2) against
  the full-decode worker path: what the uint8 step and Pillow-vs-processor resize cost alone.
* **Caption changes**: the tiny checkpoint captions every image from both paths (batched, greedy,
  20 tokens): how many captions differ; and, as a control, how many a +-1 level change of every
  pixel changes (random weights sit on near-ties). ``--base-images N``: the same on the BLIP-base architecture
  for the first N images (slow on a CPU: ~1 s per image per path).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import caption_params, checkpoint, make_images, median
from bench.photos import CORPORA, corpus_paths

MAX_PIXELS = 40_000_000


def cpu_ms(fn: Callable[[bytes], Any], blobs: list[bytes]) -> float:
    t = time.process_time()
    for b in blobs:
        fn(b)
    return (time.process_time() - t) * 1000 / len(blobs)


def abs_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.max()), float(d.mean())


def caption_changes(model: Any, runner: Any, on: list[np.ndarray], off: list[np.ndarray], batch: int = 16) -> int:
    params = caption_params()
    changed = 0
    for start in range(0, len(on), batch):
        a = runner.run(np.stack(on[start : start + batch]), None, params)
        b = runner.run(np.stack(off[start : start + batch]), None, params)
        changed += sum(x != y for x, y in zip(a, b, strict=True))
    return changed


def bench_corpus(corpus: str, n: int, repeats: int, runner: Any, base: Any | None, base_n: int) -> dict[str, Any]:
    from imgq.worker.decode import decode, draft_target

    model = runner.model
    params = runner.kind_params()
    size = runner.input_size
    paths = make_images(n) if corpus == "synthetic" else corpus_paths(corpus, n)
    blobs = [p.read_bytes() for p in paths]
    targets = {"draft": draft_target([size], True), "full": draft_target([size], False)}

    def prep(target: int | None) -> Callable[[bytes], np.ndarray]:
        def run(data: bytes) -> np.ndarray:
            return runner.prepare(decode(data, max_pixels=MAX_PIXELS, target=target).image, params)
        return run

    def decode_only(target: int | None) -> Callable[[bytes], Any]:
        return lambda data: decode(data, max_pixels=MAX_PIXELS, target=target)

    # Pixels first (also warms caches), then timings on the same bytes.
    on = [prep(targets["draft"])(b) for b in blobs]
    off = [prep(targets["full"])(b) for b in blobs]
    processor = model.image_processor
    diffs: dict[str, list[tuple[float, float]]] = {"draft_vs_full_worker": [], "draft_vs_full_processor": [],
                                                    "full_worker_vs_full_processor": []}
    decoded_sizes = set()
    for data, a, b in zip(blobs, on, off, strict=True):
        norm_on = model.model_input(a[None]).float().numpy()
        norm_off = model.model_input(b[None]).float().numpy()
        full = decode(data, max_pixels=MAX_PIXELS).image
        decoded_sizes.add(decode(data, max_pixels=MAX_PIXELS, target=targets["draft"]).image.size)
        reference = np.asarray(processor(images=full, return_tensors="np")["pixel_values"], dtype=np.float32)
        del full
        diffs["draft_vs_full_worker"].append(abs_diff(norm_on, norm_off))
        diffs["draft_vs_full_processor"].append(abs_diff(norm_on, reference))
        diffs["full_worker_vs_full_processor"].append(abs_diff(norm_off, reference))
    pixels = {k: {"max": max(m for m, _ in v), "mean": float(np.mean([x for _, x in v]))} for k, v in diffs.items()}
    identical = sum(bool(np.array_equal(a, b)) for a, b in zip(on, off, strict=True))

    runs: dict[str, list[float]] = {"draft": [], "full": [], "decode draft": [], "decode full": []}
    for _ in range(repeats):  # alternate, so a noisy neighbour hits both paths alike
        for name in ("draft", "full"):
            runs[name].append(cpu_ms(prep(targets[name]), blobs))
            runs[f"decode {name}"].append(cpu_ms(decode_only(targets[name]), blobs))
    ms = {k: median(v) for k, v in runs.items()}
    out: dict[str, Any] = {
        "images": n, "bytes_mean": float(np.mean([len(b) for b in blobs])),
        "draft_decoded_sizes": sorted(decoded_sizes),
        "cpu_ms_per_image": {"decode+preprocess draft": ms["draft"], "decode+preprocess full": ms["full"],
                             "decode draft": ms["decode draft"], "decode full": ms["decode full"]},
        "full_over_draft": ms["full"] / ms["draft"],
        "raw_ms": runs,
        "identical_inputs": identical,
        "normalised_abs_diff": pixels,
        "uint8_abs_diff_draft_vs_full": dict(zip(("max", "mean"), abs_diff(np.stack(on), np.stack(off)), strict=True)),
        "tiny_caption_changes": caption_changes(model, runner, on, off),
        # Control: how many captions a +-1 level change of every pixel (the low bit flipped) changes
        # on the same model. A random-weight model can sit on near-ties that any change tips over.
        "tiny_caption_changes_lsb_control": caption_changes(model, runner, off, [x ^ 1 for x in off]),
    }
    if base is not None and base_n:
        out["base_caption_changes"] = {
            "images": min(base_n, n), "changed": caption_changes(base.model, base, on[:base_n], off[:base_n], 8),
            "lsb_control": caption_changes(base.model, base, off[:base_n], [x ^ 1 for x in off[:base_n]], 8)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=["synthetic", *CORPORA],
                    help="synthetic: bench.common's 640x480 JPEGs, for reference")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--base-images", type=int, default=0, help="also count caption changes on BLIP-base")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from imgq.worker.model import CaptionModel
    from imgq.worker.runners import CaptionRunner

    torch.set_num_threads(1)  # the timed part is single-threaded Pillow/numpy; keep the model out of the way
    runner = CaptionRunner(CaptionModel(str(checkpoint("tiny")), device="cpu"))
    runner.load()
    base = None
    if args.base_images:
        base = CaptionRunner(CaptionModel(str(checkpoint("base")), device="cpu"))
        base.load()
    command = "python -m bench.decode_photos " + shlex.join(sys.argv[1:])
    results = {c: bench_corpus(c, args.images, args.repeats, runner, base, args.base_images) for c in args.corpora}
    if args.json:
        print(json.dumps({"command": command, "corpora": results}, indent=1))
        return 0
    print(f"# {command}\n# single-thread process CPU ms per image, median of {args.repeats}, draft/full alternated")
    print(f"{'corpus':12s} {'draft ms':>9s} {'full ms':>9s} {'full/draft':>10s} {'dec draft':>9s} {'dec full':>9s}"
          f" {'max|d| w':>9s} {'mean|d| w':>10s} {'max|d| p':>9s} {'mean|d| p':>10s} {'ref max':>8s}"
          f" {'ref mean':>9s} {'captions (lsb)':>14s}")
    for c, r in results.items():
        ms, px = r["cpu_ms_per_image"], r["normalised_abs_diff"]
        w, p, ref = px["draft_vs_full_worker"], px["draft_vs_full_processor"], px["full_worker_vs_full_processor"]
        caps = f"{r['tiny_caption_changes']}/{r['images']} ({r['tiny_caption_changes_lsb_control']})"
        print(f"{c:12s} {ms['decode+preprocess draft']:9.2f} {ms['decode+preprocess full']:9.2f}"
              f" {r['full_over_draft']:10.2f} {ms['decode draft']:9.2f} {ms['decode full']:9.2f}"
              f" {w['max']:9.4f} {w['mean']:10.5f} {p['max']:9.4f} {p['mean']:10.5f} {ref['max']:8.4f}"
              f" {ref['mean']:9.5f} {caps:>14s}")
        if "base_caption_changes" in r:
            bc = r["base_caption_changes"]
            print(f"{'':12s} base captions changed: {bc['changed']}/{bc['images']} (lsb control {bc['lsb_control']})")
    print("# |d| w: draft vs full decode, both through the worker's preprocess; p: draft vs full decode through "
          "the checkpoint's BlipImageProcessor; ref: full decode, worker vs processor. Normalised units.\n"
          "# captions: tiny captions that differ, draft vs full (lsb: full vs full with every level +-1, a control)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
