"""Eager against fused (SDPA) attention for captioning, and the static decode loop, CPU or GPU,
model-only, side by side.

    .venv/bin/python -m bench.attention [--arch tiny|base] [--images N] [--batch B] [--repeats R]
        [--device cpu|cuda] [--variants eager sdpa sdpa+static] [--json]

One ``CaptionModel`` instance of one checkpoint per variant: ``eager`` and ``sdpa``
(IMGQ_ATTENTION), and ``sdpa+static`` (sdpa with IMGQ_DECODE_LOOP=static,
``imgq.worker.decode_loop``). They run the same uint8 batches of the bench corpus, in a rotated
order in every repeat: (1) the vision encoder alone, (2) the whole greedy caption of
``CAPTION_TOKENS`` tokens; the decode is (2) - (1). Reported: ms per image of each, images/s, each
variant / eager, the largest logit difference of sdpa on the first batch, and how many greedy
captions differ from eager's (none may, in fp32).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

from bench.common import caption_params, checkpoint, make_images, median

# variant -> (IMGQ_ATTENTION, IMGQ_DECODE_LOOP)
VARIANTS = {"eager": ("eager", "generate"), "sdpa": ("sdpa", "generate"), "sdpa+static": ("sdpa", "static")}


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
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from imgq.worker.model import CaptionModel
    from imgq.worker.preprocess import Preprocessor

    n = args.images or (16 if args.arch == "base" else 256)
    ckpt = str(checkpoint(args.arch))
    names = list(dict.fromkeys(["eager", *args.variants]))  # eager is what the others are compared with
    models = {name: CaptionModel(ckpt, device=args.device, attention=VARIANTS[name][0],
                                 decode_loop=VARIANTS[name][1]) for name in names}
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
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name]["vision"].append(vision(models[name]))
            seconds, texts[name] = caption(models[name])
            times[name]["caption"].append(seconds)
            print(f"repeat {r + 1} {name}: vision {times[name]['vision'][-1]:.2f} s, caption {seconds:.2f} s",
                  file=sys.stderr, flush=True)
    ids = torch.full((len(batches[0]), 6), models["eager"]._model.config.text_config.bos_token_id,
                     device=args.device)
    with torch.inference_mode():
        logits = {k: models[k]._model(pixel_values=models[k].model_input(batches[0]), input_ids=ids).logits.float()
                  for k in ("eager", "sdpa") if k in models}
    result: dict[str, Any] = {
        "command": "python -m bench.attention " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "arch": args.arch, "images": n, "batch": args.batch, "device": args.device, "tokens": params.max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "max_logit_diff": float((logits["sdpa"] - logits["eager"]).abs().max()) if "sdpa" in logits else None,
        "logit_scale": float(logits["eager"].abs().max()),
        "captions_differing": {k: sum(a != b for a, b in zip(texts["eager"], texts[k], strict=True))
                               for k in names if k != "eager"},
        "raw": times,
    }
    for name, t in times.items():
        v, c = median(t["vision"]), median(t["caption"])
        result[name] = {"vision_ms_per_img": 1000 * v / n, "decode_ms_per_img": 1000 * (c - v) / n,
                        "caption_ms_per_img": 1000 * c / n, "img_s": n / c}
    for name in names[1:]:
        result[name]["over_eager_img_s"] = result[name]["img_s"] / result["eager"]["img_s"]
        result[name]["vision_speedup"] = result["eager"]["vision_ms_per_img"] / result[name]["vision_ms_per_img"]
        result[name]["decode_speedup"] = result["eager"]["decode_ms_per_img"] / result[name]["decode_ms_per_img"]
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"\n{result['command']} ({args.device}, {result['torch_threads']} torch threads)\n")
    print("| variant | vision ms/img | decode ms/img | caption ms/img | img/s | / eager |")
    print("|---|---|---|---|---|---|")
    for name in names:
        x = result[name]
        print(f"| {name} | {x['vision_ms_per_img']:.1f} | {x['decode_ms_per_img']:.1f} | "
              f"{x['caption_ms_per_img']:.1f} | {x['img_s']:.2f} | x{x.get('over_eager_img_s', 1.0):.2f} |")
    if result["max_logit_diff"] is not None:
        print(f"\nsdpa: max logit difference {result['max_logit_diff']:.2e} (scale {result['logit_scale']:.1f})")
    print("greedy captions differing from eager's: "
          + ", ".join(f"{k} {v} / {n}" for k, v in result["captions_differing"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
