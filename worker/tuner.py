"""Time the loaded model and one decode at start-up; :mod:`imgq.tuning` decides from the timings.

Runs once, after the models load and before the first message is taken, on synthetic inputs only
(noise pixels, and one generated JPEG for the decode): nothing is read from a bucket or folder.
"""

from __future__ import annotations

import io
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from imgq import tuning
from imgq.config import Settings, usable_cpus
from imgq.tuning import Choice, Timing

log = logging.getLogger(__name__)

DEFAULT_BATCH = 32  # IMGQ_AUTOTUNE off and IMGQ_MAX_BATCH left at 0: what every release before it used
# Batches timed on a GPU: its per-image cost only shows once the batch fills the device. On a CPU
# the sizes follow from a one-image call (imgq.tuning.cpu_probes).
GPU_PROBES = (64, 512)


def resolve(settings: Settings, runner: Any, decode: Callable[[bytes], Any]) -> Choice:
    """The batch and torch threads this worker runs with; the timings and the choice are logged."""
    batch, threads = settings.max_batch, settings.torch_threads
    if batch and (threads or _gpu(runner)):
        return Choice(batch, threads, ("set by the operator",))
    if not settings.autotune:
        return Choice(batch or DEFAULT_BATCH, threads, ("IMGQ_AUTOTUNE is off",))
    if not hasattr(runner, "kind_params"):  # a runner injected by a test or an embedding program
        return Choice(batch or DEFAULT_BATCH, threads, ("no model to time",))
    started = time.perf_counter()
    try:
        in_flight = settings.messages_in_flight * settings.refs_per_message
        choice = _measure(runner, decode, batch, threads, in_flight)
    except Exception as exc:  # a probe must never keep a worker from serving
        if _is_oom(exc):
            _free_gpu()
        log.warning("autotune failed (%s: %s); using batch %d", type(exc).__name__, exc, batch or DEFAULT_BATCH,
                    extra={"action": "autotune_failed"})
        return Choice(batch or DEFAULT_BATCH, threads, (f"autotune failed: {type(exc).__name__}",))
    took = time.perf_counter() - started
    log.info("autotune: %s (took %.1f s)", choice.describe(), took,
             extra={"action": "autotune", "max_batch": choice.max_batch, "torch_threads": choice.torch_threads})
    return choice


def _measure(runner: Any, decode: Callable[[bytes], Any], batch: int, threads: int, in_flight: int) -> Choice:
    import torch

    gpu = _gpu(runner)
    probe = _Probe(runner, max(GPU_PROBES) if gpu else tuning.CPU_PROBE_MAX)
    reasons: list[str] = []
    sizes: tuple[int, int] | None = GPU_PROBES
    if gpu:
        probe.once(2)  # warm-up: first-call allocations, lazy inits
    else:
        own = torch.get_num_threads()
        if not threads:
            # One thread: the model's own CPU work, and no OpenMP threads spinning against other
            # load on the machine, which can make a small model look seconds slow per image.
            torch.set_num_threads(1)
        probe.once(1)  # warm-up: the first call pays lazy inits
        one = min(probe.once(1), probe.once(1))
        sizes = tuning.cpu_probes(one)
        if sizes is None:
            # BLIP-base on a CPU: seconds per image, against milliseconds of per-call overhead.
            torch.set_num_threads(threads or own)
            reasons.append(f"model-bound: {one:.2f} s for one image at {threads or 1} thread(s); "
                           f"every core to the model")
            return Choice(batch or tuning.MIN_BATCH, threads, tuple(reasons))
    small, large = (probe.time(b) for b in sizes)
    fixed, per_image = tuning.fit(small, large)
    if batch:
        reasons.append("batch set by the operator")
    else:
        budget = tuning.budget_for(tuning.GPU if gpu else tuning.CPU, in_flight)
        batch, why = tuning.batch_for(fixed, per_image, budget)
        reasons.append(why)
    if not gpu and not threads:
        model_s = fixed / batch + per_image
        threads, why = tuning.threads_for(usable_cpus(), model_s, _decode_seconds(runner, decode))
        torch.set_num_threads(threads)
        reasons.append(why)
    return Choice(batch, threads, tuple(reasons))


class _Probe:
    def __init__(self, runner: Any, largest: int) -> None:
        size = runner.input_size
        rng = np.random.default_rng(0)
        self.runner = runner
        self.pixels = rng.integers(0, 256, size=(largest, 3, size, size), dtype=np.uint8)
        self.params = runner.kind_params()
        self.texts = ["a photo of a dog on a beach"] * largest if runner.kind == "validate" else None

    def once(self, batch: int) -> float:
        """Seconds per image of one call of ``batch``."""
        started = time.perf_counter()
        self.runner.run(self.pixels[:batch], self.texts[:batch] if self.texts else None, self.params)
        return (time.perf_counter() - started) / batch

    def time(self, batch: int) -> Timing:
        # The better of two: a shared machine only ever makes a call slower.
        return Timing(batch, batch * min(self.once(batch), self.once(batch)))


def _decode_seconds(runner: Any, decode: Callable[[bytes], Any]) -> float:
    """CPU seconds to decode and prepare one 640x480 photo-like JPEG (the median of 5)."""
    from PIL import Image

    y, x = np.mgrid[0:480, 0:640]
    noise = np.random.default_rng(1).integers(0, 48, size=(480, 640, 3))
    rgb = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], axis=-1) + noise
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    params = runner.kind_params()
    costs = []
    for _ in range(5):
        started = time.thread_time()
        runner.prepare(decode(data).image, params)
        costs.append(time.thread_time() - started)
    return statistics.median(costs)


def _gpu(runner: Any) -> bool:
    return str(getattr(runner.model, "device", "cpu")).startswith("cuda")


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"


def _free_gpu() -> None:
    import torch

    torch.cuda.empty_cache()
