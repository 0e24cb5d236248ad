"""Translation throughput, model only, side by side in one run: ``TranslationModel.translate`` on
caption-like English at micro-batch 8, 32 and 128 (sorted by token length, as the worker runs it),
and the same micro-batch unsorted (texts in arrival order), with medians over repeats.

    .venv/bin/python -m bench.translate [--arch tiny|small] [--sentences N] [--repeats R] [--lang de]
        [--device cpu] [--threads T] [--json]

Checkpoints (random weights, the tiny checkpoint's trained sentencepiece tokenizer):

* ``tiny``: ``imgq.worker.tiny_translate`` (d_model 64, 2+2 layers, vocab 1,204);
* ``small``: NLLB-200-distilled-600M's width (d_model 1024, 16 heads, FFN 4096, ReLU) with 2+2 layers
  instead of 12+12 and the tiny vocabulary instead of 256,206 (whose output projection alone is
  262M multiply-adds per generated token): 60M parameters, what a 2-core CPU runs in a minute or two.
  Per token it costs about a sixth of NLLB-600M's layers and none of its big output projection.

Random weights rarely emit ``</s>``, so nearly every text runs to its token budget
(``imgq.worker.translate.token_budget``: 2 x source tokens + 16): an unsorted micro-batch then pays
its longest text's budget for every row, and a trained model, which stops at ``</s>``, gains less
from sorting than shown here. Sorted and unsorted outputs are checked equal (they must be, in fp32).

Reported per path: sentences/s (wall), CPU ms of this process per sentence (steadier than wall time
on a shared machine), the source padding (padded token slots / real tokens - 1) and the decode steps
the micro-batches' budgets allow (sum over micro-batches of the longest budget).

``bench_gpu_translate`` is the GPU bench's translate phase (``python -m bench.gpu_bench --phases
translate``): NLLB-200-distilled-600M's architecture, random weights, bf16, on pre-tokenised ids.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import WORK, median

MICRO_BATCHES = (8, 32, 128)
UNSORTED_MICRO_BATCH = 32

_SUBJECTS = [
    "a man", "a woman", "a young boy", "a little girl", "two people", "a group of people", "a dog",
    "a black and white cat", "a brown horse", "a large elephant", "a giraffe", "a baseball player",
    "a person", "a red double decker bus", "a white truck", "a train", "an airplane", "a small boat",
    "a man in a suit", "a woman wearing a hat", "a plate of food", "a pizza", "a laptop computer",
    "a teddy bear", "a skier", "a surfer", "a motorcycle",
]
_VERBS = [
    "sitting on", "standing next to", "walking down", "riding", "holding", "eating", "looking at",
    "lying on", "flying over", "parked in front of", "playing with", "running across", "jumping over",
    "driving down", "floating on", "on top of", "leaning against",
]
_OBJECTS = [
    "a bench", "the street", "a busy city street", "a wooden table", "the beach", "a grassy field",
    "a snowy mountain", "a kitchen counter", "a river", "the ocean", "a park", "a brick building",
    "a dirt road", "a frisbee", "a surfboard", "a skateboard", "an umbrella", "a clock tower", "a tennis court",
]
_TAILS = [
    "on a sunny day", "at night", "in the rain", "with trees in the background", "near a fence",
    "in front of a crowd", "next to a parked car", "under a blue sky with white clouds",
    "while people watch from the side", "with a mountain range behind it", "and a dog running beside them",
    "as the sun sets over the water", "surrounded by tall buildings and street lights",
]


def caption_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct caption-like English sentences of 5 to 30 words, deterministic for ``seed``."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        target = rng.randint(5, 30)
        words = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}".split()
        while len(words) < target:
            words += rng.choice(_TAILS).split()
        out.setdefault(" ".join(words[:target]))
    return list(out)


# -- checkpoints -----------------------------------------------------------------------------------

def tiny_checkpoint() -> Path:
    from imgq.worker.tiny_translate import write_tiny_translation_checkpoint

    return write_tiny_translation_checkpoint(WORK / "tiny-nllb")


def small_checkpoint() -> Path:
    """NLLB-600M's width with 2+2 layers and the tiny tokenizer, random weights (module docstring)."""
    out = WORK / "small-nllb"
    marker = out / "bench-small-nllb.json"
    if marker.exists():
        return out
    import os
    import shutil

    import torch
    from transformers import AutoTokenizer, GenerationConfig, M2M100Config, M2M100ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint())
    config = M2M100Config(**{**nllb_600m_config(), "vocab_size": len(tokenizer), "encoder_layers": 2,
                             "decoder_layers": 2, "tokenizer_class": "NllbTokenizer"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = M2M100ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    staging = WORK / "small-nllb.staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / marker.name).write_text(json.dumps({"params": sum(p.numel() for p in model.parameters())}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


def nllb_600m_config() -> dict[str, Any]:
    """``facebook/nllb-200-distilled-600M``'s config.json values that set its compute."""
    return {
        "vocab_size": 256206, "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
        "encoder_attention_heads": 16, "decoder_attention_heads": 16, "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096, "activation_function": "relu", "max_position_embeddings": 1024,
        "scale_embedding": True, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "decoder_start_token_id": 2, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
    }


# -- the CPU bench -----------------------------------------------------------------------------------

def _unsorted(model: Any, sentences: list[str], lang: str, micro_batch: int) -> list[str]:
    """What ``translate`` does without its sort: micro-batches in arrival order."""
    ids = model._encode(sentences)
    target = model._targets[lang]
    out: list[str] = []
    for start in range(0, len(ids), micro_batch):
        out += model._generate(ids[start : start + micro_batch], target)
    return out


def _shape(lengths: list[int], micro_batch: int) -> tuple[float, int]:
    """(source padding, decode steps allowed) of ``lengths`` cut into micro-batches in this order."""
    from imgq.worker.translate import token_budget

    slots = steps = 0
    for start in range(0, len(lengths), micro_batch):
        chunk = lengths[start : start + micro_batch]
        slots += len(chunk) * max(chunk)
        steps += token_budget(max(chunk))
    return slots / sum(lengths) - 1, steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--sentences", type=int, default=None, help="default 256 (tiny) / 64 (small)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lang", default="de")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default); 1 gives "
                    "steadier figures on a machine shared with other work, where idle OpenMP threads spin")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    from imgq.worker.translate import TranslationModel

    hf_logging.disable_progress_bar()
    n = args.sentences or (256 if args.arch == "tiny" else 64)
    ckpt = tiny_checkpoint() if args.arch == "tiny" else small_checkpoint()
    model = TranslationModel(str(ckpt), device=args.device, threads=args.threads)
    model.load()
    sentences = caption_sentences(n)
    lengths = model.count_tokens(sentences)
    paths: dict[str, Callable[[], list[str]]] = {
        **{f"sorted mb={mb}": (lambda mb=mb: model.translate(sentences, args.lang, micro_batch=mb))
           for mb in MICRO_BATCHES},
        f"unsorted mb={UNSORTED_MICRO_BATCH}": lambda: _unsorted(model, sentences, args.lang, UNSORTED_MICRO_BATCH),
    }
    model.translate(sentences[:8], args.lang, micro_batch=8)  # warm-up
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    outputs: dict[str, list[str]] = {}
    names = list(paths)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each repeat
            t, c = time.perf_counter(), time.process_time()
            outputs[name] = paths[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            print(f"repeat {r + 1} {name}: {wall[name][-1]:.2f} s", file=sys.stderr, flush=True)
    sorted_lengths = sorted(lengths, reverse=True)
    result: dict[str, Any] = {
        "command": "python -m bench.translate " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "arch": args.arch, "checkpoint_params": sum(p.numel() for p in model._model.parameters()),
        "sentences": n, "mean_source_tokens": sum(lengths) / n, "lang": args.lang, "device": args.device,
        "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "outputs_differing": sum(a != b for a, b in zip(outputs[names[1]], outputs[names[-1]], strict=True)),
        "raw_wall_s": wall,
    }
    for name in names:
        mb = int(name.rsplit("=", 1)[1])
        padding, steps = _shape(sorted_lengths if name.startswith("sorted") else lengths, mb)
        result[name] = {"sentences_s": n / median(wall[name]), "cpu_ms_per_sentence": 1000 * median(cpu[name]) / n,
                        "source_padding": padding, "decode_steps": steps}
    unsorted = f"unsorted mb={UNSORTED_MICRO_BATCH}"
    ratios = {
        "mb32/mb8": result["sorted mb=32"]["sentences_s"] / result["sorted mb=8"]["sentences_s"],
        "mb128/mb32": result["sorted mb=128"]["sentences_s"] / result["sorted mb=32"]["sentences_s"],
        "sorted/unsorted mb32": result["sorted mb=32"]["sentences_s"] / result[unsorted]["sentences_s"],
    }
    result["ratios"] = ratios
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"\n{result['command']} ({args.device}, {result['torch_threads']} torch threads; {args.arch}: "
          f"{result['checkpoint_params'] / 1e6:.1f}M params; {n} sentences, mean {result['mean_source_tokens']:.1f} "
          f"source tokens; medians of {args.repeats})\n")
    print("| path | sentences/s | CPU ms/sentence | source padding | decode steps |")
    print("|---|---|---|---|---|")
    for name in names:
        x = result[name]
        print(f"| {name} | {x['sentences_s']:.1f} | {x['cpu_ms_per_sentence']:.1f} | "
              f"{100 * x['source_padding']:.0f}% | {x['decode_steps']} |")
    print("\n" + ", ".join(f"{k}: x{v:.2f}" for k, v in ratios.items())
          + f"; sorted vs unsorted outputs differing: {result['outputs_differing']} / {n}")
    return 0


# -- the GPU bench's translate phase ------------------------------------------------------------------

def bench_gpu_translate(*, device: str, dtype: str, arch: str, batches: list[int], tokens: int, seconds: float,
                        phase: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Greedy ``generate`` of exactly ``tokens`` tokens (min = max) on NLLB-200-distilled-600M's
    architecture (``arch="base"``; ``"tiny"``: the tiny checkpoint's dims, for a CPU check), random
    weights in ``dtype``, on pre-tokenised random ids of caption length (10-30 tokens, ``eng_Latn``
    first and ``</s>`` last, right-padded), ``deu_Latn`` forced first: sentences/s per batch size.

    Needs only torch and transformers (no tokenizer, no sentencepiece); each point is a warm-up call
    then at least ``seconds`` of calls, synchronised. A failed point is recorded and the rest go on."""
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    config_values = nllb_600m_config()
    src, tgt, low, high = 256047, 256042, 4, 256000  # eng_Latn, deu_Latn, ordinary pieces
    if arch == "tiny":
        config_values.update(vocab_size=1204, d_model=64, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                             decoder_ffn_dim=128)
        src, tgt, low, high = 1000, 1001, 4, 990
    torch_dtype = getattr(torch, dtype)
    results: dict[str, Any] = {}
    label = "NLLB-600M arch" if arch != "tiny" else "tiny NLLB arch"
    try:
        t = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            with torch.device(device):
                model = M2M100ForConditionalGeneration(M2M100Config(**config_values))
        model = model.to(torch_dtype).eval()
        params = sum(p.numel() for p in model.parameters())
        log(f"translate: {label} built on {device} in {time.perf_counter() - t:.1f}s ({params / 1e6:.0f}M params, "
            f"attention {model.config._attn_implementation})")
    except Exception as exc:
        log(f"translate: model build failed: {type(exc).__name__}: {exc}")
        return {"translate": {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}}

    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        name = f"translate {label} {dtype} batch={batch} ({tokens} tokens)"
        try:
            lengths = torch.randint(10, 31, (batch,), generator=gen)
            ids = torch.full((batch, int(lengths.max())), config_values["pad_token_id"], dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, n in enumerate(lengths.tolist()):
                ids[r, 0], ids[r, n - 1] = src, config_values["eos_token_id"]
                ids[r, 1 : n - 1] = torch.randint(low, high, (n - 2,), generator=gen)
                mask[r, :n] = 1
            ids, mask = ids.to(device), mask.to(device)
            dt, runs = _timed_generate(model, device, name, seconds, phase, input_ids=ids, attention_mask=mask,
                                       num_beams=1, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                                       forced_bos_token_id=tgt)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
            results[name] = {"texts_s": runs * batch / dt, "tokens_s": runs * batch * tokens / dt,
                             "ms_per_step": 1000 * dt / runs / tokens, "batch_s": dt / runs, "runs": runs,
                             "mean_source_tokens": float(lengths.float().mean()), "peak_gib": peak}
            log(f"{name}: {runs * batch / dt:,.1f} sentences/s, {runs * batch * tokens / dt:,.0f} tokens/s "
                f"({1000 * dt / runs / tokens:.1f} ms per decode step, peak {peak:.1f} GiB)")
        except Exception as exc:  # e.g. out of memory at the largest batch: report and go on
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            log(f"{name}: FAILED {results[name]['error']}")
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def _timed_generate(model: Any, device: str, name: str, seconds: float, phase: Any, **kwargs: Any
                    ) -> tuple[float, int]:
    """(seconds, calls) of ``generate(**kwargs)`` repeated for at least ``seconds``, after a warm-up."""
    import torch

    def run() -> Any:
        with torch.inference_mode():
            return model.generate(**kwargs)

    out = run()  # warm-up (kernels, allocator)
    expected = (kwargs["input_ids"].shape[0], 1 + kwargs["max_new_tokens"])
    assert tuple(out.shape) == expected, (tuple(out.shape), expected)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with phase(name):
        if cuda:
            torch.cuda.synchronize()
        t0, runs = time.perf_counter(), 0
        while runs < 2 or time.perf_counter() - t0 < seconds:
            run()
            runs += 1
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, runs


if __name__ == "__main__":
    raise SystemExit(main())
