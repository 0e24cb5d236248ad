"""Embed phase of the GPU bench (``python -m bench.gpu_bench --phases embed``): images/s and texts/s
of :class:`imgq.worker.retrieval.RetrievalModel` on the BLIP-base retrieval architecture with random
weights (timing does not depend on the weights).

What is measured, each point after one warm-up call and for at least ``seconds``:

* ``embed_images`` end to end from host uint8 (B, 3, 384, 384), the worker's own path: pinned copy,
  normalisation on the device, ViT-B/16 (577 tokens, eager attention), ``vision_proj``, L2 norm,
  copy back. Results come back to the host, so each call is synchronised.
* the same model work on a batch already on the device (vision encoder + projection only), with
  ``torch.cuda.synchronize``: the difference is what the host side costs;
* ``embed_texts`` on caption-like texts at one batch size (tokenisation on the CPU included);
* optionally, the vision encoder with its attention swapped for ``F.scaled_dot_product_attention``
  on this model instance only (transformers' BLIP attention is eager and hard-coded), with the
  largest embedding difference from eager: is fused attention worth doing in production?

Imports only torch, transformers, numpy and ``imgq.worker.{retrieval,loading,tiny}`` (and
``imgq.errors``), which the GPU image can load without imgq's producer-side dependencies.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Words of the tiny vocabulary, so a text tokenizes to about one token a word as BLIP's would.
_WORDS = [
    *["a", "man", "woman", "dog", "cat", "horse", "bus", "train", "car", "bike", "street", "road"],
    *["beach", "field", "table", "kitchen", "red", "blue", "green", "white", "black", "small", "large"],
    *["two", "three", "sitting", "standing", "walking", "riding", "holding", "next", "to", "near", "on"],
    *["in", "with", "the", "of", "and", "under", "over", "front", "building", "tree", "grass", "sky"],
]


_BASE_VERSION = 2  # 2: weights std 0.02 (1: BLIP's init, vision weights ~1e-10)


@contextlib.contextmanager
def _no_phase(name: str) -> Iterator[None]:
    yield


def retrieval_checkpoint(arch: str, workdir: Path, device: str = "cpu") -> Path:
    """The tiny retrieval checkpoint, or BLIP-base's retrieval architecture (``BlipConfig`` defaults,
    as ``Salesforce/blip-itm-base-coco``: ViT-B/16 at 384 px, 12-layer BERT-base text encoder with
    cross-attention, vocab 30524, 256-d projections), random weights, with the tiny tokenizer and
    image processor."""
    from imgq.worker.tiny import write_tiny_retrieval_checkpoint

    tiny = write_tiny_retrieval_checkpoint(workdir / "tiny-itm")
    if arch == "tiny":
        return tiny
    out = workdir / "base-itm"
    marker = out / "bench-base-itm.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == _BASE_VERSION:
        return out
    import torch
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[SEP]", "[DEC]")}
    config = BlipConfig(
        text_config={
            "vocab_size": 30524,
            "bos_token_id": ids["[DEC]"],
            "sep_token_id": ids["[SEP]"],
            "eos_token_id": ids["[SEP]"],
            "pad_token_id": ids["[PAD]"],
        },
        vision_config={"image_size": 384, "patch_size": 16},
    )
    # Initialised on the GPU when there is one: ~4 s of CPU on 2 cores for 224M parameters otherwise.
    with torch.random.fork_rng(devices=[]), torch.device(device if device.startswith("cuda") else "cpu"):
        torch.manual_seed(0)
        model = BlipForImageTextRetrieval(config).eval()
        # BLIP's vision init is std 1e-10: every image then embeds alike, fp32 CPU runs into
        # denormals, and an SDPA-vs-eager comparison sees only zeros. Trained-like magnitudes instead.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.02)
    staging = workdir / "base-itm.staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    params = sum(p.numel() for p in model.parameters())
    (staging / "bench-base-itm.json").write_text(json.dumps({"version": _BASE_VERSION, "params": params}))
    del model
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


def caption_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` caption-like texts of 6 to 16 words (about 8 to 18 tokens)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(6, 17)))) for _ in range(n)]


def bench_embed(
    *,
    device: str,
    dtype: str,
    arch: str,
    workdir: Path,
    batches: list[int],
    seconds: float = 2.5,
    text_batch: int = 1024,
    sdpa: bool = True,
    budget_s: float = 80.0,
    phase: Callable[[str], contextlib.AbstractContextManager[Any]] = _no_phase,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the embed measurements; returns ``{name: result}`` as the other GPU bench phases do.
    Points that would start after ``budget_s`` are skipped (and say so), to keep the phase bounded."""
    import torch

    from imgq.worker.retrieval import RetrievalModel

    t_start = time.perf_counter()
    cuda = device.startswith("cuda")
    results: dict[str, Any] = {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(name: str, run: Callable[[], Any], items: int) -> None:
        if time.perf_counter() - t_start > budget_s:
            results[name] = {"skipped": f"over the {budget_s:.0f} s budget of the embed phase"}
            log(f"{name}: skipped (budget)")
            return
        try:
            run()  # warm-up: allocator, kernels
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with phase(name):
                t0 = time.perf_counter()
                runs = 0
                while runs < 2 or time.perf_counter() - t0 < seconds:
                    run()
                    runs += 1
                sync()
                dt = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            rate = runs * items / dt
            results[name] = {"img_s": rate, "batch_s": dt / runs, "runs": runs, "peak_gib": peak}
            log(f"{name}: {rate:,.1f}/s ({dt / runs * 1000:.1f} ms/batch of {items}, peak {peak:.1f} GiB)")
        except Exception as exc:  # e.g. out of memory at the largest batch: report and go on
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            log(f"{name}: FAILED {results[name]['error']}")
            if cuda:
                torch.cuda.empty_cache()

    t0 = time.perf_counter()
    ckpt = retrieval_checkpoint(arch, workdir, device)
    t_ckpt = time.perf_counter() - t0
    # Eager first (transformers' attention), then the production default (IMGQ_ATTENTION=sdpa).
    model = RetrievalModel(str(ckpt), device=device, dtype=dtype, attention="eager")
    t0 = time.perf_counter()
    model.load()
    t_load = time.perf_counter() - t0
    size = model.image_processor.size["height"]
    results["embed setup"] = {
        "checkpoint_s": t_ckpt,
        "load_s": t_load,
        "dim": model.dim,
        "image_size": size,
        "params_m": sum(p.numel() for p in model._model.parameters()) / 1e6,
    }
    log(f"embed: checkpoint {t_ckpt:.1f} s, load {t_load:.1f} s, dim {model.dim}, {size} px")

    # One random batch, sliced: generating 1024 x 3 x 384 x 384 bytes takes seconds of CPU.
    pool = np.random.default_rng(0).integers(0, 256, (max(batches), 3, size, size), np.uint8)
    for batch in batches:
        host = pool[:batch]
        timed(f"embed images (host uint8 -> vectors) batch={batch}", lambda h=host: model.embed_images(h), batch)
    for batch in batches:

        def on_device(b: int = batch) -> Callable[[], Any]:
            x = model.model_input(pool[:b])

            def run() -> Any:
                with torch.inference_mode():
                    return model._vision(x)[1]

            return run

        timed(f"embed images (on device, vision+proj) batch={batch}", on_device(), batch)
    texts = caption_texts(text_batch)
    tokens = float(np.mean(model.count_tokens(texts)))
    timed(f"embed texts batch={text_batch}", lambda: model.embed_texts(texts), text_batch)
    if (name := f"embed texts batch={text_batch}") in results:
        results[name]["mean_tokens"] = tokens
        if "img_s" in results[name]:
            results[name]["texts_s"] = results[name].pop("img_s")

    # The production path: IMGQ_ATTENTION=sdpa (the default), from host uint8, at the same batches.
    if sdpa and time.perf_counter() - t_start <= budget_s:
        try:
            fused = RetrievalModel(str(ckpt), device=device, dtype=dtype, attention="sdpa")
            fused.load()
            sample = pool[: min(64, max(batches))]
            diff = float(np.abs(model.embed_images(sample) - fused.embed_images(sample)).max())
            log(f"SDPA vs eager embeddings ({dtype}): max |diff| {diff:.2e}")
            for batch in batches:
                name = f"embed images SDPA (host uint8 -> vectors) batch={batch}"
                timed(name, lambda h=pool[:batch]: fused.embed_images(h), batch)
                if name in results:
                    results[name]["max_abs_diff_vs_eager"] = diff
        except Exception as exc:  # report, keep the eager figures
            results["embed SDPA"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            log(f"embed SDPA: failed: {results['embed SDPA']['error']}")
    results["embed setup"]["phase_s"] = time.perf_counter() - t_start
    log(f"embed phase: {results['embed setup']['phase_s']:.0f} s")
    return results
