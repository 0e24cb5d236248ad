"""How a worker picks its model batch and torch threads from timings of itself (pure).

The right settings depend on how the model's cost compares with the rest of the work, which only
the worker can measure (docs/performance.md, "Defaults as fast as tuning"):

* **Batch.** A batched call costs ``fixed + per_image x batch``: ``fixed`` is what a call pays
  whatever its size (for captioning, ~20 Python-driven decode steps and their kernel launches),
  ``per_image`` the real work. Two timed batches give both. The batch is the smallest power of two
  that makes ``fixed`` at most :data:`OVERHEAD_SHARE` of a call, capped so that one call stays
  within the device's latency budget: a bigger batch then buys at most ~10 % more throughput, and
  costs latency and memory. The batch is also at most half of what the worker holds in flight, so
  that decoding the next batch overlaps running this one. A model whose one-image call takes
  :data:`MODEL_BOUND_S` or more on a CPU (BLIP-base) has no overhead worth amortising: it gets
  :data:`MIN_BATCH`.
* **Threads (CPU only).** The model's intra-op threads and the decode threads share the cores.
  The model gets the cores in proportion to its share of the CPU work per image, at least one:
  with a model that is cheap next to decoding, idle OpenMP threads would otherwise spin on the
  cores that decoding needs (one thread: +16 % end to end with the tiny model here).

Explicit settings always win; this module only fills in what was left at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "CPU", "GPU", "MIN_BATCH", "MODEL_BOUND_S", "OVERHEAD_SHARE", "Budget", "Choice", "Timing",
    "batch_for", "budget_for", "cpu_probes", "fit", "threads_for",
]

MIN_BATCH = 8
OVERHEAD_SHARE = 0.1
# A one-image call this slow on a CPU is model work, not overhead: a generate call's own overhead
# is tens of ms (the tiny model: 15-60 ms a call here, 100+ under load), BLIP-base's call 2-4 s.
MODEL_BOUND_S = 1.0
# The larger CPU probe batch takes about this long at most (predicted from the one-image call).
PROBE_S = 4.0
CPU_PROBE_MAX = 64


@dataclass(frozen=True, slots=True)
class Budget:
    """What one device allows a batch: at most ``cap`` images and ``batch_s`` seconds per call."""

    cap: int
    batch_s: float


# A CPU batch of the tiny model at 256 takes ~0.5 s; the budget keeps a slower model's batch from
# holding its items for long. On a GPU the decode loop's launches dominate small batches (H200:
# 166 img/s at 64, 679 at 512), and 1,024 images of BLIP-base are ~25 GiB of activations in bf16.
CPU = Budget(cap=256, batch_s=2.0)
GPU = Budget(cap=1024, batch_s=1.0)


def budget_for(device: Budget, items_in_flight: int) -> Budget:
    """``device``'s budget, capped at half the items a worker holds at once (messages in flight x
    refs per message): with a batch as large as everything held, the decode threads idle while
    the model runs, and the model idles while they refill it."""
    cap = max(MIN_BATCH, _pow2_floor(items_in_flight / 2))
    return Budget(cap=min(device.cap, cap), batch_s=device.batch_s)


@dataclass(frozen=True, slots=True)
class Timing:
    """One timed call: ``batch`` images in ``seconds`` of wall time."""

    batch: int
    seconds: float

    def __post_init__(self) -> None:
        if self.batch < 1 or not self.seconds > 0:
            raise ValueError(f"a timing needs a positive batch and time, got {self.batch} in {self.seconds} s")


@dataclass(frozen=True, slots=True)
class Choice:
    max_batch: int
    torch_threads: int  # 0: leave torch's own (GPU, or the operator's)
    reasons: tuple[str, ...]

    def describe(self) -> str:
        threads = f", torch threads {self.torch_threads}" if self.torch_threads else ""
        return f"batch {self.max_batch}{threads}: " + "; ".join(self.reasons)


def fit(small: Timing, large: Timing) -> tuple[float, float]:
    """(fixed seconds per call, seconds per image) through two timings. Noise can make a timed
    point fall below the line through the origin; neither part is ever negative."""
    if large.batch <= small.batch:
        raise ValueError("the second timing needs the larger batch")
    per_image = max(0.0, (large.seconds - small.seconds) / (large.batch - small.batch))
    if per_image == 0.0:  # the larger batch was no slower: all of it is overhead
        return large.seconds, 0.0
    fixed = max(0.0, small.seconds - per_image * small.batch)
    return fixed, per_image


def cpu_probes(one_image_s: float) -> tuple[int, int] | None:
    """The two CPU batches to time, after a one-image call took ``one_image_s``; None when the
    model is so slow that per-call overhead cannot matter (and timing batches would take minutes)."""
    if one_image_s >= MODEL_BOUND_S:
        return None
    # The one-image call overstates the per-image cost (it is mostly overhead), so this is safe.
    large = max(16, min(CPU_PROBE_MAX, _pow2_floor(PROBE_S / one_image_s))) if one_image_s > 0 else CPU_PROBE_MAX
    return large // 8, large


def _pow2_floor(n: float) -> int:
    return 1 << max(0, math.floor(math.log2(n))) if n >= 1 else 1


def _pow2_ceil(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(n))) if n > 1 else 1


def batch_for(fixed: float, per_image: float, budget: Budget) -> tuple[int, str]:
    """The batch for a model that costs ``fixed + per_image x batch`` seconds a call."""
    if per_image <= 0:
        return budget.cap, f"a call costs the same whatever its size ({fixed * 1000:.1f} ms): the cap"
    # fixed / (fixed + per_image * b) <= share  <=>  b >= fixed * (1 - share) / (share * per_image)
    wanted = _pow2_ceil(fixed * (1 - OVERHEAD_SHARE) / (OVERHEAD_SHARE * per_image))
    fits = _pow2_floor((budget.batch_s - fixed) / per_image) if budget.batch_s > fixed + per_image else 1
    batch = max(MIN_BATCH, min(wanted, fits, budget.cap))
    why = (f"{fixed * 1000:.1f} ms per call + {per_image * 1000:.2f} ms per image; overhead "
           f"{fixed / (fixed + per_image * batch):.0%} of a call at {batch}")
    if wanted > min(fits, budget.cap) and batch > MIN_BATCH:
        why += f" (capped at {budget.cap})" if budget.cap <= fits else f" (kept to a call under {budget.batch_s:g} s)"
    return batch, why


def threads_for(cores: int, model_s: float, decode_s: float) -> tuple[int, str]:
    """Torch threads on a CPU-only host of ``cores`` cores, where one image costs ``model_s`` CPU
    seconds in the model (at one thread) and ``decode_s`` to fetch, decode and preprocess."""
    cores = max(1, cores)
    total = model_s + decode_s
    share = model_s / total if total > 0 else 1.0
    threads = min(cores, max(1, round(cores * share)))
    return threads, (f"model {model_s * 1000:.2f} ms, decode {decode_s * 1000:.2f} ms CPU per image: "
                     f"the model is {share:.0%} of the work on {cores} cores")
