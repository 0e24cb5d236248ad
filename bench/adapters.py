"""Mixed-adapter batches against one batch per adapter, model-only, side by side in one run.

    .venv/bin/python -m bench.adapters [--arch tiny|base] [--adapters 4] [--images N] [--batch B]
        [--repeats R] [--rank 8] [--threads T] [--device cpu|cuda] [--json]

The bench corpus, preprocessed once; every batch of B images has rows cycling over the adapters
(row i uses adapter i % A). Four ways to caption it, alternating order in every repeat:

* ``plain``: a caption model with no adapter ever loaded (the path without ``--adapter``);
* ``bank_base``: the same rows on a model whose bank holds the adapters, every row None (LoRA layers
  present but inactive: the cost of having loaded adapters, for jobs that use none);
* ``mixed``: one ``generate`` per batch, each row its own adapter (``AdapterBank.caption``);
* ``split``: the batch split by adapter, one ``generate`` per adapter (A generates of B / A rows).

Adapters are random LoRA weights in imgq's layout (imgq.worker.lora, rank ``--rank``), written in peft's
saved format, so the bank loads them as it loads trained ones. Captions are ``CAPTION_TOKENS`` tokens,
greedy. Reported: medians, images/s of each and mixed / split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import WORK, caption_params, checkpoint, make_images, median


def write_random_adapter(model: Any, folder: Path, rank: int, seed: int) -> str:
    """A LoRA of imgq's layout for ``model``'s shapes, random A and B, in peft's saved layout; returns the
    SHA-256 of its weights."""
    import torch
    from safetensors.torch import save_file

    from imgq.worker.lora import TARGET_MODULES, lora_config

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model._model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(TARGET_MODULES, name):
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.02
    config = lora_config(rank, 2 * rank)
    config.base_model_name_or_path = model.name
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--images", type=int, default=None, help="default 256 (tiny) / 16 (base)")
    ap.add_argument("--batch", type=int, default=None, help="default 32 (tiny) / 8 (base)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from imgq.db.adapters import AdapterRecord
    from imgq.worker.adapters import AdapterBank
    from imgq.worker.model import CaptionModel
    from imgq.worker.preprocess import Preprocessor

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images or (256 if args.arch == "tiny" else 16)
    size = args.batch or (32 if args.arch == "tiny" else 8)
    ckpt = str(checkpoint(args.arch))
    plain = CaptionModel(ckpt, device=args.device)
    served = CaptionModel(ckpt, device=args.device)
    plain.load()
    served.load()
    records = []
    for i in range(args.adapters):
        folder = WORK / "adapters" / args.arch / f"r{args.rank}-{i}"
        revision = write_random_adapter(served, folder, args.rank, seed=i)
        records.append(AdapterRecord(f"bench-{i}", "de", served.name, served.revision, str(folder), revision))
    bank = AdapterBank(served, None, capacity=args.adapters)
    for rec in records:
        bank.load(rec)

    pre = Preprocessor.from_image_processor(plain.image_processor)
    pixels = np.stack([pre.pixels(Image.open(p).convert("RGB"), "stretch") for p in make_images(n)])
    params = caption_params()
    batches = [pixels[i : i + size] for i in range(0, n, size)]
    rows = [[records[j % args.adapters] for j in range(len(b))] for b in batches]

    def run_plain(k: int) -> list[str]:
        return [t for b in batches[:k] for t in plain.caption(b, params)]

    def run_bank_base(k: int) -> list[str]:
        return [t for b in batches[:k] for t in bank.caption(b, params, [None] * len(b))]

    def run_mixed(k: int) -> list[str]:
        return [t for b, r in zip(batches[:k], rows[:k], strict=True) for t in bank.caption(b, params, r)]

    def run_split(k: int) -> list[str]:
        out: list[str] = []
        for b, r in zip(batches[:k], rows[:k], strict=True):
            texts: list[str] = [""] * len(b)
            for rec in records:
                idx = [i for i, x in enumerate(r) if x is rec]
                if idx:
                    for i, t in zip(idx, bank.caption(b[idx], params, [rec] * len(idx)), strict=True):
                        texts[i] = t
            out.extend(texts)
        return out

    modes = {"plain": run_plain, "bank_base": run_bank_base, "mixed": run_mixed, "split": run_split}
    for fn in modes.values():  # warm-up: one batch each
        fn(1)
    times: dict[str, list[float]] = {k: [] for k in modes}
    texts: dict[str, list[str]] = {}
    order = list(modes)
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            _sync(args.device)
            start = time.perf_counter()
            texts[name] = modes[name](len(batches))
            _sync(args.device)
            times[name].append(time.perf_counter() - start)
            print(f"repeat {r + 1} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "command": "python -m bench.adapters " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "arch": args.arch, "adapters": args.adapters, "rank": args.rank, "images": n, "batch": size,
        "device": args.device, "tokens": params.max_new_tokens, "torch_threads": torch.get_num_threads(),
        "mixed_equals_split": texts["mixed"] == texts["split"],
        "bank_base_equals_plain": texts["bank_base"] == texts["plain"],
        "adapters_change_captions": sum(a != b for a, b in zip(texts["mixed"], texts["plain"], strict=True)),
        "raw": times,
    }
    for name, t in times.items():
        result[name] = {"img_s": n / median(t), "ms_per_img": 1000 * median(t) / n}
    result["mixed_over_split"] = result["mixed"]["img_s"] / result["split"]["img_s"]
    result["mixed_over_plain"] = result["mixed"]["img_s"] / result["plain"]["img_s"]
    result["bank_base_over_plain"] = result["bank_base"]["img_s"] / result["plain"]["img_s"]
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"\n{result['command']} ({args.device}, {result['torch_threads']} torch threads, {n} images, batch "
          f"{size}, {args.adapters} adapters of rank {args.rank}, {params.max_new_tokens} tokens, "
          f"median of {args.repeats})\n")
    print("| mode | img/s | ms/img |")
    print("|---|---|---|")
    for name in modes:
        print(f"| {name} | {result[name]['img_s']:.2f} | {result[name]['ms_per_img']:.1f} |")
    print(f"\nmixed / split: x{result['mixed_over_split']:.2f}; mixed / plain: x{result['mixed_over_plain']:.2f}; "
          f"bank_base / plain: x{result['bank_base_over_plain']:.2f}; mixed captions == split captions: "
          f"{result['mixed_equals_split']}; bank with no adapter == plain: {result['bank_base_equals_plain']}; "
          f"captions changed by an adapter: {result['adapters_change_captions']} / {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
