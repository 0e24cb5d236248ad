#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (the device tool runs it from the repo root):
#
#     bash bench/gpu_wheels.sh               # here, once: pydantic wheels into .whl (the GPU image lacks them)
#     bash bench/gpu_run.sh                  # on the device, carry [".whl"]; timeout_s=540; < 8 minutes
#     bash bench/gpu_run.sh --phases embed   # the embed phase alone: < 90 s of bench, timeout_s=240
#     bash bench/gpu_run.sh --phases translate   # the translate phase alone: < 60 s of bench, timeout_s=150
#
# Prints model-only images/s (BLIP-base architecture, random weights, bf16, greedy 20 tokens at batch
# 64..512, and beam 3 at 64..256), side by side at each point: sdpa, eager, sdpa+static (the static
# decode loop) and sdpa+graphs (the same, each step a CUDA graph), greedy ones with their share of bf16
# peak, each checked against eager on 64 corpus images first; a profile of one greedy batch of 256 per
# non-eager variant (vision vs decode ms per step, kernels per step, kernel-busy share;
# $OUT/profile-<variant>.txt), the in-process
# pipeline images/s (decode thread pool -> batcher -> model -> in-memory store; no Redis/Postgres there), nvJPEG decode + GPU resize images/s and its
# difference from the Pillow path (if torchvision is there), the naive transformers-pipeline
# images/s, the embed phase (RetrievalModel on the BLIP-base retrieval architecture, random weights, bf16:
# embed_images images/s from host uint8 at batch 128..1024, the same on device-resident input, SDPA
# attention tried on the vision encoder at one batch, and embed_texts texts/s at batch 1024; peak
# memory per point), the translate phase (NLLB-200-distilled-600M architecture, random weights, bf16,
# greedy 24 tokens on pre-tokenised caption-length ids: sentences/s at batch 64 and 256), the 12 MP
# photo phase (Pillow path with draft on / off on CPU threads vs nvJPEG + GPU resize: images/s, CPU-ms
# per image, cores per GPU at 2,000 img/s; nvJPEG skipped without torchvision), and nvidia-smi GPU
# utilisation per phase. Needs what the GPU image has (torch, transformers, numpy, Pillow, nvidia-smi)
# plus the pydantic wheels in .whl, installed below into /tmp/site. Results: $OUT/gpu.json, $OUT/gpu.log,
# $OUT/smi.csv, $OUT/profile-*.txt.
#
# Validated on CPU with:  .venv/bin/python -m bench.gpu_bench --device cpu --arch tiny \
#     --batches 8 16 --beam-batches 8 --pipeline-images 64 --pipeline-batch 16 --naive-images 8 --seconds 1 \
#     --embed-batches 8 16 --text-batch 64 --embed-seconds 0.5 --photo-images 8 --photo-distinct 4 --threads 2 \
#     --translate-batches 8 32 --translate-seconds 0.5
# and again with the GPU image's transformers (5.17; `make compat` installs it beside the venv):
#     PYTHONPATH=.imgq/compat/transformers-5.17.0 .venv/bin/python -m bench.gpu_bench ...  (same flags)
# `make test` runs the caption phases that way too (tests/unit/test_gpu_bench_smoke.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/.imgq/bench/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c 'import pydantic_settings' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c 'import sys, torch, transformers, PIL, numpy; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "pillow", PIL.__version__, "numpy", numpy.__version__, "cpus", __import__("os").cpu_count())'
} 2>&1 | tee "$OUT/env.txt"
# Budget (H100, estimated): checkpoint ~15 s, model-only 4 points x 4 variants x (warm-up + >=4 s)
# ~100 s, beam 3 points x 2 ~45 s, profiles ~15 s, pipeline 8192 images ~30-60 s, naive 128 images ~30 s, embed <= 90 s (its points
# stop starting after --embed-budget 80 s), translate (615M-parameter model built on the GPU ~5-10 s,
# 2 points x (warm-up + >=5 s)) ~30-45 s, photos (12 MP: 32 generated on 14 processes ~6-10 s, then
# Pillow draft 256 + Pillow full 64 + nvJPEG 256 images, x2 alternated) ~30-45 s. Hard cap 490 s.
#     bash bench/gpu_run.sh --phases photos   # the 12 MP phase alone: < 60 s of bench, timeout_s=180
timeout -k 10 490 "$PY" -m bench.gpu_bench --device cuda --arch base --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
rc=${PIPESTATUS[0]}
echo "gpu_bench exit $rc"
exit "$rc"
