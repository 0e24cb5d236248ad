"""Eager against fused (SDPA) attention for captioning, CPU or GPU, model-only, side by side.

    .venv/bin/python -m bench.attention [--arch tiny|base] [--images N] [--batch B] [--repeats R]
        [--device cpu|cuda] [--json]

Two ``CaptionModel`` instances of one checkpoint, ``attention="eager"`` and ``"sdpa"``
(IMGQ_ATTENTION), run the same uint8 batches of the bench corpus, alternating in every repeat:
(1) the vision encoder alone, (2) the whole greedy caption of ``CAPTION_TOKENS`` tokens; the decode
is (2) - (1). Reported: ms per image of each, images/s, sdpa / eager, the largest logit difference
on the first batch, and how many greedy captions differ (they must not, in fp32).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

from bench.common import caption_params, checkpoint, make_images, median


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "base"], default="base")
    ap.add_argument("--images", type=int, default=None, help="default 16 (base) / 256 (tiny)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from imgq.worker.model import CaptionModel
    from imgq.worker.preprocess import Preprocessor

    n = args.images or (16 if args.arch == "base" else 256)
    ckpt = str(checkpoint(args.arch))
    models = {name: CaptionModel(ckpt, device=args.device, attention=name) for name in ("eager", "sdpa")}
    for model in models.values():
        model.load()
    pre = Preprocessor.from_image_processor(models["eager"].image_processor)
    pixels = np.stack([pre.pixels(Image.open(p).convert("RGB"), "stretch") for p in make_images(n)])
    params = caption_params()
    batches = [pixels[i : i + args.batch] for i in range(0, n, args.batch)]

    def vision(model: Any) -> float:
        _sync(args.device)
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                model._model.vision_model(pixel_values=model.model_input(batch))
        _sync(args.device)
        return time.perf_counter() - start

    def caption(model: Any) -> tuple[float, list[str]]:
        _sync(args.device)
        start = time.perf_counter()
        texts = [text for batch in batches for text in model.caption(batch, params)]
        _sync(args.device)
        return time.perf_counter() - start, texts

    for model in models.values():  # warm-up
        caption(model) if args.arch == "tiny" else model.caption(batches[0][:2], params)
    times: dict[str, dict[str, list[float]]] = {k: {"vision": [], "caption": []} for k in models}
    texts: dict[str, list[str]] = {}
    for r in range(args.repeats):
        for name in (("eager", "sdpa") if r % 2 == 0 else ("sdpa", "eager")):
            times[name]["vision"].append(vision(models[name]))
            seconds, texts[name] = caption(models[name])
            times[name]["caption"].append(seconds)
            print(f"repeat {r + 1} {name}: vision {times[name]['vision'][-1]:.2f} s, caption {seconds:.2f} s",
                  file=sys.stderr, flush=True)
    ids = torch.full((len(batches[0]), 6), models["eager"]._model.config.text_config.bos_token_id,
                     device=args.device)
    with torch.inference_mode():
        logits = {k: m._model(pixel_values=m.model_input(batches[0]), input_ids=ids).logits.float()
                  for k, m in models.items()}
    result: dict[str, Any] = {
        "command": "python -m bench.attention " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "arch": args.arch, "images": n, "batch": args.batch, "device": args.device, "tokens": params.max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "max_logit_diff": float((logits["sdpa"] - logits["eager"]).abs().max()),
        "logit_scale": float(logits["eager"].abs().max()),
        "captions_differing": sum(a != b for a, b in zip(texts["eager"], texts["sdpa"], strict=True)),
        "raw": times,
    }
    for name, t in times.items():
        v, c = median(t["vision"]), median(t["caption"])
        result[name] = {"vision_ms_per_img": 1000 * v / n, "decode_ms_per_img": 1000 * (c - v) / n,
                        "caption_ms_per_img": 1000 * c / n, "img_s": n / c}
    result["sdpa_over_eager_img_s"] = result["sdpa"]["img_s"] / result["eager"]["img_s"]
    result["vision_speedup"] = result["eager"]["vision_ms_per_img"] / result["sdpa"]["vision_ms_per_img"]
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"\n{result['command']} ({args.device}, {result['torch_threads']} torch threads)\n")
    print("| attention | vision ms/img | decode ms/img | caption ms/img | img/s |")
    print("|---|---|---|---|---|")
    for name in ("eager", "sdpa"):
        x = result[name]
        print(f"| {name} | {x['vision_ms_per_img']:.1f} | {x['decode_ms_per_img']:.1f} | "
              f"{x['caption_ms_per_img']:.1f} | {x['img_s']:.2f} |")
    print(f"\nsdpa / eager: x{result['sdpa_over_eager_img_s']:.2f} images/s, "
          f"vision encoder x{result['vision_speedup']:.2f}; "
          f"max logit difference {result['max_logit_diff']:.2e} (scale {result['logit_scale']:.1f}); "
          f"greedy captions differing: {result['captions_differing']} / {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
