"""GPU bench for a lent H100/H200 (driven by bench/gpu_run.sh); runs on CPU too for validation.

Needs torch, transformers, numpy and Pillow (what the GPU image has) plus pydantic and
pydantic-settings, which bench/gpu_run.sh installs from the wheels that bench/gpu_wheels.sh fetches
here (carry ``.whl``). imgq is imported straight from the working tree (core/ -> imgq, worker/ ->
imgq.worker); nothing imports SQL, so the worker's real engine, runners and contract run unchanged.

Phases (each timed, GPU utilisation sampled by nvidia-smi in the background and averaged per phase):
1. model-only: ``CaptionModel.caption`` on pre-normalised float32 host arrays, bf16, greedy 20 tokens
   (min = max = 20) at each ``--batches``, and beam 3 at ``--beam-batches``;
2. pipeline in-process: the worker's ``Engine`` and ``CaptionRunner`` (decode thread pool -> dynamic
   batcher -> model -> writer) with the in-memory ``MemoryResults`` store, fed 16-ref "messages" of
   real 640x480 JPEG bytes, no Redis/Postgres;
3. naive: transformers ``pipeline("image-text-to-text")`` one image per call, text="";
4. embed: ``RetrievalModel.embed_images``/``embed_texts`` on the BLIP-base retrieval architecture
   (bench/gpu_embed.py). ``--phases embed`` runs it alone (no caption checkpoint is built then).
5. translate: greedy ``generate`` of 24 tokens (min = max) on NLLB-200-distilled-600M's architecture
   (d_model 1024, 12+12 layers, 16 heads, FFN 4096, vocab 256,206), random weights, bf16, on
   pre-tokenised random ids of caption length (10-30 tokens), ``deu_Latn`` forced: sentences/s at
   ``--translate-batches`` (bench/translate.py; no tokenizer, so no sentencepiece needed).
   ``--phases translate`` runs it alone (< 60 s).
6. photos: 12 MP phone JPEGs (bench/photos.py, generated here in parallel): the worker's Pillow path
   with draft decoding on and off on ``--threads`` CPU threads against nvJPEG
   (``torchvision.io.decode_jpeg(list, device="cuda")``, EXIF applied) + GPU resize; images/s, process
   CPU-ms per image, and CPU cores per GPU at 2,000 images/s. The nvJPEG half skips itself, with the
   reason printed, without torchvision or CUDA. ``--phases photos`` runs it alone (~30-45 s).

    python3 -m bench.gpu_bench --device cuda --arch base --out $OUT
    .venv/bin/python -m bench.gpu_bench --device cpu --arch tiny --batches 8 16 --beam-batches 8 \
        --pipeline-images 64 --naive-images 8 --out .imgq/bench/gpu-cpu-check
    .venv/bin/python -m bench.gpu_bench --device cpu --arch tiny --phases embed --embed-batches 8 16 \
        --text-batch 64 --embed-seconds 0.5 --out .imgq/bench/gpu-cpu-check
    .venv/bin/python -m bench.gpu_bench --device cpu --arch tiny --phases translate --translate-batches 8 32 \
        --translate-seconds 0.5 --out .imgq/bench/gpu-cpu-check
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CAPTION_PHASES = ["model", "beam", "profile", "pipeline", "decode", "naive"]
# photos last: if the run's hard cap hits, only it is lost
ALL_PHASES = [*CAPTION_PHASES, "embed", "translate", "photos"]
TOKENS = 20
# docs/performance.md's roofline: ~133 GFLOP per BLIP-base caption of 20 greedy tokens; H100 SXM and
# H200 dense bf16 peak ~989 TFLOP/s.
CAPTION_FLOP = 133e9
BF16_PEAK_FLOPS = 989e12
PHASES: list[tuple[str, float, float]] = []  # (name, wall start, wall end) in time.time()


def log(msg: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- importing imgq without its producer-side dependencies --------------------------------------------

def _package(name: str, folder: Path) -> None:
    mod = types.ModuleType(name)
    mod.__path__ = [str(folder)]  # type: ignore[attr-defined]
    mod.__file__ = str(folder / "__init__.py")
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)


def import_imgq() -> dict[str, bool]:
    """imgq straight from the working tree. The engine's contract needs pydantic: on the GPU image,
    which lacks it, bench/gpu_run.sh installs the wheels that bench/gpu_wheels.sh fetched."""
    def present(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    if not present("imgq"):
        _package("imgq", REPO / "core")
        _package("imgq.worker", REPO / "worker")
        _package("imgq.db", REPO / "db")
    have = {name: present(name) for name in ("pydantic", "pydantic_settings", "sqlalchemy")}
    if not (have["pydantic"] and have["pydantic_settings"]):
        log("pydantic / pydantic-settings missing: only the model-only and embed phases can run "
            "(run bench/gpu_wheels.sh here and carry .whl)")
    return have


# -- inputs -------------------------------------------------------------------------------------------

def jpeg_images(n: int) -> list[bytes]:
    """Deterministic structured 640x480 JPEGs, the same generator as bench.common.image_bytes."""
    sys.path.insert(0, str(REPO))
    from bench.common import image_bytes

    distinct = [image_bytes(i) for i in range(min(n, 256))]
    return [distinct[i % len(distinct)] for i in range(n)]


def checkpoint(arch: str, workdir: Path) -> Path:
    sys.path.insert(0, str(REPO))
    import bench.common as common

    common.WORK = workdir  # write the checkpoints under the run's own folder
    return common.checkpoint(arch)


class Phase:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Phase:
        self.t0 = time.time()
        return self

    def __exit__(self, *exc: Any) -> None:
        PHASES.append((self.name, self.t0, time.time()))


# -- GPU sampling -------------------------------------------------------------------------------------

def start_smi(out: Path) -> subprocess.Popen[bytes] | None:
    try:
        fh = open(out / "smi.csv", "wb")  # noqa: SIM115
        return subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used,power.draw,clocks.sm",
             "--format=csv,noheader,nounits", "-lms", "200"], stdout=fh, stderr=subprocess.DEVNULL)
    except (FileNotFoundError, OSError):
        return None


def smi_by_phase(path: Path) -> dict[str, dict[str, float]]:
    from datetime import datetime

    rows = []
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            ts = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((ts, float(parts[1]), float(parts[2]), float(parts[3])))
        except (ValueError, IndexError):
            continue
    out = {}
    for name, t0, t1 in PHASES:
        inside = [r for r in rows if t0 <= r[0] <= t1]
        if inside:
            out[name] = {"gpu_util_pct": sum(r[1] for r in inside) / len(inside),
                         "mem_used_mib_max": max(r[2] for r in inside),
                         "power_w_mean": sum(r[3] for r in inside) / len(inside), "samples": len(inside)}
    return out


# -- phases -------------------------------------------------------------------------------------------

def bench_model(models: dict[str, Any], params_cls: Any, batches: list[int], beams: int,
                seconds: float, flop: float | None = None) -> dict[str, Any]:
    """Model-only images/s of each attention variant in ``models``, side by side: at each batch
    size every variant runs in turn, so a drifting clock or a neighbour hits them alike."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    params = params_cls(max_new_tokens=TOKENS, min_new_tokens=TOKENS, num_beams=beams)
    results = {}
    for batch in batches:
        x = rng.standard_normal((batch, 3, 384, 384), dtype=np.float32)
        for attention, model in models.items():
            name = f"model-only {attention} beams={beams} batch={batch}"
            try:
                model.caption(x, params)  # warm-up (allocator, kernels)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                with Phase(name):
                    t0 = time.perf_counter()
                    runs = 0
                    while runs < 2 or time.perf_counter() - t0 < seconds:
                        model.caption(x, params)
                        runs += 1
                    dt = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
                results[name] = {"img_s": runs * batch / dt, "batch_s": dt / runs, "runs": runs, "peak_gib": peak}
                # Greedy only: the FLOP count is the roofline's, for BLIP-base at 20 greedy tokens.
                share = runs * batch / dt * flop / BF16_PEAK_FLOPS if flop and beams == 1 else None
                results[name]["bf16_peak_fraction"] = share
                log(f"{name}: {runs * batch / dt:,.1f} img/s ({dt / runs * 1000:.0f} ms/batch, peak {peak:.1f} GiB"
                    + (f", {share:.1%} of bf16 peak)" if share is not None else ")"))
            except Exception as exc:  # e.g. out of memory at the largest batch: report and go on
                results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                log(f"{name}: FAILED {results[name]['error']}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return results


def bench_profile(model: Any, variant: str, params_cls: Any, batch: int, out: Path) -> dict[str, Any]:
    """Where one greedy caption batch's time goes (issue 17: measure before speeding the decode
    loop up): the vision encoder alone, then one whole ``caption`` under torch.profiler. Reports the
    decode's milliseconds per step, kernel launches per step, and the share of the wall time that a
    kernel was running (low: the loop is bound by launches and Python, which CUDA graphs remove;
    high: by the kernels themselves). The top ops table goes to ``out/profile-<variant>.txt``."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and str(getattr(model, "device", "")).startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    name = f"profile {variant} greedy batch={batch}"
    x = np.random.default_rng(1).standard_normal((batch, 3, 384, 384), dtype=np.float32)
    params = params_cls(max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    try:
        model.caption(x, params)  # warm-up
        pixels = model.model_input(x)

        def timed(call: Any) -> float:
            """Median of 3 timings: one shot on a busy host can put the vision encoder above the whole."""
            times = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                call()
                sync()
                times.append(time.perf_counter() - t0)
            return sorted(times)[1]

        with torch.inference_mode():
            model._model.vision_model(pixel_values=pixels)
            vision_s = timed(lambda: model._model.vision_model(pixel_values=pixels))
        whole_s = timed(lambda: model.caption(x, params))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            model.caption(x, params)
            sync()
        events = prof.key_averages()
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        (out / f"profile-{variant.replace('+', '-')}.txt").write_text(f"{name}, {model.dtype}\n"
                                                                      + events.table(sort_by=sort, row_limit=30))
        result: dict[str, Any] = {"wall_ms": whole_s * 1000, "vision_ms": vision_s * 1000,
                                  "decode_ms_per_step": (whole_s - vision_s) * 1000 / TOKENS}
        if cuda:
            # FunctionEvents in microseconds; a kernel's is its device time (one stream: no overlap).
            every = list(prof.events())
            kernels = [e for e in every if e.device_type == torch.autograd.DeviceType.CUDA]
            busy_us = sum(e.time_range.elapsed_us() for e in kernels)
            span_us = max(e.time_range.end for e in every) - min(e.time_range.start for e in every)
            result.update(kernels=len(kernels), kernels_per_step=len(kernels) / TOKENS,
                          kernel_busy_share=busy_us / span_us if span_us > 0 else None)
        log(f"{name}: {result['wall_ms']:.0f} ms = vision {result['vision_ms']:.0f} ms + "
            f"{result['decode_ms_per_step']:.2f} ms x {TOKENS} steps"
            + (f"; {result['kernels_per_step']:.0f} kernels per step, kernels running "
               f"{result['kernel_busy_share']:.0%} of the time" if cuda else ""))
        return {name: result}
    except Exception as exc:  # the profile is a diagnosis: it must not cost the phases after it
        log(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
        return {name: {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}}


def attention_agreement(models: dict[str, Any], params_cls: Any, blobs: list[bytes], n: int = 64) -> dict[str, Any]:
    """Each variant against eager on ``n`` images of the bench corpus, in the run's dtype: the
    largest logit difference (relative to eager's largest logit) on a 6-token teacher-forced
    forward, and how many greedy captions differ."""
    import numpy as np
    import torch

    from imgq.worker.decode import decode
    from imgq.worker.runners import CaptionRunner

    if "eager" not in models or len(models) < 2:
        return {}
    eager = models["eager"]
    runner = CaptionRunner(eager)
    pixels = np.stack([runner.prepare(decode(b, max_pixels=40_000_000, target=runner.input_size).image,
                                      params_cls()) for b in blobs[:n]])
    params = params_cls(max_new_tokens=TOKENS)

    def logits(model: Any) -> Any:
        ids = torch.full((len(pixels), 6), model._model.config.text_config.bos_token_id, device=model.device)
        with torch.inference_mode():
            return model._model(pixel_values=model.model_input(pixels), input_ids=ids).logits.float()

    base_logits, base_captions = logits(eager), eager.caption(pixels, params)
    results = {}
    for attention, model in models.items():
        if attention == "eager":
            continue
        rel = float((logits(model) - base_logits).abs().max() / base_logits.abs().max())
        differ = sum(a != b for a, b in zip(model.caption(pixels, params), base_captions, strict=True))
        results[f"agreement {attention} vs eager"] = {"images": len(pixels), "max_rel_logit_diff": rel,
                                                      "captions_differ": differ}
        log(f"{attention} vs eager ({len(pixels)} corpus images): max logit diff {rel:.2e} of scale, "
            f"{differ} of {len(pixels)} greedy captions differ")
    return results


def bench_engine(model: Any, blobs: list[bytes], max_batch: int, threads: int,
                 max_wait_ms: int, per_message: int = 16) -> dict[str, Any]:
    """The worker's real Engine and CaptionRunner, with an in-memory store (no Redis/Postgres)."""
    from concurrent.futures import ThreadPoolExecutor

    from imgq.contract import CaptionParams, make_task
    from imgq.ports import Blob
    from imgq.worker.decode import decode
    from imgq.worker.engine import Engine
    from imgq.worker.fakes import MemoryResults
    from imgq.worker.runners import CaptionRunner

    runner = CaptionRunner(model)

    def decode_once(data: bytes) -> Any:  # as WorkerRuntime.start wires it
        return decode(data, max_pixels=40_000_000, target=runner.input_size)

    def fetch(ref: str) -> Blob:
        data = blobs[int(ref)]
        return Blob(data, "local", "", ref, hashlib.sha256(data).hexdigest()[:32])

    # decode+preprocess alone, same thread count: the CPU side's ceiling on this machine
    with ThreadPoolExecutor(threads) as pool:
        sample = blobs[: min(len(blobs), 1024)]
        t = time.perf_counter()
        list(pool.map(lambda b: runner.prepare(decode_once(b).image, CaptionParams()), sample))
        prep_img_s = len(sample) / (time.perf_counter() - t)
    log(f"decode+preprocess alone, {threads} threads: {prep_img_s:,.0f} img/s")

    tasks = [make_task("caption", runner.name, CaptionParams(max_new_tokens=TOKENS, min_new_tokens=TOKENS))]
    store = MemoryResults()
    engine = Engine(store=store, runners={"caption": runner}, fetch=fetch, decode=decode_once,
                    worker_name="gpu-bench", max_batch=max_batch, max_wait_s=max_wait_ms / 1000,
                    decode_threads=threads).start()
    try:
        job = uuid.uuid4()
        warm = engine.submit(job, tasks, [(i, str(i)) for i in range(min(max_batch, len(blobs)))])
        [w.future.result() for w in warm]
        engine.stats.update(batches=0, items=0)
        n = len(blobs)
        name = f"pipeline in-process batch<={max_batch} threads={threads}"
        with Phase(name):
            t0 = time.perf_counter()
            # Celery task threads would each submit one message: submit per 16 refs, as they do.
            work = []
            job = uuid.uuid4()
            for start in range(0, n, per_message):
                work += engine.submit(job, tasks, [(i, str(i)) for i in range(start, min(n, start + per_message))])
            outcomes = [w.future.result() for w in work]
            dt = time.perf_counter() - t0
        done = sum(o.state == "done" for o in outcomes)
        stats = dict(engine.stats)
    finally:
        engine.stop()
    mean_batch = stats["items"] / max(1, stats["batches"])
    log(f"{name}: {done / dt:,.1f} img/s ({done}/{n} done, mean batch {mean_batch:.0f})")
    result: dict[str, Any] = {"img_s": done / dt, "done": done, "images": n, "mean_batch": mean_batch,
                              "prep_only_img_s": prep_img_s}
    if done < n:  # a rate of the items that failed fast is no figure: say why they failed
        failed = next(o for o in outcomes if o.state != "done")
        result["error"] = f"{n - done} of {n} items not done; first: {failed.state} {failed}"[:300]
        log(f"{name}: FAILED {result['error']}")
    return {name: result}


def bench_gpu_decode(model: Any, blobs: list[bytes], device: str, batch: int = 64) -> dict[str, Any]:
    """nvJPEG decode (``torchvision.io.decode_jpeg`` on the GPU) + bicubic antialiased resize to the
    model's input, against the CPU path's output: is it worth moving decode off the CPU?

    Guarded: torchvision is optional (absent here, so this never ran on the 2-core CPU machine),
    and a failure is recorded instead of ending the run."""
    name = f"nvJPEG decode + GPU resize, batches of {batch}"
    try:
        import numpy as np
        import torch
        import torch.nn.functional as F
        from torchvision.io import decode_jpeg
    except ImportError as exc:
        log(f"{name}: skipped ({exc})")
        return {}
    if not device.startswith("cuda"):
        log(f"{name}: skipped (device {device})")
        return {}
    try:
        from imgq.worker.decode import decode
        from imgq.worker.preprocess import Preprocessor

        pre = Preprocessor.from_image_processor(model.image_processor)
        sample = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs[:1024]]

        def run(chunk: list[Any]) -> Any:
            images = torch.stack(decode_jpeg(chunk, device=device))  # all 640x480 here
            return F.interpolate(images.float(), size=(pre.size, pre.size), mode="bicubic",
                                 antialias=True, align_corners=False).round_().clamp_(0, 255).to(torch.uint8)

        run(sample[:batch])
        torch.cuda.synchronize()
        with Phase(name):
            t0 = time.perf_counter()
            for start in range(0, len(sample), batch):
                out = run(sample[start : start + batch])
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        gpu = run(sample[:16]).cpu().numpy().astype(int)
        cpu = np.stack([pre.pixels(decode(b, max_pixels=40_000_000).image) for b in blobs[:16]]).astype(int)
        diff = np.abs(gpu - cpu)
        result = {"img_s": len(sample) / dt, "images": len(sample), "batch": batch,
                  "vs_cpu_path_max_abs_levels": int(diff.max()), "vs_cpu_path_mean_abs_levels": float(diff.mean())}
        del out
        log(f"{name}: {result['img_s']:,.0f} img/s; vs Pillow path: max |diff| {diff.max()} levels, "
            f"mean {diff.mean():.2f}")
        return {name: result}
    except Exception as exc:  # an optional measurement must not cost the rest of the run
        log(f"{name}: failed: {type(exc).__name__}: {exc}")
        return {name: {"error": f"{type(exc).__name__}: {exc}"}}


# -- 12 MP photos: nvJPEG on the GPU against Pillow on CPU threads ----------------------------------

def photo_blobs(n: int, distinct: int, workers: int) -> list[bytes]:
    """``n`` 12 MP JPEGs (bench.photos' photos12mp corpus: a quarter each EXIF 6 and 8), ``distinct``
    of them generated in parallel here (about 2.5 CPU-s each), repeated."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    sys.path.insert(0, str(REPO))
    from bench.photos import item, render

    items = [item("photos12mp", i) for i in range(distinct)]
    # spawn, not fork: by now this process has CUDA and torch's thread pools up.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, min(workers, distinct)), mp_context=spawn) as pool:
        unique = list(pool.map(render, items))
    return [unique[i % distinct] for i in range(n)]


def pillow_rate(blobs: list[bytes], prepare: Any, threads: int, draft: bool) -> dict[str, float]:
    """The worker's CPU path on ``threads`` threads: images/s and process CPU-ms per image."""
    from concurrent.futures import ThreadPoolExecutor

    from imgq.worker.decode import decode, draft_target

    target = draft_target([prepare.size], draft)

    def one(data: bytes) -> Any:
        return prepare.pixels(decode(data, max_pixels=40_000_000, target=target).image, "stretch")

    with ThreadPoolExecutor(threads) as pool:
        c, t = time.process_time(), time.perf_counter()
        list(pool.map(one, blobs))
        dt, cpu = time.perf_counter() - t, time.process_time() - c
    return {"img_s": len(blobs) / dt, "cpu_ms_per_img": cpu * 1000 / len(blobs)}


def exif_orientation(blob: bytes) -> int:
    """The EXIF Orientation tag of an image file (1 when absent or not 1-8). Pillow reads it from the
    header without decoding pixels, so it is the only CPU work of the nvJPEG path besides the call."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            value = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):
        return 1
    return value if value in range(1, 9) else 1


def orient(image: Any, orientation: int) -> Any:
    """A (C, H, W) tensor made upright for an EXIF ``orientation``, the transform Pillow's
    ``ImageOps.exif_transpose`` applies (tests/unit/test_gpu_photo_path.py compares all eight)."""
    if orientation == 2:
        return image.flip((-1,))
    if orientation == 3:
        return image.flip((-2, -1))
    if orientation == 4:
        return image.flip((-2,))
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


def gpu_decode_resize(chunk: list[Any], orientations: list[int], size: int, device: str, decode_jpeg: Any) -> Any:
    """nvJPEG decode of a list of JPEG byte tensors, made upright per their EXIF ``orientations``
    on the device, then the bicubic antialiased resize to ``size`` there; uint8 (B, 3, size, size)
    in input order. ``decode_jpeg``'s own ``apply_exif_orientation`` is CPU-only: on CUDA it is
    ignored without an error (torchvision's docs; GPU run 4 compared rotated photos unrotated).
    Images are grouped by shape for the resize: a 12 MP batch holds landscape and portrait frames."""
    import torch
    import torch.nn.functional as F

    decoded = decode_jpeg(chunk, device=device, mode=_rgb_mode())
    images = [orient(im, o) for im, o in zip(decoded, orientations, strict=True)]
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        batch = torch.stack([images[i] for i in idx]).float()
        resized = F.interpolate(batch, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[idx] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _rgb_mode() -> Any:
    try:
        from torchvision.io import ImageReadMode
    except ImportError:  # a CPU check's stand-in decoder: torchvision also takes the plain string
        return "RGB"
    return ImageReadMode.RGB


def _image_processor(ckpt: Path) -> Any:
    from transformers import BlipProcessor

    return BlipProcessor.from_pretrained(str(ckpt)).image_processor


def bench_photos(image_processor: Any, device: str, threads: int, n: int = 256, distinct: int = 32, batch: int = 32,
                 repeats: int = 2, decode_jpeg: Any = None) -> dict[str, Any]:
    """12 MP phone photos: the worker's Pillow path (draft decoding on, and off) on ``threads`` CPU
    threads against nvJPEG decode + GPU resize; images/s, process CPU-ms per image, and the CPU
    cores one GPU needs to be fed 2,000 images/s by each. Repeats alternate the paths.

    nvJPEG needs torchvision and a CUDA device: without either that half is skipped with the reason
    printed, and the Pillow half still runs. ``decode_jpeg`` lets a CPU check pass a stand-in."""
    import numpy as np

    from imgq.worker.decode import decode
    from imgq.worker.preprocess import Preprocessor

    name = "12 MP photos"
    target_rate = 2000.0
    try:
        pre = Preprocessor.from_image_processor(image_processor)
        t = time.perf_counter()
        blobs = photo_blobs(n, distinct, threads)
        log(f"{name}: generated {distinct} distinct 12 MP JPEGs in {time.perf_counter() - t:.1f}s "
            f"(mean {sum(map(len, blobs[:distinct])) / distinct / 1e6:.2f} MB)")
        gpu_reason = None
        if decode_jpeg is None:
            try:
                from torchvision.io import decode_jpeg
            except ImportError as exc:
                gpu_reason = f"torchvision missing ({exc})"
        if gpu_reason is None and decode_jpeg is not None and not (device.startswith("cuda") or _stand_in(decode_jpeg)):
            gpu_reason = f"device {device} is not CUDA"
        if gpu_reason:
            log(f"{name}: nvJPEG half skipped: {gpu_reason}")
        import torch

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

        def gpu_pass() -> dict[str, float]:
            c, t0 = time.process_time(), time.perf_counter()
            for start in range(0, len(tensors), batch):
                # The orientation is read per image inside the timed loop: it is part of this path's CPU.
                orientations = [exif_orientation(b) for b in blobs[start : start + batch]]
                out = gpu_decode_resize(tensors[start : start + batch], orientations, pre.size, device, decode_jpeg)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c
            del out
            return {"img_s": len(tensors) / dt, "cpu_ms_per_img": cpu * 1000 / len(tensors)}

        # Full-size decodes of 12 MP pass imgq.worker.decode's bound of 2 large decodes at once, so
        # they are slow in wall time: a quarter of the images is enough for their CPU cost.
        paths: dict[str, Any] = {"pillow draft": lambda: pillow_rate(blobs, pre, threads, True),
                                 "pillow full": lambda: pillow_rate(blobs[: max(1, n // 4)], pre, threads, False)}
        if not gpu_reason:
            gpu_pass()  # warm-up: nvJPEG handles, kernels, allocator
            paths["nvjpeg"] = gpu_pass
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
        with Phase(name):
            for _ in range(repeats):
                for key, run in paths.items():
                    runs[key].append(run())
        result: dict[str, Any] = {"images": n, "distinct": distinct, "threads": threads, "batch": batch,
                                  "gpu_skipped": gpu_reason}
        for key, values in runs.items():
            # Medians of the repeats, each quantity on its own (with 2 repeats: the mean of the two).
            img_s = statistics.median(v["img_s"] for v in values)
            cpu_ms = statistics.median(v["cpu_ms_per_img"] for v in values)
            result[key] = {"img_s": img_s, "cpu_ms_per_img": cpu_ms,
                           "cores_per_gpu_at_2000": target_rate * cpu_ms / 1000, "raw": values}
            log(f"{name}, {key}: {img_s:,.0f} img/s, {cpu_ms:.1f} CPU-ms/img -> "
                f"{target_rate * cpu_ms / 1000:.1f} cores per GPU at {target_rate:,.0f} img/s")
        if not gpu_reason:
            # The first 8 photos: orientations 6, 1, 8, 1, ... (bench/photos.py), both rotations.
            picked = list(range(min(n, 8)))
            gpu = gpu_decode_resize([tensors[i] for i in picked], [exif_orientation(blobs[i]) for i in picked],
                                    pre.size, device, decode_jpeg)
            gpu = gpu.cpu().numpy().astype(int)
            result["compared_images"] = len(picked)
            for key, target in (("vs_pillow_draft", pre.size), ("vs_pillow_full", None)):
                cpu_px = np.stack([pre.pixels(decode(blobs[i], max_pixels=40_000_000, target=target).image)
                                   for i in picked]).astype(int)
                diff = np.abs(gpu - cpu_px)
                result[key] = {"max_abs_levels": int(diff.max()), "mean_abs_levels": float(diff.mean())}
                log(f"{name}: nvJPEG + GPU resize {key}: max |diff| {diff.max()} levels, mean {diff.mean():.2f}")
        # One summary row per path (the summary prints entries with an img_s), then the details.
        labels = {"pillow draft": f"Pillow, draft on, {threads} threads", "pillow full": f"Pillow, full decode, "
                  f"{threads} threads", "nvjpeg": f"nvJPEG + GPU resize, batches of {batch}"}
        rows = {f"{name}: {labels[k]}": {"img_s": result[k]["img_s"], "cpu_ms_per_img": result[k]["cpu_ms_per_img"],
                                          "cores_per_gpu_at_2000": result[k]["cores_per_gpu_at_2000"]} for k in runs}
        return {**rows, name: result}
    except Exception as exc:  # an optional measurement must not cost the rest of the run
        log(f"{name}: failed: {type(exc).__name__}: {exc}")
        return {name: {"error": f"{type(exc).__name__}: {exc}"}}


def _stand_in(decode_jpeg: Any) -> bool:
    return bool(getattr(decode_jpeg, "stand_in", False))


def bench_naive(ckpt: Path, device: str, dtype: Any, blobs: list[bytes]) -> dict[str, Any]:
    import io

    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(ckpt), device=device, dtype=dtype)
    kw = {"max_new_tokens": TOKENS, "min_new_tokens": TOKENS}
    pipe(images=Image.open(io.BytesIO(blobs[0])).convert("RGB"), text="", generate_kwargs=kw)
    name = "naive pipeline (1 image/call)"
    with Phase(name):
        t0 = time.perf_counter()
        for data in blobs:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            pipe(images=image, text="", generate_kwargs=kw)
        dt = time.perf_counter() - t0
    log(f"{name}: {len(blobs) / dt:,.1f} img/s")
    return {name: {"img_s": len(blobs) / dt, "images": len(blobs)}}


def run_caption_phases(args: Any, phases: list[str], results: dict[str, Any], dtype: str, caption_model: Any,
                       params_cls: Any) -> None:
    import torch

    ckpt = checkpoint(args.arch, REPO / ".imgq" / "bench" / "gpu-ckpt")
    # Each variant is its own instance (the patches are per instance); the first one, the production
    # default sdpa+static unless --attentions says otherwise, runs the pipeline phase.
    models = {}
    for variant in args.attentions:
        attention, _, loop = variant.partition("+")
        models[variant] = caption_model(str(ckpt), device=args.device, dtype=dtype, attention=attention,
                                        decode_loop=loop or "generate")
        models[variant].load()
    model = models[args.attentions[0]]
    blobs = jpeg_images(max(args.pipeline_images, 1024))  # 256 distinct, repeated: cheap
    if "model" in phases:
        results.update(attention_agreement(models, params_cls, blobs))
        flop = CAPTION_FLOP if args.arch == "base" else None
        results.update(bench_model(models, params_cls, args.batches, 1, args.seconds, flop))
    if "beam" in phases:  # the static loop is greedy only: under beams it would time generate again
        beam_models = {k: m for k, m in models.items() if "+" not in k}
        results.update(bench_model(beam_models, params_cls, args.beam_batches, 3, args.seconds))
    if "profile" in phases:
        for variant in (v for v in args.attentions if v != "eager"):
            results.update(bench_profile(models[variant], variant, params_cls, args.profile_batch, args.out))
    for attention in args.attentions[1:]:
        del models[attention]
    if "pipeline" in phases:
        results.update(bench_engine(model, blobs[: args.pipeline_images], args.pipeline_batch,
                                    args.threads, args.max_wait_ms))
    if "decode" in phases:
        results.update(bench_gpu_decode(model, blobs, args.device))
    if "naive" in phases:
        del model, models
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.update(bench_naive(ckpt, args.device, getattr(torch, dtype), jpeg_images(args.naive_images)))


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", choices=["tiny", "base"], default="base")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--beam-batches", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--seconds", type=float, default=4.0, help="minimum timed seconds per model-only point")
    ap.add_argument("--attentions", nargs="+", choices=["sdpa", "eager", "sdpa+static", "sdpa+graphs"],
                    default=["sdpa+static", "sdpa", "eager", "sdpa+graphs"],
                    help="caption variants, side by side in the model phase (+static: IMGQ_DECODE_LOOP=static, "
                         "+graphs: the same with each step a CUDA graph; greedy only, so the beam phase leaves "
                         "them out); the first, the production default (IMGQ_ATTENTION=sdpa, "
                         "IMGQ_DECODE_LOOP=static), runs the pipeline; all but eager are profiled")
    ap.add_argument("--profile-batch", type=int, default=256, help="the profile phase's greedy batch")
    ap.add_argument("--pipeline-images", type=int, default=8192)
    ap.add_argument("--pipeline-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--max-wait-ms", type=int, default=50)
    ap.add_argument("--naive-images", type=int, default=128)
    ap.add_argument("--photo-images", type=int, default=256, help="12 MP JPEGs per pass (distinct ones repeated)")
    ap.add_argument("--photo-distinct", type=int, default=32, help="distinct 12 MP JPEGs generated on the box")
    ap.add_argument("--skip", nargs="*", default=[], choices=ALL_PHASES)
    ap.add_argument("--phases", nargs="+", default=ALL_PHASES, choices=ALL_PHASES,
                    help="phases to run (default: all); --skip still removes some")
    ap.add_argument("--embed-batches", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--embed-seconds", type=float, default=2.5, help="minimum timed seconds per embed point")
    ap.add_argument("--text-batch", type=int, default=1024)
    ap.add_argument("--embed-budget", type=float, default=80.0, help="embed points starting later are skipped")
    ap.add_argument("--translate-batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--translate-tokens", type=int, default=24, help="tokens generated per sentence (min = max)")
    ap.add_argument("--translate-seconds", type=float, default=5.0, help="minimum timed seconds per translate point")
    ap.add_argument("--out", type=Path, default=REPO / ".imgq" / "bench" / "gpu-out")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    have = import_imgq()
    import torch
    import transformers

    from imgq.contract import CaptionParams
    from imgq.worker.model import CaptionModel

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "dtype": dtype,
            "arch": args.arch, "cpus": os.cpu_count(), "have": have, "tokens": TOKENS,
            "command": " ".join(sys.argv)}
    log(json.dumps(info))
    smi = start_smi(args.out) if args.device.startswith("cuda") else None
    results: dict[str, Any] = {"info": info}
    t_start = time.perf_counter()
    try:
        phases = [p for p in args.phases if p not in args.skip]
        caption_error: Exception | None = None
        if set(phases) & set(CAPTION_PHASES):
            try:
                run_caption_phases(args, phases, results, dtype, CaptionModel, CaptionParams)
            except Exception as exc:  # the embed phase still runs; the run fails at the end as before
                caption_error = exc
                results["caption phases"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                log(f"caption phases FAILED: {results['caption phases']['error']}")
        if "embed" in phases:
            from bench.gpu_embed import bench_embed

            results.update(bench_embed(device=args.device, dtype=dtype, arch=args.arch,
                                       workdir=REPO / ".imgq" / "bench" / "gpu-ckpt", batches=args.embed_batches,
                                       seconds=args.embed_seconds, text_batch=args.text_batch,
                                       budget_s=args.embed_budget, phase=Phase, log=log))
        if "translate" in phases:
            from bench.translate import bench_gpu_translate

            results.update(bench_gpu_translate(device=args.device, dtype=dtype, arch=args.arch,
                                               batches=args.translate_batches, tokens=args.translate_tokens,
                                               seconds=args.translate_seconds, phase=Phase, log=log))
        if "photos" in phases:
            # The tiny checkpoint carries the same image processor files as the base one (bench.common):
            # no 224M-parameter model is built just to read the input size, mean and std.
            processor = _image_processor(checkpoint("tiny", REPO / ".imgq" / "bench" / "gpu-ckpt"))
            results.update(bench_photos(processor, args.device, args.threads, args.photo_images,
                                        args.photo_distinct))
        if caption_error is not None:
            raise caption_error
    finally:
        if smi is not None:
            time.sleep(0.5)
            smi.terminate()
            smi.wait(5)
        results["gpu_by_phase"] = smi_by_phase(args.out / "smi.csv")
        results["total_s"] = time.perf_counter() - t_start
        (args.out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n# summary (images/s; GPU util % = nvidia-smi mean over the phase)")
    for name, value in results.items():
        rate = value.get("img_s", value.get("texts_s")) if isinstance(value, dict) else None
        if rate is not None:
            util = results["gpu_by_phase"].get(name, {}).get("gpu_util_pct")
            print(f"{name:60s} {rate:10,.1f}" + (f"   GPU {util:5.1f}%" if util is not None else ""))
    print(f"total {results['total_s']:.0f}s; json: {args.out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
